//! EgressAssignments.Watch events (egress-gw controller) decoded into [`EgressPolicy`] values.
//!
//! Validation is per field: a garbage CIDR or source IP is left out with a [`Reject`]; the rest of the policy is
//! still programmed. A gateway without an egress address for either family is left out too.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use causeway_api::v1 as pb;
use ipnet::IpNet;

use super::mesh::truncate;
use super::mirror::{Decoded, EventKind, Item, Mirror, Reject, StreamError};
use super::model::{Gateway, MAX_GATEWAYS};

/// One policy's assignment, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub generation: i64,
    /// Normalized, sorted, deduplicated.
    pub destinations: Vec<IpNet>,
    pub excluded: Vec<IpNet>,
    pub sources: BTreeSet<IpAddr>,
    /// All groups' gateways flattened in order (a node listed twice keeps its first place), capped at
    /// [`MAX_GATEWAYS`].
    pub gateways: Vec<Gateway>,
}

pub type EgressMirror = Mirror<String, EgressPolicy>;

pub fn decode(ev: &pb::EgressWatchEvent) -> Result<Decoded<String, EgressPolicy>, StreamError> {
    let kind = EventKind::from_wire(ev.kind).ok_or(StreamError::UnknownKind(ev.kind))?;
    let mut rejects = Vec::new();
    let item = match (kind, &ev.policy) {
        (EventKind::SnapshotBegin | EventKind::SnapshotEnd, _) => Item::Nothing,
        (_, None) => {
            rejects.push(Reject::new(
                "event",
                "no_object",
                format!("{kind:?} at revision {} without a policy", ev.revision),
            ));
            Item::Nothing
        }
        (_, Some(p)) if p.name.is_empty() || p.name.len() > 253 => {
            rejects.push(Reject::new("policy", "bad_name", format!("policy name {:?}", truncate(&p.name))));
            Item::Nothing
        }
        (EventKind::Delete, Some(p)) => Item::Delete(p.name.clone()),
        (EventKind::Upsert, Some(p)) => Item::Upsert(p.name.clone(), policy(p, &mut rejects)),
    };
    Ok(Decoded { kind, revision: ev.revision, epoch: ev.epoch, item, rejects })
}

fn cidrs(name: &str, field: &'static str, list: &[String], rejects: &mut Vec<Reject>) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for s in list {
        match s.trim().parse::<IpNet>() {
            Ok(n) => {
                out.insert(n.trunc());
            }
            Err(_) => rejects.push(Reject::new("policy", field, format!("policy {name}: {:?}", truncate(s)))),
        }
    }
    out.into_iter().collect()
}

/// At most one egress address per family; later ones of the same family are ignored (and reported).
fn egress_ips(name: &str, list: &[String], rejects: &mut Vec<Reject>) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let (mut v4, mut v6) = (None, None);
    for s in list {
        match s.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if v4.is_none() => v4 = Some(a),
            Ok(IpAddr::V6(a)) if v6.is_none() => v6 = Some(a),
            Ok(a) => rejects.push(Reject::new("policy", "second_egress_ip", format!("policy {name}: {a}"))),
            Err(_) => rejects.push(Reject::new("policy", "bad_egress_ip", format!("policy {name}: {:?}", truncate(s)))),
        }
    }
    (v4, v6)
}

fn policy(p: &pb::EgressPolicyAssignment, rejects: &mut Vec<Reject>) -> EgressPolicy {
    let name = p.name.as_str();
    let destinations = cidrs(name, "bad_destination_cidr", &p.destination_cidrs, rejects);
    let excluded = cidrs(name, "bad_excluded_cidr", &p.excluded_cidrs, rejects);
    let mut sources = BTreeSet::new();
    for s in &p.source_ips {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) => {
                sources.insert(ip);
            }
            Err(_) => rejects.push(Reject::new("policy", "bad_source_ip", format!("policy {name}: {:?}", truncate(s)))),
        }
    }
    let mut gateways: Vec<Gateway> = Vec::new();
    for g in &p.groups {
        let (gv4, gv6) = egress_ips(name, &g.egress_ips, rejects);
        for gw in &g.gateways {
            let Ok(node_ip) = gw.node_ip.trim().parse::<IpAddr>() else {
                rejects.push(Reject::new(
                    "policy",
                    "bad_gateway_ip",
                    format!("policy {name}: {:?}", truncate(&gw.node_ip)),
                ));
                continue;
            };
            let (v4, v6) =
                if gw.egress_ips.is_empty() { (gv4, gv6) } else { egress_ips(name, &gw.egress_ips, rejects) };
            if v4.is_none() && v6.is_none() {
                rejects.push(Reject::new("policy", "no_egress_ip", format!("policy {name}: gateway {node_ip}")));
                continue;
            }
            if gateways.iter().any(|x| x.node_ip == node_ip) {
                rejects.push(Reject::new("policy", "duplicate_gateway", format!("policy {name}: gateway {node_ip}")));
                continue;
            }
            if gateways.len() == MAX_GATEWAYS {
                rejects.push(Reject::new("policy", "too_many_gateways", format!("policy {name}: {node_ip} dropped")));
                continue;
            }
            gateways.push(Gateway { node_ip, egress_v4: v4, egress_v6: v6 });
        }
    }
    EgressPolicy { generation: p.generation, destinations, excluded, sources, gateways }
}

/// The egress addresses this node (`local`, its node IP) SNATs to: for every policy that lists it as an active
/// gateway, that gateway's IPv4 and IPv6 egress address (per-gateway addresses of `interface:` groups are already
/// resolved into [`Gateway`]). A node that is not an active gateway gets an empty set.
pub fn local_egress_ips(
    policies: &std::collections::BTreeMap<String, EgressPolicy>,
    local: IpAddr,
) -> BTreeSet<IpAddr> {
    policies
        .values()
        .flat_map(|p| p.gateways.iter())
        .filter(|g| g.node_ip == local)
        .flat_map(|g| [g.egress_v4.map(IpAddr::V4), g.egress_v6.map(IpAddr::V6)])
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::egress_watch_event::Kind;

    fn assignment() -> pb::EgressPolicyAssignment {
        pb::EgressPolicyAssignment {
            name: "billing".into(),
            generation: 3,
            destination_cidrs: vec!["203.0.113.7/24".into(), "2001:db8::/32".into(), "nonsense".into()],
            excluded_cidrs: vec!["203.0.113.128/25".into()],
            source_ips: vec!["10.0.1.5".into(), "10.0.1.5".into(), "10.0.1.300".into(), "fd00::5".into()],
            groups: vec![
                pb::EgressGroupAssignment {
                    egress_ips: vec!["192.0.2.10".into(), "2001:db8:e::10".into()],
                    gateways: vec![
                        pb::GatewayAssignment { node_ip: "192.168.10.21".into(), egress_ips: vec![] },
                        pb::GatewayAssignment { node_ip: "192.168.10.22".into(), egress_ips: vec![] },
                    ],
                },
                pb::EgressGroupAssignment {
                    egress_ips: vec![],
                    gateways: vec![
                        // Interface-mode gateway: its own address.
                        pb::GatewayAssignment {
                            node_ip: "192.168.10.23".into(),
                            egress_ips: vec!["192.0.2.23".into()],
                        },
                        // No address at all: dropped.
                        pb::GatewayAssignment { node_ip: "192.168.10.24".into(), egress_ips: vec![] },
                        // Already listed in the first group: keeps its first place.
                        pb::GatewayAssignment {
                            node_ip: "192.168.10.21".into(),
                            egress_ips: vec!["192.0.2.99".into()],
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn assignment_decodes_with_bad_fields_left_out() {
        let ev = pb::EgressWatchEvent { kind: Kind::Upsert as i32, revision: 2, epoch: 1, policy: Some(assignment()) };
        let d = decode(&ev).unwrap();
        let Item::Upsert(name, p) = d.item else { panic!("{:?}", d.item) };
        assert_eq!(name, "billing");
        assert_eq!(p.destinations, vec!["203.0.113.0/24".parse::<IpNet>().unwrap(), "2001:db8::/32".parse().unwrap()]);
        assert_eq!(p.excluded, vec!["203.0.113.128/25".parse::<IpNet>().unwrap()]);
        assert_eq!(p.sources.len(), 2);
        let gws: Vec<String> = p.gateways.iter().map(|g| g.node_ip.to_string()).collect();
        assert_eq!(gws, vec!["192.168.10.21", "192.168.10.22", "192.168.10.23"]);
        assert_eq!(p.gateways[0].egress_v4, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(p.gateways[0].egress_v6, Some("2001:db8:e::10".parse().unwrap()));
        assert_eq!(p.gateways[2].egress_v4, Some("192.0.2.23".parse().unwrap()));
        assert_eq!(p.gateways[2].egress_v6, None);
        let mut reasons: Vec<&str> = d.rejects.iter().map(|r| r.reason).collect();
        reasons.sort();
        assert_eq!(reasons, vec!["bad_destination_cidr", "bad_source_ip", "duplicate_gateway", "no_egress_ip"]);
    }

    #[test]
    fn local_egress_ips_are_those_of_this_nodes_gateway_entries() {
        let ev = pb::EgressWatchEvent { kind: Kind::Upsert as i32, revision: 2, epoch: 1, policy: Some(assignment()) };
        let Item::Upsert(name, p) = decode(&ev).unwrap().item else { panic!() };
        let mut policies = std::collections::BTreeMap::new();
        policies.insert(name, p);
        let ips = |node: &str| -> Vec<String> {
            local_egress_ips(&policies, node.parse().unwrap()).iter().map(ToString::to_string).collect()
        };
        // The group's addresses, both families.
        assert_eq!(ips("192.168.10.21"), vec!["192.0.2.10", "2001:db8:e::10"]);
        // An interface-mode gateway: its own address only.
        assert_eq!(ips("192.168.10.23"), vec!["192.0.2.23"]);
        // Left out (no address) or not a gateway at all: nothing to announce.
        assert!(ips("192.168.10.24").is_empty());
        assert!(ips("10.0.0.1").is_empty());
    }

    #[test]
    fn gateways_are_capped_and_names_checked() {
        let mut a = assignment();
        a.groups = vec![pb::EgressGroupAssignment {
            egress_ips: vec!["192.0.2.10".into()],
            gateways: (0..100u32)
                .map(|i| pb::GatewayAssignment {
                    node_ip: Ipv4Addr::from(0xc0a8_0000 + i).to_string(),
                    egress_ips: vec![],
                })
                .collect(),
        }];
        let ev = pb::EgressWatchEvent { kind: Kind::Upsert as i32, revision: 2, epoch: 1, policy: Some(a) };
        let d = decode(&ev).unwrap();
        let Item::Upsert(_, p) = d.item else { panic!() };
        assert_eq!(p.gateways.len(), MAX_GATEWAYS);
        assert_eq!(d.rejects.iter().filter(|r| r.reason == "too_many_gateways").count(), 100 - MAX_GATEWAYS);

        let nameless = pb::EgressWatchEvent {
            kind: Kind::Delete as i32,
            revision: 2,
            epoch: 1,
            policy: Some(pb::EgressPolicyAssignment::default()),
        };
        let d = decode(&nameless).unwrap();
        assert_eq!(d.item, Item::Nothing);
        assert_eq!(d.rejects[0].reason, "bad_name");
    }
}

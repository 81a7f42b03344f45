//! MeshView.Watch events (identity-sync) decoded into domain objects, validating every field.
//!
//! identity-sync validates what it imports, but the agent still treats the stream as outside input: a garbage IP,
//! a zero identity or a malformed key drops that field or object with a [`Reject`], never the stream.

use std::net::IpAddr;

use causeway_api::v1::{self as pb, watch_event::Object};
use ipnet::IpNet;

use super::mirror::{Decoded, EventKind, Item, Mirror, Reject, StreamError};
use super::model::WgKey;

/// Key of one object of the mesh view.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshKey {
    Identity(u32),
    /// A pod IP (host prefix) or, if the server ever sends one, a prefix.
    Ip(IpNet),
    Node {
        cluster: String,
        name: String,
    },
    Service {
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshIdentity {
    pub cluster: String,
    pub labels: String,
}

/// A remote pod IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteIp {
    pub identity: u32,
    /// The node the pod runs on (the tunnel endpoint).
    pub host_ip: Option<IpAddr>,
    pub cluster_id: u32,
    pub encrypt_key: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub cluster_id: u32,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub zone: Option<String>,
    pub wg_key: Option<WgKey>,
}

/// A global service's remote backends. Carried for completeness and metrics; the maps this agent programs do not
/// hold services (service load-balancing is the CNI's, fed by identity-sync's EndpointSlices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalService {
    pub affinity: String,
    pub frontends: Vec<IpAddr>,
    pub backends: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshObject {
    Identity(MeshIdentity),
    Ip(RemoteIp),
    Node(RemoteNode),
    Service(GlobalService),
}

pub type MeshMirror = Mirror<MeshKey, MeshObject>;

/// Decodes one wire event. Errors only for framing (an unknown kind); bad objects become [`Reject`]s.
pub fn decode(ev: &pb::WatchEvent) -> Result<Decoded<MeshKey, MeshObject>, StreamError> {
    let kind = EventKind::from_wire(ev.kind).ok_or(StreamError::UnknownKind(ev.kind))?;
    let mut rejects = Vec::new();
    let item = match (kind, &ev.object) {
        (EventKind::SnapshotBegin | EventKind::SnapshotEnd, _) => Item::Nothing,
        (_, None) => {
            rejects.push(Reject::new(
                "event",
                "no_object",
                format!("{kind:?} at revision {} without an object", ev.revision),
            ));
            Item::Nothing
        }
        (EventKind::Delete, Some(o)) => match key(o, &mut rejects) {
            Some(k) => Item::Delete(k),
            None => Item::Nothing,
        },
        (EventKind::Upsert, Some(o)) => match key(o, &mut rejects) {
            // A key whose value is unusable is deleted: keeping an older value would program something the server
            // no longer says.
            Some(k) => match value(o, &mut rejects) {
                Some(v) => Item::Upsert(k, v),
                None => Item::Delete(k),
            },
            None => Item::Nothing,
        },
    };
    Ok(Decoded { kind, revision: ev.revision, epoch: ev.epoch, item, rejects })
}

/// Parses "10.1.2.3", "fd00::1" or a prefix "10.1.0.0/16" into a normalized prefix.
pub fn parse_ip_or_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}

fn key(o: &Object, rejects: &mut Vec<Reject>) -> Option<MeshKey> {
    match o {
        Object::Identity(i) => {
            if i.id == 0 {
                rejects.push(Reject::new("identity", "zero_id", "identity 0 is reserved"));
                return None;
            }
            Some(MeshKey::Identity(i.id))
        }
        Object::Ipcache(e) => match parse_ip_or_net(&e.ip) {
            Some(n) => Some(MeshKey::Ip(n)),
            None => {
                rejects.push(Reject::new("ipcache", "bad_ip", format!("ip {:?}", truncate(&e.ip))));
                None
            }
        },
        Object::Node(n) => {
            if n.name.is_empty() || n.cluster.is_empty() {
                rejects.push(Reject::new("node", "no_name", format!("node {:?}/{:?}", n.cluster, n.name)));
                return None;
            }
            Some(MeshKey::Node { cluster: n.cluster.clone(), name: n.name.clone() })
        }
        Object::Service(s) => {
            if s.name.is_empty() || s.namespace.is_empty() {
                rejects.push(Reject::new("service", "no_name", format!("service {:?}/{:?}", s.namespace, s.name)));
                return None;
            }
            Some(MeshKey::Service { namespace: s.namespace.clone(), name: s.name.clone() })
        }
    }
}

fn value(o: &Object, rejects: &mut Vec<Reject>) -> Option<MeshObject> {
    match o {
        Object::Identity(i) => {
            Some(MeshObject::Identity(MeshIdentity { cluster: i.cluster.clone(), labels: i.labels.clone() }))
        }
        Object::Ipcache(e) => {
            if e.identity == 0 {
                rejects.push(Reject::new("ipcache", "zero_identity", format!("ip {}", truncate(&e.ip))));
                return None;
            }
            let Ok(encrypt_key) = u8::try_from(e.encrypt_key) else {
                rejects.push(Reject::new(
                    "ipcache",
                    "bad_encrypt_key",
                    format!("ip {} key {}", truncate(&e.ip), e.encrypt_key),
                ));
                return None;
            };
            let host_ip = if e.host_ip.is_empty() {
                None
            } else {
                match e.host_ip.trim().parse::<IpAddr>() {
                    Ok(h) => Some(h),
                    Err(_) => {
                        // Without its node the entry cannot be tunnelled; programming it without would misroute.
                        rejects.push(Reject::new(
                            "ipcache",
                            "bad_host_ip",
                            format!("ip {} host_ip {:?}", truncate(&e.ip), truncate(&e.host_ip)),
                        ));
                        return None;
                    }
                }
            };
            Some(MeshObject::Ip(RemoteIp { identity: e.identity, host_ip, cluster_id: e.cluster_id, encrypt_key }))
        }
        Object::Node(n) => {
            let what = || format!("node {}/{}", n.cluster, n.name);
            let mut internal_ips = Vec::new();
            for s in &n.internal_ips {
                match s.trim().parse::<IpAddr>() {
                    Ok(ip) if !internal_ips.contains(&ip) => internal_ips.push(ip),
                    Ok(_) => {}
                    Err(_) => rejects.push(Reject::new("node", "bad_ip", format!("{} ip {:?}", what(), truncate(s)))),
                }
            }
            let mut pod_cidrs = Vec::new();
            for s in &n.pod_cidrs {
                match s.trim().parse::<IpNet>() {
                    Ok(c) if !pod_cidrs.contains(&c.trunc()) => pod_cidrs.push(c.trunc()),
                    Ok(_) => {}
                    Err(_) => {
                        rejects.push(Reject::new("node", "bad_cidr", format!("{} cidr {:?}", what(), truncate(s))))
                    }
                }
            }
            let wg_key = if n.wireguard_pub_key.is_empty() {
                None
            } else {
                let k = WgKey::from_base64(&n.wireguard_pub_key);
                if k.is_none() {
                    rejects.push(Reject::new("node", "bad_wireguard_key", what()));
                }
                k
            };
            let zone = (!n.zone.is_empty()).then(|| n.zone.clone());
            Some(MeshObject::Node(RemoteNode { cluster_id: n.cluster_id, internal_ips, pod_cidrs, zone, wg_key }))
        }
        Object::Service(s) => {
            let parse = |ips: Vec<&String>, rejects: &mut Vec<Reject>| {
                let mut out = Vec::new();
                for ip in ips {
                    match ip.trim().parse::<IpAddr>() {
                        Ok(a) => out.push(a),
                        Err(_) => rejects.push(Reject::new(
                            "service",
                            "bad_ip",
                            format!("service {}/{} ip {:?}", s.namespace, s.name, truncate(ip)),
                        )),
                    }
                }
                out
            };
            let frontends = parse(s.frontends.iter().map(|f| &f.ip).collect(), rejects);
            let backends = parse(s.backends.iter().map(|b| &b.ip).collect(), rejects);
            Some(MeshObject::Service(GlobalService { affinity: s.affinity.clone(), frontends, backends }))
        }
    }
}

/// Keeps a hostile value from flooding logs.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::watch_event::Kind;

    fn ev(kind: Kind, rev: u64, object: Option<Object>) -> pb::WatchEvent {
        pb::WatchEvent { kind: kind as i32, revision: rev, epoch: 1, object }
    }

    fn ip(ip: &str, identity: u32, host: &str) -> Object {
        Object::Ipcache(pb::IpCacheEntry {
            ip: ip.into(),
            identity,
            host_ip: host.into(),
            cluster: "east".into(),
            cluster_id: 1,
            ..Default::default()
        })
    }

    #[test]
    fn ipcache_upsert_decodes_and_normalizes() {
        let d = decode(&ev(Kind::Upsert, 3, Some(ip("10.1.0.5", 70000, "192.168.1.2")))).unwrap();
        assert!(d.rejects.is_empty());
        assert_eq!(
            d.item,
            Item::Upsert(
                MeshKey::Ip("10.1.0.5/32".parse().unwrap()),
                MeshObject::Ip(RemoteIp {
                    identity: 70000,
                    host_ip: Some("192.168.1.2".parse().unwrap()),
                    cluster_id: 1,
                    encrypt_key: 0
                })
            )
        );
        let d = decode(&ev(Kind::Upsert, 3, Some(ip("fd00::5", 70000, "")))).unwrap();
        assert!(matches!(d.item, Item::Upsert(MeshKey::Ip(n), _) if n.prefix_len() == 128));
    }

    #[test]
    fn garbage_is_rejected_not_fatal() {
        // Unparseable key: nothing, one reject.
        let d = decode(&ev(Kind::Upsert, 3, Some(ip("10.1.0.999", 70000, "")))).unwrap();
        assert_eq!(d.item, Item::Nothing);
        assert_eq!(d.rejects[0].reason, "bad_ip");
        // Good key, bad value: the key is deleted rather than left at an old value.
        let d = decode(&ev(Kind::Upsert, 3, Some(ip("10.1.0.9", 70000, "not-an-ip")))).unwrap();
        assert_eq!(d.item, Item::Delete(MeshKey::Ip("10.1.0.9/32".parse().unwrap())));
        assert_eq!(d.rejects[0].reason, "bad_host_ip");
        let d = decode(&ev(Kind::Upsert, 3, Some(ip("10.1.0.9", 0, "")))).unwrap();
        assert_eq!(d.rejects[0].reason, "zero_identity");
        // A huge hostile value is truncated in the detail.
        let long = "x".repeat(10_000);
        let d = decode(&ev(Kind::Upsert, 3, Some(ip(&long, 1, "")))).unwrap();
        assert!(d.rejects[0].detail.len() < 100);
        // Unknown kinds are a framing error.
        let bad = pb::WatchEvent { kind: 42, revision: 1, epoch: 1, object: None };
        assert_eq!(decode(&bad).unwrap_err(), StreamError::UnknownKind(42));
        // An upsert without an object advances the revision but changes nothing.
        let d = decode(&ev(Kind::Upsert, 3, None)).unwrap();
        assert_eq!((d.item, d.rejects.len()), (Item::Nothing, 1));
    }

    #[test]
    fn node_keeps_good_fields_and_drops_bad_ones() {
        let key = WgKey([7; 32]).to_base64();
        let node = Object::Node(pb::Node {
            cluster: "east".into(),
            name: "n1".into(),
            cluster_id: 1,
            internal_ips: vec!["192.168.1.2".into(), "bogus".into(), "192.168.1.2".into()],
            pod_cidrs: vec!["10.1.0.7/24".into(), "10.999.0.0/16".into(), "fd00:1::/64".into()],
            zone: "".into(),
            wireguard_pub_key: key,
        });
        let d = decode(&ev(Kind::Upsert, 3, Some(node))).unwrap();
        let Item::Upsert(_, MeshObject::Node(n)) = d.item else { panic!("{:?}", d.item) };
        assert_eq!(n.internal_ips, vec!["192.168.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(n.pod_cidrs, vec!["10.1.0.0/24".parse::<IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]);
        assert_eq!(n.wg_key, Some(WgKey([7; 32])));
        assert_eq!(d.rejects.iter().map(|r| r.reason).collect::<Vec<_>>(), vec!["bad_ip", "bad_cidr"]);

        let bad_key = Object::Node(pb::Node {
            cluster: "east".into(),
            name: "n2".into(),
            wireguard_pub_key: "dG9vIHNob3J0".into(),
            ..Default::default()
        });
        let d = decode(&ev(Kind::Upsert, 3, Some(bad_key))).unwrap();
        let Item::Upsert(_, MeshObject::Node(n)) = d.item else { panic!() };
        assert_eq!(n.wg_key, None);
        assert_eq!(d.rejects[0].reason, "bad_wireguard_key");
    }

    #[test]
    fn deletes_carry_only_keys() {
        let d = decode(&ev(Kind::Delete, 4, Some(ip("10.1.0.5", 0, "")))).unwrap();
        assert_eq!(d.item, Item::Delete(MeshKey::Ip("10.1.0.5/32".parse().unwrap())));
        let d =
            decode(&ev(Kind::Delete, 4, Some(Object::Identity(pb::Identity { id: 0, ..Default::default() })))).unwrap();
        assert_eq!(d.item, Item::Nothing);
    }
}

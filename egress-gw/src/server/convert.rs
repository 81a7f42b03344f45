//! Core assignments → `causeway.v1` wire messages. Pure functions: the per-node part of the view is only which
//! gateway list a group sends, and that depends on nothing but the node's zone.
//!
//! The stream sends [`WireEvent`]s: the event's header (kind, revision, epoch) plus the policy already encoded, so
//! one encoding of a policy view ([`encode_policy`]) can go to every node that shares the view ([`view_key`]).

use causeway_api::v1::GatewayAssignment as WireGateway;
use causeway_api::v1::{egress_watch_event, EgressGroupAssignment, EgressPolicyAssignment, EgressWatchEvent};
use prost::bytes::{BufMut, Bytes};
use prost::Message;

use crate::core::{Gateway, GroupAssignment, PolicyAssignment};

/// The gateways a node in `zone` uses for a group: the zone's own list when the group has one (zone affinity;
/// an empty list there means "drop", as `localOnly` asks), else the zone-agnostic list (affinity disabled, a
/// node without a zone label, or a zone the controller has not seen).
pub fn gateways_for_zone<'a>(group: &'a GroupAssignment, zone: Option<&str>) -> &'a [Gateway] {
    match zone.and_then(|z| group.by_zone.get(z)) {
        Some(gws) => gws,
        None => &group.gateways,
    }
}

/// One policy as a node in `zone` sees it.
pub fn policy_for_zone(a: &PolicyAssignment, zone: Option<&str>) -> EgressPolicyAssignment {
    let strings = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    EgressPolicyAssignment {
        name: a.name.clone(),
        generation: a.generation,
        destination_cidrs: a.destination_cidrs.iter().map(ToString::to_string).collect(),
        excluded_cidrs: a.excluded_cidrs.iter().map(ToString::to_string).collect(),
        source_ips: strings(&a.source_ips),
        groups: a
            .groups
            .iter()
            .map(|g| EgressGroupAssignment {
                egress_ips: strings(&g.egress_ips),
                gateways: gateways_for_zone(g, zone)
                    .iter()
                    .map(|gw| WireGateway { node_ip: gw.node_ip.to_string(), egress_ips: strings(&gw.egress_ips) })
                    .collect(),
            })
            .collect(),
    }
}

/// The zone that decides what a node in `zone` is sent for `a`: the zone itself when some group has a list for it,
/// else `None` (the zone-agnostic view, shared by nodes without a zone and by zones the policy does not name). Two
/// nodes with the same key get byte-identical messages.
pub fn view_key<'a>(a: &PolicyAssignment, zone: Option<&'a str>) -> Option<&'a str> {
    zone.filter(|z| a.groups.iter().any(|g| g.by_zone.contains_key(*z)))
}

/// [`policy_for_zone`], protobuf-encoded.
pub fn encode_policy(a: &PolicyAssignment, zone: Option<&str>) -> Bytes {
    Bytes::from(policy_for_zone(a, zone).encode_to_vec())
}

/// One `EgressWatchEvent` with its policy already encoded: cloning it copies no policy bytes, and encoding it
/// writes the same bytes prost would write for the decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct WireEvent {
    pub kind: egress_watch_event::Kind,
    pub revision: u64,
    pub epoch: u64,
    /// An encoded `EgressPolicyAssignment`.
    pub policy: Option<Bytes>,
}

/// `EgressWatchEvent.policy`'s field number.
const POLICY_TAG: u32 = 10;

impl WireEvent {
    pub fn marker(kind: egress_watch_event::Kind, revision: u64, epoch: u64) -> Self {
        WireEvent { kind, revision, epoch, policy: None }
    }

    pub fn upsert(policy: Bytes, revision: u64, epoch: u64) -> Self {
        WireEvent { kind: egress_watch_event::Kind::Upsert, revision, epoch, policy: Some(policy) }
    }

    /// A DELETE carries only the policy's name.
    pub fn delete(name: &str, revision: u64, epoch: u64) -> Self {
        let policy = EgressPolicyAssignment { name: name.to_string(), ..Default::default() };
        let policy = Bytes::from(policy.encode_to_vec());
        WireEvent { kind: egress_watch_event::Kind::Delete, revision, epoch, policy: Some(policy) }
    }

    /// Bytes [`WireEvent::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let head = self.head().encoded_len();
        head + self
            .policy
            .as_ref()
            .map_or(0, |p| prost::encoding::key_len(POLICY_TAG) + prost::length_delimiter_len(p.len()) + p.len())
    }

    fn head(&self) -> EgressWatchEvent {
        EgressWatchEvent { kind: self.kind as i32, revision: self.revision, epoch: self.epoch, policy: None }
    }

    /// Writes the event as an `EgressWatchEvent`: the header fields (all before the policy's tag, in field order,
    /// as prost writes them), then the policy as a length-delimited field.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), NoSpace> {
        let required = self.encoded_len();
        let remaining = buf.remaining_mut();
        if required > remaining {
            return Err(NoSpace { required, remaining });
        }
        self.head().encode_raw(buf);
        if let Some(p) = &self.policy {
            prost::encoding::encode_key(POLICY_TAG, prost::encoding::WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(p.len() as u64, buf);
            buf.put_slice(p);
        }
        Ok(())
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        // A Vec grows as needed, so encoding cannot run out of space.
        let _ = self.encode(&mut v);
        v
    }
}

/// The buffer given to [`WireEvent::encode`] cannot hold the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSpace {
    pub required: usize,
    pub remaining: usize,
}

impl std::fmt::Display for NoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "buffer too small to encode an event: {} bytes needed, {} left", self.required, self.remaining)
    }
}

impl std::error::Error for NoSpace {}

pub fn event(
    kind: egress_watch_event::Kind,
    revision: u64,
    epoch: u64,
    policy: Option<EgressPolicyAssignment>,
) -> EgressWatchEvent {
    EgressWatchEvent { kind: kind as i32, revision, epoch, policy }
}

pub fn upsert(a: &PolicyAssignment, zone: Option<&str>, revision: u64, epoch: u64) -> EgressWatchEvent {
    event(egress_watch_event::Kind::Upsert, revision, epoch, Some(policy_for_zone(a, zone)))
}

/// A DELETE carries only the policy's name.
pub fn delete(name: &str, revision: u64, epoch: u64) -> EgressWatchEvent {
    let policy = EgressPolicyAssignment { name: name.to_string(), ..Default::default() };
    event(egress_watch_event::Kind::Delete, revision, epoch, Some(policy))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn gw(node: &str, node_ip: &str, egress: &[&str]) -> Gateway {
        Gateway { node: node.into(), node_ip: ip(node_ip), egress_ips: egress.iter().map(|e| ip(e)).collect() }
    }

    fn assignment() -> PolicyAssignment {
        PolicyAssignment {
            name: "partner-api".into(),
            generation: 7,
            destination_cidrs: vec!["198.51.100.0/24".parse().expect("cidr"), "2001:db8:1::/48".parse().expect("cidr")],
            excluded_cidrs: vec!["198.51.100.64/26".parse().expect("cidr")],
            source_ips: vec![ip("10.0.1.5"), ip("fd00::5")],
            groups: vec![
                GroupAssignment {
                    egress_ips: vec![ip("192.0.2.20")],
                    gateways: vec![gw("gw-a", "172.18.0.11", &[]), gw("gw-b", "172.18.0.12", &[])],
                    by_zone: BTreeMap::from([
                        ("eu-1a".to_string(), vec![gw("gw-a", "172.18.0.11", &[])]),
                        ("eu-1b".to_string(), vec![gw("gw-b", "172.18.0.12", &[])]),
                        // localOnly with no healthy local gateway: the zone's sources drop the traffic.
                        ("eu-1c".to_string(), vec![]),
                    ]),
                    healthy: vec![ip("172.18.0.11"), ip("172.18.0.12")],
                },
                GroupAssignment {
                    egress_ips: vec![],
                    gateways: vec![gw("gw-c", "172.18.0.13", &["192.0.2.30", "2001:db8::30"])],
                    by_zone: BTreeMap::new(),
                    healthy: vec![ip("172.18.0.13")],
                },
            ],
        }
    }

    fn node_ips(p: &EgressPolicyAssignment, group: usize) -> Vec<&str> {
        p.groups[group].gateways.iter().map(|g| g.node_ip.as_str()).collect()
    }

    #[test]
    fn every_field_is_carried_as_text() {
        let p = policy_for_zone(&assignment(), None);
        assert_eq!(p.name, "partner-api");
        assert_eq!(p.generation, 7);
        assert_eq!(p.destination_cidrs, vec!["198.51.100.0/24", "2001:db8:1::/48"]);
        assert_eq!(p.excluded_cidrs, vec!["198.51.100.64/26"]);
        assert_eq!(p.source_ips, vec!["10.0.1.5", "fd00::5"]);
        assert_eq!(p.groups.len(), 2);
        assert_eq!(p.groups[0].egress_ips, vec!["192.0.2.20"]);
        assert!(p.groups[0].gateways.iter().all(|g| g.egress_ips.is_empty()), "group egressIP applies");
        assert_eq!(p.groups[1].egress_ips, Vec::<String>::new());
        assert_eq!(p.groups[1].gateways[0].egress_ips, vec!["192.0.2.30", "2001:db8::30"]);
    }

    #[test]
    fn a_zoned_node_gets_its_zones_gateways() {
        let a = assignment();
        assert_eq!(node_ips(&policy_for_zone(&a, Some("eu-1a")), 0), vec!["172.18.0.11"]);
        assert_eq!(node_ips(&policy_for_zone(&a, Some("eu-1b")), 0), vec!["172.18.0.12"]);
        // A group without zone affinity is the same for every zone.
        assert_eq!(node_ips(&policy_for_zone(&a, Some("eu-1a")), 1), vec!["172.18.0.13"]);
    }

    #[test]
    fn an_empty_zone_list_is_sent_empty_not_replaced_by_the_agnostic_one() {
        let p = policy_for_zone(&assignment(), Some("eu-1c"));
        assert!(p.groups[0].gateways.is_empty(), "localOnly without a local gateway must drop, not fall back");
    }

    #[test]
    fn no_zone_or_an_unknown_zone_falls_back_to_the_agnostic_list() {
        let a = assignment();
        for zone in [None, Some("mars-1")] {
            assert_eq!(node_ips(&policy_for_zone(&a, zone), 0), vec!["172.18.0.11", "172.18.0.12"], "{zone:?}");
        }
    }

    #[test]
    fn wire_events_are_byte_identical_to_the_prost_encoding() {
        let a = assignment();
        for zone in [None, Some("eu-1a"), Some("eu-1c")] {
            let wire = WireEvent::upsert(encode_policy(&a, zone), 5, 99);
            assert_eq!(wire.encode_to_vec(), upsert(&a, zone, 5, 99).encode_to_vec(), "{zone:?}");
            assert_eq!(wire.encoded_len(), wire.encode_to_vec().len());
        }
        let del = WireEvent::delete("partner-api", 6, 99);
        assert_eq!(del.encode_to_vec(), delete("partner-api", 6, 99).encode_to_vec());
        let begin = WireEvent::marker(egress_watch_event::Kind::SnapshotBegin, 7, 99);
        assert_eq!(begin.encode_to_vec(), event(egress_watch_event::Kind::SnapshotBegin, 7, 99, None).encode_to_vec());
        let bytes = WireEvent::upsert(encode_policy(&a, None), 5, 99).encode_to_vec();
        let decoded = EgressWatchEvent::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, upsert(&a, None, 5, 99));
    }

    #[test]
    fn encoding_into_a_full_buffer_fails_instead_of_truncating() {
        let e = WireEvent::upsert(encode_policy(&assignment(), None), 5, 99);
        let mut small = [0u8; 8];
        let err = e.encode(&mut &mut small[..]).expect_err("8 bytes cannot hold the event");
        assert_eq!((err.required, err.remaining), (e.encoded_len(), 8));
    }

    #[test]
    fn zones_the_policy_does_not_name_share_the_agnostic_view() {
        let a = assignment();
        assert_eq!(view_key(&a, Some("eu-1a")), Some("eu-1a"));
        assert_eq!(view_key(&a, Some("eu-1c")), Some("eu-1c"), "an empty zone list is its own view");
        assert_eq!(view_key(&a, Some("mars-1")), None);
        assert_eq!(view_key(&a, None), None);
        assert_eq!(encode_policy(&a, Some("mars-1")), encode_policy(&a, None));
    }

    #[test]
    fn events_carry_kind_revision_epoch_and_delete_only_the_name() {
        let e = upsert(&assignment(), None, 5, 99);
        assert_eq!((e.kind, e.revision, e.epoch), (egress_watch_event::Kind::Upsert as i32, 5, 99));
        assert_eq!(e.policy.map(|p| p.name), Some("partner-api".to_string()));
        let d = delete("partner-api", 6, 99);
        assert_eq!(d.kind, egress_watch_event::Kind::Delete as i32);
        let p = d.policy.expect("delete names the policy");
        assert_eq!(p, EgressPolicyAssignment { name: "partner-api".into(), ..Default::default() });
    }
}

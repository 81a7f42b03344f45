//! The meshed clusters' pod CIDRs, learned from identity-sync's MeshView stream (its `Node` objects: every node of
//! every cluster in the mesh, with the pod CIDRs allocated to it), so that traffic to another cluster's pods never
//! goes to a gateway without anyone keeping `--mesh-pod-cidrs` in step with the mesh.
//!
//! Sans-IO: stream events in, the current `cluster → pod CIDRs` map out when it changed. A snapshot
//! (SNAPSHOT_BEGIN … SNAPSHOT_END) replaces everything at its end, so a reconnect never shows a half-empty mesh;
//! deltas apply at once.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// One node's part: (cluster, node name) → its pod CIDRs.
type NodeKey = (String, String);

/// What one stream event means for the mesh's pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshNodeEvent {
    SnapshotBegin,
    SnapshotEnd,
    /// A node and its pod CIDRs as written (unparsed: a remote's garbage is the tracker's to drop).
    Upsert {
        cluster: String,
        node: String,
        pod_cidrs: Vec<String>,
    },
    Delete {
        cluster: String,
        node: String,
    },
}

#[derive(Debug, Default)]
pub struct MeshPodCidrs {
    nodes: BTreeMap<NodeKey, Vec<IpNet>>,
    /// Collected during a snapshot, swapped in at its end.
    snapshot: Option<BTreeMap<NodeKey, Vec<IpNet>>>,
    /// The map last returned.
    published: Option<BTreeMap<String, Vec<IpNet>>>,
    /// Pod CIDR strings that did not parse (counted, never used).
    pub rejected: u64,
}

impl MeshPodCidrs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; returns the whole `cluster → pod CIDRs` map when it changed (and at the end of the first
    /// snapshot, even if empty).
    pub fn apply(&mut self, event: MeshNodeEvent) -> Option<BTreeMap<String, Vec<IpNet>>> {
        match event {
            MeshNodeEvent::SnapshotBegin => {
                self.snapshot = Some(BTreeMap::new());
                return None;
            }
            MeshNodeEvent::SnapshotEnd => match self.snapshot.take() {
                Some(s) => self.nodes = s,
                None => return None,
            },
            MeshNodeEvent::Upsert { cluster, node, pod_cidrs } => {
                let cidrs: Vec<IpNet> = pod_cidrs
                    .iter()
                    .filter_map(|c| {
                        let parsed = c.trim().parse::<IpNet>().ok().map(|n| n.trunc());
                        if parsed.is_none() {
                            self.rejected += 1;
                        }
                        parsed
                    })
                    .collect();
                let target = self.snapshot.as_mut().unwrap_or(&mut self.nodes);
                target.insert((cluster, node), cidrs);
                if self.snapshot.is_some() {
                    return None;
                }
            }
            MeshNodeEvent::Delete { cluster, node } => {
                let target = self.snapshot.as_mut().unwrap_or(&mut self.nodes);
                target.remove(&(cluster, node));
                if self.snapshot.is_some() {
                    return None;
                }
            }
        }
        let current = self.by_cluster();
        if self.published.as_ref() == Some(&current) {
            return None;
        }
        self.published = Some(current.clone());
        Some(current)
    }

    fn by_cluster(&self) -> BTreeMap<String, Vec<IpNet>> {
        let mut out: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        for ((cluster, _), cidrs) in &self.nodes {
            out.entry(cluster.clone()).or_default().extend(cidrs.iter().copied());
        }
        for cidrs in out.values_mut() {
            *cidrs = IpNet::aggregate(cidrs);
        }
        out.retain(|_, c| !c.is_empty());
        out
    }
}

/// The static `--mesh-pod-cidrs` plus the learned ones, per cluster, aggregated.
pub fn merge_mesh_cidrs(
    configured: &BTreeMap<String, Vec<IpNet>>,
    learned: &BTreeMap<String, Vec<IpNet>>,
) -> BTreeMap<String, Vec<IpNet>> {
    let mut out = configured.clone();
    for (cluster, cidrs) in learned {
        out.entry(cluster.clone()).or_default().extend(cidrs.iter().copied());
    }
    for cidrs in out.values_mut() {
        *cidrs = IpNet::aggregate(cidrs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(cluster: &str, node: &str, cidrs: &[&str]) -> MeshNodeEvent {
        MeshNodeEvent::Upsert {
            cluster: cluster.into(),
            node: node.into(),
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn a_snapshot_publishes_once_at_its_end_aggregated_per_cluster() {
        let mut m = MeshPodCidrs::new();
        assert_eq!(m.apply(MeshNodeEvent::SnapshotBegin), None);
        assert_eq!(m.apply(up("west", "w1", &["10.2.0.0/24"])), None);
        assert_eq!(m.apply(up("west", "w2", &["10.2.1.0/24"])), None);
        assert_eq!(m.apply(up("north", "n1", &["10.3.0.0/24", "fd00:3::/64"])), None);
        let got = m.apply(MeshNodeEvent::SnapshotEnd).expect("published at the end");
        assert_eq!(got["west"], vec![net("10.2.0.0/23")], "adjacent node ranges aggregate");
        assert_eq!(got["north"], vec![net("10.3.0.0/24"), net("fd00:3::/64")]);
    }

    #[test]
    fn deltas_apply_at_once_and_unchanged_results_are_not_republished() {
        let mut m = MeshPodCidrs::new();
        m.apply(MeshNodeEvent::SnapshotBegin);
        assert_eq!(m.apply(MeshNodeEvent::SnapshotEnd), Some(BTreeMap::new()), "an empty mesh is news too");
        let got = m.apply(up("west", "w1", &["10.2.0.0/24"])).expect("a new node");
        assert_eq!(got["west"], vec![net("10.2.0.0/24")]);
        assert_eq!(m.apply(up("west", "w1", &["10.2.0.0/24"])), None, "same again: nothing new");
        let got = m.apply(MeshNodeEvent::Delete { cluster: "west".into(), node: "w1".into() }).expect("removed");
        assert!(got.is_empty());
    }

    #[test]
    fn a_resync_snapshot_replaces_the_old_view_without_an_empty_moment() {
        let mut m = MeshPodCidrs::new();
        m.apply(MeshNodeEvent::SnapshotBegin);
        m.apply(up("west", "w1", &["10.2.0.0/24"]));
        m.apply(up("east", "e1", &["10.1.0.0/24"]));
        m.apply(MeshNodeEvent::SnapshotEnd);
        // Reconnect: east is gone from the new snapshot; nothing is published until it ends.
        assert_eq!(m.apply(MeshNodeEvent::SnapshotBegin), None);
        assert_eq!(m.apply(up("west", "w1", &["10.2.0.0/24"])), None);
        let got = m.apply(MeshNodeEvent::SnapshotEnd).expect("east left");
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["west"]);
    }

    #[test]
    fn garbage_cidrs_are_counted_and_dropped() {
        let mut m = MeshPodCidrs::new();
        m.apply(MeshNodeEvent::SnapshotBegin);
        m.apply(MeshNodeEvent::SnapshotEnd);
        let got = m.apply(up("evil", "x", &["not-a-cidr", "10.9.0.7/24", "300.1.1.1/8"])).expect("the valid one");
        assert_eq!(got["evil"], vec![net("10.9.0.0/24")], "host bits cleared");
        assert_eq!(m.rejected, 2);
    }

    #[test]
    fn configured_and_learned_ranges_merge() {
        let configured = BTreeMap::from([("west".to_string(), vec![net("10.2.0.0/16")])]);
        let learned = BTreeMap::from([
            ("west".to_string(), vec![net("10.2.5.0/24")]),
            ("north".to_string(), vec![net("10.3.0.0/24")]),
        ]);
        let m = merge_mesh_cidrs(&configured, &learned);
        assert_eq!(m["west"], vec![net("10.2.0.0/16")], "a learned range inside a configured one adds nothing");
        assert_eq!(m["north"], vec![net("10.3.0.0/24")]);
    }
}

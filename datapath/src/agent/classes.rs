//! Egress source classes: how egress policies become three small maps whose size does not grow with
//! pods × CIDRs.
//!
//! Cilium keeps one LPM entry per (pod IP, destination CIDR) (cilium#22805), so 500 pods × 40 CIDRs fill its 16k map.
//! Here a pod maps to a *source class*, the set of policies that select it, and the CIDRs hang off the class:
//!
//! ```text
//! SRC    pod IP → class id                              one entry per selected pod
//! LPM    (class id, destination prefix) → verdict        classes × prefixes, whatever the number of pods
//! GROUPS group id → [(gateway node IP, egress IPs)]      one per policy
//! ```
//!
//! The datapath does two lookups per packet (a hash, then an LPM trie), so cost is flat as pods grow.
//!
//! **Ids are stable.** A class is named by its policy set; a pod joining or leaving an existing class touches only
//! its own SRC entry. A class no pod belongs to any more is freed, and its id is reused only once nothing programmed
//! still refers to it. After an agent restart, ids are adopted from what the pinned maps hold (the pods' current
//! class ids, the groups the current LPM entries point to), so a restart re-programs nothing that is already right.
//!
//! **Overlaps are deterministic.** Within a class, the verdict for a destination is that of the lowest-named policy
//! that covers it (some destination CIDR contains it and none of *that policy's* excluded CIDRs do). The egress-gw
//! controller reports overlapping policies as InvalidSpec; the agent still has to pick one, and picks the same one on
//! every node. The LPM entries are compiled so that the longest matching prefix always yields exactly that verdict:
//! every CIDR of the class's policies is a candidate prefix, each gets the verdict computed at it, and entries whose
//! verdict equals what the next shorter candidate already says are pruned (so an excluded CIDR lying outside every
//! destination costs nothing, and an exclusion of one policy does not hide another policy's destination).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::assignments::EgressPolicy;
use super::model::{ClassId, EgressGroup, EgressVerdict, GroupId, MapContents};

/// A class's name: the sorted names of the policies that select its pods.
pub type ClassKey = Vec<Arc<str>>;

/// Id assignments that persist between computations (so ids stay stable).
#[derive(Debug, Default, Clone)]
pub struct EgressIds {
    classes: HashMap<ClassKey, ClassId>,
    groups: HashMap<Arc<str>, GroupId>,
}

impl EgressIds {
    pub fn class_of(&self, key: &[&str]) -> Option<ClassId> {
        self.classes.iter().find(|(k, _)| k.iter().map(|s| &**s).eq(key.iter().copied())).map(|(_, id)| *id)
    }

    pub fn group_of(&self, policy: &str) -> Option<GroupId> {
        self.groups.get(policy).copied()
    }

    pub fn classes(&self) -> usize {
        self.classes.len()
    }
}

/// The three egress maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EgressMaps {
    pub src: BTreeMap<IpAddr, ClassId>,
    pub lpm: BTreeMap<(ClassId, IpNet), EgressVerdict>,
    pub groups: BTreeMap<GroupId, EgressGroup>,
}

/// Compiles one class: prefix → `Some(policy)` (steer) or `None` (not steered, overriding a shorter steering
/// prefix). `policies` must be sorted by name: the first that covers a prefix wins.
pub fn compile_class<'a>(policies: &[(&'a str, &EgressPolicy)]) -> BTreeMap<IpNet, Option<&'a str>> {
    let mut candidates: Vec<IpNet> =
        policies.iter().flat_map(|(_, p)| p.destinations.iter().chain(p.excluded.iter()).copied()).collect();
    candidates.sort_by_key(|n| (n.prefix_len(), *n));
    candidates.dedup();
    let verdict = |net: &IpNet| -> Option<&'a str> {
        policies
            .iter()
            .find(|(_, p)| {
                p.destinations.iter().any(|d| d.contains(net)) && !p.excluded.iter().any(|e| e.contains(net))
            })
            .map(|(name, _)| *name)
    };
    let verdicts: Vec<Option<&'a str>> = candidates.iter().map(verdict).collect();
    let mut out = BTreeMap::new();
    for (i, net) in candidates.iter().enumerate() {
        // Candidates are sorted by prefix length, so the last shorter one containing `net` is its LPM parent.
        let parent = candidates[..i]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, c)| c.prefix_len() < net.prefix_len() && c.contains(net))
            .map(|(j, _)| verdicts[j])
            .unwrap_or(None);
        if verdicts[i] != parent {
            out.insert(*net, verdicts[i]);
        }
    }
    out
}

/// Computes the egress maps from the policies, keeping ids stable in `ids` and adopting ids from `current` (what
/// is programmed) where it can.
pub fn compute(policies: &BTreeMap<String, EgressPolicy>, ids: &mut EgressIds, current: &MapContents) -> EgressMaps {
    // Pod → policies selecting it (BTreeMap iteration is by name, so each list comes out sorted).
    let names: BTreeMap<&str, Arc<str>> = policies.keys().map(|n| (n.as_str(), Arc::from(n.as_str()))).collect();
    let mut pods: BTreeMap<IpAddr, ClassKey> = BTreeMap::new();
    for (name, p) in policies {
        for ip in &p.sources {
            pods.entry(*ip).or_default().push(names[name.as_str()].clone());
        }
    }
    let mut members: BTreeMap<ClassKey, Vec<IpAddr>> = BTreeMap::new();
    for (ip, key) in pods {
        members.entry(key).or_default().push(ip);
    }

    // Compile each class; classes with no entries (their policies have no destinations) need no id at all.
    let mut compiled: BTreeMap<ClassKey, BTreeMap<IpNet, Option<&str>>> = BTreeMap::new();
    for key in members.keys() {
        let ps: Vec<(&str, &EgressPolicy)> =
            key.iter().filter_map(|n| policies.get_key_value(&**n).map(|(k, v)| (k.as_str(), v))).collect();
        let entries = compile_class(&ps);
        if !entries.is_empty() {
            compiled.insert(key.clone(), entries);
        }
    }

    assign_class_ids(ids, &compiled, &members, current);

    // Group ids for the policies some entry steers to. They cross nodes (see [`group_ids`]), so they are not
    // allocated here nor adopted from the pinned maps: they follow from the policy names alone.
    let used: BTreeSet<&str> = compiled.values().flat_map(|e| e.values().flatten().copied()).collect();
    let global = group_ids(policies.keys().map(String::as_str));
    ids.groups = used.iter().filter_map(|n| Some((names[*n].clone(), *global.get(*n)?))).collect();

    let mut out = EgressMaps::default();
    for (key, entries) in &compiled {
        let class = ids.classes[key];
        for ip in &members[key] {
            out.src.insert(*ip, class);
        }
        for (net, v) in entries {
            let verdict = match v {
                Some(name) => EgressVerdict::Steer(ids.groups[*name]),
                None => EgressVerdict::Excluded,
            };
            out.lpm.insert((class, *net), verdict);
        }
    }
    for (name, id) in &ids.groups {
        if let Some(p) = policies.get(&**name) {
            out.groups.insert(*id, EgressGroup { gateways: p.gateways.clone() });
        }
    }
    out
}

/// Every policy's group id, the same on every node whatever its history: the steering node puts its group id in
/// the VXLAN VNI and the gateway reads that VNI as *its own* group id (`cw_from_overlay`), so ids allocated per node
/// (lowest free, adopted from pins) disagreed as soon as two nodes had different histories (a node joining after a
/// policy was deleted numbered the rest from 1), and the gateway then forwarded the traffic without SNAT or with
/// another policy's egress IP. The id is the 24-bit FNV-1a hash of the name (never 0); names whose hashes collide
/// are resolved in name order over all the policies, which every node receives alike from egress-gw.
pub fn group_ids<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'a str, GroupId> {
    const SPACE: u32 = crate::bpf::types::GROUP_ID_MASK; // ids 1..=SPACE
    let mut sorted: Vec<&str> = names.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for name in sorted {
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let mut id = h % SPACE + 1;
        while !taken.insert(id) {
            id = id % SPACE + 1;
        }
        out.insert(name, GroupId(id));
    }
    out
}

fn assign_class_ids(
    ids: &mut EgressIds,
    compiled: &BTreeMap<ClassKey, BTreeMap<IpNet, Option<&str>>>,
    members: &BTreeMap<ClassKey, Vec<IpAddr>>,
    current: &MapContents,
) {
    ids.classes.retain(|k, _| compiled.contains_key(k));
    let programmed: BTreeSet<ClassId> =
        current.egress_src.values().copied().chain(current.egress_lpm.keys().map(|(c, _)| *c)).collect();
    for key in compiled.keys() {
        if ids.classes.contains_key(key) {
            continue;
        }
        let taken: BTreeSet<ClassId> = ids.classes.values().copied().collect();
        // Adopt the class most of these pods already point to (after a restart: all of them).
        let mut votes: BTreeMap<ClassId, usize> = BTreeMap::new();
        for ip in &members[key] {
            if let Some(c) = current.egress_src.get(ip) {
                *votes.entry(*c).or_default() += 1;
            }
        }
        let id = best_vote(&votes, &taken).unwrap_or_else(|| {
            // A fresh id must not be one the maps still hold: its old LPM entries would apply to these pods.
            lowest_free(|i| taken.contains(&ClassId(i)) || programmed.contains(&ClassId(i)))
                .map(ClassId)
                .unwrap_or(ClassId(u32::MAX))
        });
        ids.classes.insert(key.clone(), id);
    }
}

/// The id with the most votes that is not taken; ties go to the lowest id.
fn best_vote<T: Ord + Copy>(votes: &BTreeMap<T, usize>, taken: &BTreeSet<T>) -> Option<T> {
    votes.iter().filter(|(id, _)| !taken.contains(id)).max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(id, _)| *id)
}

/// Lowest id ≥ 1 for which `busy` is false.
fn lowest_free(busy: impl Fn(u32) -> bool) -> Option<u32> {
    (1..u32::MAX).find(|i| !busy(*i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::model::Gateway;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(dst: &[&str], excl: &[&str], sources: &[&str], gw: &str) -> EgressPolicy {
        EgressPolicy {
            generation: 1,
            destinations: dst.iter().map(|s| net(s)).collect(),
            excluded: excl.iter().map(|s| net(s)).collect(),
            sources: sources.iter().map(|s| ip(s)).collect(),
            gateways: vec![Gateway { node_ip: ip(gw), egress_v4: Some("192.0.2.1".parse().unwrap()), egress_v6: None }],
        }
    }

    fn lookup(m: &EgressMaps, src: &str, dst: &str) -> Option<EgressVerdict> {
        let c = MapContents { egress_src: m.src.clone(), egress_lpm: m.lpm.clone(), ..Default::default() };
        c.egress_lookup(ip(src), ip(dst))
    }

    fn pods(n: u32) -> Vec<String> {
        (0..n).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string()).collect()
    }

    #[test]
    fn map_sizes_grow_with_pods_plus_cidrs_not_their_product() {
        let many = pods(500);
        let cidrs: Vec<String> = (0..40).map(|i| format!("198.{i}.0.0/16")).collect();
        let mut ps = BTreeMap::new();
        let srcs: Vec<&str> = many.iter().map(String::as_str).collect();
        let dsts: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        ps.insert("a".to_string(), policy(&dsts, &[], &srcs, "192.168.0.1"));
        let m = compute(&ps, &mut EgressIds::default(), &MapContents::default());
        assert_eq!(m.src.len(), 500);
        assert_eq!(m.lpm.len(), 40, "one class × 40 CIDRs, not 500 × 40");
        assert_eq!(m.groups.len(), 1);
        let g = m.groups.keys().next().copied().unwrap();
        assert_eq!(lookup(&m, "10.0.0.7", "198.3.4.5"), Some(EgressVerdict::Steer(g)));
        assert_eq!(lookup(&m, "10.0.0.7", "8.8.8.8"), None);
        assert_eq!(lookup(&m, "10.9.9.9", "198.3.4.5"), None, "unselected pod");
    }

    #[test]
    fn excluded_cidrs_and_longest_prefix() {
        let mut ps = BTreeMap::new();
        ps.insert(
            "a".to_string(),
            policy(&["203.0.113.0/24"], &["203.0.113.128/25", "198.51.100.0/24"], &["10.0.0.1"], "192.168.0.1"),
        );
        let m = compute(&ps, &mut EgressIds::default(), &MapContents::default());
        assert_eq!(m.lpm.len(), 2, "the exclusion outside every destination is pruned: {:?}", m.lpm);
        assert!(matches!(lookup(&m, "10.0.0.1", "203.0.113.5"), Some(EgressVerdict::Steer(_))));
        assert_eq!(lookup(&m, "10.0.0.1", "203.0.113.200"), Some(EgressVerdict::Excluded));
        assert_eq!(lookup(&m, "10.0.0.1", "198.51.100.1"), None);
    }

    #[test]
    fn overlapping_policies_lowest_name_wins_and_exclusions_stay_per_policy() {
        let mut ps = BTreeMap::new();
        // Pod 10.0.0.1 is in both; "alpha" covers 10/8 except 10.1/16, "beta" covers 10.1/16 and 10.2/16.
        ps.insert("alpha".to_string(), policy(&["10.0.0.0/8"], &["10.1.0.0/16"], &["10.0.0.1"], "192.168.0.1"));
        ps.insert(
            "beta".to_string(),
            policy(&["10.1.0.0/16", "10.2.0.0/16"], &[], &["10.0.0.1", "10.0.0.2"], "192.168.0.2"),
        );
        let mut ids = EgressIds::default();
        let m = compute(&ps, &mut ids, &MapContents::default());
        let ga = ids.group_of("alpha").unwrap();
        let gb = ids.group_of("beta").unwrap();
        // 10.2/16: both cover it; alpha sorts first.
        assert_eq!(lookup(&m, "10.0.0.1", "10.2.3.4"), Some(EgressVerdict::Steer(ga)));
        // 10.1/16: alpha excludes it, so beta's destination applies (alpha's exclusion does not hide beta).
        assert_eq!(lookup(&m, "10.0.0.1", "10.1.3.4"), Some(EgressVerdict::Steer(gb)));
        assert_eq!(lookup(&m, "10.0.0.1", "10.9.3.4"), Some(EgressVerdict::Steer(ga)));
        // The pod only in beta.
        assert_eq!(lookup(&m, "10.0.0.2", "10.2.3.4"), Some(EgressVerdict::Steer(gb)));
        assert_eq!(lookup(&m, "10.0.0.2", "10.9.3.4"), None);
        assert_eq!(ids.classes(), 2);
        // Same input in another insertion order: same maps (determinism).
        let mut ps2 = BTreeMap::new();
        for (k, v) in ps.iter().rev() {
            ps2.insert(k.clone(), v.clone());
        }
        assert_eq!(compute(&ps2, &mut EgressIds::default(), &MapContents::default()), m);
    }

    #[test]
    fn identical_cidrs_in_two_policies_resolve_to_the_lowest_name() {
        let mut ps = BTreeMap::new();
        ps.insert("zeta".to_string(), policy(&["203.0.113.0/24"], &[], &["10.0.0.1"], "192.168.0.9"));
        ps.insert("eta".to_string(), policy(&["203.0.113.0/24"], &["203.0.113.0/24"], &["10.0.0.1"], "192.168.0.8"));
        let mut ids = EgressIds::default();
        let m = compute(&ps, &mut ids, &MapContents::default());
        // "eta" excludes its whole destination (an invalid spec); "zeta" is the only policy that covers it.
        assert_eq!(lookup(&m, "10.0.0.1", "203.0.113.1"), Some(EgressVerdict::Steer(ids.group_of("zeta").unwrap())));
        assert_eq!(ids.group_of("eta"), None, "a policy nothing steers to gets no group");
    }

    #[test]
    fn ids_are_stable_and_freed_ids_are_not_reused_while_programmed() {
        let mut ps = BTreeMap::new();
        ps.insert("a".to_string(), policy(&["198.51.100.0/24"], &[], &["10.0.0.1", "10.0.0.2"], "192.168.0.1"));
        ps.insert("b".to_string(), policy(&["203.0.113.0/24"], &[], &["10.0.0.3"], "192.168.0.2"));
        let mut ids = EgressIds::default();
        let m1 = compute(&ps, &mut ids, &MapContents::default());
        let ca = m1.src[&ip("10.0.0.1")];
        let cb = m1.src[&ip("10.0.0.3")];
        assert_ne!(ca, cb);
        let programmed = MapContents {
            egress_src: m1.src.clone(),
            egress_lpm: m1.lpm.clone(),
            egress_groups: m1.groups.clone(),
            ..Default::default()
        };

        // A pod joins class a: nothing else changes.
        ps.get_mut("a").unwrap().sources.insert(ip("10.0.0.4"));
        let m2 = compute(&ps, &mut ids, &programmed);
        assert_eq!(m2.src[&ip("10.0.0.4")], ca);
        assert_eq!(m2.lpm, m1.lpm);
        assert_eq!(m2.groups, m1.groups);

        // Class b empties and a new class appears in the same step: the new class must not take b's id while b's
        // entries are still programmed.
        ps.get_mut("b").unwrap().sources.clear();
        ps.insert("c".to_string(), policy(&["192.0.2.0/24"], &[], &["10.0.0.9"], "192.168.0.3"));
        let m3 = compute(&ps, &mut ids, &programmed);
        let cc = m3.src[&ip("10.0.0.9")];
        assert_ne!(cc, cb);
        assert_ne!(cc, ca);
        assert!(!m3.lpm.keys().any(|(c, _)| *c == cb), "b's class is freed");
        let gb = m1.groups.keys().copied().find(|g| Some(*g) != ids.group_of("a")).unwrap();
        assert_ne!(ids.group_of("c"), Some(gb), "b's group is still programmed");

        // Once b's entries are gone from the maps, its id is free again.
        let programmed3 = MapContents {
            egress_src: m3.src.clone(),
            egress_lpm: m3.lpm.clone(),
            egress_groups: m3.groups.clone(),
            ..Default::default()
        };
        ps.insert("d".to_string(), policy(&["100.64.0.0/10"], &[], &["10.0.0.10"], "192.168.0.4"));
        let m4 = compute(&ps, &mut ids, &programmed3);
        assert_eq!(m4.src[&ip("10.0.0.10")], cb, "the lowest free id is reused");
    }

    #[test]
    fn group_ids_are_the_same_on_every_node_whatever_its_history() {
        let mut ps = BTreeMap::new();
        ps.insert("aaa".to_string(), policy(&["198.51.100.0/24"], &[], &["10.0.0.1"], "192.168.0.1"));
        ps.insert("billing".to_string(), policy(&["203.0.113.0/24"], &[], &["10.0.0.3"], "192.168.0.2"));
        // An old node saw both policies, then "aaa" was deleted.
        let mut old = EgressIds::default();
        compute(&ps, &mut old, &MapContents::default());
        ps.remove("aaa");
        let old_maps = compute(&ps, &mut old, &MapContents::default());
        // A node that joins now, with nothing pinned, must agree on billing's id (the VXLAN VNI between them).
        let mut fresh = EgressIds::default();
        let fresh_maps = compute(&ps, &mut fresh, &MapContents::default());
        assert_eq!(old.group_of("billing"), fresh.group_of("billing"));
        assert_eq!(old_maps.groups, fresh_maps.groups);
        // And so does a node that restarted with another node's ids pinned.
        let pinned =
            MapContents { egress_groups: BTreeMap::from([(GroupId(1), EgressGroup::default())]), ..Default::default() };
        let mut restarted = EgressIds::default();
        compute(&ps, &mut restarted, &pinned);
        assert_eq!(restarted.group_of("billing"), fresh.group_of("billing"));
    }

    #[test]
    fn colliding_group_ids_are_resolved_in_name_order_and_stay_in_range() {
        let names: Vec<String> = (0..20_000).map(|i| format!("policy-{i}")).collect();
        let ids = group_ids(names.iter().map(String::as_str));
        let distinct: BTreeSet<GroupId> = ids.values().copied().collect();
        assert_eq!(distinct.len(), names.len(), "every policy its own id");
        assert!(ids.values().all(|g| g.0 >= 1 && g.0 <= crate::bpf::types::GROUP_ID_MASK));
        // The same set in another order gives the same ids.
        let again = group_ids(names.iter().rev().map(String::as_str));
        assert_eq!(ids, again);
    }

    #[test]
    fn a_restarted_agent_adopts_programmed_ids() {
        let mut ps = BTreeMap::new();
        ps.insert("a".to_string(), policy(&["198.51.100.0/24"], &[], &["10.0.0.1"], "192.168.0.1"));
        ps.insert("b".to_string(), policy(&["203.0.113.0/24"], &[], &["10.0.0.3"], "192.168.0.2"));
        ps.insert("c".to_string(), policy(&["192.0.2.0/24"], &[], &["10.0.0.5"], "192.168.0.3"));
        let mut ids = EgressIds::default();
        // Build up ids in an order that makes them differ from a fresh numbering.
        let mut only_c = ps.clone();
        only_c.remove("a");
        only_c.remove("b");
        compute(&only_c, &mut ids, &MapContents::default());
        let m = compute(&ps, &mut ids, &MapContents::default());
        let programmed = MapContents {
            egress_src: m.src.clone(),
            egress_lpm: m.lpm.clone(),
            egress_groups: m.groups.clone(),
            ..Default::default()
        };
        let fresh = compute(&ps, &mut EgressIds::default(), &MapContents::default());
        assert_ne!(fresh, m, "a fresh numbering differs, so adoption is what makes the next check pass");
        let adopted = compute(&ps, &mut EgressIds::default(), &programmed);
        assert_eq!(adopted, m);
    }
}

//! The selection index: holds the cluster objects the controller watches plus gateway health, and computes every
//! policy's assignment and status from them.
//!
//! Assignments are stable. Each (policy, group, source zone) keeps an ordered list of gateway slots between
//! computations. A gateway that is still eligible keeps its slot; one that left frees its slot, which the next
//! candidate fills in place, so the other gateways keep their positions (agents hash flows onto positions, and
//! pinned flows stay where they are). A newly healthy gateway only takes a slot when `maxGatewayNodes` leaves
//! room. The one exception is `localPriority`: a local gateway takes over a slot held by a gateway from another
//! zone, since preferring local gateways is what the user asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use super::health::{HealthChange, HealthConfig, HealthTracker};
use super::model::*;

type PodKey = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SlotKey {
    policy: String,
    group: usize,
    zone: Option<String>,
}

#[derive(Debug, Default)]
pub struct Index {
    policies: BTreeMap<String, PolicySpec>,
    pods: BTreeMap<PodKey, Pod>,
    namespaces: BTreeMap<String, Namespace>,
    nodes: BTreeMap<String, Node>,
    networks: ClusterNetworks,
    health: HealthTracker,
    slots: BTreeMap<SlotKey, Vec<String>>,
}

/// A node that can serve a group right now.
struct Eligible<'a> {
    node: &'a Node,
    ip: IpAddr,
    egress: Vec<IpAddr>,
}

impl Index {
    pub fn new(health: HealthConfig) -> Self {
        Index { health: HealthTracker::new(health), ..Default::default() }
    }

    pub fn apply_policy(&mut self, spec: PolicySpec) {
        self.policies.insert(spec.name.clone(), spec);
    }

    pub fn delete_policy(&mut self, name: &str) {
        self.policies.remove(name);
    }

    pub fn apply_pod(&mut self, pod: Pod) {
        self.pods.insert((pod.namespace.clone(), pod.name.clone()), pod);
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        self.pods.remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn apply_namespace(&mut self, mut ns: Namespace) {
        // The apiserver sets this on every namespace; make sure selectors on it work whatever the source.
        ns.labels.entry(NAMESPACE_NAME_LABEL.into()).or_insert_with(|| ns.name.clone());
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn delete_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn apply_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }

    pub fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.health.forget(name);
    }

    pub fn set_cluster_networks(&mut self, networks: ClusterNetworks) {
        self.networks = networks;
    }

    /// One probe round's verdict for a gateway node.
    pub fn probe(&mut self, node: &str, ok: bool, now: Instant) -> Option<HealthChange> {
        self.health.observe(node, ok, now)
    }

    /// Timer tick: nodes whose probe reports stopped go down.
    pub fn tick(&mut self, now: Instant) -> Vec<HealthChange> {
        self.health.tick(now)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.health.next_deadline()
    }

    /// Nodes to probe: every node some policy's egress group selects, with the first node IP (the address
    /// traffic is tunnelled to, so the one whose reachability matters). Nodes without an IP cannot serve.
    pub fn gateway_candidates(&self) -> BTreeMap<String, IpAddr> {
        self.nodes
            .values()
            .filter(|n| self.policies.values().flat_map(|p| &p.groups).any(|g| g.node_selector.matches(&n.labels)))
            .filter_map(|n| Some((n.name.clone(), *n.ips.first()?)))
            .collect()
    }

    /// Each node's zone (`topology.kubernetes.io/zone`), for nodes that have one.
    pub fn node_zones(&self) -> BTreeMap<String, String> {
        self.nodes.values().filter_map(|n| Some((n.name.clone(), n.zone()?.to_string()))).collect()
    }

    pub fn is_healthy(&self, node: &str) -> bool {
        self.health.is_healthy(node)
    }

    /// Every gateway candidate's health is known (see [`crate::core::HealthTracker::settled`]); true with none.
    pub fn health_settled(&self) -> bool {
        self.gateway_candidates().keys().all(|n| self.health.settled(n))
    }

    /// Computes every policy's output. Also advances the stable slot memory, so call it once per batch of changes.
    pub fn compute(&mut self) -> BTreeMap<String, PolicyOutput> {
        let selected: BTreeMap<&str, BTreeSet<&PodKey>> =
            self.policies.values().map(|p| (p.name.as_str(), self.selected_pods(p))).collect();
        let overlaps = self.overlaps(&selected);

        let mut new_slots = BTreeMap::new();
        let mut out = BTreeMap::new();
        for policy in self.policies.values() {
            let pods = selected.get(policy.name.as_str()).cloned().unwrap_or_default();
            let output = self.compute_policy(policy, &pods, overlaps.get(policy.name.as_str()), &mut new_slots);
            out.insert(policy.name.clone(), output);
        }
        // Slots of deleted policies, removed groups or zones are forgotten.
        self.slots = new_slots;
        out
    }

    fn namespace_matches(&self, sel: &Selector, ns: &str) -> bool {
        match self.namespaces.get(ns) {
            Some(n) => sel.matches(&n.labels),
            // Not seen yet: all we know is the label the apiserver puts on every namespace.
            None => sel.matches(&Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())])),
        }
    }

    fn selects(&self, sel: &SourceSelector, pod: &Pod) -> bool {
        if sel.pods.is_none() && sel.namespaces.is_none() {
            return false;
        }
        if let Some(ns_sel) = &sel.namespaces {
            if !self.namespace_matches(ns_sel, &pod.namespace) {
                return false;
            }
        }
        if let Some(pod_sel) = &sel.pods {
            let needs_ns_label = pod_sel.match_labels.contains_key(CILIUM_NAMESPACE_LABEL)
                || pod_sel.requirements.iter().any(|r| r.key == CILIUM_NAMESPACE_LABEL);
            let matched = if needs_ns_label {
                let mut labels = pod.labels.clone();
                labels.insert(CILIUM_NAMESPACE_LABEL.into(), pod.namespace.clone());
                pod_sel.matches(&labels)
            } else {
                pod_sel.matches(&pod.labels)
            };
            if !matched {
                return false;
            }
        }
        if let Some(node_sel) = &sel.nodes {
            let node = pod.node.as_deref().and_then(|n| self.nodes.get(n));
            if !node.is_some_and(|n| node_sel.matches(&n.labels)) {
                return false;
            }
        }
        true
    }

    fn selected_pods(&self, policy: &PolicySpec) -> BTreeSet<&PodKey> {
        self.pods
            .iter()
            .filter(|(_, pod)| pod.node.is_some() && !pod.ips.is_empty())
            .filter(|(_, pod)| policy.selectors.iter().any(|s| self.selects(s, pod)))
            .map(|(k, _)| k)
            .collect()
    }

    /// For each policy, the other policies claiming some of the same (pod, destination) traffic.
    fn overlaps<'a>(&'a self, selected: &BTreeMap<&'a str, BTreeSet<&'a PodKey>>) -> BTreeMap<&'a str, Vec<String>> {
        let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let policies: Vec<&PolicySpec> = self.policies.values().collect();
        for (i, a) in policies.iter().enumerate() {
            for b in &policies[i + 1..] {
                let (Some(pa), Some(pb)) = (selected.get(a.name.as_str()), selected.get(b.name.as_str())) else {
                    continue;
                };
                let Some(pod) = pa.intersection(pb).next() else { continue };
                let Some(cidr) = shared_destination(a, b) else { continue };
                let detail = |other: &str| {
                    format!(
                        "policy {other} also claims traffic from pod {}/{} to {cidr}; the policy whose name sorts \
                         first ({}) is applied to it",
                        pod.0, pod.1, a.name
                    )
                };
                out.entry(a.name.as_str()).or_default().push(detail(&b.name));
                out.entry(b.name.as_str()).or_default().push(detail(&a.name));
            }
        }
        out
    }

    fn compute_policy(
        &self,
        policy: &PolicySpec,
        pods: &BTreeSet<&PodKey>,
        overlaps: Option<&Vec<String>>,
        new_slots: &mut BTreeMap<SlotKey, Vec<String>>,
    ) -> PolicyOutput {
        let mut problems: Vec<Problem> = Vec::new();
        let mut problem = |reason, message: String| problems.push(Problem { reason, message });

        for m in &policy.malformed {
            problem(ProblemReason::MalformedSpec, m.clone());
        }
        for e in &policy.excluded {
            if !policy.destinations.iter().any(|d| d.contains(e)) {
                problem(
                    ProblemReason::ExcludedCIDROutsideDestinations,
                    format!("excludedCIDR {e} is not inside any destinationCIDR, so it excludes nothing"),
                );
            }
        }
        let mut excluded: BTreeSet<IpNet> = policy.excluded.iter().copied().collect();
        for d in &policy.destinations {
            for (c, what) in self.networks.all() {
                if c.contains(d) {
                    problem(
                        ProblemReason::DestinationInsideCluster,
                        format!("destinationCIDR {d} is inside {what} {c}; in-mesh traffic never uses a gateway"),
                    );
                    excluded.insert(*d);
                } else if d.contains(c) {
                    // Mesh traffic stays in the mesh: carve the in-cluster range out of the destination.
                    excluded.insert(*c);
                }
            }
        }
        for o in overlaps.into_iter().flatten() {
            problem(ProblemReason::OverlappingPolicy, o.clone());
        }

        // Zones the selected pods run in: with localOnly, each needs a gateway of its own.
        let source_zones: BTreeSet<String> = pods
            .iter()
            .filter_map(|k| self.pods.get(*k))
            .filter_map(|p| p.node.as_deref().and_then(|n| self.nodes.get(n)))
            .filter_map(|n| n.zone().map(str::to_string))
            .collect();
        let cluster_zones: BTreeSet<String> =
            self.nodes.values().filter_map(|n| n.zone().map(str::to_string)).collect();

        let mut groups = Vec::new();
        let mut statuses = Vec::new();
        for (gi, group) in policy.groups.iter().enumerate() {
            if group.egress_ip.is_some() && group.interface.is_some() {
                problem(
                    ProblemReason::BothEgressIPAndInterface,
                    format!("egressGroups[{gi}] sets both egressIP and interface; set one of them"),
                );
                groups.push(GroupAssignment::default());
                statuses.push(GroupStatus::default());
                continue;
            }
            let candidates: Vec<&Node> =
                self.nodes.values().filter(|n| group.node_selector.matches(&n.labels)).collect();
            if let Some(ip) = group.egress_ip {
                if candidates.iter().all(|n| n.egress_addresses(group).is_none()) {
                    let why = if candidates.is_empty() {
                        "its nodeSelector selects no node".to_string()
                    } else {
                        let names: Vec<&str> = candidates.iter().map(|n| n.name.as_str()).collect();
                        format!("it is configured on none of the selected nodes ({})", names.join(", "))
                    };
                    problem(
                        ProblemReason::EgressIPNotOnAnyNode,
                        format!("egressGroups[{gi}] egressIP {ip} cannot be used: {why}"),
                    );
                }
            }
            let eligible: Vec<Eligible> = candidates
                .iter()
                .filter(|n| self.health.is_healthy(&n.name))
                .filter_map(|n| {
                    let ip = *n.ips.first()?;
                    let egress = n.egress_addresses(group)?;
                    Some(Eligible { node: n, ip, egress })
                })
                .collect();
            let gateway = |name: &String| -> Option<Gateway> {
                let e = eligible.iter().find(|e| &e.node.name == name)?;
                let egress_ips = if group.egress_ip.is_some() { vec![] } else { e.egress.clone() };
                Some(Gateway { node: name.clone(), node_ip: e.ip, egress_ips })
            };
            let all: Vec<&Eligible> = eligible.iter().collect();
            let key =
                |zone: Option<&str>| SlotKey { policy: policy.name.clone(), group: gi, zone: zone.map(String::from) };

            let agnostic = self.choose(&key(None), &all, None, group.max_gateway_nodes);
            let gateways: Vec<Gateway> = agnostic.iter().filter_map(&gateway).collect();
            new_slots.insert(key(None), agnostic);

            let mut by_zone = BTreeMap::new();
            if policy.az_affinity != ZoneAffinity::Disabled {
                for zone in &cluster_zones {
                    let local: Vec<&Eligible> = all.iter().copied().filter(|e| e.node.zone() == Some(zone)).collect();
                    let (pool, prefer) = match policy.az_affinity {
                        ZoneAffinity::LocalOnly => (local, None),
                        ZoneAffinity::LocalOnlyFirst if !local.is_empty() => (local, None),
                        ZoneAffinity::LocalPriority => (all.clone(), Some(zone.as_str())),
                        _ => (all.clone(), None),
                    };
                    let chosen = self.choose(&key(Some(zone)), &pool, prefer, group.max_gateway_nodes);
                    by_zone.insert(zone.clone(), chosen.iter().filter_map(&gateway).collect::<Vec<_>>());
                    new_slots.insert(key(Some(zone)), chosen);
                }
            }

            if eligible.is_empty() {
                problem(
                    ProblemReason::NoHealthyGateway,
                    format!(
                        "egressGroups[{gi}] has no healthy gateway ({} selected nodes); its traffic is dropped",
                        candidates.len()
                    ),
                );
            } else if policy.az_affinity == ZoneAffinity::LocalOnly {
                let starved: Vec<&str> = source_zones
                    .iter()
                    .filter(|z| by_zone.get(*z).is_none_or(|g: &Vec<Gateway>| g.is_empty()))
                    .map(String::as_str)
                    .collect();
                if !starved.is_empty() {
                    problem(
                        ProblemReason::NoHealthyGateway,
                        format!(
                            "egressGroups[{gi}] has no healthy gateway in zone(s) {} where selected pods run \
                             (azAffinity localOnly); their traffic is dropped",
                            starved.join(", ")
                        ),
                    );
                }
            }

            let status = GroupStatus {
                active: if policy.az_affinity == ZoneAffinity::Disabled {
                    gateways.iter().map(|g| g.node_ip).collect()
                } else {
                    let mut seen = BTreeSet::new();
                    by_zone.values().flatten().map(|g: &Gateway| g.node_ip).filter(|ip| seen.insert(*ip)).collect()
                },
                active_by_zone: by_zone
                    .iter()
                    .map(|(z, gws)| (z.clone(), gws.iter().map(|g| g.node_ip).collect()))
                    .collect(),
                healthy: eligible.iter().map(|e| e.ip).collect(),
            };
            groups.push(GroupAssignment {
                egress_ips: group.egress_ip.into_iter().collect(),
                healthy: status.healthy.clone(),
                gateways,
                by_zone,
            });
            statuses.push(status);
        }

        problems.sort_by_key(|p| p.reason);
        let blocked = problems.iter().find(|p| p.reason.blocks_programming());
        let assignment = blocked.is_none().then(|| {
            let mut source_ips: Vec<IpAddr> =
                pods.iter().filter_map(|k| self.pods.get(*k)).flat_map(|p| p.ips.iter().copied()).collect();
            source_ips.sort();
            source_ips.dedup();
            PolicyAssignment {
                name: policy.name.clone(),
                generation: policy.generation,
                destination_cidrs: policy.destinations.clone(),
                excluded_cidrs: excluded.into_iter().collect(),
                source_ips,
                groups,
            }
        });
        let conditions = conditions(&problems, assignment.is_some());
        PolicyOutput {
            name: policy.name.clone(),
            generation: policy.generation,
            assignment,
            matched_pods: pods.len(),
            groups: statuses,
            problems,
            conditions,
        }
    }

    /// The ordered gateway set for one slot key: previous holders keep their slots, freed slots are refilled in
    /// place, new gateways are appended only while `max` leaves room.
    fn choose(&self, key: &SlotKey, pool: &[&Eligible], prefer_zone: Option<&str>, max: Option<usize>) -> Vec<String> {
        let in_pool: BTreeSet<&str> = pool.iter().map(|e| e.node.name.as_str()).collect();
        let is_local = |name: &str| prefer_zone.is_some() && self.nodes.get(name).and_then(|n| n.zone()) == prefer_zone;
        let limit = max.unwrap_or(pool.len()).min(pool.len());
        let mut slots: Vec<Option<String>> = self
            .slots
            .get(key)
            .into_iter()
            .flatten()
            .map(|n| in_pool.contains(n.as_str()).then(|| n.clone()))
            .collect();

        if prefer_zone.is_some() {
            // localPriority: free slots held by remote gateways while local ones wait outside.
            let local_in_pool = pool.iter().filter(|e| is_local(&e.node.name)).count();
            let local_held = slots.iter().flatten().filter(|n| is_local(n)).count();
            let mut to_free = local_in_pool.min(limit).saturating_sub(local_held);
            for slot in slots.iter_mut().rev() {
                if to_free == 0 {
                    break;
                }
                if slot.as_deref().is_some_and(|n| !is_local(n)) {
                    *slot = None;
                    to_free -= 1;
                }
            }
        }

        let held: BTreeSet<String> = slots.iter().flatten().cloned().collect();
        let mut waiting: Vec<&str> = pool.iter().map(|e| e.node.name.as_str()).filter(|n| !held.contains(*n)).collect();
        // Pool order is by node name; local gateways go first under localPriority.
        waiting.sort_by_key(|n| (!is_local(n), *n));
        let mut waiting = waiting.into_iter();

        let mut filled = held.len();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            if filled >= limit {
                break;
            }
            if let Some(n) = waiting.next() {
                *slot = Some(n.to_string());
                filled += 1;
            }
        }
        let mut out: Vec<String> = slots.into_iter().flatten().collect();
        // maxGatewayNodes lowered: the most recently added gateways go first.
        out.truncate(limit);
        while out.len() < limit {
            match waiting.next() {
                Some(n) => out.push(n.to_string()),
                None => break,
            }
        }
        out
    }
}

/// Whether two policies' destinations overlap on some range neither excludes; returns that range.
fn shared_destination(a: &PolicySpec, b: &PolicySpec) -> Option<IpNet> {
    for da in &a.destinations {
        for db in &b.destinations {
            let shared = if da.contains(db) {
                *db
            } else if db.contains(da) {
                *da
            } else {
                continue;
            };
            let excluded = a.excluded.iter().chain(&b.excluded).any(|e| e.contains(&shared));
            if !excluded {
                return Some(shared);
            }
        }
    }
    None
}

fn conditions(problems: &[Problem], programmed: bool) -> Vec<Condition> {
    let ready_blocker = problems.iter().find(|p| {
        p.reason.blocks_programming()
            || matches!(p.reason, ProblemReason::NoHealthyGateway | ProblemReason::EgressIPNotOnAnyNode)
    });
    let ready = match ready_blocker {
        Some(p) => Condition {
            type_: CONDITION_READY,
            status: false,
            reason: p.reason.as_str().to_string(),
            message: p.message.clone(),
        },
        None if programmed => Condition {
            type_: CONDITION_READY,
            status: true,
            reason: "GatewaysActive".to_string(),
            message: "every egress group has an active gateway".to_string(),
        },
        None => Condition {
            type_: CONDITION_READY,
            status: false,
            reason: "NotProgrammed".to_string(),
            message: String::new(),
        },
    };
    let invalid = match problems.first() {
        Some(first) => Condition {
            type_: CONDITION_INVALID_SPEC,
            status: true,
            reason: first.reason.as_str().to_string(),
            message: problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; "),
        },
        None => Condition {
            type_: CONDITION_INVALID_SPEC,
            status: false,
            reason: "Valid".to_string(),
            message: String::new(),
        },
    };
    vec![ready, invalid]
}

//! Domain types of the selection core: what the adapters feed in and what comes out. Plain data, no kube types.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// Node label that zone affinity reads.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Label the apiserver puts on every namespace, with the namespace's name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Cilium's pseudo-label carrying a pod's namespace; Cilium policies select namespaces with it in `podSelector`.
pub const CILIUM_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// Condition types, as in the CRD status.
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_INVALID_SPEC: &str = "InvalidSpec";

pub type Labels = BTreeMap<String, String>;

/// A label selector. An empty selector matches every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    pub values: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn labels(pairs: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            requirements: vec![],
        }
    }

    /// Kubernetes label selector semantics: every matchLabels pair and every requirement must hold.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| match r.op {
                Operator::In => labels.get(&r.key).is_some_and(|v| r.values.contains(v)),
                Operator::NotIn => labels.get(&r.key).is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => labels.contains_key(&r.key),
                Operator::DoesNotExist => !labels.contains_key(&r.key),
            })
    }
}

/// Zone affinity between a source pod and the gateways it uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ZoneAffinity {
    #[default]
    Disabled,
    LocalOnly,
    LocalOnlyFirst,
    LocalPriority,
}

/// One entry of `spec.selectors`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceSelector {
    pub pods: Option<Selector>,
    pub namespaces: Option<Selector>,
    pub nodes: Option<Selector>,
}

/// One entry of `spec.egressGroups`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSpec {
    pub node_selector: Selector,
    pub egress_ip: Option<IpAddr>,
    pub interface: Option<String>,
    /// `None`: every eligible node.
    pub max_gateway_nodes: Option<usize>,
}

/// A policy as the core sees it: parsed addresses, plus what could not be parsed (which makes the spec invalid).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySpec {
    pub name: String,
    pub generation: i64,
    pub selectors: Vec<SourceSelector>,
    pub destinations: Vec<IpNet>,
    pub excluded: Vec<IpNet>,
    pub groups: Vec<GroupSpec>,
    pub az_affinity: ZoneAffinity,
    /// Fields that did not parse (for example a CIDR written as `10.0.0.0/33`), each a message naming the field.
    pub malformed: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Node the pod is scheduled on; unscheduled pods send no traffic.
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// Node (internal) IPs; the first is the address traffic is tunnelled to.
    pub ips: Vec<IpAddr>,
    /// Interfaces the node agent reported with their addresses; an `egressIP` must be on one of them.
    pub interfaces: BTreeMap<String, Vec<IpAddr>>,
    /// The interface holding the default route, used when a group names neither egressIP nor interface.
    pub default_interface: Option<String>,
}

impl Node {
    pub fn zone(&self) -> Option<&str> {
        self.labels.get(ZONE_LABEL).map(String::as_str).filter(|z| !z.is_empty())
    }

    fn has_address(&self, ip: IpAddr) -> bool {
        self.interfaces.values().any(|addrs| addrs.contains(&ip))
    }

    /// The first address of each family on `iface`, which is what Cilium and Isovalent SNAT to.
    fn interface_addresses(&self, iface: &str) -> Vec<IpAddr> {
        let addrs = self.interfaces.get(iface).map(Vec::as_slice).unwrap_or_default();
        let v4 = addrs.iter().find(|a| a.is_ipv4());
        let v6 = addrs.iter().find(|a| a.is_ipv6());
        v4.into_iter().chain(v6).copied().collect()
    }

    /// Addresses this node SNATs a group's traffic to, or `None` when it cannot serve the group.
    pub(crate) fn egress_addresses(&self, group: &GroupSpec) -> Option<Vec<IpAddr>> {
        match (&group.egress_ip, &group.interface) {
            (Some(ip), None) => self.has_address(*ip).then(|| vec![*ip]),
            (None, Some(iface)) => Some(self.interface_addresses(iface)).filter(|a| !a.is_empty()),
            (None, None) => {
                let iface = self.default_interface.as_deref()?;
                Some(self.interface_addresses(iface)).filter(|a| !a.is_empty())
            }
            (Some(_), Some(_)) => None,
        }
    }
}

/// Address ranges that never go to a gateway: this cluster's pod and service CIDRs and the meshed clusters' pod
/// CIDRs. Traffic to them stays inside the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNetworks {
    pub pod_cidrs: Vec<IpNet>,
    pub service_cidrs: Vec<IpNet>,
    /// Remote cluster name → its pod CIDRs.
    pub remote_pod_cidrs: BTreeMap<String, Vec<IpNet>>,
}

impl ClusterNetworks {
    pub(crate) fn all(&self) -> impl Iterator<Item = (&IpNet, String)> {
        self.pod_cidrs
            .iter()
            .map(|c| (c, "this cluster's pod CIDR".to_string()))
            .chain(self.service_cidrs.iter().map(|c| (c, "this cluster's service CIDR".to_string())))
            .chain(
                self.remote_pod_cidrs.iter().flat_map(|(cluster, cidrs)| {
                    cidrs.iter().map(move |c| (c, format!("cluster {cluster}'s pod CIDR")))
                }),
            )
    }
}

/// One active gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    pub node: String,
    /// The node IP traffic is tunnelled to.
    pub node_ip: IpAddr,
    /// The addresses this gateway SNATs to (one per family at most).
    pub egress_ips: Vec<IpAddr>,
}

/// One group's output. Maps onto `causeway.v1.EgressGroupAssignment`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The group's `egressIP`, when set.
    pub egress_ips: Vec<IpAddr>,
    /// Active gateways in stable order, for sources whose zone does not matter (affinity disabled, or a source
    /// node without a zone label). Empty: no healthy gateway, agents drop the traffic.
    pub gateways: Vec<Gateway>,
    /// With zone affinity: the active gateways as seen from each source zone.
    pub by_zone: BTreeMap<String, Vec<Gateway>>,
    /// Node IPs of every selected node that is healthy and can serve the group.
    pub healthy: Vec<IpAddr>,
}

/// What node agents need for one policy. Maps onto `causeway.v1.EgressPolicyAssignment`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyAssignment {
    pub name: String,
    pub generation: i64,
    pub destination_cidrs: Vec<IpNet>,
    /// The spec's excluded CIDRs plus the in-cluster and meshed ranges that overlap a destination.
    pub excluded_cidrs: Vec<IpNet>,
    /// Selected source pod IPs, sorted.
    pub source_ips: Vec<IpAddr>,
    pub groups: Vec<GroupAssignment>,
}

/// Why a policy is (partly) invalid. Each becomes the `reason` of the InvalidSpec condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemReason {
    /// A field did not parse.
    MalformedSpec,
    /// A group sets both `egressIP` and `interface`.
    BothEgressIPAndInterface,
    /// A group's `egressIP` is configured on none of the nodes its selector picks.
    EgressIPNotOnAnyNode,
    /// Another policy selects some of the same pods for overlapping destinations.
    OverlappingPolicy,
    /// An excluded CIDR lies outside every destination CIDR, so it excludes nothing.
    ExcludedCIDROutsideDestinations,
    /// A destination lies entirely inside this cluster's or a meshed cluster's pod or service CIDRs.
    DestinationInsideCluster,
    /// A group has no healthy gateway able to serve it (for some zone, with `localOnly`).
    NoHealthyGateway,
}

impl ProblemReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::MalformedSpec => "MalformedSpec",
            ProblemReason::BothEgressIPAndInterface => "BothEgressIPAndInterface",
            ProblemReason::EgressIPNotOnAnyNode => "EgressIPNotOnAnyNode",
            ProblemReason::OverlappingPolicy => "OverlappingPolicy",
            ProblemReason::ExcludedCIDROutsideDestinations => "ExcludedCIDROutsideDestinations",
            ProblemReason::DestinationInsideCluster => "DestinationInsideCluster",
            ProblemReason::NoHealthyGateway => "NoHealthyGateway",
        }
    }

    /// Whether the policy is left out of the datapath altogether (rather than programmed with what is valid).
    pub fn blocks_programming(self) -> bool {
        matches!(self, ProblemReason::MalformedSpec | ProblemReason::BothEgressIPAndInterface)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: ProblemReason,
    pub message: String,
}

/// Status of one group, as written to `status.groupStatuses`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub active: Vec<IpAddr>,
    pub active_by_zone: BTreeMap<String, Vec<IpAddr>>,
    pub healthy: Vec<IpAddr>,
}

/// A condition without its transition time (the adapter keeps that, since only it knows wall-clock time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// Everything the core says about one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutput {
    pub name: String,
    pub generation: i64,
    /// `None` when the policy must not be programmed (see [`ProblemReason::blocks_programming`]).
    pub assignment: Option<PolicyAssignment>,
    /// How many pods the selectors pick (scheduled, with an IP), for `status.matchedPods`.
    pub matched_pods: usize,
    pub groups: Vec<GroupStatus>,
    pub problems: Vec<Problem>,
    /// `Ready` then `InvalidSpec`.
    pub conditions: Vec<Condition>,
}

impl PolicyOutput {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    pub fn has_problem(&self, reason: ProblemReason) -> bool {
        self.problems.iter().any(|p| p.reason == reason)
    }
}

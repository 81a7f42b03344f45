//! `EgressGatewayPolicy`: which pods' traffic to which destinations leaves the cluster through which gateway nodes,
//! with which source IP.
//!
//! The shape follows `IsovalentEgressGatewayPolicy` (isovalent.com/v1) so that users can carry their manifests over;
//! [`compat`] converts that kind and Cilium's `CiliumEgressGatewayPolicy` (cilium.io/v2) into this one. The
//! apiserver rejects what a single object can show to be wrong (CEL rules and formats below); what needs the rest of
//! the cluster (an egressIP no gateway has, two policies claiming the same traffic, an excluded CIDR outside the
//! destinations) is reported by the egress-gw controller as an `InvalidSpec` condition in the status.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod compat;

/// Condition type set when the policy is programmed and at least one gateway of every group is active.
pub const CONDITION_READY: &str = "Ready";
/// Condition type set when the policy cannot be (fully) applied because of what it says.
pub const CONDITION_INVALID_SPEC: &str = "InvalidSpec";
/// Node label that `azAffinity` reads.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Which pods' traffic, to which destinations, leaves through which gateways.
// clippy reads repeated `type_ = "..."` keys across the printcolumn(...) entries as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[kube(
    group = "causeway.io",
    version = "v1alpha1",
    kind = "EgressGatewayPolicy",
    plural = "egressgatewaypolicies",
    singular = "egressgatewaypolicy",
    shortname = "egp",
    category = "causeway",
    status = "EgressGatewayPolicyStatus",
    doc = "Routes traffic from selected pods to destination CIDRs through gateway nodes that SNAT it to fixed \
           egress IPs. Cluster-scoped; accepts the IsovalentEgressGatewayPolicy shape.",
    printcolumn(
        name = "Destinations",
        type_ = "string",
        json_path = ".spec.destinationCIDRs",
        description = "Destination CIDRs"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.groupStatuses[*].activeGatewayIPs",
        description = "Active gateway IPs per group"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every group has an active gateway"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicySpec {
    /// Source pods: a pod is selected when any one entry matches it.
    #[schemars(length(min = 1, max = 64))]
    pub selectors: Vec<EgressSelector>,
    /// Destination CIDRs (IPv4 or IPv6) whose traffic from the selected pods goes through a gateway.
    /// Destinations inside the cluster's (or a meshed cluster's) pod and service CIDRs never do.
    #[serde(rename = "destinationCIDRs")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each destinationCIDR must be a CIDR such as 203.0.113.0/24 or 2001:db8::/64"))]
    pub destination_cidrs: Vec<String>,
    /// CIDRs inside the destinations that bypass the gateway.
    #[serde(default, rename = "excludedCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each excludedCIDR must be a CIDR such as 203.0.113.128/25"))]
    pub excluded_cidrs: Vec<String>,
    /// Gateway groups. Traffic is spread over the active gateways of all groups.
    #[schemars(length(min = 1, max = 16))]
    pub egress_groups: Vec<EgressGroup>,
    /// How the source pod's zone (`topology.kubernetes.io/zone` of its node) constrains the gateways it uses.
    #[serde(default, skip_serializing_if = "AzAffinity::is_disabled")]
    pub az_affinity: AzAffinity,
}

/// One way of selecting source pods. `podSelector` and `namespaceSelector` both have to match when both are set;
/// `nodeSelector` further limits the selection to pods on matching nodes.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.podSelector) || has(self.namespaceSelector)").message("a selector needs a podSelector or a namespaceSelector; nodeSelector alone would select every pod on the node"))]
#[serde(rename_all = "camelCase")]
pub struct EgressSelector {
    /// Pods by label; empty selects every pod (of the selected namespaces). Cilium's `io.kubernetes.pod.namespace`
    /// pseudo-label is understood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces by label; empty selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Only pods running on nodes with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// A set of gateway nodes and the address they SNAT to.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!(has(self.egressIP) && has(self.interface))").message("egressIP and interface are mutually exclusive: set one (or neither, for the address of the default-route interface)").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct EgressGroup {
    /// Gateway nodes by label.
    pub node_selector: LabelSelector,
    /// The source address traffic leaves with. It must already be configured on the gateway nodes (the agent
    /// reports which addresses each node has); the controller flags an egressIP that no selected node has.
    #[serde(default, rename = "egressIP", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("egressIP must be an IPv4 or IPv6 address"))]
    pub egress_ip: Option<String>,
    /// Network interface on the gateway whose first address (per family) is the source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^\s/:]+$"))]
    pub interface: Option<String>,
    /// At most this many gateways of the group are active at once; unset means every healthy selected node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_gateway_nodes: Option<u32>,
}

/// A Kubernetes label selector (the `metav1.LabelSelector` shape). An empty selector matches everything.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `key operator values` requirement of a label selector.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[x_kube(validation = Rule::new("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)").message("In and NotIn need at least one value; Exists and DoesNotExist take none"))]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub values: Vec<String>,
}

/// Label selector operator.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Zone affinity between source pods and gateways.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AzAffinity {
    /// Zones are ignored.
    #[default]
    Disabled,
    /// Only gateways in the pod's zone; a zone without a healthy gateway has none.
    LocalOnly,
    /// Gateways in the pod's zone while any is healthy, then the others.
    LocalOnlyFirst,
    /// All gateways, but local ones are kept first when `maxGatewayNodes` trims the set.
    LocalPriority,
}

impl AzAffinity {
    pub fn is_disabled(&self) -> bool {
        *self == AzAffinity::Disabled
    }
}

/// Observed state, written by the egress-gw controller.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicyStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of pods the selectors currently pick (scheduled, with an IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_pods: Option<i64>,
    /// One entry per `spec.egressGroups` entry, in the same order.
    #[serde(default)]
    pub group_statuses: Vec<EgressGroupStatus>,
    /// `Ready` and `InvalidSpec`.
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
}

/// Gateways of one group.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGroupStatus {
    /// Node IPs of the active gateways, in assignment order (zone affinity off, or the union over zones).
    #[serde(default, rename = "activeGatewayIPs")]
    pub active_gateway_ips: Vec<String>,
    /// Active gateway node IPs as seen from each source zone (only with azAffinity).
    #[serde(default, rename = "activeGatewayIPsByAZ", skip_serializing_if = "BTreeMap::is_empty")]
    pub active_gateway_ips_by_az: BTreeMap<String, Vec<String>>,
    /// Node IPs of every selected node that passes health checks.
    #[serde(default, rename = "healthyGatewayIPs")]
    pub healthy_gateway_ips: Vec<String>,
}

/// A `metav1.Condition`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Ready` or `InvalidSpec`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, for example `BothEgressIPAndInterface`.
    pub reason: String,
    /// Human-readable detail naming the offending field or object.
    #[serde(default)]
    pub message: String,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
}

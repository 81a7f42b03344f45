//! `ExternalWorkload`: a VM or bare-metal host allowed to join the mesh.
//!
//! The object is cluster-scoped and its name is the host's name: the host registers with clustermesh-apiserver
//! under that name (gRPC `causeway.v1.Workloads/Register`, mTLS, certificate CN `externalworkload`), and a name
//! with no object is refused. The object's labels become the host's identity labels, exactly like a pod's labels
//! (the namespace label `io.kubernetes.pod.namespace` defaults to `default`, the cluster label is always this
//! cluster's). On registration the apiserver writes the allocated identity, the host's addresses and a `Ready`
//! condition into the status. Modelled on Cilium's `CiliumExternalWorkload` (cilium.io/v2), which Cilium removed
//! in 1.18.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `Ready` condition type: the host registered and is exported with its identity.
pub const CONDITION_READY: &str = "Ready";

/// What the host may use. `ipv4AllocCIDR` is required for a host that joins the mesh datapath (registers a
/// WireGuard key): its first usable address becomes the host's mesh address, and the whole range is routed to the
/// host through the tunnel (it is the host's "pod CIDR" in its node record). Ranges of two workloads must not
/// overlap.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[kube(
    group = "causeway.io",
    version = "v1alpha1",
    kind = "ExternalWorkload",
    plural = "externalworkloads",
    singular = "externalworkload",
    shortname = "cwew",
    category = "causeway",
    status = "ExternalWorkloadStatus",
    doc = "A VM or bare-metal host allowed to join the mesh. The object name is the host's name; its labels become \
           the host's identity labels.",
    printcolumn(name = "Identity", type_ = "integer", json_path = ".status.id", description = "Allocated identity"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ip", description = "Registered IPv4 address"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Mesh-IP", type_ = "string", json_path = ".status.meshIPv4", priority = 1),
    printcolumn(name = "IPv4-CIDR", type_ = "string", json_path = ".spec.ipv4AllocCIDR", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalWorkloadSpec {
    /// IPv4 range (CIDR) the host may allocate addresses from, e.g. for its tunnel device.
    #[serde(default, rename = "ipv4AllocCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 18), regex(pattern = r"^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/[0-9]+$"))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("ipv4AllocCIDR must be an IPv4 CIDR such as 10.192.1.0/30"))]
    pub ipv4_alloc_cidr: Option<String>,
    /// IPv6 range (CIDR) the host may allocate addresses from.
    #[serde(default, rename = "ipv6AllocCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 4, max = 43), regex(pattern = r"^[0-9a-fA-F:]*:[0-9a-fA-F:.]*/[0-9]+$"))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("ipv6AllocCIDR must be an IPv6 CIDR such as fd00:192::/64"))]
    pub ipv6_alloc_cidr: Option<String>,
}

/// Observed state, written by clustermesh-apiserver when the host registers.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalWorkloadStatus {
    /// The security identity allocated for the object's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// The IPv4 address the host registered with; its ipcache entry maps it to `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The IPv6 address the host registered with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// The host's address inside the mesh (first usable address of `spec.ipv4AllocCIDR`), set when the host
    /// registered a WireGuard key; mesh traffic from the host carries it as source.
    #[serde(default, rename = "meshIPv4", skip_serializing_if = "Option::is_none")]
    pub mesh_ipv4: Option<String>,
    /// The host's WireGuard public key (base64), set when it joined the mesh datapath; cluster nodes peer with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// `Ready` (True once registered and exported; False with the reason when the last registration was refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<WorkloadCondition>,
}

/// A status condition in the Kubernetes `metav1.Condition` shape.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCondition {
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[schemars(regex(pattern = r"^(True|False|Unknown)$"))]
    pub status: String,
    /// RFC 3339 time the condition last changed status.
    pub last_transition_time: String,
    /// CamelCase reason for the last transition.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

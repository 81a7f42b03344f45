//! Plain inputs to the export core: the parts of Kubernetes objects the export reads, with no kube types. The kube
//! adapter (`crate::kube::convert`) fills these from k8s-openapi objects; tests build them by hand.
//!
//! Fields keep Kubernetes' raw string forms (IPs, CIDRs, protocols); the core parses and validates them, so bad
//! input is handled in one place and tested without a cluster.

use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceInput {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerPortInput {
    pub name: Option<String>,
    pub port: i32,
    /// `TCP` when absent, as in Kubernetes.
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInput {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// metadata.creationTimestamp in Unix seconds; decides which pod keeps an IP two pods claim.
    pub created: Option<i64>,
    pub host_network: bool,
    /// status.phase; `Succeeded` and `Failed` pods are not exported.
    pub phase: Option<String>,
    /// status.podIPs (both families), falling back to status.podIP.
    pub pod_ips: Vec<String>,
    pub host_ip: Option<String>,
    pub container_ports: Vec<ContainerPortInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeAddressInput {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    pub kind: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInput {
    pub name: String,
    pub labels: Labels,
    pub addresses: Vec<NodeAddressInput>,
    /// spec.podCIDRs, falling back to spec.podCIDR.
    pub pod_cidrs: Vec<String>,
    /// The `causeway.io/wireguard-pub-key` annotation, if set.
    pub wireguard_pub_key: Option<String>,
    /// status.nodeInfo.bootID.
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePortInput {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceInput {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub selector: Labels,
    /// spec.clusterIPs, falling back to spec.clusterIP; `None` (headless) yields no frontends.
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePortInput>,
    /// spec.type; an `ExternalName` service is never MCS-exported.
    pub service_type: Option<String>,
    /// spec.sessionAffinity (`None` / `ClientIP`) and its client-IP timeout.
    pub session_affinity: Option<String>,
    pub session_affinity_timeout: Option<i32>,
    pub ip_families: Vec<String>,
    pub internal_traffic_policy: Option<String>,
    pub traffic_distribution: Option<String>,
}

/// An MCS-API `ServiceExport` (multicluster.x-k8s.io/v1alpha1): its namespace and name name the Service to export;
/// the rest goes into the `serviceexports` store entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceExportInput {
    pub namespace: String,
    pub name: String,
    /// metadata.creationTimestamp in Unix seconds; peers resolve conflicting exports by it.
    pub created: Option<i64>,
    /// spec.exportedLabels / spec.exportedAnnotations: carried to the importing clusters.
    pub exported_labels: Labels,
    pub exported_annotations: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlicePortInput {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointInput {
    pub addresses: Vec<String>,
    /// conditions.ready; nil means ready (Kubernetes: "unknown state, interpret as ready").
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub hostname: Option<String>,
    pub zone: Option<String>,
    /// hints.forZones names.
    pub for_zones: Vec<String>,
}

impl EndpointInput {
    /// Kubernetes semantics: `ready` defaults to true when unset; a terminating endpoint that still serves counts.
    pub fn is_usable(&self) -> bool {
        self.ready.unwrap_or(true) || self.serving.unwrap_or(false)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSliceInput {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label: which service this slice belongs to.
    pub service_name: Option<String>,
    pub ports: Vec<SlicePortInput>,
    pub endpoints: Vec<EndpointInput>,
}

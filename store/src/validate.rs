//! Strict checks on what a remote cluster wrote. Nothing enters the merged view without passing here.
//!
//! A remote is trusted to describe itself only: every value must name the remote it came from, identities must
//! fall in the remote's own range, addresses must parse and sizes must be sane. A compromised or buggy cluster can
//! therefore spoil only its own entries, never another cluster's.

use std::net::IpAddr;

use thiserror::Error;

use crate::cluster::{ClusterError, ClusterId, ClusterName, IdentityRange, MaxConnectedClusters};
use crate::keys::{KeyError, StoreKey};
use crate::labels::{LabelError, LabelSet};
use crate::values::{ClusterConfig, ClusterService, IpCacheEntry, Node, ServiceExportSpec};
use crate::MAX_VALUE_BYTES;

/// Kubernetes object names are DNS subdomains: at most 253 characters.
pub const MAX_NAME_LEN: usize = 253;
/// At most this many backends (or frontends) in one service value.
pub const MAX_SERVICE_ADDRESSES: usize = 100_000;
/// At most this many labels on one identity or object.
pub const MAX_LABELS: usize = 256;

/// Why a value from a remote was refused. Each variant names the reason as a short, stable metric label.
#[derive(Debug, Error)]
pub enum Rejected {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("value is {size} bytes, over the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge { size: usize },
    #[error("value is not valid JSON for this key: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("value is not UTF-8")]
    NotUtf8,
    #[error("value names cluster {found:?}, but it came from remote {expected:?}")]
    WrongCluster { expected: String, found: String },
    #[error("value names cluster ID {found}, but remote {cluster:?} has ID {expected}")]
    WrongClusterId { cluster: String, expected: u32, found: u32 },
    #[error("key and value disagree: {0}")]
    KeyMismatch(String),
    #[error("identity {id} is outside remote {cluster:?}'s range {first}..={last}")]
    IdentityOutOfRange { cluster: String, id: u32, first: u32, last: u32 },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is too long or has too many entries ({len}, limit {limit})")]
    Limit { what: &'static str, len: usize, limit: usize },
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("identity labels name cluster {found:?}, but they came from remote {expected:?}")]
    LabelCluster { expected: String, found: String },
    #[error("{field} holds {net}, which is the wrong address family for that field")]
    AddressFamily { field: &'static str, net: String },
    #[error("port protocol {0:?} is not TCP, UDP, SCTP or ANY")]
    Protocol(String),
    #[error("{field} is {value:?}, which is not one of {allowed}")]
    Enum { field: &'static str, value: String, allowed: &'static str },
    #[error("invalid cluster config: {0}")]
    ClusterConfig(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl Rejected {
    /// Short reason for metrics labels and status fields.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::Key(_) => "bad_key",
            Rejected::TooLarge { .. } => "too_large",
            Rejected::Json { .. } | Rejected::NotUtf8 => "malformed",
            Rejected::WrongCluster { .. } | Rejected::LabelCluster { .. } => "wrong_cluster",
            Rejected::WrongClusterId { .. } => "wrong_cluster_id",
            Rejected::KeyMismatch(_) => "key_mismatch",
            Rejected::IdentityOutOfRange { .. } => "identity_out_of_range",
            Rejected::Empty { .. } | Rejected::Limit { .. } => "limits",
            Rejected::Labels(_) => "bad_labels",
            Rejected::AddressFamily { .. } => "bad_address",
            Rejected::Protocol(_) => "bad_protocol",
            Rejected::Enum { .. } => "bad_value",
            Rejected::ClusterConfig(_) | Rejected::Cluster(_) => "bad_cluster_config",
        }
    }
}

/// Who a value came from: the remote's validated name, ID and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    pub name: ClusterName,
    pub id: ClusterId,
    pub mode: MaxConnectedClusters,
}

impl RemoteContext {
    pub fn range(&self) -> IdentityRange {
        self.id.identity_range(self.mode)
    }

    fn check_cluster(&self, found: &str) -> Result<(), Rejected> {
        if found != self.name.as_str() {
            return Err(Rejected::WrongCluster { expected: self.name.to_string(), found: found.to_string() });
        }
        Ok(())
    }

    fn check_cluster_id(&self, found: u32) -> Result<(), Rejected> {
        if found != self.id.get() {
            return Err(Rejected::WrongClusterId { cluster: self.name.to_string(), expected: self.id.get(), found });
        }
        Ok(())
    }

    fn check_identity(&self, id: u32) -> Result<(), Rejected> {
        let r = self.range();
        // The range's first value is the cluster prefix itself and never names a workload.
        if id <= r.first || id > r.last {
            return Err(Rejected::IdentityOutOfRange {
                cluster: self.name.to_string(),
                id,
                first: r.first_allocatable(),
                last: r.last,
            });
        }
        Ok(())
    }
}

/// An entry that passed validation, ready for the merged view.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteEntry {
    Service(ClusterService),
    Node(Node),
    Ip(IpCacheEntry),
    Identity { id: u32, labels: LabelSet },
}

fn parse_json<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, Rejected> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Rejected::TooLarge { size: value.len() });
    }
    serde_json::from_slice(value).map_err(|source| Rejected::Json { source })
}

fn check_name(what: &'static str, s: &str) -> Result<(), Rejected> {
    if s.is_empty() {
        return Err(Rejected::Empty { what });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Rejected::Limit { what, len: s.len(), limit: MAX_NAME_LEN });
    }
    Ok(())
}

fn check_protocol(p: &str) -> Result<(), Rejected> {
    match p {
        "TCP" | "UDP" | "SCTP" | "ANY" => Ok(()),
        other => Err(Rejected::Protocol(other.chars().take(32).collect())),
    }
}

fn check_limit(what: &'static str, len: usize, limit: usize) -> Result<(), Rejected> {
    if len > limit {
        return Err(Rejected::Limit { what, len, limit });
    }
    Ok(())
}

impl RemoteContext {
    /// Decodes and validates one key/value pair read from this remote's store.
    pub fn decode(&self, key: &str, value: &[u8]) -> Result<RemoteEntry, Rejected> {
        match StoreKey::parse(key)? {
            StoreKey::Service { cluster, namespace, name } => {
                let svc: ClusterService = parse_json(value)?;
                self.check_cluster(&cluster)?;
                self.check_service(&svc)?;
                if svc.namespace != namespace || svc.name != name {
                    return Err(Rejected::KeyMismatch(format!(
                        "key names {namespace}/{name}, value names {}/{}",
                        svc.namespace, svc.name
                    )));
                }
                Ok(RemoteEntry::Service(svc))
            }
            StoreKey::Node { cluster, name } => {
                let node: Node = parse_json(value)?;
                self.check_cluster(&cluster)?;
                self.check_node(&node)?;
                if node.name != name {
                    return Err(Rejected::KeyMismatch(format!("key names node {name}, value names {}", node.name)));
                }
                Ok(RemoteEntry::Node(node))
            }
            StoreKey::Ip { ip } => {
                let entry: IpCacheEntry = parse_json(value)?;
                if entry.ip != ip {
                    return Err(Rejected::KeyMismatch(format!("key names IP {ip}, value names {}", entry.ip)));
                }
                self.check_identity(entry.id)?;
                check_limit("ipcache namespace", entry.k8s_namespace.len(), MAX_NAME_LEN)?;
                check_limit("ipcache pod name", entry.k8s_pod_name.len(), MAX_NAME_LEN)?;
                check_limit("ipcache named ports", entry.named_ports.len(), MAX_LABELS)?;
                for p in &entry.named_ports {
                    check_protocol(&p.protocol)?;
                }
                Ok(RemoteEntry::Ip(entry))
            }
            StoreKey::Identity { id } => {
                self.check_identity(id)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(Rejected::TooLarge { size: value.len() });
                }
                let s = std::str::from_utf8(value).map_err(|_| Rejected::NotUtf8)?;
                let labels = LabelSet::parse(s)?;
                check_limit("identity labels", labels.len(), MAX_LABELS)?;
                match labels.cluster() {
                    Some(c) if c == self.name.as_str() => {}
                    found => {
                        return Err(Rejected::LabelCluster {
                            expected: self.name.to_string(),
                            found: found.unwrap_or("").to_string(),
                        })
                    }
                }
                Ok(RemoteEntry::Identity { id, labels })
            }
            other => Err(Rejected::KeyMismatch(format!("{other} is not a state entry"))),
        }
    }

    /// Decodes and validates a `cilium/state/serviceexports/v1/...` entry (MCS-API). Kept apart from
    /// [`RemoteContext::decode`] because only an MCS importer reads this prefix; the same rules as Cilium's reader
    /// apply: the names match the key and the remote, the export time is set, and every enumerated field holds a
    /// value Kubernetes defines.
    pub fn decode_service_export(&self, key: &str, value: &[u8]) -> Result<ServiceExportSpec, Rejected> {
        let StoreKey::ServiceExport { cluster, namespace, name } = StoreKey::parse(key)? else {
            return Err(Rejected::KeyMismatch(format!("{key} is not a service export key")));
        };
        let spec: ServiceExportSpec = parse_json(value)?;
        self.check_cluster(&cluster)?;
        self.check_cluster(&spec.cluster)?;
        check_name("service export namespace", &spec.namespace)?;
        check_name("service export name", &spec.name)?;
        if spec.namespace != namespace || spec.name != name {
            return Err(Rejected::KeyMismatch(format!(
                "key names {namespace}/{name}, value names {}/{}",
                spec.namespace, spec.name
            )));
        }
        if spec.export_creation_timestamp.is_none() {
            return Err(Rejected::Empty { what: "exportCreationTimestamp" });
        }
        let one_of = |field: &'static str, value: &str, allowed: &'static [&'static str], text: &'static str| {
            if allowed.contains(&value) {
                Ok(())
            } else {
                Err(Rejected::Enum { field, value: value.chars().take(64).collect(), allowed: text })
            }
        };
        one_of(
            "type",
            &spec.kind,
            &[ServiceExportSpec::CLUSTER_SET_IP, ServiceExportSpec::HEADLESS],
            "ClusterSetIP, Headless",
        )?;
        one_of("sessionAffinity", &spec.session_affinity, &["None", "ClientIP"], "None, ClientIP")?;
        if let Some(p) = &spec.internal_traffic_policy {
            one_of("internalTrafficPolicy", p, &["Cluster", "Local"], "Cluster, Local")?;
        }
        if let Some(d) = &spec.traffic_distribution {
            one_of(
                "trafficDistribution",
                d,
                &["PreferClose", "PreferSameZone", "PreferSameNode"],
                "PreferClose, PreferSameZone, PreferSameNode",
            )?;
        }
        for f in &spec.ip_families {
            one_of("ipFamilies", f, &["IPv4", "IPv6"], "IPv4, IPv6")?;
        }
        check_limit("service export ports", spec.ports.len(), MAX_LABELS)?;
        for p in &spec.ports {
            if !(1..=65535).contains(&p.port) {
                return Err(Rejected::Enum { field: "ports[].port", value: p.port.to_string(), allowed: "1..65535" });
            }
            // Kubernetes defaults an unset protocol to TCP; Cilium's ANY is never in a Kubernetes port.
            match p.protocol.as_str() {
                "" | "TCP" | "UDP" | "SCTP" => {}
                other => return Err(Rejected::Protocol(other.chars().take(32).collect())),
            }
        }
        check_limit("service export labels", spec.labels.len(), MAX_LABELS)?;
        check_limit("service export annotations", spec.annotations.len(), MAX_LABELS)?;
        Ok(spec)
    }

    fn check_service(&self, svc: &ClusterService) -> Result<(), Rejected> {
        self.check_cluster(&svc.cluster)?;
        self.check_cluster_id(svc.cluster_id)?;
        check_name("service namespace", &svc.namespace)?;
        check_name("service name", &svc.name)?;
        check_limit("service backends", svc.backends.len(), MAX_SERVICE_ADDRESSES)?;
        check_limit("service frontends", svc.frontends.len(), MAX_SERVICE_ADDRESSES)?;
        for ports in svc.backends.values().chain(svc.frontends.values()) {
            for p in ports.values() {
                check_protocol(&p.protocol)?;
            }
        }
        Ok(())
    }

    fn check_node(&self, node: &Node) -> Result<(), Rejected> {
        self.check_cluster(&node.cluster)?;
        self.check_cluster_id(node.cluster_id)?;
        check_name("node name", &node.name)?;
        check_limit("node labels", node.labels.len(), MAX_LABELS)?;
        check_limit("node addresses", node.addresses.len(), MAX_LABELS)?;
        if let Some(net) = node.ipv4_alloc_cidr {
            if !net.addr().is_ipv4() {
                return Err(Rejected::AddressFamily { field: "IPv4AllocCIDR", net: net.to_string() });
            }
        }
        if let Some(net) = node.ipv6_alloc_cidr {
            if !net.addr().is_ipv6() {
                return Err(Rejected::AddressFamily { field: "IPv6AllocCIDR", net: net.to_string() });
            }
        }
        Ok(())
    }
}

/// Checks a remote's cluster config against what the local side expects of it.
///
/// `others` are the IDs already held by other connected remotes.
pub fn validate_cluster_config(
    remote: &ClusterName,
    value: &[u8],
    local_id: ClusterId,
    local_mode: MaxConnectedClusters,
    others: impl IntoIterator<Item = (String, ClusterId)>,
) -> Result<RemoteContext, Rejected> {
    let cfg: ClusterConfig = parse_json(value)?;
    let mode = match cfg.capabilities.max_connected_clusters {
        0 => MaxConnectedClusters::C255,
        n => MaxConnectedClusters::try_from(n)?,
    };
    if mode != local_mode {
        return Err(Rejected::ClusterConfig(format!(
            "remote {remote:?} has maxConnectedClusters {}, the local cluster {}; every cluster in a mesh must use the same value",
            mode.get(),
            local_mode.get()
        )));
    }
    let id = ClusterId::new(cfg.id, mode)?;
    if id == local_id {
        return Err(Rejected::ClusterConfig(format!(
            "remote {remote:?} has cluster ID {id}, which is the local cluster's own ID"
        )));
    }
    for (other, other_id) in others {
        if other_id == id && other != remote.as_str() {
            return Err(Rejected::ClusterConfig(format!(
                "remote {remote:?} has cluster ID {id}, already used by remote {other:?}"
            )));
        }
    }
    Ok(RemoteContext { name: remote.clone(), id, mode })
}

/// True when `ip` is one a workload could hold (not unspecified, multicast or loopback).
pub fn is_workload_ip(ip: &IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
}

//! Desired EndpointSlices for a global service, as plain data. The kube adapter turns these into
//! `discovery.k8s.io/v1` objects, creates/updates the ones listed and deletes any other slice it manages for the
//! service.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::core::model::{Backend, GlobalServiceView, Port, Protocol};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "identity-sync.causeway.io";
/// Same default as kube-controller-manager's `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressType {
    IPv4,
    IPv6,
}

impl AddressType {
    pub fn of(ip: &IpAddr) -> AddressType {
        if ip.is_ipv4() {
            AddressType::IPv4
        } else {
            AddressType::IPv6
        }
    }

    /// The EndpointSlice `addressType` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    /// Only set when it is a valid DNS label, which the API server demands.
    pub hostname: Option<String>,
    pub zone: Option<String>,
}

/// One EndpointSlice identity-sync wants to exist. Remote backends are exported only when ready or serving, so
/// every endpoint is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredSlice {
    /// Deterministic, so reconciling updates in place rather than recreating.
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub source_cluster: String,
    pub address_type: AddressType,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`, so names survive an upgrade.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn slice_ports(ports: &[Port]) -> Vec<SlicePort> {
    ports.iter().map(|p| SlicePort { name: p.name.to_string(), protocol: p.protocol, port: p.port }).collect()
}

/// The slices for one global service: per source cluster, per address family, per distinct port set (a slice's
/// ports apply to all its endpoints), chunked at [`MAX_ENDPOINTS_PER_SLICE`].
pub fn desired_slices(view: &GlobalServiceView) -> Vec<DesiredSlice> {
    let mut out = Vec::new();
    for cb in &view.clusters {
        let mut groups: BTreeMap<(AddressType, &[Port]), Vec<&Backend>> = BTreeMap::new();
        for b in cb.backends.iter() {
            groups.entry((AddressType::of(&b.ip), b.ports.as_slice())).or_default().push(b);
        }
        for ((family, ports), backends) in groups {
            let ports_sig: String = ports.iter().map(|p| format!("{}/{}/{},", p.name, p.protocol, p.port)).collect();
            for (i, chunk) in backends.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
                let hash = fnv1a(&[
                    view.key.namespace.as_bytes(),
                    view.key.name.as_bytes(),
                    cb.cluster.as_bytes(),
                    family.as_str().as_bytes(),
                    ports_sig.as_bytes(),
                    &(i as u64).to_le_bytes(),
                ]);
                // Service names are DNS labels (≤ 63) and cluster names ≤ 32, so this stays well under 253.
                let name = format!(
                    "{}-{}-{}-{:08x}",
                    view.key.name,
                    cb.cluster,
                    if family == AddressType::IPv4 { "v4" } else { "v6" },
                    hash as u32
                );
                let labels = BTreeMap::from([
                    (LABEL_SERVICE_NAME.to_string(), view.key.name.to_string()),
                    (LABEL_SOURCE_CLUSTER.to_string(), cb.cluster.to_string()),
                    (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                ]);
                out.push(DesiredSlice {
                    name,
                    namespace: view.key.namespace.to_string(),
                    service: view.key.name.to_string(),
                    source_cluster: cb.cluster.to_string(),
                    address_type: family,
                    labels,
                    ports: slice_ports(ports),
                    endpoints: chunk
                        .iter()
                        .map(|b| SliceEndpoint {
                            address: b.ip,
                            hostname: b.hostname.as_deref().filter(|h| is_dns_label(h)).map(str::to_string),
                            zone: b.zone.as_deref().map(str::to_string),
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

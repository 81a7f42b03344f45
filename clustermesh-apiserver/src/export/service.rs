//! Exported services: which services are exported, and the `ClusterService` value built from a service and all of
//! its EndpointSlices.
//!
//! A service is exported when it is global and shared (the `service.cilium.io/*` annotations), or when an MCS-API
//! `ServiceExport` of the same namespace and name exists: the ServiceExport is the Kubernetes-standard way to say
//! "export this", so it exports the service as shared whatever its annotations say.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_store::values::{BackendZone, ClientIpConfig, ForZone, PortMap, SessionAffinityConfig};
use causeway_store::{ClusterInfo, ClusterService, McsServicePort, PortConfig, ServiceExportSpec};

use super::model::{EndpointSliceInput, Labels, ServiceExportInput, ServiceInput};

pub const GLOBAL_ANNOTATION: &str = "service.cilium.io/global";
pub const LEGACY_GLOBAL_ANNOTATION: &str = "io.cilium/global-service";
pub const SHARED_ANNOTATION: &str = "service.cilium.io/shared";
pub const LEGACY_SHARED_ANNOTATION: &str = "io.cilium/shared-service";
/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The first of `keys` that is set, read as a boolean (`"true"`, any case, is true; anything else false).
fn annotation_bool(annotations: &Labels, keys: &[&str]) -> Option<bool> {
    keys.iter().find_map(|k| annotations.get(*k)).map(|v| v.trim().eq_ignore_ascii_case("true"))
}

pub fn is_global(svc: &ServiceInput) -> bool {
    annotation_bool(&svc.annotations, &[GLOBAL_ANNOTATION, LEGACY_GLOBAL_ANNOTATION]).unwrap_or(false)
}

/// Shared defaults to true for a global service; `"false"` means the cluster consumes remote backends only.
pub fn is_shared(svc: &ServiceInput) -> bool {
    is_global(svc) && annotation_bool(&svc.annotations, &[SHARED_ANNOTATION, LEGACY_SHARED_ANNOTATION]).unwrap_or(true)
}

/// Kubernetes protocol names, defaulting to TCP. Unknown protocols are refused (a reader would reject the value).
pub(crate) fn protocol(p: Option<&str>) -> Option<String> {
    match p.map(str::to_ascii_uppercase).as_deref() {
        None | Some("") | Some("TCP") => Some("TCP".to_string()),
        Some("UDP") => Some("UDP".to_string()),
        Some("SCTP") => Some("SCTP".to_string()),
        Some(_) => None,
    }
}

pub(crate) fn port_number(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The value exported for `svc`, or `None` when the service is neither global and shared nor the subject of a
/// ServiceExport (`mcs_exported`).
pub fn cluster_service<'a>(
    cluster: &ClusterInfo,
    svc: &ServiceInput,
    mcs_exported: bool,
    slices: impl IntoIterator<Item = &'a EndpointSliceInput>,
) -> Option<ClusterService> {
    if !is_shared(svc) && !mcs_exported {
        return None;
    }
    let mut frontend_ports = PortMap::new();
    for p in &svc.ports {
        match (protocol(p.protocol.as_deref()), port_number(p.port)) {
            (Some(protocol), Some(port)) => {
                frontend_ports.insert(p.name.clone().unwrap_or_default(), PortConfig { protocol, port });
            }
            _ => tracing::warn!(
                service = %format!("{}/{}", svc.namespace, svc.name),
                port = p.port, protocol = ?p.protocol,
                "skipping service port with an invalid number or protocol"
            ),
        }
    }
    let mut frontends = BTreeMap::new();
    for ip in &svc.cluster_ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                frontends.insert(ip, frontend_ports.clone());
            }
            Err(_) => tracing::warn!(
                service = %format!("{}/{}", svc.namespace, svc.name), cluster_ip = %ip,
                "skipping a clusterIP that is not an IP address"
            ),
        }
    }

    let mut backends: BTreeMap<IpAddr, PortMap> = BTreeMap::new();
    let mut hostnames = BTreeMap::new();
    let mut zones = BTreeMap::new();
    for slice in slices {
        let mut ports = PortMap::new();
        for p in &slice.ports {
            let (Some(protocol), Some(port)) = (protocol(p.protocol.as_deref()), p.port.and_then(port_number)) else {
                continue;
            };
            ports.insert(p.name.clone().unwrap_or_default(), PortConfig { protocol, port });
        }
        for ep in slice.endpoints.iter().filter(|e| e.is_usable()) {
            // FQDN slices carry hostnames, not IPs; they are skipped here by the parse.
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                backends.entry(ip).or_default().extend(ports.iter().map(|(k, v)| (k.clone(), v.clone())));
                if let Some(h) = ep.hostname.as_ref().filter(|h| !h.is_empty()) {
                    hostnames.insert(ip, h.clone());
                }
                if let Some(z) = ep.zone.as_ref().filter(|z| !z.is_empty()) {
                    let for_zones = ep.for_zones.iter().map(|name| ForZone { name: name.clone() }).collect();
                    zones.insert(ip, BackendZone { zone: z.clone(), for_zones });
                }
            }
        }
    }

    Some(ClusterService {
        cluster: cluster.name.to_string(),
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        frontends,
        backends,
        hostnames,
        zones,
        labels: svc.labels.clone(),
        selector: svc.selector.clone(),
        include_external: false,
        shared: true,
        cluster_id: cluster.id.get(),
    })
}

/// The `cilium/state/serviceexports/v1/...` value for a Service that has a ServiceExport: the service's shape as the
/// MCS-API describes it (type, ports, session affinity, families, traffic policy) plus the export's time, labels and
/// annotations, as Cilium's clustermesh-apiserver writes it. `None` for an `ExternalName` service (MCS-API cannot
/// export one) and for an export without a creation time (a reader would refuse the value).
pub fn service_export_spec(
    cluster: &ClusterInfo,
    svc: &ServiceInput,
    export: &ServiceExportInput,
) -> Option<ServiceExportSpec> {
    let who = || format!("{}/{}", svc.namespace, svc.name);
    if svc.service_type.as_deref() == Some("ExternalName") {
        tracing::debug!(service = %who(), "ExternalName services cannot be MCS-exported");
        return None;
    }
    let Some(created) = export.created.and_then(|s| chrono::DateTime::from_timestamp(s, 0)) else {
        tracing::warn!(service = %who(), "ServiceExport has no creation time; not publishing its spec");
        return None;
    };
    let mut ports = Vec::new();
    for p in &svc.ports {
        match (protocol(p.protocol.as_deref()), port_number(p.port)) {
            (Some(protocol), Some(port)) => ports.push(McsServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
                port: i32::from(port),
            }),
            _ => tracing::warn!(service = %who(), port = p.port, protocol = ?p.protocol,
                "skipping service port with an invalid number or protocol"),
        }
    }
    let headless = svc.cluster_ips.iter().any(|ip| ip == "None");
    // Kubernetes defaults sessionAffinity to None; anything it would not accept is treated as None too.
    let session_affinity = match svc.session_affinity.as_deref() {
        Some("ClientIP") => "ClientIP",
        _ => "None",
    };
    let session_affinity_config = svc
        .session_affinity_timeout
        .filter(|_| session_affinity == "ClientIP")
        .map(|t| SessionAffinityConfig { client_ip: Some(ClientIpConfig { timeout_seconds: Some(t) }) });
    Some(ServiceExportSpec {
        cluster: cluster.name.to_string(),
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        annotations: export.exported_annotations.clone(),
        labels: export.exported_labels.clone(),
        export_creation_timestamp: Some(created),
        ports,
        kind: if headless { ServiceExportSpec::HEADLESS } else { ServiceExportSpec::CLUSTER_SET_IP }.to_string(),
        session_affinity: session_affinity.to_string(),
        session_affinity_config,
        ip_families: svc.ip_families.iter().filter(|f| *f == "IPv4" || *f == "IPv6").cloned().collect(),
        internal_traffic_policy: svc.internal_traffic_policy.clone().filter(|p| p == "Cluster" || p == "Local"),
        traffic_distribution: svc
            .traffic_distribution
            .clone()
            .filter(|d| matches!(d.as_str(), "PreferClose" | "PreferSameZone" | "PreferSameNode")),
    })
}

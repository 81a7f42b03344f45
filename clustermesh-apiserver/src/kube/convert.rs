//! k8s-openapi objects → the export core's plain inputs. Nothing here fails: missing fields become empty values,
//! and the core decides what is usable.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::export::model::*;
use crate::export::node::WIREGUARD_KEY_ANNOTATION;
use crate::export::service::SERVICE_NAME_LABEL;

fn name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_default()
}

fn labels(meta: &ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

pub fn namespace_input(ns: &Namespace) -> NamespaceInput {
    NamespaceInput { name: name(&ns.metadata), labels: labels(&ns.metadata) }
}

pub fn pod_input(pod: &Pod) -> PodInput {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut pod_ips: Vec<String> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|p| p.ip.clone()).collect();
    if pod_ips.is_empty() {
        pod_ips.extend(status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()));
    }
    let container_ports = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| ContainerPortInput { name: p.name.clone(), port: p.container_port, protocol: p.protocol.clone() })
        .collect();
    PodInput {
        namespace: namespace(&pod.metadata),
        name: name(&pod.metadata),
        labels: labels(&pod.metadata),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: status.and_then(|s| s.phase.clone()),
        pod_ips,
        host_ip: status.and_then(|s| s.host_ip.clone()),
        container_ports,
    }
}

pub fn node_input(node: &Node) -> NodeInput {
    let spec = node.spec.as_ref();
    let status = node.status.as_ref();
    let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()).filter(|c| !c.is_empty()));
    }
    NodeInput {
        name: name(&node.metadata),
        labels: labels(&node.metadata),
        addresses: status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .map(|a| NodeAddressInput { kind: a.type_.clone(), address: a.address.clone() })
            .collect(),
        pod_cidrs,
        wireguard_pub_key: node.metadata.annotations.as_ref().and_then(|a| a.get(WIREGUARD_KEY_ANNOTATION)).cloned(),
        boot_id: status.and_then(|s| s.node_info.as_ref()).map(|i| i.boot_id.clone()).filter(|b| !b.is_empty()),
    }
}

pub fn service_input(svc: &Service) -> ServiceInput {
    let spec = svc.spec.as_ref();
    let mut cluster_ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.and_then(|s| s.cluster_ip.clone()).filter(|ip| !ip.is_empty()));
    }
    ServiceInput {
        namespace: namespace(&svc.metadata),
        name: name(&svc.metadata),
        labels: labels(&svc.metadata),
        annotations: svc.metadata.annotations.clone().unwrap_or_default(),
        selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
        cluster_ips,
        ports: spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| ServicePortInput {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        service_type: spec.and_then(|s| s.type_.clone()),
        session_affinity: spec.and_then(|s| s.session_affinity.clone()),
        session_affinity_timeout: spec
            .and_then(|s| s.session_affinity_config.as_ref())
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds),
        ip_families: spec.and_then(|s| s.ip_families.clone()).unwrap_or_default(),
        internal_traffic_policy: spec.and_then(|s| s.internal_traffic_policy.clone()),
        traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
    }
}

pub fn slice_input(slice: &EndpointSlice) -> EndpointSliceInput {
    EndpointSliceInput {
        namespace: namespace(&slice.metadata),
        name: name(&slice.metadata),
        // Slices carrying the MCS source-cluster label were imported by identity-sync from another cluster; exporting
        // them as this cluster's backends would echo every remote's backends back into the mesh.
        service_name: slice
            .metadata
            .labels
            .as_ref()
            .filter(|l| !l.contains_key("multicluster.kubernetes.io/source-cluster"))
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned(),
        ports: slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePortInput { name: p.name.clone(), port: p.port, protocol: p.protocol.clone() })
            .collect(),
        endpoints: slice
            .endpoints
            .iter()
            .map(|e| EndpointInput {
                addresses: e.addresses.clone(),
                ready: e.conditions.as_ref().and_then(|c| c.ready),
                serving: e.conditions.as_ref().and_then(|c| c.serving),
                hostname: e.hostname.clone(),
                zone: e.zone.clone(),
                for_zones: e
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
            })
            .collect(),
    }
}

/// A ServiceExport names the Service to export; its creation time and `spec.exportedLabels` /
/// `spec.exportedAnnotations` (string maps; anything else in them is ignored) go with the export.
pub fn service_export_input(o: &::kube::api::DynamicObject) -> ServiceExportInput {
    let string_map = |field: &str| -> Labels {
        o.data
            .get("spec")
            .and_then(|s| s.get(field))
            .and_then(|m| m.as_object())
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    };
    ServiceExportInput {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone().unwrap_or_default(),
        created: o.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        exported_labels: string_map("exportedLabels"),
        exported_annotations: string_map("exportedAnnotations"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_from_json() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop", "labels": {"app": "cart"},
                         "creationTimestamp": "2024-01-02T03:04:05Z"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "hostIP": "192.168.1.1", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .expect("valid pod");
        let p = pod_input(&pod);
        assert_eq!(p.pod_ips, vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(p.created, Some(1_704_164_645));
        assert_eq!(p.container_ports[0].port, 8080);
        assert_eq!(p.host_ip.as_deref(), Some("192.168.1.1"));
        assert!(!p.host_network);

        // podIP alone (older kubelets) still counts; an empty object converts without panicking.
        let pod: Pod = serde_json::from_value(serde_json::json!({"status": {"podIP": "10.0.0.2"}})).expect("pod");
        assert_eq!(pod_input(&pod).pod_ips, vec!["10.0.0.2"]);
        let _ = pod_input(&Pod::default());
    }

    #[test]
    fn node_service_slice_from_json() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "annotations": {"causeway.io/wireguard-pub-key": "k"}},
            "spec": {"podCIDR": "10.1.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}],
                       "nodeInfo": {"bootID": "b", "machineID": "", "systemUUID": "", "kernelVersion": "",
                                    "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                                    "kubeProxyVersion": "", "operatingSystem": "", "architecture": ""}}
        }))
        .expect("valid node");
        let n = node_input(&node);
        assert_eq!(n.pod_cidrs, vec!["10.1.0.0/24"]);
        assert_eq!(n.wireguard_pub_key.as_deref(), Some("k"));
        assert_eq!(n.boot_id.as_deref(), Some("b"));

        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart", "namespace": "shop", "annotations": {"service.cilium.io/global": "true"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}], "selector": {"app": "cart"}}
        }))
        .expect("valid service");
        let s = service_input(&svc);
        assert_eq!(s.cluster_ips, vec!["10.96.0.1"]);
        assert_eq!(s.ports[0].port, 80);

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "cart"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"serving": true}, "zone": "z1",
                           "hints": {"forZones": [{"name": "z1"}]}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .expect("valid slice");
        let e = slice_input(&slice);
        assert_eq!(e.service_name.as_deref(), Some("cart"));
        assert_eq!(e.endpoints[0].ready, None);
        assert!(e.endpoints[0].is_usable());
        assert_eq!(e.endpoints[0].for_zones, vec!["z1"]);
    }
}

//! kube objects → core inputs. Missing or malformed fields become "absent", never a panic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_crds::EgressGatewayPolicy;
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Node as KNode, Pod as KPod};

use crate::core::{Namespace, Node, Pod, PolicySpec};

/// Node annotation where the node agent publishes its interfaces and their addresses, as JSON
/// `{"eth1": ["192.0.2.10", "2001:db8::10"]}`. An `egressIP` counts as present on a node when it is listed here.
pub const INTERFACES_ANNOTATION: &str = "egress.causeway.io/interfaces";
/// Node annotation naming the interface that holds the default route (used when a group names neither egressIP
/// nor interface).
pub const DEFAULT_INTERFACE_ANNOTATION: &str = "egress.causeway.io/default-interface";

pub fn policy(p: &EgressGatewayPolicy) -> Option<PolicySpec> {
    let name = p.metadata.name.as_deref()?;
    Some(crate::spec::policy_spec(name, p.metadata.generation.unwrap_or(0), &p.spec))
}

/// A pod that can send traffic: scheduled, not host-networked (its traffic is the node's), not finished.
/// `None` means "treat as absent".
pub fn pod(p: &KPod) -> Option<Pod> {
    let namespace = p.metadata.namespace.clone()?;
    let name = p.metadata.name.clone()?;
    let spec = p.spec.as_ref()?;
    if spec.host_network.unwrap_or(false) {
        return None;
    }
    let status = p.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|a| a.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    Some(Pod {
        namespace,
        name,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        node: spec.node_name.clone().filter(|n| !n.is_empty()),
        ips,
    })
}

pub fn namespace(ns: &KNamespace) -> Option<Namespace> {
    Some(Namespace { name: ns.metadata.name.clone()?, labels: ns.metadata.labels.clone().unwrap_or_default() })
}

pub fn node(n: &KNode) -> Option<Node> {
    let name = n.metadata.name.clone()?;
    let addresses = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    // InternalIP first: that is what the tunnel between nodes uses.
    let mut ips: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        ips.extend(
            addresses
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == kind)
                .filter_map(|a| a.address.parse::<IpAddr>().ok()),
        );
    }
    let annotations = n.metadata.annotations.as_ref();
    let interfaces: BTreeMap<String, Vec<IpAddr>> = annotations
        .and_then(|a| a.get(INTERFACES_ANNOTATION))
        .and_then(|json| match serde_json::from_str::<BTreeMap<String, Vec<String>>>(json) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "ignoring malformed {INTERFACES_ANNOTATION} annotation");
                None
            }
        })
        .unwrap_or_default()
        .into_iter()
        .map(|(iface, addrs)| (iface, addrs.iter().filter_map(|a| a.parse().ok()).collect()))
        .collect();
    Some(Node {
        name,
        labels: n.metadata.labels.clone().unwrap_or_default(),
        ips,
        interfaces,
        default_interface: annotations.and_then(|a| a.get(DEFAULT_INTERFACE_ANNOTATION)).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_that_send_no_traffic_are_absent() {
        let pod_json = |extra: serde_json::Value| -> KPod {
            let mut v = serde_json::json!({
                "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "a"}},
                "spec": {"nodeName": "w1", "containers": []},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
            });
            if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                for (k, e) in extra {
                    if let (Some(dst), Some(src)) = (obj.get_mut(k).and_then(|d| d.as_object_mut()), e.as_object()) {
                        dst.extend(src.clone());
                    }
                }
            }
            serde_json::from_value(v).expect("pod")
        };
        let p = pod(&pod_json(serde_json::json!({}))).expect("running pod");
        assert_eq!(p.ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip"), "fd00::1".parse().expect("ip")]);
        assert_eq!(p.node.as_deref(), Some("w1"));
        assert!(pod(&pod_json(serde_json::json!({"spec": {"hostNetwork": true}}))).is_none());
        assert!(pod(&pod_json(serde_json::json!({"status": {"phase": "Succeeded"}}))).is_none());
    }

    #[test]
    fn node_addresses_and_agent_annotations() {
        let n: KNode = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw-a", "labels": {"gw": "true"}, "annotations": {
                INTERFACES_ANNOTATION: "{\"eth1\": [\"192.0.2.10\", \"not-an-ip\"]}",
                DEFAULT_INTERFACE_ANNOTATION: "eth0"
            }},
            "status": {"addresses": [
                {"type": "Hostname", "address": "gw-a"},
                {"type": "ExternalIP", "address": "198.51.100.1"},
                {"type": "InternalIP", "address": "172.18.0.11"}
            ]}
        }))
        .expect("node");
        let n = node(&n).expect("node");
        assert_eq!(n.ips, vec!["172.18.0.11".parse::<IpAddr>().expect("ip"), "198.51.100.1".parse().expect("ip")]);
        assert_eq!(n.interfaces.get("eth1"), Some(&vec!["192.0.2.10".parse::<IpAddr>().expect("ip")]));
        assert_eq!(n.default_interface.as_deref(), Some("eth0"));

        let bad: KNode = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "annotations": {INTERFACES_ANNOTATION: "{nope"}}
        }))
        .expect("node");
        assert!(node(&bad).is_some_and(|n| n.interfaces.is_empty() && n.ips.is_empty()));
    }
}

//! A kube-proxy STAND-IN for the test node (kube-proxy cannot be installed here; it needs a real kube-apiserver).
//!
//! What it is: one function that reads the Services and EndpointSlices from the (fake) kube API and writes an
//! nftables table on the node that DNATs each `ClusterIP:port/protocol` to the Service's ready endpoints (random
//! choice among several), as kube-proxy's nftables mode does in spirit. It runs once per call ([`sync`]), not as a
//! watcher: the test calls it after creating its objects. Not implemented (not needed here): NodePorts, session
//! affinity, external traffic policy, masquerading, hairpin, IPv6.
//!
//! Why the test needs one: a joined host reaches a ClusterIP by routing the Service CIDR through its tunnel to a
//! cluster node; translating the ClusterIP is that node's service proxy's job, as it is in a real cluster.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use causeway_testsupport::netns::Netns;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;

/// The nftables table the stand-in owns on the node.
pub const TABLE: &str = "cw_kube_proxy";

/// One DNAT rule: `ip daddr <cluster_ip> <proto> dport <port>` → one of `backends` at `target_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub service: String,
    pub cluster_ip: String,
    pub protocol: String,
    pub port: i32,
    pub backends: Vec<String>,
    pub target_port: i32,
}

/// The rules for these Services and slices (pure: no I/O). Services without a ClusterIP or without ready
/// endpoints for a port get no rule, as with kube-proxy (which rejects instead).
pub fn rules(services: &[Service], slices: &[EndpointSlice]) -> Vec<Rule> {
    let mut out = Vec::new();
    for svc in services {
        let (Some(ns), Some(name)) = (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        let Some(cluster_ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let mine: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).map(String::as_str)
                        == Some(name)
            })
            .collect();
        for port in spec.ports.as_deref().unwrap_or_default() {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            // Backends grouped by target port: the slice port whose name (and protocol) matches the Service port.
            let mut by_target: BTreeMap<i32, Vec<String>> = BTreeMap::new();
            for slice in &mine {
                let Some(sp) =
                    slice.ports.as_deref().unwrap_or_default().iter().find(|sp| {
                        sp.name == port.name && sp.protocol.clone().unwrap_or_else(|| "TCP".into()) == protocol
                    })
                else {
                    continue;
                };
                let Some(target) = sp.port else { continue };
                for ep in &slice.endpoints {
                    if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    by_target.entry(target).or_default().extend(ep.addresses.iter().cloned());
                }
            }
            for (target_port, mut backends) in by_target {
                backends.sort();
                backends.dedup();
                out.push(Rule {
                    service: format!("{ns}/{name}"),
                    cluster_ip: cluster_ip.to_string(),
                    protocol: protocol.to_lowercase(),
                    port: port.port,
                    backends,
                    target_port,
                });
            }
        }
    }
    out
}

/// The nft script replacing the table with `rules`.
pub fn nft_script(rules: &[Rule]) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for r in rules {
        let target = if r.backends.len() == 1 {
            format!("{}:{}", r.backends[0], r.target_port)
        } else {
            let map: Vec<String> = r.backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
            format!("numgen random mod {} map {{ {} }}:{}", r.backends.len(), map.join(", "), r.target_port)
        };
        s.push_str(&format!(
            "    ip daddr {} {} dport {} dnat to {target} comment \"{}\"\n",
            r.cluster_ip, r.protocol, r.port, r.service
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// Reads every Service and EndpointSlice and programs node `ns`'s table; returns the rules programmed.
pub async fn sync(kube: &kube::Client, ns: &Netns) -> Result<Vec<Rule>> {
    let services = Api::<Service>::all(kube.clone()).list(&ListParams::default()).await?.items;
    let slices = Api::<EndpointSlice>::all(kube.clone()).list(&ListParams::default()).await?.items;
    let rules = rules(&services, &slices);
    let file = tempfile::NamedTempFile::new().context("nft script file")?;
    std::fs::write(file.path(), nft_script(&rules))?;
    ns.exec(&["nft", "-f", &file.path().to_string_lossy()]).context("programming the kube-proxy stand-in")?;
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_ports_map_to_ready_endpoints_by_port_name() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]}
        }))
        .expect("service");
        let headless: Service = serde_json::from_value(json!({
            "metadata": {"name": "h", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}
        }))
        .expect("service");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.1.10"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.12"]},
                {"addresses": ["10.244.1.13"], "conditions": {"ready": false}}
            ]
        }))
        .expect("slice");
        let got = rules(&[svc, headless], &[slice]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].backends, vec!["10.244.1.10".to_string(), "10.244.1.12".to_string()]);
        assert_eq!((got[0].protocol.as_str(), got[0].port, got[0].target_port), ("tcp", 80, 8080));
        assert_eq!((got[1].protocol.as_str(), got[1].port, got[1].target_port), ("udp", 53, 5353));
        let script = nft_script(&got);
        assert!(
            script.contains(
                "ip daddr 10.96.0.20 tcp dport 80 dnat to numgen random mod 2 map { 0 : 10.244.1.10, 1 : 10.244.1.12 }:8080"
            ),
            "{script}"
        );
    }
}

//! Nodes: the `Node` value built from a Kubernetes Node.

use std::net::IpAddr;

use base64::Engine;
use causeway_store::{ClusterInfo, Node, NodeAddress};
use ipnet::IpNet;

use super::model::NodeInput;
use crate::metrics::Metrics;

/// Node annotation carrying the node agent's WireGuard public key (base64 of 32 bytes).
pub const WIREGUARD_KEY_ANNOTATION: &str = "causeway.io/wireguard-pub-key";
/// `Source` written into node values: they come from Kubernetes Node objects.
pub const NODE_SOURCE: &str = "kubernetes";

/// True when `key` is standard base64 of exactly 32 bytes, as WireGuard public keys are.
pub fn valid_wireguard_key(key: &str) -> bool {
    matches!(base64::engine::general_purpose::STANDARD.decode(key), Ok(bytes) if bytes.len() == 32)
}

/// Builds the exported value. Unparseable addresses and CIDRs are skipped and an invalid WireGuard key is
/// omitted; each is logged and counted, and the rest of the node is still exported.
pub fn store_node(cluster: &ClusterInfo, input: &NodeInput, metrics: &Metrics) -> Node {
    let mut addresses: Vec<NodeAddress> = Vec::new();
    for a in &input.addresses {
        if a.kind != "InternalIP" && a.kind != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) => {
                let addr = NodeAddress { kind: a.kind.clone(), ip };
                if !addresses.contains(&addr) {
                    addresses.push(addr);
                }
            }
            Err(_) => {
                metrics.error("invalid_object");
                tracing::warn!(node = %input.name, address = %a.address, kind = %a.kind,
                    "skipping node address that is not an IP address");
            }
        }
    }
    let (mut v4, mut v6) = (None, None);
    for c in &input.pod_cidrs {
        match c.parse::<IpNet>() {
            Ok(net @ IpNet::V4(_)) if v4.is_none() => v4 = Some(net.trunc()),
            Ok(net @ IpNet::V6(_)) if v6.is_none() => v6 = Some(net.trunc()),
            Ok(_) => {}
            Err(_) => {
                metrics.error("invalid_object");
                tracing::warn!(node = %input.name, cidr = %c, "skipping node pod CIDR that does not parse");
            }
        }
    }
    let wireguard_pub_key = match input.wireguard_pub_key.as_deref().map(str::trim) {
        None | Some("") => String::new(),
        Some(k) if valid_wireguard_key(k) => k.to_string(),
        Some(k) => {
            metrics.error("invalid_wireguard_key");
            tracing::warn!(node = %input.name, annotation = WIREGUARD_KEY_ANNOTATION, value = %k.chars().take(64).collect::<String>(),
                "omitting WireGuard key: the annotation must be standard base64 of 32 bytes (`wg pubkey` output)");
            String::new()
        }
    };
    Node {
        name: input.name.clone(),
        cluster: cluster.name.to_string(),
        addresses,
        ipv4_alloc_cidr: v4,
        ipv6_alloc_cidr: v6,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: cluster.id.get(),
        source: NODE_SOURCE.to_string(),
        encryption_key: 0,
        labels: input.labels.clone(),
        annotations: Default::default(),
        wireguard_pub_key,
        boot_id: input.boot_id.clone().unwrap_or_default(),
    }
}

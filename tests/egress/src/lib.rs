//! TEST HARNESS for the egress gateway end to end (issue 4, items 7 and 8). Never a runtime dependency.
//!
//! Where it sits: it wires the real `egress-gw` controller and one real `causeway-node-agent` per node the way a
//! cluster would — policies and pods go into the kube API, egress-gw selects and probes gateways and streams
//! assignments, the agents program the eBPF datapath — and then sends real packets from pod namespaces to a "legacy"
//! server behind an nftables firewall that only lets the egress IPs through. The only stand-in is the kube API
//! (`fake-kube-apiserver`).
//!
//! - [`topology`]: the namespaces and wires (3 nodes on an underlay switch, 2 of them gateways in two zones, the
//!   firewall with its counters, the server, pods).
//! - [`cluster`]: the kube API, the processes, and what a user would look at (policy status, node annotations,
//!   the pinned maps).
//! - [`traffic`]: a UDP stream from a pod, the server's UDP sink that records sources and arrival times, a TCP echo
//!   flow.
//!
//! The binaries come from the cargo target directory the test or bench binary runs from: build them first
//! (`cargo build -p causeway-egress-gw -p causeway-datapath --bins`, or `--release` for the benchmarks). Needs root
//! and network namespaces: tests call [`causeway_testsupport::netns::privileged`] first.

pub mod cluster;
pub mod topology;
pub mod traffic;

pub use cluster::{serial, EgressCluster, Options, NAMESPACE, SOON};
pub use topology::{Node, Pod, Topology, GW_A, GW_B, WORKER};
pub use traffic::{Arrival, TcpEcho, TcpFlow, UdpSink, UdpStream, TCP_PORT, UDP_PORT};

use serde_json::{json, Value};

/// The test policies' spec: pods labelled `app=billing` in namespaces labelled `team=payments`, to the legacy
/// range minus the excluded range, through the nodes labelled `egress-gw=true`, SNAT to each gateway's `ext0`
/// address. `group_extra` is merged into the egress group (e.g. `{"maxGatewayNodes": 1}`), `az_affinity` set when
/// given.
pub fn billing_policy(group_extra: Value, az_affinity: Option<&str>) -> Value {
    let mut group = json!({
        "nodeSelector": {"matchLabels": {topology::GATEWAY_LABEL.0: topology::GATEWAY_LABEL.1}},
        "interface": topology::EXTERNAL_IF,
    });
    if let (Some(g), Some(extra)) = (group.as_object_mut(), group_extra.as_object()) {
        g.extend(extra.clone());
    }
    let mut spec = json!({
        "selectors": [{
            "podSelector": {"matchLabels": {"app": "billing"}},
            "namespaceSelector": {"matchLabels": {"team": "payments"}}
        }],
        "destinationCIDRs": [topology::DESTINATION_CIDR],
        "excludedCIDRs": [topology::EXCLUDED_CIDR],
        "egressGroups": [group],
    });
    if let (Some(s), Some(az)) = (spec.as_object_mut(), az_affinity) {
        s.insert("azAffinity".into(), json!(az));
    }
    spec
}

/// Labels of a pod the billing policy selects.
pub const BILLING: &[(&str, &str)] = &[("app", "billing")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_policy_parses_as_the_crd() {
        let spec = billing_policy(json!({"maxGatewayNodes": 1}), Some("localOnly"));
        let parsed: causeway_crds::EgressGatewayPolicySpec = serde_json::from_value(spec).expect("spec");
        assert_eq!(parsed.egress_groups[0].max_gateway_nodes, Some(1));
        assert_eq!(parsed.egress_groups[0].interface.as_deref(), Some("ext0"));
        assert_eq!(parsed.az_affinity, causeway_crds::egress::AzAffinity::LocalOnly);
        assert_eq!(parsed.excluded_cidrs, vec![topology::EXCLUDED_CIDR.to_string()]);
    }
}

//! From the `EgressGatewayPolicy` CRD type to the core's parsed [`PolicySpec`]. Addresses that do not parse are
//! collected as messages (the core reports them as `InvalidSpec`/`MalformedSpec`) rather than failing, so one bad
//! field never hides the rest of the status.

use std::net::IpAddr;

use causeway_crds::egress::{self as crd, AzAffinity, EgressGatewayPolicySpec, SelectorOperator};
use ipnet::IpNet;

use crate::core::{GroupSpec, Operator, PolicySpec, Requirement, Selector, SourceSelector, ZoneAffinity};

pub fn selector(s: &crd::LabelSelector) -> Selector {
    Selector {
        match_labels: s.match_labels.clone(),
        requirements: s
            .match_expressions
            .iter()
            .map(|r| Requirement {
                key: r.key.clone(),
                op: match r.operator {
                    SelectorOperator::In => Operator::In,
                    SelectorOperator::NotIn => Operator::NotIn,
                    SelectorOperator::Exists => Operator::Exists,
                    SelectorOperator::DoesNotExist => Operator::DoesNotExist,
                },
                values: r.values.iter().cloned().collect(),
            })
            .collect(),
    }
}

fn cidrs(field: &str, items: &[String], malformed: &mut Vec<String>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, c) in items.iter().enumerate() {
        match c.trim().parse::<IpNet>() {
            // A CIDR with host bits set (10.1.2.3/8) means its network, as the apiserver's cidr() does.
            Ok(net) => out.push(net.trunc()),
            Err(e) => malformed.push(format!("{field}[{i}] {c:?} is not a CIDR: {e}")),
        }
    }
    out
}

/// Parses one policy. `generation` is `metadata.generation`.
pub fn policy_spec(name: &str, generation: i64, spec: &EgressGatewayPolicySpec) -> PolicySpec {
    let mut malformed = Vec::new();
    let destinations = cidrs("destinationCIDRs", &spec.destination_cidrs, &mut malformed);
    if spec.destination_cidrs.is_empty() {
        malformed.push("destinationCIDRs is empty; list at least one destination".into());
    }
    if spec.egress_groups.is_empty() {
        malformed.push("egressGroups is empty; list at least one group".into());
    }
    let excluded = cidrs("excludedCIDRs", &spec.excluded_cidrs, &mut malformed);
    let groups = spec
        .egress_groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let egress_ip = g.egress_ip.as_deref().and_then(|ip| match ip.trim().parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(e) => {
                    malformed.push(format!("egressGroups[{i}].egressIP {ip:?} is not an IP address: {e}"));
                    None
                }
            });
            if g.max_gateway_nodes == Some(0) {
                malformed.push(format!("egressGroups[{i}].maxGatewayNodes must be at least 1"));
            }
            GroupSpec {
                node_selector: selector(&g.node_selector),
                egress_ip,
                interface: g.interface.clone().filter(|i| !i.is_empty()),
                max_gateway_nodes: g.max_gateway_nodes.map(|n| n as usize),
            }
        })
        .collect();
    PolicySpec {
        name: name.to_string(),
        generation,
        selectors: spec
            .selectors
            .iter()
            .map(|s| SourceSelector {
                pods: s.pod_selector.as_ref().map(selector),
                namespaces: s.namespace_selector.as_ref().map(selector),
                nodes: s.node_selector.as_ref().map(selector),
            })
            .collect(),
        destinations,
        excluded,
        groups,
        az_affinity: match spec.az_affinity {
            AzAffinity::Disabled => ZoneAffinity::Disabled,
            AzAffinity::LocalOnly => ZoneAffinity::LocalOnly,
            AzAffinity::LocalOnlyFirst => ZoneAffinity::LocalOnlyFirst,
            AzAffinity::LocalPriority => ZoneAffinity::LocalPriority,
        },
        malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_crds::egress::compat::convert_manifests;

    #[test]
    fn parses_a_converted_manifest_and_collects_malformed_fields() {
        let yaml = "apiVersion: isovalent.com/v1\nkind: IsovalentEgressGatewayPolicy\nmetadata: {name: p}\nspec:\n  selectors: [{podSelector: {matchLabels: {app: a}}}]\n  destinationCIDRs: [\"10.9.1.7/16\", \"bogus\"]\n  egressGroups:\n  - nodeSelector: {matchLabels: {gw: \"1\"}}\n    egressIP: 300.1.1.1\n";
        let converted = convert_manifests(yaml).expect("convert");
        let spec = policy_spec("p", 4, &converted[0].policy.spec);
        assert_eq!(spec.generation, 4);
        assert_eq!(spec.destinations, vec!["10.9.0.0/16".parse::<IpNet>().expect("cidr")]);
        assert_eq!(spec.malformed.len(), 2, "{:?}", spec.malformed);
        assert!(spec.malformed[0].contains("destinationCIDRs[1] \"bogus\""), "{:?}", spec.malformed);
        assert!(spec.malformed[1].contains("egressGroups[0].egressIP \"300.1.1.1\""), "{:?}", spec.malformed);
        assert_eq!(spec.groups[0].egress_ip, None);
        assert_eq!(spec.selectors[0].pods, Some(Selector::labels(&[("app", "a")])));
    }
}

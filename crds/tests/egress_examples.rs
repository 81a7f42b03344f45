//! The sample manifests in docs/examples/egress/ are read unchanged, converted field by field as documented, and the
//! native sample passes the generated CRD's openAPIV3Schema the way an apiserver with strict field validation would
//! check it (structure, types, formats, bounds, unknown fields, and the CEL rules), while broken copies fail.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use causeway_crds::egress::compat::{convert_manifests, Converted, SourceKind, CONVERTED_FROM_ANNOTATION};
use causeway_crds::egress::{
    AzAffinity, EgressGatewayPolicy, EgressGroup, EgressSelector, LabelSelector, LabelSelectorRequirement,
    SelectorOperator,
};
use kube::CustomResourceExt;
use serde_json::{json, Value};

fn example(name: &str) -> Result<String> {
    let path = format!("{}/../docs/examples/egress/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).with_context(|| format!("read {path}"))
}

fn convert_one(name: &str) -> Result<Converted> {
    let mut all = convert_manifests(&example(name)?).with_context(|| format!("convert {name}"))?;
    anyhow::ensure!(all.len() == 1, "{name}: expected one document, got {}", all.len());
    Ok(all.remove(0))
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        match_expressions: vec![],
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn native_sample_is_read_as_written() -> Result<()> {
    let c = convert_one("native.yaml")?;
    assert_eq!(c.source, SourceKind::Native);
    let p = &c.policy;
    assert_eq!(p.metadata.name.as_deref(), Some("billing-to-legacy-db"));
    assert_eq!(p.metadata.labels.as_ref().and_then(|l| l.get("team")).map(String::as_str), Some("payments"));
    assert!(p.metadata.annotations.is_none(), "native objects get no converted-from annotation");
    let s = &p.spec;
    assert_eq!(s.selectors.len(), 2);
    assert_eq!(s.selectors[0].pod_selector, Some(labels(&[("app", "billing")])));
    assert_eq!(s.selectors[0].namespace_selector, Some(labels(&[("team", "payments")])));
    assert_eq!(s.selectors[0].node_selector, None);
    assert_eq!(
        s.selectors[1].pod_selector,
        Some(LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: SelectorOperator::In,
                values: strings(&["batch", "reports"]),
            }],
        })
    );
    assert_eq!(s.selectors[1].node_selector, Some(labels(&[("pool", "workers")])));
    assert_eq!(s.destination_cidrs, strings(&["203.0.113.0/24", "2001:db8:100::/48"]));
    assert_eq!(s.excluded_cidrs, strings(&["203.0.113.128/25"]));
    assert_eq!(s.az_affinity, AzAffinity::LocalOnlyFirst);
    assert_eq!(
        s.egress_groups,
        vec![
            EgressGroup {
                node_selector: labels(&[("egress-gw", "true"), ("topology.kubernetes.io/zone", "eu-1a")]),
                egress_ip: Some("192.0.2.10".into()),
                interface: None,
                max_gateway_nodes: Some(2),
            },
            EgressGroup {
                node_selector: labels(&[("egress-gw", "true"), ("topology.kubernetes.io/zone", "eu-1b")]),
                egress_ip: None,
                interface: Some("eth1".into()),
                max_gateway_nodes: None,
            },
        ]
    );
    Ok(())
}

#[test]
fn cilium_single_gateway_sample_converts() -> Result<()> {
    let c = convert_one("cilium-single.yaml")?;
    assert_eq!(c.source, SourceKind::Cilium);
    let p = &c.policy;
    assert_eq!(p.metadata.name.as_deref(), Some("mediabot-egress"));
    assert_eq!(
        p.metadata.annotations.as_ref().and_then(|a| a.get(CONVERTED_FROM_ANNOTATION)).map(String::as_str),
        Some("cilium.io/v2/CiliumEgressGatewayPolicy")
    );
    let s = &p.spec;
    assert_eq!(
        s.selectors,
        vec![EgressSelector {
            pod_selector: Some(labels(&[
                ("class", "mediabot"),
                ("io.kubernetes.pod.namespace", "default"),
                ("org", "empire")
            ])),
            namespace_selector: None,
            node_selector: Some(labels(&[("node.kubernetes.io/name", "node1")])),
        }]
    );
    assert_eq!(s.destination_cidrs, strings(&["0.0.0.0/0", "::/0"]));
    assert_eq!(s.excluded_cidrs, strings(&["192.168.0.0/16"]));
    assert_eq!(s.az_affinity, AzAffinity::Disabled);
    assert_eq!(
        s.egress_groups,
        vec![EgressGroup {
            node_selector: labels(&[("node.kubernetes.io/name", "node2")]),
            egress_ip: Some("10.168.60.100".into()),
            interface: None,
            max_gateway_nodes: Some(1),
        }]
    );
    Ok(())
}

#[test]
fn cilium_gateway_list_sample_converts_to_one_group_per_entry() -> Result<()> {
    let c = convert_one("cilium-multi.yaml")?;
    assert_eq!(c.source, SourceKind::Cilium);
    let s = &c.policy.spec;
    assert_eq!(s.selectors.len(), 1);
    assert_eq!(s.selectors[0].pod_selector, None);
    assert_eq!(s.selectors[0].namespace_selector, Some(labels(&[("kubernetes.io/metadata.name", "crawler")])));
    assert_eq!(s.destination_cidrs, strings(&["198.51.100.0/24"]));
    assert!(s.excluded_cidrs.is_empty());
    assert_eq!(s.egress_groups.len(), 2);
    assert_eq!(s.egress_groups[0].node_selector, labels(&[("egress-node", "a")]));
    assert_eq!(s.egress_groups[0].interface.as_deref(), Some("enp0s8"));
    assert_eq!(s.egress_groups[0].egress_ip, None);
    assert_eq!(
        s.egress_groups[1].node_selector.match_expressions,
        vec![LabelSelectorRequirement {
            key: "egress-node".into(),
            operator: SelectorOperator::In,
            values: strings(&["b", "c"])
        }]
    );
    assert_eq!((s.egress_groups[1].egress_ip.as_ref(), s.egress_groups[1].interface.as_ref()), (None, None));
    assert!(s.egress_groups.iter().all(|g| g.max_gateway_nodes == Some(1)));
    Ok(())
}

#[test]
fn isovalent_sample_converts() -> Result<()> {
    let c = convert_one("isovalent.yaml")?;
    assert_eq!(c.source, SourceKind::Isovalent);
    let p = &c.policy;
    let ann = p.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann.get("owner").map(String::as_str), Some("platform"), "user annotations are kept");
    assert_eq!(
        ann.get(CONVERTED_FROM_ANNOTATION).map(String::as_str),
        Some("isovalent.com/v1/IsovalentEgressGatewayPolicy")
    );
    let s = &p.spec;
    assert_eq!(
        s.selectors,
        vec![EgressSelector {
            pod_selector: Some(labels(&[("app", "partner-sync")])),
            namespace_selector: Some(labels(&[("kubernetes.io/metadata.name", "integrations")])),
            node_selector: None,
        }]
    );
    assert_eq!(s.destination_cidrs, strings(&["198.51.100.0/24"]));
    assert_eq!(s.excluded_cidrs, strings(&["198.51.100.64/26"]));
    assert_eq!(s.az_affinity, AzAffinity::LocalPriority);
    assert_eq!(
        s.egress_groups,
        vec![EgressGroup {
            node_selector: labels(&[("egress-gw", "true")]),
            egress_ip: Some("192.0.2.20".into()),
            interface: None,
            max_gateway_nodes: Some(2),
        }]
    );
    Ok(())
}

#[test]
fn egress_gateway_policy_crd_shape() {
    let crd = EgressGatewayPolicy::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("egressgatewaypolicies.causeway.io"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names, Some(vec!["egp".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let columns: Vec<(&str, &str)> =
        v.additional_printer_columns.iter().flatten().map(|c| (c.name.as_str(), c.json_path.as_str())).collect();
    for expected in [
        ("Active", ".status.groupStatuses[*].activeGatewayIPs"),
        ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(columns.contains(&expected), "{expected:?} not in {columns:?}");
    }
}

// ---- schema validation -------------------------------------------------------------------------------------------

fn sample_object(name: &str) -> Result<Value> {
    let doc: Value = serde_yaml::from_str(&example(name)?)?;
    Ok(doc)
}

/// Structural errors plus the CEL rules, with the validator shared by every sample test (tests/common).
fn validation_errors(object: &Value) -> Result<Vec<String>> {
    Ok(common::validation_errors(&common::crd_schema(&EgressGatewayPolicy::crd())?, object))
}

#[test]
fn native_sample_passes_the_generated_schema() -> Result<()> {
    let obj = sample_object("native.yaml")?;
    let errors = validation_errors(&obj)?;
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

#[test]
fn converted_samples_pass_the_generated_schema() -> Result<()> {
    for name in ["cilium-single.yaml", "cilium-multi.yaml", "isovalent.yaml"] {
        let obj = serde_json::to_value(&convert_one(name)?.policy)?;
        let errors = validation_errors(&obj)?;
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    Ok(())
}

/// Each mutation of the native sample must be rejected, and with an error that names the problem.
#[test]
fn broken_copies_of_the_native_sample_fail_validation() -> Result<()> {
    let base = sample_object("native.yaml")?;
    type Mutation = fn(&mut Value);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "misspelt field",
            |o| o["spec"]["destinationCidrs"] = json!(["10.0.0.0/8"]),
            "destinationCidrs: unknown field",
        ),
        ("unknown group field", |o| o["spec"]["egressGroups"][0]["egressIPs"] = json!(["192.0.2.1"]), "unknown field"),
        ("no destinations", |o| o["spec"]["destinationCIDRs"] = json!([]), "minItems"),
        (
            "destinations missing",
            |o| {
                o["spec"].as_object_mut().map(|s| s.remove("destinationCIDRs"));
            },
            "missing required field destinationCIDRs",
        ),
        ("bad affinity", |o| o["spec"]["azAffinity"] = json!("nearest"), "is not one of"),
        ("zero gateways", |o| o["spec"]["egressGroups"][0]["maxGatewayNodes"] = json!(0), "out of bounds"),
        ("string count", |o| o["spec"]["egressGroups"][0]["maxGatewayNodes"] = json!("2"), "expected integer"),
        (
            "bad operator",
            |o| o["spec"]["selectors"][1]["podSelector"]["matchExpressions"][0]["operator"] = json!("Like"),
            "is not one of",
        ),
        (
            "long interface",
            |o| o["spec"]["egressGroups"][1]["interface"] = json!("averyveryverylongname0"),
            "out of bounds",
        ),
        (
            "both egressIP and interface",
            |o| o["spec"]["egressGroups"][0]["interface"] = json!("eth1"),
            "mutually exclusive",
        ),
        (
            "not a CIDR",
            |o| o["spec"]["destinationCIDRs"][0] = json!("203.0.113.0/33"),
            "destinationCIDR must be a CIDR",
        ),
        ("excluded not a CIDR", |o| o["spec"]["excludedCIDRs"][0] = json!("somewhere"), "excludedCIDR must be a CIDR"),
        (
            "not an IP",
            |o| o["spec"]["egressGroups"][0]["egressIP"] = json!("192.0.2.300"),
            "egressIP must be an IPv4 or IPv6",
        ),
        (
            "node selector alone",
            |o| o["spec"]["selectors"][0] = json!({"nodeSelector": {"matchLabels": {"a": "b"}}}),
            "needs a podSelector or a namespaceSelector",
        ),
        (
            "In without values",
            |o| o["spec"]["selectors"][1]["podSelector"]["matchExpressions"][0]["values"] = json!([]),
            "need at least one value",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut obj = base.clone();
        mutate(&mut obj);
        let errors = validation_errors(&obj)?;
        assert!(!errors.is_empty(), "{what}: accepted");
        assert!(errors.iter().any(|e| e.contains(expect)), "{what}: expected {expect:?} in {errors:#?}");
    }
    Ok(())
}

#[test]
fn ipv6_egress_ip_is_accepted() -> Result<()> {
    let mut obj = sample_object("native.yaml")?;
    obj["spec"]["egressGroups"][0]["egressIP"] = json!("2001:db8::10");
    let errors = validation_errors(&obj)?;
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

//! The ExternalWorkload CRD's shape, and the sample in docs/examples/external-workloads/ read unchanged and checked
//! against the generated schema (structure, bounds, patterns, CEL rules), while broken copies fail.

mod common;

use anyhow::{Context, Result};
use causeway_crds::{ExternalWorkload, ExternalWorkloadSpec};
use kube::{CustomResourceExt, Resource};
use serde_json::{json, Value};

fn sample() -> Result<Value> {
    let path = format!("{}/../docs/examples/external-workloads/db-vm.yaml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(serde_yaml::from_str(&text)?)
}

fn validate(object: &Value) -> Result<Vec<String>> {
    Ok(common::validation_errors(&common::crd_schema(&ExternalWorkload::crd())?, object))
}

#[test]
fn external_workload_crd_shape() {
    let crd = ExternalWorkload::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("externalworkloads.causeway.io"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(ExternalWorkload::api_version(&()), "causeway.io/v1alpha1");
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let columns: Vec<(&str, &str)> =
        v.additional_printer_columns.iter().flatten().map(|c| (c.name.as_str(), c.json_path.as_str())).collect();
    for expected in [("Identity", ".status.id"), ("IP", ".status.ip"), ("Age", ".metadata.creationTimestamp")] {
        assert!(columns.contains(&expected), "{expected:?} not in {columns:?}");
    }
}

#[test]
fn sample_is_read_as_written() -> Result<()> {
    let obj: ExternalWorkload = serde_json::from_value(sample()?)?;
    assert_eq!(obj.metadata.name.as_deref(), Some("db-vm-1"));
    assert_eq!(obj.metadata.labels.as_ref().and_then(|l| l.get("app")).map(String::as_str), Some("postgres"));
    assert_eq!(
        obj.spec,
        ExternalWorkloadSpec {
            ipv4_alloc_cidr: Some("10.192.1.0/30".into()),
            ipv6_alloc_cidr: Some("fd00:192:1::/120".into())
        }
    );
    assert!(obj.status.is_none());
    Ok(())
}

#[test]
fn sample_passes_the_generated_schema() -> Result<()> {
    let errors = validate(&sample()?)?;
    assert!(errors.is_empty(), "{errors:#?}");
    // A status as clustermesh-apiserver writes it passes too.
    let mut with_status = sample()?;
    with_status["status"] = json!({
        "id": 65540, "ip": "192.0.2.7", "ipv6": "2001:db8::7",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T16:00:00Z",
                        "reason": "Registered", "message": "identity 65540", "observedGeneration": 1}]
    });
    let errors = validate(&with_status)?;
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

#[test]
fn broken_copies_of_the_sample_fail_validation() -> Result<()> {
    let base = sample()?;
    type Mutation = fn(&mut Value);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("misspelt field", |o| o["spec"]["ipv4AllocCidr"] = json!("10.0.0.0/30"), "ipv4AllocCidr: unknown field"),
        ("IPv6 in the IPv4 field", |o| o["spec"]["ipv4AllocCIDR"] = json!("fd00::/64"), "does not match"),
        ("IPv4 in the IPv6 field", |o| o["spec"]["ipv6AllocCIDR"] = json!("10.0.0.0/30"), "does not match"),
        ("prefix too long", |o| o["spec"]["ipv4AllocCIDR"] = json!("10.192.1.0/33"), "must be an IPv4 CIDR"),
        ("octet too large", |o| o["spec"]["ipv4AllocCIDR"] = json!("10.300.1.0/30"), "must be an IPv4 CIDR"),
        ("not a CIDR", |o| o["spec"]["ipv6AllocCIDR"] = json!("fd00:::1::/64"), "must be an IPv6 CIDR"),
        ("string identity", |o| o["status"] = json!({"id": "65540"}), "expected integer"),
        (
            "bad condition status",
            |o| {
                o["status"] = json!({"conditions": [{"type": "Ready", "status": "Yes",
                                       "lastTransitionTime": "2026-11-23T16:00:00Z", "reason": "Registered"}]})
            },
            "does not match",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut obj = base.clone();
        mutate(&mut obj);
        let errors = validate(&obj)?;
        assert!(!errors.is_empty(), "{what}: accepted");
        assert!(errors.iter().any(|e| e.contains(expect)), "{what}: expected {expect:?} in {errors:#?}");
    }
    Ok(())
}

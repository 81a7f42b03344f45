//! The committed CRD YAML must be exactly what the Rust types generate.

use causeway_crds::{all_crds, render_yaml, CausewayIdentity};
use kube::{CustomResourceExt, Resource};

const COMMITTED: &str = "causeway.io_crds.yaml";

#[test]
fn committed_yaml_matches_the_types() {
    let path = format!("{}/{COMMITTED}", env!("CARGO_MANIFEST_DIR"));
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {path}: {e}; run `cargo run -p causeway-crds --bin crdgen > crds/{COMMITTED}`")
    });
    let generated = render_yaml().expect("render CRDs");
    if committed != generated {
        let line = committed.lines().zip(generated.lines()).position(|(a, b)| a != b).map_or_else(
            || "at the end (one is a prefix of the other)".to_string(),
            |i| format!("first difference at line {}", i + 1),
        );
        panic!(
            "crds/{COMMITTED} is out of date with the Rust CRD types ({line}); \
             run `cargo run -p causeway-crds --bin crdgen > crds/{COMMITTED}` and commit the result"
        );
    }
}

#[test]
fn yaml_has_one_document_per_crd() {
    let yaml = render_yaml().expect("render CRDs");
    assert_eq!(yaml.matches("---\n").count(), all_crds().len());
    for crd in all_crds() {
        assert_eq!(crd.spec.group, "causeway.io");
    }
}

#[test]
fn causeway_identity_shape() {
    let crd = CausewayIdentity::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("causewayidentities.causeway.io"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names, Some(vec!["cwid".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let columns: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert!(columns.contains(&"Labels") && columns.contains(&"Age"), "{columns:?}");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    assert_eq!(CausewayIdentity::api_version(&()), "causeway.io/v1alpha1");
}

#[test]
fn identity_object_round_trips_as_json() {
    let obj = CausewayIdentity::new(
        "65537",
        causeway_crds::CausewayIdentitySpec {
            labels: "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;".into(),
            cluster: "east".into(),
        },
    );
    let json = serde_json::to_value(&obj).expect("encode");
    assert_eq!(json["kind"], "CausewayIdentity");
    assert_eq!(json["metadata"]["name"], "65537");
    assert_eq!(json["spec"]["cluster"], "east");
    let back: CausewayIdentity = serde_json::from_value(json).expect("decode");
    assert_eq!(back.spec, obj.spec);
}

//! docs/crd-reference.md must be exactly what the CRD types generate, and must document every field of every CRD.

use anyhow::{Context as _, Result};
use causeway_chart_tests::{crd_reference, repo_root};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{JSONSchemaProps, JSONSchemaPropsOrArray};

const REGENERATE: &str = "cargo run -p causeway-chart-tests --bin crd-reference -- --write";

#[test]
fn committed_reference_matches_the_types() -> Result<()> {
    let path = repo_root().join("docs/crd-reference.md");
    let committed =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}; run `{REGENERATE}`", path.display()))?;
    let generated = crd_reference::render();
    if committed != generated {
        let line = committed.lines().zip(generated.lines()).position(|(a, b)| a != b).map_or_else(
            || "at the end (one is a prefix of the other)".to_string(),
            |i| format!("first difference at line {}", i + 1),
        );
        panic!("docs/crd-reference.md is out of date with the CRD types ({line}); run `{REGENERATE}` and commit it");
    }
    Ok(())
}

fn paths(prefix: &str, s: &JSONSchemaProps, out: &mut Vec<String>) {
    out.push(prefix.to_string());
    for (name, child) in s.properties.iter().flatten() {
        paths(&format!("{prefix}.{name}"), child, out);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items {
        paths(&format!("{prefix}[]"), items, out);
    }
}

#[test]
fn every_field_and_rule_is_documented() {
    let doc = crd_reference::render();
    for crd in causeway_crds::all_crds() {
        assert!(doc.contains(&format!("## {}\n", crd.spec.names.kind)), "{}", crd.spec.names.kind);
        for v in &crd.spec.versions {
            assert!(doc.contains(&format!("`{}/{}`", crd.spec.group, v.name)));
            let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
            let mut all = Vec::new();
            for key in ["spec", "status"] {
                if let Some(p) = schema.properties.as_ref().and_then(|p| p.get(key)) {
                    paths(key, p, &mut all);
                }
            }
            assert!(all.len() > 2, "{}: the walk found fields", crd.spec.names.kind);
            for p in all {
                assert!(
                    doc.contains(&format!("| `{p}` |")),
                    "{}: field {p} is not in the reference",
                    crd.spec.names.kind
                );
            }
        }
    }
}

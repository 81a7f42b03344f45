//! Validation of a sample object against a generated CRD schema, the way an apiserver with strict field validation
//! checks it: structure, types, bounds, patterns, unknown fields, then the CEL rules (`x-kubernetes-validations`).
//! Shared by every sample test (egress_examples.rs, external_workload_examples.rs).

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// The first version's openAPIV3Schema of `crd`, as JSON.
pub fn crd_schema(crd: &CustomResourceDefinition) -> Result<Value> {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .context("CRD has an openAPIV3Schema")?;
    Ok(serde_json::to_value(schema)?)
}

/// Structural validation as the apiserver does it with `kubectl apply --validate=strict`: unknown fields are errors.
pub fn structural_errors(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        out.push(format!("{path}: expected {ty}, got {value}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            out.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(req) = req.as_str() {
                    if !map.contains_key(req) {
                        out.push(format!("{path}: missing required field {req}"));
                    }
                }
            }
            for (k, v) in map {
                let child = format!("{path}.{k}");
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    structural_errors(s, v, &child, out);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                    structural_errors(s, v, &child, out);
                } else if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    // Handled by the apiserver itself, not the CRD schema.
                } else {
                    out.push(format!("{child}: unknown field"));
                }
            }
        }
        Value::Array(items) => {
            if bound("minItems").is_some_and(|m| (items.len() as f64) < m) {
                out.push(format!("{path}: fewer than minItems"));
            }
            if bound("maxItems").is_some_and(|m| (items.len() as f64) > m) {
                out.push(format!("{path}: more than maxItems"));
            }
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    structural_errors(s, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as f64;
            if bound("minLength").is_some_and(|m| len < m) || bound("maxLength").is_some_and(|m| len > m) {
                out.push(format!("{path}: length {len} out of bounds"));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if re.is_match(s) => {}
                    Ok(_) => out.push(format!("{path}: {s:?} does not match {p}")),
                    Err(e) => out.push(format!("{path}: bad pattern {p}: {e}")),
                }
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or(f64::NAN);
            if bound("minimum").is_some_and(|m| n < m) || bound("maximum").is_some_and(|m| n > m) {
                out.push(format!("{path}: {n} out of bounds"));
            }
        }
        _ => {}
    }
}

/// Structural errors plus the CEL rules (`x-kubernetes-validations`), evaluated with kube's CEL validator.
pub fn validation_errors(schema: &Value, object: &Value) -> Vec<String> {
    let mut out = Vec::new();
    structural_errors(schema, object, "", &mut out);
    if out.is_empty() {
        if let Err(errors) = kube::core::cel::Validator::new().validate(schema, object, None) {
            out.push(format!("CEL: {errors}"));
        }
    }
    out
}

//! Renders `docs/crd-reference.md` from the CRD types in `causeway-crds` (the same source as
//! `crds/causeway.io_crds.yaml`): one section per CRD with its names, printer columns, every field of the schema
//! (type, constraints, description) and the CEL validation rules. `cargo run -p causeway-chart-tests --bin
//! crd-reference > docs/crd-reference.md` regenerates it; a test fails when the committed file differs.

use std::fmt::Write as _;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};

/// The whole reference document.
pub fn render() -> String {
    let crds = causeway_crds::all_crds();
    let mut out = String::new();
    out.push_str("# CRD reference\n\n");
    out.push_str(
        "<!-- Generated from the Rust types in crds/src by `cargo run -p causeway-chart-tests --bin crd-reference > \
         docs/crd-reference.md`. Do not edit by hand: a test fails when this file differs from the types. -->\n\n",
    );
    out.push_str(
        "Every Causeway CRD is in the API group `causeway.io`. The YAML that installs them is \
         `crds/causeway.io_crds.yaml` (also in the chart's `crds/` directory).\n\n",
    );
    for crd in &crds {
        let _ = writeln!(out, "- [{}](#{})", crd.spec.names.kind, crd.spec.names.kind.to_lowercase());
    }
    out.push('\n');
    for crd in &crds {
        render_crd(&mut out, crd);
    }
    out
}

fn render_crd(out: &mut String, crd: &CustomResourceDefinition) {
    let names = &crd.spec.names;
    let _ = writeln!(out, "## {}\n", names.kind);
    for version in &crd.spec.versions {
        let schema = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
        if let Some(desc) = schema.and_then(|s| s.description.as_deref()) {
            let _ = writeln!(out, "{}\n", one_paragraph(desc));
        }
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| apiVersion | `{}/{}` |", crd.spec.group, version.name);
        let _ = writeln!(out, "| scope | {} |", crd.spec.scope);
        let _ = writeln!(out, "| plural | `{}` |", names.plural);
        if let Some(short) = names.short_names.as_ref().filter(|s| !s.is_empty()) {
            let list: Vec<String> = short.iter().map(|s| format!("`{s}`")).collect();
            let _ = writeln!(out, "| short names | {} |", list.join(", "));
        }
        if let Some(cats) = names.categories.as_ref().filter(|s| !s.is_empty()) {
            let list: Vec<String> = cats.iter().map(|s| format!("`{s}`")).collect();
            let _ = writeln!(out, "| categories | {} |", list.join(", "));
        }
        let status = version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some();
        let _ = writeln!(out, "| status subresource | {} |", if status { "yes" } else { "no" });
        out.push('\n');

        if let Some(columns) = version.additional_printer_columns.as_ref().filter(|c| !c.is_empty()) {
            let _ = writeln!(out, "`kubectl get` columns:\n\n| column | type | from | |\n|---|---|---|---|");
            for c in columns {
                let wide = if c.priority.unwrap_or(0) > 0 { "`-o wide` only" } else { "" };
                let _ = writeln!(out, "| {} | {} | `{}` | {} |", c.name, c.type_, c.json_path, wide);
            }
            out.push('\n');
        }

        if let Some(schema) = schema {
            let _ = writeln!(out, "### Fields\n");
            let _ = writeln!(out, "| field | type | required | constraints | description |\n|---|---|---|---|---|");
            let mut rules = Vec::new();
            for key in ["spec", "status"] {
                if let Some(props) = schema.properties.as_ref().and_then(|p| p.get(key)) {
                    let required = schema.required.as_ref().is_some_and(|r| r.iter().any(|x| x == key));
                    walk(out, &mut rules, key, props, required);
                }
            }
            out.push('\n');
            if !rules.is_empty() {
                let _ = writeln!(out, "### Validation rules\n");
                let _ = writeln!(out, "Checked by the API server (CEL) when an object is created or updated:\n");
                let _ = writeln!(out, "| on | rule | message |\n|---|---|---|");
                for (path, rule, message) in rules {
                    let _ = writeln!(out, "| `{path}` | `{}` | {} |", cell(&rule), cell(&message));
                }
                out.push('\n');
            }
        }
    }
}

/// Writes one row for `path` and recurses into object properties and array items.
fn walk(out: &mut String, rules: &mut Vec<(String, String, String)>, path: &str, s: &JSONSchemaProps, required: bool) {
    let _ = writeln!(
        out,
        "| `{path}` | {} | {} | {} | {} |",
        type_of(s),
        if required { "yes" } else { "" },
        cell(&constraints(s)),
        cell(&s.description.as_deref().map(one_paragraph).unwrap_or_default()),
    );
    for v in s.x_kubernetes_validations.iter().flatten() {
        rules.push((path.to_string(), v.rule.clone(), v.message.clone().unwrap_or_default()));
    }
    if let Some(props) = &s.properties {
        for (name, child) in props {
            let req = s.required.as_ref().is_some_and(|r| r.iter().any(|x| x == name));
            walk(out, rules, &format!("{path}.{name}"), child, req);
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items {
        walk(out, rules, &format!("{path}[]"), items, false);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(
        values,
    )) = &s.additional_properties
    {
        walk(out, rules, &format!("{path}.<key>"), values, false);
    }
}

fn type_of(s: &JSONSchemaProps) -> String {
    let base = match s.type_.as_deref() {
        Some("array") => match &s.items {
            Some(JSONSchemaPropsOrArray::Schema(items)) => format!("array of {}", type_of(items)),
            _ => "array".to_string(),
        },
        Some("object") if s.additional_properties.is_some() && s.properties.is_none() => "map".to_string(),
        Some(t) => t.to_string(),
        None if s.x_kubernetes_int_or_string == Some(true) => "int or string".to_string(),
        None if s.any_of.is_some() || s.one_of.is_some() => "one of several shapes".to_string(),
        None => "any".to_string(),
    };
    if s.nullable == Some(true) {
        format!("{base}, nullable")
    } else {
        base
    }
}

fn constraints(s: &JSONSchemaProps) -> String {
    let mut c = Vec::new();
    if let Some(f) = &s.format {
        c.push(format!("format `{f}`"));
    }
    if let Some(e) = &s.enum_ {
        let vals: Vec<String> = e.iter().map(|v| format!("`{}`", v.0)).collect();
        c.push(format!("one of {}", vals.join(", ")));
    }
    if let Some(d) = &s.default {
        c.push(format!("default `{}`", d.0));
    }
    if let Some(m) = s.minimum {
        c.push(format!("≥ {m}"));
    }
    if let Some(m) = s.maximum {
        c.push(format!("≤ {m}"));
    }
    if let Some(m) = s.min_length {
        c.push(format!("length ≥ {m}"));
    }
    if let Some(m) = s.max_length {
        c.push(format!("length ≤ {m}"));
    }
    if let Some(m) = s.min_items {
        c.push(format!("items ≥ {m}"));
    }
    if let Some(m) = s.max_items {
        c.push(format!("items ≤ {m}"));
    }
    if let Some(p) = &s.pattern {
        c.push(format!("pattern `{p}`"));
    }
    if s.x_kubernetes_list_type.as_deref() == Some("set") {
        c.push("unique items".to_string());
    }
    c.join("; ")
}

/// Joins hard-wrapped doc comments into one paragraph, keeping blank-line breaks as `<br>` in tables.
fn one_paragraph(text: &str) -> String {
    text.split("\n\n").map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join(" ")
}

/// Escapes a table cell (pipes) and keeps it on one line.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

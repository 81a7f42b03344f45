//! Reads egress policy manifests as users already have them and turns them into [`EgressGatewayPolicy`] objects:
//!
//! - `causeway.io/v1alpha1 EgressGatewayPolicy` (native, taken as is);
//! - `isovalent.com/v1 IsovalentEgressGatewayPolicy` (same spec shape);
//! - `cilium.io/v2 CiliumEgressGatewayPolicy`: `egressGateway` becomes one group, and each entry of
//!   `egressGateways` one group, each with `maxGatewayNodes: 1` because Cilium uses a single node per entry (the
//!   first by name; Causeway picks the first healthy one by its stable order instead).
//!
//! Every field is checked against the list of fields the source kind has and Causeway understands, so a field that
//! would change the meaning of the policy (for example Isovalent's egress IP allocation from `egressCIDRs`) is an
//! error naming the field and what to do, never silently dropped.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{EgressGatewayPolicy, EgressGatewayPolicySpec, EgressGroup, EgressSelector, LabelSelector};

/// Annotation recording which kind a converted object came from, e.g. `cilium.io/v2/CiliumEgressGatewayPolicy`.
pub const CONVERTED_FROM_ANNOTATION: &str = "causeway.io/converted-from";

/// The manifest kinds this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Native,
    Cilium,
    Isovalent,
}

impl SourceKind {
    fn from_type(api_version: &str, kind: &str) -> Option<SourceKind> {
        match (api_version, kind) {
            ("causeway.io/v1alpha1", "EgressGatewayPolicy") => Some(SourceKind::Native),
            ("cilium.io/v2", "CiliumEgressGatewayPolicy") => Some(SourceKind::Cilium),
            ("isovalent.com/v1", "IsovalentEgressGatewayPolicy") => Some(SourceKind::Isovalent),
            _ => None,
        }
    }

    /// `apiVersion/kind` of the source.
    pub fn type_name(self) -> &'static str {
        match self {
            SourceKind::Native => "causeway.io/v1alpha1/EgressGatewayPolicy",
            SourceKind::Cilium => "cilium.io/v2/CiliumEgressGatewayPolicy",
            SourceKind::Isovalent => "isovalent.com/v1/IsovalentEgressGatewayPolicy",
        }
    }
}

/// One converted manifest document.
#[derive(Debug, Clone)]
pub struct Converted {
    pub source: SourceKind,
    pub policy: EgressGatewayPolicy,
}

/// Why a manifest could not be converted. Each variant names the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {doc}: {api_version}/{kind} is not an egress policy kind Causeway reads (expected causeway.io/v1alpha1 EgressGatewayPolicy, cilium.io/v2 CiliumEgressGatewayPolicy or isovalent.com/v1 IsovalentEgressGatewayPolicy)")]
    UnknownKind { doc: usize, api_version: String, kind: String },
    #[error("{kind} {name:?}: field `{path}` is not supported by Causeway: {hint}")]
    UnsupportedField { kind: &'static str, name: String, path: String, hint: String },
    #[error("{kind} {name:?}: field `{path}` is malformed: {source}")]
    Malformed {
        kind: &'static str,
        name: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind} {name:?}: {message}")]
    Invalid { kind: &'static str, name: String, message: String },
}

/// Converts every document of a YAML stream (documents separated by `---`; empty documents are skipped).
pub fn convert_manifests(yaml: &str) -> Result<Vec<Converted>, ConvertError> {
    let mut out = Vec::new();
    for (doc, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value: Value = serde::Deserialize::deserialize(de).map_err(|source| ConvertError::Yaml { doc, source })?;
        if value.is_null() {
            continue;
        }
        out.push(convert_value(doc, value)?);
    }
    Ok(out)
}

/// Converts one manifest already parsed as JSON.
pub fn convert_value(doc: usize, value: Value) -> Result<Converted, ConvertError> {
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let source = SourceKind::from_type(&api_version, &kind).ok_or(ConvertError::UnknownKind {
        doc,
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let kind_name: &'static str = match source {
        SourceKind::Native => "EgressGatewayPolicy",
        SourceKind::Cilium => "CiliumEgressGatewayPolicy",
        SourceKind::Isovalent => "IsovalentEgressGatewayPolicy",
    };
    let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
    let cx = Cx { kind: kind_name, name: name.clone() };
    if name.is_empty() {
        return Err(cx.invalid("metadata.name is required"));
    }
    if value.pointer("/metadata/namespace").is_some() {
        return Err(cx.invalid("egress gateway policies are cluster-scoped: remove metadata.namespace"));
    }
    cx.check_fields(&value, "", &["apiVersion", "kind", "metadata", "spec", "status"], &[])?;
    let spec_value = value.get("spec").cloned().unwrap_or(Value::Null);
    let spec = match source {
        SourceKind::Native | SourceKind::Isovalent => cx.isovalent_spec(&spec_value)?,
        SourceKind::Cilium => cx.cilium_spec(&spec_value)?,
    };

    let mut policy = EgressGatewayPolicy::new(&name, spec);
    let labels: Option<BTreeMap<String, String>> = cx.parse(&value, "/metadata/labels", "metadata.labels")?;
    let mut annotations: BTreeMap<String, String> =
        cx.parse(&value, "/metadata/annotations", "metadata.annotations")?.unwrap_or_default();
    if source != SourceKind::Native {
        annotations.insert(CONVERTED_FROM_ANNOTATION.to_string(), source.type_name().to_string());
    }
    policy.metadata.labels = labels;
    policy.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    Ok(Converted { source, policy })
}

struct Cx {
    kind: &'static str,
    name: String,
}

const SELECTOR_FIELDS: &[&str] = &["podSelector", "namespaceSelector", "nodeSelector"];
const LABEL_SELECTOR_FIELDS: &[&str] = &["matchLabels", "matchExpressions"];
const REQUIREMENT_FIELDS: &[&str] = &["key", "operator", "values"];

impl Cx {
    fn invalid(&self, message: impl Into<String>) -> ConvertError {
        ConvertError::Invalid { kind: self.kind, name: self.name.clone(), message: message.into() }
    }

    /// Fails on any key of `obj` outside `allowed`; `hints` explain known fields Causeway does not take.
    fn check_fields(
        &self,
        obj: &Value,
        path: &str,
        allowed: &[&str],
        hints: &[(&str, &str)],
    ) -> Result<(), ConvertError> {
        let Some(map) = obj.as_object() else {
            if obj.is_null() {
                return Ok(());
            }
            return Err(self.invalid(format!("`{}` must be an object", display_path(path))));
        };
        for key in map.keys() {
            if allowed.contains(&key.as_str()) {
                continue;
            }
            let hint = hints
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, h)| h.to_string())
                .unwrap_or_else(|| format!("{} has no such field; remove it", self.kind));
            return Err(ConvertError::UnsupportedField {
                kind: self.kind,
                name: self.name.clone(),
                path: join(path, key),
                hint,
            });
        }
        Ok(())
    }

    fn parse<T: DeserializeOwned>(&self, root: &Value, pointer: &str, path: &str) -> Result<Option<T>, ConvertError> {
        match root.pointer(pointer) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|source| ConvertError::Malformed {
                kind: self.kind,
                name: self.name.clone(),
                path: path.to_string(),
                source,
            }),
        }
    }

    fn array<'a>(&self, spec: &'a Value, field: &str) -> Result<&'a [Value], ConvertError> {
        match spec.get(field) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(self.invalid(format!("`spec.{field}` must be a list"))),
        }
    }

    fn selectors(&self, spec: &Value) -> Result<Vec<EgressSelector>, ConvertError> {
        let mut out = Vec::new();
        for (i, sel) in self.array(spec, "selectors")?.iter().enumerate() {
            let path = format!("spec.selectors[{i}]");
            self.check_fields(sel, &path, SELECTOR_FIELDS, &[])?;
            for field in SELECTOR_FIELDS {
                let Some(ls) = sel.get(*field) else { continue };
                self.check_label_selector(ls, &join(&path, field))?;
            }
            out.push(self.parse(sel, "", &path)?.unwrap_or_default());
        }
        Ok(out)
    }

    fn check_label_selector(&self, ls: &Value, path: &str) -> Result<(), ConvertError> {
        self.check_fields(ls, path, LABEL_SELECTOR_FIELDS, &[])?;
        if let Some(Value::Array(exprs)) = ls.get("matchExpressions") {
            for (i, e) in exprs.iter().enumerate() {
                self.check_fields(e, &format!("{path}.matchExpressions[{i}]"), REQUIREMENT_FIELDS, &[])?;
            }
        }
        Ok(())
    }

    fn strings(&self, spec: &Value, field: &str) -> Result<Vec<String>, ConvertError> {
        self.parse::<Vec<String>>(spec, &format!("/{field}"), &format!("spec.{field}")).map(Option::unwrap_or_default)
    }

    fn group(
        &self,
        g: &Value,
        path: &str,
        allowed: &[&str],
        hints: &[(&str, &str)],
    ) -> Result<EgressGroup, ConvertError> {
        self.check_fields(g, path, allowed, hints)?;
        if let Some(ls) = g.get("nodeSelector") {
            self.check_label_selector(ls, &join(path, "nodeSelector"))?;
        }
        let node_selector: LabelSelector =
            self.parse(g, "/nodeSelector", &join(path, "nodeSelector"))?.unwrap_or_default();
        // An empty egressIP or interface means "not set" in both anchors (Go omitempty strings).
        let egress_ip: Option<String> =
            self.parse::<String>(g, "/egressIP", &join(path, "egressIP"))?.filter(|s| !s.trim().is_empty());
        let interface: Option<String> =
            self.parse::<String>(g, "/interface", &join(path, "interface"))?.filter(|s| !s.trim().is_empty());
        let max_gateway_nodes: Option<u32> = self.parse(g, "/maxGatewayNodes", &join(path, "maxGatewayNodes"))?;
        Ok(EgressGroup {
            node_selector,
            egress_ip: egress_ip.map(|s| s.trim().to_string()),
            interface,
            max_gateway_nodes,
        })
    }

    /// The Isovalent shape, which is also the native one.
    fn isovalent_spec(&self, spec: &Value) -> Result<EgressGatewayPolicySpec, ConvertError> {
        self.check_fields(
            spec,
            "spec",
            &["selectors", "destinationCIDRs", "excludedCIDRs", "egressGroups", "azAffinity"],
            &[
                (
                    "egressCIDRs",
                    "Causeway does not allocate egress IPs from a CIDR; give each egressGroup an egressIP (or an \
                     interface) that is configured on its gateway nodes",
                ),
                (
                    "egressGateway",
                    "this is the cilium.io/v2 CiliumEgressGatewayPolicy field; use egressGroups, or apply the \
                     manifest as a CiliumEgressGatewayPolicy",
                ),
            ],
        )?;
        let mut groups = Vec::new();
        for (i, g) in self.array(spec, "egressGroups")?.iter().enumerate() {
            groups.push(self.group(
                g,
                &format!("spec.egressGroups[{i}]"),
                &["nodeSelector", "egressIP", "interface", "maxGatewayNodes"],
                &[("egressIPs", "give one egressIP per group; use one group per egress IP")],
            )?);
        }
        Ok(EgressGatewayPolicySpec {
            selectors: self.selectors(spec)?,
            destination_cidrs: self.strings(spec, "destinationCIDRs")?,
            excluded_cidrs: self.strings(spec, "excludedCIDRs")?,
            egress_groups: groups,
            az_affinity: self.parse(spec, "/azAffinity", "spec.azAffinity")?.unwrap_or_default(),
        })
    }

    fn cilium_spec(&self, spec: &Value) -> Result<EgressGatewayPolicySpec, ConvertError> {
        self.check_fields(
            spec,
            "spec",
            &["selectors", "destinationCIDRs", "excludedCIDRs", "egressGateway", "egressGateways"],
            &[
                (
                    "egressGroups",
                    "this is the IsovalentEgressGatewayPolicy field; use egressGateway(s), or apply the manifest \
                     as an IsovalentEgressGatewayPolicy or EgressGatewayPolicy",
                ),
                ("azAffinity", "CiliumEgressGatewayPolicy has no azAffinity; use an EgressGatewayPolicy"),
            ],
        )?;
        let gw_fields: &[&str] = &["nodeSelector", "egressIP", "interface"];
        let gw_hints: &[(&str, &str)] =
            &[("maxGatewayNodes", "CiliumEgressGatewayPolicy gateways have no maxGatewayNodes; use egressGroups")];
        let mut groups = Vec::new();
        if let Some(gw) = spec.get("egressGateway").filter(|v| !v.is_null()) {
            groups.push(self.group(gw, "spec.egressGateway", gw_fields, gw_hints)?);
        }
        let listed = self.array(spec, "egressGateways")?;
        if !groups.is_empty() && !listed.is_empty() {
            return Err(self.invalid("set either spec.egressGateway or spec.egressGateways, not both"));
        }
        for (i, gw) in listed.iter().enumerate() {
            groups.push(self.group(gw, &format!("spec.egressGateways[{i}]"), gw_fields, gw_hints)?);
        }
        for g in &mut groups {
            // Cilium sends a policy's traffic through one node per gateway entry.
            g.max_gateway_nodes = Some(1);
        }
        Ok(EgressGatewayPolicySpec {
            selectors: self.selectors(spec)?,
            destination_cidrs: self.strings(spec, "destinationCIDRs")?,
            excluded_cidrs: self.strings(spec, "excludedCIDRs")?,
            egress_groups: groups,
            az_affinity: Default::default(),
        })
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(document)"
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Result<Converted, ConvertError> {
        let mut all = convert_manifests(yaml)?;
        assert_eq!(all.len(), 1);
        Ok(all.remove(0))
    }

    #[test]
    fn cilium_single_gateway_becomes_one_group_of_one() {
        let c = one(
            "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: p}\nspec:\n  selectors:\n  - podSelector: {matchLabels: {app: a}}\n  destinationCIDRs: [\"10.9.0.0/16\"]\n  egressGateway:\n    nodeSelector: {matchLabels: {gw: \"1\"}}\n    interface: eth1\n",
        )
        .expect("convert");
        assert_eq!(c.source, SourceKind::Cilium);
        let g = &c.policy.spec.egress_groups;
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].interface.as_deref(), Some("eth1"));
        assert_eq!(g[0].egress_ip, None);
        assert_eq!(g[0].max_gateway_nodes, Some(1));
        assert_eq!(
            c.policy.metadata.annotations.as_ref().and_then(|a| a.get(CONVERTED_FROM_ANNOTATION)).map(String::as_str),
            Some("cilium.io/v2/CiliumEgressGatewayPolicy")
        );
    }

    #[test]
    fn cilium_both_gateway_fields_is_an_error() {
        let err = one("apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: p}\nspec:\n  destinationCIDRs: [\"10.9.0.0/16\"]\n  egressGateway: {nodeSelector: {}}\n  egressGateways: [{nodeSelector: {}}]\n")
            .expect_err("both");
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn unknown_and_known_unsupported_fields_are_named() {
        let err = one("apiVersion: isovalent.com/v1\nkind: IsovalentEgressGatewayPolicy\nmetadata: {name: iso}\nspec:\n  destinationCIDRs: [\"10.9.0.0/16\"]\n  egressCIDRs: [\"192.0.2.0/28\"]\n")
            .expect_err("egressCIDRs");
        let msg = err.to_string();
        assert!(msg.contains("`spec.egressCIDRs`") && msg.contains("egressIP"), "{msg}");
        assert!(msg.contains("\"iso\""), "names the object: {msg}");

        let err = one("apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: p}\nspec:\n  destinationCIDRs: [\"10.9.0.0/16\"]\n  egressGateway: {nodeSelector: {matchLabelz: {a: b}}}\n")
            .expect_err("typo");
        assert!(err.to_string().contains("`spec.egressGateway.nodeSelector.matchLabelz`"), "{err}");

        let err = one("apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: p}\nspec:\n  destinationCIDRs: [\"10.9.0.0/16\"]\n  azAffinity: localOnly\n")
            .expect_err("azAffinity on cilium");
        assert!(err.to_string().contains("`spec.azAffinity`"), "{err}");
    }

    #[test]
    fn wrong_types_and_kinds_are_errors_not_panics() {
        assert!(matches!(
            one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
            Err(ConvertError::UnknownKind { .. })
        ));
        assert!(matches!(
            one("apiVersion: isovalent.com/v1\nkind: IsovalentEgressGatewayPolicy\nmetadata: {name: x}\nspec:\n  egressGroups: [{maxGatewayNodes: many}]\n"),
            Err(ConvertError::Malformed { .. })
        ));
        assert!(matches!(
            one(
                "apiVersion: isovalent.com/v1\nkind: IsovalentEgressGatewayPolicy\nmetadata: {name: x}\nspec: [1, 2]\n"
            ),
            Err(ConvertError::Invalid { .. })
        ));
        assert!(matches!(
            one("apiVersion: isovalent.com/v1\nkind: IsovalentEgressGatewayPolicy\nmetadata: {name: x, namespace: default}\nspec: {}\n"),
            Err(ConvertError::Invalid { .. })
        ));
        assert!(convert_manifests(": : :\n- [").is_err());
    }
}

//! Which resources the server serves: the built-in set plus whatever CRDs have been created.

use std::collections::BTreeMap;

use serde_json::Value;

/// Identifies a resource's storage, independent of the version it is served at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub group: String,
    pub plural: String,
}

#[derive(Debug, Clone)]
pub struct ResourceInfo {
    pub group: String,
    /// Served versions; the first one is used for storage (no conversion happens between versions).
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub status_subresource: bool,
    /// Custom resources (from a CRD): `metadata.generation` tracks spec changes and, with a status
    /// subresource, `status` is dropped on create.
    pub custom: bool,
    /// `metadata.generation` is set to 1 on create and bumped when anything outside metadata/status changes.
    pub tracks_generation: bool,
}

impl ResourceInfo {
    pub fn key(&self) -> ResourceKey {
        ResourceKey { group: self.group.clone(), plural: self.plural.clone() }
    }

    pub fn api_version(&self, version: &str) -> String {
        group_version(&self.group, version)
    }

    pub fn storage_version(&self) -> &str {
        self.versions.first().map(String::as_str).unwrap_or("v1")
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }

    pub fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

pub fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

#[derive(Debug, Clone)]
pub struct Registry {
    resources: BTreeMap<ResourceKey, ResourceInfo>,
}

struct Builtin {
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    generation: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        status: false,
        generation: false,
    },
    Builtin {
        group: "discovery.k8s.io",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "apiextensions.k8s.io",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        status: true,
        generation: true,
    },
    Builtin {
        group: "coordination.k8s.io",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "events.k8s.io",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        status: false,
        generation: false,
    },
];

impl Registry {
    pub fn builtin() -> Self {
        let resources = BUILTINS
            .iter()
            .map(|b| {
                let info = ResourceInfo {
                    group: b.group.to_string(),
                    versions: vec!["v1".to_string()],
                    plural: b.plural.to_string(),
                    singular: b.singular.to_string(),
                    kind: b.kind.to_string(),
                    namespaced: b.namespaced,
                    short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                    status_subresource: b.status,
                    custom: false,
                    tracks_generation: b.generation,
                };
                (info.key(), info)
            })
            .collect();
        Self { resources }
    }

    /// The resource served at `/{group}/{version}/{plural}`, if any.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceInfo> {
        let key = ResourceKey { group: group.to_string(), plural: plural.to_string() };
        self.resources.get(&key).filter(|info| info.versions.iter().any(|v| v == version))
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&ResourceInfo> {
        self.resources.get(key)
    }

    /// Groups with their served versions (preferred first), core group ("") included.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for info in self.resources.values() {
            let versions = groups.entry(info.group.clone()).or_default();
            for v in &info.versions {
                if !versions.contains(v) {
                    versions.push(v.clone());
                }
            }
        }
        groups
    }

    pub fn resources_in(&self, group: &str, version: &str) -> Vec<&ResourceInfo> {
        self.resources.values().filter(|i| i.group == group && i.versions.iter().any(|v| v == version)).collect()
    }

    pub fn register(&mut self, info: ResourceInfo) {
        self.resources.insert(info.key(), info);
    }

    pub fn unregister(&mut self, key: &ResourceKey) -> Option<ResourceInfo> {
        match self.resources.get(key) {
            Some(info) if info.custom => self.resources.remove(key),
            _ => None,
        }
    }

    /// Whether `key` may be taken by a CRD: free, or already owned by a CRD.
    pub fn available_for_crd(&self, key: &ResourceKey) -> bool {
        self.resources.get(key).is_none_or(|info| info.custom)
    }
}

/// Reads what a CustomResourceDefinition declares. The error says which field is wrong.
pub fn parse_crd(crd: &Value) -> Result<ResourceInfo, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let str_at = |v: &Value, path: &str| -> Result<String, String> {
        let mut cur = v;
        for part in path.split('.') {
            cur = cur.get(part).ok_or_else(|| format!("spec.{path}: Required value"))?;
        }
        match cur.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(format!("spec.{path}: Invalid value: must be a non-empty string")),
        }
    };
    let group = str_at(spec, "group")?;
    let plural = str_at(spec, "names.plural")?;
    let kind = str_at(spec, "names.kind")?;
    let singular = str_at(spec, "names.singular").unwrap_or_else(|_| kind.to_lowercase());
    let namespaced = match str_at(spec, "scope")?.as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            return Err(format!(
                "spec.scope: Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""
            ))
        }
    };
    let short_names = spec
        .pointer("/names/shortNames")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();

    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions: Invalid value: must have at least one version")?;
    let mut served = Vec::new();
    let mut storage = None;
    let mut status_subresource = false;
    for (i, v) in versions.iter().enumerate() {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("spec.versions[{i}].name: Required value"))?;
        if v.get("served").and_then(Value::as_bool).unwrap_or(true) {
            served.push(name.to_string());
        }
        if v.get("storage").and_then(Value::as_bool).unwrap_or(false) {
            storage = Some(name.to_string());
        }
        if v.pointer("/subresources/status").is_some() {
            status_subresource = true;
        }
    }
    // Storage version first, so that objects are stored under it.
    if let Some(storage) = storage {
        if let Some(pos) = served.iter().position(|v| *v == storage) {
            let v = served.remove(pos);
            served.insert(0, v);
        }
    }
    let expected_name = format!("{plural}.{group}");
    let name = crd.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if name != expected_name {
        return Err(format!(
            "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group ({expected_name:?})"
        ));
    }
    Ok(ResourceInfo {
        group,
        versions: served,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        status_subresource,
        custom: true,
        tracks_generation: true,
    })
}

impl ResourceInfo {
    /// The stored object as served at `version` (objects are stored once; only apiVersion differs).
    pub fn present(&self, obj: &Value, version: &str) -> Value {
        let mut out = obj.clone();
        if let Some(m) = out.as_object_mut() {
            m.insert("apiVersion".into(), Value::String(self.api_version(version)));
            m.insert("kind".into(), Value::String(self.kind.clone()));
        }
        out
    }
}

//! The local cluster's own inputs to the merge: its Services, reduced to what the merge needs (is it global, does it
//! share, which affinity, does it have a ready local backend), and its external workloads (hosts that joined the
//! mesh datapath), which the local node agents must peer with like remote nodes.

use std::collections::BTreeMap;

use crate::core::model::{Affinity, Frontend, IpView, NodeView, ServiceKey};

/// A host of the local cluster that joined the mesh datapath (a Ready `ExternalWorkload` with a WireGuard key), as
/// the kube adapter converted it: a node record (its underlay address, its allocation range as pod CIDR, its key)
/// and the ipcache entry of its mesh address. Both carry the local cluster's name and ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWorkload {
    pub node: NodeView,
    pub ip: IpView,
}

pub const ANNOTATION_GLOBAL: &str = "service.cilium.io/global";
pub const ANNOTATION_SHARED: &str = "service.cilium.io/shared";
pub const ANNOTATION_AFFINITY: &str = "service.cilium.io/affinity";
pub const LEGACY_ANNOTATION_GLOBAL: &str = "io.cilium/global-service";
pub const LEGACY_ANNOTATION_SHARED: &str = "io.cilium/shared-service";
pub const LEGACY_ANNOTATION_AFFINITY: &str = "io.cilium/service-affinity";

/// A local Service as the merge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub key: ServiceKey,
    /// Only a service the local cluster marks global is merged with remote backends.
    pub global: bool,
    /// Whether the local cluster exports its own backends. Does not change the merge (the exporter reads it); kept
    /// so status can show it.
    pub shared: bool,
    pub affinity: Affinity,
    /// Ready local endpoints, counted by the kube adapter from the local EndpointSlices that identity-sync does
    /// not manage. Drives affinity: `local` drops remote backends while this is non-zero.
    pub ready_local_endpoints: u32,
    /// The Service's ClusterIPs (both families) with its ports; empty for a headless Service. Copied into the
    /// merged view as the global service's frontends.
    pub frontends: Vec<Frontend>,
}

/// An annotation value the parser could not use; the service still merges with the default for that annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service}: annotation {annotation}={value:?} is not valid ({expected}); using the default")]
pub struct AnnotationWarning {
    pub service: String,
    pub annotation: &'static str,
    pub value: String,
    pub expected: &'static str,
}

fn lookup<'a>(
    ann: &'a BTreeMap<String, String>,
    key: &'static str,
    legacy: &'static str,
) -> Option<(&'static str, &'a str)> {
    // The current name wins over the legacy alias when both are set.
    ann.get(key).map(|v| (key, v.as_str())).or_else(|| ann.get(legacy).map(|v| (legacy, v.as_str())))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

impl LocalService {
    /// Reads the global-service annotations (current names and legacy aliases). Bad values fall back to the
    /// default and are returned as warnings for the adapter to log or surface; they never stop the merge.
    pub fn from_annotations(
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, String>,
        ready_local_endpoints: u32,
    ) -> (LocalService, Vec<AnnotationWarning>) {
        let key = ServiceKey::new(namespace, name);
        let mut warnings = Vec::new();
        let mut warn = |annotation, value: &str, expected| {
            warnings.push(AnnotationWarning {
                service: key.to_string(),
                annotation,
                value: value.chars().take(64).collect(),
                expected,
            })
        };
        let global = match lookup(annotations, ANNOTATION_GLOBAL, LEGACY_ANNOTATION_GLOBAL) {
            None => false,
            Some((a, v)) => parse_bool(v).unwrap_or_else(|| {
                warn(a, v, "\"true\" or \"false\"");
                false
            }),
        };
        let shared = match lookup(annotations, ANNOTATION_SHARED, LEGACY_ANNOTATION_SHARED) {
            None => global,
            Some((a, v)) => parse_bool(v).map(|b| b && global).unwrap_or_else(|| {
                warn(a, v, "\"true\" or \"false\"");
                global
            }),
        };
        let affinity = match lookup(annotations, ANNOTATION_AFFINITY, LEGACY_ANNOTATION_AFFINITY) {
            None => Affinity::None,
            Some((a, v)) => match v.trim().to_ascii_lowercase().as_str() {
                "local" => Affinity::Local,
                "remote" => Affinity::Remote,
                "none" | "" => Affinity::None,
                _ => {
                    warn(a, v, "\"local\", \"remote\" or \"none\"");
                    Affinity::None
                }
            },
        };
        let key = ServiceKey::new(namespace, name);
        (LocalService { key, global, shared, affinity, ready_local_endpoints, frontends: Vec::new() }, warnings)
    }

    /// Sets the Service's frontends (its ClusterIPs with its ports); [`LocalService::from_annotations`] leaves
    /// them empty.
    pub fn with_frontends(mut self, frontends: Vec<Frontend>) -> Self {
        self.frontends = frontends;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn annotations_and_legacy_aliases() {
        let (s, w) = LocalService::from_annotations("shop", "cart", &ann(&[(ANNOTATION_GLOBAL, "true")]), 0);
        assert!(s.global && s.shared && w.is_empty());
        assert_eq!(s.affinity, Affinity::None);

        let (s, _) = LocalService::from_annotations(
            "shop",
            "cart",
            &ann(&[
                (LEGACY_ANNOTATION_GLOBAL, "true"),
                (LEGACY_ANNOTATION_SHARED, "false"),
                (LEGACY_ANNOTATION_AFFINITY, "local"),
            ]),
            0,
        );
        assert!(s.global && !s.shared);
        assert_eq!(s.affinity, Affinity::Local);

        // The current name wins over the legacy alias.
        let (s, _) = LocalService::from_annotations(
            "shop",
            "cart",
            &ann(&[(ANNOTATION_GLOBAL, "false"), (LEGACY_ANNOTATION_GLOBAL, "true")]),
            0,
        );
        assert!(!s.global && !s.shared);

        let (s, w) = LocalService::from_annotations(
            "shop",
            "cart",
            &ann(&[(ANNOTATION_GLOBAL, "yes"), (ANNOTATION_AFFINITY, "nearest")]),
            0,
        );
        assert!(!s.global);
        assert_eq!(s.affinity, Affinity::None);
        assert_eq!(w.len(), 2);
    }
}

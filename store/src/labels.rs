//! Identity label sets and their store encoding: each label as `source:key=value;`, sorted by key.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// Label key that carries the cluster name in every identity.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// Label key that carries the pod's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of labels derived from namespace labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Source of labels that come from Kubernetes.
pub const SOURCE_K8S: &str = "k8s";

/// Pod label keys that differ between pods of one workload or between its rollouts (a Deployment's
/// `pod-template-hash` changes on every rollout, a StatefulSet names each pod). They say nothing about what a pod
/// is allowed to do, and keeping them would give every rollout (or every replica) its own identity: identities
/// churn, ipcache entries change identity on each rollout, and the allocator fills up. Cilium leaves the same
/// kinds of labels out of identities.
pub const IDENTITY_IRRELEVANT_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
];

/// Whether a pod label takes part in the pod's identity (see [`IDENTITY_IRRELEVANT_POD_LABELS`]).
pub fn is_identity_label(key: &str) -> bool {
    !IDENTITY_IRRELEVANT_POD_LABELS.contains(&key)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("label string {input:?} is malformed: {why}")]
pub struct LabelError {
    pub input: String,
    pub why: &'static str,
}

/// A set of labels, one per key. The map is ordered by key, which gives the store's canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LabelSet(BTreeMap<String, Label>);

impl LabelSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, source: &str, key: &str, value: &str) {
        self.0.insert(
            key.to_string(),
            Label { source: source.to_string(), key: key.to_string(), value: value.to_string() },
        );
    }

    pub fn get(&self, key: &str) -> Option<&Label> {
        self.0.get(key)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.values()
    }

    /// The cluster this identity belongs to, from its cluster label.
    pub fn cluster(&self) -> Option<&str> {
        self.get(CLUSTER_LABEL).map(|l| l.value.as_str())
    }

    /// The identity label set of a pod: its labels, its namespace's labels, its namespace and its cluster.
    pub fn for_pod<'a>(
        cluster: &str,
        namespace: &str,
        pod_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
        namespace_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> LabelSet {
        let mut set = LabelSet::new();
        for (k, v) in pod_labels.into_iter().filter(|(k, _)| is_identity_label(k)) {
            set.insert(SOURCE_K8S, k, v);
        }
        for (k, v) in namespace_labels {
            set.insert(SOURCE_K8S, &format!("{NAMESPACE_LABELS_PREFIX}{k}"), v);
        }
        set.insert(SOURCE_K8S, NAMESPACE_LABEL, namespace);
        set.insert(SOURCE_K8S, CLUSTER_LABEL, cluster);
        set
    }

    /// Parses the store form. Empty segments are ignored; a label without `=` has an empty value.
    pub fn parse(s: &str) -> Result<LabelSet, LabelError> {
        let err = |why| LabelError { input: s.chars().take(200).collect(), why };
        let mut set = LabelSet::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (source, rest) = part.split_once(':').ok_or_else(|| err("a label has no source"))?;
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            if source.is_empty() || key.is_empty() {
                return Err(err("a label has an empty source or key"));
            }
            if set.0.contains_key(key) {
                return Err(err("a key appears twice"));
            }
            set.insert(source, key, value);
        }
        if set.is_empty() {
            return Err(err("no labels"));
        }
        Ok(set)
    }
}

impl fmt::Display for LabelSet {
    /// The store form: `source:key=value;` per label, sorted by key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in self.0.values() {
            write!(f, "{}:{}={};", l.source, l.key, l.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_identity_golden() {
        let pod: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
        let ns: BTreeMap<String, String> = BTreeMap::new();
        let set = LabelSet::for_pod("east", "shop", &pod, &ns);
        assert_eq!(
            set.to_string(),
            "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;"
        );
        assert_eq!(LabelSet::parse(&set.to_string()).unwrap(), set);
        assert_eq!(set.cluster(), Some("east"));
    }

    #[test]
    fn replicas_and_rollouts_of_one_workload_share_an_identity() {
        let pod = |extra: &[(&str, &str)]| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> =
                [("app".to_string(), "cart".to_string()), ("app.kubernetes.io/version".to_string(), "2".to_string())]
                    .into();
            m.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            m
        };
        let ns: BTreeMap<String, String> = BTreeMap::new();
        let plain = LabelSet::for_pod("east", "shop", &pod(&[]), &ns);
        let rollout_a = LabelSet::for_pod("east", "shop", &pod(&[("pod-template-hash", "5d8f7c")]), &ns);
        let rollout_b = LabelSet::for_pod("east", "shop", &pod(&[("pod-template-hash", "77b9f")]), &ns);
        let replica = LabelSet::for_pod(
            "east",
            "shop",
            &pod(&[("statefulset.kubernetes.io/pod-name", "cart-3"), ("controller-revision-hash", "cart-6c")]),
            &ns,
        );
        assert_eq!(rollout_a, plain);
        assert_eq!(rollout_b, plain);
        assert_eq!(replica, plain);
        // What a policy selects on stays.
        assert_eq!(plain.get("app.kubernetes.io/version").map(|l| l.value.as_str()), Some("2"));
        assert!(!is_identity_label("pod-template-hash") && is_identity_label("app"));
    }

    #[test]
    fn namespace_labels_are_prefixed_and_sorted() {
        let pod: BTreeMap<String, String> = [("z".to_string(), "1".to_string())].into();
        let ns: BTreeMap<String, String> = [("team".to_string(), "payments".to_string())].into();
        let s = LabelSet::for_pod("west", "pay", &pod, &ns).to_string();
        assert_eq!(
            s,
            "k8s:io.cilium.k8s.namespace.labels.team=payments;k8s:io.cilium.k8s.policy.cluster=west;\
             k8s:io.kubernetes.pod.namespace=pay;k8s:z=1;"
        );
    }

    #[test]
    fn malformed() {
        for bad in ["", ";;", "noseparator;", ":k=v;", "k8s:=v;", "k8s:a=1;k8s:a=2;"] {
            assert!(LabelSet::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(LabelSet::parse("reserved:host").unwrap().to_string(), "reserved:host=;");
    }
}

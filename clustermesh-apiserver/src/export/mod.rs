//! The sans-IO export core: Kubernetes objects in, store entries out.
//!
//! [`Exporter`] is an index in the linkerd policy-controller style. The adapter feeds it objects
//! (`apply_*` / `delete_*`). It answers with two queues:
//! - [`Exporter::take_identity_requests`]: label sets that need a numeric identity from the allocator, and ones no
//!   pod uses any more. The adapter carries them out and reports IDs back with [`Exporter::identity_resolved`].
//! - [`Exporter::take_changes`]: upserts and deletes of store entries, diffed against what was last handed out.
//!
//! Changes are computed lazily from a set of dirty keys, so a burst of events on one object yields one write, and
//! resolving identities before taking changes means a pod's ipcache entry is written once, with its ID.
//! Every change is scoped: a namespace touches its pods, a slice its service; nothing rescans the whole cluster.
//!
//! Identities are exported for as long as they exist in the allocator, not only while a pod uses them: one restored
//! at start-up ([`Exporter::identities_restored`]) or idle within its GC grace period is still live (a peer may
//! still see traffic from it, and a pod coming back gets the same ID), so it stays in the store until the allocator
//! collects it ([`Exporter::identities_collected`]). This is what Cilium does: the store mirrors the allocator.

pub mod model;
pub mod node;
pub mod service;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use causeway_store::{ClusterInfo, IpCacheEntry, Kind, LabelSet, NamedPort, Node, StoreKey};
use tracing::instrument;

use crate::metrics::Metrics;
use model::{EndpointSliceInput, Labels, NamespaceInput, NodeInput, PodInput, ServiceExportInput, ServiceInput};

/// What the adapter must ask the identity allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityRequest {
    /// The first pod with this label set appeared: allocate (or look up) its ID.
    Acquire(LabelSet),
    /// The last pod with this label set went away.
    Release(LabelSet),
}

/// One store write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert { key: StoreKey, value: String },
    Delete { key: StoreKey },
}

impl Change {
    pub fn key(&self) -> &StoreKey {
        match self {
            Change::Upsert { key, .. } | Change::Delete { key } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

/// Order of claimants on one IP: oldest pod first, then by namespace/name. A pod without a creation time sorts
/// last, so it never displaces a pod whose age is known.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    created: i64,
    pod: PodKey,
}

#[derive(Debug, Clone)]
struct PodState {
    labels: Labels,
    created: i64,
    ips: Vec<IpAddr>,
    host_ip: Option<IpAddr>,
    named_ports: Vec<NamedPort>,
    /// The label set this pod is counted under; `None` while its namespace is unknown.
    identity: Option<LabelSet>,
}

#[derive(Debug, Default)]
struct IdentityState {
    id: Option<u32>,
    users: BTreeSet<PodKey>,
}

type NsName = (String, String);

pub struct Exporter {
    cluster: ClusterInfo,
    metrics: Metrics,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<PodKey, PodState>,
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    identities: HashMap<LabelSet, IdentityState>,
    /// IDs in use by pods.
    ids: HashMap<u32, LabelSet>,
    /// Every ID that exists in the allocator (persisted, not yet collected), used or not: what is exported.
    allocated: BTreeMap<u32, LabelSet>,
    ip_claims: HashMap<IpAddr, BTreeSet<Claim>>,
    nodes: HashMap<String, Node>,
    services: HashMap<NsName, ServiceInput>,
    /// Every MCS ServiceExport, by `(namespace, name)`: the Service of that name is exported even without the
    /// global annotation, and its MCS spec goes under `cilium/state/serviceexports/v1/`.
    service_exports: HashMap<NsName, ServiceExportInput>,
    slices: HashMap<NsName, EndpointSliceInput>,
    slices_by_service: HashMap<NsName, BTreeSet<String>>,
    requests: Vec<IdentityRequest>,
    dirty: BTreeSet<StoreKey>,
    /// Keys whose last write failed: rewritten even if the desired value equals what was handed out.
    force: HashSet<StoreKey>,
    emitted: HashMap<StoreKey, String>,
    /// Number of emitted entries per kind, kept in step with `emitted` for the gauges.
    counts: BTreeMap<Kind, i64>,
}

impl Exporter {
    pub fn new(cluster: ClusterInfo, metrics: Metrics) -> Self {
        Exporter {
            cluster,
            metrics,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            pods_by_ns: HashMap::new(),
            identities: HashMap::new(),
            ids: HashMap::new(),
            allocated: BTreeMap::new(),
            ip_claims: HashMap::new(),
            nodes: HashMap::new(),
            services: HashMap::new(),
            service_exports: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            requests: Vec::new(),
            dirty: BTreeSet::new(),
            force: HashSet::new(),
            emitted: HashMap::new(),
            counts: BTreeMap::new(),
        }
    }

    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    // ---- namespaces ----

    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, namespace = %ns.name))]
    pub fn apply_namespace(&mut self, ns: NamespaceInput) {
        if self.namespaces.get(&ns.name) == Some(&ns.labels) {
            return;
        }
        self.namespaces.insert(ns.name.clone(), ns.labels);
        self.refresh_namespace_pods(&ns.name);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_namespace(&mut self, namespace: &str) {
        if self.namespaces.remove(namespace).is_some() {
            self.refresh_namespace_pods(namespace);
        }
    }

    fn refresh_namespace_pods(&mut self, namespace: &str) {
        let names: Vec<String> = self.pods_by_ns.get(namespace).into_iter().flatten().cloned().collect();
        for name in names {
            self.refresh_pod_identity(&PodKey { namespace: namespace.to_string(), name });
        }
    }

    // ---- pods ----

    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, pod = %format!("{}/{}", pod.namespace, pod.name)))]
    pub fn apply_pod(&mut self, pod: PodInput) {
        let key = PodKey { namespace: pod.namespace.clone(), name: pod.name.clone() };
        let Some(state) = self.pod_state(&pod) else {
            self.delete_pod(&pod.namespace, &pod.name);
            return;
        };
        let old_ips = self.pods.get(&key).map(|p| p.ips.clone()).unwrap_or_default();
        let old_created = self.pods.get(&key).map(|p| p.created);
        let identity = self.pods.get(&key).and_then(|p| p.identity.clone());
        // Claims are keyed by creation time, so a changed one (never in practice) must be re-filed.
        for ip in &old_ips {
            if !state.ips.contains(ip) || old_created != Some(state.created) {
                self.unclaim(*ip, &key, old_created.unwrap_or(state.created));
            }
        }
        for ip in &state.ips {
            if !old_ips.contains(ip) || old_created != Some(state.created) {
                self.claim(*ip, &key, state.created);
            }
            self.dirty.insert(StoreKey::Ip { ip: *ip });
        }
        self.pods_by_ns.entry(key.namespace.clone()).or_default().insert(key.name.clone());
        self.pods.insert(key.clone(), PodState { identity, ..state });
        self.refresh_pod_identity(&key);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let key = PodKey { namespace: namespace.to_string(), name: name.to_string() };
        let Some(state) = self.pods.remove(&key) else { return };
        for ip in &state.ips {
            self.unclaim(*ip, &key, state.created);
        }
        if let Some(set) = self.pods_by_ns.get_mut(namespace) {
            set.remove(name);
            if set.is_empty() {
                self.pods_by_ns.remove(namespace);
            }
        }
        if let Some(labels) = state.identity {
            self.drop_identity_user(&labels, &key);
        }
    }

    /// The parsed pod, or `None` when the pod must not be exported at all.
    fn pod_state(&self, pod: &PodInput) -> Option<PodState> {
        if pod.host_network {
            return None;
        }
        if matches!(pod.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
            return None;
        }
        let mut ips = Vec::new();
        for raw in &pod.pod_ips {
            match raw.parse::<IpAddr>() {
                Ok(ip) if causeway_store::validate::is_workload_ip(&ip) => {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                _ => {
                    self.metrics.error("invalid_object");
                    tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), ip = %raw,
                        "ignoring pod IP that is not a usable IP address");
                }
            }
        }
        if ips.is_empty() {
            return None;
        }
        let host_ip = pod.host_ip.as_deref().filter(|s| !s.is_empty()).and_then(|s| s.parse().ok());
        let mut named_ports: Vec<NamedPort> = pod
            .container_ports
            .iter()
            .filter_map(|p| {
                let name = p.name.clone().filter(|n| !n.is_empty())?;
                Some(NamedPort {
                    name,
                    port: service::port_number(p.port)?,
                    protocol: service::protocol(p.protocol.as_deref())?,
                })
            })
            .collect();
        named_ports.sort();
        named_ports.dedup();
        Some(PodState {
            labels: pod.labels.clone(),
            created: pod.created.unwrap_or(i64::MAX),
            ips,
            host_ip,
            named_ports,
            identity: None,
        })
    }

    fn claim(&mut self, ip: IpAddr, pod: &PodKey, created: i64) {
        let claims = self.ip_claims.entry(ip).or_default();
        if claims.iter().any(|c| &c.pod != pod) {
            self.metrics.ip_conflicts.inc();
            let holder = claims.iter().next().map(|c| format!("{}/{}", c.pod.namespace, c.pod.name));
            tracing::warn!(%ip, pod = %format!("{}/{}", pod.namespace, pod.name), holder = ?holder,
                "two pods claim one IP; the older pod keeps it, the other takes over when it is deleted");
        }
        claims.insert(Claim { created, pod: pod.clone() });
        self.dirty.insert(StoreKey::Ip { ip });
    }

    fn unclaim(&mut self, ip: IpAddr, pod: &PodKey, created: i64) {
        if let Some(claims) = self.ip_claims.get_mut(&ip) {
            claims.remove(&Claim { created, pod: pod.clone() });
            if claims.is_empty() {
                self.ip_claims.remove(&ip);
            }
        }
        self.dirty.insert(StoreKey::Ip { ip });
    }

    /// Recomputes one pod's identity label set and moves it between identities if it changed.
    fn refresh_pod_identity(&mut self, key: &PodKey) {
        let Some(pod) = self.pods.get(key) else { return };
        let wanted = self
            .namespaces
            .get(&key.namespace)
            .map(|ns_labels| LabelSet::for_pod(self.cluster.name.as_str(), &key.namespace, &pod.labels, ns_labels));
        if wanted == pod.identity {
            return;
        }
        let old = pod.identity.clone();
        let ips = pod.ips.clone();
        if let Some(pod) = self.pods.get_mut(key) {
            pod.identity = wanted.clone();
        }
        if let Some(old) = old {
            self.drop_identity_user(&old, key);
        }
        if let Some(new) = wanted {
            let state = self.identities.entry(new.clone()).or_default();
            if state.users.is_empty() {
                self.requests.push(IdentityRequest::Acquire(new.clone()));
            }
            state.users.insert(key.clone());
        }
        for ip in ips {
            self.dirty.insert(StoreKey::Ip { ip });
        }
    }

    fn drop_identity_user(&mut self, labels: &LabelSet, pod: &PodKey) {
        let Some(state) = self.identities.get_mut(labels) else { return };
        state.users.remove(pod);
        if state.users.is_empty() {
            if let Some(id) = state.id {
                self.ids.remove(&id);
                self.dirty.insert(StoreKey::Identity { id });
            }
            self.identities.remove(labels);
            self.requests.push(IdentityRequest::Release(labels.clone()));
        }
    }

    // ---- identities ----

    /// Requests for the allocator, in the order they arose. Process them in order.
    pub fn take_identity_requests(&mut self) -> Vec<IdentityRequest> {
        std::mem::take(&mut self.requests)
    }

    /// Label sets in use that still have no ID (for instance after an allocation error); retry these.
    pub fn pending_identities(&self) -> Vec<LabelSet> {
        self.identities.iter().filter(|(_, s)| s.id.is_none()).map(|(l, _)| l.clone()).collect()
    }

    /// The allocator's answer to an `Acquire`. Answers for label sets no pod uses any more are ignored.
    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, id))]
    pub fn identity_resolved(&mut self, labels: &LabelSet, id: u32) {
        let Some(state) = self.identities.get_mut(labels) else { return };
        if state.id == Some(id) {
            return;
        }
        if !self.cluster.identity_range().contains(id) {
            self.metrics.error("identity_allocation");
            tracing::error!(id, labels = %labels, "allocator returned an identity outside this cluster's range; ignoring it");
            return;
        }
        if let Some(old) = state.id.replace(id) {
            self.ids.remove(&old);
            self.dirty.insert(StoreKey::Identity { id: old });
        }
        let users: Vec<PodKey> = state.users.iter().cloned().collect();
        self.allocated.insert(id, labels.clone());
        if let Some(other) = self.ids.insert(id, labels.clone()) {
            if &other != labels {
                self.metrics.error("identity_allocation");
                tracing::error!(id, labels = %labels, other = %other, "allocator gave one ID to two label sets");
            }
        }
        self.dirty.insert(StoreKey::Identity { id });
        for pod in users {
            if let Some(p) = self.pods.get(&pod) {
                self.dirty.extend(p.ips.iter().map(|ip| StoreKey::Ip { ip: *ip }));
            }
        }
    }

    /// Identities that exist in the allocator although no pod may use them (restored from their persisted records
    /// at start-up): exported until [`Exporter::identities_collected`]. IDs outside this cluster's range are
    /// refused.
    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name))]
    pub fn identities_restored(&mut self, restored: impl IntoIterator<Item = (u32, LabelSet)>) {
        for (id, labels) in restored {
            if !self.cluster.identity_range().contains(id) {
                self.metrics.error("identity_allocation");
                tracing::warn!(id, labels = %labels, "restored identity is outside this cluster's range; not exporting it");
                continue;
            }
            if labels.cluster() != Some(self.cluster.name.as_str()) {
                self.metrics.error("identity_allocation");
                tracing::warn!(id, labels = %labels, "restored identity does not carry this cluster's label; not exporting it");
                continue;
            }
            self.allocated.insert(id, labels);
            self.dirty.insert(StoreKey::Identity { id });
        }
    }

    /// The allocator garbage-collected these identities (idle past the grace period, records deleted): withdraw
    /// them, unless a pod uses one again (then it was not garbage and stays).
    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name))]
    pub fn identities_collected(&mut self, collected: impl IntoIterator<Item = u32>) {
        for id in collected {
            if self.ids.contains_key(&id) {
                tracing::warn!(id, "identity reported collected while pods use it; keeping it exported");
                continue;
            }
            if self.allocated.remove(&id).is_some() {
                self.dirty.insert(StoreKey::Identity { id });
            }
        }
    }

    /// The numeric identity currently assigned to `labels`, if any.
    pub fn identity_of(&self, labels: &LabelSet) -> Option<u32> {
        self.identities.get(labels).and_then(|s| s.id)
    }

    // ---- nodes ----

    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, node = %node.name))]
    pub fn apply_node(&mut self, node: NodeInput) {
        let value = node::store_node(&self.cluster, &node, &self.metrics);
        self.dirty.insert(self.node_key(&node.name));
        self.nodes.insert(node.name, value);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.dirty.insert(self.node_key(name));
        }
    }

    fn node_key(&self, name: &str) -> StoreKey {
        StoreKey::Node { cluster: self.cluster.name.to_string(), name: name.to_string() }
    }

    // ---- services and endpoint slices ----

    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, service = %format!("{}/{}", svc.namespace, svc.name)))]
    pub fn apply_service(&mut self, svc: ServiceInput) {
        let id = (svc.namespace.clone(), svc.name.clone());
        self.dirty.insert(self.service_key(&svc.namespace, &svc.name));
        if self.service_exports.contains_key(&id) {
            self.dirty.insert(self.service_export_key(&svc.namespace, &svc.name));
        }
        self.services.insert(id, svc);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        if self.services.remove(&(namespace.to_string(), name.to_string())).is_some() {
            self.dirty.insert(self.service_key(namespace, name));
            self.dirty.insert(self.service_export_key(namespace, name));
        }
    }

    /// An MCS-API `ServiceExport` (multicluster.x-k8s.io/v1alpha1) exists: export the Service of the same
    /// namespace and name, as if it were global and shared. Without that Service nothing is exported.
    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, export = %format!("{}/{}", export.namespace, export.name)))]
    pub fn apply_service_export(&mut self, export: ServiceExportInput) {
        let id = (export.namespace.clone(), export.name.clone());
        if self.service_exports.get(&id) == Some(&export) {
            return;
        }
        self.dirty.insert(self.service_key(&export.namespace, &export.name));
        self.dirty.insert(self.service_export_key(&export.namespace, &export.name));
        self.service_exports.insert(id, export);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_service_export(&mut self, namespace: &str, name: &str) {
        if self.service_exports.remove(&(namespace.to_string(), name.to_string())).is_some() {
            self.dirty.insert(self.service_key(namespace, name));
            self.dirty.insert(self.service_export_key(namespace, name));
        }
    }

    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, slice = %format!("{}/{}", slice.namespace, slice.name)))]
    pub fn apply_slice(&mut self, slice: EndpointSliceInput) {
        self.delete_slice(&slice.namespace, &slice.name);
        let id = (slice.namespace.clone(), slice.name.clone());
        if let Some(svc) = slice.service_name.clone().filter(|s| !s.is_empty()) {
            self.slices_by_service
                .entry((slice.namespace.clone(), svc.clone()))
                .or_default()
                .insert(slice.name.clone());
            self.dirty.insert(self.service_key(&slice.namespace, &svc));
        }
        self.slices.insert(id, slice);
    }

    #[instrument(level = "debug", skip(self), fields(cluster = %self.cluster.name))]
    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.slices.remove(&(namespace.to_string(), name.to_string())) else { return };
        let Some(svc) = old.service_name.filter(|s| !s.is_empty()) else { return };
        let svc_id = (namespace.to_string(), svc);
        if let Some(set) = self.slices_by_service.get_mut(&svc_id) {
            set.remove(name);
            if set.is_empty() {
                self.slices_by_service.remove(&svc_id);
            }
        }
        self.dirty.insert(self.service_key(namespace, &svc_id.1));
    }

    fn service_export_key(&self, namespace: &str, name: &str) -> StoreKey {
        StoreKey::ServiceExport {
            cluster: self.cluster.name.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn service_key(&self, namespace: &str, name: &str) -> StoreKey {
        StoreKey::Service {
            cluster: self.cluster.name.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    // ---- output ----

    /// The value `key` should hold now, or `None` if it should not exist.
    fn desired(&self, key: &StoreKey) -> Option<String> {
        match key {
            StoreKey::Ip { ip } => {
                let owner = self.ip_claims.get(ip)?.iter().next()?;
                let pod = self.pods.get(&owner.pod)?;
                let id = self.identities.get(pod.identity.as_ref()?)?.id?;
                let entry = IpCacheEntry {
                    ip: *ip,
                    host_ip: pod.host_ip,
                    id,
                    key: 0,
                    metadata: String::new(),
                    k8s_namespace: owner.pod.namespace.clone(),
                    k8s_pod_name: owner.pod.name.clone(),
                    k8s_pod_uid: None,
                    k8s_service_account: None,
                    named_ports: pod.named_ports.clone(),
                };
                to_json(&entry, key, &self.metrics)
            }
            StoreKey::Identity { id } => Some(self.ids.get(id).or_else(|| self.allocated.get(id))?.to_string()),
            StoreKey::Node { name, .. } => to_json(self.nodes.get(name)?, key, &self.metrics),
            StoreKey::Service { namespace, name, .. } => {
                let svc_id = (namespace.clone(), name.clone());
                let svc = self.services.get(&svc_id)?;
                let slices = self
                    .slices_by_service
                    .get(&svc_id)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| self.slices.get(&(namespace.clone(), s.clone())));
                let mcs_exported = self.service_exports.contains_key(&svc_id);
                to_json(&service::cluster_service(&self.cluster, svc, mcs_exported, slices)?, key, &self.metrics)
            }
            StoreKey::ServiceExport { namespace, name, .. } => {
                let svc_id = (namespace.clone(), name.clone());
                let export = self.service_exports.get(&svc_id)?;
                let svc = self.services.get(&svc_id)?;
                to_json(&service::service_export_spec(&self.cluster, svc, export)?, key, &self.metrics)
            }
            _ => None,
        }
    }

    /// Store writes needed to bring the store from what was last handed out to what is desired now.
    #[instrument(level = "debug", skip_all, fields(cluster = %self.cluster.name, dirty = self.dirty.len()))]
    pub fn take_changes(&mut self) -> Vec<Change> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::new();
        let mut touched = BTreeSet::new();
        for key in dirty {
            let forced = self.force.remove(&key);
            let desired = self.desired(&key);
            let kind = key.kind();
            match desired {
                Some(value) => {
                    if forced || self.emitted.get(&key) != Some(&value) {
                        if self.emitted.insert(key.clone(), value.clone()).is_none() {
                            if let Some(kind) = kind {
                                *self.counts.entry(kind).or_default() += 1;
                                touched.insert(kind);
                            }
                        }
                        out.push(Change::Upsert { key, value });
                    }
                }
                None => {
                    let existed = self.emitted.remove(&key).is_some();
                    if existed {
                        if let Some(kind) = kind {
                            *self.counts.entry(kind).or_default() -= 1;
                            touched.insert(kind);
                        }
                    }
                    if existed || forced {
                        out.push(Change::Delete { key });
                    }
                }
            }
        }
        for kind in touched {
            let n = self.counts.get(&kind).copied().unwrap_or(0);
            self.metrics.set_exported(kind.segment(), usize::try_from(n).unwrap_or(0));
        }
        out
    }

    /// The adapter could not write `key`: recompute and rewrite it on the next `take_changes`.
    pub fn write_failed(&mut self, key: &StoreKey) {
        self.force.insert(key.clone());
        self.dirty.insert(key.clone());
    }

    /// True when changes are waiting to be taken.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// What the store holds once every change taken so far has been written.
    pub fn entries(&self) -> &HashMap<StoreKey, String> {
        &self.emitted
    }
}

fn to_json<T: serde::Serialize>(value: &T, key: &StoreKey, metrics: &Metrics) -> Option<String> {
    match serde_json::to_string(value) {
        Ok(s) => Some(s),
        Err(e) => {
            // Our own types always serialize; this would be a bug, so it is loud but not fatal.
            metrics.error("encode");
            tracing::error!(%key, error = %e, "cannot encode store value");
            None
        }
    }
}

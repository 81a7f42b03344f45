//! From the merged view's global services to the EndpointSlices that carry remote backends, and the writer that
//! keeps the local kube API in line with them.
//!
//! Slices are plain EndpointSlices with MCS labels, so any CNI or kube-proxy routes to remote backends. They carry
//! `endpointslice.kubernetes.io/managed-by: identity-sync.causeway.io`, which keeps kube's own EndpointSlice
//! controller away from them, and identity-sync only ever touches slices with that label.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, instrument, warn};

use crate::core::model::Protocol;
use crate::status::Status;

pub use crate::core::slices::{
    DesiredSlice, LABEL_MANAGED_BY as MANAGED_BY_LABEL, LABEL_SERVICE_NAME as SERVICE_NAME_LABEL,
    LABEL_SOURCE_CLUSTER as SOURCE_CLUSTER_LABEL, MANAGED_BY,
};
/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "identity-sync.causeway.io";

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("cannot list EndpointSlices managed by {MANAGED_BY}: {source} (check that identity-sync's service account may list endpointslices in all namespaces)")]
    List {
        #[source]
        source: kube::Error,
    },
    #[error("cannot apply EndpointSlice {namespace}/{name}: {source} (check RBAC for patch on endpointslices)")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot delete EndpointSlice {namespace}/{name}: {source} (check RBAC for delete on endpointslices)")]
    Delete {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// `(namespace, name)` of a slice.
pub type SliceKey = (String, String);

/// What the writer should make true: every slice the core wants, by key. Published whole on a watch channel, so
/// the writer always sees the latest set and intermediate states coalesce.
pub type DesiredSlices = Arc<BTreeMap<SliceKey, DesiredSlice>>;

/// EndpointSlice port protocols are TCP, UDP or SCTP. Cilium's ANY has no equivalent; TCP is what such ports
/// carry in practice.
fn slice_protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp | Protocol::Any => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The kube object for a desired slice.
pub fn to_endpoint_slice(d: &DesiredSlice) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(d.name.clone()),
            namespace: Some(d.namespace.clone()),
            labels: Some(d.labels.clone()),
            ..Default::default()
        },
        address_type: d.address_type.as_str().to_string(),
        endpoints: d
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: vec![e.address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                hostname: e.hostname.clone(),
                zone: e.zone.clone(),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            d.ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(p.port)),
                    protocol: Some(slice_protocol(p.protocol).to_string()),
                    app_protocol: None,
                })
                .collect(),
        ),
    }
}

/// Collects slices into the writer's input form.
pub fn index_slices(slices: impl IntoIterator<Item = DesiredSlice>) -> BTreeMap<SliceKey, DesiredSlice> {
    slices.into_iter().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect()
}

/// What one reconcile pass must do, given what we last wrote (or found on startup).
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub apply: Vec<SliceKey>,
    pub delete: Vec<SliceKey>,
}

/// Pure planning: apply what differs from what was written, delete what is no longer desired. `found` are
/// slices listed at startup (content unknown): they are re-applied when desired, and deleted only when
/// `cleanup_found` is set (once every remote has settled), so a restart does not drop remote backends that are
/// merely not re-imported yet.
pub fn plan(
    desired: &BTreeMap<SliceKey, DesiredSlice>,
    written: &BTreeMap<SliceKey, DesiredSlice>,
    found: &BTreeSet<SliceKey>,
    cleanup_found: bool,
) -> Plan {
    let mut p = Plan::default();
    for (k, s) in desired {
        if written.get(k) != Some(s) {
            p.apply.push(k.clone());
        }
    }
    for k in written.keys() {
        if !desired.contains_key(k) {
            p.delete.push(k.clone());
        }
    }
    if cleanup_found {
        for k in found {
            if !desired.contains_key(k) && !written.contains_key(k) {
                p.delete.push(k.clone());
            }
        }
    }
    p
}

/// Least time between two write passes, unless configured.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// Writes the desired slices into the local cluster until `desired` closes.
///
/// Changes are coalesced: `desired` is a watch channel holding only the latest view, and passes start at least
/// `debounce` apart, so a burst of backend churn becomes at most one write per slice per `debounce`. A change that
/// comes after a quiet spell is written at once: waiting `debounce` after every change instead put the whole
/// interval on every change's latency (measured by `bench --bin propagation-e2e`). Failed writes are retried on the
/// next pass (at most `retry` later).
pub struct SliceWriter {
    client: Client,
    status: Status,
    debounce: Duration,
    retry: Duration,
}

impl SliceWriter {
    pub fn new(client: Client, status: Status) -> Self {
        SliceWriter { client, status, debounce: DEFAULT_DEBOUNCE, retry: Duration::from_secs(5) }
    }

    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    #[instrument(name = "endpointslice_writer", skip_all)]
    pub async fn run(self, mut desired: watch::Receiver<DesiredSlices>) {
        let all: Api<EndpointSlice> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut found: BTreeSet<SliceKey> = loop {
            match all.list(&lp).await {
                Ok(list) => {
                    let found: BTreeSet<SliceKey> = list
                        .items
                        .into_iter()
                        .filter_map(|s| Some((s.metadata.namespace?, s.metadata.name?)))
                        .collect();
                    info!(count = found.len(), "found EndpointSlices written by an earlier run");
                    break found;
                }
                Err(source) => {
                    warn!(error = %KubeError::List { source }, "retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(self.retry) => {}
                        r = desired.changed() => if r.is_err() { return },
                    }
                }
            }
        };
        let mut written: BTreeMap<SliceKey, DesiredSlice> = BTreeMap::new();
        let mut cleaned = false;
        loop {
            let pass_started = tokio::time::Instant::now();
            let want = desired.borrow_and_update().clone();
            let settled = self.status.remotes_settled();
            let p = plan(&want, &written, &found, settled && !cleaned);
            let mut failing = false;
            for key in &p.apply {
                let Some(slice) = want.get(key) else { continue };
                match self.apply(key, slice).await {
                    Ok(()) => {
                        written.insert(key.clone(), slice.clone());
                        found.remove(key);
                    }
                    Err(e) => {
                        failing = true;
                        warn!(error = %e, "EndpointSlice write failed; will retry");
                    }
                }
            }
            for key in &p.delete {
                match self.delete(key).await {
                    Ok(()) => {
                        written.remove(key);
                        found.remove(key);
                    }
                    Err(e) => {
                        failing = true;
                        warn!(error = %e, "EndpointSlice delete failed; will retry");
                    }
                }
            }
            if settled && !cleaned && !failing {
                cleaned = true;
                found.clear();
                info!(slices = written.len(), "EndpointSlices reconciled with every remote settled");
                self.status.kube_synced();
            }
            // Wait for a change, or retry / re-check settling.
            let wait = if failing || !cleaned {
                Some(if failing { self.retry } else { Duration::from_secs(1) })
            } else {
                None
            };
            tokio::select! {
                r = desired.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Changes until then coalesce into the next pass.
                    tokio::time::sleep_until(pass_started + self.debounce).await;
                }
                _ = async {
                    match wait {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    #[instrument(skip(self, slice), fields(namespace = %key.0, slice = %key.1))]
    async fn apply(&self, key: &SliceKey, slice: &DesiredSlice) -> Result<(), KubeError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let res = api.patch(&key.1, &pp, &Patch::Apply(to_endpoint_slice(slice))).await;
        self.status.endpointslice_write("apply", res.is_ok());
        res.map(|_| debug!("applied")).map_err(|source| KubeError::Apply {
            namespace: key.0.clone(),
            name: key.1.clone(),
            source,
        })
    }

    #[instrument(skip(self), fields(namespace = %key.0, slice = %key.1))]
    async fn delete(&self, key: &SliceKey) -> Result<(), KubeError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
        let res = match api.delete(&key.1, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(KubeError::Delete { namespace: key.0.clone(), name: key.1.clone(), source }),
        };
        self.status.endpointslice_write("delete", res.is_ok());
        res.map(|()| debug!("deleted"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Affinity, Backend, ClusterBackends, GlobalServiceView, Port, ServiceKey};

    fn backend(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap_or_else(|e| panic!("{e}")),
            ports: vec![Port { name: "http".into(), protocol: Protocol::Tcp, port }],
            zone: Some("eu-1a".into()),
            hostname: None,
        }
    }

    fn desired(backends: Vec<Backend>) -> BTreeMap<SliceKey, DesiredSlice> {
        let v = GlobalServiceView {
            key: ServiceKey::new("shop", "cart"),
            affinity: Affinity::None,
            frontends: Vec::new(),
            clusters: vec![ClusterBackends { cluster: "east".into(), backends }],
        };
        index_slices(crate::core::slices::desired_slices(&v))
    }

    #[test]
    fn kube_object_carries_labels_ports_and_conditions() {
        let want = desired(vec![backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)]);
        let (_, d) = want.iter().next().unwrap_or_else(|| panic!("no slice"));
        let s = to_endpoint_slice(d);
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(SERVICE_NAME_LABEL).map(String::as_str), Some("cart"));
        assert_eq!(labels.get(SOURCE_CLUSTER_LABEL).map(String::as_str), Some("east"));
        assert_eq!(labels.get(MANAGED_BY_LABEL).map(String::as_str), Some(MANAGED_BY));
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints[0].zone.as_deref(), Some("eu-1a"));
        assert_eq!(s.endpoints[0].conditions.as_ref().and_then(|c| c.ready), Some(true));
        let ports = s.ports.clone().unwrap_or_default();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port, ports[0].protocol.as_deref()),
            (Some("http"), Some(8080), Some("TCP"))
        );
        // Serialized with apiVersion/kind, as server-side apply requires.
        let json = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(json["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(json["kind"], "EndpointSlice");
    }

    #[test]
    fn plan_applies_changes_and_defers_cleanup_of_found_slices() {
        let want = desired(vec![backend("10.1.0.1", 80)]);
        let key = want.keys().next().cloned().unwrap_or_else(|| panic!("no slice"));
        let stale = ("shop".to_string(), "cart-gone-v4-00000000".to_string());
        let found = BTreeSet::from([key.clone(), stale.clone()]);
        let written = BTreeMap::new();
        let p = plan(&want, &written, &found, false);
        assert_eq!(p, Plan { apply: vec![key.clone()], delete: vec![] });
        let p = plan(&want, &written, &found, true);
        assert_eq!(p.delete, vec![stale]);
        // Written and unchanged: nothing to do. Changed: apply. No longer desired: delete.
        let written = want.clone();
        assert_eq!(plan(&want, &written, &BTreeSet::new(), true), Plan::default());
        let changed = desired(vec![backend("10.1.0.1", 80), backend("10.1.0.9", 80)]);
        assert_eq!(plan(&changed, &written, &BTreeSet::new(), true).apply.len(), 1);
        let p = plan(&BTreeMap::new(), &written, &BTreeSet::new(), false);
        assert_eq!(p.delete, vec![key]);
    }
}

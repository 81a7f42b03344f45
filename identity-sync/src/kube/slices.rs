//! From the merged view's global services to the EndpointSlices that carry remote backends, and the writer that
//! keeps the local kube API in line with them.
//!
//! Slices are plain EndpointSlices with MCS labels, so any CNI or kube-proxy routes to remote backends. They carry
//! `endpointslice.kubernetes.io/managed-by: identity-sync.causeway.io`, which keeps kube's own EndpointSlice
//! controller away from them, and identity-sync only ever touches slices with that label.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::core::model::Protocol;
use crate::core::slice_writes::{Outcome, SliceWrites, Write, WriteConfig, WriteOp};
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

pub use crate::core::slice_writes::SliceKey;

/// What the writer should make true: every slice the core wants, by key. Published whole on a watch channel, so
/// the writer always sees the latest set and intermediate states coalesce.
pub type DesiredSlices = crate::core::slice_writes::DesiredMap;

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

/// Least time between two writes of one slice, unless configured: none. Writes in flight already coalesce the
/// changes that come meanwhile, so waiting longer only adds latency (it was 50 ms, which put ~50 ms on the median
/// change in `bench propagation-e2e`). Kube's own EndpointSlice controller batches nothing by default either.
pub const DEFAULT_DEBOUNCE: Duration = Duration::ZERO;

impl KubeError {
    /// 409: the object changed under us (or is being deleted); a fresh write usually succeeds.
    pub fn is_conflict(&self) -> bool {
        match self {
            KubeError::Apply { source: kube::Error::Api(e), .. }
            | KubeError::Delete { source: kube::Error::Api(e), .. } => e.is_conflict(),
            _ => false,
        }
    }
}

/// The three calls the writer makes; the kube implementation is [`KubeSlices`], tests use a fake that counts
/// requests in flight.
pub trait SliceApi: Send + Sync + 'static {
    /// Keys of every slice managed by identity-sync.
    fn list_managed(&self) -> impl Future<Output = Result<BTreeSet<SliceKey>, KubeError>> + Send;
    /// Server-side apply of the whole slice.
    fn apply(&self, key: &SliceKey, slice: &DesiredSlice) -> impl Future<Output = Result<(), KubeError>> + Send;
    /// Delete; a slice already gone counts as deleted.
    fn delete(&self, key: &SliceKey) -> impl Future<Output = Result<(), KubeError>> + Send;
}

/// [`SliceApi`] on a kube client.
#[derive(Clone)]
pub struct KubeSlices {
    client: Client,
}

impl KubeSlices {
    pub fn new(client: Client) -> Self {
        KubeSlices { client }
    }
}

impl SliceApi for KubeSlices {
    async fn list_managed(&self) -> Result<BTreeSet<SliceKey>, KubeError> {
        let all: Api<EndpointSlice> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let list = all.list(&lp).await.map_err(|source| KubeError::List { source })?;
        Ok(list.items.into_iter().filter_map(|s| Some((s.metadata.namespace?, s.metadata.name?))).collect())
    }

    async fn apply(&self, key: &SliceKey, slice: &DesiredSlice) -> Result<(), KubeError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&key.1, &pp, &Patch::Apply(to_endpoint_slice(slice)))
            .await
            .map(|_| ())
            .map_err(|source| KubeError::Apply { namespace: key.0.clone(), name: key.1.clone(), source })
    }

    async fn delete(&self, key: &SliceKey) -> Result<(), KubeError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
        match api.delete(&key.1, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.is_not_found() => Ok(()),
            Err(source) => Err(KubeError::Delete { namespace: key.0.clone(), name: key.1.clone(), source }),
        }
    }
}

/// Writes the desired slices into the local cluster until `desired` closes.
///
/// The scheduling is [`SliceWrites`]'s (see its module for the rules): every changed slice is written as soon as a
/// slot is free, up to `concurrency` requests at once, one per slice at a time, and changes that come while a
/// slice's write is in flight coalesce into its next write. Failed writes are retried with a per-slice backoff.
pub struct SliceWriter<A: SliceApi = KubeSlices> {
    api: Arc<A>,
    status: Status,
    config: WriteConfig,
    /// Between attempts to list the slices of an earlier run, and between checks whether every remote settled.
    recheck: Duration,
}

impl SliceWriter<KubeSlices> {
    pub fn new(client: Client, status: Status) -> Self {
        SliceWriter::with_api(KubeSlices::new(client), status)
    }
}

impl<A: SliceApi> SliceWriter<A> {
    pub fn with_api(api: A, status: Status) -> Self {
        SliceWriter {
            api: Arc::new(api),
            status,
            config: WriteConfig { min_gap: DEFAULT_DEBOUNCE, ..WriteConfig::default() },
            recheck: Duration::from_secs(1),
        }
    }

    /// Least time between two writes of one slice (`--endpointslice-interval`).
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.config.min_gap = debounce;
        self
    }

    /// Writes in flight at once (`--endpointslice-concurrency`).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    #[instrument(name = "endpointslice_writer", skip_all)]
    pub async fn run(self, mut desired: watch::Receiver<DesiredSlices>) {
        let found = loop {
            match self.api.list_managed().await {
                Ok(found) => {
                    info!(count = found.len(), "found EndpointSlices written by an earlier run");
                    break found;
                }
                Err(e) => {
                    warn!(error = %e, "retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(self.recheck * 5) => {}
                        r = desired.changed() => if r.is_err() { return },
                    }
                }
            }
        };
        let mut core = SliceWrites::new(self.config, found);
        let mut running = FuturesUnordered::new();
        let mut open = true;
        // Once synced, settling is no longer watched.
        let mut synced = false;
        let mut recheck = tokio::time::interval(self.recheck);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        core.set_desired(desired.borrow_and_update().clone());
        loop {
            if open {
                for w in core.start(std::time::Instant::now()) {
                    running.push(self.write(w));
                }
            }
            if core.take_synced() {
                synced = true;
                info!(slices = core.written().len(), "EndpointSlices reconciled with every remote settled");
                self.status.kube_synced();
            }
            if !open && running.is_empty() {
                return;
            }
            let wake = core.next_wake();
            tokio::select! {
                r = desired.changed(), if open => match r {
                    Ok(()) => core.set_desired(desired.borrow_and_update().clone()),
                    // The core is gone (shutdown): finish what is in flight, start nothing new.
                    Err(_) => open = false,
                },
                Some((w, outcome)) = running.next(), if !running.is_empty() => {
                    core.finished(w, outcome, std::time::Instant::now());
                }
                _ = async {
                    match wake {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = recheck.tick(), if !synced => {
                    if self.status.remotes_settled() {
                        core.allow_cleanup();
                    }
                }
            }
        }
    }

    /// Carries out one write; the future ends with the write and how it went, for [`SliceWrites::finished`].
    fn write(&self, w: Write) -> impl Future<Output = (Write, Outcome)> + Send + 'static {
        let (api, status) = (self.api.clone(), self.status.clone());
        let span = tracing::debug_span!("endpointslice_write", namespace = %w.key.0, slice = %w.key.1);
        async move {
            let (op, res) = match &w.op {
                WriteOp::Apply(s) => ("apply", api.apply(&w.key, s).await),
                WriteOp::Delete => ("delete", api.delete(&w.key).await),
            };
            status.endpointslice_write(op, res.is_ok());
            let outcome = match res {
                Ok(()) => {
                    debug!(op, "written");
                    Outcome::Done
                }
                Err(e) if e.is_conflict() => {
                    debug!(op, error = %e, "conflict; retrying shortly");
                    Outcome::Conflict
                }
                Err(e) => {
                    warn!(op, error = %e, "EndpointSlice write failed; will retry");
                    Outcome::Failed
                }
            };
            (w, outcome)
        }
        .instrument(span)
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

    // ---- the writer against a fake API that records what reaches it ------------------------------------------

    use crate::core::slices::{AddressType, SliceEndpoint};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen {
        in_flight: usize,
        max_in_flight: usize,
        /// Two writes of one slice were in flight at once (must never happen).
        same_slice_overlap: bool,
        busy: BTreeSet<SliceKey>,
        /// Versions applied per slice, in the order the API received them.
        versions: BTreeMap<SliceKey, Vec<u8>>,
        stored: BTreeMap<SliceKey, DesiredSlice>,
        /// Slices whose next apply answers 409.
        conflict_once: BTreeSet<SliceKey>,
        conflicts: usize,
    }

    /// Holds every request until `gate` is open, so a test can see how many the writer has in flight at once.
    #[derive(Clone)]
    struct FakeApi {
        seen: Arc<Mutex<Seen>>,
        gate: watch::Receiver<bool>,
        changed: Arc<tokio::sync::Notify>,
    }

    impl FakeApi {
        fn new(gate: watch::Receiver<bool>) -> Self {
            FakeApi { seen: Arc::default(), gate, changed: Arc::default() }
        }

        fn with<R>(&self, f: impl FnOnce(&mut Seen) -> R) -> R {
            let r = f(&mut self.seen.lock().unwrap_or_else(|e| e.into_inner()));
            self.changed.notify_waiters();
            r
        }

        /// Reads without waking waiters (a waiter that woke itself would spin).
        fn peek<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
            f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
        }

        /// Waits (at most 10 s) until `cond` holds.
        async fn until(&self, what: &str, cond: impl Fn(&Seen) -> bool) {
            let ok = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let notified = self.changed.notified();
                    if self.peek(&cond) {
                        return;
                    }
                    notified.await;
                }
            })
            .await;
            assert!(ok.is_ok(), "timed out waiting until {what}");
        }

        async fn request(&self, key: &SliceKey) {
            self.with(|s| {
                s.in_flight += 1;
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                s.same_slice_overlap |= !s.busy.insert(key.clone());
            });
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            // Let other requests overlap this one even when the gate is open.
            tokio::task::yield_now().await;
        }

        fn done(&self, key: &SliceKey) {
            self.with(|s| {
                s.in_flight -= 1;
                s.busy.remove(key);
            });
        }
    }

    impl SliceApi for FakeApi {
        async fn list_managed(&self) -> Result<BTreeSet<SliceKey>, KubeError> {
            Ok(BTreeSet::new())
        }

        async fn apply(&self, key: &SliceKey, slice: &DesiredSlice) -> Result<(), KubeError> {
            self.request(key).await;
            let conflict = self.with(|s| {
                if s.conflict_once.remove(key) {
                    s.conflicts += 1;
                    return true;
                }
                let v = version_of(slice);
                s.versions.entry(key.clone()).or_default().push(v);
                s.stored.insert(key.clone(), slice.clone());
                false
            });
            self.done(key);
            if conflict {
                let status = kube::core::Status { code: 409, reason: "Conflict".into(), ..Default::default() };
                return Err(KubeError::Apply {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    source: kube::Error::Api(status.boxed()),
                });
            }
            Ok(())
        }

        async fn delete(&self, key: &SliceKey) -> Result<(), KubeError> {
            self.request(key).await;
            self.with(|s| s.stored.remove(key));
            self.done(key);
            Ok(())
        }
    }

    /// The slice of source cluster `c` at `version` (the version is the last octet of its one address).
    fn versioned(c: u8, version: u8) -> (SliceKey, DesiredSlice) {
        let name = format!("web-c{c}-v4-00000000");
        let slice = DesiredSlice {
            name: name.clone(),
            namespace: "bench".into(),
            service: "web".into(),
            source_cluster: format!("c{c}"),
            address_type: AddressType::IPv4,
            labels: BTreeMap::new(),
            ports: Vec::new(),
            endpoints: vec![SliceEndpoint {
                address: std::net::IpAddr::from([10, c, 0, version]),
                hostname: None,
                zone: None,
            }],
        };
        (("bench".into(), name), slice)
    }

    fn version_of(s: &DesiredSlice) -> u8 {
        match s.endpoints.first().map(|e| e.address) {
            Some(std::net::IpAddr::V4(a)) => a.octets()[3],
            _ => 0,
        }
    }

    fn status() -> Status {
        Status::new("local", 1, causeway_runtime::Health::new(), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn writer_has_one_write_per_changed_slice_in_flight_at_once() {
        let (gate_tx, gate_rx) = watch::channel(false);
        let api = FakeApi::new(gate_rx);
        let (tx, rx) = watch::channel::<DesiredSlices>(Arc::new(BTreeMap::new()));
        let task = tokio::spawn(SliceWriter::with_api(api.clone(), status()).with_concurrency(8).run(rx));
        // Eight source clusters change at once, as at 200 changes/s over 8 remotes.
        let want: BTreeMap<SliceKey, DesiredSlice> = (1..=8).map(|c| versioned(c, 1)).collect();
        let _ = tx.send(Arc::new(want.clone()));
        // A serial writer would hold one request here and never reach eight.
        api.until("8 writes are in flight together", |s| s.in_flight == 8).await;
        let _ = gate_tx.send(true);
        api.until("every slice is stored", |s| s.stored == want).await;
        let seen = api.peek(|s| (s.max_in_flight, s.same_slice_overlap));
        assert_eq!(seen, (8, false));
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    #[tokio::test]
    async fn writer_never_reorders_a_slices_versions_and_retries_conflicts() {
        let (_gate_tx, gate_rx) = watch::channel(true);
        let api = FakeApi::new(gate_rx);
        api.with(|s| s.conflict_once.insert(versioned(2, 0).0));
        let (tx, rx) = watch::channel::<DesiredSlices>(Arc::new(BTreeMap::new()));
        let task = tokio::spawn(SliceWriter::with_api(api.clone(), status()).with_concurrency(2).run(rx));
        // 3 slices, 60 versions each, published faster than they can be written.
        let mut want = BTreeMap::new();
        for v in 1..=60u8 {
            for c in 1..=3 {
                let (k, s) = versioned(c, v);
                want.insert(k, s);
            }
            let _ = tx.send(Arc::new(want.clone()));
            if v % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        api.until("the last version of every slice is stored", |s| s.stored == want).await;
        let (versions, overlap, conflicts, max) =
            api.peek(|s| (s.versions.clone(), s.same_slice_overlap, s.conflicts, s.max_in_flight));
        assert!(!overlap, "two writes of one slice were in flight at once");
        assert_eq!(conflicts, 1, "the 409 was answered");
        assert!(max <= 2, "the concurrency bound holds (saw {max})");
        for (k, vs) in &versions {
            assert!(vs.windows(2).all(|w| w[0] < w[1]), "{k:?} received versions out of order: {vs:?}");
            assert_eq!(vs.last(), Some(&60));
        }
        // Removing a slice deletes it.
        want.remove(&versioned(3, 0).0);
        let _ = tx.send(Arc::new(want.clone()));
        api.until("the removed slice is deleted", |s| s.stored == want).await;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}

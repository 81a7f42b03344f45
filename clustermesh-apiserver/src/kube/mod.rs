//! The kube adapter: watches the cluster, feeds the export core and carries out what it asks for.
//!
//! One watcher task per kind converts objects to plain inputs ([`convert`]) and sends them to a single
//! [`ExportLoop`], which owns the [`Exporter`]: no locks, and events are applied in the order each watch saw
//! them. After every batch the loop resolves identity requests, then writes the changes. Once every kind has
//! finished its initial list and the writes are flushed, it marks each kind synced and only then reports ready.
//!
//! A watch restart (for instance after a `410 Gone`) relists: objects missing from the new list are deleted once
//! the list is complete, so nothing deleted during a disconnect lingers in the store.

pub mod convert;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject};
use ::kube::runtime::watcher::{self, watcher};
use ::kube::runtime::WatchStreamExt;
use ::kube::{Client, Resource};
use causeway_store::Kind;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, instrument, warn};

use crate::export::model::{EndpointSliceInput, NamespaceInput, NodeInput, PodInput, ServiceExportInput, ServiceInput};
use crate::export::{Change, Exporter, IdentityRequest};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::sink::{ExportSink, IdentityResolver};

/// The store kinds this exporter writes and marks synced.
pub const EXPORTED_KINDS: [Kind; 5] = [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities, Kind::ServiceExports];

/// Events taken from the channel per batch before reconciling; bounds the latency of one batch.
const MAX_BATCH: usize = 2048;
/// How often failed identity allocations and store writes are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Node,
    Service,
    EndpointSlice,
    /// MCS-API `ServiceExport` (multicluster.x-k8s.io/v1alpha1), watched only with `--enable-mcs-api`.
    ServiceExport,
}

impl ObjectKind {
    /// The kinds always watched.
    pub const ALL: [ObjectKind; 5] =
        [ObjectKind::Namespace, ObjectKind::Pod, ObjectKind::Node, ObjectKind::Service, ObjectKind::EndpointSlice];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "namespaces",
            ObjectKind::Pod => "pods",
            ObjectKind::Node => "nodes",
            ObjectKind::Service => "services",
            ObjectKind::EndpointSlice => "endpointslices",
            ObjectKind::ServiceExport => "serviceexports",
        }
    }
}

/// One watched object, converted.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(NamespaceInput),
    Pod(PodInput),
    Node(NodeInput),
    Service(ServiceInput),
    EndpointSlice(EndpointSliceInput),
    ServiceExport(ServiceExportInput),
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
type ObjectId = (String, String);

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Namespace(_) => ObjectKind::Namespace,
            Object::Pod(_) => ObjectKind::Pod,
            Object::Node(_) => ObjectKind::Node,
            Object::Service(_) => ObjectKind::Service,
            Object::EndpointSlice(_) => ObjectKind::EndpointSlice,
            Object::ServiceExport(_) => ObjectKind::ServiceExport,
        }
    }

    fn id(&self) -> ObjectId {
        match self {
            Object::Namespace(o) => (String::new(), o.name.clone()),
            Object::Pod(o) => (o.namespace.clone(), o.name.clone()),
            Object::Node(o) => (String::new(), o.name.clone()),
            Object::Service(o) => (o.namespace.clone(), o.name.clone()),
            Object::EndpointSlice(o) => (o.namespace.clone(), o.name.clone()),
            Object::ServiceExport(o) => (o.namespace.clone(), o.name.clone()),
        }
    }
}

/// What a watcher reports to the loop (kube-rs watcher events, converted).
#[derive(Debug, Clone)]
pub enum Input {
    Apply(Object),
    Delete(Object),
    /// A (re)list started.
    InitStart(ObjectKind),
    InitApply(Object),
    /// The (re)list is complete.
    InitDone(ObjectKind),
    /// etcd lost its data and its users, roles and cluster config were re-created: write every entry again, then
    /// the canaries, and report not ready meanwhile.
    EtcdReset,
    /// Identities the allocator restored from their persisted records at start-up: exported until collected.
    IdentitiesRestored(Vec<(u32, causeway_store::LabelSet)>),
    /// Identities the allocator's GC deleted: withdraw them from the store.
    IdentitiesCollected(Vec<u32>),
}

/// The MCS-API ServiceExport resource (the CRD comes from the Kubernetes multicluster SIG; no Rust type for it here).
pub fn service_export_resource() -> ApiResource {
    ApiResource {
        group: "multicluster.x-k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "multicluster.x-k8s.io/v1alpha1".into(),
        kind: "ServiceExport".into(),
        plural: "serviceexports".into(),
    }
}

/// Starts one watcher per kind, all cluster-wide, sending into `tx`; with `mcs_api`, ServiceExports too (their CRD
/// must be installed, or the apiserver stays not ready waiting for their list). The tasks run until `tx` closes.
pub fn spawn_watchers(client: Client, tx: mpsc::Sender<Input>, metrics: Metrics, mcs_api: bool) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if mcs_api {
        tasks.push(tokio::spawn(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &service_export_resource()),
            ObjectKind::ServiceExport,
            tx.clone(),
            metrics.clone(),
            |o| Object::ServiceExport(convert::service_export_input(o)),
        )));
    }
    tasks.extend([
        tokio::spawn(watch_kind(
            Api::<Namespace>::all(client.clone()),
            ObjectKind::Namespace,
            tx.clone(),
            metrics.clone(),
            |o| Object::Namespace(convert::namespace_input(o)),
        )),
        tokio::spawn(watch_kind(Api::<Pod>::all(client.clone()), ObjectKind::Pod, tx.clone(), metrics.clone(), |o| {
            Object::Pod(convert::pod_input(o))
        })),
        tokio::spawn(watch_kind(
            Api::<Node>::all(client.clone()),
            ObjectKind::Node,
            tx.clone(),
            metrics.clone(),
            |o| Object::Node(convert::node_input(o)),
        )),
        tokio::spawn(watch_kind(
            Api::<Service>::all(client.clone()),
            ObjectKind::Service,
            tx.clone(),
            metrics.clone(),
            |o| Object::Service(convert::service_input(o)),
        )),
        tokio::spawn(watch_kind(Api::<EndpointSlice>::all(client), ObjectKind::EndpointSlice, tx, metrics, |o| {
            Object::EndpointSlice(convert::slice_input(o))
        })),
    ]);
    tasks
}

#[instrument(skip_all, fields(kind = kind.as_str()))]
async fn watch_kind<K>(
    api: Api<K>,
    kind: ObjectKind,
    tx: mpsc::Sender<Input>,
    metrics: Metrics,
    convert: fn(&K) -> Object,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let input = match event {
            Ok(watcher::Event::Apply(o)) => Input::Apply(convert(&o)),
            Ok(watcher::Event::Delete(o)) => Input::Delete(convert(&o)),
            Ok(watcher::Event::Init) => Input::InitStart(kind),
            Ok(watcher::Event::InitApply(o)) => Input::InitApply(convert(&o)),
            Ok(watcher::Event::InitDone) => Input::InitDone(kind),
            Err(e) => {
                // The backoff retries; a restarted watch relists, which the loop reconciles.
                metrics.error("kube_watch");
                warn!(kind = kind.as_str(), error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        metrics.kube_event(kind.as_str());
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// The single owner of the export core.
pub struct ExportLoop<S, R> {
    exporter: Exporter,
    sink: Arc<S>,
    resolver: Arc<R>,
    health: Readiness,
    metrics: Metrics,
    /// Objects applied and not deleted, per kind: what a relist must account for.
    known: HashMap<ObjectKind, HashSet<ObjectId>>,
    /// Objects seen by an ongoing relist, per kind.
    relisting: HashMap<ObjectKind, HashSet<ObjectId>>,
    /// Kinds whose first list is complete.
    listed: BTreeSet<ObjectKind>,
    /// Kinds whose first list must be complete before the export is synced.
    watched: Vec<ObjectKind>,
    synced: bool,
    retry: bool,
    /// An [`Input::EtcdReset`] not yet carried out.
    resync: bool,
}

impl<S: ExportSink, R: IdentityResolver> ExportLoop<S, R> {
    pub fn new(exporter: Exporter, sink: Arc<S>, resolver: Arc<R>, health: Readiness, metrics: Metrics) -> Self {
        health.set_export_not_ready(
            "waiting for the initial list of namespaces, pods, nodes, services and endpointslices",
        );
        ExportLoop {
            exporter,
            sink,
            resolver,
            health,
            metrics,
            known: HashMap::new(),
            relisting: HashMap::new(),
            listed: BTreeSet::new(),
            watched: ObjectKind::ALL.to_vec(),
            synced: false,
            retry: false,
            resync: false,
        }
    }

    /// ServiceExports are watched too (`--enable-mcs-api`): their first list is part of the initial export.
    pub fn with_service_exports(mut self) -> Self {
        if !self.watched.contains(&ObjectKind::ServiceExport) {
            self.watched.push(ObjectKind::ServiceExport);
        }
        self
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn exporter(&self) -> &Exporter {
        &self.exporter
    }

    /// Runs until the input channel closes (all watchers stopped).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = rx.recv() => {
                    let Some(input) = input else {
                        info!(cluster = %self.exporter.cluster().name, "all watches stopped; export loop ends");
                        return;
                    };
                    self.handle(input);
                    for _ in 1..MAX_BATCH {
                        match rx.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
                _ = retry.tick(), if self.retry => {
                    self.retry = false;
                }
            }
            self.reconcile().await;
            self.maybe_resync().await;
            self.maybe_mark_synced().await;
        }
    }

    /// Applies one input to the core. Nothing is written until [`ExportLoop::reconcile`].
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Apply(obj) => self.apply(obj),
            Input::Delete(obj) => self.delete(obj.kind(), obj.id()),
            Input::EtcdReset => self.resync = true,
            Input::IdentitiesRestored(restored) => {
                info!(cluster = %self.exporter.cluster().name, count = restored.len(), "exporting restored identities");
                self.exporter.identities_restored(restored);
            }
            Input::IdentitiesCollected(ids) => self.exporter.identities_collected(ids),
            Input::InitStart(kind) => {
                self.relisting.insert(kind, HashSet::new());
            }
            Input::InitApply(obj) => {
                let kind = obj.kind();
                let id = obj.id();
                self.apply(obj);
                self.relisting.entry(kind).or_default().insert(id);
            }
            Input::InitDone(kind) => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                let gone: Vec<ObjectId> =
                    self.known.get(&kind).into_iter().flatten().filter(|id| !seen.contains(*id)).cloned().collect();
                if !gone.is_empty() {
                    info!(
                        kind = kind.as_str(),
                        count = gone.len(),
                        "relist: deleting objects that disappeared meanwhile"
                    );
                }
                for id in gone {
                    self.delete(kind, id);
                }
                if self.listed.insert(kind) {
                    info!(cluster = %self.exporter.cluster().name, kind = kind.as_str(), "initial list complete");
                }
            }
        }
    }

    fn apply(&mut self, obj: Object) {
        self.known.entry(obj.kind()).or_default().insert(obj.id());
        match obj {
            Object::Namespace(o) => self.exporter.apply_namespace(o),
            Object::Pod(o) => self.exporter.apply_pod(o),
            Object::Node(o) => self.exporter.apply_node(o),
            Object::Service(o) => self.exporter.apply_service(o),
            Object::EndpointSlice(o) => self.exporter.apply_slice(o),
            Object::ServiceExport(o) => self.exporter.apply_service_export(o),
        }
    }

    fn delete(&mut self, kind: ObjectKind, (ns, name): ObjectId) {
        if let Some(known) = self.known.get_mut(&kind) {
            known.remove(&(ns.clone(), name.clone()));
        }
        match kind {
            ObjectKind::Namespace => self.exporter.delete_namespace(&name),
            ObjectKind::Pod => self.exporter.delete_pod(&ns, &name),
            ObjectKind::Node => self.exporter.delete_node(&name),
            ObjectKind::Service => self.exporter.delete_service(&ns, &name),
            ObjectKind::EndpointSlice => self.exporter.delete_slice(&ns, &name),
            ObjectKind::ServiceExport => self.exporter.delete_service_export(&ns, &name),
        }
    }

    /// Resolves identity requests (in order), retries failed allocations, then hands the changes to the sink.
    #[instrument(skip_all, fields(cluster = %self.exporter.cluster().name))]
    pub async fn reconcile(&mut self) {
        for req in self.exporter.take_identity_requests() {
            match req {
                IdentityRequest::Acquire(labels) => self.acquire(&labels).await,
                IdentityRequest::Release(labels) => {
                    if let Err(e) = self.resolver.release(&labels).await {
                        // The allocator's GC reclaims it eventually; nothing exported depends on it any more.
                        self.metrics.error("identity_release");
                        warn!(labels = %labels, error = %e, "cannot release identity");
                    }
                }
            }
        }
        // Failed allocations stay pending in the core; retry them.
        let pending = self.exporter.pending_identities();
        if !pending.is_empty() && !self.retry {
            for labels in pending {
                self.acquire(&labels).await;
            }
        }
        for change in self.exporter.take_changes() {
            let kind = change.key().kind().map(|k| k.segment()).unwrap_or("other");
            let (op, result) = match &change {
                Change::Upsert { key, value } => ("upsert", self.sink.upsert(key, value.clone()).await),
                Change::Delete { key } => ("delete", self.sink.delete(key).await),
            };
            match result {
                Ok(()) => self.metrics.write(kind, op),
                Err(e) => {
                    self.metrics.error("store_write");
                    warn!(key = %change.key(), op, error = %e, "store write failed; will retry");
                    self.exporter.write_failed(change.key());
                    self.retry = true;
                }
            }
        }
    }

    async fn acquire(&mut self, labels: &causeway_store::LabelSet) {
        match self.resolver.acquire(labels).await {
            Ok(id) => {
                self.metrics.identities_allocated.inc();
                self.exporter.identity_resolved(labels, id);
            }
            Err(e) => {
                self.metrics.error("identity_allocation");
                warn!(labels = %labels, error = %e, "cannot allocate identity; pods with these labels are not exported yet, retrying");
                self.retry = true;
            }
        }
    }

    /// After an [`Input::EtcdReset`]: has the sink write everything again and goes back to not synced, so that
    /// [`ExportLoop::maybe_mark_synced`] flushes and writes the canaries again before reporting ready.
    async fn maybe_resync(&mut self) {
        if !self.resync {
            return;
        }
        let cluster = self.exporter.cluster().name.clone();
        if let Err(e) = self.sink.resync().await {
            self.metrics.error("store_write");
            warn!(cluster = %cluster, error = %e, "cannot re-export into the reset etcd; will retry");
            self.retry = true;
            return;
        }
        self.resync = false;
        self.synced = false;
        self.health
            .set_export_not_ready("etcd lost its data: re-writing every exported entry, then the synced canaries");
        info!(
            cluster = %cluster,
            entries = self.exporter.entries().len(),
            "etcd lost its data: re-writing every exported entry; canaries follow once they are flushed"
        );
    }

    /// After the first complete list of every kind, with nothing pending, flushes and writes the canaries.
    async fn maybe_mark_synced(&mut self) {
        if self.synced {
            return;
        }
        let waiting: Vec<&str> = self.watched.iter().filter(|k| !self.listed.contains(k)).map(|k| k.as_str()).collect();
        if !waiting.is_empty() {
            self.health.set_export_not_ready(format!("waiting for the initial list of {}", waiting.join(", ")));
            return;
        }
        if !self.exporter.pending_identities().is_empty() || self.retry || self.exporter.has_changes() {
            self.health.set_export_not_ready(
                "initial export incomplete: identity allocations or store writes are being retried",
            );
            return;
        }
        if let Err(e) = self.sink.flush().await {
            self.metrics.error("store_write");
            warn!(error = %e, "flushing the initial export failed; will retry");
            self.retry = true;
            return;
        }
        for kind in EXPORTED_KINDS {
            if let Err(e) = self.sink.mark_synced(kind).await {
                self.metrics.error("store_write");
                warn!(kind = %kind, error = %e, "cannot write synced canary; will retry");
                self.retry = true;
                return;
            }
        }
        self.synced = true;
        self.health.set_export_ready();
        info!(cluster = %self.exporter.cluster().name, entries = self.exporter.entries().len(), "initial export synced; ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::NamespaceInput;
    use crate::sink::{LocalAllocator, MemorySink};
    use causeway_store::{ClusterInfo, MaxConnectedClusters};

    fn export_loop() -> (ExportLoop<MemorySink, LocalAllocator>, Arc<MemorySink>, Readiness) {
        let cluster = ClusterInfo::new("east", 7, MaxConnectedClusters::C255).expect("valid cluster");
        let metrics = Metrics::default();
        let sink = Arc::new(MemorySink::default());
        let resolver = Arc::new(LocalAllocator::new(cluster.identity_range()));
        let health = Readiness::new(causeway_runtime::Health::new());
        let l =
            ExportLoop::new(Exporter::new(cluster, metrics.clone()), sink.clone(), resolver, health.clone(), metrics);
        (l, sink, health)
    }

    fn pod(name: &str, ip: &str) -> Object {
        Object::Pod(PodInput {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_string(), "cart".to_string())].into(),
            created: Some(1),
            pod_ips: vec![ip.into()],
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn ready_only_after_every_kind_listed_and_canaries_written() {
        let (mut l, sink, health) = export_loop();
        for kind in ObjectKind::ALL {
            l.handle(Input::InitStart(kind));
        }
        l.handle(Input::InitApply(Object::Namespace(NamespaceInput {
            name: "shop".into(),
            labels: Default::default(),
        })));
        l.handle(Input::InitApply(pod("a", "10.1.2.3")));
        for kind in &ObjectKind::ALL[..4] {
            l.handle(Input::InitDone(*kind));
        }
        l.reconcile().await;
        l.maybe_mark_synced().await;
        assert!(!health.is_ready());
        assert!(sink.snapshot().synced.is_empty());
        assert!(
            sink.snapshot().entries.contains_key("cilium/state/ip/v1/default/10.1.2.3"),
            "writes start before sync"
        );

        l.handle(Input::InitDone(ObjectKind::EndpointSlice));
        l.reconcile().await;
        l.maybe_mark_synced().await;
        assert!(health.is_ready());
        assert_eq!(sink.snapshot().synced, EXPORTED_KINDS.into_iter().collect());
    }

    #[tokio::test]
    async fn etcd_reset_rewrites_everything_and_canaries_come_back_before_ready() {
        let (mut l, sink, health) = export_loop();
        for kind in ObjectKind::ALL {
            l.handle(Input::InitStart(kind));
        }
        l.handle(Input::InitApply(Object::Namespace(NamespaceInput {
            name: "shop".into(),
            labels: Default::default(),
        })));
        l.handle(Input::InitApply(pod("a", "10.1.2.3")));
        for kind in ObjectKind::ALL {
            l.handle(Input::InitDone(kind));
        }
        l.reconcile().await;
        l.maybe_resync().await;
        l.maybe_mark_synced().await;
        assert!(health.is_ready());

        l.handle(Input::EtcdReset);
        l.reconcile().await;
        l.maybe_resync().await;
        assert!(!health.is_ready(), "not ready while the reset etcd is re-written");
        assert!(!l.is_synced());
        let s = sink.snapshot();
        assert_eq!(s.resyncs, 1);
        assert!(s.synced.is_empty(), "canaries are forgotten until the re-export is flushed");

        l.maybe_mark_synced().await;
        assert!(health.is_ready());
        assert_eq!(sink.snapshot().synced, EXPORTED_KINDS.into_iter().collect());
    }

    #[tokio::test]
    async fn with_mcs_api_ready_waits_for_the_service_export_list_and_exports_follow_it() {
        let (l, sink, health) = export_loop();
        let mut l = l.with_service_exports();
        for kind in ObjectKind::ALL {
            l.handle(Input::InitStart(kind));
            l.handle(Input::InitDone(kind));
        }
        l.handle(Input::Apply(Object::Service(ServiceInput {
            namespace: "shop".into(),
            name: "cart".into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ..Default::default()
        })));
        l.reconcile().await;
        l.maybe_mark_synced().await;
        assert!(!health.is_ready(), "the ServiceExport list is part of the initial export");

        let export = || {
            Object::ServiceExport(ServiceExportInput {
                namespace: "shop".into(),
                name: "cart".into(),
                created: Some(1_795_428_000),
                ..Default::default()
            })
        };
        l.handle(Input::InitStart(ObjectKind::ServiceExport));
        l.handle(Input::InitApply(export()));
        l.handle(Input::InitDone(ObjectKind::ServiceExport));
        l.reconcile().await;
        l.maybe_mark_synced().await;
        assert!(health.is_ready());
        assert!(sink.snapshot().entries.contains_key("cilium/state/services/v1/east/shop/cart"));

        // The ServiceExport's watch restarts and the export is gone from the new list: withdrawn.
        l.handle(Input::InitStart(ObjectKind::ServiceExport));
        l.handle(Input::InitDone(ObjectKind::ServiceExport));
        l.reconcile().await;
        assert!(!sink.snapshot().entries.contains_key("cilium/state/services/v1/east/shop/cart"));
        l.handle(Input::Apply(export()));
        l.reconcile().await;
        assert!(sink.snapshot().entries.contains_key("cilium/state/services/v1/east/shop/cart"));
        l.handle(Input::Delete(export()));
        l.reconcile().await;
        assert!(!sink.snapshot().entries.contains_key("cilium/state/services/v1/east/shop/cart"));
    }

    #[tokio::test]
    async fn relist_deletes_objects_that_vanished() {
        let (mut l, sink, _) = export_loop();
        l.handle(Input::Apply(Object::Namespace(NamespaceInput { name: "shop".into(), labels: Default::default() })));
        l.handle(Input::Apply(pod("a", "10.1.2.3")));
        l.handle(Input::Apply(pod("b", "10.1.2.4")));
        l.reconcile().await;
        assert_eq!(sink.snapshot().entries.len(), 3);

        // The watch restarts; pod b was deleted while it was down.
        l.handle(Input::InitStart(ObjectKind::Pod));
        l.handle(Input::InitApply(pod("a", "10.1.2.3")));
        l.reconcile().await;
        assert_eq!(sink.snapshot().entries.len(), 3, "nothing is deleted before the list is complete");
        l.handle(Input::InitDone(ObjectKind::Pod));
        l.reconcile().await;
        let entries = sink.snapshot().entries;
        assert!(entries.contains_key("cilium/state/ip/v1/default/10.1.2.3"));
        assert!(!entries.contains_key("cilium/state/ip/v1/default/10.1.2.4"));
    }
}

//! Wiring: one driver task owns the sans-IO [`MergedView`] and feeds it from the remote tasks, the local Service
//! reflector and the local ExternalWorkload watcher; after each batch of inputs it publishes the desired
//! EndpointSlices to the kube writer and the deltas to the gRPC stream. The binary (`main.rs`) only parses flags and
//! calls [`start`] or [`start_external_workload`]; tests call them in-process.
//!
//! External-workload mode ([`start_external_workload`]) is identity-sync running on a VM that joined a cluster (its
//! *home*): there is no kube API at all. `--cluster-name`/`--cluster-id` are the home cluster's, and the remotes
//! directory holds the home cluster's own store (a file named after it, with the `externalworkload` etcd user's
//! certificates), which is imported although it carries the local name and ID (see
//! [`crate::remotes::task::TaskEnv::external_workload`]). The MeshView stream then gives the VM's node agent the home
//! cluster's nodes, ipcache and identities exactly as a cluster's agents get their remotes'.
//!
//! With leader election ([`start_elected`]), every replica imports the remotes and serves the stream as above; only
//! the EndpointSlice writer waits for this replica to lead (see [`crate::election`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_runtime::Health;
use causeway_store::{ClusterId, ClusterName, Kind, MaxConnectedClusters};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::core::{CoreConfig, MergedView, ServiceKey};
use crate::election::Election;
use crate::kube::services::{self as local_services, LocalChange};
use crate::kube::slices::{DesiredSlices, SliceKey, SliceWriter};
use crate::kube::workloads::{self as local_workloads, LocalCluster, WorkloadChange, WorkloadMetrics};
use crate::remotes::task::{IdClaims, RemoteEvent, TaskEnv, Timing, KINDS};
use crate::status::Status;
use crate::stream::{MeshViewHub, StreamConfig, StreamMetrics};

#[derive(Debug, Error)]
pub enum AppError {
    #[error("invalid local cluster: {0}")]
    Cluster(#[from] causeway_store::cluster::ClusterError),
    #[error(transparent)]
    Runtime(#[from] causeway_runtime::RuntimeError),
    #[error("cannot listen for the MeshView gRPC stream on {addr}: {source} (is another process using the port?)")]
    GrpcBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything [`run`] needs.
pub struct AppConfig {
    pub cluster_name: String,
    pub cluster_id: u32,
    pub mode: MaxConnectedClusters,
    pub remotes_dir: PathBuf,
    /// How often the remotes directory is rescanned besides file notifications.
    pub rescan: Duration,
    pub cache_ttl: Option<Duration>,
    /// How long an unsynced remote may hold back readiness (see [`crate::status`]).
    pub remote_ready_timeout: Duration,
    pub metrics_addr: SocketAddr,
    /// MeshView gRPC stream for node agents.
    pub grpc_addr: SocketAddr,
    pub timing: Timing,
    /// Least time between two writes of one EndpointSlice (zero: as soon as its previous write finished).
    pub slice_debounce: Duration,
    /// EndpointSlice writes in flight at once, over all slices.
    pub slice_concurrency: usize,
    /// Watch the local cluster's ExternalWorkloads and put the Ready ones with a WireGuard key into the view (as
    /// nodes the local agents peer with). Ignored in external-workload mode.
    pub watch_external_workloads: bool,
}

/// Addresses actually bound (useful with port 0) and the status board.
pub struct Running {
    pub metrics_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub hub: MeshViewHub,
    pub status: Status,
    pub health: Health,
}

/// Starts everything in background tasks and returns once the HTTP server is listening. The tasks run until the
/// runtime shuts down.
pub async fn start(cfg: AppConfig, kube: kube::Client) -> Result<Running, AppError> {
    start_inner(cfg, Some((kube, None))).await
}

/// Like [`start`], as one of several replicas: EndpointSlices are written only while `election` says this replica
/// leads; everything else runs on every replica.
pub async fn start_elected(cfg: AppConfig, kube: kube::Client, election: Election) -> Result<Running, AppError> {
    start_inner(cfg, Some((kube, Some(election)))).await
}

/// External-workload mode (see the module docs): no kube client, no Services, EndpointSlices or ExternalWorkloads;
/// readiness waits only for the remotes (the home cluster).
pub async fn start_external_workload(cfg: AppConfig) -> Result<Running, AppError> {
    start_inner(cfg, None).await
}

async fn start_inner(cfg: AppConfig, kube: Option<(kube::Client, Option<Election>)>) -> Result<Running, AppError> {
    let name = ClusterName::new_meshed(cfg.cluster_name.clone())?;
    let local_id = ClusterId::new(cfg.cluster_id, cfg.mode)?;
    let health = Health::new();
    let status = Status::new(name.as_str(), local_id.get(), health.clone(), cfg.remote_ready_timeout);
    if let Some((_, Some(e))) = &kube {
        status.leader_election(&e.lease, &e.identity);
    }
    let router = health.router().merge(status.router());
    let metrics_addr = causeway_runtime::serve(cfg.metrics_addr, router).await?;
    let external_workload = kube.is_none();
    info!(%metrics_addr, cluster = %name, cluster_id = local_id.get(), external_workload, "identity-sync serving /metrics /healthz /readyz /status");

    let (events_tx, events_rx) = mpsc::channel(4096);
    let (local_tx, local_rx) = mpsc::channel(1024);
    let (workloads_tx, workloads_rx) = mpsc::channel(1024);

    let env = TaskEnv {
        local_name: name.clone(),
        local_id,
        mode: cfg.mode,
        external_workload,
        claims: IdClaims::default(),
        events: events_tx,
        timing: cfg.timing,
    };
    tokio::spawn(crate::remotes::run(cfg.remotes_dir, cfg.rescan, env, status.clone()));
    let slices_tx = match kube {
        Some((kube, election)) => {
            let (slices_tx, slices_rx) = watch::channel::<DesiredSlices>(Arc::new(BTreeMap::new()));
            tokio::spawn(local_services::run(kube.clone(), local_tx));
            if cfg.watch_external_workloads {
                let local = LocalCluster {
                    name: name.as_str().into(),
                    id: local_id.get(),
                    identities: local_id.identity_range(cfg.mode),
                };
                let metrics = WorkloadMetrics::default();
                metrics.register(&health);
                tokio::spawn(local_workloads::run(kube.clone(), local, metrics, workloads_tx));
            }
            let (debounce, concurrency) = (cfg.slice_debounce, cfg.slice_concurrency);
            let writer = {
                let status = status.clone();
                move |slices_rx| {
                    SliceWriter::new(kube.clone(), status.clone())
                        .with_debounce(debounce)
                        .with_concurrency(concurrency)
                        .run(slices_rx)
                }
            };
            match election {
                None => {
                    tokio::spawn(writer(slices_rx));
                }
                Some(e) => {
                    info!(cluster = %name, lease = %e.lease, identity = %e.identity, "leader election on: EndpointSlices are written while this replica leads");
                    // The supervisor keeps `slices_rx`, so the desired set stays current while no writer runs, and
                    // each new writer starts from the latest one.
                    let (status, cluster) = (status.clone(), name.to_string());
                    tokio::spawn(async move {
                        let start = || writer(slices_rx.clone());
                        crate::election::supervise(e.roles, status, &cluster, &e.lease, start).await;
                    });
                }
            }
            Some(slices_tx)
        }
        None => {
            // Nothing local to list or write: the remotes (the home cluster) are all readiness waits for.
            drop((local_tx, workloads_tx));
            status.local_synced();
            status.kube_synced();
            None
        }
    };
    // On an external workload the home cluster's services define the global services (there are no local ones).
    let home = external_workload.then(|| name.to_string());
    let core_cfg = CoreConfig { cache_ttl: cfg.cache_ttl, home };
    let metrics = StreamMetrics::default();
    metrics.register(&health);
    let hub = MeshViewHub::new(MergedView::new(core_cfg), StreamConfig::default(), metrics);
    let listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|source| AppError::GrpcBind { addr: cfg.grpc_addr, source })?;
    let grpc_addr = listener.local_addr().map_err(|source| AppError::GrpcBind { addr: cfg.grpc_addr, source })?;
    let svc = hub.server();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "MeshView gRPC server stopped");
        }
    });
    info!(%grpc_addr, "serving the MeshView gRPC stream");
    tokio::spawn(drive(hub.clone(), events_rx, local_rx, workloads_rx, slices_tx, status.clone()));
    Ok(Running { metrics_addr, grpc_addr, hub, status, health })
}

/// Feeds the core (through the hub, which streams the resulting deltas) and publishes the desired slices (none in
/// external-workload mode, where `slices_tx` is `None`). Ends when every input has closed.
async fn drive(
    hub: MeshViewHub,
    mut events: mpsc::Receiver<(Arc<str>, RemoteEvent)>,
    mut local: mpsc::Receiver<LocalChange>,
    mut workloads: mpsc::Receiver<WorkloadChange>,
    slices_tx: Option<watch::Sender<DesiredSlices>>,
    status: Status,
) {
    let mut published = Publisher::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let (mut events_open, mut local_open, mut workloads_open) = (true, true, true);
    while events_open || local_open || workloads_open {
        let deadline = hub.read(|v| v.next_deadline());
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(first) => {
                    // Take what is already queued too, so that a burst is one lock and one publish.
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match events.try_recv() {
                            Ok(ev) => batch.push(ev),
                            Err(_) => break,
                        }
                    }
                    let counts = hub.update(|v| {
                        let mut touched: Vec<Arc<str>> = Vec::new();
                        for (name, ev) in batch {
                            apply_remote(v, &name, ev);
                            if !touched.contains(&name) {
                                touched.push(name);
                            }
                        }
                        entry_counts(v, touched)
                    });
                    for (name, counts) in counts {
                        status.remote_entries(&name, counts);
                    }
                }
                None => events_open = false,
            },
            ch = local.recv(), if local_open => match ch {
                Some(LocalChange::Synced) => status.local_synced(),
                Some(ch) => hub.update(|v| apply_local(v, ch)),
                None => local_open = false,
            },
            ch = workloads.recv(), if workloads_open => match ch {
                Some(WorkloadChange::Synced) => debug!("local ExternalWorkloads listed"),
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match workloads.try_recv() {
                            Ok(ch) => batch.push(ch),
                            Err(_) => break,
                        }
                    }
                    hub.update(|v| {
                        for ch in batch {
                            match ch {
                                WorkloadChange::Upsert(w) => v.local_workload_upsert(w),
                                WorkloadChange::Delete(name) => v.local_workload_delete(&name),
                                WorkloadChange::Synced => {}
                            }
                        }
                    });
                }
                None => workloads_open = false,
            },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            } => hub.update(|v| v.tick(Instant::now())),
            _ = ticker.tick() => status.evaluate(),
        }
        match &slices_tx {
            Some(tx) => hub.update(|v| published.publish(v, tx)),
            // No slices to write; still drop the change records the publisher would have consumed.
            None => hub.update(|v| {
                let rev = v.revision();
                v.forget_service_changes_before(rev);
            }),
        }
    }
}

fn apply_remote(core: &mut MergedView, name: &str, ev: RemoteEvent) {
    let res = match ev {
        RemoteEvent::Session { ctx } => core
            .remote_added(name)
            .and_then(|()| core.remote_connected(name))
            // Validation starts a session: every kind is listed afresh and whatever does not come back is swept
            // at that kind's ListDone.
            .and_then(|()| core.remote_validated(ctx)),
        RemoteEvent::Upsert { entry, .. } => core.entry_upsert(name, entry),
        RemoteEvent::Delete { key, .. } => core.entry_delete(name, &key),
        RemoteEvent::Rejected { key, error, .. } => core.entry_rejected(name, &key, &error),
        RemoteEvent::ListDone { kind } => core.list_done(name, kind),
        RemoteEvent::Disconnected => core.disconnected(name, Instant::now()),
        RemoteEvent::ConfigRejected { reason } => {
            core.remote_added(name).and_then(|()| core.remote_rejected(name, reason))
        }
        RemoteEvent::Removed => core.remote_removed(name),
    };
    if let Err(e) = res {
        // Events of a remote removed a moment ago, or before it was validated; nothing to do.
        debug!(cluster = %name, error = %e, "event not applied");
    }
}

/// The merged view's entry counts of the given remotes, for the status board (the view is the one place that
/// knows how many entries each remote holds; the remote tasks keep no copy of the keys).
type KindCounts = [(Kind, u64); KINDS.len()];

fn entry_counts(core: &MergedView, remotes: Vec<Arc<str>>) -> Vec<(Arc<str>, KindCounts)> {
    remotes
        .into_iter()
        .filter_map(|name| {
            let entries = &core.remote_status(&name)?.entries;
            let counts = KINDS.map(|k| (k, entries.get(k)));
            Some((name, counts))
        })
        .collect()
}

fn apply_local(core: &mut MergedView, ch: LocalChange) {
    match ch {
        LocalChange::Upsert(svc) => core.local_service_upsert(svc),
        LocalChange::Delete(key) => core.local_service_delete(&key.namespace, &key.name),
        LocalChange::Synced => {}
    }
}

/// Turns the core's changed services into the writer's desired slice set.
#[derive(Default)]
struct Publisher {
    since: u64,
    slices: BTreeMap<SliceKey, crate::core::DesiredSlice>,
    by_service: BTreeMap<ServiceKey, BTreeSet<SliceKey>>,
}

impl Publisher {
    fn publish(&mut self, core: &mut MergedView, tx: &watch::Sender<DesiredSlices>) {
        let rev = core.revision();
        let changed = core.services_changed_since(self.since);
        if changed.is_empty() {
            self.since = rev;
            return;
        }
        let mut dirty = false;
        for key in changed {
            let want = core.desired_slices(&key);
            let old = self.by_service.remove(&key).unwrap_or_default();
            let mut now = BTreeSet::new();
            for s in want {
                let k = (s.namespace.clone(), s.name.clone());
                now.insert(k.clone());
                if self.slices.get(&k) != Some(&s) {
                    self.slices.insert(k, s);
                    dirty = true;
                }
            }
            for k in old.difference(&now) {
                self.slices.remove(k);
                dirty = true;
            }
            if !now.is_empty() {
                self.by_service.insert(key, now);
            }
        }
        core.forget_service_changes_before(rev);
        self.since = rev;
        if dirty {
            debug!(slices = self.slices.len(), "desired EndpointSlices changed");
            if tx.send(Arc::new(self.slices.clone())).is_err() {
                warn!("EndpointSlice writer stopped; desired slices are no longer written");
            }
        }
    }
}

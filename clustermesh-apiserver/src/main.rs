//! `clustermesh-apiserver`: exports this cluster's identities, ipcache, nodes and global services into its etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_runtime::{Health, LogFormat};
use causeway_store::values::Capabilities;
use causeway_store::{ClusterConfig, ClusterInfo, ClusterName, MaxConnectedClusters};
use clap::Parser;
use clustermesh_apiserver::export::Exporter;
use clustermesh_apiserver::identity::KubeIdentityStore;
use clustermesh_apiserver::kube::{spawn_watchers, ExportLoop, Input, EXPORTED_KINDS};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::node_owners::{NodeOwners, Writer};
use clustermesh_apiserver::readiness::Readiness;
use clustermesh_apiserver::sink::EtcdSink;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "clustermesh-apiserver", version, about)]
struct Args {
    /// This cluster's name: unique in the mesh, at most 32 of a-z, 0-9 and '-'.
    #[arg(long, env = "CAUSEWAY_CLUSTER_NAME")]
    cluster_name: String,
    /// This cluster's ID: unique in the mesh, 1..=255 (or 1..=511 with --max-connected-clusters 511).
    #[arg(long, env = "CAUSEWAY_CLUSTER_ID")]
    cluster_id: u32,
    /// 255 or 511; must be the same on every cluster of the mesh.
    #[arg(long, env = "CAUSEWAY_MAX_CONNECTED_CLUSTERS", default_value_t = 255)]
    max_connected_clusters: u32,
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "CAUSEWAY_ETCD_ENDPOINTS", value_delimiter = ',', required = true)]
    etcd_endpoints: Vec<String>,
    /// CA that signed etcd's server certificate (with --etcd-cert and --etcd-key for mTLS).
    #[arg(long, env = "CAUSEWAY_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate; its CN is the etcd user (root or admin-<cluster>).
    #[arg(long, env = "CAUSEWAY_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "CAUSEWAY_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// Kubeconfig to use; without it, the default kubeconfig or the in-cluster config.
    #[arg(long, env = "CAUSEWAY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Peer cluster names, comma-separated: a read-only etcd user `remote-<peer>` is created for each (needs the
    /// root user's certificate). With --peers-configmap, these are always kept in addition to the ConfigMap's.
    #[arg(long, env = "CAUSEWAY_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// NAMESPACE/NAME of the ConfigMap whose `peers` key (`causeway clustermesh connect`/`disconnect` keep it) the
    /// peer users follow while running: a connected peer's `remote-<peer>` user is created, a disconnected one's
    /// deleted. Needs the root user's certificate, and get/list/watch on that ConfigMap.
    #[arg(long, env = "CAUSEWAY_PEERS_CONFIGMAP")]
    peers_configmap: Option<clustermesh_apiserver::peers::ConfigMapRef>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CAUSEWAY_METRICS_ADDR", default_value = "0.0.0.0:9962")]
    metrics_addr: SocketAddr,
    /// `text` or `json`.
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// How long an unused identity is kept before it is garbage-collected (e.g. `15m`).
    #[arg(long, env = "CAUSEWAY_IDENTITY_GC_GRACE", default_value = "15m", value_parser = humantime::parse_duration)]
    identity_gc_grace: Duration,
    /// Also export every Service that has an MCS-API ServiceExport (multicluster.x-k8s.io/v1alpha1) of the same
    /// namespace and name, as if it were global and shared. The ServiceExport CRD must be installed.
    #[arg(long, env = "CAUSEWAY_ENABLE_MCS_API")]
    enable_mcs_api: bool,
    /// External-workload registration (gRPC over mTLS): --workloads-addr and its TLS files.
    #[command(flatten)]
    workloads: clustermesh_apiserver::workloads::WorkloadsArgs,
}

fn cluster_info(args: &Args) -> Result<ClusterInfo> {
    let mode = MaxConnectedClusters::try_from(args.max_connected_clusters).context("--max-connected-clusters")?;
    let name = ClusterName::new_meshed(args.cluster_name.clone()).context("--cluster-name")?;
    ClusterInfo::new(name.as_str(), args.cluster_id, mode).context("--cluster-id")
}

fn etcd_config(args: &Args) -> Result<causeway_kvstore::EtcdConfig> {
    let config = causeway_kvstore::EtcdConfig::new(args.etcd_endpoints.iter().cloned());
    match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (None, None, None) => Ok(config),
        (Some(ca), Some(cert), Some(key)) => Ok(config
            .with_tls(causeway_kvstore::TlsConfig::from_files(ca, cert, key).context("reading etcd TLS material")?)),
        _ => bail!("--etcd-ca, --etcd-cert and --etcd-key must be given together (mTLS) or not at all"),
    }
}

async fn kube_client(args: &Args) -> Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no kubeconfig given and none found (nor in-cluster config)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The start sequence's etcd part, also re-done when etcd lost its data: users and roles, auth enabled (with
/// peers), then the cluster config and its marker.
async fn prepare_etcd(
    etcd: &mut causeway_kvstore::Client,
    cluster: &str,
    peers: &[String],
    config: &[u8],
) -> Result<()> {
    if !peers.is_empty() {
        causeway_kvstore::ensure_auth(etcd, cluster, peers)
            .await
            .context("creating etcd users for peers (the etcd client certificate must be the root user's)")?;
    }
    causeway_kvstore::write_cluster_config(etcd, cluster, config).await.context("writing the cluster config")?;
    Ok(())
}

/// Failed looks at etcd in a row (one every `RESET_CHECK_INTERVAL`) before the process reports not ready: one
/// slow answer is not an outage.
const UNREACHABLE_AFTER: u32 = 2;

/// What re-creating a reset etcd needs.
struct ResetHandler {
    detector: causeway_kvstore::ResetDetector,
    etcd: causeway_kvstore::Client,
    cluster: String,
    /// The peers whose users etcd has now (the static --peers, or what the peer task last converged to).
    peers: tokio::sync::watch::Receiver<Vec<String>>,
    /// Bumped after each re-creation, so the peer task converges the users again.
    recreated: tokio::sync::watch::Sender<u64>,
    config: Vec<u8>,
    leases: Arc<causeway_kvstore::LeasePool>,
    heartbeat: Arc<causeway_kvstore::Heartbeat>,
    readiness: Readiness,
    metrics: Metrics,
    export: tokio::sync::mpsc::Sender<Input>,
}

impl ResetHandler {
    /// Waits for etcd to lose its data, then redoes the start sequence in order: users, roles and auth → cluster
    /// config and marker → fresh leases → the export loop re-writes every key, then the canaries, then reports
    /// ready.
    ///
    /// Every lease-attached write (the sync stores and the heartbeat) waits at the lease pool's write gate from the
    /// moment the reset is noticed, by the detector's poll or by the pool itself (a lost lease and no cluster
    /// config), until users, roles, auth and the cluster config are back; so no peer ever finds state keys in an
    /// etcd without a cluster config, and nobody can write into it unauthenticated meanwhile.
    async fn run(mut self) {
        let gate = self.leases.gate().clone();
        loop {
            let reason = self.wait_for_reset(&gate).await;
            self.metrics.etcd_resets.inc();
            warn!(
                cluster = %self.cluster,
                reason = %reason,
                "etcd lost its data (restarted empty or restored from an older backup): re-creating users, roles, \
                 cluster config and every exported key"
            );
            // Both: etcd is back once re-created, but the export is complete only when the export loop has written
            // the canaries again.
            self.readiness.set_etcd_not_ok(format!("etcd lost its data ({reason}); re-creating it"));
            self.readiness.set_export_not_ready("etcd lost its data: re-exporting once it is re-created");
            let mut delay = Duration::from_millis(200);
            loop {
                match self.recreate().await {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(cluster = %self.cluster, error = format!("{e:#}"), "cannot re-create the reset etcd; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
            // The re-written marker is the detector's new baseline, not another reset.
            self.detector.forget();
            gate.open();
            self.readiness.set_etcd_ok();
            self.heartbeat.write_now();
            self.recreated.send_modify(|n| *n += 1);
            if self.export.send(Input::EtcdReset).await.is_err() {
                return;
            }
            info!(cluster = %self.cluster, "reset etcd re-created (users, roles, auth, cluster config, leases); re-exporting");
        }
    }

    /// Looks at etcd every [`causeway_kvstore::RESET_CHECK_INTERVAL`] until it lost its data, or until the lease
    /// pool closed the gate (a lost lease and no cluster config). Meanwhile, etcd not answering for
    /// [`UNREACHABLE_AFTER`] looks in a row makes the process not ready until it answers again.
    async fn wait_for_reset(&mut self, gate: &causeway_kvstore::WriteGate) -> String {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                reason = gate.wait_closed() => return reason,
                checked = self.detector.check() => match checked {
                    Ok(Some(reason)) => {
                        let reason = reason.to_string();
                        gate.close(reason.clone());
                        return reason;
                    }
                    Ok(None) => {
                        if failures >= UNREACHABLE_AFTER {
                            info!(cluster = %self.cluster, "etcd answers again");
                        }
                        failures = 0;
                        self.readiness.set_etcd_ok();
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == UNREACHABLE_AFTER {
                            warn!(cluster = %self.cluster, error = %e, "etcd does not answer; not ready until it does");
                        }
                        if failures >= UNREACHABLE_AFTER {
                            self.readiness.set_etcd_not_ok(format!("etcd does not answer: {e}"));
                        }
                    }
                },
            }
            tokio::select! {
                reason = gate.wait_closed() => return reason,
                _ = tokio::time::sleep(causeway_kvstore::RESET_CHECK_INTERVAL) => {}
            }
        }
    }

    async fn recreate(&mut self) -> Result<()> {
        let peers = self.peers.borrow().clone();
        prepare_etcd(&mut self.etcd, &self.cluster, &peers, &self.config).await?;
        let replaced = self.leases.replace_all_lost().await.context("replacing lost etcd leases")?;
        info!(cluster = %self.cluster, replaced, "etcd leases checked after the reset");
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let format: LogFormat = args.log_format.parse().context("--log-format")?;
    causeway_runtime::init_logging(format);
    let cluster = cluster_info(&args)?;
    for peer in &args.peers {
        ClusterName::new(peer.clone()).with_context(|| format!("--peers: peer {peer:?}"))?;
    }
    let span = tracing::info_span!("clustermesh_apiserver", cluster = %cluster.name, cluster_id = cluster.id.get());
    let _enter = span.enter();

    let health = Health::new();
    let metrics = Metrics::default();
    health.with_registry(|r| metrics.register(r));
    let bound = causeway_runtime::serve(args.metrics_addr, health.router()).await?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    let readiness = Readiness::new(health.clone());

    let mut etcd = causeway_kvstore::connect(&etcd_config(&args)?)
        .await
        .with_context(|| format!("connecting to etcd at {}", args.etcd_endpoints.join(",")))?;
    let config = serde_json::to_vec(&ClusterConfig {
        id: cluster.id.get(),
        capabilities: Capabilities {
            synced_canaries: true,
            max_connected_clusters: cluster.mode.get(),
            service_exports_enabled: Some(args.enable_mcs_api),
        },
    })
    .context("encoding the cluster config")?;
    prepare_etcd(&mut etcd, cluster.name.as_str(), &args.peers, &config).await?;
    let mut detector = causeway_kvstore::ResetDetector::new(
        &etcd,
        causeway_kvstore::cluster_config_key(cluster.name.as_str()),
        causeway_kvstore::RESET_CHECK_INTERVAL,
    );
    if let Err(e) = detector.check().await {
        // The first look of the reset handler learns the baseline instead.
        warn!(error = %e, "cannot read back the cluster config");
    }
    let leases = causeway_kvstore::LeasePool::grant(etcd.clone(), causeway_kvstore::LeaseConfig::default())
        .await
        .context("granting etcd leases")?;
    // A lost lease with the cluster config gone means etcd lost its data: writes then wait for the ResetHandler.
    leases.guard_resets(causeway_kvstore::cluster_config_key(cluster.name.as_str()));
    let heartbeat = Arc::new(causeway_kvstore::Heartbeat::start(
        etcd.clone(),
        leases.clone(),
        causeway_kvstore::HEARTBEAT_INTERVAL,
    ));
    let sink = Arc::new(EtcdSink::start(etcd.clone(), leases.clone(), cluster.name.as_str(), &EXPORTED_KINDS));
    // Node records have two writers (cluster Nodes, external workloads): one owner per name, a Node wins.
    let (node_owners, evictions) = NodeOwners::new(sink, cluster.name.as_str());

    let client = kube_client(&args).await?;
    let identities = Arc::new(KubeIdentityStore::new(client.clone(), cluster.clone(), args.identity_gc_grace));
    let restored = identities
        .start()
        .await
        .context("restoring identities from CausewayIdentity objects (is the CRD installed?)")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    // Restored identities are live (peers may still see traffic from them) until the GC collects them; they are in
    // the initial export, before the canaries.
    tx.send(Input::IdentitiesRestored(restored)).await.context("the export loop's channel is closed")?;
    let gc = identities.clone();
    // A GC pass is an in-memory scan (kube calls only for garbage), so it can run often; a quarter of the grace
    // keeps an identity's lifetime within 1.25 × grace.
    let gc_every = (args.identity_gc_grace / 4).max(Duration::from_secs(1));
    let gc_tx = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(gc_every);
        loop {
            tick.tick().await;
            let report = gc.gc_once().await;
            if !report.deleted.is_empty() || !report.failed.is_empty() {
                info!(deleted = report.deleted.len(), failed = report.failed.len(), "identity garbage collection");
            }
            for e in report.failed {
                warn!(error = %e, "identity garbage collection failed for one identity");
            }
            if !report.deleted.is_empty() && gc_tx.send(Input::IdentitiesCollected(report.deleted)).await.is_err() {
                return;
            }
        }
    });

    let (current_peers, peers_rx) = tokio::sync::watch::channel(args.peers.clone());
    let (recreated, recreated_rx) = tokio::sync::watch::channel(0u64);
    let peer_task = args.peers_configmap.clone().map(|config_map| {
        let peer_metrics = clustermesh_apiserver::peers::PeerMetrics::default();
        health.with_registry(|r| peer_metrics.register(r));
        info!(configmap = %config_map, "peer etcd users follow the peers ConfigMap");
        tokio::spawn(clustermesh_apiserver::peers::run(clustermesh_apiserver::peers::PeerTask {
            kube: client.clone(),
            config_map,
            etcd: etcd.clone(),
            cluster: cluster.name.to_string(),
            floor: args.peers.clone(),
            metrics: peer_metrics,
            current: current_peers,
            resets: recreated_rx,
        }))
    });
    let resets = tokio::spawn(
        ResetHandler {
            detector,
            etcd: etcd.clone(),
            cluster: cluster.name.to_string(),
            peers: peers_rx,
            recreated,
            config,
            leases: leases.clone(),
            heartbeat,
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            export: tx.clone(),
        }
        .run(),
    );
    let workload_metrics = clustermesh_apiserver::workloads::WorkloadMetrics::default();
    health.with_registry(|r| workload_metrics.register(r));
    let shared = clustermesh_apiserver::workloads::Shared {
        client: client.clone(),
        cluster: cluster.clone(),
        sink: node_owners.view(Writer::Host),
        identities: identities.clone(),
        export: tx.clone(),
        metrics: workload_metrics,
        node_owners: Some((node_owners.cluster_node_names(), evictions)),
    };
    let workloads = clustermesh_apiserver::workloads::start(&args.workloads, shared).await?;
    let watchers = spawn_watchers(client, tx, metrics.clone(), args.enable_mcs_api);
    let mut export = ExportLoop::new(
        Exporter::new(cluster.clone(), metrics.clone()),
        node_owners.view(Writer::Cluster),
        identities,
        readiness,
        metrics,
    );
    if args.enable_mcs_api {
        info!("MCS API on: services with a ServiceExport are exported too");
        export = export.with_service_exports();
    }
    info!("exporting");
    tokio::select! {
        _ = export.run(rx) => bail!("the export loop stopped"),
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted; leaving exported keys to expire with their leases");
        }
    }
    for w in watchers {
        w.abort();
    }
    resets.abort();
    if let Some(p) = peer_task {
        p.abort();
    }
    if let Some(w) = workloads {
        w.abort();
    }
    Ok(())
}

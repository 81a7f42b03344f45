//! `identity-sync`: imports every remote cluster's store into one merged view and publishes it as EndpointSlices
//! (local kube API) and as the MeshView gRPC stream (node agents).
//!
//! With `--external-workload` it runs on a VM that joined a cluster instead: no kube API, `--cluster-name` and
//! `--cluster-id` are the home cluster's, and the remotes directory holds the home cluster's store under the home's
//! name (see `identity_sync::app`).
//!
//! With `--leader-elect`, several replicas run: all import the remotes and serve the stream, and the one holding the
//! `causeway-identity-sync` Lease writes the EndpointSlices. On SIGTERM the leader gives the Lease up, so a standby
//! takes over at once rather than when the Lease expires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_leader::{LeaderArgs, LeaderMetrics, Leadership};
use causeway_runtime::LogFormat;
use causeway_store::MaxConnectedClusters;
use clap::Parser;
use identity_sync::app::{self, AppConfig};
use identity_sync::election::Election;
use identity_sync::remotes::task::Timing;

#[derive(Debug, Parser)]
#[command(name = "identity-sync", version, about)]
struct Args {
    /// Name of the local cluster (as the remotes know it); with --external-workload, the home cluster's.
    #[arg(long, env = "CAUSEWAY_CLUSTER_NAME")]
    cluster_name: String,
    /// Numeric ID of the local cluster (1..=255, or 1..=511 with --max-connected-clusters 511); with
    /// --external-workload, the home cluster's.
    #[arg(long, env = "CAUSEWAY_CLUSTER_ID")]
    cluster_id: u32,
    /// Size of the mesh: 255 or 511. Must match every remote's.
    #[arg(long, env = "CAUSEWAY_MAX_CONNECTED_CLUSTERS", default_value_t = 255)]
    max_connected_clusters: u32,
    /// Directory with one file per remote cluster (usually a mounted Secret); changes are picked up live.
    #[arg(long, env = "CAUSEWAY_REMOTES_DIR", default_value = "/var/lib/causeway/remotes")]
    remotes_dir: PathBuf,
    /// Kubeconfig for the local cluster; default: $KUBECONFIG, ~/.kube/config, then in-cluster.
    #[arg(long, env = "CAUSEWAY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Revoke a disconnected remote's entries after this long (e.g. "10m"). Unset: keep them until it reconnects.
    #[arg(long, env = "CAUSEWAY_CACHE_TTL", value_parser = humantime::parse_duration)]
    cache_ttl: Option<Duration>,
    /// Longest time a remote that has not synced may hold back readiness.
    #[arg(long, env = "CAUSEWAY_REMOTE_READY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2m")]
    remote_ready_timeout: Duration,
    /// Address of the MeshView gRPC stream for node agents.
    #[arg(long, env = "CAUSEWAY_GRPC_ADDR", default_value = "0.0.0.0:9890")]
    grpc_addr: SocketAddr,
    /// Address for /metrics, /healthz, /readyz and /status.
    #[arg(long, env = "CAUSEWAY_METRICS_ADDR", default_value = "0.0.0.0:9891")]
    metrics_addr: SocketAddr,
    /// Least time between two writes of one EndpointSlice; changes within it coalesce into one write. With 0, a
    /// slice is rewritten as soon as its previous write finished (changes during a write still coalesce).
    #[arg(long, env = "CAUSEWAY_ENDPOINTSLICE_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "0s")]
    endpointslice_interval: Duration,
    /// EndpointSlice writes in flight at once, over all slices (one per slice at a time).
    #[arg(long, env = "CAUSEWAY_ENDPOINTSLICE_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    endpointslice_concurrency: u16,
    /// Run on an external workload (a VM joined to the home cluster named by --cluster-name/--cluster-id): no kube
    /// API; the remotes directory holds a file named after the home cluster (its etcd endpoint and the
    /// externalworkload certificates), imported like a remote. The MeshView stream serves the home cluster's nodes,
    /// ipcache and identities to the VM's node agent.
    #[arg(long, env = "CAUSEWAY_EXTERNAL_WORKLOAD", default_value_t = false)]
    external_workload: bool,
    /// Put the local cluster's Ready ExternalWorkloads (hosts with a WireGuard key) into the mesh view, so the
    /// local node agents peer with them. Needs list/watch on externalworkloads.causeway.io.
    #[arg(long, env = "CAUSEWAY_WATCH_EXTERNAL_WORKLOADS", default_value_t = true, action = clap::ArgAction::Set)]
    watch_external_workloads: bool,
    /// Log format: text or json.
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    leader: LeaderArgs,
}

/// The Lease identity-sync replicas elect their EndpointSlice writer with, unless --leader-elect-lease-name says
/// otherwise.
const LEASE_NAME: &str = "causeway-identity-sync";

async fn kube_client(kubeconfig: Option<PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig found and not running in a pod: pass --kubeconfig or set KUBECONFIG")?,
    };
    kube::Client::try_from(config).context("building the kube client")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    causeway_runtime::init_logging(args.log_format);
    let mode = match MaxConnectedClusters::try_from(args.max_connected_clusters) {
        Ok(m) => m,
        Err(e) => bail!("--max-connected-clusters: {e}"),
    };
    if args.external_workload && args.kubeconfig.is_some() {
        bail!(
            "--kubeconfig (or CAUSEWAY_KUBECONFIG) cannot be used with --external-workload: on an external workload \
             identity-sync does not talk to any kube API; it reads the home cluster's store through the remotes \
             directory (--remotes-dir)"
        );
    }
    if args.external_workload && args.leader.leader_elect {
        bail!(
            "--leader-elect (or CAUSEWAY_LEADER_ELECT) cannot be used with --external-workload: on an external \
             workload identity-sync writes nothing to a kube API and runs once per VM, so there is nothing to elect a \
             leader for; drop --leader-elect"
        );
    }
    let lease = args.leader.config(LEASE_NAME).context("--leader-elect")?;
    let cfg = AppConfig {
        cluster_name: args.cluster_name,
        cluster_id: args.cluster_id,
        mode,
        remotes_dir: args.remotes_dir,
        rescan: Duration::from_secs(10),
        cache_ttl: args.cache_ttl,
        remote_ready_timeout: args.remote_ready_timeout,
        metrics_addr: args.metrics_addr,
        grpc_addr: args.grpc_addr,
        timing: Timing::default(),
        slice_debounce: args.endpointslice_interval,
        slice_concurrency: usize::from(args.endpointslice_concurrency),
        watch_external_workloads: args.watch_external_workloads,
    };
    let mut leadership: Option<Leadership> = None;
    let running = if args.external_workload {
        app::start_external_workload(cfg).await.context("starting identity-sync in external-workload mode")?
    } else {
        let kube = kube_client(args.kubeconfig).await?;
        match lease {
            None => app::start(cfg, kube).await.context("starting identity-sync")?,
            Some(lease) => {
                let identity = lease.identity.clone();
                let metrics = LeaderMetrics::default();
                let l = Leadership::spawn(kube.clone(), lease, metrics.clone()).context("--leader-elect")?;
                let election = Election::of(&l, &identity);
                leadership = Some(l);
                let running = app::start_elected(cfg, kube, election).await.context("starting identity-sync")?;
                running.health.with_registry(|r| metrics.register(r));
                running
            }
        }
    };
    tracing::info!(metrics = %running.metrics_addr, grpc = %running.grpc_addr, "identity-sync started");
    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(l) = leadership {
        // Stops this replica's writer and frees the Lease, so a standby writes from now on.
        l.release().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

//! External workloads (VMs, bare-metal hosts) joining the mesh.
//!
//! Where it sits: a host's join script calls `causeway.v1.Workloads/Register` (api/proto/causeway/v1/workload.proto)
//! on this apiserver over mTLS with the `externalworkload` certificate. The host must have an `ExternalWorkload`
//! object of its name; its labels are turned into an identity through the same allocator as pods, the host's
//! addresses are exported into the same store writer as pods' ipcache entries (`cilium/state/ip/v1/default/<ip>`),
//! its identity is handed to the export loop (exported under `cilium/state/identities/v1/`), and the object's
//! status gets the identity, the addresses and `Ready`. Peers therefore see the host exactly like a pod.
//!
//! - [`core`]: sans-IO decisions (authorisation by CN, request validation, what to write and withdraw).
//! - [`server`]: the tonic service carrying them out; [`tls`]: server mTLS and the peer's CN.
//!
//! Deleting the object withdraws the host; after a restart, hosts whose object status names their addresses are
//! exported again without re-registering. Not yet: a node record for the host (it needs the host's WireGuard key).

pub mod core;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use causeway_api::v1::workloads_server::WorkloadsServer;
use causeway_store::ClusterInfo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::kube::Input;
use crate::sink::{ExportSink, IdentityResolver};
pub use metrics::WorkloadMetrics;
pub use server::WorkloadService;

/// Command-line flags of the registration service (flattened into the binary's flags). Off unless `--workloads-addr`
/// is given; then the three TLS files are required.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadsArgs {
    /// Address for the external-workload registration service (gRPC, mTLS), e.g. 0.0.0.0:9963. Off when unset.
    #[arg(long = "workloads-addr", env = "CAUSEWAY_WORKLOADS_ADDR")]
    pub addr: Option<SocketAddr>,
    /// CA that signed the clients' certificates (the mesh CA).
    #[arg(long = "workloads-tls-ca", env = "CAUSEWAY_WORKLOADS_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// The service's certificate and key (the apiserver's server certificate).
    #[arg(long = "workloads-tls-cert", env = "CAUSEWAY_WORKLOADS_TLS_CERT")]
    pub cert: Option<PathBuf>,
    #[arg(long = "workloads-tls-key", env = "CAUSEWAY_WORKLOADS_TLS_KEY")]
    pub key: Option<PathBuf>,
}

/// What the service shares with the exporter.
pub struct Shared<S, R> {
    pub client: kube::Client,
    pub cluster: ClusterInfo,
    pub sink: Arc<S>,
    pub identities: Arc<R>,
    pub export: mpsc::Sender<Input>,
    pub metrics: WorkloadMetrics,
}

/// Binds and serves the registration service when `--workloads-addr` is set; None when it is off.
pub async fn start<S, R>(args: &WorkloadsArgs, shared: Shared<S, R>) -> Result<Option<JoinHandle<()>>>
where
    S: ExportSink + 'static,
    R: IdentityResolver + 'static,
{
    let Some(addr) = args.addr else { return Ok(None) };
    let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
        anyhow::bail!("--workloads-addr needs --workloads-tls-ca, --workloads-tls-cert and --workloads-tls-key (mTLS)");
    };
    let tls = tls::server_config(ca, cert, key)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the workloads service on {addr}"))?;
    let bound = listener.local_addr().context("workloads listener address")?;
    let service = std::sync::Arc::new(WorkloadService::new(
        shared.client,
        shared.cluster,
        shared.sink,
        shared.identities,
        shared.export,
        shared.metrics,
    ));
    let watch = AbortOnDrop(service.clone().spawn_watcher());
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("workloads service TLS configuration")?
        .add_service(WorkloadsServer::from_arc(service));
    info!(addr = %bound, "serving causeway.v1.Workloads (external-workload registration, mTLS)");
    Ok(Some(tokio::spawn(async move {
        let _watch = watch;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = server.serve_with_incoming(incoming).await {
            warn!(error = %e, "the workloads service stopped");
        }
    })))
}

/// Stops the object watcher together with the server task.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

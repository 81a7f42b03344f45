//! External workloads (VMs, bare-metal hosts) joining the mesh.
//!
//! Where it sits: a host's join script calls `causeway.v1.Workloads/Register` (api/proto/causeway/v1/workload.proto)
//! on this apiserver over mTLS with the `externalworkload` certificate. The host must have an `ExternalWorkload`
//! object of its name; its labels are turned into an identity through the same allocator as pods, the host's
//! addresses are exported into the same store writer as pods' ipcache entries (`cilium/state/ip/v1/default/<ip>`),
//! its identity is handed to the export loop (exported under `cilium/state/identities/v1/`), and the object's
//! status gets the identity, the addresses and `Ready`. Peers therefore see the host exactly like a pod.
//!
//! A host that registers a WireGuard public key joins the mesh datapath: its object's `spec.ipv4AllocCIDR` (which
//! must not overlap another host's range, the cluster's Service CIDRs or the host's own address) gives it a mesh
//! address (the range's first usable address), and it is exported like a cluster node too, through the same
//! writer: a node record `cilium/state/nodes/v1/<cluster>/<name>` (underlay addresses as internal IPs, the range as
//! pod CIDR, the key) that node agents and peers turn into a WireGuard peer, plus an ipcache entry for the mesh
//! address behind the underlay one. The answer tells the host its mesh address and how to reach the cluster's
//! services (Service CIDRs, DNS server, domain). A refused registration of an existing object sets `Ready=False`
//! with the reason.
//!
//! - [`core`]: sans-IO decisions (authorisation by CN, request validation, mesh address and range ownership, what
//!   to write and withdraw).
//! - [`server`]: the tonic service carrying them out; [`tls`]: server mTLS and the peer's CN.
//!
//! Deleting the object withdraws the host (ipcache entries, node record, identity); registering again without a
//! key withdraws the node record and mesh address. After a restart, hosts whose object status names their
//! addresses (and key) are exported again without re-registering.

pub mod core;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use causeway_api::v1::workloads_server::WorkloadsServer;
use causeway_store::ClusterInfo;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::kube::Input;
use crate::node_owners::ClusterNodeNames;
use crate::sink::{ExportSink, IdentityResolver};
pub use metrics::WorkloadMetrics;
pub use server::{ClusterNetwork, WorkloadService};

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
    /// This cluster's Service CIDRs, comma-separated (e.g. 10.96.0.0/12): told to registering hosts, which route them
    /// through the tunnel to a cluster node; a host's ipv4AllocCIDR may not overlap them.
    #[arg(long = "service-cidrs", env = "CAUSEWAY_SERVICE_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub service_cidrs: Vec<IpNet>,
    /// The cluster DNS Service as NAMESPACE/NAME: its ClusterIP is the DNS server registering hosts are told to use
    /// ("" in the answer when it does not exist). Empty: none.
    #[arg(
        long = "cluster-dns-service",
        env = "CAUSEWAY_CLUSTER_DNS_SERVICE",
        default_value = "kube-system/kube-dns",
        value_parser = parse_service_ref
    )]
    pub cluster_dns_service: ServiceRef,
    /// The cluster's DNS domain, told to registering hosts (their search domains).
    #[arg(long = "cluster-domain", env = "CAUSEWAY_CLUSTER_DOMAIN", default_value = "cluster.local", value_parser = parse_domain)]
    pub cluster_domain: String,
}

/// `NAMESPACE/NAME` of a Service, or none (an empty flag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef(pub Option<(String, String)>);

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_service_ref(s: &str) -> Result<ServiceRef, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(ServiceRef(None));
    }
    match s.split_once('/') {
        Some((ns, name)) if dns_label(ns) && dns_label(name) => Ok(ServiceRef(Some((ns.into(), name.into())))),
        _ => Err(format!("{s:?} is not NAMESPACE/NAME of a Service (e.g. kube-system/kube-dns)")),
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.trim().parse().map_err(|_| format!("{s:?} is not a CIDR such as 10.96.0.0/12"))?;
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

fn parse_domain(s: &str) -> Result<String, String> {
    let d = s.trim().trim_end_matches('.');
    if d.is_empty() || d.len() > 253 || !d.split('.').all(dns_label) {
        return Err(format!("{s:?} is not a DNS domain such as cluster.local"));
    }
    Ok(d.to_string())
}

impl WorkloadsArgs {
    /// What registering hosts are told about the cluster's network.
    pub fn network(&self) -> ClusterNetwork {
        ClusterNetwork {
            service_cidrs: self.service_cidrs.clone(),
            dns_service: self.cluster_dns_service.0.clone(),
            domain: self.cluster_domain.clone(),
        }
    }
}

/// What the service shares with the exporter.
pub struct Shared<S, R> {
    pub client: kube::Client,
    pub cluster: ClusterInfo,
    pub sink: Arc<S>,
    pub identities: Arc<R>,
    pub export: mpsc::Sender<Input>,
    pub metrics: WorkloadMetrics,
    /// Names cluster Nodes hold, and the hosts they evicted (from [`crate::node_owners::NodeOwners`]); `None`: no
    /// arbitration (tests of registration alone).
    pub node_owners: Option<(ClusterNodeNames, mpsc::UnboundedReceiver<String>)>,
}

/// Binds and serves the registration service when `--workloads-addr` is set; None when it is off. Hosts registered
/// before a restart are exported again before this returns, i.e. before the caller starts the export loop.
pub async fn start<S, R>(args: &WorkloadsArgs, shared: Shared<S, R>) -> Result<Option<JoinHandle<()>>>
where
    S: ExportSink + 'static,
    R: IdentityResolver + 'static,
{
    let Some(addr) = args.addr else { return Ok(None) };
    let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
        bail!("--workloads-addr needs --workloads-tls-ca, --workloads-tls-cert and --workloads-tls-key (mTLS)");
    };
    let tls = tls::server_config(ca, cert, key)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the workloads service on {addr}"))?;
    let bound = listener.local_addr().context("workloads listener address")?;
    let mut service = WorkloadService::new(
        shared.client,
        shared.cluster,
        shared.sink,
        shared.identities,
        shared.export,
        shared.metrics,
        args.network(),
    );
    let mut evictions = None;
    if let Some((names, rx)) = shared.node_owners {
        service = service.with_node_names(names);
        evictions = Some(rx);
    }
    let service = std::sync::Arc::new(service);
    match service.restore_all().await {
        Ok(n) => info!(objects = n, "external workloads registered before the restart are exported again"),
        // Not fatal: the watcher restores them once the kube API answers, only later than the initial export.
        Err(e) => warn!(error = %e, "cannot list ExternalWorkloads at start; the watcher will restore them"),
    }
    let watch = AbortOnDrop(service.clone().spawn_watcher());
    let evict = evictions.map(|rx| AbortOnDrop(service.clone().spawn_evictions(rx)));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("workloads service TLS configuration")?
        .add_service(WorkloadsServer::from_arc(service));
    info!(
        addr = %bound,
        service_cidrs = ?args.service_cidrs,
        dns_service = ?args.cluster_dns_service.0,
        domain = %args.cluster_domain,
        "serving causeway.v1.Workloads (external-workload registration, mTLS)"
    );
    Ok(Some(tokio::spawn(async move {
        let _watch = watch;
        let _evict = evict;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_validated() {
        assert_eq!(
            parse_service_ref("kube-system/kube-dns"),
            Ok(ServiceRef(Some(("kube-system".into(), "kube-dns".into()))))
        );
        assert_eq!(parse_service_ref(""), Ok(ServiceRef(None)));
        for bad in ["kube-dns", "a/b/c", "/x", "Kube/x"] {
            assert!(parse_service_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cidr("10.96.0.0/12").map(|n| n.to_string()), Ok("10.96.0.0/12".into()));
        assert!(parse_cidr("fd00:96::/108").is_ok());
        assert!(parse_cidr("10.96.0.1/12").is_err_and(|e| e.contains("10.96.0.0/12")));
        assert!(parse_cidr("10.96.0.0").is_err());
        assert_eq!(parse_domain("cluster.local."), Ok("cluster.local".into()));
        assert!(parse_domain("").is_err());
        assert!(parse_domain("a..b").is_err());
    }
}

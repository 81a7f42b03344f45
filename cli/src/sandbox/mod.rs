//! `causeway sandbox up|down|status`: two clusters on loopback, meshed, with a demo global service.
//!
//! Each cluster gets its own etcd (mTLS, client-certificate auth), an in-memory Kubernetes API stand-in, a
//! clustermesh-apiserver and an identity-sync. `up` creates the same global Service `shop/cart` in both clusters
//! with different backends, connects the clusters by writing each side's peer config, waits until each
//! identity-sync reports its peer synced, and prints the merged view: the EndpointSlices identity-sync wrote.

mod demo;
mod procs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use causeway_pki::{users, CertificateAuthority, ServerNames};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use procs::Proc;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{name} did not come up; last lines of {log}:\n{tail}")]
    NotStarted { name: String, log: PathBuf, tail: String },
    #[error("binary {0} not found next to the causeway binary: build the workspace first (scripts/sandbox.sh does)")]
    MissingBinary(String),
    #[error("etcd not found in PATH: run scripts/install-deps.sh")]
    MissingEtcd,
    #[error("a sandbox is already running in {0}: run `causeway sandbox down` first")]
    AlreadyRunning(PathBuf),
    #[error("no sandbox in {0}")]
    NotRunning(PathBuf),
    #[error("certificates: {0}")]
    Pki(#[from] causeway_pki::PkiError),
    #[error("kube API of cluster {cluster}: {source}")]
    Kube {
        cluster: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubeconfig of cluster {cluster}: {message}")]
    Kubeconfig { cluster: String, message: String },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("timed out after {secs}s waiting for {what}; component logs are in {dir}")]
    Timeout { what: String, secs: u64, dir: PathBuf },
}

/// One sandbox cluster: its name, ID and where its parts listen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub id: u32,
    pub etcd: SocketAddr,
    pub kube_api: SocketAddr,
    pub kubeconfig: PathBuf,
    pub apiserver_metrics: SocketAddr,
    pub sync_metrics: SocketAddr,
    pub sync_grpc: SocketAddr,
    pub remotes_dir: PathBuf,
    pub procs: Vec<Proc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxState {
    pub dir: PathBuf,
    pub clusters: Vec<ClusterState>,
}

const STATE_FILE: &str = "state.json";
/// The two sandbox clusters and their disjoint pod and service ranges.
pub const CLUSTERS: [(&str, u32); 2] = [("east", 1), ("west", 2)];

/// Where the component binaries are: next to the running `causeway` binary (cargo puts them together).
fn bin_dir() -> Result<PathBuf, SandboxError> {
    let exe = std::env::current_exe().map_err(|e| SandboxError::Io("locating the causeway binary".into(), e))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn component(bin_dir: &Path, name: &str) -> Result<PathBuf, SandboxError> {
    let p = bin_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(SandboxError::MissingBinary(name.to_string()))
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

pub fn load_state(dir: &Path) -> Result<SandboxState, SandboxError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| SandboxError::NotRunning(dir.to_path_buf()))?;
    serde_json::from_str(&text).map_err(|e| SandboxError::State { path, message: e.to_string() })
}

fn save_state(state: &SandboxState) -> Result<(), SandboxError> {
    let path = state.dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| SandboxError::State { path: path.clone(), message: e.to_string() })?;
    std::fs::write(&path, text).map_err(|e| SandboxError::Io(format!("writing {}", path.display()), e))
}

fn io<T>(what: impl Into<String>, r: std::io::Result<T>) -> Result<T, SandboxError> {
    r.map_err(|e| SandboxError::Io(what.into(), e))
}

/// Brings the sandbox up and returns its state once both clusters see each other.
pub async fn up(dir: &Path, timeout: Duration) -> Result<SandboxState, SandboxError> {
    if let Ok(state) = load_state(dir) {
        if state.clusters.iter().flat_map(|c| &c.procs).any(|p| procs::is_alive(p.pid)) {
            return Err(SandboxError::AlreadyRunning(dir.to_path_buf()));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    io(format!("creating {}", dir.display()), std::fs::create_dir_all(dir))?;
    let dir = io("resolving the sandbox directory", std::fs::canonicalize(dir))?;
    let bins = bin_dir()?;
    let etcd = which("etcd").ok_or(SandboxError::MissingEtcd)?;
    let apiserver_bin = component(&bins, "clustermesh-apiserver")?;
    let sync_bin = component(&bins, "identity-sync")?;
    let kube_bin = component(&bins, "fake-kube-apiserver")?;

    // One CA per cluster: it signs that cluster's etcd server certificate and the client certificates of everyone
    // allowed in (its own apiserver as root, each peer as remote-<peer>).
    let mut cas = Vec::new();
    for (name, _) in CLUSTERS {
        cas.push(CertificateAuthority::generate(&format!("causeway-{name}-etcd-ca"))?);
    }

    let mut state = SandboxState { dir: dir.clone(), clusters: Vec::new() };
    for (i, (name, id)) in CLUSTERS.into_iter().enumerate() {
        let cdir = dir.join(name);
        io("creating cluster dir", std::fs::create_dir_all(cdir.join("remotes")))?;
        let ca = &cas[i];
        let server = ca.issue_server("etcd", &ServerNames::loopback())?.write_bundle(&cdir.join("pki/etcd-server"))?;
        let admin = ca.issue_client(users::ROOT)?.write_bundle(&cdir.join("pki/admin"))?;

        let etcd_port = procs::free_port()?;
        let etcd_peer_port = procs::free_port()?;
        let etcd_addr: SocketAddr = ([127, 0, 0, 1], etcd_port).into();
        let etcd_url = format!("https://{etcd_addr}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_proc = procs::spawn(
            &format!("{name}/etcd"),
            &etcd,
            &[
                format!("--name={name}"),
                format!("--data-dir={}", cdir.join("etcd-data").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={name}={peer_url}"),
                format!("--cert-file={}", server.cert.display()),
                format!("--key-file={}", server.key.display()),
                format!("--trusted-ca-file={}", server.ca.display()),
                "--client-cert-auth".into(),
            ],
            &cdir.join("etcd.log"),
        )?;
        let mut cluster_procs = vec![etcd_proc.clone()];

        let kube_addr: SocketAddr = ([127, 0, 0, 1], procs::free_port()?).into();
        let kubeconfig = cdir.join("kubeconfig");
        let kube_proc = procs::spawn(
            &format!("{name}/kube-api"),
            &kube_bin,
            &["--listen".into(), kube_addr.to_string(), "--kubeconfig-out".into(), kubeconfig.display().to_string()],
            &cdir.join("kube-api.log"),
        )?;
        cluster_procs.push(kube_proc.clone());
        procs::wait_for_port(&etcd_proc, etcd_addr, Duration::from_secs(20))?;
        procs::wait_for_port(&kube_proc, kube_addr, Duration::from_secs(20))?;
        // What `kubectl apply -f crds/` (or the Helm chart) does on a real cluster.
        demo::install_crds(name, &kubeconfig).await?;

        let peer = CLUSTERS.iter().map(|(n, _)| *n).find(|n| *n != name).unwrap_or(name);
        let apiserver_metrics: SocketAddr = ([127, 0, 0, 1], procs::free_port()?).into();
        let common = |extra: &[String]| -> Vec<String> {
            let mut v = vec![
                format!("--cluster-name={name}"),
                format!("--cluster-id={id}"),
                format!("--kubeconfig={}", kubeconfig.display()),
            ];
            v.extend_from_slice(extra);
            v
        };
        let apiserver_proc = procs::spawn(
            &format!("{name}/clustermesh-apiserver"),
            &apiserver_bin,
            &common(&[
                format!("--etcd-endpoints={etcd_url}"),
                format!("--etcd-ca={}", admin.ca.display()),
                format!("--etcd-cert={}", admin.cert.display()),
                format!("--etcd-key={}", admin.key.display()),
                format!("--peers={peer}"),
                format!("--metrics-addr={apiserver_metrics}"),
            ]),
            &cdir.join("clustermesh-apiserver.log"),
        )?;
        cluster_procs.push(apiserver_proc.clone());

        let sync_metrics: SocketAddr = ([127, 0, 0, 1], procs::free_port()?).into();
        let sync_grpc: SocketAddr = ([127, 0, 0, 1], procs::free_port()?).into();
        let sync_proc = procs::spawn(
            &format!("{name}/identity-sync"),
            &sync_bin,
            &common(&[
                format!("--remotes-dir={}", cdir.join("remotes").display()),
                format!("--metrics-addr={sync_metrics}"),
                format!("--grpc-addr={sync_grpc}"),
            ]),
            &cdir.join("identity-sync.log"),
        )?;
        cluster_procs.push(sync_proc.clone());
        procs::wait_for_port(&apiserver_proc, apiserver_metrics, Duration::from_secs(30))?;
        procs::wait_for_port(&sync_proc, sync_metrics, Duration::from_secs(30))?;

        state.clusters.push(ClusterState {
            name: name.to_string(),
            id,
            etcd: etcd_addr,
            kube_api: kube_addr,
            kubeconfig,
            apiserver_metrics,
            sync_metrics,
            sync_grpc,
            remotes_dir: cdir.join("remotes"),
            procs: cluster_procs,
        });
        save_state(&state)?;
    }

    for (i, c) in state.clusters.iter().enumerate() {
        demo::create(c, i).await?;
    }
    for (i, c) in state.clusters.iter().enumerate() {
        for (j, peer) in state.clusters.iter().enumerate() {
            if i != j {
                connect(c, peer, &cas[j])?;
            }
        }
    }
    wait_synced(&state, timeout).await?;
    Ok(state)
}

/// Writes `local`'s peer config for `peer`: the peer's etcd endpoint and a `remote-<local>` client certificate
/// signed by the peer's CA. identity-sync picks the file up without a restart.
fn connect(local: &ClusterState, peer: &ClusterState, peer_ca: &CertificateAuthority) -> Result<(), SandboxError> {
    let bundle_dir = local.remotes_dir.join(format!("{}.pki", peer.name));
    let cert = peer_ca.issue_client(&users::remote(&local.name))?;
    let paths = cert.write_bundle(&bundle_dir)?;
    let yaml = format!(
        "endpoints:\n- https://{}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
        peer.etcd,
        paths.ca.display(),
        paths.cert.display(),
        paths.key.display()
    );
    let path = local.remotes_dir.join(&peer.name);
    io(format!("writing {}", path.display()), std::fs::write(&path, yaml))
}

async fn get_json(url: &str) -> Option<serde_json::Value> {
    let resp = reqwest::get(url).await.ok()?;
    resp.json().await.ok()
}

/// identity-sync's `/status` of one cluster.
pub async fn sync_status(c: &ClusterState) -> Option<serde_json::Value> {
    get_json(&format!("http://{}/status", c.sync_metrics)).await
}

async fn is_ready(addr: SocketAddr) -> bool {
    matches!(reqwest::get(format!("http://{addr}/readyz")).await, Ok(r) if r.status().is_success())
}

async fn wait_synced(state: &SandboxState, timeout: Duration) -> Result<(), SandboxError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for c in &state.clusters {
            all &= is_ready(c.apiserver_metrics).await && is_ready(c.sync_metrics).await;
            all &= demo::merged_backends(c).await.map(|m| m.len() >= state.clusters.len()).unwrap_or(false);
        }
        if all {
            return Ok(());
        }
        for c in &state.clusters {
            if let Some(p) = c.procs.iter().find(|p| !procs::is_alive(p.pid)) {
                return Err(SandboxError::NotStarted {
                    name: p.name.clone(),
                    log: p.log.clone(),
                    tail: procs::tail(&p.log),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(SandboxError::Timeout {
                what: "both clusters to see each other's backends".into(),
                secs: timeout.as_secs(),
                dir: state.dir.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A human-readable account of the merged view: per cluster, the backends of `shop/cart` by source cluster, and
/// identity-sync's view of each remote.
pub async fn describe(state: &SandboxState) -> String {
    let mut out = String::new();
    for c in &state.clusters {
        out.push_str(&format!(
            "cluster {} (id {}): etcd https://{}  kube API http://{}  (KUBECONFIG={})\n",
            c.name,
            c.id,
            c.etcd,
            c.kube_api,
            c.kubeconfig.display()
        ));
        match demo::merged_backends(c).await {
            Ok(by_cluster) => {
                out.push_str(&format!("  global service {}/{}:\n", demo::NAMESPACE, demo::SERVICE));
                for (source, addrs) in by_cluster {
                    out.push_str(&format!("    from {source:<6} {}\n", addrs.join(", ")));
                }
            }
            Err(e) => out.push_str(&format!("  (cannot read EndpointSlices: {e})\n")),
        }
        if let Some(status) = sync_status(c).await {
            out.push_str(&format!("  identity-sync /status: {}\n", status));
        }
        for p in &c.procs {
            let alive = if procs::is_alive(p.pid) { "running" } else { "STOPPED" };
            out.push_str(&format!("  {:<28} pid {:<7} {alive:<8} log {}\n", p.name, p.pid, p.log.display()));
        }
    }
    out
}

/// Stops every process of the sandbox in `dir` and removes the directory.
pub fn down(dir: &Path) -> Result<usize, SandboxError> {
    let state = load_state(dir)?;
    let mut stopped = 0;
    // Reverse order: consumers before the stores they read.
    for p in state.clusters.iter().flat_map(|c| c.procs.iter()).rev() {
        if procs::is_alive(p.pid) {
            procs::stop(p.pid, Duration::from_secs(3));
            stopped += 1;
        }
    }
    io(format!("removing {}", dir.display()), std::fs::remove_dir_all(dir))?;
    Ok(stopped)
}

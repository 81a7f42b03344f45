//! One test cluster: real etcd, the in-process kube API stand-in, and the real clustermesh-apiserver and
//! identity-sync binaries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_pki::{users, IssuedCert, Pki};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use crate::process::Proc;
use crate::{binary, eventually, Etcd, DEADLINE};

const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ready backend addresses of one service, by the cluster they come from.
pub type Backends = BTreeMap<String, BTreeSet<String>>;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub id: u32,
    /// etcd with mTLS and client-certificate auth (one CA per cluster); the apiserver connects as `root`.
    pub tls: bool,
    /// Peers that get a read-only `remote-<peer>` etcd user (mTLS only: without TLS there is no way to
    /// authenticate, and enabling etcd auth would lock out anonymous readers).
    pub peers: Vec<String>,
    /// identity-sync `--cache-ttl`.
    pub cache_ttl: Option<String>,
}

impl ClusterSpec {
    pub fn new(name: &str, id: u32) -> Self {
        ClusterSpec { name: name.to_string(), id, tls: false, peers: Vec::new(), cache_ttl: None }
    }

    pub fn tls(mut self, peers: &[&str]) -> Self {
        self.tls = true;
        self.peers = peers.iter().map(|p| p.to_string()).collect();
        self
    }
}

/// TLS material a peer uses to read a cluster's etcd.
#[derive(Debug, Clone)]
pub struct RemoteTls {
    pub cert: IssuedCert,
}

pub struct Cluster {
    pub name: String,
    pub id: u32,
    pub etcd: Etcd,
    // Field order is drop order: processes go before the kube API they talk to and the directory with their files.
    sync: Proc,
    apiserver: Proc,
    kube_server: FakeApiServerHandle,
    kube: kube::Client,
    pub apiserver_metrics: SocketAddr,
    pub sync_metrics: SocketAddr,
    /// identity-sync's MeshView gRPC stream (what node agents watch).
    pub sync_grpc: SocketAddr,
    remotes_dir: PathBuf,
    http: reqwest::Client,
    /// Local backends per (namespace, service): pod name → IP, the content of the service's local EndpointSlice.
    backends: Mutex<BTreeMap<(String, String), BTreeMap<String, String>>>,
    dir: tempfile::TempDir,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> anyhow::Result<T> {
    serde_json::from_value(v).context("test object literal does not match its kube type")
}

impl Cluster {
    /// Starts every part and waits until both binaries answer `/readyz`.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix(&format!("causeway-e2e-{}-", spec.name)).tempdir()?;
        let apiserver_bin = binary("clustermesh-apiserver")?;
        let sync_bin = binary("identity-sync")?;

        let etcd = if spec.tls {
            let pki = Pki::loopback().context("generating the cluster's etcd CA")?;
            Etcd::start_tls(&pki).await
        } else {
            Etcd::start().await
        };

        let kube_server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
        let kubeconfig = dir.path().join("kubeconfig");
        kube_server.write_kubeconfig(&kubeconfig)?;
        let kube_config = kube::Config::new(kube_server.url().parse().context("fake kube API URL")?);
        let kube = kube::Client::try_from(kube_config).context("building the kube client")?;
        install_crds(&kube).await?;

        let n = spec.id;
        let node: Node = from_json(json!({
            "metadata": {"name": format!("{}-node-1", spec.name),
                         "labels": {"topology.kubernetes.io/zone": format!("{}-1a", spec.name)}},
            "spec": {"podCIDR": format!("10.{n}.0.0/16"), "podCIDRs": [format!("10.{n}.0.0/16")]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{n}")}]}
        }))?;
        Api::<Node>::all(kube.clone()).create(&PostParams::default(), &node).await.context("creating the node")?;

        let remotes_dir = dir.path().join("remotes");
        std::fs::create_dir_all(&remotes_dir)?;

        let common = vec![
            format!("--cluster-name={}", spec.name),
            format!("--cluster-id={}", spec.id),
            format!("--kubeconfig={}", kubeconfig.display()),
        ];
        let apiserver_metrics = free_addr()?;
        let mut args = common.clone();
        args.push(format!("--etcd-endpoints={}", etcd.endpoint()));
        args.push(format!("--metrics-addr={apiserver_metrics}"));
        if etcd.is_tls() {
            let root = etcd.client_tls_for(users::ROOT).write_bundle(&dir.path().join("pki/root"))?;
            args.push(format!("--etcd-ca={}", root.ca.display()));
            args.push(format!("--etcd-cert={}", root.cert.display()));
            args.push(format!("--etcd-key={}", root.key.display()));
            if !spec.peers.is_empty() {
                args.push(format!("--peers={}", spec.peers.join(",")));
            }
        }
        let apiserver =
            Proc::spawn("clustermesh-apiserver", &apiserver_bin, &args, &dir.path().join("clustermesh-apiserver.log"))?;

        let sync_metrics = free_addr()?;
        let mut args = common;
        args.push(format!("--remotes-dir={}", remotes_dir.display()));
        args.push(format!("--metrics-addr={sync_metrics}"));
        let sync_grpc = free_addr()?;
        args.push(format!("--grpc-addr={sync_grpc}"));
        if let Some(ttl) = &spec.cache_ttl {
            args.push(format!("--cache-ttl={ttl}"));
        }
        let sync = Proc::spawn("identity-sync", &sync_bin, &args, &dir.path().join("identity-sync.log"))?;

        let cluster = Cluster {
            name: spec.name,
            id: spec.id,
            etcd,
            sync,
            apiserver,
            kube_server,
            kube,
            apiserver_metrics,
            sync_metrics,
            sync_grpc,
            remotes_dir,
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
            backends: Mutex::default(),
            dir,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Waits until both binaries answer `/readyz` with 2xx, failing early (with its log) if one exits.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        for (what, addr) in [("clustermesh-apiserver", self.apiserver_metrics), ("identity-sync", self.sync_metrics)] {
            let url = format!("http://{addr}/readyz");
            let res = eventually(&format!("{} {what} /readyz", self.name), DEADLINE, || async {
                self.check_alive()?;
                match self.http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("{} {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
            if let Err(e) = res {
                bail!("{e}\n{}", self.logs());
            }
        }
        Ok(())
    }

    /// Err if one of the binaries has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        for p in [&self.apiserver, &self.sync] {
            if !p.looks_alive() {
                return Err(format!("{} of cluster {} has exited; log tail:\n{}", p.name(), self.name, p.log_tail(30)));
            }
        }
        Ok(())
    }

    /// The kube client for this cluster's API.
    pub fn kube(&self) -> kube::Client {
        self.kube.clone()
    }

    pub fn kube_server(&self) -> &FakeApiServerHandle {
        &self.kube_server
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Tails of every component log, for failure messages.
    pub fn logs(&self) -> String {
        let etcd_log = self.etcd.log();
        let etcd_tail: Vec<&str> = etcd_log.lines().collect();
        format!(
            "==== {name}: clustermesh-apiserver ({}) ====\n{}\n==== {name}: identity-sync ({}) ====\n{}\n\
             ==== {name}: etcd ====\n{}\n",
            self.apiserver.log_path().display(),
            self.apiserver.log_tail(40),
            self.sync.log_path().display(),
            self.sync.log_tail(60),
            etcd_tail[etcd_tail.len().saturating_sub(10)..].join("\n"),
            name = self.name,
        )
    }

    // ---- kube objects -------------------------------------------------------------------------------------------

    pub async fn create_namespace(&self, ns: &str) -> anyhow::Result<()> {
        let obj: Namespace = from_json(json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(self.kube.clone())
            .create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("{}: creating namespace {ns}", self.name))?;
        Ok(())
    }

    /// A Service with `service.cilium.io/global: "true"` (plus `extra` annotations), selector `app=<name>`,
    /// port `http` 80 → 8080.
    pub async fn create_global_service(
        &self,
        ns: &str,
        name: &str,
        cluster_ip: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut annotations = vec![("service.cilium.io/global", "true")];
        annotations.extend_from_slice(extra);
        self.create_service(ns, name, cluster_ip, &annotations).await
    }

    /// A Service without the global annotation: its backends must stay in this cluster.
    pub async fn create_service_plain(&self, ns: &str, name: &str, cluster_ip: &str) -> anyhow::Result<()> {
        self.create_service(ns, name, cluster_ip, &[]).await
    }

    async fn create_service(
        &self,
        ns: &str,
        name: &str,
        cluster_ip: &str,
        annotations_in: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut annotations = serde_json::Map::new();
        for (k, v) in annotations_in {
            annotations.insert(k.to_string(), json!(v));
        }
        let svc: Service = from_json(json!({
            "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))?;
        Api::<Service>::namespaced(self.kube.clone(), ns)
            .create(&PostParams::default(), &svc)
            .await
            .with_context(|| format!("{}: creating service {ns}/{name}", self.name))?;
        self.backends.lock().unwrap_or_else(|e| e.into_inner()).entry((ns.into(), name.into())).or_default();
        self.write_local_slice(ns, name).await
    }

    /// Creates a running pod `pod` with `ip` behind service `svc` and adds it to the service's local EndpointSlice,
    /// as kube's EndpointSlice controller would.
    pub async fn add_backend(&self, ns: &str, svc: &str, pod: &str, ip: &str) -> anyhow::Result<()> {
        let node = format!("{}-node-1", self.name);
        let obj: Pod = from_json(json!({
            "metadata": {"name": pod, "namespace": ns, "labels": {"app": svc}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": format!("192.0.2.{}", self.id),
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))?;
        Api::<Pod>::namespaced(self.kube.clone(), ns)
            .create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("{}: creating pod {ns}/{pod}", self.name))?;
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((ns.into(), svc.into()))
            .or_default()
            .insert(pod.into(), ip.into());
        self.write_local_slice(ns, svc).await
    }

    /// Removes the pod from the service's local EndpointSlice and deletes it.
    pub async fn remove_backend(&self, ns: &str, svc: &str, pod: &str) -> anyhow::Result<()> {
        self.backends.lock().unwrap_or_else(|e| e.into_inner()).entry((ns.into(), svc.into())).or_default().remove(pod);
        self.write_local_slice(ns, svc).await?;
        Api::<Pod>::namespaced(self.kube.clone(), ns)
            .delete(pod, &DeleteParams::default())
            .await
            .with_context(|| format!("{}: deleting pod {ns}/{pod}", self.name))?;
        Ok(())
    }

    async fn write_local_slice(&self, ns: &str, svc: &str) -> anyhow::Result<()> {
        let pods = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ns.to_string(), svc.to_string()))
            .cloned()
            .unwrap_or_default();
        let node = format!("{}-node-1", self.name);
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|(pod, ip)| {
                json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                       "nodeName": node, "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
            })
            .collect();
        let name = format!("{svc}-local");
        let api = Api::<EndpointSlice>::namespaced(self.kube.clone(), ns);
        let ctx = || format!("{}: writing EndpointSlice {ns}/{name}", self.name);
        if api.get_opt(&name).await.with_context(ctx)?.is_some() {
            let patch = json!({"endpoints": endpoints});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.with_context(ctx)?;
        } else {
            let slice: EndpointSlice = from_json(json!({
                "metadata": {"name": name, "namespace": ns,
                    "labels": {SERVICE_NAME_LABEL: svc,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            }))?;
            api.create(&PostParams::default(), &slice).await.with_context(ctx)?;
        }
        Ok(())
    }

    /// What a user sees for service `ns/svc`: the ready addresses of every EndpointSlice of the service, grouped by
    /// `multicluster.kubernetes.io/source-cluster` (slices without it are this cluster's own).
    pub async fn backends(&self, ns: &str, svc: &str) -> anyhow::Result<Backends> {
        let slices = Api::<EndpointSlice>::namespaced(self.kube.clone(), ns)
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={svc}")))
            .await
            .with_context(|| format!("{}: listing EndpointSlices of {ns}/{svc}", self.name))?;
        let mut out = Backends::new();
        for s in slices {
            let source = s.metadata.labels.as_ref().and_then(|l| l.get(SOURCE_CLUSTER_LABEL)).cloned();
            let entry = out.entry(source.unwrap_or_else(|| self.name.clone())).or_default();
            for e in &s.endpoints {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if ready {
                    entry.extend(e.addresses.iter().cloned());
                }
            }
        }
        out.retain(|_, v| !v.is_empty());
        Ok(out)
    }

    /// Waits until [`Cluster::backends`] equals `want`.
    pub async fn wait_backends(&self, ns: &str, svc: &str, want: &Backends) -> anyhow::Result<()> {
        let res = eventually(&format!("{}: backends of {ns}/{svc} to be {want:?}", self.name), DEADLINE, || async {
            match self.backends(ns, svc).await {
                Ok(b) if &b == want => Ok(()),
                Ok(b) => Err(format!("{b:?}")),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await;
        match res {
            Ok(()) => Ok(()),
            Err(e) => {
                let slices = self.describe_slices(ns, svc).await;
                Err(anyhow::anyhow!("{e}\nEndpointSlices in {}:\n{slices}", self.name))
            }
        }
    }

    /// One line per EndpointSlice of `ns/svc`: name, labels, endpoints (for failure messages).
    pub async fn describe_slices(&self, ns: &str, svc: &str) -> String {
        let list = Api::<EndpointSlice>::namespaced(self.kube.clone(), ns)
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={svc}")))
            .await;
        match list {
            Ok(list) => list
                .items
                .iter()
                .map(|s| {
                    let eps: Vec<String> = s
                        .endpoints
                        .iter()
                        .map(|e| format!("{:?} ready={:?}", e.addresses, e.conditions.as_ref().and_then(|c| c.ready)))
                        .collect();
                    format!(
                        "  {} labels={:?} endpoints={eps:?}",
                        s.metadata.name.clone().unwrap_or_default(),
                        s.metadata.labels.clone().unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("  (cannot list: {e})"),
        }
    }

    /// The identity-sync-written EndpointSlices in `ns` (label `multicluster.kubernetes.io/source-cluster`).
    pub async fn imported_slices(&self, ns: &str) -> anyhow::Result<Vec<EndpointSlice>> {
        let list = Api::<EndpointSlice>::namespaced(self.kube.clone(), ns)
            .list(&ListParams::default().labels(SOURCE_CLUSTER_LABEL))
            .await
            .with_context(|| format!("{}: listing imported EndpointSlices in {ns}", self.name))?;
        Ok(list.items)
    }

    // ---- identity-sync status --------------------------------------------------------------------------------------

    /// identity-sync's `/status` JSON.
    pub async fn status(&self) -> anyhow::Result<Value> {
        let url = format!("http://{}/status", self.sync_metrics);
        let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("GET {url}: {status}");
        }
        resp.json().await.with_context(|| format!("GET {url}: not JSON"))
    }

    /// The `/status` entry of one remote, if identity-sync lists it.
    pub async fn remote_status(&self, remote: &str) -> anyhow::Result<Option<Value>> {
        let status = self.status().await?;
        let remotes = status.get("remotes").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(remotes.into_iter().find(|r| r.get("name").and_then(Value::as_str) == Some(remote)))
    }

    /// Waits until remote `remote`'s `/status` entry satisfies `check` (which describes what it saw on failure).
    pub async fn wait_remote(&self, remote: &str, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        eventually(&format!("{}: remote {remote} {what}", self.name), DEADLINE, || async {
            match self.remote_status(remote).await {
                Ok(Some(r)) if check(&r) => Ok(r),
                Ok(Some(r)) => Err(r.to_string()),
                Ok(None) => Err("not listed in /status".to_string()),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await
    }

    /// identity-sync's Prometheus text.
    pub async fn sync_metrics_text(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.sync_metrics);
        let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        Ok(resp.text().await?)
    }

    // ---- connecting ---------------------------------------------------------------------------------------------

    /// The TLS material `self` uses to read `peer`'s etcd: a `remote-<self>` certificate from `peer`'s CA.
    pub fn credentials_for(&self, peer: &Cluster) -> Option<RemoteTls> {
        peer.etcd.is_tls().then(|| RemoteTls { cert: peer.etcd.client_tls_for(&users::remote(&self.name)) })
    }

    /// Connects this cluster's identity-sync to `peer` (writes `remotes/<peer>`).
    pub fn connect_to(&self, peer: &Cluster) -> anyhow::Result<()> {
        self.write_remote(&peer.name, &peer.etcd.endpoint(), self.credentials_for(peer).as_ref())
    }

    /// Writes the remote config file for `remote` atomically (temp file + rename), with the TLS files next to it
    /// outside the remotes directory.
    pub fn write_remote(&self, remote: &str, endpoint: &str, tls: Option<&RemoteTls>) -> anyhow::Result<()> {
        let mut yaml = format!("endpoints:\n- {endpoint}\n");
        if let Some(tls) = tls {
            let paths = tls.cert.write_bundle(&self.dir.path().join("remote-pki").join(remote))?;
            yaml.push_str(&format!(
                "trusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                paths.ca.display(),
                paths.cert.display(),
                paths.key.display()
            ));
        }
        self.write_remote_raw(remote, &yaml)
    }

    /// Writes `content` as the remote config file `remotes/<remote>`.
    pub fn write_remote_raw(&self, remote: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(format!(".remote-{remote}.tmp"));
        std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        let path = self.remotes_dir.join(remote);
        std::fs::rename(&tmp, &path).with_context(|| format!("moving the remote config to {}", path.display()))
    }

    /// Removes the remote config file `remotes/<remote>`.
    pub fn remove_remote(&self, remote: &str) -> anyhow::Result<()> {
        let path = self.remotes_dir.join(remote);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

async fn install_crds(kube: &kube::Client) -> anyhow::Result<()> {
    let api = Api::<CustomResourceDefinition>::all(kube.clone());
    for crd in causeway_crds::all_crds() {
        api.create(&PostParams::default(), &crd).await.context("installing Causeway's CRDs in the fake kube API")?;
    }
    Ok(())
}

/// Two (or more) clusters meshed with each other: every cluster connected to every other, all with or all without
/// mTLS.
pub async fn start_mesh(clusters: &[(&str, u32)], tls: bool) -> anyhow::Result<Vec<Cluster>> {
    let names: Vec<&str> = clusters.iter().map(|(n, _)| *n).collect();
    let mut out = Vec::new();
    for (name, id) in clusters {
        let peers: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
        let mut spec = ClusterSpec::new(name, *id);
        if tls {
            spec = spec.tls(&peers);
        }
        out.push(Cluster::start(spec).await?);
    }
    Ok(out)
}

//! Cluster "west" on top of the [`Network`]: the fake kube API (the one stand-in), `causeway clustermesh enable`'s
//! certificates, a real etcd with mTLS and auth, the real clustermesh-apiserver (registrations on its `workloads`
//! port) and identity-sync, the real node agent on node1 with WireGuard, the echo and DNS pods, and the kube-proxy
//! stand-in. Then the joining host: the real join script from `causeway external-workload install`, run inside
//! vm1, and the two services it installs, started from their unit files.
//!
//! Reachability, as in a cluster: the apiserver's Service is a "load balancer" at [`CONTROL_IP`] on the underlay
//! (this process forwards its ports from the switch namespace to the processes on the root namespace's
//! loopback); node1 reaches the kube API and west's identity-sync on its own loopback (forwarded the same way).
//! vm1 gets nothing but the underlay.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use causeway_crds::ExternalWorkload;
use causeway_datapath::bpf::loader;
use causeway_multicluster_tests::{binary, Proc};
use causeway_testsupport::netns::{self, Netns};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use crate::net::{
    EchoServer, Network, CONTROL_IP, DNS_POD_IP, ECHO_POD_IP, ECHO_PORT, NODE1_IP, NODE1_POD_CIDR, VM_IP,
};
use crate::{dns, kube_proxy};

pub const CLUSTER: &str = "west";
pub const CLUSTER_ID: u32 = 2;
pub const DOMAIN: &str = "cluster.local";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const KUBERNETES_IP: &str = "10.96.0.1";
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
/// The global Service in front of the echo pod.
pub const ECHO_SERVICE_IP: &str = "10.96.0.20";
pub const ECHO_SERVICE_PORT: u16 = 80;
pub const WORKLOAD: &str = "vm1";
pub const WORKLOAD_CIDR: &str = "10.192.1.0/30";
/// The workload's labels (its identity's).
pub const WORKLOAD_LABELS: &[(&str, &str)] = &[("app", "legacy-db"), ("tier", "backend")];
pub const ETCD_PORT: u16 = 2379;
pub const WORKLOADS_PORT: u16 = 9965;
pub const WG_PORT: u16 = 51871;
const NODE_WG_KEY_ANNOTATION: &str = "causeway.io/wireguard-pub-key";
const AGENT_METRICS_PORT: u16 = 9964;
pub const SOON: Duration = Duration::from_secs(90);

/// A process run with a pipe-less log, killed and reaped on drop.
struct EtcdProc(Child);

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bpffs pin directory and a state directory, uninstalled/removed on drop (also on panic).
pub struct AgentDirs {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl AgentDirs {
    fn new(tag: &str) -> Result<AgentDirs> {
        let name = netns::unique_name(&format!("cwx-{tag}"));
        let dirs = AgentDirs {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            state_dir: std::env::temp_dir().join(format!("{name}.state")),
        };
        std::fs::create_dir_all(&dirs.state_dir)?;
        Ok(dirs)
    }
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            if let Err(e) = loader::uninstall(&self.pin_dir) {
                eprintln!("cleanup of {}: {e}", self.pin_dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub struct Testbed {
    // Field order is drop order: processes first, then forwarders, pods' servers, the network, etcd, the kube API,
    // the runtime, the directories.
    pub vm_agent: Option<Proc>,
    pub vm_sync: Option<Proc>,
    node_agent: Option<Proc>,
    dnsmasq: Option<Proc>,
    west_sync: Option<Proc>,
    apiserver: Option<Proc>,
    _echo: Option<EchoServer>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    pub net: Network,
    _etcd: EtcdProc,
    pub etcd_port: u16,
    _kube_server: FakeApiServerHandle,
    pub kube: kube::Client,
    pub rt: tokio::runtime::Runtime,
    pub kubeconfig: PathBuf,
    /// The root client certificate of west's etcd (ca.crt, tls.crt, tls.key).
    pub root_tls: PathBuf,
    pub node1_dirs: AgentDirs,
    pub node1_wg: String,
    /// vm1's bpffs pin directory (the join script's CAUSEWAY_BPFFS_ROOT), cleaned up if the test dies before the
    /// script's uninstall.
    pub vm_dirs: AgentDirs,
    pub vm_wg: String,
    pub dir: tempfile::TempDir,
}

/// Namespaces the test forwards root-namespace services into.
#[derive(Clone, Copy)]
enum Which {
    Ctl,
    Node1,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("test object literal does not match its kube type")
}

impl Testbed {
    /// Builds the network and cluster west with node1, its pods and Services, and the ExternalWorkload `vm1`;
    /// returns when every process is ready.
    pub fn start() -> Result<Testbed> {
        let mut dir = tempfile::Builder::new().prefix("causeway-ew-e2e-").tempdir()?;
        // CAUSEWAY_E2E_KEEP=1 keeps the logs, the host's root and the certificates for a look afterwards.
        if std::env::var("CAUSEWAY_E2E_KEEP").as_deref() == Ok("1") {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let net = Network::build().context("building the network namespaces")?;
        let kube_server = rt.block_on(FakeApiServer::start("127.0.0.1:0".parse()?))?;
        let kubeconfig = dir.path().join("kubeconfig");
        kube_server.write_kubeconfig(&kubeconfig)?;
        let kube = {
            let _guard = rt.enter();
            kube::Client::try_from(kube::Config::new(kube_server.url().parse()?))?
        };
        rt.block_on(create_base_objects(&kube))?;

        // The mesh certificates, as a user makes them.
        let enable = Command::new(binary("causeway")?)
            .args(["clustermesh", "enable", "--cluster-name", CLUSTER, "--cluster-id", &CLUSTER_ID.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .output()?;
        ensure!(enable.status.success(), "causeway clustermesh enable: {}", String::from_utf8_lossy(&enable.stderr));
        let server_tls = dir.path().join("server-tls");
        rt.block_on(secret_files(&kube, "clustermesh-apiserver-server-cert", &server_tls))?;
        let ca_secret = rt.block_on(secret_files(&kube, "causeway-clustermesh-ca", &dir.path().join("ca")))?;
        let (Some(ca_cert), Some(ca_key)) = (ca_secret.get("ca.crt"), ca_secret.get("ca.key")) else {
            bail!("the CA Secret has no ca.crt/ca.key");
        };
        let authority = causeway_pki::CertificateAuthority::from_pem(ca_cert, ca_key)?;
        let root_tls = dir.path().join("root-tls");
        authority.issue_client(causeway_pki::users::ROOT)?.write_bundle(&root_tls)?;

        let etcd_port = free_port()?;
        let etcd = start_etcd(dir.path(), &server_tls, etcd_port)?;
        let node1_dirs = AgentDirs::new("node1")?;
        let vm_dirs = AgentDirs::new("vm1")?;
        let mut tb = Testbed {
            vm_agent: None,
            vm_sync: None,
            node_agent: None,
            dnsmasq: None,
            west_sync: None,
            apiserver: None,
            _echo: None,
            forwarders: Vec::new(),
            net,
            _etcd: etcd,
            etcd_port,
            _kube_server: kube_server,
            kube,
            rt,
            kubeconfig,
            root_tls,
            node1_dirs,
            node1_wg: netns::unique_ifname("cwxn"),
            vm_dirs,
            vm_wg: netns::unique_ifname("cwxv"),
            dir,
        };
        let workloads_port = free_port()?;
        tb.forward(
            Which::Ctl,
            SocketAddr::from((CONTROL_IP, ETCD_PORT)),
            SocketAddr::from(([127, 0, 0, 1], etcd_port)),
        )?;
        tb.forward(
            Which::Ctl,
            SocketAddr::from((CONTROL_IP, WORKLOADS_PORT)),
            SocketAddr::from(([127, 0, 0, 1], workloads_port)),
        )?;
        tb.rt.block_on(create_cluster_objects(&tb.kube))?;
        tb.start_apiserver(&server_tls, workloads_port)?;
        let sync_grpc = tb.start_west_sync()?;
        let kube_addr = tb._kube_server.addr;
        tb.forward(Which::Node1, SocketAddr::from(([127, 0, 0, 1], kube_addr.port())), kube_addr)?;
        tb.forward(Which::Node1, SocketAddr::from(([127, 0, 0, 1], sync_grpc.port())), sync_grpc)?;
        tb.start_node_agent(sync_grpc.port())?;
        tb.wait_node_key_published()?;
        let rules = tb.rt.block_on(kube_proxy::sync(&tb.kube, &tb.net.node1))?;
        ensure!(rules.len() >= 3, "the kube-proxy stand-in programmed too few rules: {rules:?}");
        let log = tb.log("dnsmasq");
        tb.dnsmasq = Some(tb.rt.block_on(dns::start(&tb.kube, &tb.net.dns.ns, DNS_POD_IP, DOMAIN, &log))?);
        tb._echo = Some(EchoServer::start(&tb.net.echo.ns, SocketAddr::from((ECHO_POD_IP, ECHO_PORT)))?);
        Ok(tb)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Accepts on `listen` inside `ns` and connects each connection to `target` from the root namespace.
    fn forward(&mut self, ns: Which, listen: SocketAddr, target: SocketAddr) -> Result<()> {
        let ns = match ns {
            Which::Ctl => &self.net.ctl,
            Which::Node1 => &self.net.node1,
        };
        let l = ns.run_in(move || TcpListener::bind(listen))?.with_context(|| format!("binding {listen}"))?;
        l.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(l)?;
        self.forwarders.push(self.rt.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
        Ok(())
    }

    fn start_apiserver(&mut self, server_tls: &Path, workloads_port: u16) -> Result<()> {
        let bin = binary("clustermesh-apiserver")?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let f = |d: &Path, n: &str| d.join(n).display().to_string();
        let mut args = vec![
            format!("--cluster-name={CLUSTER}"),
            format!("--cluster-id={CLUSTER_ID}"),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--etcd-endpoints=https://127.0.0.1:{}", self.etcd_port),
            format!("--etcd-ca={}", f(&self.root_tls, "ca.crt")),
            format!("--etcd-cert={}", f(&self.root_tls, "tls.crt")),
            format!("--etcd-key={}", f(&self.root_tls, "tls.key")),
            // A peer makes the apiserver create the etcd users (externalworkload among them) and enable auth.
            "--peers=east".into(),
            format!("--metrics-addr={metrics}"),
            format!("--workloads-addr=127.0.0.1:{workloads_port}"),
            format!("--workloads-tls-ca={}", f(server_tls, "ca.crt")),
            format!("--workloads-tls-cert={}", f(server_tls, "tls.crt")),
            format!("--workloads-tls-key={}", f(server_tls, "tls.key")),
        ];
        args.push(format!("--service-cidrs={SERVICE_CIDR}"));
        let log = self.log("clustermesh-apiserver");
        self.apiserver = Some(Proc::spawn("clustermesh-apiserver", &bin, &args, &log)?);
        wait_http(None, metrics, "/readyz", SOON, || self.apiserver.as_mut().is_some_and(|p| p.is_running()))
            .with_context(|| format!("clustermesh-apiserver never became ready:\n{}", tail(&log, 40)))
    }

    fn start_west_sync(&mut self) -> Result<SocketAddr> {
        let bin = binary("identity-sync")?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let remotes = self.dir.path().join("west-remotes");
        std::fs::create_dir_all(&remotes)?;
        let args = vec![
            format!("--cluster-name={CLUSTER}"),
            format!("--cluster-id={CLUSTER_ID}"),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--remotes-dir={}", remotes.display()),
            format!("--grpc-addr={grpc}"),
            format!("--metrics-addr={metrics}"),
        ];
        let log = self.log("identity-sync-west");
        self.west_sync = Some(Proc::spawn("identity-sync", &bin, &args, &log)?);
        wait_http(None, metrics, "/readyz", SOON, || self.west_sync.as_mut().is_some_and(|p| p.is_running()))
            .with_context(|| format!("west's identity-sync never became ready:\n{}", tail(&log, 40)))?;
        Ok(grpc)
    }

    fn start_node_agent(&mut self, sync_port: u16) -> Result<()> {
        let bin = binary("causeway-node-agent")?;
        let args = vec![
            format!("--net={}", self.net.node1.path().display()),
            bin.to_string_lossy().into_owned(),
            "--node-name=node1".into(),
            format!("--node-ip={NODE1_IP}"),
            format!("--identity-sync-addr=http://127.0.0.1:{sync_port}"),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--metrics-addr={NODE1_IP}:{AGENT_METRICS_PORT}"),
            format!("--bpffs-root={}", self.node1_dirs.pin_dir.display()),
            format!("--state-dir={}", self.node1_dirs.state_dir.display()),
            format!("--wireguard-interface={}", self.node1_wg),
            format!("--wireguard-port={WG_PORT}"),
            "--gc-interval=1".into(),
        ];
        let log = self.log("agent-node1");
        self.node_agent = Some(Proc::spawn("agent-node1", Path::new("nsenter"), &args, &log)?);
        let addr = SocketAddr::from((NODE1_IP, AGENT_METRICS_PORT));
        wait_http(Some(&self.net.node1), addr, "/readyz", SOON, || {
            self.node_agent.as_mut().is_some_and(|p| p.is_running())
        })
        .with_context(|| format!("node1's agent never became ready:\n{}", tail(&log, 40)))
    }

    /// The agent publishes its WireGuard public key on its Node (clustermesh-apiserver exports it in node1's
    /// record, which is how the joining host learns it); it must match the agent's key file.
    fn wait_node_key_published(&self) -> Result<()> {
        let nodes = Api::<Node>::all(self.kube.clone());
        let mut published = None;
        let ok = netns::wait_for(SOON, || {
            published = self
                .rt
                .block_on(nodes.get("node1"))
                .ok()
                .and_then(|n| n.metadata.annotations)
                .and_then(|mut a| a.remove(NODE_WG_KEY_ANNOTATION));
            published.is_some()
        });
        ensure!(ok, "node1's agent never published {NODE_WG_KEY_ANNOTATION}:\n{}", tail(&self.log("agent-node1"), 30));
        let key = std::fs::read_to_string(self.node1_dirs.state_dir.join("wireguard.key"))?;
        let private: causeway_datapath::wireguard::PrivateKey = key.trim().parse()?;
        ensure!(
            published.as_deref() == Some(private.public_key().to_base64().as_str()),
            "node1 publishes {published:?}, not the public key of its key file"
        );
        Ok(())
    }

    // ------------------------------------------------------------------ the joining host

    /// `causeway external-workload install <name>` against west's kube API, with the workspace's binaries.
    pub fn render_join_script(&self, name: &str) -> Result<String> {
        let out = Command::new(binary("causeway")?)
            .args(["external-workload", "install", name])
            .arg("--agent-binary")
            .arg(binary("causeway-node-agent")?)
            .arg("--identity-sync-binary")
            .arg(binary("identity-sync")?)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "causeway external-workload install: {stderr}");
        // The Service's address is in the server certificate and both ports are named: nothing to warn about.
        ensure!(!stderr.contains("warning"), "causeway external-workload install warned: {stderr}");
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `bash <script> <args>` inside vm1 under `root` (CAUSEWAY_JOIN_ROOT), as root on the host would, with
    /// the test's unique WireGuard interface and pin directory. Returns (success, stdout, stderr).
    pub fn run_join_script(&self, script: &Path, root: &Path, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.net.vm1.path().display()))
            .arg("bash")
            .arg(script)
            .args(args)
            .env("CAUSEWAY_JOIN_ROOT", root)
            .env("CAUSEWAY_NODE_IP", VM_IP.to_string())
            .env("CAUSEWAY_WIREGUARD_INTERFACE", &self.vm_wg)
            .env("CAUSEWAY_BPFFS_ROOT", &self.vm_dirs.pin_dir)
            .env("CAUSEWAY_REGISTER_TIMEOUT", "60s")
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Starts a unit installed under `root` the way systemd would: its EnvironmentFile= lines in order, its
    /// ExecStart= command line, inside vm1.
    pub fn start_unit(&self, root: &Path, unit: &str) -> Result<Proc> {
        let text = std::fs::read_to_string(root.join("etc/systemd/system").join(unit))
            .with_context(|| format!("reading the installed unit {unit}"))?;
        let mut env = BTreeMap::new();
        let mut exec = None;
        for line in text.lines() {
            if let Some(file) = line.strip_prefix("EnvironmentFile=") {
                let content = std::fs::read_to_string(file).with_context(|| format!("{unit}: reading {file}"))?;
                for l in content.lines().filter(|l| !l.trim_start().starts_with('#')) {
                    if let Some((k, v)) = l.split_once('=') {
                        env.insert(k.trim().to_string(), v.trim().to_string());
                    }
                }
            } else if let Some(cmd) = line.strip_prefix("ExecStart=") {
                exec = Some(cmd.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            }
        }
        let exec = exec.context("the unit has no ExecStart")?;
        let mut args = vec![format!("--net={}", self.net.vm1.path().display()), "env".to_string()];
        args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(exec);
        let name = format!("vm1-{}", unit.trim_end_matches(".service"));
        Proc::spawn(&name, Path::new("nsenter"), &args, &self.log(&name))
    }

    /// Starts vm1's identity-sync and node agent from their installed units and waits until both are ready
    /// (`/readyz` on the metrics addresses their env files name).
    pub fn start_vm_units(&mut self, root: &Path) -> Result<()> {
        self.vm_sync = Some(self.start_unit(root, "causeway-identity-sync.service")?);
        let log = self.log("vm1-causeway-identity-sync");
        let vm1 = &self.net.vm1;
        let sync = &mut self.vm_sync;
        let sync_metrics = metrics_addr(&root.join("etc/causeway/identity-sync.env"))?;
        wait_http(Some(vm1), sync_metrics, "/readyz", SOON, || sync.as_mut().is_some_and(|p| p.is_running()))
            .with_context(|| format!("vm1's identity-sync never became ready:\n{}", tail(&log, 40)))?;
        self.vm_agent = Some(self.start_unit(root, "causeway-node-agent.service")?);
        let log = self.log("vm1-causeway-node-agent");
        let agent = &mut self.vm_agent;
        let agent_metrics = metrics_addr(&root.join("etc/causeway/node-agent.env"))?;
        wait_http(Some(vm1), agent_metrics, "/readyz", SOON, || agent.as_mut().is_some_and(|p| p.is_running()))
            .with_context(|| format!("vm1's node agent never became ready:\n{}", tail(&log, 40)))
    }

    /// Stops vm1's services (what `systemctl disable --now` does before the script's uninstall).
    pub fn stop_vm_units(&mut self) {
        for p in [self.vm_agent.take(), self.vm_sync.take()].into_iter().flatten() {
            let mut p = p;
            p.kill();
        }
    }

    pub fn workload(&self) -> Result<ExternalWorkload> {
        Ok(self.rt.block_on(Api::<ExternalWorkload>::all(self.kube.clone()).get(WORKLOAD))?)
    }

    /// A client of west's etcd as root.
    pub async fn etcd_client(&self) -> Result<etcd_client::Client> {
        let tls = causeway_kvstore::TlsConfig::from_files(
            &self.root_tls.join("ca.crt"),
            &self.root_tls.join("tls.crt"),
            &self.root_tls.join("tls.key"),
        )?;
        let config = causeway_kvstore::EtcdConfig::new([format!("https://127.0.0.1:{}", self.etcd_port)])
            .with_connect_timeout(Duration::from_secs(5))
            .with_tls(tls);
        Ok(causeway_kvstore::connect(&config).await?)
    }

    /// Tries to write `key` in west's etcd with the client certificate in `certs` (ca.crt, tls.crt, tls.key).
    pub fn etcd_put_as(&self, certs: &Path, key: &str, value: &str) -> Result<()> {
        self.rt.block_on(async {
            let tls = causeway_kvstore::TlsConfig::from_files(
                &certs.join("ca.crt"),
                &certs.join("tls.crt"),
                &certs.join("tls.key"),
            )?;
            let config = causeway_kvstore::EtcdConfig::new([format!("https://127.0.0.1:{}", self.etcd_port)])
                .with_connect_timeout(Duration::from_secs(5))
                .with_tls(tls);
            let mut c = causeway_kvstore::connect(&config).await?;
            c.put(key, value, None).await?;
            Ok(())
        })
    }

    /// `etcd get key` as root.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        self.rt.block_on(async {
            let mut c = self.etcd_client().await?;
            let resp = c.get(key, None).await?;
            Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    /// What a user would look at when traffic does not flow: routes, the WireGuard devices and their peers, the
    /// kube-proxy stand-in's table, on node1 and vm1.
    pub fn network_report(&self) -> String {
        let mut out = String::new();
        for (name, ns, wg) in [("node1", &self.net.node1, &self.node1_wg), ("vm1", &self.net.vm1, &self.vm_wg)] {
            for argv in [
                vec!["ip", "-4", "route"],
                vec!["ip", "-4", "addr", "show", "dev", wg.as_str()],
                vec!["wg", "show", wg.as_str()],
                vec!["nft", "list", "table", "ip", kube_proxy::TABLE],
            ] {
                let text = match ns.exec_unchecked(&argv) {
                    Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
                    Err(e) => e.to_string(),
                };
                out.push_str(&format!("---- {name}: {}\n{text}", argv.join(" ")));
            }
        }
        out
    }

    /// Every component's log tail, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = self.network_report();
        for name in [
            "clustermesh-apiserver",
            "identity-sync-west",
            "agent-node1",
            "dnsmasq",
            "vm1-causeway-identity-sync",
            "vm1-causeway-node-agent",
        ] {
            out.push_str(&format!("==== {name} ====\n{}\n", tail(&self.log(name), 30)));
        }
        out
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for f in &self.forwarders {
            f.abort();
        }
        // The agents die by SIGKILL: their userspace WireGuard leaves its UAPI socket file behind (the devices go
        // with their namespaces).
        for p in [self.vm_agent.take(), self.node_agent.take()].into_iter().flatten() {
            let mut p = p;
            p.kill();
        }
        for wg in [&self.node1_wg, &self.vm_wg] {
            let _ = std::fs::remove_file(causeway_datapath::wireguard::uapi_socket(wg));
        }
    }
}

async fn secret_files(kube: &kube::Client, name: &str, dir: &Path) -> Result<BTreeMap<String, String>> {
    let s = Api::<Secret>::namespaced(kube.clone(), "causeway")
        .get(name)
        .await
        .with_context(|| format!("Secret {name}"))?;
    std::fs::create_dir_all(dir)?;
    let mut out = BTreeMap::new();
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(&k), &v.0)?;
        out.insert(k, String::from_utf8_lossy(&v.0).into_owned());
    }
    Ok(out)
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("CAUSEWAY_ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// etcd serving the apiserver's server certificate from its Secret, requiring client certificates of the mesh CA.
fn start_etcd(dir: &Path, tls: &Path, port: u16) -> Result<EtcdProc> {
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let url = format!("https://127.0.0.1:{port}");
    let log_path = dir.join("etcd.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(etcd_binary())
        .args([
            "--name=west".to_string(),
            format!("--data-dir={}", dir.join("etcd-data").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=west={peer}"),
            format!("--cert-file={}", tls.join("tls.crt").display()),
            format!("--key-file={}", tls.join("tls.key").display()),
            format!("--trusted-ca-file={}", tls.join("ca.crt").display()),
            "--client-cert-auth".to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", etcd_binary().display()))?;
    let etcd = EtcdProc(child);
    ensure!(
        netns::wait_for(Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "etcd did not listen: {}",
        tail(&log_path, 20)
    );
    Ok(etcd)
}

/// `GET path` from inside `ns` (None: this namespace); the body if the answer is 200.
pub fn http_get(ns: Option<&Netns>, addr: SocketAddr, path: &str) -> Option<String> {
    let path = path.to_string();
    let get = move || -> Option<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")).then_some(out)
    };
    match ns {
        Some(ns) => ns.run_in(get).ok().flatten(),
        None => get(),
    }
}

fn wait_http(
    ns: Option<&Netns>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while http_get(ns, addr, path).is_none() {
        ensure!(alive(), "the process exited");
        ensure!(Instant::now() < deadline, "no 200 from {addr}{path} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn create_base_objects(kube: &kube::Client) -> Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(kube.clone());
    for crd in causeway_crds::all_crds() {
        crds.create(&PostParams::default(), &crd).await.context("installing the CRDs")?;
    }
    for ns in ["causeway", "kube-system", "default"] {
        let obj: Namespace = obj(json!({"metadata": {"name": ns}}))?;
        let _ = Api::<Namespace>::all(kube.clone()).create(&PostParams::default(), &obj).await;
    }
    // The clustermesh-apiserver's Service as the chart makes it, its load balancer on the underlay switch.
    let svc: Service = obj(json!({
        "metadata": {"name": "clustermesh-apiserver", "namespace": "causeway"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50",
                 "ports": [{"name": "etcd", "port": ETCD_PORT}, {"name": "workloads", "port": WORKLOADS_PORT}]}
    }))?;
    let api = Api::<Service>::namespaced(kube.clone(), "causeway");
    api.create(&PostParams::default(), &svc).await?;
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": CONTROL_IP.to_string()}]}}});
    api.patch_status("clustermesh-apiserver", &PatchParams::default(), &Patch::Merge(status)).await?;
    Ok(())
}

async fn create_cluster_objects(kube: &kube::Client) -> Result<()> {
    let node: Node = obj(json!({
        "metadata": {"name": "node1", "labels": {"kubernetes.io/hostname": "node1"}},
        "spec": {"podCIDR": NODE1_POD_CIDR, "podCIDRs": [NODE1_POD_CIDR]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE1_IP.to_string()},
                                 {"type": "Hostname", "address": "node1"}]}
    }))?;
    Api::<Node>::all(kube.clone()).create(&PostParams::default(), &node).await.context("creating node1")?;
    for (ns, name, ip, labels) in [
        ("default", "echo", ECHO_POD_IP, json!({"app": "echo"})),
        ("kube-system", "coredns", DNS_POD_IP, json!({"k8s-app": "kube-dns"})),
    ] {
        let pod: Pod = obj(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
        }))?;
        Api::<Pod>::namespaced(kube.clone(), ns).create(&PostParams::default(), &pod).await?;
    }
    let services = [
        ("default", "kubernetes", KUBERNETES_IP, json!({}), json!([{"name": "https", "port": 443}])),
        (
            "default",
            "echo",
            ECHO_SERVICE_IP,
            json!({"service.cilium.io/global": "true"}),
            json!([{"name": "http", "port": ECHO_SERVICE_PORT, "protocol": "TCP"}]),
        ),
        (
            "kube-system",
            "kube-dns",
            DNS_SERVICE_IP,
            json!({}),
            json!([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
        ),
    ];
    for (ns, name, ip, annotations, ports) in services {
        let svc: Service = obj(json!({
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports}
        }))?;
        Api::<Service>::namespaced(kube.clone(), ns).create(&PostParams::default(), &svc).await?;
    }
    let slices = [
        ("default", "echo", json!([{"name": "http", "port": ECHO_PORT, "protocol": "TCP"}]), ECHO_POD_IP, "echo"),
        (
            "kube-system",
            "kube-dns",
            json!([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
            DNS_POD_IP,
            "coredns",
        ),
    ];
    for (ns, svc, ports, ip, pod) in slices {
        let slice: EndpointSlice = obj(json!({
            "metadata": {"name": format!("{svc}-1"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": "node1",
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}]
        }))?;
        Api::<EndpointSlice>::namespaced(kube.clone(), ns).create(&PostParams::default(), &slice).await?;
    }
    let labels: BTreeMap<&str, &str> = WORKLOAD_LABELS.iter().copied().collect();
    let workload: ExternalWorkload = obj(json!({
        "apiVersion": "causeway.io/v1alpha1", "kind": "ExternalWorkload",
        "metadata": {"name": WORKLOAD, "labels": labels},
        "spec": {"ipv4AllocCIDR": WORKLOAD_CIDR}
    }))?;
    Api::<ExternalWorkload>::all(kube.clone()).create(&PostParams::default(), &workload).await?;
    Ok(())
}

/// `CAUSEWAY_METRICS_ADDR` of an env file the script wrote: where that service answers /readyz.
fn metrics_addr(env_file: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(env_file).with_context(|| format!("reading {}", env_file.display()))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("CAUSEWAY_METRICS_ADDR="))
        .with_context(|| format!("{} sets no CAUSEWAY_METRICS_ADDR", env_file.display()))?;
    value.trim().parse().with_context(|| format!("{}: CAUSEWAY_METRICS_ADDR={value}", env_file.display()))
}

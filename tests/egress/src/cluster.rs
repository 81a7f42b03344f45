//! The cluster on top of the [`Topology`]: the in-process kube API stand-in, the real `egress-gw` in the control
//! namespace and a real `causeway-node-agent` in every node namespace.
//!
//! The fake kube API listens on the root namespace's loopback only (it has no security). Each namespace that needs it
//! (the control namespace, every node) gets a listener on *its own* loopback at the same port, forwarded by this
//! process to the real server: one kubeconfig file works everywhere, and nothing listens beyond loopback.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use causeway_crds::{EgressGatewayPolicy, EgressGatewayPolicyStatus};
use causeway_datapath::bpf::maps::{EgressGroup, EgressGroupsMap, GroupId};
use causeway_datapath::bpf::BpfMaps;
use causeway_multicluster_tests::{binary, Proc};
use causeway_testsupport::netns::{self, Netns};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::api::core::v1::{Namespace, Node as KNode, Pod as KPod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

use crate::topology::{Pod, Topology, CONTROL_IP, EXTERNAL_IF, GATEWAY_LABEL, POD_IF_PREFIX, POD_SUPERNET, ZONE_LABEL};

/// Namespace of the test pods (labelled `team=payments`).
pub const NAMESPACE: &str = "payments";
/// egress-gw's EgressAssignments gRPC port (on [`CONTROL_IP`]).
pub const GRPC_PORT: u16 = 9967;
/// The agents' probe responder port.
pub const PROBE_PORT: u16 = 9966;
const AGENT_METRICS_PORT: u16 = 9964;
const EGRESS_GW_METRICS_PORT: u16 = 9963;
const VXLAN: &str = "cw_vxlan";
/// Node annotation the agent publishes its interfaces in (egress-gw reads it).
pub const INTERFACES_ANNOTATION: &str = "egress.causeway.io/interfaces";
/// How long a test waits for things a user expects "soon" (processes ready, status written).
pub const SOON: Duration = Duration::from_secs(60);

/// Knobs of the control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// egress-gw `--hold-down`: how long a gateway that failed must pass probes before it is used again.
    pub hold_down: Duration,
    /// egress-gw replicas. With more than one they run with `--leader-elect` (short Lease timings, see
    /// [`LEASE_DURATION`]) and POD_NAME `egress-gw-<i>`, all on the same gRPC address: only the leader binds it, as
    /// only the ready (leading) pod is behind the egress-gw Service in a cluster.
    pub egress_gw_replicas: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { hold_down: Duration::from_secs(5), egress_gw_replicas: 1 }
    }
}

/// The leader Lease's duration with several egress-gw replicas: a standby takes over this long after the leader
/// stopped renewing.
pub const LEASE_DURATION: Duration = Duration::from_secs(2);
/// The leader Lease egress-gw replicas elect with (in the `default` namespace).
pub const EGRESS_GW_LEASE: &str = "causeway-egress-gw";

/// Tests in one binary share two cores: they run one at a time (each starts four processes and a dozen namespaces).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct EgressCluster {
    // Field order is drop order: processes first (before the namespaces they run in and the pins they leave), then
    // the kube API forwarders, the network, the kube API, the runtime, the log directory.
    agents: Vec<Option<Proc>>,
    egress_gw: Vec<Option<Proc>>,
    pods: Vec<Pod>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    pub topo: Topology,
    kube_server: FakeApiServerHandle,
    pub kube: kube::Client,
    pub rt: tokio::runtime::Runtime,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    options: Options,
}

impl EgressCluster {
    /// Builds the network, starts the kube API with the nodes and the `payments` namespace, egress-gw and one agent
    /// per node, and waits until every agent is ready and has published its interfaces.
    pub fn start(options: Options) -> Result<EgressCluster> {
        let dir = tempfile::Builder::new().prefix("causeway-egress-e2e-").tempdir()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let topo = Topology::build().context("building the network namespaces")?;
        let kube_server = rt.block_on(FakeApiServer::start("127.0.0.1:0".parse()?))?;
        let kubeconfig = dir.path().join("kubeconfig");
        kube_server.write_kubeconfig(&kubeconfig)?;
        // The client spawns its buffer task on the runtime it is built in.
        let kube = {
            let _guard = rt.enter();
            kube::Client::try_from(kube::Config::new(kube_server.url().parse()?))?
        };
        let mut cluster = EgressCluster {
            agents: Vec::new(),
            egress_gw: Vec::new(),
            pods: Vec::new(),
            forwarders: Vec::new(),
            topo,
            kube_server,
            kube,
            rt,
            kubeconfig,
            dir,
            options,
        };
        cluster.forward_kube_api()?;
        cluster.create_kube_objects()?;
        for i in 0..cluster.options.egress_gw_replicas.max(1) {
            cluster.egress_gw.push(None);
            cluster.start_egress_gw(i)?;
        }
        for i in 0..cluster.topo.nodes.len() {
            cluster.agents.push(None);
            cluster.start_agent(i)?;
        }
        for i in 0..cluster.topo.nodes.len() {
            cluster.wait_agent_ready(i)?;
            cluster.wait_interfaces_published(i)?;
        }
        Ok(cluster)
    }

    fn forward_kube_api(&mut self) -> Result<()> {
        let target = self.kube_server.addr;
        let port = target.port();
        let mut namespaces: Vec<&Netns> = vec![&self.topo.ctl];
        namespaces.extend(self.topo.nodes.iter().map(|n| &n.ns));
        for ns in namespaces {
            let l = ns.run_in(move || std::net::TcpListener::bind(("127.0.0.1", port)))??;
            l.set_nonblocking(true)?;
            let _guard = self.rt.enter();
            let listener = tokio::net::TcpListener::from_std(l)?;
            // Accepted inside the namespace; the outbound socket is created on a runtime thread, in the root
            // namespace, where the server listens.
            self.forwarders.push(self.rt.spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }));
        }
        Ok(())
    }

    fn create_kube_objects(&self) -> Result<()> {
        let kube = self.kube.clone();
        let nodes: Vec<Value> = self
            .topo
            .nodes
            .iter()
            .map(|n| {
                let mut labels = BTreeMap::from([
                    (ZONE_LABEL.to_string(), n.zone.clone()),
                    ("kubernetes.io/hostname".to_string(), n.name.clone()),
                ]);
                if n.initially_gateway {
                    labels.insert(GATEWAY_LABEL.0.to_string(), GATEWAY_LABEL.1.to_string());
                }
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": labels},
                    "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "Hostname", "address": n.name}
                    ]}
                })
            })
            .collect();
        self.rt.block_on(async move {
            let crds = Api::<CustomResourceDefinition>::all(kube.clone());
            for crd in causeway_crds::all_crds() {
                crds.create(&PostParams::default(), &crd).await.context("installing the CRDs")?;
            }
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": NAMESPACE, "labels": {"team": "payments"}}
            }))?;
            Api::<Namespace>::all(kube.clone()).create(&PostParams::default(), &ns).await?;
            let api = Api::<KNode>::all(kube.clone());
            for n in nodes {
                let node: KNode = serde_json::from_value(n)?;
                api.create(&PostParams::default(), &node).await.context("creating a node")?;
            }
            anyhow::Ok(())
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts (or restarts) egress-gw replica `i`; waits until it answers /healthz (a standby is healthy too).
    pub fn start_egress_gw(&mut self, i: usize) -> Result<()> {
        let bin = binary("egress-gw")?;
        let replicas = self.options.egress_gw_replicas.max(1);
        let mut args = vec![
            format!("--net={}", self.topo.ctl.path().display()),
            "env".to_string(),
            format!("POD_NAME=egress-gw-{i}"),
            bin.to_string_lossy().into_owned(),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--metrics-addr={}", self.egress_gw_metrics(i)),
            format!("--grpc-addr={CONTROL_IP}:{GRPC_PORT}"),
            format!("--probe-port={PROBE_PORT}"),
            format!("--pod-cidrs={POD_SUPERNET}"),
            format!("--hold-down={}ms", self.options.hold_down.as_millis()),
        ];
        if replicas > 1 {
            args.extend([
                "--leader-elect".to_string(),
                "--leader-elect-namespace=default".to_string(),
                format!("--leader-elect-lease-duration={}ms", LEASE_DURATION.as_millis()),
                format!("--leader-elect-renew-deadline={}ms", LEASE_DURATION.as_millis() * 3 / 4),
                "--leader-elect-retry-period=200ms".to_string(),
            ]);
        }
        let name = self.egress_gw_name(i);
        let proc = Proc::spawn(&name, Path::new("nsenter"), &args, &self.log(&name))?;
        match self.egress_gw.get_mut(i) {
            Some(slot) => *slot = Some(proc),
            None => bail!("no egress-gw replica {i}"),
        }
        let metrics = self.egress_gw_metrics(i);
        let ok = netns::wait_for(SOON, || http_get(&self.topo.ctl, metrics, "/healthz").is_some());
        if !ok {
            bail!("{name} never answered /healthz:\n{}", tail(&self.log(&name), 40));
        }
        Ok(())
    }

    fn egress_gw_name(&self, i: usize) -> String {
        if i == 0 {
            "egress-gw".to_string()
        } else {
            format!("egress-gw-{i}")
        }
    }

    fn egress_gw_metrics(&self, i: usize) -> SocketAddr {
        let port = u16::try_from(i).ok().and_then(|i| EGRESS_GW_METRICS_PORT.checked_add(i * 100));
        SocketAddr::from((CONTROL_IP, port.unwrap_or(EGRESS_GW_METRICS_PORT)))
    }

    /// Whether egress-gw replica `i` answers /readyz with 200 (with leader election: it leads and has synced), and
    /// the body either way (a standby says why it is not ready).
    pub fn egress_gw_readyz(&self, i: usize) -> (bool, String) {
        let addr = self.egress_gw_metrics(i);
        let out = self
            .topo
            .ctl
            .run_in(move || -> Option<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /readyz HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out)
            })
            .ok()
            .flatten()
            .unwrap_or_default();
        (out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"), out)
    }

    /// A sample of node `i`'s agent `/metrics` (`name` with its labels, as printed), if the agent answers and has it.
    pub fn agent_metric(&self, i: usize, name: &str) -> Option<f64> {
        let node = self.topo.nodes.get(i)?;
        let text = http_get(&node.ns, SocketAddr::from((node.ip, AGENT_METRICS_PORT)), "/metrics")?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Replica `i`'s `/metrics` text (empty if it does not answer).
    pub fn egress_gw_metrics_text(&self, i: usize) -> String {
        http_get(&self.topo.ctl, self.egress_gw_metrics(i), "/metrics").unwrap_or_default()
    }

    /// Who holds the egress-gw leader Lease now (the POD_NAME part of the holder identity).
    pub fn egress_gw_lease_holder(&self) -> Result<Option<String>> {
        let api = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(self.kube.clone(), "default");
        let lease = self.rt.block_on(api.get_opt(EGRESS_GW_LEASE))?;
        let holder = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
        Ok(holder.map(|h| h.rsplit_once('_').map_or(h.clone(), |(pod, _)| pod.to_string())))
    }

    /// SIGKILLs egress-gw replica `i` (no chance to give the Lease up).
    pub fn kill_egress_gw(&mut self, i: usize) {
        if let Some(mut p) = self.egress_gw.get_mut(i).and_then(Option::take) {
            p.kill();
        }
    }

    /// SIGTERMs egress-gw replica `i` and returns its exit status (None: it did not exit within 10 s and was killed).
    pub fn terminate_egress_gw(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.egress_gw.get_mut(i).and_then(Option::take).and_then(|mut p| p.terminate(Duration::from_secs(10)))
    }

    /// The last `lines` lines of egress-gw replica `i`'s log.
    pub fn egress_gw_replica_log(&self, i: usize, lines: usize) -> String {
        tail(&self.log(&self.egress_gw_name(i)), lines)
    }

    /// Starts (or restarts) node `i`'s agent.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let bin = binary("causeway-node-agent")?;
        let node = self.topo.nodes.get(i).context("no such node")?;
        let args = vec![
            format!("--net={}", node.ns.path().display()),
            bin.to_string_lossy().into_owned(),
            format!("--node-name={}", node.name),
            format!("--node-ip={}", node.ip),
            format!("--metrics-addr={}:{AGENT_METRICS_PORT}", node.ip),
            format!("--egress-addr={CONTROL_IP}:{GRPC_PORT}"),
            format!("--probe-addr=0.0.0.0:{PROBE_PORT}"),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--bpffs-root={}", node.pin_dir.display()),
            format!("--state-dir={}", node.state_dir.display()),
            format!("--vxlan-device={VXLAN}"),
            format!("--pod-interface-prefix={POD_IF_PREFIX}"),
            format!("--external-interface={EXTERNAL_IF}"),
            "--gc-interval=1".to_string(),
        ];
        let name = format!("agent-{}", node.name);
        let proc = Proc::spawn(&name, Path::new("nsenter"), &args, &self.log(&name))?;
        if let Some(slot) = self.agents.get_mut(i) {
            *slot = Some(proc);
        }
        Ok(())
    }

    /// SIGKILLs node `i`'s agent (its pinned datapath stays; it stops answering probes).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents.get_mut(i).and_then(Option::take) {
            p.kill();
        }
    }

    /// Waits until node `i`'s agent answers `/readyz` (streams synced, datapath reconciled).
    pub fn wait_agent_ready(&mut self, i: usize) -> Result<()> {
        let node = self.topo.nodes.get(i).context("no such node")?;
        let addr = SocketAddr::from((node.ip, AGENT_METRICS_PORT));
        let deadline = Instant::now() + SOON;
        while http_get(&node.ns, addr, "/readyz").is_none() {
            let running = self.agents.get_mut(i).and_then(Option::as_mut).is_some_and(|p| p.is_running());
            if !running || Instant::now() > deadline {
                bail!(
                    "agent on {} {} ready:\n{}",
                    node.name,
                    if running { "never became" } else { "exited before it was" },
                    self.agent_log(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn wait_interfaces_published(&self, i: usize) -> Result<()> {
        let node = self.topo.nodes.get(i).context("no such node")?;
        let want = node.egress_ip.to_string();
        let deadline = Instant::now() + SOON;
        loop {
            let got = self.node_annotation(i, INTERFACES_ANNOTATION)?;
            if got.as_deref().is_some_and(|a| a.contains(&want)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} never published {EXTERNAL_IF}'s {want} in {INTERFACES_ANNOTATION} (now {got:?}):\n{}",
                    node.name,
                    self.agent_log(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn node_annotation(&self, i: usize, key: &str) -> Result<Option<String>> {
        let name = self.topo.nodes.get(i).context("no such node")?.name.clone();
        let api = Api::<KNode>::all(self.kube.clone());
        let node = self.rt.block_on(api.get(&name))?;
        Ok(node.metadata.annotations.and_then(|a| a.get(key).cloned()))
    }

    /// Sets (`Some`) or removes (`None`) a label on node `i`.
    pub fn label_node(&self, i: usize, key: &str, value: Option<&str>) -> Result<()> {
        let name = self.topo.nodes.get(i).context("no such node")?.name.clone();
        let api = Api::<KNode>::all(self.kube.clone());
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.rt.block_on(api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)))?;
        Ok(())
    }

    // ------------------------------------------------------------------ pods

    /// A pod namespace behind node `node` whose steering program the agent has attached, not yet in the kube API.
    pub fn pod_netns(&mut self, node: usize, name: &str) -> Result<usize> {
        let pod = self.topo.add_pod(node, name)?;
        let host = &self.topo.nodes[node];
        // The agent rescans pod interfaces every few seconds.
        ensure!(
            netns::wait_for(SOON, || host.steering_attached(&pod.host_if)),
            "the agent on {} never attached steering to {}:\n{}",
            host.name,
            pod.host_if,
            self.agent_log(node, 20)
        );
        self.pods.push(pod);
        Ok(self.pods.len() - 1)
    }

    pub fn pod(&self, handle: usize) -> &Pod {
        &self.pods[handle]
    }

    /// Creates the Pod object (running, with its IP) in the `payments` namespace; returns when the API accepted it.
    pub fn create_pod_object(&self, handle: usize, labels: &[(&str, &str)]) -> Result<()> {
        let pod = &self.pods[handle];
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let obj: KPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"nodeName": self.topo.nodes[pod.node].name, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}
        }))?;
        let api = Api::<KPod>::namespaced(self.kube.clone(), NAMESPACE);
        self.rt.block_on(api.create(&PostParams::default(), &obj)).context("creating the pod")?;
        Ok(())
    }

    /// A pod namespace plus its Pod object.
    pub fn add_pod(&mut self, node: usize, name: &str, labels: &[(&str, &str)]) -> Result<usize> {
        let h = self.pod_netns(node, name)?;
        self.create_pod_object(h, labels)?;
        Ok(h)
    }

    /// Waits until pod `handle`'s node has it in its pinned egress source map (what `bpftool map dump` would show):
    /// from then on its traffic is steered, and none may leave with its own address.
    pub fn wait_pod_programmed(&self, handle: usize) -> Result<()> {
        let pod = &self.pods[handle];
        let node = &self.topo.nodes[pod.node];
        let ip = std::net::IpAddr::V4(pod.ip);
        let deadline = Instant::now() + SOON;
        loop {
            let maps = BpfMaps::open(&node.pin_dir)?;
            if maps.egress_src.get(ip)?.is_some() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} never appeared in the egress source map on {}:\n{}",
                pod.name,
                node.name,
                self.agent_log(pod.node, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn delete_pod_object(&self, handle: usize) -> Result<()> {
        let api = Api::<KPod>::namespaced(self.kube.clone(), NAMESPACE);
        self.rt.block_on(api.delete(&self.pods[handle].name, &DeleteParams::default()))?;
        Ok(())
    }

    // ------------------------------------------------------------------ policies

    /// Creates an EgressGatewayPolicy from its spec (JSON in the CRD's shape).
    pub fn create_policy(&self, name: &str, spec: Value) -> Result<()> {
        let obj: EgressGatewayPolicy = serde_json::from_value(json!({
            "apiVersion": "causeway.io/v1alpha1", "kind": "EgressGatewayPolicy",
            "metadata": {"name": name}, "spec": spec
        }))
        .context("the test's policy does not match the CRD's types")?;
        let api = Api::<EgressGatewayPolicy>::all(self.kube.clone());
        self.rt.block_on(api.create(&PostParams::default(), &obj)).context("creating the policy")?;
        Ok(())
    }

    /// JSON merge patch of a policy's spec.
    pub fn patch_policy(&self, name: &str, spec_patch: Value) -> Result<()> {
        let api = Api::<EgressGatewayPolicy>::all(self.kube.clone());
        let patch = json!({"spec": spec_patch});
        self.rt.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))?;
        Ok(())
    }

    pub fn policy(&self, name: &str) -> Result<EgressGatewayPolicy> {
        let api = Api::<EgressGatewayPolicy>::all(self.kube.clone());
        Ok(self.rt.block_on(api.get(name))?)
    }

    /// Waits until the policy's status satisfies `check` (which says what it saw otherwise); returns that status.
    pub fn wait_status(
        &self,
        name: &str,
        timeout: Duration,
        mut check: impl FnMut(&EgressGatewayPolicyStatus) -> Result<(), String>,
    ) -> Result<EgressGatewayPolicyStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.policy(name)?;
            let status = p.status.unwrap_or_default();
            let verdict = check(&status);
            if verdict.is_ok() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "policy {name}: status never became what the test waits for ({}); last status: {}\negress-gw log:\n{}",
                    verdict.err().unwrap_or_default(),
                    serde_json::to_string(&status).unwrap_or_default(),
                    self.egress_gw_log(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every group of the policy has exactly `gateways` active (node IPs, any order).
    pub fn wait_active(&self, name: &str, gateways: &[usize]) -> Result<EgressGatewayPolicyStatus> {
        let mut want: Vec<String> = gateways.iter().map(|&i| self.topo.nodes[i].ip.to_string()).collect();
        want.sort();
        self.wait_status(name, SOON, |s| {
            let ok = !s.group_statuses.is_empty()
                && s.group_statuses.iter().all(|g| {
                    let mut got = g.active_gateway_ips.clone();
                    got.sort();
                    got == want
                });
            if ok {
                Ok(())
            } else {
                Err(format!("active gateways {want:?} in every group"))
            }
        })
    }

    // ------------------------------------------------------------------ the datapath, as bpftool would show it

    /// The egress maps pinned on node `i` (sources, policy entries, groups), rendered for comparison.
    pub fn egress_maps(&self, i: usize) -> Result<String> {
        let maps = BpfMaps::open(&self.topo.nodes[i].pin_dir)?;
        let mut src = maps.egress_src.entries()?;
        src.sort();
        let mut policy: Vec<String> = maps.egress_policy.entries()?.iter().map(|e| format!("{e:?}")).collect();
        policy.sort();
        let mut groups: Vec<String> = maps.egress_groups.entries()?.iter().map(|e| format!("{e:?}")).collect();
        groups.sort();
        Ok(format!("src {src:?}\npolicy {policy:?}\ngroups {groups:?}"))
    }

    /// What a user would dump when traffic does not flow: every node's egress maps and drop counters.
    pub fn datapath_report(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.topo.nodes.iter().enumerate() {
            let maps = self.egress_maps(i).unwrap_or_else(|e| format!("unreadable: {e}"));
            let drops = BpfMaps::open(&node.pin_dir)
                .and_then(|m| m.drops.counts())
                .map(|c| format!("{:?}", c.into_iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>()))
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            out.push_str(&format!("-- {} maps:\n{maps}\ndrops {drops}\n", node.name));
        }
        out
    }

    /// The datapath floor for failover: removes `gateway` from every egress group pinned on node `i` by writing the
    /// map directly, what the agent does once the controller's new assignment arrives. Returns the groups as they
    /// were, for [`EgressCluster::restore_groups_by_hand`]: the agent does not read its maps back while its inputs
    /// are unchanged, so a hand edit the controller never hears of must be undone by hand.
    pub fn remove_gateway_by_hand(&self, i: usize, gateway: Ipv4Addr) -> Result<Vec<(GroupId, EgressGroup)>> {
        let mut groups = EgressGroupsMap::open(&self.topo.nodes[i].pin_dir)?;
        let before = groups.entries()?;
        for (id, g) in &before {
            if g.gateways.contains(&gateway) {
                let mut g = g.clone();
                g.gateways.retain(|gw| *gw != gateway);
                groups.upsert(*id, &g)?;
            }
        }
        Ok(before)
    }

    /// Writes groups back as [`EgressCluster::remove_gateway_by_hand`] found them.
    pub fn restore_groups_by_hand(&self, i: usize, groups: &[(GroupId, EgressGroup)]) -> Result<()> {
        let mut map = EgressGroupsMap::open(&self.topo.nodes[i].pin_dir)?;
        for (id, g) in groups {
            map.upsert(*id, g)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ logs

    pub fn agent_log(&self, i: usize, lines: usize) -> String {
        let name = format!("agent-{}", self.topo.nodes.get(i).map(|n| n.name.as_str()).unwrap_or("?"));
        tail(&self.log(&name), lines)
    }

    pub fn egress_gw_log(&self, lines: usize) -> String {
        tail(&self.log("egress-gw"), lines)
    }
}

impl Drop for EgressCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- egress-gw (last 60 lines)\n{}", self.egress_gw_log(60));
            for i in 0..self.topo.nodes.len() {
                eprintln!("---- agent on {} (last 30 lines)\n{}", self.topo.nodes[i].name, self.agent_log(i, 30));
            }
        }
        for f in &self.forwarders {
            f.abort();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `GET path` from inside `ns`; the body if the answer is 200.
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<String> {
    let path = path.to_string();
    ns.run_in(move || -> Option<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")).then_some(out)
    })
    .ok()
    .flatten()
}

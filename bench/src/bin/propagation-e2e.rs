//! propagation-e2e: a pod change in a remote cluster A, until cluster B's identity-sync shows it on its MeshView
//! gRPC stream and in its EndpointSlices, at 200 changes/s spread over 8 remotes, through the real binaries.
//!
//! Set-up (the `causeway-multicluster-tests` harness, the same one the end-to-end tests use): 8 remote clusters,
//! each a real etcd, the in-memory kube API stand-in and the real `clustermesh-apiserver` binary; one local cluster
//! B whose real `identity-sync` binary has all 8 as remotes. (The harness starts both binaries in every cluster; the
//! remotes' identity-sync and B's apiserver have nothing to import and idle, as they would in a real mesh.) Every
//! cluster has the global Service `bench/web`; each remote starts with `--backends` ready pods behind it.
//!
//! A change is a pod replacement in one remote's kube API, as a rollout does it: create a pod with a new IP, put it
//! in the Service's EndpointSlice in place of the oldest backend (one write), delete the old pod. The remotes take
//! turns, so the changes are spread evenly at `--rate` changes/s in total. The clock starts just before the pod
//! create (the first kube write) and stops, for the new IP, when
//! - A's etcd holds it in the exported service (`cilium/state/services/v1/<A>/bench/web`; a raw etcd watch, for
//!   the breakdown),
//! - B's MeshView stream carries it: a GlobalService upsert listing it as a backend (a tonic client subscribed for
//!   the whole run, as a node agent is), and the ipcache upsert for the pod,
//! - B's kube API has it in an EndpointSlice labelled with A as source cluster (a kube watch on B's API).
//!
//! Baseline, same machine, same etcds, same rate, measured right before each measured phase: raw etcd-client puts,
//! each its own request, observed by a raw watch per etcd.
//!
//! The binaries come from the cargo target directory this bench runs from: build them in the same profile first
//! (`cargo build --release -p clustermesh-apiserver -p identity-sync`), or set `CAUSEWAY_BIN_DIR`.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::{watch_event, WatchRequest};
use causeway_bench::report::{median, percentile, spread, Common, Report};
use causeway_multicluster_tests::{Backends, Cluster, ClusterSpec};
use causeway_store::Kind;
use clap::Parser;
use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Pod change in cluster A -> cluster B's gRPC stream and EndpointSlices, real binaries")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Remote clusters.
    #[arg(long, default_value_t = 8)]
    remotes: u32,
    /// Changes per second, over all remotes.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds measured per phase (after the warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of changes before measuring starts, per phase.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Ready backends each remote keeps behind the global service (a change replaces the oldest). A backend lives
    /// `backends * remotes / rate` seconds (1 s by default); a change still in flight when its pod is replaced can
    /// be coalesced away by the export and is then reported as never seen.
    #[arg(long, default_value_t = 25)]
    backends: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("propagation-e2e failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

const NS: &str = "bench";
const SVC: &str = "web";
const LOCAL: (&str, u32) = ("local", 1);
const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// How long after the last change a measured change may still arrive before it counts as lost.
const GRACE: Duration = Duration::from_secs(10);

/// Where a change is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The remote's etcd holds the IP as a backend of the exported service.
    RemoteEtcd = 0,
    /// B's MeshView stream: a GlobalService upsert with the IP as a backend.
    GrpcService = 1,
    /// B's MeshView stream: the ipcache upsert of the IP.
    GrpcIpcache = 2,
    /// B's EndpointSlices.
    Slices = 3,
}

const STAGES: usize = 4;

struct Change {
    sent: Instant,
    measured: bool,
    seen: [Option<Duration>; STAGES],
}

/// Every change sent, by its new pod IP; the observers fill in when they first see it.
#[derive(Default, Clone)]
struct Tracker(Arc<Mutex<HashMap<String, Change>>>);

impl Tracker {
    fn sent(&self, ip: &str, sent: Instant, measured: bool) {
        self.lock().insert(ip.to_string(), Change { sent, measured, seen: [None; STAGES] });
    }

    fn seen(&self, ip: &str, stage: Stage, at: Instant) {
        if let Some(c) = self.lock().get_mut(ip) {
            let slot = &mut c.seen[stage as usize];
            if slot.is_none() {
                *slot = Some(at.saturating_duration_since(c.sent));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Change>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Measured changes not yet seen at the stages that matter for the target.
    fn outstanding(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| c.measured)
            .filter(|c| {
                [Stage::GrpcService, Stage::GrpcIpcache, Stage::Slices].iter().any(|s| c.seen[*s as usize].is_none())
            })
            .count()
    }

    /// Sorted latencies (ms) of the measured changes at `stage` (infinite when never seen), and how many were never
    /// seen there.
    fn latencies(&self, stage: Stage) -> (Vec<f64>, usize) {
        let map = self.lock();
        let mut out = Vec::new();
        let mut lost = 0;
        for c in map.values().filter(|c| c.measured) {
            match c.seen[stage as usize] {
                Some(d) => out.push(d.as_secs_f64() * 1e3),
                // Never seen: slower than anything seen, so the percentiles do not flatter.
                None => {
                    lost += 1;
                    out.push(f64::INFINITY);
                }
            }
        }
        out.sort_by(f64::total_cmp);
        (out, lost)
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

fn remote_name(r: u32) -> (String, u32) {
    (format!("remote-{r}"), 10 + r)
}

/// Pod IPs of remote cluster `id`, numbered: unique for the whole run (the harness gives cluster `id` the pod CIDR
/// 10.<id>.0.0/16).
fn pod_ip(id: u32, n: u32) -> String {
    format!("10.{id}.{}.{}", (n / 250) % 256, n % 250 + 1)
}

struct Phase {
    raw: Vec<f64>,
    stages: Vec<(Vec<f64>, usize)>,
    changes: usize,
    achieved_rate: f64,
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut report = Report::start(
        "propagation-e2e",
        "pod change in A -> B's gRPC stream and EndpointSlices, real binaries",
        &args.common,
    );
    let etcd_dir = match std::env::var_os("CAUSEWAY_ETCD_TMPDIR") {
        Some(d) => format!("{} (CAUSEWAY_ETCD_TMPDIR)", d.to_string_lossy()),
        None => format!("{} (default temp dir; CAUSEWAY_ETCD_TMPDIR unset)", std::env::temp_dir().display()),
    };
    report.row("etcd data dir", &etcd_dir);
    report.row("binaries", causeway_multicluster_tests::bin_dir()?.display());

    // ---- clusters
    let t = Instant::now();
    let remotes: Vec<Cluster> = futures::future::try_join_all((0..args.remotes).map(|r| {
        let (name, id) = remote_name(r);
        async move { Cluster::start(ClusterSpec::new(&name, id)).await }
    }))
    .await
    .context("starting the remote clusters")?;
    let local = Cluster::start(ClusterSpec::new(LOCAL.0, LOCAL.1)).await.context("starting cluster B")?;
    local.create_namespace(NS).await?;
    local.create_global_service(NS, SVC, &format!("10.96.{}.20", LOCAL.1), &[]).await?;

    let mut windows: Vec<VecDeque<(String, String)>> = Vec::new();
    let mut want = Backends::new();
    for c in &remotes {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, SVC, &format!("10.96.{}.20", c.id), &[]).await?;
        let mut window = VecDeque::new();
        for n in 0..args.backends {
            let (pod, ip) = (format!("{SVC}-{n}"), pod_ip(c.id, n));
            create_pod(c, &pod, &ip).await?;
            window.push_back((pod, ip.clone()));
            want.entry(c.name.clone()).or_default().insert(ip);
        }
        write_slice(c, &window).await?;
        windows.push(window);
    }
    for c in &remotes {
        local.connect_to(c)?;
    }
    for c in &remotes {
        local.wait_remote(&c.name, "synced", |r| r["state"] == "synced").await?;
    }
    local.wait_backends(NS, SVC, &want).await?;
    report.row(
        "setup",
        format!(
            "{} remotes + B, {} backends each, ready in {:.1} s; {} changes/s for {} s (+{} s warm-up), {} runs",
            args.remotes,
            args.backends,
            t.elapsed().as_secs_f64(),
            args.rate,
            args.seconds,
            args.warmup,
            args.common.runs
        ),
    );

    // ---- observers, live for the whole run
    let tracker = Tracker::default();
    // Each observer starts from the current state (snapshot, list, get), so each sees an existing backend once
    // subscribed: the phases start when all have seen this one.
    let probe_ip = windows.first().and_then(|w| w.back()).map(|(_, ip)| ip.clone()).context("no initial backends")?;
    tracker.sent(&probe_ip, Instant::now(), false);
    let mut observers = Vec::new();
    observers.push(tokio::spawn(grpc_observer(local.sync_grpc, tracker.clone())));
    observers.push(tokio::spawn(slice_observer(local.kube(), tracker.clone())));
    for c in &remotes {
        observers.push(tokio::spawn(etcd_observer(c.etcd.client().await, c.name.clone(), tracker.clone())));
    }
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if tracker.lock().get(&probe_ip).is_some_and(|c| c.seen.iter().all(Option::is_some)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if ready.is_err() {
        bail!("the observers did not all see the initial backends within 30 s");
    }
    tracker.clear();

    // ---- phases
    let mut next_n = args.backends;
    let mut phases = Vec::new();
    for run in 0..args.common.runs.max(1) {
        let raw = raw_baseline(&remotes, &args).await?;
        let (changes, achieved_rate, last_n) = drive(&remotes, &mut windows, next_n, &tracker, &args).await?;
        next_n = last_n;
        let waited = Instant::now();
        while tracker.outstanding() > 0 && waited.elapsed() < GRACE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stages = [Stage::RemoteEtcd, Stage::GrpcService, Stage::GrpcIpcache, Stage::Slices]
            .iter()
            .map(|s| tracker.latencies(*s))
            .collect();
        tracker.clear();
        let phase = Phase { raw, stages, changes, achieved_rate };
        print_phase(&report, run, &phase);
        phases.push(phase);
        for c in &remotes {
            c.check_alive().map_err(anyhow::Error::msg)?;
        }
        local.check_alive().map_err(anyhow::Error::msg)?;
    }
    for o in observers {
        o.abort();
    }

    // ---- summary over runs
    let p = |f: &dyn Fn(&Phase) -> &[f64], q: f64| phases.iter().map(|ph| percentile(f(ph), q)).collect::<Vec<f64>>();
    let raw_p99 = p(&|ph| &ph.raw, 99.0);
    let grpc_p99 = p(&|ph| &ph.stages[Stage::GrpcService as usize].0, 99.0);
    let ip_p99 = p(&|ph| &ph.stages[Stage::GrpcIpcache as usize].0, 99.0);
    let slice_p99 = p(&|ph| &ph.stages[Stage::Slices as usize].0, 99.0);
    report.row("p99 over runs: raw put -> watch", spread(&raw_p99, "ms", 1));
    report.row("p99 over runs: gRPC GlobalService backend", spread(&grpc_p99, "ms", 1));
    report.row("p99 over runs: gRPC ipcache entry", spread(&ip_p99, "ms", 1));
    report.row("p99 over runs: EndpointSlices", spread(&slice_p99, "ms", 1));
    report.row(
        "p50 over runs: gRPC service / EndpointSlices",
        format!(
            "{:.1} ms / {:.1} ms",
            median(&p(&|ph| &ph.stages[Stage::GrpcService as usize].0, 50.0)),
            median(&p(&|ph| &ph.stages[Stage::Slices as usize].0, 50.0))
        ),
    );
    let lost: usize = phases.iter().map(|ph| ph.stages[1..].iter().map(|s| s.1).sum::<usize>()).sum();
    let worst = grpc_p99.iter().chain(&ip_p99).copied().fold(0.0, f64::max);
    report.target("p99 <= 100 ms, gRPC stream (median run)", median(&grpc_p99).max(median(&ip_p99)) <= 100.0);
    report.target("p99 <= 100 ms, EndpointSlices (median run)", median(&slice_p99) <= 100.0);
    report.target("every change seen (none lost)", lost == 0);
    report.row("worst gRPC p99 of any run", format!("{worst:.1} ms"));
    drop(local);
    drop(remotes);
    Ok(report.finish())
}

fn fmt_lat(xs: &[f64], lost: usize) -> String {
    format!(
        "p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1} ms (n {}{})",
        percentile(xs, 50.0),
        percentile(xs, 90.0),
        percentile(xs, 99.0),
        xs.last().copied().unwrap_or(0.0),
        xs.len(),
        if lost > 0 { format!(", {lost} NEVER SEEN, counted as infinite") } else { String::new() }
    )
}

fn print_phase(report: &Report, run: usize, ph: &Phase) {
    report.row(
        &format!("run {}: changes measured, rate achieved", run + 1),
        format!("{} changes, {:.1}/s", ph.changes, ph.achieved_rate),
    );
    report.row("  baseline: raw etcd put -> raw watch event", fmt_lat(&ph.raw, 0));
    let label = |s: Stage| match s {
        Stage::RemoteEtcd => "  kube write in A -> A's etcd (exported service)",
        Stage::GrpcService => "  kube write in A -> B gRPC GlobalService backend",
        Stage::GrpcIpcache => "  kube write in A -> B gRPC ipcache entry",
        Stage::Slices => "  kube write in A -> B EndpointSlice",
    };
    for s in [Stage::RemoteEtcd, Stage::GrpcService, Stage::GrpcIpcache, Stage::Slices] {
        let (xs, lost) = &ph.stages[s as usize];
        report.row(label(s), fmt_lat(xs, *lost));
    }
}

// ---- the changes -----------------------------------------------------------------------------------------------

async fn create_pod(c: &Cluster, pod: &str, ip: &str) -> anyhow::Result<()> {
    let obj: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod, "namespace": NS, "labels": {"app": SVC}},
        "spec": {"nodeName": format!("{}-node-1", c.name), "containers": [{"name": "app", "image": "app:1",
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": format!("192.0.2.{}", c.id),
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))?;
    Api::<Pod>::namespaced(c.kube(), NS)
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("{}: creating pod {pod}", c.name))?;
    Ok(())
}

/// Sets the endpoints of the Service's own slice (`<svc>-local`, created by the harness) to `window`, as kube's
/// EndpointSlice controller would.
async fn write_slice(c: &Cluster, window: &VecDeque<(String, String)>) -> anyhow::Result<()> {
    let node = format!("{}-node-1", c.name);
    let endpoints: Vec<Value> = window
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": node, "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
        })
        .collect();
    Api::<EndpointSlice>::namespaced(c.kube(), NS)
        .patch(&format!("{SVC}-local"), &PatchParams::default(), &Patch::Merge(&json!({"endpoints": endpoints})))
        .await
        .with_context(|| format!("{}: writing the EndpointSlice of {NS}/{SVC}", c.name))?;
    Ok(())
}

/// One task per remote, taking turns at `rate` in total, for warm-up + measured seconds. Returns the measured
/// changes, the rate achieved while measuring, and the next free pod number.
async fn drive(
    remotes: &[Cluster],
    windows: &mut [VecDeque<(String, String)>],
    first_n: u32,
    tracker: &Tracker,
    args: &Args,
) -> anyhow::Result<(usize, f64, u32)> {
    let n_remotes = remotes.len() as u32;
    let period = Duration::from_secs_f64(f64::from(n_remotes) / f64::from(args.rate.max(1)));
    let step = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    let tasks = remotes.iter().zip(windows.iter_mut()).enumerate().map(|(r, (c, window))| {
        let tracker = tracker.clone();
        async move {
            let mut tick = tokio::time::interval_at((start + step * r as u32).into(), period);
            // A change that takes longer than its slot delays the next rather than bunching them up.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = first_n;
            let mut measured = 0usize;
            loop {
                tick.tick().await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let (pod, ip) = (format!("{SVC}-{n}"), pod_ip(c.id, n));
                n += 1;
                let counted = now >= measure_from;
                tracker.sent(&ip, now, counted);
                measured += usize::from(counted);
                create_pod(c, &pod, &ip).await?;
                window.push_back((pod, ip));
                let old = window.pop_front();
                write_slice(c, window).await?;
                // The old pod is already out of the slice; its delete need not hold up the next change.
                if let Some((old_pod, _)) = old {
                    let (api, cluster) = (Api::<Pod>::namespaced(c.kube(), NS), c.name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = api.delete(&old_pod, &DeleteParams::default()).await {
                            eprintln!("propagation-e2e: {cluster}: deleting pod {old_pod}: {e}");
                        }
                    });
                }
            }
            anyhow::Ok((measured, n))
        }
    });
    let results = futures::future::try_join_all(tasks).await?;
    let changes: usize = results.iter().map(|r| r.0).sum();
    let next = results.iter().map(|r| r.1).max().unwrap_or(first_n);
    Ok((changes, changes as f64 / args.seconds.max(1) as f64, next))
}

// ---- observers -------------------------------------------------------------------------------------------------

/// A node agent's view: one MeshView watch for the whole run (reconnecting if the stream ends).
async fn grpc_observer(addr: std::net::SocketAddr, tracker: Tracker) -> anyhow::Result<()> {
    loop {
        let mut client = match MeshViewClient::connect(format!("http://{addr}")).await {
            Ok(c) => c.max_decoding_message_size(64 << 20),
            Err(e) => {
                eprintln!("propagation-e2e: MeshView connect: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let req = WatchRequest { resume_revision: 0, node_name: "propagation-e2e".into(), resume_epoch: 0 };
        let mut stream = match client.watch(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                eprintln!("propagation-e2e: MeshView watch: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while let Ok(Some(ev)) = stream.message().await {
            let at = Instant::now();
            if ev.kind() != watch_event::Kind::Upsert {
                continue;
            }
            match &ev.object {
                Some(watch_event::Object::Service(s)) => {
                    for b in &s.backends {
                        tracker.seen(&b.ip, Stage::GrpcService, at);
                    }
                }
                Some(watch_event::Object::Ipcache(e)) => tracker.seen(&e.ip, Stage::GrpcIpcache, at),
                _ => {}
            }
        }
        eprintln!("propagation-e2e: MeshView stream ended; resubscribing");
    }
}

/// What a user (or kube-proxy) sees: a watch on B's EndpointSlices imported from other clusters.
async fn slice_observer(kube: kube::Client, tracker: Tracker) -> anyhow::Result<()> {
    let api = Api::<EndpointSlice>::namespaced(kube, NS);
    let mut stream = watcher(api, watcher::Config::default().labels(SOURCE_CLUSTER_LABEL)).boxed();
    while let Some(ev) = stream.next().await {
        let at = Instant::now();
        match ev {
            Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s)) => {
                for e in &s.endpoints {
                    if e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                        for a in &e.addresses {
                            tracker.seen(a, Stage::Slices, at);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("propagation-e2e: EndpointSlice watch: {e}"),
        }
    }
    Ok(())
}

/// The exported service in a remote's etcd, for the breakdown (when the apiserver's write has landed).
async fn etcd_observer(client: etcd_client::Client, cluster: String, tracker: Tracker) -> anyhow::Result<()> {
    let prefix = Kind::Services.watch_prefix(&cluster);
    let mut stream = client.watch_client().watch(prefix, Some(WatchOptions::new().with_prefix())).await?;
    // The watch starts now; the current value is read once so that the initial backends count as seen.
    let mut kv = client.kv_client();
    let now = kv.get(Kind::Services.watch_prefix(&cluster), Some(etcd_client::GetOptions::new().with_prefix())).await?;
    let at = Instant::now();
    for kv in now.kvs() {
        service_backends(kv.value(), |ip| tracker.seen(ip, Stage::RemoteEtcd, at));
    }
    while let Some(resp) = stream.message().await? {
        let at = Instant::now();
        for ev in resp.events() {
            if ev.event_type() == EventType::Put {
                if let Some(kv) = ev.kv() {
                    service_backends(kv.value(), |ip| tracker.seen(ip, Stage::RemoteEtcd, at));
                }
            }
        }
    }
    Ok(())
}

fn service_backends(value: &[u8], mut f: impl FnMut(&str)) {
    if let Ok(v) = serde_json::from_slice::<Value>(value) {
        if let Some(b) = v.get("backends").and_then(Value::as_object) {
            for ip in b.keys() {
                f(ip);
            }
        }
    }
}

// ---- baseline --------------------------------------------------------------------------------------------------

/// Raw etcd-client puts (each its own request) at `rate`, round robin over the remotes' etcds, observed by one raw
/// watch per etcd; latencies (ms, sorted) of the puts sent after the warm-up.
async fn raw_baseline(remotes: &[Cluster], args: &Args) -> anyhow::Result<Vec<f64>> {
    let epoch = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, f64)>();
    let mut watchers = Vec::new();
    let mut clients = Vec::new();
    for c in remotes {
        let client = c.etcd.client().await;
        let mut stream = client.watch_client().watch("bench/raw/", Some(WatchOptions::new().with_prefix())).await?;
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let now = epoch.elapsed().as_nanos() as u64;
                for ev in resp.events() {
                    let sent = ev.kv().and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse::<u64>().ok());
                    if let (EventType::Put, Some(sent)) = (ev.event_type(), sent) {
                        let _ = tx.send((sent, now.saturating_sub(sent) as f64 / 1e6));
                    }
                }
            }
        }));
        clients.push(client);
    }
    drop(tx);
    let step = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let measure_from = Duration::from_secs(args.warmup).as_nanos() as u64;
    let total = Duration::from_secs(args.warmup + args.seconds);
    let mut tick = tokio::time::interval(step);
    let mut seq = 0usize;
    let mut expected = 0usize;
    while epoch.elapsed() < total {
        tick.tick().await;
        let sent = epoch.elapsed().as_nanos() as u64;
        expected += usize::from(sent >= measure_from);
        let mut kv = clients[seq % clients.len()].kv_client();
        let key = format!("bench/raw/{}", seq % 1000);
        tokio::spawn(async move {
            let _ = kv.put(key, sent.to_string(), None).await;
        });
        seq += 1;
    }
    let mut out = Vec::with_capacity(expected);
    let deadline = Instant::now() + GRACE;
    while out.len() < expected {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((sent, ms))) => {
                if sent >= measure_from {
                    out.push(ms);
                }
            }
            _ => break,
        }
    }
    for w in watchers {
        w.abort();
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

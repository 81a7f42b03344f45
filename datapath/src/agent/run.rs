//! The agent loop: the stream tasks feed [`AgentCore`]; after each batch of events it reconciles the datapath; on
//! a timer it runs conntrack GC and reads drop counters. Metrics go to the process's `causeway-runtime` registry.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::prometheus_client::metrics::family::Family;
use causeway_runtime::prometheus_client::metrics::gauge::Gauge;
use causeway_runtime::Health;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::client::{self, Input, StreamClientConfig, StreamControl};
use super::core::{AgentCore, GcReport, ReconcileReport, StreamKind};
use super::datapath::{Datapath, DropReason};
use super::desired::LocalNode;
use super::gc::GcPolicy;
use super::model::MapKind;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Most (egress IP, destination) pairs exported as SNAT metrics, the busiest first (bounded label cardinality).
pub const SNAT_METRIC_PAIRS: usize = 50;

/// `causeway_node_agent_*` metrics.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub map_entries: Family<Labels, Gauge>,
    pub ops_applied: Family<Labels, Counter>,
    pub reconcile_errors: Counter,
    pub stream_reconnects: Family<Labels, Counter>,
    pub stream_rejected: Family<Labels, Counter>,
    pub stream_revision: Family<Labels, Gauge>,
    pub drops: Family<Labels, Counter>,
    pub snat_ports_in_use: Family<Labels, Gauge>,
    pub conntrack_gc_deleted: Counter,
    pub egress_classes: Gauge,
    pub input_conflicts: Gauge,
}

impl AgentMetrics {
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register("node_agent_map_entries", "Entries per datapath map (label map)", self.map_entries.clone());
            r.register("node_agent_ops_applied", "Datapath ops applied (labels map, op)", self.ops_applied.clone());
            r.register(
                "node_agent_reconcile_errors",
                "Reconciles that failed on a datapath op",
                self.reconcile_errors.clone(),
            );
            r.register(
                "node_agent_stream_reconnects",
                "Input stream disconnects (label stream)",
                self.stream_reconnects.clone(),
            );
            r.register(
                "node_agent_stream_rejected",
                "Input objects or fields left out as invalid (labels stream, reason)",
                self.stream_rejected.clone(),
            );
            r.register("node_agent_stream_revision", "Last applied revision per stream", self.stream_revision.clone());
            r.register("node_agent_drops", "Packets dropped by the datapath (label reason)", self.drops.clone());
            r.register(
                "node_agent_snat_ports_in_use",
                "SNAT ports in use per egress IP and destination (busiest 50 pairs)",
                self.snat_ports_in_use.clone(),
            );
            r.register(
                "node_agent_conntrack_gc_deleted",
                "Conntrack entries expired by GC",
                self.conntrack_gc_deleted.clone(),
            );
            r.register("node_agent_egress_classes", "Egress source classes in use", self.egress_classes.clone());
            r.register(
                "node_agent_input_conflicts",
                "Conflicting inputs resolved at the last reconcile (overlapping pod CIDRs, duplicate keys)",
                self.input_conflicts.clone(),
            );
        });
    }

    fn record_reconcile(&self, r: &ReconcileReport) {
        for ((map, removal), n) in &r.applied {
            let op = if *removal { "delete" } else { "upsert" };
            self.ops_applied.get_or_create(&labels(&[("map", map.as_str()), ("op", op)])).inc_by(*n);
        }
        for map in MapKind::ALL {
            if let Some(n) = r.sizes.get(&map) {
                self.map_entries.get_or_create(&labels(&[("map", map.as_str())])).set(*n as i64);
            }
        }
        if !r.sizes.is_empty() {
            self.egress_classes.set(r.egress_classes as i64);
            self.input_conflicts.set(r.conflicts.len() as i64);
        }
    }

    fn record_gc(&self, r: &GcReport) {
        self.conntrack_gc_deleted.inc_by(r.deleted as u64);
        self.snat_ports_in_use.clear();
        for ((egress, dst), n) in r.snat.top(SNAT_METRIC_PAIRS) {
            let (e, d) = (egress.to_string(), dst.to_string());
            self.snat_ports_in_use.get_or_create(&labels(&[("egress_ip", &e), ("destination", &d)])).set(n as i64);
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub local: LocalNode,
    /// identity-sync's MeshView address; `None` on an egress-only node (no mesh stream, nothing waits for it).
    pub mesh_endpoint: Option<String>,
    /// The egress-gw controller's EgressAssignments address; `None`: no egress policies are programmed.
    pub egress_endpoint: Option<String>,
    pub gc: GcPolicy,
    pub gc_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// What the loop tells the node's other tasks (gratuitous ARP on takeover, the probe responder).
#[derive(Debug, Default)]
pub struct RunHooks {
    /// After every reconcile that leaves the datapath in line with the inputs: the egress addresses this node
    /// SNATs to as an active gateway ([`super::assignments::local_egress_ips`]). Sent only when the set changes.
    pub local_egress: Option<watch::Sender<BTreeSet<IpAddr>>>,
}

/// Runs the agent until `shutdown` completes. Returns the core (tests inspect it).
pub async fn run<D: Datapath>(
    cfg: AgentConfig,
    dp: D,
    health: Health,
    metrics: AgentMetrics,
    shutdown: impl Future<Output = ()>,
) -> AgentCore {
    run_with(cfg, dp, health, metrics, RunHooks::default(), shutdown).await
}

/// [`run`] with hooks for the node's other tasks.
pub async fn run_with<D: Datapath>(
    cfg: AgentConfig,
    mut dp: D,
    health: Health,
    metrics: AgentMetrics,
    hooks: RunHooks,
    shutdown: impl Future<Output = ()>,
) -> AgentCore {
    let (tx, mut rx) = mpsc::channel::<Input>(4096);
    let stream_cfg = |endpoint: &str| StreamClientConfig {
        endpoint: endpoint.to_string(),
        node_name: cfg.local.name.clone(),
        backoff_initial: cfg.backoff_initial,
        backoff_max: cfg.backoff_max,
    };
    let mut controls: BTreeMap<StreamKind, (StreamControl, u64)> = BTreeMap::new();
    if let Some(e) = &cfg.mesh_endpoint {
        controls.insert(StreamKind::Mesh, (client::spawn_mesh(stream_cfg(e), tx.clone()), 0));
    }
    if let Some(e) = &cfg.egress_endpoint {
        controls.insert(StreamKind::Egress, (client::spawn_egress(stream_cfg(e), tx.clone()), 0));
    }
    drop(tx);

    let mut core =
        AgentCore::with_streams(cfg.local.clone(), cfg.mesh_endpoint.is_some(), cfg.egress_endpoint.is_some());
    health.set_not_ready("waiting for the first snapshot of every input stream");
    let mut gc_tick = tokio::time::interval(cfg.gc_interval.max(Duration::from_millis(10)));
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry: Option<tokio::time::Instant> = None;
    let mut seen_rejects: BTreeMap<(StreamKind, &'static str), u64> = BTreeMap::new();
    let mut seen_drops: BTreeMap<DropReason, u64> = BTreeMap::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            input = rx.recv() => {
                let Some(input) = input else { break };
                handle(&mut core, &mut controls, &metrics, input);
                // Drain what is queued so a burst of deltas costs one reconcile, bounded so ticks still run.
                for _ in 0..16_384 {
                    match rx.try_recv() {
                        Ok(i) => handle(&mut core, &mut controls, &metrics, i),
                        Err(_) => break,
                    }
                }
                for (stream, (ctl, _)) in &controls {
                    let point = core.resume_point(*stream);
                    ctl.resume.send_if_modified(|p| std::mem::replace(p, point) != point);
                    metrics.stream_revision.get_or_create(&labels(&[("stream", stream.as_str())])).set(point.1 as i64);
                }
                for (k, n) in core.rejects() {
                    let before = seen_rejects.insert(*k, *n).unwrap_or(0);
                    metrics.stream_rejected.get_or_create(&labels(&[("stream", k.0.as_str()), ("reason", k.1)])).inc_by(n - before);
                }
                if retry.is_none() {
                    reconcile(&mut core, &mut dp, &health, &metrics, &mut retry);
                    notify(&core, &hooks);
                }
            }
            _ = async { if let Some(t) = retry { tokio::time::sleep_until(t).await } else { std::future::pending::<()>().await } } => {
                retry = None;
                reconcile(&mut core, &mut dp, &health, &metrics, &mut retry);
                notify(&core, &hooks);
            }
            _ = gc_tick.tick() => {
                match core.gc(&mut dp, &cfg.gc) {
                    Ok(r) => metrics.record_gc(&r),
                    Err(e) => warn!(error = %e, "conntrack GC failed"),
                }
                match dp.drop_counters() {
                    Ok(drops) => {
                        for (reason, n) in drops {
                            let before = seen_drops.insert(reason, n).unwrap_or(0);
                            // A counter that went backwards means the programs were reloaded: count from zero.
                            let delta = if n >= before { n - before } else { n };
                            metrics.drops.get_or_create(&labels(&[("reason", &reason.label())])).inc_by(delta);
                        }
                    }
                    Err(e) => warn!(error = %e, "reading drop counters failed"),
                }
            }
        }
    }
    info!("node agent loop stopped");
    core
}

/// Tells the hooks what is programmed now; nothing while the datapath lags behind the inputs (an address is
/// announced only once this node's SNAT translates to it).
fn notify(core: &AgentCore, hooks: &RunHooks) {
    if !core.ready_to_program() || core.dirty() {
        return;
    }
    if let Some(tx) = &hooks.local_egress {
        let now = super::assignments::local_egress_ips(core.egress().view(), core.local().ip);
        tx.send_if_modified(|cur| {
            if *cur == now {
                return false;
            }
            *cur = now;
            true
        });
    }
}

fn handle(
    core: &mut AgentCore,
    controls: &mut BTreeMap<StreamKind, (StreamControl, u64)>,
    metrics: &AgentMetrics,
    input: Input,
) {
    let (stream, conn, result) = match input {
        Input::Connected { stream, conn } => {
            if let Some(c) = controls.get_mut(&stream) {
                c.1 = conn;
            }
            return;
        }
        Input::Disconnected { stream, conn, error: _ } => {
            metrics.stream_reconnects.get_or_create(&labels(&[("stream", stream.as_str())])).inc();
            if controls.get(&stream).is_some_and(|c| c.1 == conn) {
                core.on_disconnected(stream);
            }
            return;
        }
        Input::Mesh { conn, event } => {
            (StreamKind::Mesh, conn, stream_live(controls, StreamKind::Mesh, conn).then(|| core.on_mesh_event(&event)))
        }
        Input::Egress { conn, event } => (
            StreamKind::Egress,
            conn,
            stream_live(controls, StreamKind::Egress, conn).then(|| core.on_egress_event(&event)),
        ),
    };
    if let Some(Err(_)) = result {
        // The core logged the error; drop this connection and ignore the rest of what it sent.
        core.on_disconnected(stream);
        if let Some((ctl, live)) = controls.get_mut(&stream) {
            *live = 0;
            let _ = ctl.drop_conn.send(conn);
        }
    }
}

/// Events of a connection the loop gave up on are ignored.
fn stream_live(controls: &BTreeMap<StreamKind, (StreamControl, u64)>, stream: StreamKind, conn: u64) -> bool {
    controls.get(&stream).is_some_and(|c| c.1 == conn)
}

fn reconcile<D: Datapath>(
    core: &mut AgentCore,
    dp: &mut D,
    health: &Health,
    metrics: &AgentMetrics,
    retry: &mut Option<tokio::time::Instant>,
) {
    match core.reconcile(dp) {
        Ok(r) => {
            metrics.record_reconcile(&r);
            if core.ready_to_program() && !core.dirty() {
                health.set_ready();
            }
        }
        Err(e) => {
            metrics.reconcile_errors.inc();
            health.set_not_ready(format!("datapath update failed: {e}"));
            *retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }
}

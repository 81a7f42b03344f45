//! The kube adapter: watchers on EgressGatewayPolicy, Pods, Namespaces and Nodes feed the core [`Index`]; after each
//! batch the controller computes and publishes the assignments (for the node-agent stream); a status writer task
//! then patches each policy's status when it changed, and records Kubernetes Events when a policy's conditions or
//! active gateways change.
//!
//! Gateway probe verdicts arrive as [`Input::Probe`] from the prober ([`crate::probe`]), which probes the nodes
//! published on [`Controller::probe_targets`]; the adapter's timer drives [`Index::tick`] at the core's
//! [`Index::next_deadline`]. Failover is on the fast path: a batch recomputes and publishes only when something
//! changed (a probe round that changes no node's health costs nothing), and status patches and Events are written
//! off the loop, so a slow API server never delays the next publish.

pub mod convert;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_crds::egress::{EgressGatewayPolicyStatus, EgressGroupStatus, PolicyCondition};
use causeway_crds::EgressGatewayPolicy;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Node as KNode, ObjectReference, Pod as KPod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, instrument, warn};

use crate::metrics::{Metrics, NodeLabels, PolicyGroupLabels, PolicyLabels, ReasonLabels};

use crate::core::{
    ClusterNetworks, HealthConfig, Index, Namespace, Node, Pod, PolicyAssignment, PolicyOutput, PolicySpec,
};

/// Field manager and event reporter name.
pub const CONTROLLER_NAME: &str = "causeway-egress-gw";
/// Inputs taken per batch before computing.
const BATCH: usize = 256;
/// How soon a failed status patch is retried when nothing else triggers a reconcile.
const STATUS_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Policy,
    Pod,
    Namespace,
    Node,
}

const ALL_KINDS: [Kind; 4] = [Kind::Policy, Kind::Pod, Kind::Namespace, Kind::Node];

/// A policy as the adapter needs it: the parsed spec, plus what it needs to write status and events.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    pub spec: PolicySpec,
    pub uid: Option<String>,
    pub status: Option<EgressGatewayPolicyStatus>,
}

#[derive(Debug)]
pub enum Input {
    Policy(Box<PolicyInput>),
    Pod(Pod),
    Namespace(Namespace),
    Node(Node),
    /// An object of `kind` is gone; the key is `namespace/name` for pods, else the name.
    Delete(Kind, String),
    /// A (re-)list of `kind` finished with these keys; everything else of the kind is gone.
    Listed(Kind, BTreeSet<String>),
    /// One probe round's verdict for a gateway node.
    Probe {
        node: String,
        ok: bool,
    },
    /// This cluster's and the meshed clusters' pod and service CIDRs (never sent to a gateway).
    Networks(ClusterNetworks),
}

fn pod_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Starts one cluster-wide watcher per kind, sending into `tx`; the tasks end when `tx` closes.
pub fn spawn_watchers(client: Client, tx: mpsc::Sender<Input>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(watch_kind(Api::<EgressGatewayPolicy>::all(client.clone()), tx.clone(), Kind::Policy, |p| {
            let spec = convert::policy(p)?;
            let key = spec.name.clone();
            let input = PolicyInput { spec, uid: p.metadata.uid.clone(), status: p.status.clone() };
            Some((key, Some(Input::Policy(Box::new(input)))))
        })),
        tokio::spawn(watch_kind(Api::<KPod>::all(client.clone()), tx.clone(), Kind::Pod, |p| {
            let key = pod_key(p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?);
            // A pod that sends no traffic (host network, finished) is reported as absent.
            Some((key, convert::pod(p).map(Input::Pod)))
        })),
        tokio::spawn(watch_kind(Api::<KNamespace>::all(client.clone()), tx.clone(), Kind::Namespace, |n| {
            Some((n.metadata.name.clone()?, convert::namespace(n).map(Input::Namespace)))
        })),
        tokio::spawn(watch_kind(Api::<KNode>::all(client), tx, Kind::Node, |n| {
            Some((n.metadata.name.clone()?, convert::node(n).map(Input::Node)))
        })),
    ]
}

/// Returns an object's key and its input, or `None` as input when the object counts as absent.
type Converter<K> = fn(&K) -> Option<(String, Option<Input>)>;

/// `convert` returns the object's key and its input, or `None` as input when the object counts as absent.
async fn watch_kind<K>(api: Api<K>, tx: mpsc::Sender<Input>, kind: Kind, convert: Converter<K>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let inputs: Vec<Input> = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(BTreeSet::new());
                vec![]
            }
            Ok(watcher::Event::InitApply(o)) | Ok(watcher::Event::Apply(o)) => match convert(&o) {
                Some((key, Some(input))) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(key);
                    }
                    vec![input]
                }
                Some((key, None)) => vec![Input::Delete(kind, key)],
                None => vec![],
            },
            Ok(watcher::Event::Delete(o)) => convert(&o).map(|(key, _)| Input::Delete(kind, key)).into_iter().collect(),
            Ok(watcher::Event::InitDone) => vec![Input::Listed(kind, listing.take().unwrap_or_default())],
            Err(e) => {
                warn!(?kind, error = %e, "watch failed; retrying with backoff");
                vec![]
            }
        };
        for input in inputs {
            if tx.send(input).await.is_err() {
                return;
            }
        }
    }
}

/// The reconcile loop around the core index.
pub struct Controller {
    index: Index,
    /// Taken by [`Controller::run`], which starts it.
    writer: Option<StatusWriter>,
    status_jobs: watch::Sender<Option<Arc<StatusJob>>>,
    listed: BTreeSet<Kind>,
    known: BTreeMap<Kind, BTreeSet<String>>,
    policies: BTreeMap<String, PolicyInput>,
    assignments: watch::Sender<BTreeMap<String, PolicyAssignment>>,
    /// Node → zone, for the per-node view of the assignment stream.
    zones: watch::Sender<BTreeMap<String, String>>,
    /// Candidate gateway nodes → the IP to probe.
    probe_targets: watch::Sender<BTreeMap<String, IpAddr>>,
    /// Turns true after the first reconcile over a full list of every kind and settled gateway health.
    synced: watch::Sender<bool>,
    /// Longest wait, after every kind was listed, for the gateways' health to settle before the first publish.
    warmup: Duration,
    /// When the warm-up ends at the latest (set once every kind was listed); None before.
    warm_deadline: Option<Instant>,
    /// The warm-up is over: gateway health settled (or the deadline passed).
    warm: bool,
    /// Something changed since the last reconcile.
    dirty: bool,
    metrics: Metrics,
    health: Option<causeway_runtime::Health>,
}

impl Controller {
    pub fn new(client: Client, health: HealthConfig) -> Self {
        let reporter = Reporter { controller: CONTROLLER_NAME.into(), instance: None };
        Controller {
            index: Index::new(health),
            writer: Some(StatusWriter {
                api: Api::all(client.clone()),
                recorder: Recorder::new(client, reporter),
                wall_clock: Box::new(Utc::now),
                metrics: Metrics::default(),
                written: BTreeMap::new(),
                last_active: BTreeMap::new(),
            }),
            status_jobs: watch::channel(None).0,
            listed: BTreeSet::new(),
            known: BTreeMap::new(),
            policies: BTreeMap::new(),
            assignments: watch::channel(BTreeMap::new()).0,
            zones: watch::channel(BTreeMap::new()).0,
            probe_targets: watch::channel(BTreeMap::new()).0,
            synced: watch::channel(false).0,
            warmup: Duration::from_secs(2),
            warm_deadline: None,
            warm: false,
            dirty: false,
            metrics: Metrics::default(),
            health: None,
        }
    }

    /// Reports ready on `health` once every kind has been listed and the first status computed.
    pub fn with_health(mut self, health: causeway_runtime::Health) -> Self {
        health.set_not_ready("waiting for the first list of policies, pods, namespaces and nodes");
        self.health = Some(health);
        self
    }

    /// How long, at most, the first publish waits for every gateway candidate's health to settle once everything
    /// was listed (default 2 s). Without it a fresh controller, a restart or a new leader, would publish "no healthy
    /// gateway" for gateways merely not probed yet, and agents would drop egress traffic until they rose.
    pub fn with_warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// Counts into `metrics` (register them with the process registry first).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        if let Some(w) = self.writer.as_mut() {
            w.metrics = metrics.clone();
        }
        self.metrics = metrics;
        self
    }

    /// The current assignments of every programmable policy, for the EgressAssignments stream.
    pub fn assignments(&self) -> watch::Receiver<BTreeMap<String, PolicyAssignment>> {
        self.assignments.subscribe()
    }

    /// Node name → zone label, for nodes that have one (published before the assignments that depend on it).
    pub fn node_zones(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.zones.subscribe()
    }

    /// The gateway nodes to probe and the IP to probe each at (see [`Index::gateway_candidates`]).
    pub fn probe_targets(&self) -> watch::Receiver<BTreeMap<String, IpAddr>> {
        self.probe_targets.subscribe()
    }

    /// True once every kind was listed and the first assignments were published; until then the assignments
    /// reflect a partial view and must not be served (a snapshot would remove policies from agents).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Whether every kind has been listed once (before that, status would be computed from a partial view) and the
    /// gateways' health has settled (or the warm-up deadline passed).
    pub fn is_synced(&self) -> bool {
        self.all_listed() && self.warm
    }

    fn all_listed(&self) -> bool {
        ALL_KINDS.iter().all(|k| self.listed.contains(k))
    }

    /// Ends the warm-up once every kind was listed and every gateway candidate's health is known, or at the
    /// deadline; the first reconcile follows.
    fn check_warm(&mut self, now: Instant) {
        if self.warm || !self.all_listed() {
            return;
        }
        // The prober needs the candidates to probe them before anything is published.
        publish(&self.probe_targets, self.index.gateway_candidates());
        let deadline = *self.warm_deadline.get_or_insert(now + self.warmup);
        let settled = self.index.health_settled();
        if settled || now >= deadline {
            self.warm = true;
            self.dirty = true;
            if settled {
                info!(candidates = self.index.gateway_candidates().len(), "gateway health settled; publishing");
            } else {
                warn!(waited = ?self.warmup, "gateway health not settled in time; publishing with what the probes said so far");
            }
        }
    }

    /// Runs until the input channel closes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        if let Some(writer) = self.writer.take() {
            tokio::spawn(writer.run(self.status_jobs.subscribe()));
        }
        loop {
            let warm_at = self.warm_deadline.filter(|_| !self.warm);
            let deadline = match (self.index.next_deadline(), warm_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(tokio::time::Instant::from_std);
            tokio::select! {
                input = rx.recv() => {
                    let Some(input) = input else { return };
                    self.handle(input, Instant::now());
                    // Drain what is queued (up to a batch) so one compute covers a burst of changes. No timer
                    // holds a batch back: a probe verdict that flips a gateway is computed and published at once.
                    for _ in 1..BATCH {
                        let Ok(more) = rx.try_recv() else { break };
                        self.handle(more, Instant::now());
                    }
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    let now = Instant::now();
                    for change in self.index.tick(now) {
                        self.health_changed(&change.node, change.healthy, change.why);
                    }
                }
            }
            self.check_warm(Instant::now());
            if self.is_synced() && self.dirty {
                self.reconcile().await;
                self.synced.send_if_modified(|s| !std::mem::replace(s, true));
                if let Some(h) = self.health.as_ref().filter(|h| !h.is_ready()) {
                    info!("every kind listed; ready");
                    h.set_ready();
                }
            }
        }
    }

    fn health_changed(&mut self, node: &str, healthy: bool, why: &str) {
        self.dirty = true;
        self.metrics.health_change(healthy);
        self.metrics.gateway_healthy.get_or_create(&NodeLabels { node: node.to_string() }).set(i64::from(healthy));
        info!(node = %node, healthy, why, "gateway health changed");
    }

    /// Applies one input to the index. Marks the controller dirty unless the input provably changed nothing (a
    /// probe verdict that moves no node's health).
    pub fn handle(&mut self, input: Input, now: Instant) {
        if !matches!(input, Input::Probe { .. }) {
            self.dirty = true;
        }
        match input {
            Input::Policy(p) => {
                let name = p.spec.name.clone();
                self.known.entry(Kind::Policy).or_default().insert(name.clone());
                self.index.apply_policy(p.spec.clone());
                self.policies.insert(name, *p);
            }
            Input::Pod(p) => {
                self.known.entry(Kind::Pod).or_default().insert(pod_key(&p.namespace, &p.name));
                self.index.apply_pod(p);
            }
            Input::Namespace(n) => {
                self.known.entry(Kind::Namespace).or_default().insert(n.name.clone());
                self.index.apply_namespace(n);
            }
            Input::Node(n) => {
                self.known.entry(Kind::Node).or_default().insert(n.name.clone());
                self.index.apply_node(n);
            }
            Input::Delete(kind, key) => self.delete(kind, &key),
            Input::Networks(n) => self.index.set_cluster_networks(n),
            Input::Listed(kind, keys) => {
                let gone: Vec<String> =
                    self.known.get(&kind).into_iter().flatten().filter(|k| !keys.contains(*k)).cloned().collect();
                for key in gone {
                    self.delete(kind, &key);
                }
                self.listed.insert(kind);
            }
            Input::Probe { node, ok } => {
                let labels = NodeLabels { node: node.clone() };
                match self.index.probe(&node, ok, now) {
                    Some(change) => self.health_changed(&change.node, change.healthy, change.why),
                    // Seen for the first time: show it as unhealthy until it rises.
                    None => {
                        if self.metrics.gateway_healthy.get(&labels).is_none() {
                            self.metrics.gateway_healthy.get_or_create(&labels).set(0);
                        }
                    }
                }
            }
        }
    }

    fn delete(&mut self, kind: Kind, key: &str) {
        self.known.entry(kind).or_default().remove(key);
        match kind {
            Kind::Policy => {
                self.index.delete_policy(key);
                self.policies.remove(key);
            }
            Kind::Pod => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.index.delete_pod(ns, name);
                }
            }
            Kind::Namespace => self.index.delete_namespace(key),
            Kind::Node => {
                self.index.delete_node(key);
                self.metrics.gateway_healthy.remove(&NodeLabels { node: key.to_string() });
            }
        }
    }

    /// Computes and publishes the assignments, then hands status and Events to the status writer.
    pub async fn reconcile(&mut self) {
        self.dirty = false;
        self.metrics.reconciles.inc();
        let outputs = self.index.compute();
        let assignments: BTreeMap<String, PolicyAssignment> =
            outputs.iter().filter_map(|(n, o)| Some((n.clone(), o.assignment.clone()?))).collect();
        // Zones first: the stream resolves each node's view of the assignments with them.
        publish(&self.zones, self.index.node_zones());
        publish(&self.assignments, assignments);
        publish(&self.probe_targets, self.index.gateway_candidates());
        self.record_metrics(&outputs);
        let seen = self.policies.iter().map(|(n, p)| (n.clone(), (p.uid.clone(), p.status.clone()))).collect();
        self.status_jobs.send_replace(Some(Arc::new(StatusJob { outputs, seen })));
    }

    fn record_metrics(&self, outputs: &BTreeMap<String, PolicyOutput>) {
        // Families are rebuilt so that deleted policies and groups disappear from /metrics.
        self.metrics.active_gateways.clear();
        self.metrics.healthy_gateways.clear();
        self.metrics.source_ips.clear();
        self.metrics.invalid_policies.clear();
        for (name, out) in outputs {
            for (i, g) in out.groups.iter().enumerate() {
                let labels = PolicyGroupLabels { policy: name.clone(), group: i.to_string() };
                let active = out.assignment.as_ref().and_then(|a| a.groups.get(i)).map_or(0, |g| g.gateways.len());
                self.metrics.active_gateways.get_or_create(&labels).set(active as i64);
                self.metrics.healthy_gateways.get_or_create(&labels).set(g.healthy.len() as i64);
            }
            let sources = out.assignment.as_ref().map_or(0, |a| a.source_ips.len());
            self.metrics.source_ips.get_or_create(&PolicyLabels { policy: name.clone() }).set(sources as i64);
            if let Some(p) = out.problems.first() {
                self.metrics.invalid_policies.get_or_create(&ReasonLabels { reason: p.reason.as_str().into() }).inc();
            }
        }
    }
}

/// What the status writer needs from one reconcile: the outputs, and each policy's uid and last watched status.
struct StatusJob {
    outputs: BTreeMap<String, PolicyOutput>,
    seen: BTreeMap<String, (Option<String>, Option<EgressGatewayPolicyStatus>)>,
}

/// Writes status patches and Events in its own task, always for the latest reconcile, so that a slow API server
/// (one patch per changed policy, plus Events) never holds back the next probe verdict or assignment publish.
struct StatusWriter {
    api: Api<EgressGatewayPolicy>,
    recorder: Recorder,
    wall_clock: Box<dyn Fn() -> DateTime<Utc> + Send>,
    metrics: Metrics,
    /// The status last written per policy, with the uid it was written to (a recreated policy starts over).
    written: BTreeMap<String, (Option<String>, EgressGatewayPolicyStatus)>,
    /// Last active gateway nodes per policy and group, for change events.
    last_active: BTreeMap<String, Vec<BTreeSet<String>>>,
}

impl StatusWriter {
    /// Runs until the controller drops its end. A failed patch is retried after [`STATUS_RETRY`], or sooner when a
    /// newer reconcile arrives.
    async fn run(mut self, mut jobs: watch::Receiver<Option<Arc<StatusJob>>>) {
        let mut failed = false;
        loop {
            if failed {
                tokio::select! {
                    r = jobs.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(STATUS_RETRY) => {}
                }
            } else if jobs.changed().await.is_err() {
                return;
            }
            let job = jobs.borrow_and_update().clone();
            let Some(job) = job else { continue };
            self.written.retain(|name, _| job.outputs.contains_key(name));
            self.last_active.retain(|name, _| job.outputs.contains_key(name));
            failed = false;
            for (name, out) in &job.outputs {
                if let Some((uid, status)) = job.seen.get(name) {
                    failed |= !self.write(name, out, uid.as_deref(), status.as_ref()).await;
                }
            }
        }
    }

    /// Returns false when the status patch failed (to be retried).
    #[instrument(skip_all, fields(policy = %name))]
    async fn write(
        &mut self,
        name: &str,
        out: &PolicyOutput,
        uid: Option<&str>,
        seen: Option<&EgressGatewayPolicyStatus>,
    ) -> bool {
        // What we wrote last is newer than what the watch has shown us, unless the policy was recreated.
        let previous = match self.written.get(name) {
            Some((written_uid, status)) if written_uid.as_deref() == uid => status.clone(),
            _ => seen.cloned().unwrap_or_default(),
        };
        let desired = self.status(out, &previous);
        let active: Vec<BTreeSet<String>> = out
            .assignment
            .iter()
            .flat_map(|a| &a.groups)
            .map(|g| g.gateways.iter().chain(g.by_zone.values().flatten()).map(|gw| gw.node.clone()).collect())
            .collect();
        let reference = ObjectReference {
            api_version: Some(EgressGatewayPolicy::api_version(&()).into_owned()),
            kind: Some(EgressGatewayPolicy::kind(&()).into_owned()),
            name: Some(name.to_string()),
            uid: uid.map(str::to_string),
            ..Default::default()
        };
        let events = condition_events(&previous, &desired, self.last_active.get(name), &active);
        self.last_active.insert(name.to_string(), active);
        let mut ok = true;
        if desired != previous {
            let patch = serde_json::json!({ "status": desired });
            match self
                .api
                .patch_status(
                    name,
                    &PatchParams { field_manager: Some(CONTROLLER_NAME.into()), ..Default::default() },
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.metrics.status_writes.inc();
                    debug!("status written");
                    self.written.insert(name.to_string(), (uid.map(str::to_string), desired));
                }
                // Deleted meanwhile: its watch event will follow. Otherwise retried shortly.
                Err(kube::Error::Api(e)) if e.code == 404 => debug!("policy gone; not writing status"),
                Err(e) => {
                    self.metrics.status_write_errors.inc();
                    warn!(error = %e, "could not write status");
                    ok = false;
                }
            }
        }
        for ev in events {
            if let Err(e) = self.recorder.publish(&ev, &reference).await {
                warn!(error = %e, reason = %ev.reason, "could not record event");
            }
        }
        ok
    }

    /// The status for `out`, keeping each condition's transition time while its status stays the same.
    fn status(&self, out: &PolicyOutput, previous: &EgressGatewayPolicyStatus) -> EgressGatewayPolicyStatus {
        let now = (self.wall_clock)().to_rfc3339_opts(SecondsFormat::Secs, true);
        let conditions = out
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let last_transition_time = previous
                    .conditions
                    .iter()
                    .find(|p| p.type_ == c.type_ && p.status == status)
                    .map(|p| p.last_transition_time.clone())
                    .unwrap_or_else(|| now.clone());
                PolicyCondition {
                    type_: c.type_.to_string(),
                    status: status.to_string(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    observed_generation: Some(out.generation),
                    last_transition_time,
                }
            })
            .collect();
        let ips = |v: &[std::net::IpAddr]| v.iter().map(|ip| ip.to_string()).collect::<Vec<_>>();
        EgressGatewayPolicyStatus {
            observed_generation: Some(out.generation),
            matched_pods: Some(i64::try_from(out.matched_pods).unwrap_or(i64::MAX)),
            group_statuses: out
                .groups
                .iter()
                .map(|g| EgressGroupStatus {
                    active_gateway_ips: ips(&g.active),
                    active_gateway_ips_by_az: g.active_by_zone.iter().map(|(z, v)| (z.clone(), ips(v))).collect(),
                    healthy_gateway_ips: ips(&g.healthy),
                })
                .collect(),
            conditions,
        }
    }
}

/// Replaces a watch channel's value, waking receivers only when it changed.
fn publish<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        *current = value;
        changed
    });
}

/// Events for a policy: a Warning when InvalidSpec turns true or changes reason, a Normal/Warning when Ready
/// flips, a Normal per gateway node that joins or leaves a group's active set.
fn condition_events(
    previous: &EgressGatewayPolicyStatus,
    desired: &EgressGatewayPolicyStatus,
    last_active: Option<&Vec<BTreeSet<String>>>,
    active: &[BTreeSet<String>],
) -> Vec<Event> {
    let find = |s: &EgressGatewayPolicyStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned();
    let mut out = Vec::new();
    let note = |m: &str| Some(m.chars().take(1000).collect::<String>());
    let (old_invalid, new_invalid) = (find(previous, "InvalidSpec"), find(desired, "InvalidSpec"));
    if let Some(n) = &new_invalid {
        let was = old_invalid.as_ref().map(|o| (o.status.as_str(), o.reason.as_str()));
        if n.status == "True" && was != Some(("True", n.reason.as_str())) {
            out.push(Event {
                type_: EventType::Warning,
                reason: n.reason.clone(),
                note: note(&n.message),
                action: "Validate".into(),
                secondary: None,
            });
        }
    }
    let (old_ready, new_ready) = (find(previous, "Ready"), find(desired, "Ready"));
    if let Some(n) = &new_ready {
        if old_ready.as_ref().map(|o| o.status.as_str()) != Some(n.status.as_str()) {
            out.push(Event {
                type_: if n.status == "True" { EventType::Normal } else { EventType::Warning },
                reason: if n.status == "True" { "Ready".into() } else { "NotReady".into() },
                note: note(&format!("{}: {}", n.reason, n.message)),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    // One event per gateway joining or leaving, with the node as the related object: the recorder folds events
    // with the same reason and objects into a series, so a per-node key keeps each change visible.
    if let Some(last) = last_active {
        for (i, now) in active.iter().enumerate() {
            let before = last.get(i).cloned().unwrap_or_default();
            let changes = now
                .difference(&before)
                .map(|n| (n, "GatewayActivated", "is now an active gateway"))
                .chain(before.difference(now).map(|n| (n, "GatewayDeactivated", "is no longer an active gateway")));
            for (node, reason, what) in changes {
                out.push(Event {
                    type_: EventType::Normal,
                    reason: reason.into(),
                    note: note(&format!("egressGroups[{i}]: node {node} {what}")),
                    action: "SelectGateways".into(),
                    secondary: Some(ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Node".into()),
                        name: Some(node.clone()),
                        ..Default::default()
                    }),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

//! The local cluster's external workloads (`ExternalWorkload`, causeway.io/v1alpha1): hosts that registered with
//! this cluster's clustermesh-apiserver and joined the mesh datapath with a WireGuard key. The local node agents
//! must peer with them exactly as with remote nodes, so each usable object becomes a node record and the ipcache
//! entry of its mesh address in the merged view (see [`crate::core::LocalWorkload`]).
//!
//! [`convert`] is the whole rule, as a pure function; [`WorkloadIndex`] turns watch events into view changes and
//! reports an unusable object once per change of what is wrong with it; [`run`] is the thin watcher around them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use base64::Engine as _;
use causeway_crds::external_workload::ExternalWorkload;
use causeway_runtime::prometheus_client::encoding::EncodeLabelSet;
use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::prometheus_client::metrics::family::Family;
use causeway_runtime::prometheus_client::metrics::gauge::Gauge;
use causeway_runtime::Health;
use causeway_store::IdentityRange;
use futures::StreamExt;
use ipnet::Ipv4Net;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, instrument, warn};

use crate::core::{IpView, LocalWorkload, NodeView};

/// The label that names a host's namespace, as a pod's; clustermesh-apiserver defaults it the same way.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
const DEFAULT_NAMESPACE: &str = "default";

/// What the conversion needs to know about the local cluster.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    pub name: Arc<str>,
    pub id: u32,
    /// The identities this cluster allocates; a host's identity must be one of them.
    pub identities: IdentityRange,
}

/// Why an object contributes nothing to the view. Never an error of identity-sync: the object is simply not (yet)
/// a host to peer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("not registered (no status yet)")]
    NotReady,
    #[error("{0} is not set (a host joins the mesh datapath only with it)")]
    Missing(&'static str),
    #[error("{field}={value:?} is not valid: {why}")]
    Invalid { field: &'static str, value: String, why: &'static str },
}

impl Skip {
    /// Short reason for the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::NotReady => "not_ready",
            Skip::Missing(_) => "missing_field",
            Skip::Invalid { .. } => "invalid_value",
        }
    }

    fn invalid(field: &'static str, value: &str, why: &'static str) -> Skip {
        // Bound what a hostile value can put into logs and status.
        Skip::Invalid { field, value: value.chars().take(64).collect(), why }
    }
}

fn required<'a>(field: &'static str, v: Option<&'a str>) -> Result<&'a str, Skip> {
    v.map(str::trim).filter(|v| !v.is_empty()).ok_or(Skip::Missing(field))
}

/// A WireGuard public key: base64 of 32 bytes, as `wg` prints it.
fn valid_wireguard_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|b| b.len() == 32)
}

/// The view entries of one `ExternalWorkload`, or why it has none.
///
/// The status fields, not the `Ready` condition, decide: clustermesh-apiserver writes `ip`, `meshIPv4` and
/// `wireguardPublicKey` exactly when it exports the host (node record and ipcache entries) and clears them when it
/// withdraws them. `Ready=False` with those fields set means "the last re-registration was refused, the previous
/// one is still exported": local nodes must keep peering with the host exactly as remote clusters do.
///
/// Usable means: `status.ip` (a unicast IPv4 address: the underlay the local nodes reach it at),
/// `status.wireguardPublicKey`, `spec.ipv4AllocCIDR`, `status.meshIPv4` inside that range, and `status.id` one of
/// the local cluster's identities. `status.ipv6`, when set, must be a unicast IPv6 address and is added to the
/// node's internal IPs. Anything else yields a [`Skip`].
pub fn convert(w: &ExternalWorkload, local: &LocalCluster) -> Result<LocalWorkload, Skip> {
    let name = required("metadata.name", w.metadata.name.as_deref())?;
    let Some(status) = &w.status else { return Err(Skip::NotReady) };
    let raw = required("status.ip", status.ip.as_deref())?;
    let ip: Ipv4Addr = raw.parse().map_err(|_| Skip::invalid("status.ip", raw, "not an IPv4 address"))?;
    if !causeway_store::validate::is_workload_ip(&IpAddr::V4(ip)) || ip.is_broadcast() {
        return Err(Skip::invalid("status.ip", raw, "not a unicast address"));
    }
    let ipv6 = match status.ipv6.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        None => None,
        Some(raw) => {
            let v6: Ipv6Addr = raw.parse().map_err(|_| Skip::invalid("status.ipv6", raw, "not an IPv6 address"))?;
            if !causeway_store::validate::is_workload_ip(&IpAddr::V6(v6)) {
                return Err(Skip::invalid("status.ipv6", raw, "not a unicast address"));
            }
            Some(v6)
        }
    };
    let key = required("status.wireguardPublicKey", status.wireguard_public_key.as_deref())?;
    if !valid_wireguard_key(key) {
        return Err(Skip::invalid("status.wireguardPublicKey", key, "not the base64 of a 32-byte WireGuard key"));
    }
    let raw = required("spec.ipv4AllocCIDR", w.spec.ipv4_alloc_cidr.as_deref())?;
    let cidr: Ipv4Net = raw.parse().map_err(|_| Skip::invalid("spec.ipv4AllocCIDR", raw, "not an IPv4 CIDR"))?;
    // The whole range is routed to the host, whatever host bits the object spells.
    let cidr = cidr.trunc();
    let raw = required("status.meshIPv4", status.mesh_ipv4.as_deref())?;
    let mesh: Ipv4Addr = raw.parse().map_err(|_| Skip::invalid("status.meshIPv4", raw, "not an IPv4 address"))?;
    if !cidr.contains(&mesh) {
        return Err(Skip::invalid("status.meshIPv4", raw, "not inside spec.ipv4AllocCIDR"));
    }
    let id = status.id.ok_or(Skip::Missing("status.id"))?;
    if id == local.identities.first || !local.identities.contains(id) {
        return Err(Skip::invalid("status.id", &id.to_string(), "not an identity of the local cluster's range"));
    }
    let namespace = w
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(NAMESPACE_LABEL))
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    let mut internal_ips = vec![IpAddr::V4(ip)];
    internal_ips.extend(ipv6.map(IpAddr::V6));
    let node = NodeView {
        cluster: local.name.clone(),
        cluster_id: local.id,
        name: name.into(),
        internal_ips,
        pod_cidrs: vec![cidr.into()],
        zone: None,
        wireguard_pub_key: key.into(),
    };
    let ip = IpView {
        ip: IpAddr::V4(mesh),
        identity: id,
        host_ip: Some(IpAddr::V4(ip)),
        encrypt_key: 0,
        cluster_id: local.id,
        cluster: local.name.clone(),
        namespace: namespace.into(),
        pod_name: name.into(),
    };
    Ok(LocalWorkload { node, ip })
}

/// What the merged view is told about local external workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadChange {
    /// A usable workload appeared or changed.
    Upsert(LocalWorkload),
    /// A workload is gone or no longer usable: withdraw what it contributed.
    Delete(String),
    /// The first list is complete.
    Synced,
}

/// A report for logs and metrics: the object `name` became unusable for `skip` (reported once per change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipNotice {
    pub name: String,
    pub skip: Skip,
}

/// Watch events reduced to view changes. Pure.
#[derive(Debug)]
pub struct WorkloadIndex {
    local: LocalCluster,
    /// Every object's last outcome, by name.
    outcomes: BTreeMap<String, Result<LocalWorkload, Skip>>,
    init: Option<BTreeSet<String>>,
}

/// The output of one watch event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<WorkloadChange>,
    pub skipped: Vec<SkipNotice>,
}

impl WorkloadIndex {
    pub fn new(local: LocalCluster) -> Self {
        WorkloadIndex { local, outcomes: BTreeMap::new(), init: None }
    }

    /// Workloads in the view, and objects skipped.
    pub fn counts(&self) -> (usize, usize) {
        let usable = self.outcomes.values().filter(|o| o.is_ok()).count();
        (usable, self.outcomes.len() - usable)
    }

    fn set(&mut self, name: String, now: Option<Result<LocalWorkload, Skip>>, out: &mut Applied) {
        let old = match &now {
            Some(now) => {
                if self.outcomes.get(&name) == Some(now) {
                    return;
                }
                self.outcomes.insert(name.clone(), now.clone())
            }
            None => self.outcomes.remove(&name),
        };
        let was_usable = matches!(old, Some(Ok(_)));
        match now {
            Some(Ok(w)) => out.changes.push(WorkloadChange::Upsert(w)),
            Some(Err(skip)) => {
                if was_usable {
                    out.changes.push(WorkloadChange::Delete(name.clone()));
                }
                out.skipped.push(SkipNotice { name, skip });
            }
            None if was_usable => out.changes.push(WorkloadChange::Delete(name)),
            None => {}
        }
    }

    pub fn apply(&mut self, ev: Event<ExternalWorkload>) -> Applied {
        let mut out = Applied::default();
        match ev {
            Event::Init => self.init = Some(BTreeSet::new()),
            Event::Apply(w) | Event::InitApply(w) => {
                let Some(name) = w.metadata.name.clone() else { return out };
                if let Some(seen) = &mut self.init {
                    seen.insert(name.clone());
                }
                let now = convert(&w, &self.local);
                self.set(name, Some(now), &mut out);
            }
            Event::Delete(w) => {
                let Some(name) = w.metadata.name.clone() else { return out };
                self.set(name, None, &mut out);
            }
            Event::InitDone => {
                if let Some(seen) = self.init.take() {
                    let gone: Vec<String> = self.outcomes.keys().filter(|n| !seen.contains(*n)).cloned().collect();
                    for name in gone {
                        self.set(name, None, &mut out);
                    }
                }
                out.changes.push(WorkloadChange::Synced);
            }
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// `causeway_identity_sync_external_workloads{state="in_view"|"skipped"}` and
/// `causeway_identity_sync_external_workload_skips_total{reason}` (one per change of an object's problem).
#[derive(Clone, Debug, Default)]
pub struct WorkloadMetrics {
    objects: Family<StateLabels, Gauge>,
    skips: Family<ReasonLabels, Counter>,
}

impl WorkloadMetrics {
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register(
                "identity_sync_external_workloads",
                "Local ExternalWorkloads: in the mesh view, or skipped (not ready, a field missing or invalid)",
                self.objects.clone(),
            );
            r.register(
                "identity_sync_external_workload_skips",
                "Times a local ExternalWorkload became unusable for the mesh view, by reason",
                self.skips.clone(),
            );
        });
    }

    fn observe(&self, index: &WorkloadIndex, applied: &Applied) {
        let (usable, skipped) = index.counts();
        let set = |state: &str, n: usize| {
            let l = StateLabels { state: state.to_string() };
            self.objects.get_or_create(&l).set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("in_view", usable);
        set("skipped", skipped);
        for n in &applied.skipped {
            self.skips.get_or_create(&ReasonLabels { reason: n.skip.reason().to_string() }).inc();
        }
    }
}

/// Watches the local ExternalWorkloads and sends [`WorkloadChange`]s until `tx` closes. Watch errors (the CRD not
/// installed, RBAC) are retried with kube-runtime's default backoff.
#[instrument(name = "local_workloads", skip_all, fields(cluster = %local.name))]
pub async fn run(client: Client, local: LocalCluster, metrics: WorkloadMetrics, tx: mpsc::Sender<WorkloadChange>) {
    let stream = watcher::watcher(Api::<ExternalWorkload>::all(client), watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut index = WorkloadIndex::new(local);
    let mut failing = false;
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = tx.closed() => return,
        };
        let applied = match ev {
            Some(Ok(ev)) => {
                failing = false;
                index.apply(ev)
            }
            Some(Err(e)) => {
                // Once per failure streak: the backoff retries quietly.
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "watching ExternalWorkloads failed; retrying (is the CRD installed? check RBAC: list/watch externalworkloads.causeway.io)");
                }
                continue;
            }
            None => return,
        };
        metrics.observe(&index, &applied);
        for n in &applied.skipped {
            warn!(workload = %n.name, reason = n.skip.reason(), "external workload not added to the mesh view: {}", n.skip);
        }
        for c in applied.changes {
            match &c {
                WorkloadChange::Upsert(w) => {
                    info!(workload = %w.node.name, mesh_ip = %w.ip.ip, identity = w.ip.identity, "external workload in the mesh view")
                }
                WorkloadChange::Delete(name) => {
                    info!(workload = %name, "external workload withdrawn from the mesh view")
                }
                WorkloadChange::Synced => {}
            }
            if tx.send(c).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_crds::external_workload::{ExternalWorkloadSpec, ExternalWorkloadStatus, WorkloadCondition};
    use causeway_store::{ClusterId, MaxConnectedClusters};

    const KEY: &str = "hIc2Bzv5nFyTmnTVcMrh0/qvNTsWqQ/xN7h0DjwAlnU=";

    fn local() -> LocalCluster {
        let mode = MaxConnectedClusters::C255;
        let id = ClusterId::new(2, mode).unwrap_or_else(|e| panic!("{e}"));
        LocalCluster { name: "west".into(), id: 2, identities: id.identity_range(mode) }
    }

    fn ready(status: &str) -> WorkloadCondition {
        WorkloadCondition {
            type_: causeway_crds::external_workload::CONDITION_READY.into(),
            status: status.into(),
            last_transition_time: "2026-11-23T18:00:00Z".into(),
            reason: "Registered".into(),
            message: String::new(),
            observed_generation: None,
        }
    }

    fn vm(name: &str) -> ExternalWorkload {
        let mut w = ExternalWorkload::new(
            name,
            ExternalWorkloadSpec { ipv4_alloc_cidr: Some("10.192.1.0/30".into()), ipv6_alloc_cidr: None },
        );
        w.metadata.labels = Some(BTreeMap::from([(NAMESPACE_LABEL.to_string(), "vms".to_string())]));
        w.status = Some(ExternalWorkloadStatus {
            id: Some((2 << 16) + 7),
            ip: Some("192.168.50.10".into()),
            ipv6: None,
            mesh_ipv4: Some("10.192.1.1".into()),
            wireguard_public_key: Some(KEY.into()),
            conditions: vec![ready("True")],
        });
        w
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_ready_host_becomes_a_node_and_its_mesh_address() {
        let w = convert(&vm("vm-1"), &local()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            w.node,
            NodeView {
                cluster: "west".into(),
                cluster_id: 2,
                name: "vm-1".into(),
                internal_ips: vec![ip("192.168.50.10")],
                pod_cidrs: vec!["10.192.1.0/30".parse().unwrap_or_else(|e| panic!("{e}"))],
                zone: None,
                wireguard_pub_key: KEY.into(),
            }
        );
        assert_eq!(
            w.ip,
            IpView {
                ip: ip("10.192.1.1"),
                identity: (2 << 16) + 7,
                host_ip: Some(ip("192.168.50.10")),
                encrypt_key: 0,
                cluster_id: 2,
                cluster: "west".into(),
                namespace: "vms".into(),
                pod_name: "vm-1".into(),
            }
        );
        // With an IPv6 address too, and without the namespace label.
        let mut o = vm("vm-1");
        o.metadata.labels = None;
        if let Some(s) = o.status.as_mut() {
            s.ipv6 = Some("fd00:50::10".into());
        }
        let w = convert(&o, &local()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.node.internal_ips, vec![ip("192.168.50.10"), ip("fd00:50::10")]);
        assert_eq!(&*w.ip.namespace, "default");
    }

    #[test]
    fn unusable_objects_say_why() {
        type Edit = fn(&mut ExternalWorkload);
        type Check = fn(&Skip) -> bool;
        let cases: Vec<(&str, Edit, Check)> = vec![
            ("no status", |w| w.status = None, |s| *s == Skip::NotReady),
            (
                "keyless re-registration",
                |w| w.status.iter_mut().for_each(|s| s.wireguard_public_key = None),
                |s| *s == Skip::Missing("status.wireguardPublicKey"),
            ),
            ("no ip", |w| w.status.iter_mut().for_each(|s| s.ip = None), |s| *s == Skip::Missing("status.ip")),
            (
                "IPv6 as ip",
                |w| w.status.iter_mut().for_each(|s| s.ip = Some("fd00::1".into())),
                |s| matches!(s, Skip::Invalid { field: "status.ip", .. }),
            ),
            (
                "loopback ip",
                |w| w.status.iter_mut().for_each(|s| s.ip = Some("127.0.0.1".into())),
                |s| matches!(s, Skip::Invalid { field: "status.ip", .. }),
            ),
            (
                "bad ipv6",
                |w| w.status.iter_mut().for_each(|s| s.ipv6 = Some("10.0.0.1".into())),
                |s| matches!(s, Skip::Invalid { field: "status.ipv6", .. }),
            ),
            (
                "no key",
                |w| w.status.iter_mut().for_each(|s| s.wireguard_public_key = None),
                |s| *s == Skip::Missing("status.wireguardPublicKey"),
            ),
            (
                "key not base64",
                |w| w.status.iter_mut().for_each(|s| s.wireguard_public_key = Some("not a key!".into())),
                |s| matches!(s, Skip::Invalid { field: "status.wireguardPublicKey", .. }),
            ),
            (
                "key of 16 bytes",
                |w| w.status.iter_mut().for_each(|s| s.wireguard_public_key = Some("AAAAAAAAAAAAAAAAAAAAAA==".into())),
                |s| matches!(s, Skip::Invalid { field: "status.wireguardPublicKey", .. }),
            ),
            ("no CIDR", |w| w.spec.ipv4_alloc_cidr = None, |s| *s == Skip::Missing("spec.ipv4AllocCIDR")),
            (
                "bad CIDR",
                |w| w.spec.ipv4_alloc_cidr = Some("10.192.1.0/33".into()),
                |s| matches!(s, Skip::Invalid { field: "spec.ipv4AllocCIDR", .. }),
            ),
            (
                "IPv6 CIDR",
                |w| w.spec.ipv4_alloc_cidr = Some("fd00::/64".into()),
                |s| matches!(s, Skip::Invalid { field: "spec.ipv4AllocCIDR", .. }),
            ),
            (
                "no meshIPv4",
                |w| w.status.iter_mut().for_each(|s| s.mesh_ipv4 = None),
                |s| *s == Skip::Missing("status.meshIPv4"),
            ),
            (
                "meshIPv4 outside the range",
                |w| w.status.iter_mut().for_each(|s| s.mesh_ipv4 = Some("10.192.2.1".into())),
                |s| matches!(s, Skip::Invalid { field: "status.meshIPv4", .. }),
            ),
            ("no id", |w| w.status.iter_mut().for_each(|s| s.id = None), |s| *s == Skip::Missing("status.id")),
            (
                "id of another cluster",
                |w| w.status.iter_mut().for_each(|s| s.id = Some((3 << 16) + 7)),
                |s| matches!(s, Skip::Invalid { field: "status.id", .. }),
            ),
        ];
        for (what, edit, check) in cases {
            let mut w = vm("vm-1");
            edit(&mut w);
            let err = convert(&w, &local()).err().unwrap_or_else(|| panic!("{what}: converted"));
            assert!(check(&err), "{what}: {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn index_withdraws_on_not_ready_delete_and_relist_and_reports_each_problem_once() {
        let mut idx = WorkloadIndex::new(local());
        let a = idx.apply(Event::Apply(vm("vm-1")));
        assert!(matches!(&a.changes[..], [WorkloadChange::Upsert(w)] if &*w.node.name == "vm-1"), "{a:?}");
        // Unchanged: nothing.
        assert_eq!(idx.apply(Event::Apply(vm("vm-1"))), Applied::default());

        // A refused re-registration (Ready=False, the previous registration still exported): kept as it is.
        let mut refused = vm("vm-1");
        refused.status.iter_mut().for_each(|s| s.conditions = vec![ready("False")]);
        assert_eq!(idx.apply(Event::Apply(refused)), Applied::default());

        // Withdrawn by the apiserver (status cleared): one delete and one notice; the same again: nothing.
        let mut down = vm("vm-1");
        down.status = None;
        let a = idx.apply(Event::Apply(down.clone()));
        assert_eq!(a.changes, vec![WorkloadChange::Delete("vm-1".into())]);
        assert_eq!(a.skipped, vec![SkipNotice { name: "vm-1".into(), skip: Skip::NotReady }]);
        assert_eq!(idx.apply(Event::Apply(down.clone())), Applied::default());
        assert_eq!(idx.counts(), (0, 1));
        // A different problem is reported, with no view change.
        down = vm("vm-1");
        down.status.iter_mut().for_each(|s| s.mesh_ipv4 = None);
        let a = idx.apply(Event::Apply(down.clone()));
        assert!(a.changes.is_empty());
        assert_eq!(a.skipped.len(), 1);
        // Deleting a skipped object changes nothing in the view.
        assert_eq!(idx.apply(Event::Delete(down)), Applied::default());

        // Back, then deleted: delete.
        idx.apply(Event::Apply(vm("vm-1")));
        let a = idx.apply(Event::Delete(vm("vm-1")));
        assert_eq!(a.changes, vec![WorkloadChange::Delete("vm-1".into())]);

        // A re-list drops what did not come back and ends with Synced.
        idx.apply(Event::Apply(vm("vm-1")));
        idx.apply(Event::Apply(vm("vm-2")));
        idx.apply(Event::Init);
        let a = idx.apply(Event::InitApply(vm("vm-2")));
        assert!(a.changes.is_empty());
        let a = idx.apply(Event::InitDone);
        assert_eq!(a.changes, vec![WorkloadChange::Delete("vm-1".into()), WorkloadChange::Synced]);
        assert_eq!(idx.counts(), (1, 0));
    }

    #[test]
    fn metrics_count_objects_and_problems() {
        let health = Health::new();
        let m = WorkloadMetrics::default();
        m.register(&health);
        let mut idx = WorkloadIndex::new(local());
        let a = idx.apply(Event::Apply(vm("vm-1")));
        m.observe(&idx, &a);
        let mut bad = vm("vm-2");
        bad.status.iter_mut().for_each(|s| s.wireguard_public_key = Some("x".into()));
        let a = idx.apply(Event::Apply(bad));
        m.observe(&idx, &a);
        let text = health.render_metrics();
        assert!(text.contains("causeway_identity_sync_external_workloads{state=\"in_view\"} 1"), "{text}");
        assert!(text.contains("causeway_identity_sync_external_workloads{state=\"skipped\"} 1"), "{text}");
        assert!(
            text.contains("causeway_identity_sync_external_workload_skips_total{reason=\"invalid_value\"} 1"),
            "{text}"
        );
    }
}

//! The adapter: the `causeway.v1.Workloads` gRPC service. It reads the peer certificate and the ExternalWorkload
//! object, asks the core for a [`Plan`], and carries it out: identity from the shared allocator, ipcache entries
//! and the node record into the shared store writer, the identity handed to the export loop (so it is exported
//! like a pod's), and the object's status (`Ready=False` with the reason when a registration is refused).

use std::net::IpAddr;
use std::sync::Arc;

use causeway_api::v1::workloads_server::Workloads;
use causeway_api::v1::{RegisterRequest, RegisterResponse};
use causeway_crds::external_workload::CONDITION_READY;
use causeway_crds::{ExternalWorkload, ExternalWorkloadStatus, WorkloadCondition};
use causeway_store::{ClusterInfo, StoreKey};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn, Instrument};

use super::core::{self, Plan, Refusal, Registry, WorkloadObject};
use super::metrics::WorkloadMetrics;
use crate::kube::Input;
use crate::node_owners::ClusterNodeNames;
use crate::sink::{ExportSink, IdentityResolver};

/// What a registered host is told about the cluster besides its registration (the `--service-cidrs`,
/// `--cluster-dns-service` and `--cluster-domain` flags).
#[derive(Debug, Clone, Default)]
pub struct ClusterNetwork {
    pub service_cidrs: Vec<IpNet>,
    /// `(namespace, name)` of the cluster DNS Service; None: not looked up.
    pub dns_service: Option<(String, String)>,
    pub domain: String,
}

/// The registration service. Registrations are serialised (one lock over the registry): they are rare, and this
/// keeps address and range ownership and identity reference counts exact.
pub struct WorkloadService<S, R> {
    client: kube::Client,
    cluster: ClusterInfo,
    sink: Arc<S>,
    identities: Arc<R>,
    export: mpsc::Sender<Input>,
    registry: Mutex<Registry>,
    metrics: WorkloadMetrics,
    network: ClusterNetwork,
    /// Names cluster Nodes hold in the store (a host may not take one; one taken later evicts the host).
    node_names: ClusterNodeNames,
}

/// Free slots of the export loop's channel below which the start-up restore leaves the rest to the watcher (each
/// restored host takes one slot until the export loop runs).
const RESTORE_CHANNEL_RESERVE: usize = 64;

/// Why a Register call failed: a refusal decided by the core, or an I/O failure.
enum Failure {
    Refused(Refusal),
    Io(Status),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Io(s)
    }
}

impl<S, R> WorkloadService<S, R>
where
    S: ExportSink + 'static,
    R: IdentityResolver + 'static,
{
    pub fn new(
        client: kube::Client,
        cluster: ClusterInfo,
        sink: Arc<S>,
        identities: Arc<R>,
        export: mpsc::Sender<Input>,
        metrics: WorkloadMetrics,
        network: ClusterNetwork,
    ) -> Self {
        WorkloadService {
            client,
            cluster,
            sink,
            identities,
            export,
            registry: Mutex::new(Registry::new(network.service_cidrs.clone())),
            metrics,
            network,
            node_names: ClusterNodeNames::default(),
        }
    }

    /// Refuse (and evict, see [`WorkloadService::evict`]) hosts named like the cluster Nodes in `names`.
    pub fn with_node_names(mut self, names: ClusterNodeNames) -> Self {
        self.node_names = names;
        self
    }

    async fn read_object(&self, name: &str) -> Result<Option<(WorkloadObject, ExternalWorkload)>, Status> {
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let obj = api.get_opt(name).await.map_err(|e| {
            Status::unavailable(format!("cannot read ExternalWorkload {name:?} from the Kubernetes API: {e}"))
        })?;
        Ok(obj.map(|o| (view(name, &o), o)))
    }

    /// Whether a Node of the cluster is named `name` (the export writes its node record under the same key).
    async fn node_exists(&self, name: &str) -> Result<bool, Status> {
        let api: Api<Node> = Api::all(self.client.clone());
        // A list narrowed to the one name: the role lists Nodes already (the export watches them).
        let params = ListParams::default().fields(&format!("metadata.name={name}"));
        let list = api
            .list(&params)
            .await
            .map_err(|e| Status::unavailable(format!("cannot look up Node {name:?} in the Kubernetes API: {e}")))?;
        Ok(list.items.iter().any(|n| n.metadata.name.as_deref() == Some(name)))
    }

    /// Watches ExternalWorkload objects for as long as the service lives: a deleted object's host is withdrawn
    /// (ipcache entries and node record deleted, identity released); a registered host whose object's labels
    /// changed gets the new identity on the same addresses; and a host an earlier process registered (its object's
    /// status names its addresses and key) is exported again without waiting for it to re-register.
    pub fn spawn_watcher(self: Arc<Self>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let api: Api<ExternalWorkload> = Api::all(self.client.clone());
            let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        if o.metadata.deletion_timestamp.is_some() {
                            self.withdraw(&name).await;
                        } else {
                            self.restore(&name, &o).await;
                        }
                    }
                    Ok(watcher::Event::Delete(o)) => self.withdraw(&o.metadata.name.unwrap_or_default()).await,
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(e) => {
                        warn!(cluster = %self.cluster.name, error = %e, "ExternalWorkload watch failed; retrying")
                    }
                }
            }
        })
    }

    /// Exports again the hosts an earlier process registered (from their objects' status), before the export loop
    /// starts. Their entries are then handed to the store writer ahead of its initial sync, so the stale-key
    /// cleanup keeps them and the synced canaries cover them: peers never see a restarting apiserver withdraw a host
    /// for a moment. Stops early (the watcher restores the rest) rather than fill the export loop's channel, which
    /// nobody drains yet. Returns how many objects it looked at.
    pub async fn restore_all(&self) -> Result<usize, kube::Error> {
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let objects = api.list(&ListParams::default()).await?;
        let mut seen = 0;
        for o in &objects.items {
            if self.export.capacity() < RESTORE_CHANNEL_RESERVE {
                warn!(
                    cluster = %self.cluster.name,
                    restored = seen,
                    total = objects.items.len(),
                    "restoring the rest of the external workloads once the export runs"
                );
                break;
            }
            if o.metadata.deletion_timestamp.is_none() {
                self.restore(o.metadata.name.as_deref().unwrap_or_default(), o).await;
            }
            seen += 1;
        }
        Ok(seen)
    }

    fn set_gauges(&self, registry: &Registry) {
        self.metrics.registered.set(registry.len() as i64);
        self.metrics.meshed.set(registry.meshed() as i64);
    }

    #[instrument(skip_all, fields(cluster = %self.cluster.name, workload = name))]
    async fn restore(&self, name: &str, obj: &ExternalWorkload) {
        let mut registry = self.registry.lock().await;
        // A host this process registered: only a change of the object's labels matters (a new identity for the same
        // addresses and ranges). Otherwise the host an earlier process registered, from the object's status.
        let (req, object, relabel) = match registry.get(name) {
            Some(known) => (known.request.clone(), known.pinned(view(name, obj)), true),
            None => {
                let Some(status) = &obj.status else { return };
                let req = core::request_from_status(
                    name,
                    status.ip.as_deref(),
                    status.ipv6.as_deref(),
                    status.wireguard_public_key.as_deref(),
                );
                match req {
                    Some(req) => (req, view(name, obj), false),
                    None => return,
                }
            }
        };
        let mut object = object;
        object.node_name_taken = req.wireguard_key.is_some() && self.node_names.contains(name);
        let plan = match registry.plan(self.cluster.name.as_str(), &req, Some(&object)) {
            Ok(plan) if relabel && plan.reuse_id.is_some() => return,
            Ok(plan) => plan,
            Err(r) => {
                warn!(reason = %r, "cannot re-export the host");
                return;
            }
        };
        match self.carry_out(&plan, &object).await {
            Ok(id) => {
                registry.commit(&plan, id);
                self.set_gauges(&registry);
                drop(registry);
                let status = obj.status.clone().unwrap_or_default();
                let mesh_ip = plan.mesh.as_ref().map(|m| m.mesh_ipv4.to_string());
                let key = plan.mesh.as_ref().map(|m| m.wireguard_key.clone());
                if status.id != Some(id) || status.mesh_ipv4 != mesh_ip || status.wireguard_public_key != key {
                    // The status must name the identity and mesh address peers now see for the host.
                    if let Err(e) = self.write_status(obj, &plan, id).await {
                        warn!(error = %e.message(), "cannot write the re-exported registration into the status");
                    }
                }
                info!(id, ips = ?plan.ips(), mesh = plan.mesh.is_some(), relabel, "re-exported the host");
            }
            Err(e) => warn!(error = %e.message(), "cannot re-export the host"),
        }
    }

    #[instrument(skip_all, fields(cluster = %self.cluster.name, workload = name))]
    async fn withdraw(&self, name: &str) {
        let mut registry = self.registry.lock().await;
        let Some(gone) = registry.forget(name) else { return };
        self.set_gauges(&registry);
        drop(registry);
        for ip in &gone.ips {
            if let Err(e) = self.sink.delete(&StoreKey::Ip { ip: *ip }).await {
                warn!(%ip, error = %e, "cannot withdraw the ipcache entry of a deleted external workload");
            }
        }
        if gone.mesh.is_some() {
            if let Err(e) = self.sink.delete(&self.node_key(name)).await {
                warn!(error = %e, "cannot withdraw the node record of a deleted external workload");
            }
        }
        if let Err(e) = self.identities.release(&gone.labels).await {
            warn!(labels = %gone.labels, error = %e, "cannot release the identity of a deleted external workload");
        }
        info!(id = gone.id, ips = ?gone.ips, mesh = gone.mesh.is_some(), "external workload deleted: withdrawn");
    }

    /// A cluster Node took the name of meshed host `name` (its node record is the Node's now): the host leaves the
    /// mesh datapath as if it had registered without a key (its mesh address's ipcache entry is withdrawn; its
    /// identity and underlay address stay), and its object says why: `Ready=False`, reason `NodeNameTaken`, no
    /// mesh address or key in the status (so nothing peers with it under the Node's name).
    #[instrument(skip_all, fields(cluster = %self.cluster.name, workload = name))]
    pub async fn evict(&self, name: &str) {
        let mut registry = self.registry.lock().await;
        let Some(known) = registry.get(name).filter(|k| k.mesh.is_some()).cloned() else { return };
        let obj = match Api::<ExternalWorkload>::all(self.client.clone()).get_opt(name).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => return warn!(error = %e, "cannot read the evicted host's object; its status is not updated"),
        };
        let mut req = known.request.clone();
        req.wireguard_key = None;
        let plan = match registry.plan(self.cluster.name.as_str(), &req, Some(&known.pinned(view(name, &obj)))) {
            Ok(plan) => plan,
            Err(r) => return warn!(reason = %r, "cannot take the evicted host out of the mesh"),
        };
        match self.carry_out(&plan, &view(name, &obj)).await {
            Ok(id) => registry.commit(&plan, id),
            Err(e) => return warn!(error = %e.message(), "cannot take the evicted host out of the mesh"),
        }
        self.set_gauges(&registry);
        drop(registry);
        self.metrics.evictions.inc();
        let refusal = Refusal::NodeNameTaken(name.to_string());
        let previous = obj.status.clone().unwrap_or_default();
        let reason = refusal.condition_reason().unwrap_or("NodeNameTaken");
        let message = format!(
            "a Node named {name:?} joined the cluster after this host; the node record is the Node's now and the host \
             left the mesh datapath (it keeps its identity and address): give the ExternalWorkload (and the host) \
             another name and register again"
        );
        let conditions = refused_conditions(&previous, reason, &message, obj.metadata.generation, &now_rfc3339());
        let patch = serde_json::json!({
            "status": { "conditions": conditions, "meshIPv4": null, "wireguardPublicKey": null }
        });
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            warn!(error = %e, "cannot write the eviction into the status");
        }
        warn!(withdrawn = ?plan.withdraw, "a cluster Node took this host's name: the host left the mesh datapath");
    }

    /// Evicts every host whose name the node-record arbiter reports taken, until the sender is gone.
    pub fn spawn_evictions(self: Arc<Self>, mut names: mpsc::UnboundedReceiver<String>) -> JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(name) = names.recv().await {
                self.evict(&name).await;
            }
        })
    }

    fn node_key(&self, name: &str) -> StoreKey {
        StoreKey::Node { cluster: self.cluster.name.to_string(), name: name.to_string() }
    }

    async fn carry_out(&self, plan: &Plan, object: &WorkloadObject) -> Result<u32, Status> {
        let name = plan.request.name.as_str();
        let id =
            match plan.reuse_id {
                Some(id) => id,
                None => self.identities.acquire(&plan.labels).await.map_err(|e| {
                    Status::unavailable(format!("cannot allocate an identity for {}: {e}", plan.labels))
                })?,
            };
        for entry in plan.ipcache_entries(id) {
            let ip = entry.ip;
            let value = serde_json::to_string(&entry)
                .map_err(|e| Status::internal(format!("cannot encode the ipcache entry of {ip}: {e}")))?;
            self.sink
                .upsert(&StoreKey::Ip { ip }, value)
                .await
                .map_err(|e| Status::unavailable(format!("cannot write the ipcache entry of {ip}: {e}")))?;
        }
        for ip in &plan.withdraw {
            self.sink
                .delete(&StoreKey::Ip { ip: *ip })
                .await
                .map_err(|e| Status::unavailable(format!("cannot withdraw the ipcache entry of {ip}: {e}")))?;
        }
        // The node record goes through the same store writer as cluster nodes' (one owner of the prefix): it is
        // re-written after an etcd reset and removed with the apiserver's lease like every other export.
        if let Some(mesh) = &plan.mesh {
            let node = core::node_record(&self.cluster, &plan.request, mesh, &object.labels);
            let value = serde_json::to_string(&node)
                .map_err(|e| Status::internal(format!("cannot encode the node record of {name}: {e}")))?;
            self.sink
                .upsert(&self.node_key(name), value)
                .await
                .map_err(|e| Status::unavailable(format!("cannot write the node record of {name}: {e}")))?;
        } else if plan.withdraw_node {
            self.sink
                .delete(&self.node_key(name))
                .await
                .map_err(|e| Status::unavailable(format!("cannot withdraw the node record of {name}: {e}")))?;
        }
        // The export loop exports every identity the allocator holds, until the allocator collects it; this one is
        // held for as long as the host is registered.
        if self.export.send(Input::IdentitiesRestored(vec![(id, plan.labels.clone())])).await.is_err() {
            return Err(Status::unavailable("the export loop has stopped"));
        }
        if let Some(old) = &plan.release {
            if let Err(e) = self.identities.release(old).await {
                warn!(workload = name, labels = %old, error = %e, "cannot release the previous identity");
            }
        }
        self.sink.flush().await.map_err(|e| Status::unavailable(format!("store flush failed: {e}")))?;
        Ok(id)
    }

    async fn write_status(&self, obj: &ExternalWorkload, plan: &Plan, id: u32) -> Result<(), Status> {
        let name = plan.request.name.as_str();
        let previous = obj.status.clone().unwrap_or_default();
        let status = ready_status(&previous, plan, id, obj.metadata.generation, &now_rfc3339());
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let mut patch = serde_json::json!({ "status": status });
        // A merge patch leaves absent fields alone: an address or key the host no longer has is removed with an
        // explicit null, or the status would keep naming it.
        for field in ["ip", "ipv6", "meshIPv4", "wireguardPublicKey"] {
            if patch["status"].get(field).is_none() {
                patch["status"][field] = serde_json::Value::Null;
            }
        }
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Status::unavailable(format!("registered, but cannot write the status of {name:?}: {e}")))?;
        Ok(())
    }

    /// A refused registration of an existing object: `Ready=False` with the reason, the rest of the status (what
    /// an earlier registration exported, which stays exported) untouched.
    async fn write_refusal(&self, obj: &ExternalWorkload, refusal: &Refusal) {
        let Some(reason) = refusal.condition_reason() else { return };
        let name = obj.metadata.name.clone().unwrap_or_default();
        let previous = obj.status.clone().unwrap_or_default();
        let conditions =
            refused_conditions(&previous, reason, &refusal.to_string(), obj.metadata.generation, &now_rfc3339());
        // Conditions are a list, which a merge patch replaces whole: the list above keeps the other conditions.
        let patch = serde_json::json!({ "status": { "conditions": conditions } });
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            warn!(error = %e, "cannot write the refusal into the status");
        }
    }

    /// The ClusterIP of the cluster DNS Service, "" when it is absent or has none. Looked up at each registration
    /// (they are rare), so a DNS Service created or moved later is picked up without a restart.
    async fn cluster_dns(&self) -> String {
        let Some((namespace, name)) = &self.network.dns_service else { return String::new() };
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        // A list narrowed to the one name rather than a get: the apiserver's role already lists Services (the
        // export watches them), so this needs no extra permission.
        let params = ListParams::default().fields(&format!("metadata.name={name}"));
        match api.list(&params).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|s| s.metadata.name.as_deref() == Some(name.as_str()))
                .find_map(|s| s.spec.and_then(|spec| spec.cluster_ip))
                .filter(|ip| ip.parse::<IpAddr>().is_ok())
                .unwrap_or_default(),
            Err(e) => {
                warn!(service = %format!("{namespace}/{name}"), error = %e, "cannot look up the cluster DNS Service");
                String::new()
            }
        }
    }

    async fn register_inner(&self, request: Request<RegisterRequest>) -> Result<RegisterResponse, Failure> {
        let certs = request.peer_certs();
        let cn = certs.as_ref().and_then(|c| c.first()).and_then(|der| super::tls::common_name(der));
        core::authorize(cn.as_deref(), certs.as_ref().is_some_and(|c| !c.is_empty())).map_err(Failure::Refused)?;
        let raw = request.into_inner();
        core::parse_name(&raw.name).map_err(Failure::Refused)?;
        tracing::Span::current().record("workload", raw.name.as_str());

        let mut registry = self.registry.lock().await;
        let mut object = self.read_object(&raw.name).await?;
        if let Some((view, _)) = object.as_mut().filter(|_| !raw.wireguard_pub_key.trim().is_empty()) {
            view.node_name_taken = self.node_names.contains(&raw.name) || self.node_exists(&raw.name).await?;
        }
        let decided = core::parse_request(&raw.name, &raw.ipv4, &raw.ipv6, &raw.wireguard_pub_key)
            .and_then(|req| registry.plan(self.cluster.name.as_str(), &req, object.as_ref().map(|(v, _)| v)));
        let plan = match decided {
            Ok(plan) => plan,
            Err(r) => {
                drop(registry);
                warn!(reason = %r, "registration refused");
                if let Some((view, obj)) = &object {
                    if !view.deleting {
                        self.write_refusal(obj, &r).await;
                    }
                }
                return Err(Failure::Refused(r));
            }
        };
        let Some((view, obj)) = object else { return Err(Status::internal("object vanished").into()) };
        let id = self.carry_out(&plan, &view).await?;
        registry.commit(&plan, id);
        self.set_gauges(&registry);
        drop(registry);
        self.write_status(&obj, &plan, id).await?;
        let mesh_ipv4 = plan.mesh.as_ref().map(|m| m.mesh_ipv4.to_string()).unwrap_or_default();
        info!(id, ips = ?plan.ips(), withdrawn = ?plan.withdraw, mesh_ipv4, "external workload registered");
        let spec = &obj.spec;
        Ok(RegisterResponse {
            cluster_name: self.cluster.name.to_string(),
            cluster_id: self.cluster.id.get(),
            identity: id,
            identity_labels: plan.labels.to_string(),
            ipv4_alloc_cidr: spec.ipv4_alloc_cidr.clone().unwrap_or_default(),
            ipv6_alloc_cidr: spec.ipv6_alloc_cidr.clone().unwrap_or_default(),
            mesh_ipv4,
            cluster_dns: self.cluster_dns().await,
            cluster_domain: self.network.domain.clone(),
            service_cidrs: self.network.service_cidrs.iter().map(IpNet::to_string).collect(),
        })
    }
}

#[tonic::async_trait]
impl<S, R> Workloads for WorkloadService<S, R>
where
    S: ExportSink + 'static,
    R: IdentityResolver + 'static,
{
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let span = tracing::info_span!("register", cluster = %self.cluster.name, workload = tracing::field::Empty);
        let result = self.register_inner(request).instrument(span).await;
        self.metrics.result(match &result {
            Ok(_) => "ok",
            Err(Failure::Refused(r)) => r.metric_label(),
            Err(Failure::Io(_)) => "error",
        });
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(Failure::Refused(r)) => Err(refusal_status(r)),
            Err(Failure::Io(s)) => Err(s),
        }
    }
}

/// The core's view of an object.
fn view(name: &str, o: &ExternalWorkload) -> WorkloadObject {
    let status = o.status.clone().unwrap_or_default();
    let status_ips = [status.ip.as_deref(), status.ipv6.as_deref(), status.mesh_ipv4.as_deref()]
        .into_iter()
        .flatten()
        // A status someone else mangled is ignored, not fatal: it only names entries to withdraw.
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    WorkloadObject {
        name: name.to_string(),
        labels: o.metadata.labels.clone().unwrap_or_default(),
        deleting: o.metadata.deletion_timestamp.is_some(),
        ipv4_alloc_cidr: o.spec.ipv4_alloc_cidr.clone(),
        ipv6_alloc_cidr: o.spec.ipv6_alloc_cidr.clone(),
        status_ips,
        status_keyed: status.wireguard_public_key.as_deref().is_some_and(|k| !k.trim().is_empty()),
        node_name_taken: false,
    }
}

/// One gRPC status per refusal, with the refusal's text as the message.
pub fn refusal_status(r: Refusal) -> Status {
    let msg = r.to_string();
    match r {
        Refusal::NotExternalWorkload(_) => Status::permission_denied(msg),
        Refusal::NoClientCertificate => Status::unauthenticated(msg),
        Refusal::Invalid(_) => Status::invalid_argument(msg),
        Refusal::UnknownWorkload(_) => Status::not_found(msg),
        Refusal::Deleting(_) | Refusal::NoAllocCidr(_) | Refusal::BadAllocCidr { .. } => {
            Status::failed_precondition(msg)
        }
        Refusal::AddressInUse { .. } | Refusal::Overlap { .. } | Refusal::NodeNameTaken(_) => {
            Status::already_exists(msg)
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `conditions` with the Ready condition replaced by `ready` (its transition time kept when its status did not
/// change, as Kubernetes conditions do).
fn with_ready(conditions: &[WorkloadCondition], mut ready: WorkloadCondition) -> Vec<WorkloadCondition> {
    if let Some(old) = conditions.iter().find(|c| c.type_ == CONDITION_READY && c.status == ready.status) {
        ready.last_transition_time = old.last_transition_time.clone();
    }
    let mut out: Vec<WorkloadCondition> = conditions.iter().filter(|c| c.type_ != CONDITION_READY).cloned().collect();
    out.push(ready);
    out
}

/// The status after a successful registration: identity, addresses, mesh address and key, and `Ready=True`.
pub fn ready_status(
    previous: &ExternalWorkloadStatus,
    plan: &Plan,
    id: u32,
    generation: Option<i64>,
    now: &str,
) -> ExternalWorkloadStatus {
    let req = &plan.request;
    let mut message = format!("registered with identity {id} at {}", req.ipv4);
    if let Some(v6) = req.ipv6 {
        message.push_str(&format!(" and {v6}"));
    }
    if let Some(m) = &plan.mesh {
        message.push_str(&format!("; in the mesh datapath as {} ({})", m.mesh_ipv4, m.ipv4_cidr));
    }
    let ready = WorkloadCondition {
        type_: CONDITION_READY.into(),
        status: "True".into(),
        last_transition_time: now.to_string(),
        reason: "Registered".into(),
        message,
        observed_generation: generation,
    };
    ExternalWorkloadStatus {
        id: Some(id),
        ip: Some(req.ipv4.to_string()),
        ipv6: req.ipv6.map(|v| v.to_string()),
        mesh_ipv4: plan.mesh.as_ref().map(|m| m.mesh_ipv4.to_string()),
        wireguard_public_key: plan.mesh.as_ref().map(|m| m.wireguard_key.clone()),
        conditions: with_ready(&previous.conditions, ready),
    }
}

/// The conditions after a refused registration: `Ready=False` with the refusal.
pub fn refused_conditions(
    previous: &ExternalWorkloadStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) -> Vec<WorkloadCondition> {
    let mut message = format!("registration refused: {message}");
    if previous.ip.is_some() {
        message.push_str("; the host's earlier registration stays exported");
    }
    let ready = WorkloadCondition {
        type_: CONDITION_READY.into(),
        status: "False".into(),
        last_transition_time: now.to_string(),
        reason: reason.into(),
        message,
        observed_generation: generation,
    };
    with_ready(&previous.conditions, ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn plan(v4: &str, v6: &str, key: &str, cidr: Option<&str>) -> Plan {
        let req = core::parse_request("vm", v4, v6, key).expect("valid");
        let object =
            WorkloadObject { name: "vm".into(), ipv4_alloc_cidr: cidr.map(String::from), ..Default::default() };
        Registry::default().plan("east", &req, Some(&object)).expect("plan")
    }

    #[test]
    fn ready_status_keeps_the_transition_time_while_ready() {
        let p = plan("10.0.0.1", "fd00::1", "", None);
        let first = ready_status(&ExternalWorkloadStatus::default(), &p, 65540, Some(1), "2026-01-01T00:00:00Z");
        assert_eq!(
            (first.id, first.ip.as_deref(), first.ipv6.as_deref()),
            (Some(65540), Some("10.0.0.1"), Some("fd00::1"))
        );
        assert_eq!((first.mesh_ipv4.as_deref(), first.wireguard_public_key.as_deref()), (None, None));
        assert_eq!(first.conditions.len(), 1);
        assert_eq!(first.conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        let p2 = plan("10.0.0.2", "", KEY, Some("10.192.1.0/30"));
        let second = ready_status(&first, &p2, 65540, Some(2), "2026-01-02T00:00:00Z");
        assert_eq!(second.conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!((second.ip.as_deref(), second.ipv6.as_deref()), (Some("10.0.0.2"), None));
        assert_eq!(
            (second.mesh_ipv4.as_deref(), second.wireguard_public_key.as_deref()),
            (Some("10.192.1.1"), Some(KEY))
        );
        assert!(second.conditions[0].message.contains("10.0.0.2"));
        assert!(second.conditions[0].message.contains("10.192.1.1"));
    }

    #[test]
    fn a_refusal_turns_ready_false_and_keeps_the_rest() {
        let p = plan("10.0.0.1", "", "", None);
        let mut ready = ready_status(&ExternalWorkloadStatus::default(), &p, 65540, Some(1), "2026-01-01T00:00:00Z");
        ready.conditions.insert(
            0,
            WorkloadCondition {
                type_: "Other".into(),
                status: "True".into(),
                last_transition_time: "2025-01-01T00:00:00Z".into(),
                reason: "X".into(),
                message: String::new(),
                observed_generation: None,
            },
        );
        let c = refused_conditions(&ready, "NoAllocCIDR", "no range", Some(2), "2026-01-02T00:00:00Z");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].type_, "Other");
        let r = &c[1];
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "NoAllocCIDR"));
        assert_eq!(r.last_transition_time, "2026-01-02T00:00:00Z");
        assert!(r.message.contains("no range") && r.message.contains("stays exported"), "{}", r.message);
        // Refused again: still False since the first refusal.
        let again = ExternalWorkloadStatus { conditions: c, ..ready.clone() };
        let c2 = refused_conditions(&again, "AllocCIDROverlap", "overlap", Some(3), "2026-01-03T00:00:00Z");
        assert_eq!(
            (c2[1].reason.as_str(), c2[1].last_transition_time.as_str()),
            ("AllocCIDROverlap", "2026-01-02T00:00:00Z")
        );
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        assert_eq!(refusal_status(Refusal::UnknownWorkload("x".into())).code(), Code::NotFound);
        assert_eq!(refusal_status(Refusal::NotExternalWorkload("root".into())).code(), Code::PermissionDenied);
        assert_eq!(refusal_status(Refusal::NoClientCertificate).code(), Code::Unauthenticated);
        assert_eq!(refusal_status(Refusal::Invalid("x".into())).code(), Code::InvalidArgument);
        assert_eq!(refusal_status(Refusal::Deleting("x".into())).code(), Code::FailedPrecondition);
        assert_eq!(refusal_status(Refusal::NoAllocCidr("x".into())).code(), Code::FailedPrecondition);
        let bad = Refusal::BadAllocCidr { field: "ipv4AllocCIDR", cidr: "x".into(), why: "y".into() };
        assert_eq!(refusal_status(bad).code(), Code::FailedPrecondition);
        let in_use = Refusal::AddressInUse { ip: "10.0.0.1".parse().expect("ip"), owner: "a".into() };
        assert_eq!(refusal_status(in_use).code(), Code::AlreadyExists);
        let overlap =
            Refusal::Overlap { what: "x".into(), theirs: "10.0.0.0/30".parse().expect("net"), owner: "a".into() };
        assert_eq!(refusal_status(overlap).code(), Code::AlreadyExists);
    }
}

//! The adapter: the `causeway.v1.Workloads` gRPC service. It reads the peer certificate and the ExternalWorkload
//! object, asks the core for a [`Plan`], and carries it out: identity from the shared allocator, ipcache entries
//! into the shared store writer, the identity handed to the export loop (so it is exported like a pod's), and the
//! object's status.

use std::net::IpAddr;
use std::sync::Arc;

use causeway_api::v1::workloads_server::Workloads;
use causeway_api::v1::{RegisterRequest, RegisterResponse};
use causeway_crds::external_workload::CONDITION_READY;
use causeway_crds::{ExternalWorkload, ExternalWorkloadStatus, WorkloadCondition};
use causeway_store::{ClusterInfo, StoreKey};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tonic::{Code, Request, Response, Status};
use tracing::{info, instrument, warn, Instrument};

use super::core::{self, Plan, Refusal, Registry, WorkloadObject};
use super::metrics::WorkloadMetrics;
use crate::kube::Input;
use crate::sink::{ExportSink, IdentityResolver};

/// The registration service. Registrations are serialised (one lock over the registry): they are rare, and this
/// keeps address ownership and identity reference counts exact.
pub struct WorkloadService<S, R> {
    client: kube::Client,
    cluster: ClusterInfo,
    sink: Arc<S>,
    identities: Arc<R>,
    export: mpsc::Sender<Input>,
    registry: Mutex<Registry>,
    metrics: WorkloadMetrics,
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
    ) -> Self {
        WorkloadService {
            client,
            cluster,
            sink,
            identities,
            export,
            registry: Mutex::new(Registry::default()),
            metrics,
        }
    }

    async fn read_object(&self, name: &str) -> Result<Option<(WorkloadObject, ExternalWorkload)>, Status> {
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let obj = api.get_opt(name).await.map_err(|e| {
            Status::unavailable(format!("cannot read ExternalWorkload {name:?} from the Kubernetes API: {e}"))
        })?;
        Ok(obj.map(|o| (view(name, &o), o)))
    }

    /// Watches ExternalWorkload objects for as long as the service lives: a deleted object's host is withdrawn
    /// (ipcache entries deleted, identity released); a registered host whose object's labels changed gets the new
    /// identity on the same addresses; and a host an earlier process registered (its object's status names its
    /// addresses) is exported again without waiting for it to re-register.
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

    #[instrument(skip_all, fields(cluster = %self.cluster.name, workload = name))]
    async fn restore(&self, name: &str, obj: &ExternalWorkload) {
        let mut registry = self.registry.lock().await;
        // A host this process registered: only a change of the object's labels matters (a new identity for the same
        // addresses). Otherwise the host an earlier process registered, from the object's status.
        let (req, relabel) = match registry.get(name) {
            Some(known) => match known.request(name) {
                Some(req) => (req, true),
                None => return,
            },
            None => {
                let Some(status) = &obj.status else { return };
                match core::request_from_status(name, status.ip.as_deref(), status.ipv6.as_deref()) {
                    Some(req) => (req, false),
                    None => return,
                }
            }
        };
        let plan = match registry.plan(self.cluster.name.as_str(), &req, Some(&view(name, obj))) {
            Ok(plan) if relabel && plan.reuse_id.is_some() => return,
            Ok(plan) => plan,
            Err(r) => {
                warn!(reason = %r, "cannot re-export the host");
                return;
            }
        };
        match self.carry_out(name, &plan).await {
            Ok(id) => {
                registry.commit(name, &plan, id);
                self.metrics.registered.set(registry.len() as i64);
                drop(registry);
                let recorded = obj.status.as_ref().and_then(|s| s.id);
                if recorded != Some(id) {
                    // The status must name the identity peers now see for the host.
                    if let Err(e) = self.write_status(obj, &req, id).await {
                        warn!(error = %e.message(), "cannot write the new identity into the status");
                    }
                }
                info!(id, ips = ?plan.ips, relabel, "re-exported the host");
            }
            Err(e) => warn!(error = %e.message(), "cannot re-export the host"),
        }
    }

    #[instrument(skip_all, fields(cluster = %self.cluster.name, workload = name))]
    async fn withdraw(&self, name: &str) {
        let mut registry = self.registry.lock().await;
        let Some(gone) = registry.forget(name) else { return };
        self.metrics.registered.set(registry.len() as i64);
        drop(registry);
        for ip in &gone.ips {
            if let Err(e) = self.sink.delete(&StoreKey::Ip { ip: *ip }).await {
                warn!(%ip, error = %e, "cannot withdraw the ipcache entry of a deleted external workload");
            }
        }
        if let Err(e) = self.identities.release(&gone.labels).await {
            warn!(labels = %gone.labels, error = %e, "cannot release the identity of a deleted external workload");
        }
        info!(id = gone.id, ips = ?gone.ips, "external workload deleted: withdrawn");
    }

    async fn carry_out(&self, name: &str, plan: &Plan) -> Result<u32, Status> {
        let id =
            match plan.reuse_id {
                Some(id) => id,
                None => self.identities.acquire(&plan.labels).await.map_err(|e| {
                    Status::unavailable(format!("cannot allocate an identity for {}: {e}", plan.labels))
                })?,
            };
        for ip in &plan.ips {
            let entry = core::ipcache_entry(*ip, id, &plan.namespace, name);
            let value = serde_json::to_string(&entry)
                .map_err(|e| Status::internal(format!("cannot encode the ipcache entry of {ip}: {e}")))?;
            self.sink
                .upsert(&StoreKey::Ip { ip: *ip }, value)
                .await
                .map_err(|e| Status::unavailable(format!("cannot write the ipcache entry of {ip}: {e}")))?;
        }
        for ip in &plan.withdraw {
            self.sink
                .delete(&StoreKey::Ip { ip: *ip })
                .await
                .map_err(|e| Status::unavailable(format!("cannot withdraw the ipcache entry of {ip}: {e}")))?;
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

    async fn write_status(&self, obj: &ExternalWorkload, req: &core::Request, id: u32) -> Result<(), Status> {
        let name = req.name.as_str();
        let previous = obj.status.clone().unwrap_or_default();
        let status = ready_status(&previous, req, id, obj.metadata.generation, &now_rfc3339());
        let api: Api<ExternalWorkload> = Api::all(self.client.clone());
        let mut patch = serde_json::json!({ "status": status });
        // A merge patch leaves absent fields alone: an address the host no longer has is removed with an explicit
        // null, or the status would keep naming it.
        for field in ["ip", "ipv6"] {
            if patch["status"].get(field).is_none() {
                patch["status"][field] = serde_json::Value::Null;
            }
        }
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Status::unavailable(format!("registered, but cannot write the status of {name:?}: {e}")))?;
        Ok(())
    }

    async fn register_inner(&self, request: Request<RegisterRequest>) -> Result<RegisterResponse, Status> {
        let certs = request.peer_certs();
        let cn = certs.as_ref().and_then(|c| c.first()).and_then(|der| super::tls::common_name(der));
        core::authorize(cn.as_deref(), certs.as_ref().is_some_and(|c| !c.is_empty())).map_err(refusal_status)?;
        let raw = request.into_inner();
        let req = core::parse_request(&raw.name, &raw.ipv4, &raw.ipv6).map_err(refusal_status)?;
        tracing::Span::current().record("workload", req.name.as_str());

        let mut registry = self.registry.lock().await;
        let object = self.read_object(&req.name).await?;
        let plan = registry.plan(self.cluster.name.as_str(), &req, object.as_ref().map(|(v, _)| v)).map_err(|r| {
            warn!(reason = %r, "registration refused");
            refusal_status(r)
        })?;
        let Some((_, obj)) = object else { return Err(Status::internal("object vanished")) };
        let id = self.carry_out(&req.name, &plan).await?;
        registry.commit(&req.name, &plan, id);
        self.metrics.registered.set(registry.len() as i64);
        drop(registry);
        self.write_status(&obj, &req, id).await?;
        info!(id, ips = ?plan.ips, withdrawn = ?plan.withdraw, "external workload registered");
        let spec = &obj.spec;
        Ok(RegisterResponse {
            cluster_name: self.cluster.name.to_string(),
            cluster_id: self.cluster.id.get(),
            identity: id,
            identity_labels: plan.labels.to_string(),
            ipv4_alloc_cidr: spec.ipv4_alloc_cidr.clone().unwrap_or_default(),
            ipv6_alloc_cidr: spec.ipv6_alloc_cidr.clone().unwrap_or_default(),
            ..Default::default()
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
            Err(s) => code_label(s.code()),
        });
        result.map(Response::new)
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::PermissionDenied | Code::Unauthenticated => "denied",
        Code::InvalidArgument => "invalid",
        Code::NotFound => "unknown_workload",
        Code::AlreadyExists => "address_in_use",
        Code::FailedPrecondition => "deleting",
        _ => "error",
    }
}

/// The core's view of an object.
fn view(name: &str, o: &ExternalWorkload) -> WorkloadObject {
    let status = o.status.clone().unwrap_or_default();
    let status_ips = [status.ip.as_deref(), status.ipv6.as_deref()]
        .into_iter()
        .flatten()
        // A status someone else mangled is ignored, not fatal: it only names entries to withdraw.
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    WorkloadObject {
        name: name.to_string(),
        labels: o.metadata.labels.clone().unwrap_or_default(),
        deleting: o.metadata.deletion_timestamp.is_some(),
        status_ips,
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
        Refusal::Deleting(_) => Status::failed_precondition(msg),
        Refusal::AddressInUse { .. } => Status::already_exists(msg),
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The status after a successful registration: identity, addresses, and `Ready=True` (its transition time kept
/// when it was already true, as Kubernetes conditions do).
pub fn ready_status(
    previous: &ExternalWorkloadStatus,
    req: &core::Request,
    id: u32,
    generation: Option<i64>,
    now: &str,
) -> ExternalWorkloadStatus {
    let was_ready = previous.conditions.iter().find(|c| c.type_ == CONDITION_READY).filter(|c| c.status == "True");
    let mut message = format!("registered with identity {id} at {}", req.ipv4);
    if let Some(v6) = req.ipv6 {
        message.push_str(&format!(" and {v6}"));
    }
    let ready = WorkloadCondition {
        type_: CONDITION_READY.into(),
        status: "True".into(),
        last_transition_time: was_ready.map_or_else(|| now.to_string(), |c| c.last_transition_time.clone()),
        reason: "Registered".into(),
        message,
        observed_generation: generation,
    };
    let mut conditions: Vec<WorkloadCondition> =
        previous.conditions.iter().filter(|c| c.type_ != CONDITION_READY).cloned().collect();
    conditions.push(ready);
    ExternalWorkloadStatus {
        id: Some(id),
        ip: Some(req.ipv4.to_string()),
        ipv6: req.ipv6.map(|v| v.to_string()),
        conditions,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_status_keeps_the_transition_time_while_ready() {
        let req = core::parse_request("vm", "10.0.0.1", "fd00::1").expect("valid");
        let first = ready_status(&ExternalWorkloadStatus::default(), &req, 65540, Some(1), "2026-01-01T00:00:00Z");
        assert_eq!(
            (first.id, first.ip.as_deref(), first.ipv6.as_deref()),
            (Some(65540), Some("10.0.0.1"), Some("fd00::1"))
        );
        assert_eq!(first.conditions.len(), 1);
        assert_eq!(first.conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        let req2 = core::parse_request("vm", "10.0.0.2", "").expect("valid");
        let second = ready_status(&first, &req2, 65540, Some(2), "2026-01-02T00:00:00Z");
        assert_eq!(second.conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!((second.ip.as_deref(), second.ipv6.as_deref()), (Some("10.0.0.2"), None));
        assert!(second.conditions[0].message.contains("10.0.0.2"));
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        assert_eq!(refusal_status(Refusal::UnknownWorkload("x".into())).code(), Code::NotFound);
        assert_eq!(refusal_status(Refusal::NotExternalWorkload("root".into())).code(), Code::PermissionDenied);
        assert_eq!(refusal_status(Refusal::NoClientCertificate).code(), Code::Unauthenticated);
        assert_eq!(refusal_status(Refusal::Invalid("x".into())).code(), Code::InvalidArgument);
        assert_eq!(refusal_status(Refusal::Deleting("x".into())).code(), Code::FailedPrecondition);
        let in_use = Refusal::AddressInUse { ip: "10.0.0.1".parse().expect("ip"), owner: "a".into() };
        assert_eq!(refusal_status(in_use).code(), Code::AlreadyExists);
    }
}

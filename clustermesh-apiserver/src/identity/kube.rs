//! Kube adapter for the identity allocator: `CausewayIdentity` objects are the durable record of every ID.
//!
//! An ID is written to the kube API *before* `acquire` returns it, so no identity is ever exported to etcd or
//! used in an ipcache entry without a persisted record. Allocation holds one async lock across the create
//! call; new label sets are rare, so this costs little and keeps "persist before use" simple.

use std::sync::Arc;
use std::time::Duration;

use causeway_crds::{CausewayIdentity, CausewayIdentitySpec};
use causeway_store::{ClusterInfo, LabelSet};
use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::allocator::{AllocError, IdentityAllocator};

/// How many existing objects with other labels one `acquire` will step over before giving up.
const MAX_COLLISIONS: usize = 64;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cluster {cluster}: {source}")]
    Alloc {
        cluster: String,
        #[source]
        source: AllocError,
    },
    #[error(
        "identity labels {labels:?} name cluster {found:?}, but this is cluster {cluster:?}: every identity must \
         carry the local cluster label (io.cilium.k8s.policy.cluster={cluster})"
    )]
    ForeignLabels { cluster: String, found: String, labels: String },
    #[error(
        "cluster {cluster}: could not persist identity {id} for labels {labels:?} as CausewayIdentity: {source}; \
         check that the causewayidentities CRD is installed and the apiserver may create them"
    )]
    Persist {
        cluster: String,
        id: u32,
        labels: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cluster {cluster}: could not list CausewayIdentity objects to restore identities: {source}; check that \
         the CRD is installed and the apiserver may list causewayidentities"
    )]
    List {
        cluster: String,
        #[source]
        source: kube::Error,
    },
    #[error("cluster {cluster}: could not delete garbage identity CausewayIdentity/{id}: {source}; it is retried on the next GC pass")]
    Delete {
        cluster: String,
        id: u32,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cluster {cluster}: identity allocation for labels {labels:?} hit {attempts} CausewayIdentity objects \
         with other labels; another writer is allocating in this cluster's range (run one apiserver leader)"
    )]
    Collisions { cluster: String, labels: String, attempts: usize },
}

/// Outcome of one [`KubeIdentityStore::gc_once`] pass.
#[derive(Debug, Default)]
pub struct GcReport {
    pub deleted: Vec<u32>,
    pub failed: Vec<IdentityError>,
}

type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Identity allocation backed by `CausewayIdentity` objects. Cheap to share behind an `Arc`.
pub struct KubeIdentityStore {
    api: Api<CausewayIdentity>,
    cluster: ClusterInfo,
    core: Mutex<IdentityAllocator>,
    clock: Clock,
}

impl KubeIdentityStore {
    pub fn new(client: Client, cluster: ClusterInfo, grace: Duration) -> Self {
        let core = IdentityAllocator::new(cluster.identity_range(), grace);
        KubeIdentityStore { api: Api::all(client), cluster, core: Mutex::new(core), clock: Arc::new(Utc::now) }
    }

    /// Replaces the wall clock, for tests.
    pub fn with_clock(mut self, clock: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    fn cluster_name(&self) -> String {
        self.cluster.name.to_string()
    }

    /// Restores the allocator from every `CausewayIdentity` this cluster owns. Call once, before the first
    /// `acquire`. Returns the restored identities (to re-export them), sorted by ID.
    pub async fn start(&self) -> Result<Vec<(u32, LabelSet)>, IdentityError> {
        let cluster = self.cluster_name();
        let mut persisted = Vec::new();
        let mut lp = ListParams::default().limit(500);
        loop {
            let list =
                self.api.list(&lp).await.map_err(|source| IdentityError::List { cluster: cluster.clone(), source })?;
            for obj in &list.items {
                if let Some(entry) = self.parse_object(obj) {
                    persisted.push(entry);
                }
            }
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => lp = lp.continue_token(&token),
                None => break,
            }
        }
        let now = (self.clock)();
        let mut core = self.core.lock().await;
        let report = core.restore(persisted, now);
        for id in &report.out_of_range {
            warn!(cluster = %cluster, identity = id, "CausewayIdentity is outside this cluster's identity range; ignoring it");
        }
        for id in &report.duplicates {
            warn!(cluster = %cluster, identity = id, "CausewayIdentity duplicates the labels of a lower ID; it will be garbage-collected");
        }
        info!(cluster = %cluster, restored = report.restored.len(), "restored identities");
        Ok(core.live().map(|(id, l)| (id, l.clone())).collect())
    }

    /// `(id, labels)` of an object this cluster owns; logs and skips anything else.
    fn parse_object(&self, obj: &CausewayIdentity) -> Option<(u32, LabelSet)> {
        let name = obj.metadata.name.as_deref().unwrap_or("");
        if obj.spec.cluster != self.cluster.name.as_str() {
            debug!(cluster = %self.cluster.name, object = name, owner = %obj.spec.cluster, "skipping another cluster's identity");
            return None;
        }
        let Ok(id) = name.parse::<u32>() else {
            warn!(cluster = %self.cluster.name, object = name, "CausewayIdentity name is not a numeric identity; ignoring it");
            return None;
        };
        match LabelSet::parse(&obj.spec.labels) {
            Ok(labels) => Some((id, labels)),
            Err(e) => {
                warn!(cluster = %self.cluster.name, identity = id, error = %e, "CausewayIdentity has unparsable labels; ignoring it");
                None
            }
        }
    }

    fn object(&self, id: u32, labels: &LabelSet) -> CausewayIdentity {
        let mut obj = CausewayIdentity::new(
            &id.to_string(),
            CausewayIdentitySpec { labels: labels.to_string(), cluster: self.cluster_name() },
        );
        obj.metadata.labels = Some([("causeway.io/cluster".to_string(), self.cluster_name())].into());
        obj
    }

    /// Takes a reference on the identity of `labels`, allocating and persisting a new one if needed. The
    /// returned ID is persisted and safe to export.
    pub async fn acquire(&self, labels: &LabelSet) -> Result<u32, IdentityError> {
        let cluster = self.cluster_name();
        match labels.cluster() {
            Some(c) if c == cluster => {}
            found => {
                return Err(IdentityError::ForeignLabels {
                    cluster,
                    found: found.unwrap_or("").to_string(),
                    labels: labels.to_string(),
                })
            }
        }
        let mut core = self.core.lock().await;
        for _ in 0..MAX_COLLISIONS {
            let now = (self.clock)();
            let alloc = core
                .acquire(labels, now)
                .map_err(|source| IdentityError::Alloc { cluster: cluster.clone(), source })?;
            if !alloc.newly_created {
                return Ok(alloc.id);
            }
            let id = alloc.id;
            match self.api.create(&PostParams::default(), &self.object(id, labels)).await {
                Ok(_) => {
                    info!(cluster = %cluster, identity = id, labels = %labels, "allocated identity");
                    return Ok(id);
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    let occupant = match self.api.get_opt(&id.to_string()).await {
                        Ok(Some(obj)) => Some(self.parse_object(&obj)),
                        Ok(None) => None,
                        Err(source) => {
                            core.abort(labels, id);
                            return Err(IdentityError::Persist { cluster, id, labels: labels.to_string(), source });
                        }
                    };
                    match occupant {
                        Some(Some((_, other))) if &other == labels => {
                            info!(cluster = %cluster, identity = id, labels = %labels, "adopted existing identity");
                            return Ok(id);
                        }
                        Some(Some((_, other))) => {
                            warn!(cluster = %cluster, identity = id, occupant = %other, "identity already persisted with other labels; picking the next free ID");
                            core.abort(labels, id);
                            core.insert_existing(id, other, now);
                        }
                        Some(None) => {
                            // In our range but not a valid identity of ours: garbage; never reuse the number until
                            // GC has deleted it.
                            warn!(cluster = %cluster, identity = id, "CausewayIdentity in this cluster's range is not a valid identity of this cluster; it will be garbage-collected");
                            core.abort(labels, id);
                            core.block(id);
                        }
                        // Deleted in between: try again.
                        None => core.abort(labels, id),
                    }
                }
                Err(source) => {
                    core.abort(labels, id);
                    return Err(IdentityError::Persist { cluster, id, labels: labels.to_string(), source });
                }
            }
        }
        Err(IdentityError::Collisions { cluster, labels: labels.to_string(), attempts: MAX_COLLISIONS })
    }

    /// Drops one reference on the identity of `labels`. When the last user goes away the grace period starts, and
    /// `status.lastUsed` is recorded on the object (best effort).
    pub async fn release(&self, labels: &LabelSet) -> Result<(), IdentityError> {
        let now = (self.clock)();
        let released = {
            let mut core = self.core.lock().await;
            core.release(labels, now).map_err(|source| IdentityError::Alloc { cluster: self.cluster_name(), source })?
        };
        if released.remaining == 0 {
            debug!(cluster = %self.cluster.name, identity = released.id, "identity idle; grace period started");
            let patch = serde_json::json!({"status": {"lastUsed": now.to_rfc3339_opts(SecondsFormat::Secs, true)}});
            if let Err(e) =
                self.api.patch_status(&released.id.to_string(), &PatchParams::default(), &Patch::Merge(&patch)).await
            {
                warn!(cluster = %self.cluster.name, identity = released.id, error = %e, "could not record lastUsed on CausewayIdentity");
            }
        }
        Ok(())
    }

    /// Deletes identities idle for longer than the grace period. `deleted` IDs have no object any more (the
    /// caller removes them from etcd); a `failed` ID stays blocked and is retried on the next pass.
    pub async fn gc_once(&self) -> GcReport {
        let now = (self.clock)();
        let garbage = self.core.lock().await.collect_garbage(now);
        let mut report = GcReport::default();
        for id in garbage {
            match self.api.delete(&id.to_string(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => {
                    warn!(cluster = %self.cluster.name, identity = id, error = %source, "could not delete garbage identity");
                    report.failed.push(IdentityError::Delete { cluster: self.cluster_name(), id, source });
                    continue;
                }
            }
            self.core.lock().await.confirm_deleted(id);
            info!(cluster = %self.cluster.name, identity = id, "garbage-collected identity");
            report.deleted.push(id);
        }
        report
    }

    /// The identity currently held by `labels`, if any.
    pub async fn get(&self, labels: &LabelSet) -> Option<u32> {
        self.core.lock().await.get(labels)
    }

    /// Every live identity (in use or within its grace period), sorted by ID.
    pub async fn snapshot(&self) -> Vec<(u32, LabelSet)> {
        self.core.lock().await.live().map(|(id, l)| (id, l.clone())).collect()
    }
}

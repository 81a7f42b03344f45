//! Where the export goes: the store writer and the identity allocator, as small traits so the adapter can be
//! driven in tests without etcd or a kube API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Mutex;

use causeway_store::{IdentityRange, Kind, LabelSet, StoreKey};
use thiserror::Error;

/// The store writer. Implementations may coalesce and retry; `flush` returns once everything handed over before
/// it is durable, which is what makes a "synced" canary truthful.
pub trait ExportSink: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    fn upsert(&self, key: &StoreKey, value: String) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn delete(&self, key: &StoreKey) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Writes the kind's canary: its initial export is complete.
    fn mark_synced(&self, kind: Kind) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The store lost its data (etcd restarted empty): write everything handed over so far again, and forget the
    /// canaries until [`ExportSink::mark_synced`] is called again.
    fn resync(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The identity allocator: one numeric identity per distinct label set, within this cluster's range.
pub trait IdentityResolver: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    fn acquire(&self, labels: &LabelSet) -> impl Future<Output = Result<u32, Self::Error>> + Send;
    fn release(&self, labels: &LabelSet) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// An in-memory sink: the store contents as a map, plus the kinds marked synced. For tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    pub entries: BTreeMap<String, String>,
    pub synced: BTreeSet<Kind>,
    pub writes: usize,
    pub resyncs: usize,
}

impl MemorySink {
    pub fn snapshot(&self) -> MemoryState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut MemoryState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ExportSink for MemorySink {
    type Error = Infallible;

    async fn upsert(&self, key: &StoreKey, value: String) -> Result<(), Infallible> {
        self.with(|s| {
            s.writes += 1;
            s.entries.insert(key.to_string(), value);
        });
        Ok(())
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), Infallible> {
        self.with(|s| {
            s.writes += 1;
            s.entries.remove(&key.to_string());
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), Infallible> {
        Ok(())
    }

    async fn mark_synced(&self, kind: Kind) -> Result<(), Infallible> {
        self.with(|s| s.synced.insert(kind));
        Ok(())
    }

    async fn resync(&self) -> Result<(), Infallible> {
        self.with(|s| {
            s.resyncs += 1;
            s.synced.clear();
        });
        Ok(())
    }
}

#[derive(Debug, Error)]
#[error("identity range {first}..={last} is exhausted: release unused identities or raise the range")]
pub struct RangeExhausted {
    pub first: u32,
    pub last: u32,
}

/// An in-process allocator handing out IDs in order from a range, reference-counted per label set. It persists
/// nothing, so IDs change across restarts: fine for tests, not for a real cluster (use the CRD-backed store).
#[derive(Debug)]
pub struct LocalAllocator {
    range: IdentityRange,
    state: Mutex<LocalState>,
}

#[derive(Debug, Default)]
struct LocalState {
    next: u32,
    ids: HashMap<LabelSet, (u32, usize)>,
}

impl LocalAllocator {
    pub fn new(range: IdentityRange) -> Self {
        LocalAllocator { range, state: Mutex::new(LocalState { next: range.first_allocatable(), ids: HashMap::new() }) }
    }
}

impl IdentityResolver for LocalAllocator {
    type Error = RangeExhausted;

    async fn acquire(&self, labels: &LabelSet) -> Result<u32, RangeExhausted> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, refs)) = s.ids.get_mut(labels) {
            *refs += 1;
            return Ok(*id);
        }
        if s.next > self.range.last {
            return Err(RangeExhausted { first: self.range.first_allocatable(), last: self.range.last });
        }
        let id = s.next;
        s.next += 1;
        s.ids.insert(labels.clone(), (id, 1));
        Ok(id)
    }

    async fn release(&self, labels: &LabelSet) -> Result<(), RangeExhausted> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, refs)) = s.ids.get_mut(labels) {
            *refs = refs.saturating_sub(1);
        }
        Ok(())
    }
}

/// The etcd sink: one [`causeway_kvstore::SyncStore`] per exported kind, each owning its prefix (its canary is
/// written by the store itself once its writes and stale-key cleanup are done).
pub struct EtcdSink {
    stores: BTreeMap<Kind, causeway_kvstore::SyncStore>,
}

#[derive(Debug, Error)]
pub enum EtcdSinkError {
    #[error("store key {0} is not one this exporter writes (no sync store for its kind)")]
    NoStore(String),
    #[error("cannot queue write of {key}: {source}")]
    Queue {
        key: String,
        #[source]
        source: causeway_kvstore::KvError,
    },
}

impl EtcdSink {
    /// Starts a sync store for each of `kinds` under the cluster's prefixes.
    pub fn start(
        client: causeway_kvstore::Client,
        leases: std::sync::Arc<causeway_kvstore::LeasePool>,
        cluster: &str,
        kinds: &[Kind],
    ) -> Self {
        let stores = kinds
            .iter()
            .map(|kind| {
                let config =
                    causeway_kvstore::SyncStoreConfig::new(cluster, kind.segment(), kind.watch_prefix(cluster));
                (*kind, causeway_kvstore::SyncStore::start(client.clone(), leases.clone(), config))
            })
            .collect();
        EtcdSink { stores }
    }

    pub fn store(&self, kind: Kind) -> Option<&causeway_kvstore::SyncStore> {
        self.stores.get(&kind)
    }

    fn store_for(&self, key: &StoreKey) -> Result<&causeway_kvstore::SyncStore, EtcdSinkError> {
        key.kind().and_then(|k| self.stores.get(&k)).ok_or_else(|| EtcdSinkError::NoStore(key.to_string()))
    }
}

impl ExportSink for EtcdSink {
    type Error = EtcdSinkError;

    async fn upsert(&self, key: &StoreKey, value: String) -> Result<(), EtcdSinkError> {
        let k = key.to_string();
        self.store_for(key)?.upsert(k.clone(), value).map_err(|source| EtcdSinkError::Queue { key: k, source })
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), EtcdSinkError> {
        let k = key.to_string();
        self.store_for(key)?.delete(k.clone()).map_err(|source| EtcdSinkError::Queue { key: k, source })
    }

    async fn flush(&self) -> Result<(), EtcdSinkError> {
        for store in self.stores.values() {
            store.flushed().await;
        }
        Ok(())
    }

    async fn mark_synced(&self, kind: Kind) -> Result<(), EtcdSinkError> {
        let store = self.stores.get(&kind).ok_or_else(|| EtcdSinkError::NoStore(kind.canary_key("")))?;
        store.mark_synced();
        store.wait_synced().await;
        Ok(())
    }

    async fn resync(&self) -> Result<(), EtcdSinkError> {
        for store in self.stores.values() {
            store.resync_all();
        }
        Ok(())
    }
}

impl IdentityResolver for crate::identity::KubeIdentityStore {
    type Error = crate::identity::IdentityError;

    async fn acquire(&self, labels: &LabelSet) -> Result<u32, Self::Error> {
        crate::identity::KubeIdentityStore::acquire(self, labels).await
    }

    async fn release(&self, labels: &LabelSet) -> Result<(), Self::Error> {
        crate::identity::KubeIdentityStore::release(self, labels).await
    }
}

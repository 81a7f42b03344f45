//! One owner per node record. `cilium/state/nodes/v1/<cluster>/<name>` has two writers in this process: the export
//! loop (the cluster's Nodes) and the workloads service (external workloads with a WireGuard key, published like
//! nodes). Registration refuses a host named like a Node, but a Node can also appear *after* a host of its name
//! joined (a VM turned into a cluster node, a new node reusing a name). Without arbitration the two would overwrite
//! each other's record, and withdrawing the host would delete the Node's.
//!
//! [`NodeOwners`] wraps the store writer and hands out two views of it: every write goes straight through, except
//! node records, which are kept per writer and resolved here: **a cluster Node always wins its name**. When a Node
//! takes a name a host holds, the host is evicted (its record is replaced by the Node's and forgotten here, so it
//! does not come back when the Node goes) and its name is sent to the workloads service, which takes the host out of
//! the mesh datapath and says why in the object's status. A host's write to a name a Node holds is refused with
//! [`NodeOwnersError::NameTaken`]. The decision is [`resolve`], without I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex as StdMutex};

use causeway_store::{Kind, StoreKey};
use thiserror::Error;
use tokio::sync::{mpsc, Mutex};

use crate::sink::ExportSink;

/// Who writes through a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// The export loop: the cluster's Nodes.
    Cluster,
    /// The workloads service: external workloads.
    Host,
}

/// The node record each writer wants under one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub cluster: Option<String>,
    pub host: Option<String>,
}

impl Slot {
    fn effective(&self) -> Option<&String> {
        self.cluster.as_ref().or(self.host.as_ref())
    }
}

/// What a write does to the store, and whether a host lost its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// `Some(Some(v))`: upsert v; `Some(None)`: delete; `None`: the stored record stays as it is.
    pub store: Option<Option<String>>,
    /// A host held the name and a cluster Node took it.
    pub evicted_host: bool,
    /// A host's write refused: a cluster Node holds the name.
    pub refused: bool,
}

/// Applies one writer's upsert (`Some`) or delete (`None`) to a name's slot.
pub fn resolve(slot: &mut Slot, writer: Writer, value: Option<String>) -> Resolution {
    let before = slot.effective().cloned();
    let mut evicted_host = false;
    match writer {
        Writer::Cluster => {
            if value.is_some() && slot.cluster.is_none() && slot.host.is_some() {
                slot.host = None;
                evicted_host = true;
            }
            slot.cluster = value;
        }
        Writer::Host => {
            if slot.cluster.is_some() {
                return Resolution { store: None, evicted_host: false, refused: value.is_some() };
            }
            slot.host = value;
        }
    }
    let after = slot.effective().cloned();
    let store = (before != after).then_some(after);
    Resolution { store, evicted_host, refused: false }
}

#[derive(Debug, Error)]
pub enum NodeOwnersError<E: std::error::Error + 'static> {
    #[error("node name {0:?} belongs to a cluster Node")]
    NameTaken(String),
    #[error(transparent)]
    Store(E),
}

/// The names cluster Nodes hold (in the store), readable without waiting: registration checks it.
#[derive(Debug, Clone, Default)]
pub struct ClusterNodeNames(Arc<StdMutex<BTreeSet<String>>>);

impl ClusterNodeNames {
    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(name)
    }

    fn set(&self, name: &str, held: bool) {
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            names.insert(name.to_string());
        } else {
            names.remove(name);
        }
    }
}

/// The store writer with node records arbitrated between the export loop and the workloads service.
pub struct NodeOwners<S> {
    inner: Arc<S>,
    cluster: String,
    slots: Mutex<BTreeMap<String, Slot>>,
    cluster_names: ClusterNodeNames,
    evictions: mpsc::UnboundedSender<String>,
}

/// One writer's view: an [`ExportSink`] whose node-record writes are arbitrated.
pub struct OwnedSink<S> {
    owners: Arc<NodeOwners<S>>,
    writer: Writer,
}

impl<S: ExportSink> NodeOwners<S> {
    /// Wraps `inner` for `cluster`'s node records; the receiver gets the names of evicted hosts.
    pub fn new(inner: Arc<S>, cluster: &str) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (evictions, rx) = mpsc::unbounded_channel();
        let owners = NodeOwners {
            inner,
            cluster: cluster.to_string(),
            slots: Mutex::new(BTreeMap::new()),
            cluster_names: ClusterNodeNames::default(),
            evictions,
        };
        (Arc::new(owners), rx)
    }

    pub fn view(self: &Arc<Self>, writer: Writer) -> Arc<OwnedSink<S>> {
        Arc::new(OwnedSink { owners: self.clone(), writer })
    }

    /// Whether a cluster Node holds `name`.
    pub fn is_cluster_node(&self, name: &str) -> bool {
        self.cluster_names.contains(name)
    }

    /// A handle on the names cluster Nodes hold.
    pub fn cluster_node_names(&self) -> ClusterNodeNames {
        self.cluster_names.clone()
    }

    async fn write(
        &self,
        writer: Writer,
        key: &StoreKey,
        value: Option<String>,
    ) -> Result<(), NodeOwnersError<S::Error>> {
        let name = match key {
            StoreKey::Node { cluster, name } if *cluster == self.cluster => name.clone(),
            _ => {
                return match value {
                    Some(v) => self.inner.upsert(key, v).await,
                    None => self.inner.delete(key).await,
                }
                .map_err(NodeOwnersError::Store)
            }
        };
        // Held across the store write, so two writers' writes of one name reach the store in decision order.
        let mut slots = self.slots.lock().await;
        let slot = slots.entry(name.clone()).or_default();
        let r = resolve(slot, writer, value);
        self.cluster_names.set(&name, slot.cluster.is_some());
        if *slot == Slot::default() {
            slots.remove(&name);
        }
        if r.refused {
            return Err(NodeOwnersError::NameTaken(name));
        }
        if r.evicted_host {
            let _ = self.evictions.send(name.clone());
        }
        match r.store {
            Some(Some(v)) => self.inner.upsert(key, v).await.map_err(NodeOwnersError::Store),
            Some(None) => self.inner.delete(key).await.map_err(NodeOwnersError::Store),
            None => Ok(()),
        }
    }
}

impl<S: ExportSink> OwnedSink<S> {
    pub fn owners(&self) -> &Arc<NodeOwners<S>> {
        &self.owners
    }
}

impl<S: ExportSink + 'static> ExportSink for OwnedSink<S> {
    type Error = NodeOwnersError<S::Error>;

    async fn upsert(&self, key: &StoreKey, value: String) -> Result<(), Self::Error> {
        self.owners.write(self.writer, key, Some(value)).await
    }

    async fn delete(&self, key: &StoreKey) -> Result<(), Self::Error> {
        self.owners.write(self.writer, key, None).await
    }

    async fn flush(&self) -> Result<(), Self::Error> {
        self.owners.inner.flush().await.map_err(NodeOwnersError::Store)
    }

    async fn mark_synced(&self, kind: Kind) -> Result<(), Self::Error> {
        self.owners.inner.mark_synced(kind).await.map_err(NodeOwnersError::Store)
    }

    async fn resync(&self) -> Result<(), Self::Error> {
        self.owners.inner.resync().await.map_err(NodeOwnersError::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::MemorySink;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn a_cluster_node_evicts_a_host_and_keeps_its_name() {
        let mut slot = Slot::default();
        let r = resolve(&mut slot, Writer::Host, s("vm"));
        assert_eq!((r.store, r.evicted_host), (Some(s("vm")), false));
        let r = resolve(&mut slot, Writer::Cluster, s("node"));
        assert_eq!((r.store, r.evicted_host), (Some(s("node")), true), "the Node's record replaces the host's");
        // The evicted host's withdrawal does not touch the Node's record, nor may it write again.
        let r = resolve(&mut slot, Writer::Host, None);
        assert_eq!((r.store, r.refused), (None, false));
        let r = resolve(&mut slot, Writer::Host, s("vm2"));
        assert_eq!((r.store, r.refused), (None, true));
        // The Node goes: its record goes, and the evicted host does not come back by itself.
        let r = resolve(&mut slot, Writer::Cluster, None);
        assert_eq!(r.store, Some(None));
        assert_eq!(slot, Slot::default());
    }

    #[test]
    fn each_writer_alone_behaves_like_the_plain_store() {
        for w in [Writer::Cluster, Writer::Host] {
            let mut slot = Slot::default();
            assert_eq!(resolve(&mut slot, w, s("a")).store, Some(s("a")));
            assert_eq!(resolve(&mut slot, w, s("a")).store, None, "unchanged: no write");
            assert_eq!(resolve(&mut slot, w, s("b")).store, Some(s("b")));
            assert_eq!(resolve(&mut slot, w, None).store, Some(None));
            assert_eq!(resolve(&mut slot, w, None).store, None, "deleting nothing writes nothing");
        }
    }

    #[tokio::test]
    async fn through_the_views_the_store_holds_the_winner_and_the_eviction_is_reported() {
        let inner = Arc::new(MemorySink::default());
        let (owners, mut evicted) = NodeOwners::new(inner.clone(), "east");
        let (cluster, host) = (owners.view(Writer::Cluster), owners.view(Writer::Host));
        let key = StoreKey::Node { cluster: "east".into(), name: "db-1".into() };
        let key_text = key.to_string();
        host.upsert(&key, "host".into()).await.expect("host writes a free name");
        assert!(!owners.is_cluster_node("db-1"));
        cluster.upsert(&key, "node".into()).await.expect("cluster write");
        assert_eq!(inner.snapshot().entries.get(&key_text).map(String::as_str), Some("node"));
        assert_eq!(evicted.try_recv().ok().as_deref(), Some("db-1"));
        assert!(owners.is_cluster_node("db-1"));
        let refused = host.upsert(&key, "host".into()).await;
        assert!(matches!(refused, Err(NodeOwnersError::NameTaken(ref n)) if n == "db-1"), "{refused:?}");
        host.delete(&key).await.expect("an evicted host's delete is a no-op");
        assert_eq!(inner.snapshot().entries.get(&key_text).map(String::as_str), Some("node"));
        // Other keys and other clusters' node keys pass straight through.
        let ip = StoreKey::Ip { ip: "10.0.0.1".parse().expect("ip") };
        host.upsert(&ip, "x".into()).await.expect("ip");
        assert!(inner.snapshot().entries.contains_key(&ip.to_string()));
        cluster.delete(&key).await.expect("node gone");
        assert!(!inner.snapshot().entries.contains_key(&key_text));
        assert!(!owners.is_cluster_node("db-1"));
    }
}

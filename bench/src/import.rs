//! The reader pipeline, wired the way identity-sync's remote task and app loop wire it: per remote, read and
//! validate the cluster config, check the canaries, then one `WatchStore` per kind whose task decodes every value
//! with `RemoteContext::decode` and sends it on one channel; a single loop applies the events to the merged view
//! core, draining up to 1024 queued events per turn and taking the deltas after each turn.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{bail, Context};
use causeway_kvstore::{WatchEvent, WatchStore, WatchStoreConfig};
use causeway_store::validate::{validate_cluster_config, RemoteEntry};
use causeway_store::{ClusterId, ClusterName, Kind, Rejected, RemoteContext, StoreKey};
use etcd_client::{Client, GetOptions};
use identity_sync::core::{Delta, MergedView};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::data;

/// The kinds identity-sync imports.
pub const KINDS: [Kind; 4] = [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities];

/// What a kind's reader task reports.
#[derive(Debug)]
pub enum Ev {
    Upsert(RemoteEntry),
    Delete(String),
    Rejected(String, Rejected),
    ListDone,
}

pub type Tx = mpsc::Sender<(Arc<str>, Kind, Ev)>;
pub type Rx = mpsc::Receiver<(Arc<str>, Kind, Ev)>;

/// Channel capacity between the reader tasks and the core loop.
pub const CHANNEL: usize = 4096;

/// Reads `remote`'s `.has-cluster-config` marker and cluster config, validates it against the local cluster, and
/// checks that the canaries of `kinds` exist.
pub async fn open_session(client: &mut Client, remote: &str, kinds: &[Kind]) -> anyhow::Result<RemoteContext> {
    let marker = client.get(StoreKey::HasClusterConfig.to_string(), None).await.context("read marker")?;
    if marker.kvs().is_empty() {
        bail!("remote {remote} has no {}", StoreKey::HasClusterConfig);
    }
    let key = StoreKey::ClusterConfig { cluster: remote.to_string() }.to_string();
    let resp = client.get(key.as_str(), None).await.context("read cluster config")?;
    let value = resp.kvs().first().map(|kv| kv.value().to_vec()).context("no cluster config")?;
    let name = ClusterName::new(remote)?;
    let local = ClusterId::new(data::LOCAL_ID, data::mode())?;
    let ctx = validate_cluster_config(&name, &value, local, data::mode(), std::iter::empty())?;
    let synced = format!("cilium/synced/{remote}/");
    let resp = client.get(synced.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await?;
    let present: HashSet<&[u8]> = resp.kvs().iter().map(|kv| kv.key()).collect();
    for k in kinds {
        if !present.contains(k.canary_key(remote).as_bytes()) {
            bail!("remote {remote} has no canary for {k}");
        }
    }
    Ok(ctx)
}

/// The reader tasks of one remote; dropping this stops them (and their WatchStores).
pub struct Readers(Vec<JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts one WatchStore per kind on `client` (one connection per remote), decoding in the kind's task.
pub fn spawn_readers(client: &Client, ctx: &RemoteContext, kinds: &[Kind], tx: &Tx) -> Readers {
    let name: Arc<str> = ctx.name.as_str().into();
    Readers(
        kinds
            .iter()
            .map(|&kind| {
                let (client, ctx, tx, name) = (client.clone(), ctx.clone(), tx.clone(), name.clone());
                tokio::spawn(async move {
                    let mut ws = WatchStore::start(client, WatchStoreConfig::new(kind.watch_prefix(ctx.name.as_str())));
                    // Like identity-sync's remote task: decode and forward, no per-key state (the view counts).
                    while let Some(ev) = ws.next().await {
                        let ev = match ev {
                            WatchEvent::Upsert { key, value, .. } => match ctx.decode(&key, &value) {
                                Ok(entry) => Ev::Upsert(entry),
                                Err(e) => Ev::Rejected(key, e),
                            },
                            WatchEvent::Delete { key } => Ev::Delete(key),
                            WatchEvent::ListDone => Ev::ListDone,
                            // identity-sync starts a new session; the benches never restart etcd.
                            WatchEvent::Reset => return,
                        };
                        if tx.send((name.clone(), kind, ev)).await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect(),
    )
}

/// Registers a validated remote with the core, the way identity-sync does at the start of a session.
pub fn register(core: &mut MergedView, ctx: &RemoteContext) -> anyhow::Result<()> {
    let name = ctx.name.as_str();
    core.remote_added(name)?;
    core.remote_connected(name)?;
    core.remote_validated(ctx.clone())?;
    core.canaries_ready(name)?;
    Ok(())
}

/// Counters of the core loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub events: u64,
    pub rejected: u64,
    pub deltas: u64,
}

/// Applies one event.
pub fn apply(core: &mut MergedView, name: &str, kind: Kind, ev: Ev, applied: &mut Applied) {
    applied.events += 1;
    let res = match ev {
        Ev::Upsert(entry) => core.entry_upsert(name, entry),
        Ev::Delete(key) => core.entry_delete(name, &key),
        Ev::Rejected(key, e) => {
            applied.rejected += 1;
            core.entry_rejected(name, &key, &e)
        }
        Ev::ListDone => core.list_done(name, kind),
    };
    if let Err(e) = res {
        eprintln!("event not applied: {e}");
    }
}

/// Applies events until every `(remote, kind)` in `want` has had its ListDone, taking (and dropping) the deltas
/// after each turn.
pub async fn run_until_listed(
    core: &mut MergedView,
    rx: &mut Rx,
    want: &HashSet<(Arc<str>, Kind)>,
) -> anyhow::Result<Applied> {
    run_until(core, rx, want, |_| {}).await
}

/// Like [`run_until_listed`], handing each turn's deltas to `on_deltas`.
pub async fn run_until(
    core: &mut MergedView,
    rx: &mut Rx,
    want: &HashSet<(Arc<str>, Kind)>,
    mut on_deltas: impl FnMut(Vec<Delta>),
) -> anyhow::Result<Applied> {
    let mut applied = Applied::default();
    let mut done: HashSet<(Arc<str>, Kind)> = HashSet::new();
    while !want.iter().all(|w| done.contains(w)) {
        let Some((name, kind, ev)) = rx.recv().await else { bail!("reader tasks stopped") };
        let mut turn = vec![(name, kind, ev)];
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(x) => turn.push(x),
                Err(_) => break,
            }
        }
        for (name, kind, ev) in turn {
            if matches!(ev, Ev::ListDone) {
                done.insert((name.clone(), kind));
            }
            apply(core, &name, kind, ev, &mut applied);
        }
        let deltas = core.take_deltas();
        applied.deltas += deltas.len() as u64;
        on_deltas(deltas);
    }
    Ok(applied)
}

//! The reader: list + watch of one prefix that survives disconnects and compaction.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Client, EventType, KvClient, WatchClient, WatchOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::error::is_compacted;
use crate::list::prefetch;

/// What a [`WatchStore`] emits.
///
/// # Consumer contract
///
/// Within one etcd history the stream alone keeps a consumer's copy exact: apply `Upsert`
/// and `Delete` as they come. `ListDone` follows every complete listing (the first one,
/// and any re-list after the watch's revision was compacted). At each `ListDone` the
/// consumer's copy equals etcd's content at the listing's revision: keys that disappeared
/// while the store was not watching are sent as `Delete` *before* that `ListDone`. So the
/// consumer needs no stale sweep of its own. (Equivalently: after a `ListDone`, any key not
/// upserted since the previous list began is gone, and the store has already said so.)
///
/// A re-list sends `Upsert` for every key again, unchanged ones included; compare
/// `mod_revision` to skip work. A disconnect that is followed by a successful resume
/// sends nothing special: events continue from the last revision seen, without a list.
///
/// When etcd's *history* changes under the store — a different etcd cluster id, or a
/// revision older than one the store already saw (etcd restored from a backup, or
/// restarted empty) — the store does not delete anything on its own: an empty etcd that
/// its writer has not filled again yet says nothing about which keys are really gone. It
/// sends `Reset` instead, forgets every key it had sent, and lists the new history from
/// scratch: `Upsert`s, then `ListDone`, with no `Delete` for keys of the old history.
/// The consumer decides when the old copy is obsolete: typically it keeps it until it
/// knows the writer is done (e.g. a synced canary), then drops, at a `ListDone`, whatever
/// was not upserted since the `Reset`; or it drops the store and starts over. Until then,
/// a `Delete` may still come for a key the consumer holds from the old history only if
/// that key was upserted again after the `Reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` was created or changed.
    Upsert {
        /// Full key.
        key: String,
        /// Raw value; validate before use.
        value: Vec<u8>,
        /// etcd revision of this version of the key.
        mod_revision: i64,
    },
    /// `key` was deleted (or expired with its lease).
    Delete {
        /// Full key.
        key: String,
    },
    /// A complete listing has been sent; see the contract above.
    ListDone,
    /// etcd's history changed (another etcd cluster id, or the revision went backwards).
    /// Keys sent before this are no longer tracked: no `Delete` will come for them unless
    /// they are upserted again. A fresh listing follows. See the contract above.
    Reset,
}

/// Configuration of a [`WatchStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchStoreConfig {
    /// Prefix to mirror, e.g. `cilium/state/identities/v1/`.
    pub prefix: String,
    /// Keys per page when listing.
    pub list_page_size: i64,
    /// First retry delay after an error; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Events buffered before the store waits for the consumer.
    pub channel_capacity: usize,
}

impl WatchStoreConfig {
    /// Defaults: pages of 2000, backoff 100 ms → 10 s, 1024 buffered events.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            list_page_size: crate::list::DEFAULT_PAGE_SIZE,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            channel_capacity: 1024,
        }
    }
}

/// Counters of a [`WatchStore`].
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Complete listings.
    pub lists: AtomicU64,
    /// Watches (re)established after a disconnect or error.
    pub reconnects: AtomicU64,
    /// Re-lists forced by compaction (same history).
    pub relists: AtomicU64,
    /// [`WatchEvent::Reset`]s sent: etcd's history changed (restored, or restarted empty).
    pub resets: AtomicU64,
    /// Failed etcd requests or broken streams.
    pub errors: AtomicU64,
    /// Keys skipped because they are not UTF-8.
    pub invalid_keys: AtomicU64,
}

/// Lists then watches a prefix in a background task and emits [`WatchEvent`]s.
///
/// Dropping the store stops the task (no task outlives it).
pub struct WatchStore {
    rx: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
    stats: Arc<WatchStats>,
}

impl std::fmt::Debug for WatchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStore").finish_non_exhaustive()
    }
}

impl WatchStore {
    /// Starts listing and watching `config.prefix`.
    pub fn start(client: Client, config: WatchStoreConfig) -> WatchStore {
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let stats = Arc::new(WatchStats::default());
        let span = tracing::info_span!("watch_store", prefix = %config.prefix);
        let watcher = Watcher {
            kv: client.kv_client().max_decoding_message_size(crate::list::MAX_LIST_MESSAGE),
            watch: client.watch_client(),
            backoff: Backoff::new(config.min_backoff, config.max_backoff),
            config,
            tx,
            stats: stats.clone(),
            known: HashMap::new(),
            last_rev: 0,
            seen_rev: 0,
            cluster_id: 0,
        };
        let task = tokio::spawn(tracing::Instrument::instrument(watcher.run(), span));
        WatchStore { rx, task, stats }
    }

    /// The next event; `None` only after the task stopped.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }

    /// Counters.
    pub fn stats(&self) -> &WatchStats {
        &self.stats
    }
}

impl futures::Stream for WatchStore {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for WatchStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a watch ended.
enum Ended {
    /// The consumer is gone.
    Closed,
    /// Must list again: the watch's revision was compacted (same history).
    Relist,
    /// etcd's history changed: tell the consumer, forget what it has, list afresh.
    Reset,
    /// Connection problem: resume from the last revision.
    Retry,
}

/// A key with the store's prefix cut off: what `known` holds per key. Short suffixes
/// (ipcache IPs, identity IDs, most node names) are stored inline, so the entry needs no
/// heap allocation; that and the dropped prefix are most of the map's per-key cost.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Suffix {
    Inline { len: u8, bytes: [u8; INLINE_SUFFIX] },
    Heap(Box<str>),
}

/// Longest suffix stored inline; keeps [`Suffix`] at 24 bytes, the size of a `String`.
const INLINE_SUFFIX: usize = 22;

const _: () = assert!(std::mem::size_of::<Suffix>() == 24);

impl Suffix {
    // One representation per string (inline iff short), so derived Eq and Hash are exact.
    fn new(s: &str) -> Self {
        if s.len() <= INLINE_SUFFIX {
            let mut bytes = [0; INLINE_SUFFIX];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Suffix::Inline { len: s.len() as u8, bytes }
        } else {
            Suffix::Heap(s.into())
        }
    }

    fn full_key(&self, prefix: &str) -> String {
        let rest: &[u8] = match self {
            Suffix::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Suffix::Heap(s) => s.as_bytes(),
        };
        // The bytes came from a &str, so this never replaces anything.
        let mut key = String::with_capacity(prefix.len() + rest.len());
        key.push_str(prefix);
        key.push_str(&String::from_utf8_lossy(rest));
        key
    }
}

struct Watcher {
    kv: KvClient,
    watch: WatchClient,
    config: WatchStoreConfig,
    backoff: Backoff,
    tx: mpsc::Sender<WatchEvent>,
    stats: Arc<WatchStats>,
    /// Keys the consumer currently has, each with whether the listing in progress found
    /// it (or the watch wrote it since).
    known: HashMap<Suffix, bool>,
    /// Last revision the consumer has seen everything up to; 0 = must list.
    last_rev: i64,
    /// Highest revision seen in the current history (kept across compaction re-lists, so a
    /// listing can tell that etcd went back in time); 0 = none yet.
    seen_rev: i64,
    /// Cluster id of the etcd the last listing came from; 0 = none yet.
    cluster_id: u64,
}

impl Watcher {
    async fn run(mut self) {
        loop {
            if self.last_rev == 0 {
                match self.list().await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(()) => {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            match self.watch().await {
                Ended::Closed => return,
                Ended::Relist => {
                    self.stats.relists.fetch_add(1, Ordering::Relaxed);
                    self.last_rev = 0;
                }
                Ended::Reset => {
                    if !self.reset().await {
                        return;
                    }
                }
                Ended::Retry => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }

    async fn send(&self, ev: WatchEvent) -> bool {
        self.tx.send(ev).await.is_ok()
    }

    /// etcd's history changed: sends `Reset` and forgets everything, so the next listing
    /// starts from scratch and deletes nothing the consumer holds. false: consumer gone.
    async fn reset(&mut self) -> bool {
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        self.known = HashMap::new();
        self.last_rev = 0;
        self.seen_rev = 0;
        self.cluster_id = 0;
        self.send(WatchEvent::Reset).await
    }

    /// Whether a header from etcd shows a different history than the one the consumer's
    /// copy came from. A zero field means "unknown" and never counts as different.
    fn other_history(&self, revision: i64, cluster_id: u64) -> bool {
        let went_back = revision > 0 && revision < self.seen_rev;
        let other_cluster = cluster_id != 0 && self.cluster_id != 0 && cluster_id != self.cluster_id;
        went_back || other_cluster
    }

    /// Lists the prefix and emits Upserts page by page as the pages arrive, then Deletes
    /// for keys that vanished, then ListDone. Ok(false): the consumer is gone.
    ///
    /// A listing that fails half-way leaves its Upserts sent (each was true at the
    /// listing's revision) and `known` updated with them, so the retry's Deletes cover them.
    async fn list(&mut self) -> Result<bool, ()> {
        // Every key starts unseen; the listing marks what it finds.
        for seen in self.known.values_mut() {
            *seen = false;
        }
        let (mut pages, _lister) = prefetch(self.kv.clone(), &self.config.prefix, self.config.list_page_size);
        let mut first = true;
        let (revision, cluster_id) = loop {
            let page = match pages.recv().await {
                Some(Ok(page)) => page,
                Some(Err(e)) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "listing failed; retrying");
                    return Err(());
                }
                None => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("lister stopped before the last page; retrying");
                    return Err(());
                }
            };
            if std::mem::take(&mut first) && self.other_history(page.revision, page.cluster_id) {
                // Noticed while listing (e.g. a re-list after compaction, or a retried
                // listing, that reached an etcd restarted in between).
                tracing::warn!(
                    revision = self.seen_rev,
                    etcd_revision = page.revision,
                    cluster_id = page.cluster_id,
                    "etcd has a different history; resetting"
                );
                if !self.reset().await {
                    return Ok(false);
                }
            }
            for kv in page.kvs {
                let mod_revision = kv.mod_revision();
                let (key, value) = kv.into_key_value();
                let Some(key) = self.utf8_key(key) else {
                    continue;
                };
                let Some(suffix) = self.suffix(&key) else {
                    continue;
                };
                self.known.insert(suffix, true);
                let ev = WatchEvent::Upsert { key, value, mod_revision };
                if !self.send(ev).await {
                    return Ok(false);
                }
            }
            if page.last {
                break (page.revision, page.cluster_id);
            }
        };
        let gone: Vec<Suffix> = self.known.iter().filter(|(_, seen)| !**seen).map(|(k, _)| k.clone()).collect();
        for suffix in gone {
            self.known.remove(&suffix);
            let key = suffix.full_key(&self.config.prefix);
            if !self.send(WatchEvent::Delete { key }).await {
                return Ok(false);
            }
        }
        if !self.send(WatchEvent::ListDone).await {
            return Ok(false);
        }
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        self.last_rev = revision.max(1);
        self.seen_rev = self.seen_rev.max(self.last_rev);
        if cluster_id != 0 {
            self.cluster_id = cluster_id;
        }
        tracing::info!(keys = self.known.len(), revision = self.last_rev, "listed prefix");
        Ok(true)
    }

    /// `key` without the prefix, for `known`. etcd only returns keys under the prefix; a
    /// key outside it is skipped like a non-UTF-8 one rather than mis-tracked.
    fn suffix(&self, key: &str) -> Option<Suffix> {
        match key.strip_prefix(self.config.prefix.as_str()) {
            Some(rest) => Some(Suffix::new(rest)),
            None => {
                self.stats.invalid_keys.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key, "skipping a key outside the prefix");
                None
            }
        }
    }

    fn utf8_key(&self, key: Vec<u8>) -> Option<String> {
        match String::from_utf8(key) {
            Ok(k) => Some(k),
            Err(_) => {
                self.stats.invalid_keys.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("skipping a non-UTF-8 key");
                None
            }
        }
    }

    async fn watch(&mut self) -> Ended {
        let opts = WatchOptions::new().with_prefix().with_start_revision(self.last_rev + 1).with_progress_notify();
        let mut stream = match self.watch.watch(self.config.prefix.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "cannot open watch; retrying");
                return if is_compacted(&e) { Ended::Relist } else { Ended::Retry };
            }
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    tracing::info!(revision = self.last_rev, "watch stream ended; resuming");
                    return Ended::Retry;
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(revision = self.last_rev, error = %e, "watch broken; resuming");
                    return if is_compacted(&e) { Ended::Relist } else { Ended::Retry };
                }
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    tracing::info!(
                        revision = self.last_rev,
                        compact_revision = resp.compact_revision(),
                        "watch revision compacted; listing again"
                    );
                    return Ended::Relist;
                }
                tracing::warn!(reason = resp.cancel_reason(), "watch cancelled by etcd; retrying");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Ended::Retry;
            }
            if resp.created() {
                self.backoff.reset();
                let (current, cluster_id) = resp.header().map(|h| (h.revision(), h.cluster_id())).unwrap_or_default();
                if self.other_history(current, cluster_id) {
                    // etcd lost our history (restored, or restarted empty): resuming
                    // would silently skip or misread revisions, and listing it would
                    // delete keys its writer has not written back yet.
                    tracing::warn!(
                        revision = self.last_rev,
                        etcd_revision = current,
                        cluster_id,
                        "etcd has a different history; resetting"
                    );
                    return Ended::Reset;
                }
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let mod_revision = kv.mod_revision();
                let Some(key) = self.utf8_key(kv.key().to_vec()) else {
                    self.last_rev = self.last_rev.max(mod_revision);
                    continue;
                };
                let Some(suffix) = self.suffix(&key) else {
                    self.last_rev = self.last_rev.max(mod_revision);
                    continue;
                };
                let ev = match event.event_type() {
                    EventType::Put => {
                        self.known.insert(suffix, true);
                        Some(WatchEvent::Upsert { key, value: kv.value().to_vec(), mod_revision })
                    }
                    EventType::Delete => self.known.remove(&suffix).map(|_| WatchEvent::Delete { key }),
                };
                if let Some(ev) = ev {
                    if !self.send(ev).await {
                        return Ended::Closed;
                    }
                }
                self.last_rev = self.last_rev.max(mod_revision);
                self.seen_rev = self.seen_rev.max(mod_revision);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_round_trips_short_and_long_keys() {
        let prefix = "cilium/state/ip/v1/";
        for rest in [
            "",
            "default/10.0.0.1",
            "a-rather-long-namespace/with-a-long-pod-name-x7f9c",
            "é/ü",
            "1234567890123456789012",
        ] {
            let s = Suffix::new(rest);
            assert_eq!(s.full_key(prefix), format!("{prefix}{rest}"));
            assert_eq!(matches!(s, Suffix::Inline { .. }), rest.len() <= INLINE_SUFFIX);
            assert!(s == Suffix::new(rest));
        }
        assert!(Suffix::new("a") != Suffix::new("a\0"));
    }
}

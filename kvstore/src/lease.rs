//! A pool of etcd leases kept alive in the background.
//!
//! Keys are spread over `count` leases by a stable hash of the key: etcd's put latency
//! grows with the number of keys attached to one lease (etcd issue 15993), and a lost
//! lease then only takes a fraction of the keys with it.
//!
//! When a lease is lost (it expired during a long disconnect, etcd came back empty, a
//! keepalive answers TTL 0) the pool grants a replacement and publishes the new ids on a
//! [`tokio::sync::watch`] channel ([`LeasePool::subscribe`]). Re-writing the keys is the
//! owner's job: [`crate::SyncStore`] does it for its keys.
//!
//! The pool also carries the writers' [`WriteGate`]. With [`LeasePool::guard_resets`], a
//! lost lease is first checked against the owner's marker key: a lost lease *and* a missing
//! marker mean etcd lost its data, and the gate is closed before the replacement lease is
//! granted, so no writer can put a key on it before the owner's reset sequence has run.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::error::is_lease_not_found;
use crate::{KvError, WriteGate};

/// How many leases and with which TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Number of leases keys are spread over (at least 1).
    pub count: usize,
    /// Lease TTL: how long a dead writer's keys outlive it.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    /// 4 leases of 15 minutes (Cilium's kvstore lease TTL): a restarting apiserver does
    /// not make peers drop everything, a dead one's keys go within the TTL.
    fn default() -> Self {
        Self { count: 4, ttl: Duration::from_secs(15 * 60) }
    }
}

/// Counters of a [`LeasePool`].
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Leases granted, including the initial ones.
    pub granted: std::sync::atomic::AtomicU64,
    /// Leases found lost and replaced.
    pub lost: std::sync::atomic::AtomicU64,
    /// Keepalive stream failures (reconnects).
    pub keepalive_errors: std::sync::atomic::AtomicU64,
}

/// A set of leases kept alive by background tasks. Dropping the pool stops the tasks
/// (the leases then expire after their TTL; call [`LeasePool::revoke_all`] to drop the
/// keys at once).
pub struct LeasePool {
    client: Client,
    ttl: Duration,
    ids: watch::Sender<Vec<i64>>,
    // Serialises replacements so a lease is replaced once even if the keepalive task and
    // a writer notice the loss together.
    replacing: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: LeaseStats,
    gate: WriteGate,
    /// See [`LeasePool::guard_resets`].
    marker: Mutex<Option<String>>,
}

impl std::fmt::Debug for LeasePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasePool").field("ttl", &self.ttl).field("ids", &*self.ids.borrow()).finish_non_exhaustive()
    }
}

impl LeasePool {
    /// Grants `config.count` leases and starts keeping them alive.
    pub async fn grant(client: Client, config: LeaseConfig) -> Result<Arc<LeasePool>, KvError> {
        if config.count == 0 {
            return Err(KvError::Config("lease count must be at least 1".into()));
        }
        if config.ttl < Duration::from_secs(1) {
            return Err(KvError::Config("lease TTL must be at least 1s".into()));
        }
        let pool = Arc::new(LeasePool {
            client,
            ttl: config.ttl,
            ids: watch::Sender::new(Vec::new()),
            replacing: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            stats: LeaseStats::default(),
            gate: WriteGate::new(),
            marker: Mutex::new(None),
        });
        let mut ids = Vec::with_capacity(config.count);
        for _ in 0..config.count {
            ids.push(pool.grant_one().await?);
        }
        tracing::info!(?ids, ttl = ?config.ttl, "granted etcd leases");
        pool.ids.send_replace(ids);
        let handles =
            (0..config.count).map(|index| tokio::spawn(keepalive_task(Arc::downgrade(&pool), index))).collect();
        *pool.tasks.lock().unwrap_or_else(|e| e.into_inner()) = handles;
        Ok(pool)
    }

    async fn grant_one(&self) -> Result<i64, KvError> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let resp = self
            .client
            .lease_client()
            .grant(ttl, None)
            .await
            .map_err(|e| KvError::request("lease grant", format!("ttl {ttl}s"), e))?;
        self.stats.granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(resp.id())
    }

    /// Number of leases.
    pub fn count(&self) -> usize {
        self.ids.borrow().len()
    }

    /// Lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Current lease ids, by index.
    pub fn lease_ids(&self) -> Vec<i64> {
        self.ids.borrow().clone()
    }

    /// Index of the lease `key` belongs to (stable across processes and restarts).
    pub fn index_for_key(&self, key: &[u8]) -> usize {
        index_for_key(key, self.count())
    }

    /// Current lease id for `key`.
    pub fn lease_for_key(&self, key: &[u8]) -> i64 {
        let ids = self.ids.borrow();
        ids[index_for_key(key, ids.len())]
    }

    /// Changes whenever a lease is replaced; the value is the current ids by index.
    pub fn subscribe(&self) -> watch::Receiver<Vec<i64>> {
        self.ids.subscribe()
    }

    /// Counters.
    pub fn stats(&self) -> &LeaseStats {
        &self.stats
    }

    /// The gate every writer on this pool passes before a lease-attached write.
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// From now on, a lost lease is checked against `marker` (a key the owner wrote without
    /// a lease and never deletes, e.g. its cluster config): if the marker is gone too, etcd
    /// lost its data, and the [`gate`](Self::gate) is closed before a replacement lease is
    /// granted. The owner opens it again after its reset sequence.
    pub fn guard_resets(&self, marker: impl Into<String>) {
        *self.marker.lock().unwrap_or_else(|e| e.into_inner()) = Some(marker.into());
    }

    /// Closes the gate if the reset marker is configured and gone. Errors (etcd down) are
    /// returned: the caller retries, and must not grant a lease meanwhile.
    async fn check_marker(&self, lost: i64) -> Result<(), KvError> {
        let Some(marker) = self.marker.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let generation = self.gate.generation();
        let resp = self
            .client
            .kv_client()
            .get(marker.as_str(), Some(etcd_client::GetOptions::new().with_count_only()))
            .await
            .map_err(|e| KvError::request("get", &marker, e))?;
        if resp.count() == 0 {
            self.gate.close_if_unchanged(
                generation,
                format!("etcd lease {lost:x} was lost and the marker key {marker:?} is gone: etcd lost its data"),
            );
        }
        Ok(())
    }

    /// Replaces lease `lost` at `index` with a new one, unless that already happened;
    /// returns the current id at `index`. Called by the keepalive tasks, and by writers
    /// whose put failed with "lease not found".
    pub async fn replace_lost(&self, index: usize, lost: i64) -> Result<i64, KvError> {
        let _guard = self.replacing.lock().await;
        let current = self.ids.borrow().get(index).copied();
        match current {
            Some(id) if id == lost => {}
            Some(id) => return Ok(id),
            None => return Err(KvError::Config(format!("no lease at index {index}"))),
        }
        // Before the replacement exists: once it does, writers can use it.
        self.check_marker(lost).await?;
        let new = self.grant_one().await?;
        self.stats.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(index, lost, new, "etcd lease lost; granted a replacement");
        self.ids.send_modify(|ids| ids[index] = new);
        Ok(new)
    }

    /// Checks with etcd whether lease `id` still exists (TTL > 0).
    pub async fn is_alive(&self, id: i64) -> Result<bool, KvError> {
        let resp = self
            .client
            .lease_client()
            .time_to_live(id, None)
            .await
            .map_err(|e| KvError::request("lease time-to-live", id.to_string(), e))?;
        Ok(resp.ttl() > 0)
    }

    /// Checks every lease with etcd and replaces those that are gone; returns how many
    /// were replaced. For when etcd is known to have lost its data (restarted empty): the
    /// keepalive tasks would only notice at their next renewal, up to a third of the TTL
    /// later.
    pub async fn replace_all_lost(&self) -> Result<usize, KvError> {
        let mut replaced = 0;
        for (index, id) in self.lease_ids().into_iter().enumerate() {
            if !self.is_alive(id).await? {
                self.replace_lost(index, id).await?;
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Revokes every lease, which deletes all keys attached to them at once (graceful
    /// shutdown), and stops the keepalive tasks.
    pub async fn revoke_all(&self) -> Result<(), KvError> {
        self.abort_tasks();
        let ids = self.lease_ids();
        for id in ids {
            match self.client.lease_client().revoke(id).await {
                Ok(_) => {}
                Err(e) if is_lease_not_found(&e) => {}
                Err(e) => return Err(KvError::request("lease revoke", id.to_string(), e)),
            }
        }
        Ok(())
    }

    fn abort_tasks(&self) {
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            task.abort();
        }
    }
}

impl Drop for LeasePool {
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

/// FNV-1a: tiny, stable across Rust versions and processes (unlike `DefaultHasher`).
pub(crate) fn index_for_key(key: &[u8], count: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % count.max(1) as u64) as usize
}

/// Keeps lease `index` alive; replaces it when etcd says it is gone. Holds only a weak
/// reference so that dropping the pool ends it (it is also aborted).
async fn keepalive_task(pool: Weak<LeasePool>, index: usize) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let Some(p) = pool.upgrade() else { return };
        let id = p.ids.borrow()[index];
        let mut lease_client = p.client.lease_client();
        // Renew three times per TTL so one lost round trip does not expire the lease.
        let interval = (p.ttl / 3).max(Duration::from_millis(300));
        drop(p);

        let lost = match lease_client.keep_alive(id).await {
            Ok((mut keeper, mut stream)) => {
                backoff.reset();
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(p) = pool.upgrade() else { return };
                    if p.ids.borrow()[index] != id {
                        // Replaced by a writer that saw "lease not found".
                        break false;
                    }
                    drop(p);
                    if keeper.keep_alive().await.is_err() {
                        break false;
                    }
                    match tokio::time::timeout(interval, stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => continue,
                        Ok(Ok(Some(_))) => break true,
                        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break false,
                    }
                }
            }
            Err(e) if is_lease_not_found(&e) => true,
            Err(e) => {
                if let Some(p) = pool.upgrade() {
                    p.stats.keepalive_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::debug!(index, lease = id, error = %e, "lease keepalive failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                false
            }
        };
        if lost {
            let Some(p) = pool.upgrade() else { return };
            if let Err(e) = p.replace_lost(index, id).await {
                tracing::warn!(index, lease = id, error = %e, "cannot replace lost etcd lease; retrying");
                drop(p);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_leases_stably() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[index_for_key(format!("cilium/state/ip/v1/default/10.0.{i}").as_bytes(), 4)] += 1;
        }
        for c in counts {
            assert!(c > 800, "uneven spread: {counts:?}");
        }
        // Stable: the same key always maps to the same index.
        assert_eq!(index_for_key(b"a", 4), index_for_key(b"a", 4));
        assert_eq!(index_for_key(b"anything", 1), 0);
    }
}

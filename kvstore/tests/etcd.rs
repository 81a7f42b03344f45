//! Integration tests against a real etcd (see causeway-testsupport).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use causeway_kvstore::{
    canary_key, connect, ensure_auth, external_workload_grants, sync_peer_users, Client, EtcdConfig, KvError,
    LeaseConfig, LeasePool, SyncStore, SyncStoreConfig, TlsConfig, WatchEvent, WatchStore, WatchStoreConfig,
    EXTERNAL_WORKLOAD_ROLE, EXTERNAL_WORKLOAD_USER, INIT_LOCK_PREFIX, NODE_REGISTER_PREFIX,
};
use causeway_pki::{Pki, ServerNames};
use causeway_testsupport::{wait_until, Etcd, TcpProxy};
use etcd_client::GetOptions;

const WAIT: Duration = Duration::from_secs(20);
const PREFIX: &str = "cilium/state/nodes/v1/east/";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "causeway_kvstore=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

fn tls_config(etcd: &Etcd, user: &str) -> TlsConfig {
    let c = etcd.client_tls_for(user);
    TlsConfig::from_pem(c.ca_pem, c.cert_pem, c.key_pem)
}

async fn plain_client(etcd: &Etcd) -> Client {
    connect(&EtcdConfig::new(etcd.endpoints())).await.unwrap()
}

/// All keys under `prefix` with their values.
async fn dump(client: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs().iter().map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec())).collect()
}

async fn get(client: &mut Client, key: &str) -> Option<etcd_client::KeyValue> {
    client.get(key, None).await.unwrap().kvs().first().cloned()
}

fn short_leases(count: usize) -> LeaseConfig {
    LeaseConfig { count, ttl: Duration::from_secs(2) }
}

fn store_config() -> SyncStoreConfig {
    let mut c = SyncStoreConfig::new("east", "nodes", PREFIX);
    c.min_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(500);
    c
}

// ---------------------------------------------------------------- leases

#[tokio::test]
async fn lease_expiry_removes_keys_of_a_dead_writer() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), short_leases(2)).await.unwrap();
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..10 {
        store.upsert(format!("{PREFIX}n{i}"), "{}").unwrap();
    }
    store.flushed().await;
    assert_eq!(dump(&mut client, PREFIX).await.len(), 10);

    // The writer dies: no more keepalives.
    drop(store);
    drop(pool);
    let mut c = client.clone();
    assert!(
        wait_until(WAIT, || {
            let mut c = c.clone();
            async move { dump(&mut c, PREFIX).await.is_empty() }
        })
        .await,
        "keys of a dead writer must expire with its leases"
    );
    let _ = dump(&mut c, PREFIX).await;
}

#[tokio::test]
async fn a_lost_lease_is_replaced_and_its_keys_rewritten() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), short_leases(2)).await.unwrap();
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..20 {
        store.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).unwrap();
    }
    store.mark_synced();
    store.wait_synced().await;
    let before = dump(&mut client, PREFIX).await;
    assert_eq!(before.len(), 20);

    // Someone revokes lease 0: its keys vanish at once.
    let lost = pool.lease_ids()[0];
    client.lease_revoke(lost).await.unwrap();
    assert!(dump(&mut client, PREFIX).await.len() < 20);

    let p = pool.clone();
    assert!(
        wait_until(WAIT, || {
            let p = p.clone();
            async move { p.lease_ids()[0] != lost }
        })
        .await
    );
    let c = client.clone();
    assert!(
        wait_until(WAIT, || {
            let mut c = c.clone();
            let before = before.clone();
            async move { dump(&mut c, PREFIX).await == before }
        })
        .await,
        "keys must be re-written on the new lease"
    );
    let new = pool.lease_ids()[0];
    for (key, _) in before {
        let kv = get(&mut client, &key).await.unwrap();
        assert!(pool.lease_ids().contains(&kv.lease()));
        assert_ne!(kv.lease(), lost);
    }
    assert_ne!(new, lost);
    assert!(store.stats().snapshot().lease_rewrites > 0);
}

#[tokio::test]
async fn etcd_restarted_empty_gets_every_key_and_the_canary_back() {
    init_tracing();
    let mut etcd = Etcd::start().await;
    let client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), short_leases(3)).await.unwrap();
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..30 {
        store.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).unwrap();
    }
    store.mark_synced();
    store.wait_synced().await;
    let canary = canary_key("east", "nodes");

    etcd.restart_empty().await;
    let c = client.clone();
    let canary2 = canary.clone();
    assert!(
        wait_until(WAIT, || {
            let mut c = c.clone();
            let canary = canary2.clone();
            async move { dump(&mut c, PREFIX).await.len() == 30 && get(&mut c, &canary).await.is_some() }
        })
        .await,
        "after etcd came back empty every key and the canary must be re-written"
    );
    assert!(pool.stats().lost.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

// ---------------------------------------------------------------- sync store

#[tokio::test]
async fn sync_store_coalesces_and_skips_unchanged_writes() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    let key = format!("{PREFIX}node-1");

    for i in 0..100 {
        store.upsert(key.clone(), format!("v{i}")).unwrap();
    }
    store.flushed().await;
    let s = store.stats().snapshot();
    assert_eq!(s.writes, 1, "100 upserts of one key before a flush are one write: {s:?}");
    let kv = get(&mut client, &key).await.unwrap();
    assert_eq!(kv.value(), b"v99");
    let rev = kv.mod_revision();

    // Same value again: no write, mod_revision unchanged.
    store.upsert(key.clone(), "v99").unwrap();
    store.flushed().await;
    let s = store.stats().snapshot();
    assert_eq!((s.writes, s.skipped_unchanged), (1, 1), "{s:?}");
    assert_eq!(get(&mut client, &key).await.unwrap().mod_revision(), rev);

    // A new store on the same leases knows what etcd holds from its listing.
    drop(store);
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    store.upsert(key.clone(), "v99").unwrap();
    store.flushed().await;
    assert_eq!(store.stats().snapshot().writes, 0);
    assert_eq!(get(&mut client, &key).await.unwrap().mod_revision(), rev);

    // With a different lease (a new process), the same value must be re-written, or the
    // key would expire with the old process's lease.
    drop(store);
    let pool2 = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let store = SyncStore::start(client.clone(), pool2.clone(), store_config());
    store.upsert(key.clone(), "v99").unwrap();
    store.flushed().await;
    assert_eq!(store.stats().snapshot().writes, 1);
    let kv = get(&mut client, &key).await.unwrap();
    assert_eq!(kv.lease(), pool2.lease_for_key(key.as_bytes()));

    // Delete, then delete again: the second is skipped.
    store.delete(key.clone()).unwrap();
    store.flushed().await;
    store.delete(key.clone()).unwrap();
    store.flushed().await;
    let s = store.stats().snapshot();
    assert_eq!((s.deletes, s.skipped_unchanged), (1, 1), "{s:?}");
    assert!(get(&mut client, &key).await.is_none());

    assert!(matches!(store.upsert("cilium/state/nodes/v1/west/x", "{}"), Err(KvError::KeyOutsidePrefix { .. })));
}

#[tokio::test]
async fn sync_store_batches_within_max_txn_ops() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let store = SyncStore::start(client.clone(), pool, store_config());
    for i in 0..300 {
        store.upsert(format!("{PREFIX}n{i:04}"), format!("v{i}")).unwrap();
    }
    store.flushed().await;
    let s = store.stats().snapshot();
    assert_eq!(s.writes, 300);
    assert_eq!(s.txns, 3, "300 puts at 128 per txn: {s:?}");
    assert_eq!(dump(&mut client, PREFIX).await.len(), 300);
}

#[tokio::test]
async fn pipelined_txns_never_let_an_older_value_overtake_a_newer_one() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let mut config = store_config();
    config.max_txn_ops = 8;
    config.txns_in_flight = 4;
    let store = SyncStore::start(client.clone(), pool, config);
    // Rewrite every key while earlier rounds are still in flight.
    for round in 0..5 {
        for i in 0..200 {
            store.upsert(format!("{PREFIX}n{i:04}"), format!("r{round}-{i}")).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    store.flushed().await;
    let got = dump(&mut client, PREFIX).await;
    let want: BTreeMap<String, Vec<u8>> =
        (0..200).map(|i| (format!("{PREFIX}n{i:04}"), format!("r4-{i}").into_bytes())).collect();
    assert_eq!(got, want);
    assert!(store.stats().snapshot().txns >= 25, "{:?}", store.stats().snapshot());
}

#[tokio::test]
async fn canary_is_written_only_after_the_initial_sync() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let pool = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let store = SyncStore::start(client.clone(), pool, store_config());
    let canary = canary_key("east", "nodes");
    assert_eq!(canary, "cilium/synced/east/cilium/state/nodes/v1");

    store.upsert(format!("{PREFIX}a"), "1").unwrap();
    store.flushed().await;
    assert!(get(&mut client, &canary).await.is_none());
    assert!(!store.is_synced());

    store.upsert(format!("{PREFIX}b"), "2").unwrap();
    store.mark_synced();
    store.wait_synced().await;
    let kv = get(&mut client, &canary).await.expect("canary");
    let ts = kv.value_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(ts).expect("canary is RFC 3339");
    // Everything upserted before mark_synced is in etcd by the time the canary is.
    assert_eq!(dump(&mut client, PREFIX).await.len(), 2);
}

#[tokio::test]
async fn stale_keys_of_a_previous_run_are_deleted_after_the_initial_sync() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    for k in ["a", "b", "c"] {
        client.put(format!("{PREFIX}{k}"), "old", None).await.unwrap();
    }
    let outside = "cilium/state/nodes/v1/west/a";
    client.put(outside, "theirs", None).await.unwrap();

    let pool = LeasePool::grant(client.clone(), LeaseConfig::default()).await.unwrap();
    let store = SyncStore::start(client.clone(), pool, store_config());
    store.upsert(format!("{PREFIX}a"), "new").unwrap();
    store.upsert(format!("{PREFIX}d"), "new").unwrap();
    store.flushed().await;
    // Before the initial export is declared complete nothing is deleted.
    assert_eq!(dump(&mut client, PREFIX).await.len(), 4);

    store.mark_synced();
    store.wait_synced().await;
    let left: Vec<String> = dump(&mut client, PREFIX).await.into_keys().collect();
    assert_eq!(left, vec![format!("{PREFIX}a"), format!("{PREFIX}d")]);
    assert!(get(&mut client, outside).await.is_some(), "keys outside the prefix are not ours");
    assert_eq!(store.stats().snapshot().stale_deleted, 2);
}

// ---------------------------------------------------------------- watch store

/// Applies events to a map, as a consumer would. After a `Reset` it keeps its copy and,
/// at the next `ListDone`, drops what was not upserted since the `Reset` (the sweep the
/// contract leaves to the consumer in that case).
struct Consumer {
    state: BTreeMap<String, Vec<u8>>,
    list_dones: usize,
    deletes: Vec<String>,
    /// `state.len()` when each `Reset` arrived.
    resets: Vec<usize>,
    /// Keys upserted since the last `Reset`, while its sweep is pending.
    since_reset: Option<BTreeSet<String>>,
    /// Keys dropped by the consumer's own post-`Reset` sweeps.
    swept: Vec<String>,
}

impl Consumer {
    fn new() -> Self {
        Self {
            state: BTreeMap::new(),
            list_dones: 0,
            deletes: Vec::new(),
            resets: Vec::new(),
            since_reset: None,
            swept: Vec::new(),
        }
    }

    fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Upsert { key, value, .. } => {
                if let Some(fresh) = &mut self.since_reset {
                    fresh.insert(key.clone());
                }
                self.state.insert(key, value);
            }
            WatchEvent::Delete { key } => {
                self.state.remove(&key);
                self.deletes.push(key);
            }
            WatchEvent::ListDone => {
                self.list_dones += 1;
                if let Some(fresh) = self.since_reset.take() {
                    let gone: Vec<String> = self.state.keys().filter(|k| !fresh.contains(*k)).cloned().collect();
                    for k in gone {
                        self.state.remove(&k);
                        self.swept.push(k);
                    }
                }
            }
            WatchEvent::Reset => {
                self.resets.push(self.state.len());
                self.since_reset = Some(BTreeSet::new());
            }
        }
    }

    /// Applies events until `cond` holds; panics after `WAIT`.
    async fn until(&mut self, w: &mut WatchStore, what: &str, cond: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(self) {
            match tokio::time::timeout_at(deadline, w.next()).await {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => panic!("watch store stopped while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; state has {} keys", self.state.len()),
            }
        }
    }
}

fn watch_config(prefix: &str) -> WatchStoreConfig {
    let mut c = WatchStoreConfig::new(prefix);
    c.list_page_size = 1000;
    c.min_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(500);
    c
}

#[tokio::test]
async fn watch_store_lists_in_pages_then_watches() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let prefix = "cilium/state/identities/v1/id/";
    // 2500 keys: three pages of 1000.
    for chunk in (0..2500).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|i| etcd_client::TxnOp::put(format!("{prefix}{i}"), format!("k8s:app=a{i};"), None))
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    client.put("cilium/state/nodes/v1/x", "not mine", None).await.unwrap();

    let mut w = WatchStore::start(client.clone(), watch_config(prefix));
    let mut c = Consumer::new();
    c.until(&mut w, "initial ListDone", |c| c.list_dones == 1).await;
    assert_eq!(c.state.len(), 2500);

    client.put(format!("{prefix}new"), "v", None).await.unwrap();
    client.delete(format!("{prefix}7"), None).await.unwrap();
    c.until(&mut w, "upsert and delete", |c| {
        c.state.contains_key(&format!("{prefix}new")) && !c.state.contains_key(&format!("{prefix}7"))
    })
    .await;
    assert_eq!(c.state, dump(&mut client, prefix).await);
    assert_eq!(w.stats().lists.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn watch_store_resumes_after_etcd_is_killed_without_listing_again() {
    init_tracing();
    let mut etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let prefix = "cilium/state/ip/v1/default/";
    client.put(format!("{prefix}10.0.0.1"), "a", None).await.unwrap();
    let mut w = WatchStore::start(client.clone(), watch_config(prefix));
    let mut c = Consumer::new();
    c.until(&mut w, "initial ListDone", |c| c.list_dones == 1).await;

    etcd.kill();
    etcd.restart().await;
    // Written after the restart, possibly before the watcher is back: must still arrive.
    let mut client = plain_client(&etcd).await;
    client.put(format!("{prefix}10.0.0.2"), "b", None).await.unwrap();
    client.delete(format!("{prefix}10.0.0.1"), None).await.unwrap();
    c.until(&mut w, "events after restart", |c| {
        c.state.len() == 1 && c.state.contains_key(&format!("{prefix}10.0.0.2"))
    })
    .await;
    assert_eq!(c.list_dones, 1, "a resumed watch must not list again");
    let stats = w.stats();
    assert_eq!(stats.lists.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(c.state, dump(&mut client, prefix).await);
}

#[tokio::test]
async fn watch_store_relists_after_compaction_and_the_consumer_ends_up_correct() {
    init_tracing();
    let etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let prefix = "cilium/state/services/v1/east/";
    for k in ["a", "b", "c"] {
        client.put(format!("{prefix}{k}"), "1", None).await.unwrap();
    }
    // The watcher reaches etcd through a proxy, so it can be cut off while etcd keeps
    // running and is changed and compacted.
    let proxy = TcpProxy::start(etcd.client_port()).await;
    let via_proxy = connect(&EtcdConfig::new([proxy.endpoint(false)])).await.unwrap();
    let mut w = WatchStore::start(via_proxy, watch_config(prefix));
    let mut c = Consumer::new();
    c.until(&mut w, "initial ListDone", |c| c.list_dones == 1).await;

    proxy.block();
    client.delete(format!("{prefix}a"), None).await.unwrap();
    client.put(format!("{prefix}b"), "2", None).await.unwrap();
    client.put(format!("{prefix}d"), "1", None).await.unwrap();
    client.put(format!("{prefix}d"), "2", None).await.unwrap();
    etcd.compact().await;
    let stats = w.stats();
    let errors_before = stats.errors.load(std::sync::atomic::Ordering::Relaxed);
    // Make sure the watcher noticed the cut before letting it back.
    assert!(
        wait_until(WAIT, || async {
            stats.errors.load(std::sync::atomic::Ordering::Relaxed) > errors_before
                || stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) > 0
        })
        .await
    );
    proxy.unblock();

    c.until(&mut w, "ListDone after re-list", |c| c.list_dones == 2).await;
    assert_eq!(c.state, dump(&mut client, prefix).await);
    assert_eq!(c.deletes, vec![format!("{prefix}a")]);
    assert_eq!(w.stats().relists.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn watch_store_resets_then_lists_again_when_etcd_comes_back_empty() {
    init_tracing();
    let mut etcd = Etcd::start().await;
    let mut client = plain_client(&etcd).await;
    let prefix = "cilium/state/nodes/v1/";
    for i in 0..5 {
        client.put(format!("{prefix}n{i}"), "1", None).await.unwrap();
    }
    // n0..n3 get more revisions, so the restarted etcd is well behind the watcher.
    for i in 0..4 {
        client.put(format!("{prefix}n{i}"), "2", None).await.unwrap();
    }
    let mut w = WatchStore::start(client.clone(), watch_config(prefix));
    let mut c = Consumer::new();
    c.until(&mut w, "initial ListDone", |c| c.list_dones == 1).await;

    etcd.restart_empty().await;
    // The store must say that the history changed, before anything else and without
    // deleting the keys of the old history (their writer has not written them back yet).
    c.until(&mut w, "Reset", |c| !c.resets.is_empty()).await;
    assert_eq!(c.resets, vec![5], "Reset must come before any event of the new history");
    assert!(c.deletes.is_empty(), "no Delete for keys of the old history: {:?}", c.deletes);

    // Then it lists the new history and keeps watching it.
    let mut client = plain_client(&etcd).await;
    client.put(format!("{prefix}fresh"), "1", None).await.unwrap();
    client.put(format!("{prefix}n1"), "3", None).await.unwrap();
    c.until(&mut w, "re-list of the restarted etcd", |c| {
        c.list_dones == 2 && c.state.len() == 2 && c.state.contains_key(&format!("{prefix}fresh"))
    })
    .await;
    assert_eq!(c.state, dump(&mut client, prefix).await);
    assert!(c.deletes.is_empty(), "no Delete for keys of the old history: {:?}", c.deletes);
    // The consumer's own sweep dropped the old keys that did not come back (n1 too, if the
    // listing ran before it was written again).
    for n in ["n0", "n2", "n3", "n4"] {
        assert!(c.swept.contains(&format!("{prefix}{n}")), "{n} not swept: {:?}", c.swept);
    }
    assert!(c.swept.len() <= 5, "{:?}", c.swept);
    let stats = w.stats();
    assert_eq!(stats.resets.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(stats.relists.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.lists.load(std::sync::atomic::Ordering::Relaxed), 2);

    // The new history is tracked exactly: deletes of its keys arrive as Deletes.
    client.delete(format!("{prefix}n1"), None).await.unwrap();
    c.until(&mut w, "delete in the new history", |c| c.state.len() == 1).await;
    assert_eq!(c.deletes, vec![format!("{prefix}n1")]);
    assert_eq!(c.state, dump(&mut client, prefix).await);
}

#[tokio::test]
async fn dropping_a_watch_store_closes_its_watch() {
    let etcd = Etcd::start().await;
    let client = plain_client(&etcd).await;
    let mut w = WatchStore::start(client, watch_config("x/"));
    assert_eq!(w.next().await, Some(WatchEvent::ListDone));
    assert!(wait_until(WAIT, || async { etcd.watch_streams().await == 1 }).await);
    drop(w);
    assert!(
        wait_until(WAIT, || async { etcd.watch_streams().await == 0 }).await,
        "the watch stream must close when the store is dropped"
    );
}

// ---------------------------------------------------------------- mTLS and auth

#[tokio::test]
async fn mtls_refuses_clients_without_a_valid_certificate() {
    init_tracing();
    let pki = Pki::loopback().unwrap();
    let etcd = Etcd::start_tls(&pki).await;

    let ok = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "root"));
    connect(&ok).await.expect("a certificate from the trusted CA works");

    // No client certificate.
    let no_cert = TlsConfig { ca_pem: etcd.ca_pem().unwrap().to_owned(), ..Default::default() };
    let cfg = EtcdConfig::new(etcd.endpoints()).with_tls(no_cert).with_connect_timeout(Duration::from_secs(3));
    let err = connect(&cfg).await.err().expect("no client certificate must fail");
    assert!(matches!(err, KvError::Connect { .. } | KvError::ConnectTimeout { .. }), "{err}");
    assert!(err.to_string().contains(&etcd.endpoint()), "error names the endpoint: {err}");

    // A certificate from another CA.
    let rogue = Pki::generate(&ServerNames::loopback()).unwrap().client("root").unwrap();
    let cfg = EtcdConfig::new(etcd.endpoints())
        .with_tls(TlsConfig::from_pem(etcd.ca_pem().unwrap(), rogue.cert_pem, rogue.key_pem))
        .with_connect_timeout(Duration::from_secs(3));
    assert!(connect(&cfg).await.is_err());

    // Plaintext against a TLS etcd.
    let cfg =
        EtcdConfig::new([etcd.endpoint().replace("https://", "http://")]).with_connect_timeout(Duration::from_secs(3));
    assert!(connect(&cfg).await.is_err());
}

#[tokio::test]
async fn remote_user_reads_allowed_keys_but_cannot_write() {
    init_tracing();
    let pki = Pki::loopback().unwrap();
    let etcd = Etcd::start_tls(&pki).await;
    let root_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "root"));
    let mut root = connect(&root_cfg).await.unwrap();
    for key in [
        "cilium/state/nodes/v1/east/n1",
        "cilium/cluster-config/east",
        "cilium/cluster-config/other",
        "cilium/synced/east/cilium/state/nodes/v1",
        "cilium/.heartbeat",
        "cilium/.has-cluster-config",
        "secret/thing",
    ] {
        root.put(key, "x", None).await.unwrap();
    }
    ensure_auth(&mut root, "east", &["west"]).await.unwrap();
    // Idempotent, and works with auth already enabled (root is the cert's CN).
    let mut root = connect(&root_cfg).await.unwrap();
    ensure_auth(&mut root, "east", &["west", "north"]).await.unwrap();

    let remote_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "remote-west"));
    let mut remote = connect(&remote_cfg).await.unwrap();
    for key in [
        "cilium/state/nodes/v1/east/n1",
        "cilium/cluster-config/east",
        "cilium/synced/east/cilium/state/nodes/v1",
        "cilium/.heartbeat",
        "cilium/.has-cluster-config",
    ] {
        let resp = remote.get(key, None).await.unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert_eq!(resp.kvs().len(), 1, "{key}");
    }
    let prefix = remote.get("cilium/state/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(prefix.kvs().len(), 1);

    for key in ["cilium/cluster-config/other", "secret/thing"] {
        let err = remote.get(key, None).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{key}: {err}");
    }
    let err = remote.put("cilium/state/nodes/v1/east/n1", "evil", None).await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");

    // The watch store works for the read-only user.
    let mut w = WatchStore::start(remote.clone(), watch_config("cilium/state/"));
    let mut c = Consumer::new();
    c.until(&mut w, "ListDone as remote-west", |c| c.list_dones == 1).await;
    assert_eq!(c.state.len(), 1);

    // The admin writes everything; an unknown user is refused.
    let admin_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "admin-east"));
    let mut admin = connect(&admin_cfg).await.unwrap();
    admin.put("cilium/state/nodes/v1/east/n2", "{}", None).await.unwrap();
    let stranger_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "stranger"));
    let mut stranger = connect(&stranger_cfg).await.unwrap();
    assert!(stranger.get("cilium/.heartbeat", None).await.is_err());
}

#[tokio::test]
async fn externalworkload_reads_everything_and_writes_only_its_registration() {
    init_tracing();
    let pki = Pki::loopback().unwrap();
    let etcd = Etcd::start_tls(&pki).await;
    let root_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "root"));
    let mut root = connect(&root_cfg).await.unwrap();
    let protected = [
        "cilium/state/nodes/v1/east/n1",
        "cilium/state/ip/v1/default/10.1.2.3",
        "cilium/cluster-config/east",
        "cilium/synced/east/cilium/state/nodes/v1",
        "cilium/.heartbeat",
        "cilium/.has-cluster-config",
        "secret/thing",
    ];
    for key in protected {
        root.put(key, "x", None).await.unwrap();
    }
    ensure_auth(&mut root, "east", &["west"]).await.unwrap();
    // Converges: a second run keeps the role as it is (and works with auth on).
    ensure_auth(&mut root, "east", &["west"]).await.unwrap();
    let role = root.role_get(EXTERNAL_WORKLOAD_ROLE).await.unwrap();
    assert_eq!(role.permissions().len(), external_workload_grants().len(), "{:?}", role.permissions());

    let vm_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, EXTERNAL_WORKLOAD_USER));
    let mut vm = connect(&vm_cfg).await.expect("externalworkload connects with its certificate");
    // Reads everything.
    let all = vm.get("", Some(GetOptions::new().with_all_keys())).await.expect("read every key");
    assert_eq!(all.kvs().len(), protected.len());
    for key in protected {
        assert_eq!(vm.get(key, None).await.unwrap().kvs().len(), 1, "{key}");
    }
    // Registers itself, with a lease as an agent does, and takes its lock.
    let lease = vm.lease_grant(60, None).await.expect("grant a lease").id();
    let reg = format!("{NODE_REGISTER_PREFIX}vm-1");
    vm.put(reg.as_str(), "{\"Name\":\"vm-1\"}", Some(etcd_client::PutOptions::new().with_lease(lease)))
        .await
        .expect("write its registration");
    vm.put(format!("{INIT_LOCK_PREFIX}vm-1"), "lock", None).await.expect("take its lock");
    vm.delete(reg.as_str(), None).await.expect("delete its registration");
    // Writes nothing else, and deletes nothing else.
    for key in protected.iter().copied().chain(["cilium/state/noderegister/v2/vm-1", "cilium/state/noderegisterx"]) {
        let err = vm.put(key, "evil", None).await.expect_err(key);
        assert!(err.to_string().contains("permission denied"), "{key}: {err}");
    }
    let err = vm.delete("cilium/state/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert_eq!(dump(&mut root, "cilium/state/nodes/").await.get("cilium/state/nodes/v1/east/n1"), Some(&b"x".to_vec()));
}

#[tokio::test]
async fn peer_users_follow_the_wanted_peers_granting_and_revoking_read_access() {
    init_tracing();
    let pki = Pki::loopback().unwrap();
    let etcd = Etcd::start_tls(&pki).await;
    let root_cfg = EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, "root"));
    let mut root = connect(&root_cfg).await.unwrap();
    root.put("cilium/state/nodes/v1/west/n1", "{}", None).await.unwrap();
    ensure_auth(&mut root, "west", &["east"]).await.unwrap();

    let connect_as = |user: &str| EtcdConfig::new(etcd.endpoints()).with_tls(tls_config(&etcd, user));
    // Connections opened before the changes: etcd checks the certificate's user on every request.
    let mut east = connect(&connect_as("remote-east")).await.unwrap();
    let mut south = connect(&connect_as("remote-south")).await.unwrap();
    let read = |c: &mut Client| {
        let mut c = c.clone();
        async move { c.get("cilium/state/", Some(GetOptions::new().with_prefix())).await.map(|r| r.kvs().len()) }
    };
    assert_eq!(read(&mut east).await.unwrap(), 1);
    let err = read(&mut south).await.expect_err("remote-south reads before being a peer");
    assert!(err.to_string().contains("permission denied"), "{err}");

    // south is connected: its user appears and reads, without anything restarting.
    let plan = sync_peer_users(&mut root, "west", &["east", "south"]).await.unwrap();
    assert_eq!((plan.add, plan.remove), (vec!["remote-south".to_string()], vec![]));
    assert_eq!(read(&mut south).await.expect("remote-south reads once added"), 1);
    assert_eq!(read(&mut east).await.unwrap(), 1);
    // Converged: a second pass changes nothing.
    let again = sync_peer_users(&mut root, "west", &["east", "south"]).await.unwrap();
    assert!(!again.changes_users(), "{again:?}");

    // south is disconnected: refused at once, on the open connection and on a new one; east keeps reading.
    let plan = sync_peer_users(&mut root, "west", &["east"]).await.unwrap();
    assert_eq!((plan.add, plan.remove), (vec![], vec!["remote-south".to_string()]));
    let err = read(&mut south).await.expect_err("remote-south still reads after removal");
    assert!(err.to_string().contains("permission denied"), "{err}");
    // A new connection is refused too, whether at connect's first request or at the read.
    let refused = match connect(&connect_as("remote-south")).await {
        Err(e) => e.to_string(),
        Ok(mut c) => read(&mut c).await.expect_err("a new remote-south connection reads after removal").to_string(),
    };
    assert!(refused.contains("permission denied"), "{refused}");
    assert_eq!(read(&mut east).await.expect("remote-east keeps reading"), 1);

    // The other users are never touched, even with no peer left.
    sync_peer_users::<&str>(&mut root, "west", &[]).await.unwrap();
    let users: BTreeSet<String> = root.user_list().await.unwrap().users().iter().cloned().collect();
    let want: BTreeSet<String> = ["root", "admin-west", EXTERNAL_WORKLOAD_USER].into_iter().map(String::from).collect();
    assert_eq!(users, want);
    assert!(read(&mut east).await.is_err(), "remote-east reads after every peer was removed");
    let mut admin = connect(&connect_as("admin-west")).await.unwrap();
    admin.put("cilium/state/nodes/v1/west/n2", "{}", None).await.expect("admin-west still writes");
}

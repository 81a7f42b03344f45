//! An etcd restarted empty (data lost), against a real etcd (see causeway-testsupport):
//! the [`ResetDetector`] notices, and a [`SyncStore`] told to [`SyncStore::resync_all`]
//! writes every key and its canary back, on fresh leases.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use causeway_kvstore::{
    canary_key, cluster_config_key, connect, ensure_auth, write_cluster_config, Client, EtcdConfig, Heartbeat,
    LeaseConfig, LeasePool, ResetDetector, ResetReason, SyncStore, SyncStoreConfig, TlsConfig, HAS_CLUSTER_CONFIG_KEY,
    HEARTBEAT_KEY, RESET_CHECK_INTERVAL,
};
use causeway_pki::Pki;
use causeway_testsupport::{wait_until, Etcd};
use etcd_client::{EventType, GetOptions, WatchOptions};

const WAIT: Duration = Duration::from_secs(20);
const PREFIX: &str = "cilium/state/nodes/v1/east/";
const SERVICES: &str = "cilium/state/services/v1/east/";

async fn dump(client: &mut Client, prefix: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("list");
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().expect("utf-8 key").to_owned(), (kv.value().to_vec(), kv.lease())))
        .collect()
}

fn store_config() -> SyncStoreConfig {
    let mut c = SyncStoreConfig::new("east", "nodes", PREFIX);
    c.min_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(500);
    c
}

#[tokio::test]
async fn resync_all_rewrites_every_key_and_the_canary_after_etcd_restarted_empty() {
    let mut etcd = Etcd::start().await;
    let mut client = connect(&EtcdConfig::new(etcd.endpoints())).await.expect("connect");
    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config");
    let mut detector = ResetDetector::new(&client, cluster_config_key("east"), Duration::from_millis(100));
    assert_eq!(detector.check().await.expect("first look"), None, "the first look learns the baseline");

    // Long leases: the keepalive tasks would only notice the loss minutes later, so what
    // follows is the resync's doing, not the lease-loss path's.
    let pool = LeasePool::grant(client.clone(), LeaseConfig { count: 3, ttl: Duration::from_secs(600) })
        .await
        .expect("leases");
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..40 {
        store.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).expect("upsert");
    }
    store.mark_synced();
    store.wait_synced().await;
    let canary = canary_key("east", "nodes");
    let before = dump(&mut client, PREFIX).await;
    assert_eq!(before.len(), 40);
    let old_leases = pool.lease_ids();
    assert_eq!(detector.check().await.expect("look"), None, "nothing happened yet");

    etcd.restart_empty().await;
    // An update made while nobody knows etcd lost everything is not lost either.
    store.upsert(format!("{PREFIX}n0"), "v0-new").expect("upsert");
    let reason = tokio::time::timeout(WAIT, detector.wait_for_reset()).await.expect("the reset is noticed");
    assert!(matches!(&reason, ResetReason::MarkerMissing { key } if key == "cilium/cluster-config/east"), "{reason}");

    // The owner's start sequence: marker first, then fresh leases, then the store.
    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config again");
    // (A write that failed with "lease not found" meanwhile may have replaced one already.)
    pool.replace_all_lost().await.expect("replace leases");
    assert!(pool.lease_ids().iter().all(|id| !old_leases.contains(id)), "every lease is fresh");
    store.resync_all();
    assert!(!store.is_synced(), "not synced until the keys are back");
    store.flushed().await;
    tokio::time::timeout(WAIT, store.wait_synced()).await.expect("canary written again");

    let after = dump(&mut client, PREFIX).await;
    assert_eq!(after.len(), 40, "every key is back");
    for (key, (value, lease)) in &after {
        let want = if key == &format!("{PREFIX}n0") { b"v0-new".to_vec() } else { before[key].0.clone() };
        assert_eq!(value, &want, "{key}");
        assert!(pool.lease_ids().contains(lease) && !old_leases.contains(lease), "{key} is on a fresh lease");
    }
    let c = client.clone();
    assert!(
        wait_until(WAIT, || {
            let mut c = c.clone();
            let canary = canary.clone();
            async move { c.get(canary, None).await.is_ok_and(|r| !r.kvs().is_empty()) }
        })
        .await,
        "the canary is back"
    );
    let stats = store.stats().snapshot();
    assert_eq!(stats.resyncs, 1, "{stats:?}");

    // The re-written marker is the new baseline, not another reset.
    assert_eq!(detector.check().await.expect("look"), None);
    assert_eq!(detector.check().await.expect("look"), None);
}

#[tokio::test]
async fn reset_detector_ignores_an_outage_that_keeps_the_data() {
    let mut etcd = Etcd::start().await;
    let mut client = connect(&EtcdConfig::new(etcd.endpoints())).await.expect("connect");
    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config");
    let mut detector = ResetDetector::new(&client, cluster_config_key("east"), Duration::from_millis(100));
    assert_eq!(detector.check().await.expect("first look"), None);
    etcd.kill();
    assert!(detector.check().await.is_err(), "a failed look is an error, not a reset");
    etcd.restart().await;
    let back = wait_until(WAIT, || {
        let mut c = client.clone();
        async move { c.get("x", None).await.is_ok() }
    })
    .await;
    assert!(back);
    assert_eq!(detector.check().await.expect("look"), None, "same data: no reset");
}

// ---------------------------------------------------------------- the write gate

/// Every put since etcd (re)started: `(revision, key)` in commit order, from a watch of all keys from revision 1.
async fn history(client: &mut Client) -> Vec<(i64, String)> {
    let now = client.get("x", None).await.expect("revision").header().map(|h| h.revision()).unwrap_or_default();
    let mut stream = client
        .watch("", Some(WatchOptions::new().with_all_keys().with_start_revision(1)))
        .await
        .expect("watch from revision 1");
    let mut out = Vec::new();
    while out.last().is_none_or(|(rev, _)| *rev < now) {
        let msg = tokio::time::timeout(WAIT, stream.message()).await.expect("watch answers").expect("watch");
        let Some(msg) = msg else { break };
        for ev in msg.events() {
            if ev.event_type() == EventType::Put {
                if let Some(kv) = ev.kv() {
                    out.push((kv.mod_revision(), kv.key_str().expect("utf-8 key").to_owned()));
                }
            }
        }
    }
    out
}

async fn count(client: &mut Client, prefix: &str) -> usize {
    dump(client, prefix).await.len()
}

/// The apiserver's situation: auth, cluster config, leases guarded by the config key, a heartbeat and two stores.
/// etcd is restarted empty while changes keep coming. Nothing may be written (no state key, no canary, no
/// heartbeat) until the owner has re-created users, roles, auth and the cluster config and opened the gate; then
/// every key comes back, with the latest values, after the cluster config in etcd's history.
#[tokio::test]
async fn after_a_reset_no_key_is_written_before_auth_and_cluster_config_exist() {
    let pki = Pki::loopback().expect("pki");
    let mut etcd = Etcd::start_tls(&pki).await;
    let root = etcd.client_tls_for("root");
    let root_cfg =
        EtcdConfig::new(etcd.endpoints()).with_tls(TlsConfig::from_pem(root.ca_pem, root.cert_pem, root.key_pem));
    let mut client = connect(&root_cfg).await.expect("connect as root");
    let config_key = cluster_config_key("east");
    ensure_auth(&mut client, "east", &["west"]).await.expect("auth");
    write_cluster_config(&mut client, "east", b"{\"id\":1}").await.expect("cluster config");
    let mut detector = ResetDetector::new(&client, config_key.clone(), Duration::from_millis(100));
    assert_eq!(detector.check().await.expect("first look"), None);

    let pool = LeasePool::grant(client.clone(), LeaseConfig { count: 3, ttl: Duration::from_secs(600) })
        .await
        .expect("leases");
    pool.guard_resets(config_key.clone());
    let gate = pool.gate().clone();
    let _heartbeat = Heartbeat::start(client.clone(), pool.clone(), Duration::from_millis(100));
    let nodes = Arc::new(SyncStore::start(client.clone(), pool.clone(), store_config()));
    let mut svc_config = SyncStoreConfig::new("east", "services", SERVICES);
    svc_config.min_backoff = Duration::from_millis(50);
    svc_config.max_backoff = Duration::from_millis(500);
    let services = SyncStore::start(client.clone(), pool.clone(), svc_config);
    for i in 0..40 {
        nodes.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).expect("upsert");
        services.upsert(format!("{SERVICES}shop/s{i}"), format!("s{i}")).expect("upsert");
    }
    nodes.mark_synced();
    services.mark_synced();
    nodes.wait_synced().await;
    services.wait_synced().await;

    // Changes keep coming the whole time, so the stores always have something to write.
    let churn = tokio::spawn({
        let nodes = nodes.clone();
        async move {
            for round in 0u64.. {
                let _ = nodes.upsert(format!("{PREFIX}n0"), format!("v0-{round}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    etcd.restart_empty().await;
    // The owner's reset handler: whichever notices first, the lease pool (a lost lease and no marker) or the
    // detector, writes stop. The detector polls every RESET_CHECK_INTERVAL at a phase unrelated to the reset; here
    // it looks that late, the worst case, which is the window in which failed puts used to be retried on fresh
    // leases.
    let reason = tokio::time::timeout(WAIT, async {
        tokio::select! {
            reason = gate.wait_closed() => reason,
            reason = async {
                tokio::time::sleep(RESET_CHECK_INTERVAL).await;
                detector.wait_for_reset().await
            } => { gate.close(reason.to_string()); reason.to_string() }
        }
    })
    .await
    .expect("the reset is noticed");
    assert!(!gate.is_open(), "writes are paused once the reset is noticed ({reason})");

    // Writes that fail with "lease not found" keep being retried meanwhile; none may land.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut fresh = connect(&root_cfg).await.expect("connect to the empty etcd");
    let keys = fresh.get("", Some(GetOptions::new().with_all_keys())).await.expect("list everything");
    assert!(
        keys.kvs().is_empty(),
        "nothing may be written into the reset etcd before its auth and cluster config exist; found {:?}",
        keys.kvs().iter().map(|kv| kv.key_str().unwrap_or("?").to_owned()).collect::<Vec<_>>()
    );

    // The reset sequence: users, roles, auth; the cluster config; fresh leases; then writes resume.
    ensure_auth(&mut fresh, "east", &["west"]).await.expect("auth again");
    write_cluster_config(&mut fresh, "east", b"{\"id\":1}").await.expect("cluster config again");
    detector.forget();
    pool.replace_all_lost().await.expect("fresh leases");
    gate.open();

    churn.abort();
    nodes.upsert(format!("{PREFIX}n0"), "final").expect("upsert");
    tokio::time::timeout(WAIT, async {
        nodes.flushed().await;
        nodes.wait_synced().await;
        services.wait_synced().await;
    })
    .await
    .expect("both stores resync and write their canaries again");

    // The export is complete, with the latest values.
    let node_keys = dump(&mut fresh, PREFIX).await;
    assert_eq!(node_keys.len(), 40);
    assert_eq!(node_keys[&format!("{PREFIX}n0")].0, b"final".to_vec());
    assert_eq!(count(&mut fresh, SERVICES).await, 40);
    for kind in ["nodes", "services"] {
        assert_eq!(count(&mut fresh, &canary_key("east", kind)).await, 1, "{kind} canary");
    }
    assert!(
        wait_until(WAIT, || {
            let mut c = fresh.clone();
            async move { c.get(HEARTBEAT_KEY, None).await.is_ok_and(|r| !r.kvs().is_empty()) }
        })
        .await,
        "the heartbeat resumes"
    );

    // etcd's own history of the new store: the cluster config (and its marker) come first, every other key after.
    let history = history(&mut fresh).await;
    let first = history.first().cloned().expect("history is not empty");
    assert_eq!(first.1, config_key, "the first key written into the reset etcd: {history:?}");
    let config_rev = first.0;
    for (rev, key) in &history {
        if key != &config_key && key != HAS_CLUSTER_CONFIG_KEY {
            assert!(*rev > config_rev, "{key} written at revision {rev}, not after the cluster config ({config_rev})");
        }
    }
    // And auth was back before any of it: a peer cannot write.
    let west = etcd.client_tls_for("remote-west");
    let west_cfg =
        EtcdConfig::new(etcd.endpoints()).with_tls(TlsConfig::from_pem(west.ca_pem, west.cert_pem, west.key_pem));
    let mut as_west = connect(&west_cfg).await.expect("connect as remote-west");
    let err = as_west.put(format!("{PREFIX}evil"), "x", None).await.expect_err("remote-west must not write");
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert_eq!(gate.resets(), 1);
}

/// Without any detector: a store's put fails with "lease not found", the pool finds the marker gone and closes
/// the gate before it grants a replacement lease, so the store's retries wait.
#[tokio::test]
async fn a_lost_lease_with_the_marker_gone_closes_the_gate() {
    let mut etcd = Etcd::start().await;
    let mut client = connect(&EtcdConfig::new(etcd.endpoints())).await.expect("connect");
    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config");
    let pool = LeasePool::grant(client.clone(), LeaseConfig { count: 2, ttl: Duration::from_secs(600) })
        .await
        .expect("leases");
    pool.guard_resets(cluster_config_key("east"));
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..10 {
        store.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).expect("upsert");
    }
    store.mark_synced();
    store.wait_synced().await;

    etcd.restart_empty().await;
    store.upsert(format!("{PREFIX}n0"), "after").expect("upsert");
    let reason = tokio::time::timeout(WAIT, pool.gate().wait_closed()).await.expect("the pool closes the gate");
    assert!(reason.contains("cilium/cluster-config/east"), "{reason}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&mut client, "").await, 0, "nothing is written while the gate is closed");

    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config again");
    pool.gate().open();
    tokio::time::timeout(WAIT, async {
        store.flushed().await;
        store.wait_synced().await;
    })
    .await
    .expect("the store resyncs by itself once the gate opens");
    let keys = dump(&mut client, PREFIX).await;
    assert_eq!(keys.len(), 10);
    assert_eq!(keys[&format!("{PREFIX}n0")].0, b"after".to_vec());
    assert_eq!(store.stats().snapshot().resyncs, 1);

    // The owner's resync_all after opening the gate does not list again for the same reset; it only re-writes the
    // canary.
    store.resync_all();
    tokio::time::timeout(WAIT, store.wait_synced()).await.expect("synced again");
    assert_eq!(store.stats().snapshot().resyncs, 1);
}

/// A lease that expires while the data is kept (the marker is still there) is not a reset: the gate stays open and
/// the keys move to the replacement lease.
#[tokio::test]
async fn a_lost_lease_with_the_marker_present_is_not_a_reset() {
    let etcd = Etcd::start().await;
    let mut client = connect(&EtcdConfig::new(etcd.endpoints())).await.expect("connect");
    write_cluster_config(&mut client, "east", b"{}").await.expect("cluster config");
    let pool = LeasePool::grant(client.clone(), LeaseConfig { count: 1, ttl: Duration::from_secs(600) })
        .await
        .expect("leases");
    pool.guard_resets(cluster_config_key("east"));
    let store = SyncStore::start(client.clone(), pool.clone(), store_config());
    for i in 0..5 {
        store.upsert(format!("{PREFIX}n{i}"), format!("v{i}")).expect("upsert");
    }
    store.mark_synced();
    store.wait_synced().await;
    let old = pool.lease_ids()[0];
    client.lease_revoke(old).await.expect("revoke the lease (its keys go with it)");
    store.upsert(format!("{PREFIX}n0"), "after").expect("upsert");
    let back = wait_until(WAIT, || {
        let mut c = client.clone();
        async move { dump(&mut c, PREFIX).await.len() == 5 }
    })
    .await;
    assert!(back, "the keys are re-written on the replacement lease");
    assert!(pool.gate().is_open());
    assert_eq!(pool.gate().resets(), 0);
    assert_ne!(pool.lease_ids()[0], old);
}

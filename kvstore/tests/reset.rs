//! An etcd restarted empty (data lost), against a real etcd (see causeway-testsupport):
//! the [`ResetDetector`] notices, and a [`SyncStore`] told to [`SyncStore::resync_all`]
//! writes every key and its canary back, on fresh leases.

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_kvstore::{
    canary_key, cluster_config_key, connect, write_cluster_config, Client, EtcdConfig, LeaseConfig, LeasePool,
    ResetDetector, ResetReason, SyncStore, SyncStoreConfig,
};
use causeway_testsupport::{wait_until, Etcd};
use etcd_client::GetOptions;

const WAIT: Duration = Duration::from_secs(20);
const PREFIX: &str = "cilium/state/nodes/v1/east/";

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

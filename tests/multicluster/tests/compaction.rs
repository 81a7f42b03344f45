//! The remote's etcd is compacted while identity-sync is cut off from it (a partition, the etcd stays up and keeps
//! changing): when the connection comes back, resuming the watch from the old revision is impossible, so
//! identity-sync must re-list. /status counts the resync, and the view matches the remote's current state.

use causeway_multicluster_tests::{backends, eventually, start_mesh, Cluster, Proxy, DEADLINE};
use serde_json::Value;

const NS: &str = "shop";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_leads_to_a_relist() {
    let mesh = start_mesh(&[("east", 1), ("west", 2)], true).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_compaction_while_disconnected_leads_to_a_relist(&mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_compaction_while_disconnected_leads_to_a_relist(mesh: &[Cluster]) -> anyhow::Result<()> {
    let (east, west) = (&mesh[0], &mesh[1]);
    for (c, n) in [(east, 1), (west, 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-1", c.name), &format!("10.{n}.1.11")).await?;
    }
    // West reaches east's etcd through a proxy the test can cut.
    let proxy = Proxy::for_endpoint(&east.etcd.endpoint()).await?;
    west.write_remote("east", &format!("https://{}", proxy.addr()), west.credentials_for(east).as_ref())?;
    let before = backends(&[("east", &["10.1.1.10", "10.1.1.11"]), ("west", &["10.2.1.10", "10.2.1.11"])]);
    west.wait_backends(NS, "cart", &before).await?;
    let st = west.wait_remote("east", "synced", |r: &Value| r["state"] == "synced").await?;
    let resyncs_before = st["resyncs"].as_u64().unwrap_or(0);

    proxy.block();
    west.wait_remote("east", "to be reported disconnected", |r| r["connected"] == false).await?;

    // East changes while west cannot see it, and its etcd history is compacted past west's last revision.
    east.remove_backend(NS, "cart", "cart-east-0").await?;
    east.add_backend(NS, "cart", "cart-east-2", "10.1.1.12").await?;
    let key = "cilium/state/services/v1/east/shop/cart";
    eventually("east's apiserver to export the change to its etcd", DEADLINE, || async {
        let mut c = east.etcd.client().await;
        let v = c.get(key, None).await.map_err(|e| e.to_string())?;
        let text = v.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).to_string()).unwrap_or_default();
        if text.contains("10.1.1.12") && !text.contains("10.1.1.10") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await?;
    // More revisions after the change, so that compaction removes history west would need.
    let mut c = east.etcd.client().await;
    for i in 0..5 {
        c.put(format!("test/filler/{i}"), "x", None).await?;
    }
    east.etcd.compact().await;
    // West still serves the last known state while partitioned.
    assert_eq!(west.backends(NS, "cart").await?, before, "west dropped east's backends while partitioned");

    proxy.unblock();
    let after = backends(&[("east", &["10.1.1.11", "10.1.1.12"]), ("west", &["10.2.1.10", "10.2.1.11"])]);
    west.wait_backends(NS, "cart", &after).await?;
    let st = west
        .wait_remote("east", "connected, synced, with a resync counted", |r: &Value| {
            r["connected"] == true && r["state"] == "synced" && r["resyncs"].as_u64().unwrap_or(0) > resyncs_before
        })
        .await?;
    let metrics = west.sync_metrics_text().await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("causeway_identity_sync_remote_resyncs_total{remote=\"east\"}"))
        .unwrap_or_default();
    let count: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(count >= 1.0, "resync metric not counted: {line:?}; /status: {st}");
    Ok(())
}

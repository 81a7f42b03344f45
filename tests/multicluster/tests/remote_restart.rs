//! A remote's etcd is SIGKILLed and comes back empty: the local cluster keeps the remote's backends while it is
//! down (no flapping), the remote's apiserver re-exports into the empty etcd, and after the resync the local view
//! is exactly the remote's current state (nothing stale).

use std::time::Duration;

use causeway_multicluster_tests::{always, backends, start_mesh, Cluster};
use serde_json::Value;

const NS: &str = "shop";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_etcd_killed_and_restarted_empty() {
    let mut mesh = start_mesh(&[("east", 1), ("west", 2)], true).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_remote_etcd_killed_and_restarted_empty(&mut mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_remote_etcd_killed_and_restarted_empty(mesh: &mut [Cluster]) -> anyhow::Result<()> {
    for (c, n) in [(&mesh[0], 1), (&mesh[1], 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-1", c.name), &format!("10.{n}.1.11")).await?;
    }
    mesh[0].connect_to(&mesh[1])?;
    mesh[1].connect_to(&mesh[0])?;
    let before = backends(&[("east", &["10.1.1.10", "10.1.1.11"]), ("west", &["10.2.1.10", "10.2.1.11"])]);
    mesh[1].wait_backends(NS, "cart", &before).await?;
    mesh[0].wait_backends(NS, "cart", &before).await?;

    // SIGKILL east's etcd; west notices the remote is gone.
    mesh[0].etcd.kill();
    let (east, west) = (&mesh[0], &mesh[1]);
    west.wait_remote("east", "to be reported disconnected", |r| r["connected"] == false).await?;

    // While it is down, a pod goes away in east (its kube API is up; its etcd is not).
    east.remove_backend(NS, "cart", "cart-east-0").await?;

    // Nothing flaps: west keeps serving east's last known backends the whole time east's etcd is down.
    let samples = always("west's view of cart while east's etcd is down", Duration::from_secs(6), || async {
        match west.backends(NS, "cart").await {
            Ok(b) if b == before => Ok(()),
            Ok(b) => Err(format!("{b:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await?;
    assert!(samples > 10, "only {samples} samples taken");
    // East's own view of west is unaffected by its etcd being down (a remote's failure stays remote, and so does
    // a local etcd outage for imports).
    assert_eq!(
        east.backends(NS, "cart").await?,
        backends(&[("east", &["10.1.1.11"]), ("west", &["10.2.1.10", "10.2.1.11"])])
    );

    // East's etcd comes back empty: east's apiserver must re-export (cluster config, canaries, services) into it, and
    // west must resync and drop the pod deleted meanwhile.
    mesh[0].etcd.restart_empty().await;
    let (east, west) = (&mesh[0], &mesh[1]);
    let after = backends(&[("east", &["10.1.1.11"]), ("west", &["10.2.1.10", "10.2.1.11"])]);
    west.wait_backends(NS, "cart", &after).await?;
    let st = west
        .wait_remote("east", "connected and synced again", |r: &Value| r["connected"] == true && r["state"] == "synced")
        .await?;
    assert_eq!(st["cluster_id"], 1, "{st}");

    // A change made after the restart still flows.
    east.add_backend(NS, "cart", "cart-east-2", "10.1.1.12").await?;
    west.wait_backends(
        NS,
        "cart",
        &backends(&[("east", &["10.1.1.11", "10.1.1.12"]), ("west", &["10.2.1.10", "10.2.1.11"])]),
    )
    .await?;

    // The re-created store is as locked down as the first one: west's read-only user still cannot write to it.
    let mut as_west = east.etcd.client_as("remote-west").await;
    let put = as_west.put("cilium/state/services/v1/east/shop/cart", "{}", None).await;
    let err = put.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("permission denied"),
        "after east's etcd was restarted empty, remote-west could write to it (put result: {err:?}); the apiserver must \
         re-create etcd users/roles and re-enable auth on an empty etcd"
    );
    Ok(())
}

//! Global services across two clusters: each cluster's EndpointSlices carry the other's backends, and follow pods
//! as they come and go.

use causeway_multicluster_tests::{backends, start_mesh, Cluster};
use serde_json::Value;

const NS: &str = "shop";

async fn connect_both(east: &Cluster, west: &Cluster) -> anyhow::Result<()> {
    east.connect_to(west)?;
    west.connect_to(east)?;
    let synced = |r: &Value| r["state"] == "synced";
    east.wait_remote("west", "synced", synced).await?;
    west.wait_remote("east", "synced", synced).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_global_service_over_mtls() {
    let mesh = start_mesh(&[("east", 1), ("west", 2)], true).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_mutual_global_service_over_mtls(&mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_mutual_global_service_over_mtls(mesh: &[Cluster]) -> anyhow::Result<()> {
    let (east, west) = (&mesh[0], &mesh[1]);
    for (c, n) in [(east, 1), (west, 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-1", c.name), &format!("10.{n}.1.11")).await?;
    }
    connect_both(east, west).await?;

    let want = backends(&[("east", &["10.1.1.10", "10.1.1.11"]), ("west", &["10.2.1.10", "10.2.1.11"])]);
    east.wait_backends(NS, "cart", &want).await?;
    west.wait_backends(NS, "cart", &want).await?;

    // /status names each peer with its cluster ID, connected and synced.
    let w = west.remote_status("east").await?.expect("west lists east in /status");
    assert_eq!(w["cluster_id"], 1, "{w}");
    assert_eq!(w["connected"], true, "{w}");
    assert_eq!(w["validated"], true, "{w}");
    let e = east.remote_status("west").await?.expect("east lists west in /status");
    assert_eq!(e["cluster_id"], 2, "{e}");

    // The imported slices carry the MCS source label and name the service.
    let imported = west.imported_slices(NS).await?;
    assert!(!imported.is_empty(), "west has no imported EndpointSlices");
    for s in &imported {
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("multicluster.kubernetes.io/source-cluster").map(String::as_str), Some("east"));
        assert_eq!(labels.get("kubernetes.io/service-name").map(String::as_str), Some("cart"));
        let ports: Vec<_> = s.ports.iter().flatten().filter_map(|p| p.port).collect();
        assert_eq!(ports, vec![8080], "imported slice ports: {:?}", s.ports);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_follow_pods_added_and_removed() {
    let mesh = start_mesh(&[("east", 1), ("west", 2)], false).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_slices_follow_pods_added_and_removed(&mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_slices_follow_pods_added_and_removed(mesh: &[Cluster]) -> anyhow::Result<()> {
    let (east, west) = (&mesh[0], &mesh[1]);
    for (c, n) in [(east, 1), (west, 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
        // A service that is not global: its backends must stay in their cluster.
        c.create_service_plain(NS, "ledger", &format!("10.96.{n}.30")).await?;
        c.add_backend(NS, "ledger", &format!("ledger-{}-0", c.name), &format!("10.{n}.2.10")).await?;
    }
    connect_both(east, west).await?;
    west.wait_backends(NS, "cart", &backends(&[("east", &["10.1.1.10"]), ("west", &["10.2.1.10"])])).await?;

    // Scale up in east: the new pod shows up in west.
    east.add_backend(NS, "cart", "cart-east-1", "10.1.1.11").await?;
    east.add_backend(NS, "cart", "cart-east-2", "10.1.1.12").await?;
    west.wait_backends(
        NS,
        "cart",
        &backends(&[("east", &["10.1.1.10", "10.1.1.11", "10.1.1.12"]), ("west", &["10.2.1.10"])]),
    )
    .await?;

    // Scale down: the removed pod disappears from west.
    east.remove_backend(NS, "cart", "cart-east-0").await?;
    west.wait_backends(NS, "cart", &backends(&[("east", &["10.1.1.11", "10.1.1.12"]), ("west", &["10.2.1.10"])]))
        .await?;
    // And west's own change reaches east.
    west.add_backend(NS, "cart", "cart-west-1", "10.2.1.11").await?;
    east.wait_backends(
        NS,
        "cart",
        &backends(&[("east", &["10.1.1.11", "10.1.1.12"]), ("west", &["10.2.1.10", "10.2.1.11"])]),
    )
    .await?;

    // Every east pod gone: west keeps only its own backends.
    east.remove_backend(NS, "cart", "cart-east-1").await?;
    east.remove_backend(NS, "cart", "cart-east-2").await?;
    west.wait_backends(NS, "cart", &backends(&[("west", &["10.2.1.10", "10.2.1.11"])])).await?;

    // The non-global service was never imported.
    assert_eq!(west.backends(NS, "ledger").await?, backends(&[("west", &["10.2.2.10"])]));
    assert_eq!(east.backends(NS, "ledger").await?, backends(&[("east", &["10.1.2.10"])]));
    Ok(())
}

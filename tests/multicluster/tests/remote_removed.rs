//! Removing a remote's config file drains it: its EndpointSlices disappear, the other remotes' stay.

use causeway_multicluster_tests::{backends, eventually, start_mesh, Cluster, FakeRemote, DEADLINE};

const NS: &str = "shop";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_remote_is_drained() {
    let mesh = start_mesh(&[("east", 1), ("west", 2)], false).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_removed_remote_is_drained(&mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_removed_remote_is_drained(mesh: &[Cluster]) -> anyhow::Result<()> {
    let (east, west) = (&mesh[0], &mesh[1]);
    for (c, n) in [(east, 1), (west, 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
    }
    let north = FakeRemote::start("north").await;
    north.write_cluster_config(3).await?;
    north
        .put(north.service_key(NS, "cart"), north.service_json(3, NS, "cart", &["10.3.1.10", "10.3.1.11"]).to_string())
        .await?;
    north.mark_synced().await?;

    west.connect_to(east)?;
    west.write_remote("north", &north.etcd.endpoint(), None)?;
    let all = backends(&[("east", &["10.1.1.10"]), ("north", &["10.3.1.10", "10.3.1.11"]), ("west", &["10.2.1.10"])]);
    west.wait_backends(NS, "cart", &all).await?;

    west.remove_remote("north")?;
    west.wait_backends(NS, "cart", &backends(&[("east", &["10.1.1.10"]), ("west", &["10.2.1.10"])])).await?;
    eventually("north to leave /status", DEADLINE, || async {
        match west.remote_status("north").await {
            Ok(None) => Ok(()),
            Ok(Some(r)) => Err(r.to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await?;
    // No slice labelled with north is left behind.
    let leftovers: Vec<_> = west
        .imported_slices(NS)
        .await?
        .into_iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("multicluster.kubernetes.io/source-cluster"))
                .map(String::as_str)
                == Some("north")
        })
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(leftovers.is_empty(), "slices of the removed remote remain: {leftovers:?}");
    let e = west.remote_status("east").await?.expect("east still listed");
    assert_eq!(e["state"], "synced", "{e}");

    // Removing the last remote leaves only local backends.
    west.remove_remote("east")?;
    west.wait_backends(NS, "cart", &backends(&[("west", &["10.2.1.10"])])).await?;

    // Re-adding it brings its backends back.
    west.connect_to(east)?;
    west.wait_backends(NS, "cart", &backends(&[("east", &["10.1.1.10"]), ("west", &["10.2.1.10"])])).await?;
    Ok(())
}

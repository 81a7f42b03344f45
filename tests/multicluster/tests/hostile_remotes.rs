//! Hostile or broken remotes are refused with a reason in /status, and never disturb the remotes that work.
//! The fake remotes are bare etcds filled by the test with causeway-store keys.

use causeway_multicluster_tests::{backends, start_mesh, Cluster, FakeRemote};
use causeway_store::StoreKey;
use serde_json::{json, Value};

const NS: &str = "shop";

/// A fake remote claiming cluster ID `id`, with canaries and a valid `shop/cart` with `backend`.
async fn fake(name: &str, id: u32, backend: &str) -> anyhow::Result<FakeRemote> {
    let r = FakeRemote::start(name).await;
    r.write_cluster_config(id).await?;
    r.put(r.service_key(NS, "cart"), r.service_json(id, NS, "cart", &[backend]).to_string()).await?;
    r.mark_synced().await?;
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_remotes_are_rejected_and_others_keep_working() {
    let mesh = start_mesh(&[("east", 1), ("west", 2)], false).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_hostile_remotes_are_rejected_and_others_keep_working(&mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_hostile_remotes_are_rejected_and_others_keep_working(mesh: &[Cluster]) -> anyhow::Result<()> {
    let (east, west) = (&mesh[0], &mesh[1]);
    for (c, n) in [(east, 1), (west, 2)] {
        c.create_namespace(NS).await?;
        c.create_global_service(NS, "cart", &format!("10.96.{n}.20"), &[]).await?;
        c.add_backend(NS, "cart", &format!("cart-{}-0", c.name), &format!("10.{n}.1.10")).await?;
    }
    west.connect_to(east)?;
    west.wait_remote("east", "synced", |r: &Value| r["state"] == "synced").await?;

    // "mirror" claims west's own ID, "twin" claims east's, "garbled" has a cluster config that is not JSON.
    let mirror = fake("mirror", 2, "10.66.0.2").await?;
    let twin = fake("twin", 1, "10.66.0.1").await?;
    let garbled = fake("garbled", 4, "10.66.0.4").await?;
    garbled.put(StoreKey::ClusterConfig { cluster: "garbled".into() }, "{\"id\": 4, \"capab").await?;
    // "north" (ID 3) has a valid config and one good service, plus hostile entries: identities in east's range,
    // an ipcache entry using one, malformed JSON and a service claiming to be east's.
    let north = fake("north", 3, "10.3.1.10").await?;
    let east_range_id = (1 << 16) + 5;
    north
        .put(
            StoreKey::Identity { id: east_range_id },
            "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=north;k8s:io.kubernetes.pod.namespace=shop;",
        )
        .await?;
    north
        .put(
            StoreKey::Ip { ip: "10.3.1.99".parse()? },
            json!({"IP": "10.3.1.99", "HostIP": "192.0.2.3", "ID": east_range_id, "Key": 0, "Metadata": "",
                   "K8sNamespace": "shop", "K8sPodName": "evil", "NamedPorts": []})
            .to_string(),
        )
        .await?;
    north.put(north.service_key(NS, "broken"), "{\"cluster\": \"north\", \"namespace\": ").await?;
    let mut spoof = north.service_json(3, NS, "spoof", &["10.1.1.99"]);
    spoof["cluster"] = json!("east");
    north.put(north.service_key(NS, "spoof"), spoof.to_string()).await?;
    for r in [&mirror, &twin, &garbled, &north] {
        west.write_remote(&r.name, &r.etcd.endpoint(), None)?;
    }

    let refused = |r: &Value| r["state"] == "validation_failed" && r["validated"] == false;
    let m = west.wait_remote("mirror", "refused", refused).await?;
    let err = m["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("local cluster's own ID"), "mirror's reason: {m}");
    let t = west.wait_remote("twin", "refused", refused).await?;
    let err = t["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("already used by remote \"east\""), "twin's reason: {t}");
    let g = west.wait_remote("garbled", "refused", refused).await?;
    assert!(g["last_error"].as_str().is_some_and(|e| !e.is_empty()), "garbled has no reason: {g}");

    // North is accepted, with its hostile values counted by reason.
    let n = west
        .wait_remote("north", "synced with its hostile values rejected", |r: &Value| {
            let rej = |k: &str| r["rejected"][k].as_u64().unwrap_or(0);
            r["state"] == "synced"
                && rej("identity_out_of_range") >= 2
                && rej("malformed") >= 1
                && rej("wrong_cluster") >= 1
        })
        .await?;
    assert_eq!(n["cluster_id"], 3, "{n}");

    // Only the good backends are imported: east's and north's valid one; nothing from the refused remotes.
    let want = backends(&[("east", &["10.1.1.10"]), ("north", &["10.3.1.10"]), ("west", &["10.2.1.10"])]);
    west.wait_backends(NS, "cart", &want).await?;
    assert!(west.backends(NS, "spoof").await?.is_empty(), "a spoofed service was imported");
    assert!(west.backends(NS, "broken").await?.is_empty(), "a malformed service was imported");

    // A malformed update does not wipe north's last good value.
    north.put(north.service_key(NS, "cart"), "not json at all").await?;
    west.wait_remote("north", "to reject the malformed update", |r: &Value| {
        r["rejected"]["malformed"].as_u64().unwrap_or(0) >= 2
    })
    .await?;
    assert_eq!(west.backends(NS, "cart").await?, want, "a malformed update changed the imported backends");

    // East keeps working through all this.
    east.add_backend(NS, "cart", "cart-east-1", "10.1.1.11").await?;
    let want = backends(&[("east", &["10.1.1.10", "10.1.1.11"]), ("north", &["10.3.1.10"]), ("west", &["10.2.1.10"])]);
    west.wait_backends(NS, "cart", &want).await?;
    let e = west.remote_status("east").await?.expect("east listed");
    assert_eq!(e["state"], "synced", "{e}");

    // Out-of-range identities and the ipcache entry using one were not imported: north's counts hold only what
    // validated (its own-range data is none, so zero identities).
    let n = west.remote_status("north").await?.expect("north listed");
    assert_eq!(n["entries"]["identities"].as_u64().unwrap_or(0), 0, "{n}");
    assert_eq!(n["entries"]["ip"].as_u64().unwrap_or(0), 0, "{n}");
    // Keep the fake remotes alive to the end.
    drop((mirror, twin, garbled, north));
    Ok(())
}

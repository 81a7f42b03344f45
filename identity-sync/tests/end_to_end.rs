//! identity-sync end to end, in-process: real etcd processes as the remote clusters' stores (written with
//! causeway-store types, as their clustermesh-apiservers would), the fake kube API as the local cluster.
//!
//! Local cluster "west" (ID 2) with a global Service shop/cart. Remotes:
//! - "east" (ID 1): a backend for cart, a node, an ipcache entry, an identity, and one malformed service value;
//! - "north" (ID 3): a backend for cart;
//! - "bad": its cluster config claims ID 2, the local cluster's own ID, so it must be refused.
//!
//! Checks: EndpointSlices for east and north appear with their backends and MCS labels; /status shows east and
//! north synced (east with the malformed value counted), bad refused with a reason; /readyz is ready; removing
//! north's file deletes north's slice and its status entry while east's slice stays.

mod common;

use std::time::Duration;

use anyhow::Context as _;
use causeway_store::IpCacheEntry;
use causeway_testsupport::Etcd;
use common::{
    create_global_cart, fake_kube, http_get, ip, ipcache_entry, node, put_canaries, put_cluster_config, put_json,
    put_remote, put_service, remote, remote_file, service, slice_backends, status, test_config, wait_for,
};
use fake_kube_apiserver::FakeApiServerHandle;
use identity_sync::app::{self, Running};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use serde_json::Value;

/// identity-sync for the local cluster "west" (shop/cart on a fake kube API) with the one remote "east". Keep
/// `_kube_server` and `_dir` bound: the kube API and the remotes directory go when they are dropped.
struct West {
    running: Running,
    slices: Api<EndpointSlice>,
    _kube_server: FakeApiServerHandle,
    _dir: tempfile::TempDir,
}

impl West {
    async fn start_with_east(endpoint: &str) -> anyhow::Result<West> {
        let (_kube_server, client) = fake_kube().await?;
        create_global_cart(&client).await?;
        let _dir = tempfile::tempdir()?;
        remote_file(_dir.path(), "east", endpoint)?;
        let running = app::start(test_config(_dir.path())?, client.clone()).await?;
        let slices = Api::namespaced(client, "shop");
        Ok(West { running, slices, _kube_server, _dir })
    }
}

/// mTLS with a Cilium-format file (relative TLS paths), and an ID clash: a second remote claiming east's ID is
/// refused while east keeps it, and is accepted once east is removed (refused configs are retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_remote_and_duplicate_id_refused_until_the_clash_is_gone() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let pki = causeway_pki::Pki::loopback()?;
    let etcd = Etcd::start_tls(&pki).await;
    let mut c = etcd.client().await;
    put_remote(&mut c, "east", 1, "10.1.3.17").await?;
    put_remote(&mut c, "twin", 1, "10.1.9.9").await?;

    let dir = tempfile::tempdir()?;
    let cert = etcd.client_tls_for("root");
    std::fs::write(dir.path().join("ca.crt"), etcd.ca_pem().context("TLS etcd has a CA")?)?;
    std::fs::write(dir.path().join("west.crt"), &cert.cert_pem)?;
    std::fs::write(dir.path().join("west.key"), &cert.key_pem)?;
    let file = |_: &str| {
        format!(
            "endpoints:\n- {}\ntrusted-ca-file: ca.crt\ncert-file: west.crt\nkey-file: {}\n",
            etcd.endpoint(),
            dir.path().join("west.key").display()
        )
    };
    std::fs::write(dir.path().join("east"), file("east"))?;

    let (_kube_server, client) = fake_kube().await?;
    let running = app::start(test_config(dir.path())?, client).await?;
    let addr = running.metrics_addr;
    wait_for("east synced over mTLS", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["services"] == 1)
    })
    .await?;

    std::fs::write(dir.path().join("twin"), file("twin"))?;
    wait_for("twin refused", || async {
        remote(&status(addr).await, "twin").is_some_and(|r| r["state"] == "validation_failed")
    })
    .await?;
    let s = status(addr).await;
    let reason = remote(&s, "twin").and_then(|r| r["last_error"].as_str()).unwrap_or_default().to_string();
    assert!(reason.contains("already used by remote \"east\""), "twin's reason: {reason:?}");
    assert!(remote(&s, "east").is_some_and(|r| r["state"] == "synced"), "east must be unaffected: {s:#}");

    std::fs::remove_file(dir.path().join("east"))?;
    wait_for("twin accepted once east is gone", || async {
        let s = status(addr).await;
        remote(&s, "east").is_none() && remote(&s, "twin").is_some_and(|r| r["state"] == "synced")
    })
    .await?;
    Ok(())
}

/// A remote whose etcd dies keeps its entries and slices (a remote's failure stays remote); when it comes back the
/// remote is synced again and follows later deletes. (The sweep of keys deleted while away is the core's rule, unit
/// tested there; etcd cannot be written while it is down, so this test cannot create that case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_keeps_entries_and_the_remote_resyncs_when_back() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let mut east = Etcd::start().await;
    let mut c = east.client().await;
    put_remote(&mut c, "east", 1, "10.1.3.17").await?;
    let node_key = "cilium/state/nodes/v1/east/gone";
    let mut node_value: Value = serde_json::json!({"Name": "gone", "Cluster": "east", "ClusterID": 1});
    node_value["IPAddresses"] = serde_json::json!([{"Type": "InternalIP", "IP": "192.168.10.99"}]);
    put_json(&mut c, node_key, &node_value).await?;

    let West { running, slices, _kube_server, _dir } = West::start_with_east(&east.endpoint()).await?;
    let addr = running.metrics_addr;
    wait_for("east synced with its node", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 1)
    })
    .await?;
    wait_for("east's slice", || async { slice_backends(&slices).await.contains_key("east") }).await?;

    // While etcd is down: entries and slices stay.
    east.kill();
    wait_for("east disconnected", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "disconnected" && r["connected"] == false)
    })
    .await?;
    assert!(running.hub.read(|v| v.node("east", "gone").is_some()), "node dropped on disconnect");
    assert!(slice_backends(&slices).await.contains_key("east"), "slice dropped on disconnect");

    // Back: synced again, and a delete reaches the view.
    east.restart().await;
    let mut c = east.client().await;
    c.delete(node_key, None).await?;
    wait_for("east synced again without the deleted node", || async {
        let synced = remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced");
        synced && running.hub.read(|v| v.node("east", "gone").is_none())
    })
    .await?;
    assert!(slice_backends(&slices).await.contains_key("east"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotes_become_endpointslices_bad_remotes_are_refused_and_removal_drains() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);

    // Remote stores.
    let east = Etcd::start().await;
    let north = Etcd::start().await;
    let mut ec = east.client().await;
    let mut nc = north.client().await;
    put_cluster_config(&mut ec, "east", 1).await?;
    put_service(&mut ec, &service("east", 1, &["10.1.3.17"])).await?;
    ec.put("cilium/state/services/v1/east/shop/broken", "{\"cluster\": \"east\", truncated", None).await?;
    let node = node("east", 1, "east-node-1", "192.168.10.12");
    put_json(&mut ec, "cilium/state/nodes/v1/east/east-node-1", &node).await?;
    let identity = (1 << 16) + 5;
    let entry = ipcache_entry("10.1.3.17", "192.168.10.12", identity, "cart-1");
    put_json(&mut ec, "cilium/state/ip/v1/default/10.1.3.17", &entry).await?;
    ec.put(
        format!("cilium/state/identities/v1/id/{identity}"),
        "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;",
        None,
    )
    .await?;
    put_canaries(&mut ec, "east").await?;

    put_remote(&mut nc, "north", 3, "10.3.0.5").await?;
    // "bad" shares north's etcd and claims the local cluster's ID.
    put_cluster_config(&mut nc, "bad", 2).await?;
    put_canaries(&mut nc, "bad").await?;

    // Local cluster: the fake kube API with a global Service.
    let (_kube_server, client) = fake_kube().await?;
    create_global_cart(&client).await?;

    let dir = tempfile::tempdir()?;
    remote_file(dir.path(), "east", &east.endpoint())?;
    remote_file(dir.path(), "north", &north.endpoint())?;
    remote_file(dir.path(), "bad", &north.endpoint())?;
    // Not remotes: TLS material and Secret-volume links are skipped.
    std::fs::write(dir.path().join("ca.crt"), "not a remote")?;

    let running = app::start(test_config(dir.path())?, client.clone()).await?;
    let addr = running.metrics_addr;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");

    wait_for("slices for east and north", || async {
        let b = slice_backends(&slices).await;
        b.get("east") == Some(&vec!["10.1.3.17".to_string()]) && b.get("north") == Some(&vec!["10.3.0.5".to_string()])
    })
    .await?;

    wait_for("east and north synced, bad refused", || async {
        let s = status(addr).await;
        remote(&s, "east").is_some_and(|r| r["state"] == "synced")
            && remote(&s, "north").is_some_and(|r| r["state"] == "synced")
            && remote(&s, "bad").is_some_and(|r| r["state"] == "validation_failed")
    })
    .await?;
    let s = status(addr).await;
    let e = remote(&s, "east").context("east in /status")?;
    assert_eq!(e["cluster_id"], 1, "{s:#}");
    assert_eq!(e["entries"]["services"], 1, "{s:#}");
    assert_eq!(e["entries"]["nodes"], 1, "{s:#}");
    assert_eq!(e["entries"]["ip"], 1, "{s:#}");
    assert_eq!(e["entries"]["identities"], 1, "{s:#}");
    assert!(e["rejected"]["malformed"].as_u64().unwrap_or(0) >= 1, "malformed value not counted: {s:#}");
    let bad = remote(&s, "bad").context("bad in /status")?;
    let reason = bad["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("local cluster's own ID"), "bad remote's reason: {reason:?}");
    assert!(remote(&s, "ca.crt").is_none(), "TLS files are not remotes: {s:#}");

    // Ready: every remote is synced or refused.
    wait_for("/readyz", || async { matches!(http_get(addr, "/readyz").await, Ok((200, _))) }).await?;
    let (_, metrics) = http_get(addr, "/metrics").await?;
    assert!(
        metrics.contains("causeway_identity_sync_remote_rejected_values_total{remote=\"east\",reason=\"malformed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("causeway_identity_sync_endpointslice_writes_total"), "{metrics}");

    // The merged view also reaches the gRPC side's view: the remote identity is there.
    assert!(running.hub.read(|v| v.identity(identity).is_some()), "identity {identity} missing from the view");

    // A new backend in east shows up in the slice.
    put_service(&mut ec, &service("east", 1, &["10.1.3.17", "10.1.3.18"])).await?;
    wait_for("east's second backend", || async {
        slice_backends(&slices).await.get("east").is_some_and(|b| b.len() == 2)
    })
    .await?;

    // Removing north's file drains its slice and status; east keeps working.
    std::fs::remove_file(dir.path().join("north"))?;
    wait_for("north drained", || async {
        let b = slice_backends(&slices).await;
        !b.contains_key("north") && b.contains_key("east") && remote(&status(addr).await, "north").is_none()
    })
    .await?;
    Ok(())
}

/// A remote whose etcd is restarted empty (its clustermesh-apiserver has not exported again yet) keeps every entry
/// and its EndpointSlice while it is rebuilt: no sweep while the cluster config and the canaries are missing, nor
/// while the data is back but the canaries are not. Once the canaries are back, the remote is synced again and what
/// did not come back (a node) is swept. A sampler checks throughout that nothing that stays ever flapped away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_empty_keeps_entries_until_the_canaries_are_back() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let identity = (1 << 16) + 7;
    let entry = ipcache_entry("10.1.3.17", "192.168.10.12", identity, "cart-1");
    let node = |name: &str| {
        let mut v: Value = serde_json::json!({"Name": name, "Cluster": "east", "ClusterID": 1});
        v["IPAddresses"] = serde_json::json!([{"Type": "InternalIP", "IP": "192.168.10.12"}]);
        v
    };
    // What east's clustermesh-apiserver exports (again, after the restart).
    async fn export(c: &mut etcd_client::Client, entry: &IpCacheEntry, node: &Value, id: u32) -> anyhow::Result<()> {
        put_service(c, &service("east", 1, &["10.1.3.17"])).await?;
        put_json(c, "cilium/state/nodes/v1/east/kept", node).await?;
        put_json(c, "cilium/state/ip/v1/default/10.1.3.17", entry).await?;
        c.put(
            format!("cilium/state/identities/v1/id/{id}"),
            "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;",
            None,
        )
        .await?;
        Ok(())
    }

    let mut east = Etcd::start().await;
    let mut c = east.client().await;
    put_cluster_config(&mut c, "east", 1).await?;
    export(&mut c, &entry, &node("kept"), identity).await?;
    put_json(&mut c, "cilium/state/nodes/v1/east/dropped", &node("dropped")).await?;
    put_canaries(&mut c, "east").await?;

    let West { running, slices, _kube_server, _dir } = West::start_with_east(&east.endpoint()).await?;
    let addr = running.metrics_addr;
    wait_for("east synced", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 2)
    })
    .await?;
    wait_for("east's slice", || async { slice_backends(&slices).await.contains_key("east") }).await?;

    // From here on, what east keeps exporting must never leave the view or the slices.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (hub, slices, stop) = (running.hub.clone(), slices.clone(), stop.clone());
        tokio::spawn(async move {
            let mut flaps: Vec<String> = Vec::new();
            let mut samples = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let missing = hub.read(|v| {
                    let mut m = Vec::new();
                    if v.node("east", "kept").is_none() {
                        m.push("node kept");
                    }
                    if v.identity(identity).is_none() {
                        m.push("identity");
                    }
                    if v.ip(&ip("10.1.3.17")).is_none() {
                        m.push("ipcache entry");
                    }
                    let key = identity_sync::core::ServiceKey::new("shop", "cart");
                    if v.service(&key).is_none_or(|s| s.clusters.iter().all(|c| &*c.cluster != "east")) {
                        m.push("east's backends of shop/cart");
                    }
                    m
                });
                flaps.extend(missing.into_iter().map(String::from));
                if slice_backends(&slices).await.get("east") != Some(&vec!["10.1.3.17".to_string()]) {
                    flaps.push("east's EndpointSlice".into());
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (flaps, samples)
        })
    };

    east.restart_empty().await;
    let mut c = east.client().await;
    wait_for("a new session waiting for east's cluster config", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_cluster_config")
    })
    .await?;
    // Several probe intervals with an empty etcd.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running.hub.read(|v| v.node("east", "dropped").is_some()), "swept while east's etcd was empty");

    put_cluster_config(&mut c, "east", 1).await?;
    wait_for("east waiting for its canaries", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_canaries")
    })
    .await?;
    // The data comes back before the canaries (the apiserver writes a canary after its kind's initial export).
    export(&mut c, &entry, &node("kept"), identity).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        running.hub.read(|v| v.node("east", "dropped").is_some()),
        "swept before the canaries said the export was complete"
    );
    assert!(remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_canaries"));

    put_canaries(&mut c, "east").await?;
    wait_for("east synced again, without the node that did not come back", || async {
        let synced = remote(&status(addr).await, "east")
            .is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 1 && r["entries"]["services"] == 1);
        synced && running.hub.read(|v| v.node("east", "dropped").is_none())
    })
    .await?;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (flaps, samples) = sampler.await?;
    assert!(samples > 10, "sampler ran {samples} times");
    assert!(flaps.is_empty(), "entries flapped while east's etcd was rebuilt: {flaps:?}");

    // The new history is followed live.
    c.delete("cilium/state/nodes/v1/east/kept", None).await?;
    wait_for("a delete in the new history", || async { running.hub.read(|v| v.node("east", "kept").is_none()) })
        .await?;
    Ok(())
}

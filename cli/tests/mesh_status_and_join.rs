//! `causeway clustermesh status [--wait]` against an HTTP server serving identity-sync's /status JSON, and
//! `causeway external-workload install` whose script is run for real under a scratch root.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::Clusters;
use serde_json::json;

/// identity-sync's StatusReport for cluster east with one remote `west`; it reports `west` synced from the
/// `synced_after`-th request on.
async fn serve_status(synced_after: usize) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let synced = n >= synced_after;
                let kinds = ["identities", "ipcache", "nodes", "services"];
                axum::Json(json!({
                    "cluster": "east", "cluster_id": 1, "ready": true, "kube_synced": true,
                    "remotes": [{
                        "name": "west", "cluster_id": 2,
                        "state": if synced { "synced" } else { "waiting_for_canaries" },
                        "connected": true, "validated": true,
                        "synced": kinds.iter().map(|k| (k.to_string(), json!(synced))).collect::<serde_json::Map<_, _>>(),
                        "entries": {"identities": 3, "ipcache": if synced { 12 } else { 0 }, "nodes": 2, "services": 1},
                        "rejected": {}, "resyncs": 0,
                        "last_error": if synced { serde_json::Value::Null } else { json!("waiting for cilium/synced/west/cilium/state/ip/v1") },
                        "config_error": null, "last_change": "2026-11-23T10:00:00Z"
                    }]
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/status", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, hits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_remote_and_wait_follows_progress() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east"]).await?;
    let (url, _) = serve_status(usize::MAX).await?;
    let once = clusters
        .causeway(&["clustermesh", "status", "--context", "east", "--status-url", &url])
        .await?
        .expect_ok("status");
    let row = once.stdout.lines().find(|l| l.starts_with("west")).unwrap_or_default().to_string();
    for cell in ["2", "waiting_for_canaries", "yes", "0/4 kinds", "identities=3 ipcache=0", "waiting for cilium/synced"]
    {
        assert!(row.contains(cell), "{cell} missing from {row:?}\n{}", once.stdout);
    }

    let json = clusters
        .causeway(&["clustermesh", "status", "--context", "east", "--status-url", &url, "-o", "json"])
        .await?
        .expect_ok("status -o json");
    let v: serde_json::Value = serde_json::from_str(&json.stdout)?;
    assert_eq!(v["cluster"], "east");
    assert_eq!(v["allRemotesReady"], false);
    assert_eq!(v["remotes"][0]["name"], "west");
    assert_eq!(v["remotes"][0]["entries"]["identities"], 3);

    // Never ready: --wait gives up after its timeout and fails, saying which remote it waited for.
    let stuck = clusters
        .causeway(&[
            "clustermesh",
            "status",
            "--context",
            "east",
            "--status-url",
            &url,
            "--wait",
            "--wait-timeout",
            "2s",
        ])
        .await?;
    assert!(!stuck.ok, "{stuck:?}");
    assert!(stuck.stderr.contains("0/1 remotes ready; waiting for west waiting_for_canaries"), "{}", stuck.stderr);
    assert!(stuck.stderr.contains("timed out"), "{}", stuck.stderr);

    // Ready on the 4th poll: --wait prints the progress, then the final table, and succeeds.
    let (url, hits) = serve_status(4).await?;
    let waited = clusters
        .causeway(&[
            "clustermesh",
            "status",
            "--context",
            "east",
            "--status-url",
            &url,
            "--wait",
            "--wait-timeout",
            "60s",
        ])
        .await?
        .expect_ok("status --wait");
    assert!(hits.load(Ordering::SeqCst) >= 4);
    assert!(waited.stderr.contains("0/1 remotes ready"), "{}", waited.stderr);
    let row = waited.stdout.lines().find(|l| l.starts_with("west")).unwrap_or_default().to_string();
    assert!(row.contains("synced") && row.contains("4/4 kinds") && row.contains("ipcache=12"), "{}", waited.stdout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_configured_remotes_identity_sync_has_not_seen() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east", "west", "north"]).await?;
    for (ctx, id) in [("east", "1"), ("west", "2"), ("north", "3")] {
        clusters
            .causeway(&["clustermesh", "enable", "--context", ctx, "--cluster-name", ctx, "--cluster-id", id])
            .await?
            .expect_ok("enable");
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "clustermesh-apiserver", "namespace": "causeway"},
            "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "etcd", "port": 2379}]}
        }))?;
        kube::Api::namespaced(clusters.client(ctx).await?, "causeway").create(&Default::default(), &svc).await?;
    }
    for peer in ["west", "north"] {
        clusters
            .causeway(&["clustermesh", "connect", "--context", "east", "--destination-context", peer])
            .await?
            .expect_ok("connect");
    }
    // identity-sync reports only west (synced); north is in the Secret but not picked up yet.
    let (url, _) = serve_status(0).await?;
    let run = clusters.causeway(&["clustermesh", "status", "--context", "east", "--status-url", &url]).await?;
    let run = run.expect_ok("status");
    let north = run.stdout.lines().find(|l| l.starts_with("north")).unwrap_or_default().to_string();
    assert!(north.contains("not_seen_yet"), "{}", run.stdout);
    let stuck = clusters
        .causeway(&[
            "clustermesh",
            "status",
            "--context",
            "east",
            "--status-url",
            &url,
            "--wait",
            "--wait-timeout",
            "1s",
        ])
        .await?;
    assert!(!stuck.ok && stuck.stderr.contains("1/2 remotes ready; waiting for north not_seen_yet"), "{stuck:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_script_installs_agent_and_certificates_and_uninstalls() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east"]).await?;
    let missing = clusters.causeway(&["external-workload", "install", "vm-1", "--context", "east"]).await?;
    assert!(!missing.ok && missing.stderr.contains("run `causeway clustermesh enable"), "{missing:?}");
    let bad = clusters.causeway(&["external-workload", "install", "vm;reboot", "--context", "east"]).await?;
    assert!(!bad.ok && bad.stderr.contains("is invalid"), "{bad:?}");

    clusters
        .causeway(&["clustermesh", "enable", "--context", "east", "--cluster-name", "east", "--cluster-id", "1"])
        .await?
        .expect_ok("enable");
    let tmp = tempfile::tempdir()?;
    let agent = tmp.path().join("causeway-node-agent");
    std::fs::write(&agent, "#!/bin/sh\necho fake agent\n")?;
    let agent_s = agent.display().to_string();
    let script = clusters
        .causeway(&[
            "external-workload",
            "install",
            "vm-1",
            "--context",
            "east",
            "--agent-binary",
            &agent_s,
            "--identity-sync-addr",
            "10.0.0.5:9890",
        ])
        .await?
        .expect_ok("install")
        .stdout;
    assert!(script.starts_with("#!/usr/bin/env bash"), "{script}");
    assert!(script.contains("NOT done yet"), "the script must say what it does not do");
    let path = tmp.path().join("join.sh");
    std::fs::write(&path, &script)?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root)?;

    let run = tokio::process::Command::new("bash")
        .arg(&path)
        .env("CAUSEWAY_JOIN_ROOT", &root)
        .env("CAUSEWAY_NODE_IP", "192.0.2.50")
        .output()
        .await?;
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(out.contains("causeway-join: installing the node agent"), "{out}");
    assert!(out.contains("not starting the agent"), "{out}");

    use std::os::unix::fs::PermissionsExt;
    let installed = root.join("usr/local/bin/causeway-node-agent");
    assert_eq!(std::fs::read(&installed)?, std::fs::read(&agent)?);
    assert_eq!(std::fs::metadata(&installed)?.permissions().mode() & 0o777, 0o755);
    let certs = root.join("etc/causeway/certs");
    let key = certs.join("tls.key");
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let ca = std::fs::read_to_string(certs.join("ca.crt"))?;
    let cert = std::fs::read_to_string(certs.join("tls.crt"))?;
    assert!(causeway::clustermesh::verifies_against(&cert, &ca), "the written certificate is not signed by the CA");
    // The written bundle is the Secret's, byte for byte.
    let secret =
        kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(clusters.client("east").await?, "causeway")
            .get(causeway::clustermesh::EXTERNAL_WORKLOAD_SECRET)
            .await?;
    let data = secret.data.unwrap_or_default();
    assert_eq!(data.get("tls.key").map(|b| b.0.clone()), Some(std::fs::read(&key)?));
    assert_eq!(data.get("tls.crt").map(|b| b.0.clone()), Some(cert.into_bytes()));
    let env = std::fs::read_to_string(root.join("etc/causeway/node-agent.env"))?;
    assert_eq!(
        env,
        "CAUSEWAY_NODE_NAME=vm-1\nCAUSEWAY_NODE_IP=192.0.2.50\nCAUSEWAY_IDENTITY_SYNC_ADDR=10.0.0.5:9890\n"
    );
    let join = std::fs::read_to_string(root.join("etc/causeway/join.env"))?;
    assert!(join.contains("CAUSEWAY_CLUSTER_NAME=east\nCAUSEWAY_CLUSTER_ID=1\n"), "{join}");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/causeway-node-agent.service"))?;
    assert!(unit.contains("ExecStart=/usr/local/bin/causeway-node-agent"), "{unit}");

    let run = tokio::process::Command::new("bash")
        .arg(&path)
        .arg("uninstall")
        .env("CAUSEWAY_JOIN_ROOT", &root)
        .output()
        .await?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!installed.exists() && !root.join("etc/causeway").exists());
    assert!(!root.join("etc/systemd/system/causeway-node-agent.service").exists());
    Ok(())
}

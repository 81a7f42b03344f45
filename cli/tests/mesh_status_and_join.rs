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

/// A stand-in for `causeway-node-agent` on the host: records each invocation's arguments (one line each) in
/// `$AGENT_LOG` and, for `register`, writes the EnvironmentFile the real one writes (contract in workload.proto /
/// the node agent's `register`). The real binaries run in tests/external-workload's netns end-to-end test.
const FAKE_AGENT: &str = r#"#!/bin/bash
echo "$*" >> "$AGENT_LOG"
if [ "$1" = register ]; then
  while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
  printf 'CAUSEWAY_WORKLOAD_IDENTITY=70001\nCAUSEWAY_MESH_IPV4=10.192.1.1\nCAUSEWAY_SERVICE_CIDRS=10.96.0.0/12\nCAUSEWAY_CLUSTER_DNS=10.96.0.10\nCAUSEWAY_CLUSTER_DOMAIN=cluster.local\nCAUSEWAY_HOME_CLUSTER=east\n' > "$out"
fi
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_script_writes_everything_under_root_registers_and_uninstalls() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east"]).await?;
    let missing = clusters.causeway(&["external-workload", "install", "vm-1", "--context", "east"]).await?;
    assert!(!missing.ok && missing.stderr.contains("run `causeway clustermesh enable"), "{missing:?}");
    let bad = clusters.causeway(&["external-workload", "install", "vm;reboot", "--context", "east"]).await?;
    assert!(!bad.ok && bad.stderr.contains("is invalid"), "{bad:?}");
    let bad = clusters
        .causeway(&["external-workload", "install", "vm-1", "--context", "east", "--etcd-endpoint", "https://x:1;id"])
        .await?;
    assert!(!bad.ok && bad.stderr.contains("--etcd-endpoint"), "{bad:?}");

    // The apiserver Service as the chart makes it (etcd and workloads ports), behind a load balancer.
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "clustermesh-apiserver", "namespace": "causeway"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5",
                 "ports": [{"name": "etcd", "port": 2379}, {"name": "workloads", "port": 9965}]}
    }))?;
    let services = kube::Api::namespaced(clusters.client("east").await?, "causeway");
    services.create(&Default::default(), &svc).await?;
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}}});
    services.patch_status("clustermesh-apiserver", &Default::default(), &kube::api::Patch::Merge(status)).await?;
    clusters
        .causeway(&["clustermesh", "enable", "--context", "east", "--cluster-name", "east", "--cluster-id", "1"])
        .await?
        .expect_ok("enable");
    let tmp = tempfile::tempdir()?;
    let agent = tmp.path().join("causeway-node-agent");
    let sync = tmp.path().join("identity-sync");
    std::fs::write(&agent, FAKE_AGENT)?;
    std::fs::write(&sync, "#!/bin/sh\necho fake identity-sync\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
    let (agent_s, sync_s) = (agent.display().to_string(), sync.display().to_string());
    let install = clusters
        .causeway(&[
            "external-workload",
            "install",
            "vm-1",
            "--context",
            "east",
            "--agent-binary",
            &agent_s,
            "--identity-sync-binary",
            &sync_s,
        ])
        .await?
        .expect_ok("install");
    // The load balancer's address is in the server certificate (enable ran after the Service had it): no warning.
    assert!(!install.stderr.contains("warning"), "{}", install.stderr);
    let script = install.stdout;
    // An override the certificate does not cover is fine: the host verifies it by the name clustermesh-apiserver.
    let other = clusters
        .causeway(&[
            "external-workload",
            "install",
            "vm-1",
            "--context",
            "east",
            "--etcd-endpoint",
            "https://203.0.113.9:2379",
        ])
        .await?
        .expect_ok("install with --etcd-endpoint");
    assert!(!other.stderr.contains("warning"), "{}", other.stderr);
    assert!(other.stdout.contains("DEFAULT_ETCD_ENDPOINT='https://203.0.113.9:2379'"), "{}", other.stdout);
    assert!(script.starts_with("#!/usr/bin/env bash"), "{script}");
    assert!(script.contains("DEFAULT_ETCD_ENDPOINT='https://198.51.100.4:2379'"), "{script}");
    assert!(script.contains("DEFAULT_WORKLOADS_ENDPOINT='https://198.51.100.4:9965'"), "{script}");
    let path = tmp.path().join("join.sh");
    std::fs::write(&path, &script)?;
    let root = tmp.path().join("root");
    std::fs::create_dir(&root)?;
    let agent_log = tmp.path().join("agent.log");
    let run_script = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&path)
            .args(args)
            .env("CAUSEWAY_JOIN_ROOT", &root)
            .env("CAUSEWAY_NODE_IP", "192.0.2.50")
            .env("AGENT_LOG", &agent_log);
        cmd
    };

    let run = run_script(&[]).output().await?;
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    for line in [
        "causeway-join: installing the node agent",
        "causeway-join: installing identity-sync",
        "causeway-join: registering with the clustermesh-apiserver at https://198.51.100.4:9965",
        "causeway-join: registered: identity 70001, mesh address 10.192.1.1, cluster DNS 10.96.0.10",
        "causeway-join: not starting the services",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }

    let r = root.display().to_string();
    let calls = std::fs::read_to_string(&agent_log)?;
    let register = calls.lines().find(|l| l.starts_with("register")).unwrap_or_default();
    assert_eq!(
        register,
        format!(
            "register --name vm-1 --apiserver https://198.51.100.4:9965 --ca {r}/etc/causeway/certs/ca.crt --cert \
             {r}/etc/causeway/certs/tls.crt --key {r}/etc/causeway/certs/tls.key --node-ip 192.0.2.50 --state-dir \
             {r}/var/lib/causeway --out {r}/etc/causeway/workload.env --timeout 2m"
        )
    );
    assert_eq!(calls.lines().count(), 1, "only registration runs under a scratch root: {calls}");

    let installed = root.join("usr/local/bin/causeway-node-agent");
    assert_eq!(std::fs::read(&installed)?, std::fs::read(&agent)?);
    assert_eq!(std::fs::metadata(&installed)?.permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::read(root.join("usr/local/bin/causeway-identity-sync"))?, std::fs::read(&sync)?);
    let certs = root.join("etc/causeway/certs");
    let key = certs.join("tls.key");
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let ca = std::fs::read_to_string(certs.join("ca.crt"))?;
    let cert = std::fs::read_to_string(certs.join("tls.crt"))?;
    assert!(causeway::clustermesh::verifies_against(&cert, &ca), "the written certificate is not signed by the CA");
    let secret =
        kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(clusters.client("east").await?, "causeway")
            .get(causeway::clustermesh::EXTERNAL_WORKLOAD_SECRET)
            .await?;
    let data = secret.data.unwrap_or_default();
    assert_eq!(data.get("tls.key").map(|b| b.0.clone()), Some(std::fs::read(&key)?));
    assert_eq!(data.get("tls.crt").map(|b| b.0.clone()), Some(cert.into_bytes()));

    // identity-sync's remotes dir: one file named after the home cluster, read by identity-sync's own parser.
    let remotes = root.join("etc/causeway/remotes");
    let scan = identity_sync::remotes::config::scan_dir(&remotes)?;
    assert_eq!(scan.keys().map(|k| k.to_string()).collect::<Vec<_>>(), vec!["east".to_string()]);
    let east = scan.get("east").and_then(|r| r.as_ref().ok()).expect("the remote config parses");
    assert_eq!(east.endpoints, vec!["https://198.51.100.4:2379".to_string()]);
    let tls = east.tls.as_ref().expect("TLS files");
    assert_eq!(tls.key_pem, std::fs::read(&key)?);
    assert_eq!(tls.server_name.as_deref(), Some("clustermesh-apiserver"), "etcd verified by name, not address");

    let env = std::fs::read_to_string(root.join("etc/causeway/node-agent.env"))?;
    for line in [
        "CAUSEWAY_NODE_NAME=vm-1",
        "CAUSEWAY_NODE_IP=192.0.2.50",
        "CAUSEWAY_IDENTITY_SYNC_ADDR=http://127.0.0.1:9890",
        "CAUSEWAY_WIREGUARD_INTERFACE=cw_wg",
        &format!("CAUSEWAY_STATE_DIR={r}/var/lib/causeway"),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from node-agent.env:\n{env}");
    }
    let sync_env = std::fs::read_to_string(root.join("etc/causeway/identity-sync.env"))?;
    for line in [
        "CAUSEWAY_CLUSTER_NAME=east",
        "CAUSEWAY_CLUSTER_ID=1",
        &format!("CAUSEWAY_REMOTES_DIR={r}/etc/causeway/remotes"),
        "CAUSEWAY_GRPC_ADDR=127.0.0.1:9890",
    ] {
        assert!(sync_env.lines().any(|l| l == line), "{line} missing from identity-sync.env:\n{sync_env}");
    }
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/causeway-node-agent.service"))?;
    assert!(unit.contains(&format!("EnvironmentFile={r}/etc/causeway/workload.env")), "{unit}");
    assert!(unit.contains("--identity-sync-addr http://127.0.0.1:9890 --wireguard-interface cw_wg"), "{unit}");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/causeway-identity-sync.service"))?;
    assert!(unit.contains("causeway-identity-sync --external-workload"), "{unit}");

    // DNS: the host's resolv.conf was copied under the root, backed up, and rewritten with the cluster DNS first.
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv = std::fs::read_to_string(root.join("etc/resolv.conf"))?;
    let nameservers: Vec<&str> = resolv.lines().filter(|l| l.starts_with("nameserver")).collect();
    assert_eq!(nameservers.first().copied(), Some("nameserver 10.96.0.10"), "{resolv}");
    assert!(nameservers.len() <= 3, "glibc reads at most 3 nameservers: {resolv}");
    assert!(resolv.lines().any(|l| l.starts_with("search svc.cluster.local cluster.local")), "{resolv}");
    assert_eq!(std::fs::read_to_string(root.join("etc/causeway/resolv.conf.orig"))?, host_resolv);

    // Running it again keeps the first backup (not the rewritten file).
    let again = run_script(&[]).output().await?;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read_to_string(root.join("etc/causeway/resolv.conf.orig"))?, host_resolv);
    assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf"))?, resolv);

    std::fs::write(&agent_log, "")?;
    let run = run_script(&["uninstall"]).output().await?;
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    let calls = std::fs::read_to_string(&agent_log)?;
    assert_eq!(calls.trim(), "--uninstall --wireguard-interface cw_wg", "{out}");
    assert!(out.contains("restoring"), "{out}");
    assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf"))?, host_resolv);
    for gone in [
        "usr/local/bin/causeway-node-agent",
        "usr/local/bin/causeway-identity-sync",
        "etc/causeway",
        "var/lib/causeway",
        "etc/systemd/system/causeway-node-agent.service",
        "etc/systemd/system/causeway-identity-sync.service",
    ] {
        assert!(!root.join(gone).exists(), "{gone} is still there after uninstall");
    }
    Ok(())
}

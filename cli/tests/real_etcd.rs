//! The certificates `enable`, `connect` and `rotate-certs` write work with a real etcd: east's etcd serves the
//! server certificate from east's Secret with `--client-cert-auth`, and west connects to it exactly as its
//! identity-sync would (peer config parsed by identity-sync's reader, client certificate `remote-west`). After
//! `rotate-certs`, the same etcd serves the renewed certificate on new connections without a restart, and west's
//! existing client certificate keeps working: the no-downtime claim of docs/cli.md.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causeway::clustermesh::{ADMIN_SECRET, CONFIG_MAP, REMOTES_SECRET, SERVER_SECRET};
use causeway_kvstore::{EtcdConfig, TlsConfig};
use common::Clusters;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const NS: &str = "causeway";

/// A real etcd process, killed when dropped (also on panic).
struct EtcdProc(Child);

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or_else(|e| panic!("{e}"))
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("CAUSEWAY_ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// Starts etcd serving `tls_dir/{tls.crt,tls.key}` and trusting `tls_dir/ca.crt` for client certificates.
async fn start_etcd(dir: &Path, tls_dir: &Path, client_port: u16) -> anyhow::Result<EtcdProc> {
    let peer = format!("http://127.0.0.1:{}", free_port());
    let url = format!("https://127.0.0.1:{client_port}");
    // Also on LATE_LB_IP: an address the server certificate does not name (see the first test).
    let listen = format!("{url},https://{LATE_LB_IP}:{client_port}");
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let child = Command::new(etcd_bin())
        .args([
            "--name=east".to_string(),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={listen}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=east={peer}"),
            format!("--cert-file={}", tls_dir.join("tls.crt").display()),
            format!("--key-file={}", tls_dir.join("tls.key").display()),
            format!("--trusted-ca-file={}", tls_dir.join("ca.crt").display()),
            "--client-cert-auth".to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let etcd = EtcdProc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", client_port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "etcd did not listen: {}",
            std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(etcd)
}

async fn secret_files(client: &Client, name: &str, dir: &Path) -> anyhow::Result<()> {
    let s = Api::<Secret>::namespaced(client.clone(), NS).get(name).await?;
    std::fs::create_dir_all(dir)?;
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v.0)?;
    }
    Ok(())
}

async fn lb_service(client: &Client, ip: &str, port: u16) -> anyhow::Result<()> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "clustermesh-apiserver", "namespace": NS},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50", "ports": [{"name": "etcd", "port": port}]}
    }))?;
    let api = Api::<Service>::namespaced(client.clone(), NS);
    api.create(&PostParams::default(), &svc).await?;
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
    api.patch_status("clustermesh-apiserver", &PatchParams::default(), &Patch::Merge(status)).await?;
    Ok(())
}

/// A load-balancer address east's Service gets only after `enable` issued the server certificate.
const LATE_LB_IP: &str = "127.0.0.3";

/// West's view of east, as identity-sync loads it from the mounted remotes Secret (TLS settings built by
/// identity-sync's own code, `tls-server-name` included).
async fn west_config_for_east(west: &Client, dir: &Path) -> anyhow::Result<EtcdConfig> {
    secret_files(west, REMOTES_SECRET, dir).await?;
    let scan = identity_sync::remotes::config::scan_dir(dir)?;
    let cfg = match scan.get("east") {
        Some(Ok(cfg)) => cfg.clone(),
        other => anyhow::bail!("identity-sync cannot use west's config for east: {other:?}"),
    };
    let tls = cfg.tls.ok_or_else(|| anyhow::anyhow!("no TLS in west's config for east"))?;
    let tls = tls.to_kvstore().map_err(|what| anyhow::anyhow!("{what} is not UTF-8"))?;
    Ok(EtcdConfig::new(cfg.endpoints).with_connect_timeout(Duration::from_secs(5)).with_tls(tls))
}

/// The certificate etcd presents on a fresh connection (PEM, as printed by `openssl s_client`).
fn served_certificate(port: u16, client_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(client_dir.join("east.ca.crt"))
        .arg("-cert")
        .arg(client_dir.join("east.crt"))
        .arg("-key")
        .arg(client_dir.join("east.key"))
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----").ok_or_else(|| anyhow::anyhow!("no certificate:\n{text}"))?;
    let end = text[start..].find("-----END CERTIFICATE-----").map(|e| start + e + 25).unwrap_or(text.len());
    Ok(text[start..end].to_string())
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_etcd_accepts_connect_certificates_and_serves_rotated_ones_without_restart() -> anyhow::Result<()> {
    if !etcd_bin().is_file() {
        // etcd is a hard requirement of the workspace's tests (scripts/install-deps.sh); fail loudly.
        panic!("etcd not found at {} (run scripts/install-deps.sh or set CAUSEWAY_ETCD_BIN)", etcd_bin().display());
    }
    let tmp = tempfile::tempdir()?;
    let clusters = Clusters::start(&["east", "west"]).await?;
    let (east, west) = (clusters.client("east").await?, clusters.client("west").await?);
    let port = free_port();
    // east's apiserver Service points at the etcd started below; west's is never dialled here.
    lb_service(&east, "127.0.0.1", port).await?;
    lb_service(&west, "127.0.0.2", 2379).await?;
    for (ctx, id) in [("east", "1"), ("west", "2")] {
        clusters
            .causeway(&["clustermesh", "enable", "--context", ctx, "--cluster-name", ctx, "--cluster-id", id])
            .await?
            .expect_ok("enable");
    }
    // The load balancer's address changes after the certificate was issued (it does not name it): peers verify
    // the certificate by the name `clustermesh-apiserver` (tls-server-name), not by the address they dial.
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": LATE_LB_IP}]}}});
    Api::<Service>::namespaced(east.clone(), NS)
        .patch_status("clustermesh-apiserver", &PatchParams::default(), &Patch::Merge(status))
        .await?;
    clusters
        .causeway(&["clustermesh", "connect", "--context", "west", "--destination-context", "east"])
        .await?
        .expect_ok("connect");

    // east's etcd, with its server certificate "mounted" from the Secret.
    let tls_dir = tmp.path().join("east-server");
    secret_files(&east, SERVER_SECRET, &tls_dir).await?;
    let _etcd = start_etcd(tmp.path(), &tls_dir, port).await?;

    // west reaches it as identity-sync would, and can read and write (no etcd auth users in this test).
    let remotes_dir = tmp.path().join("west-remotes");
    let config = west_config_for_east(&west, &remotes_dir).await?;
    assert_eq!(config.endpoints, vec![format!("https://{LATE_LB_IP}:{port}")]);
    // Verified by address, the certificate does not match: the check below can fail.
    let mut by_address = config.clone();
    if let Some(t) = by_address.tls.as_mut() {
        t.server_name = None;
    }
    let by_address = by_address.with_connect_timeout(Duration::from_secs(3));
    assert!(causeway_kvstore::connect(&by_address).await.is_err(), "the server certificate names {LATE_LB_IP}");
    let mut client = causeway_kvstore::connect(&config).await?;
    client.put("cilium/.heartbeat", "2026-11-23T10:00:00Z", None).await?;
    assert_eq!(client.get("cilium/.heartbeat", None).await?.kvs().len(), 1);

    // A client certificate from another CA is refused: client-certificate auth is really on.
    let other = causeway_pki::CertificateAuthority::generate("intruder-ca")?.issue_client("remote-west")?;
    let east_ca = std::fs::read_to_string(tls_dir.join("ca.crt"))?;
    let intruder = EtcdConfig::new(config.endpoints.clone())
        .with_connect_timeout(Duration::from_secs(3))
        .with_tls(TlsConfig::from_pem(east_ca, other.cert_pem, other.key_pem));
    assert!(causeway_kvstore::connect(&intruder).await.is_err(), "etcd accepted a certificate from another CA");

    let before = std::fs::read_to_string(tls_dir.join("tls.crt"))?;
    assert_eq!(pem_body(&served_certificate(port, &remotes_dir)?), pem_body(&before));

    // Rotate east, and update the files in place as kubelet does for a mounted Secret. etcd is not restarted.
    clusters.causeway(&["clustermesh", "rotate-certs", "--context", "east"]).await?.expect_ok("rotate-certs");
    secret_files(&east, SERVER_SECRET, &tls_dir).await?;
    let after = std::fs::read_to_string(tls_dir.join("tls.crt"))?;
    assert_ne!(pem_body(&after), pem_body(&before), "rotate-certs did not renew the server certificate");
    assert_eq!(pem_body(&served_certificate(port, &remotes_dir)?), pem_body(&after), "etcd serves the old certificate");

    // The connection opened before the rotation still works, and so does a new one with west's unchanged
    // client certificate and CA.
    client.put("cilium/.heartbeat", "2026-11-23T10:01:00Z", None).await?;
    let mut fresh = causeway_kvstore::connect(&west_config_for_east(&west, &tmp.path().join("again")).await?).await?;
    assert_eq!(
        fresh.get("cilium/.heartbeat", None).await?.kvs().first().map(|kv| kv.value().to_vec()),
        Some(b"2026-11-23T10:01:00Z".to_vec())
    );
    Ok(())
}

/// The node east exports in the test below.
const EAST_NODE_KEY: &str = "cilium/state/nodes/v1/east/east-node-1";

/// How a read of east's exported node as a peer ends: the number of keys, or etcd's error.
async fn peer_read(client: &causeway_kvstore::Client) -> Result<usize, String> {
    let mut c = client.clone();
    let read = c.get(EAST_NODE_KEY, None);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(r) => r.map(|r| r.kvs().len()).map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `connect` then `disconnect`, with east's apiserver peer task (clustermesh_apiserver::peers, the code the binary
/// runs with --peers-configmap) following east's `causeway-config`: the certificate `connect` issues to west reads
/// east's etcd as soon as `connect` returns, with nothing restarted, and is refused after `disconnect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_lets_the_peer_read_and_disconnect_revokes_it_without_restart() -> anyhow::Result<()> {
    if !etcd_bin().is_file() {
        panic!("etcd not found at {} (run scripts/install-deps.sh or set CAUSEWAY_ETCD_BIN)", etcd_bin().display());
    }
    let tmp = tempfile::tempdir()?;
    let clusters = Clusters::start(&["east", "west"]).await?;
    let (east, west) = (clusters.client("east").await?, clusters.client("west").await?);
    let port = free_port();
    lb_service(&east, "127.0.0.1", port).await?;
    lb_service(&west, "127.0.0.2", 2379).await?;
    for (ctx, id) in [("east", "1"), ("west", "2")] {
        clusters
            .causeway(&["clustermesh", "enable", "--context", ctx, "--cluster-name", ctx, "--cluster-id", id])
            .await?
            .expect_ok("enable");
    }
    let tls_dir = tmp.path().join("east-server");
    secret_files(&east, SERVER_SECRET, &tls_dir).await?;
    let _etcd = start_etcd(tmp.path(), &tls_dir, port).await?;

    // east's apiserver: etcd root with the admin certificate `enable` issued, and something exported.
    let admin_dir = tmp.path().join("east-admin");
    secret_files(&east, ADMIN_SECRET, &admin_dir).await?;
    let read = |f: &str| std::fs::read_to_string(admin_dir.join(f));
    let root_cfg = EtcdConfig::new([format!("https://127.0.0.1:{port}")]).with_tls(TlsConfig::from_pem(
        read("ca.crt")?,
        read("tls.crt")?,
        read("tls.key")?,
    ));
    let mut root = causeway_kvstore::connect(&root_cfg).await?;
    root.put(EAST_NODE_KEY, "{}", None).await?;
    let (current, _) = tokio::sync::watch::channel(Vec::new());
    let (_resets_tx, resets) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(clustermesh_apiserver::peers::run(clustermesh_apiserver::peers::PeerTask {
        kube: east.clone(),
        config_map: format!("{NS}/{CONFIG_MAP}").parse().map_err(anyhow::Error::msg)?,
        etcd: root.clone(),
        cluster: "east".into(),
        // A peer given with --peers: etcd auth is on before west connects, as on a meshed cluster.
        floor: vec!["north".into()],
        metrics: clustermesh_apiserver::peers::PeerMetrics::default(),
        current,
        resets,
    }));
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _task = Abort(task);
    let users = |mut c: causeway_kvstore::Client| async move {
        c.user_list().await.map(|u| u.users().to_vec()).unwrap_or_default()
    };
    wait_for("the peer task turned on auth with remote-north", async || {
        users(root.clone()).await.iter().any(|u| u == "remote-north")
    })
    .await?;
    assert!(!users(root.clone()).await.iter().any(|u| u == "remote-west"), "remote-west exists before connect");

    clusters
        .causeway(&["clustermesh", "connect", "--context", "west", "--destination-context", "east"])
        .await?
        .expect_ok("connect");
    // West's identity-sync, with the certificate connect issued: reads once the user exists; nothing restarted.
    let config = west_config_for_east(&west, &tmp.path().join("west-remotes")).await?;
    let west_client = causeway_kvstore::connect(&config).await?;
    wait_for("west reads east's exported state after connect", async || peer_read(&west_client).await == Ok(1)).await?;

    clusters
        .causeway(&["clustermesh", "disconnect", "--context", "west", "--destination-context", "east"])
        .await?
        .expect_ok("disconnect");
    wait_for(
        "west is refused after disconnect",
        async || matches!(peer_read(&west_client).await, Err(e) if e.contains("permission denied")),
    )
    .await?;
    let users = users(root.clone()).await;
    assert!(!users.iter().any(|u| u == "remote-west"), "{users:?}");
    for u in ["root", "admin-east", "remote-north"] {
        assert!(users.iter().any(|x| x == u), "{u} missing: {users:?}");
    }
    Ok(())
}

//! Peers connected and disconnected while the apiserver runs: the clustermesh-apiserver binary with
//! `--peers-configmap` against a real etcd with mTLS and auth, and the fake kube API (the one test stand-in). Writing
//! the ConfigMap's `peers` as `causeway clustermesh connect`/`disconnect` do makes a new peer's `remote-<peer>`
//! certificate able to read the exported state, and removing it refuses that certificate, with no restart; other
//! peers keep reading, a bad name is skipped without a crash, and a change made while etcd is down is retried
//! until it is back.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_crds::CausewayIdentity;
use causeway_pki::{users, Pki};
use causeway_testsupport::{wait_until, Etcd};
use fake_kube_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::CustomResourceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "causeway";
const CONFIG_MAP: &str = "causeway-config";
/// The node record the apiserver (cluster `west`) exports for the test's Node: what a peer's identity-sync reads.
const NODE_KEY: &str = "cilium/state/nodes/v1/west/west-node-1";
const WG_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Kills the apiserver when the test ends, however it ends.
struct Apiserver(Child);

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Apiserver {
    fn still_running(&mut self) -> Result<()> {
        match self.0.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("clustermesh-apiserver exited: {status}"),
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The body of `GET /metrics`, or None if the server does not answer yet.
async fn metrics(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The value of an un-labelled metric.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let body = metrics(port).await?;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// How a read of the exported state as one peer user ends: the number of keys, or etcd's error.
async fn read_state(client: &etcd_client::Client) -> Result<usize, String> {
    let mut c = client.clone();
    let attempt = c.get("cilium/state/", Some(etcd_client::GetOptions::new().with_prefix()));
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(r)) => Ok(r.kvs().iter().filter(|kv| kv.key() == NODE_KEY.as_bytes()).count()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// A new connection as `user`, then a read: how a peer's identity-sync reconnecting would fare.
async fn read_fresh(etcd: &Etcd, user: &str) -> Result<usize, String> {
    match etcd_client::Client::connect(etcd.endpoints(), Some(etcd.connect_options_for(user))).await {
        Ok(c) => read_state(&c).await,
        Err(e) => Err(e.to_string()),
    }
}

fn refused(r: &Result<usize, String>) -> bool {
    matches!(r, Err(e) if e.contains("permission denied"))
}

async fn set_peers(api: &Api<ConfigMap>, peers: &str) -> Result<()> {
    let mut cm = api.get(CONFIG_MAP).await?;
    cm.data.get_or_insert_with(BTreeMap::new).insert("peers".into(), peers.into());
    api.replace(CONFIG_MAP, &PostParams::default(), &cm).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_users_follow_connect_and_disconnect_without_a_restart() -> Result<()> {
    let pki = Pki::loopback()?;
    let mut etcd = Etcd::start_tls(&pki).await;
    let kube = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&kube.kubeconfig_yaml())?;
    let client =
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    let dir = tempfile::tempdir()?;
    let kubeconfig_path = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig_path)?;

    let pp = PostParams::default();
    Api::<CustomResourceDefinition>::all(client.clone()).create(&pp, &CausewayIdentity::crd()).await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &Namespace { metadata: ObjectMeta { name: Some(NS.into()), ..Default::default() }, ..Default::default() },
        )
        .await?;
    Api::<Node>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "west-node-1", "annotations": {"causeway.io/wireguard-pub-key": WG_KEY}},
                "spec": {"podCIDRs": ["10.2.1.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.20.11"}]}
            }))?,
        )
        .await?;
    // What `causeway clustermesh enable` and a first `connect` leave behind.
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    config_maps
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": CONFIG_MAP, "namespace": NS},
                "data": {"cluster-name": "west", "cluster-id": "2", "max-connected-clusters": "255", "peers": "east"}
            }))?,
        )
        .await?;
    // Another ConfigMap in the namespace must not count.
    config_maps
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": "unrelated", "namespace": NS}, "data": {"peers": "north"}}),
            )?,
        )
        .await?;

    // The apiserver runs as etcd's root user, as in the chart.
    let root = etcd.client_tls_for(users::ROOT).write_bundle(&dir.path().join("etcd-root"))?;
    let metrics_port = free_port()?;
    let mut apiserver = Apiserver(
        Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .env("CAUSEWAY_CLUSTER_NAME", "west")
            .env("CAUSEWAY_CLUSTER_ID", "2")
            .env("CAUSEWAY_PEERS_CONFIGMAP", format!("{NS}/{CONFIG_MAP}"))
            .env_remove("CAUSEWAY_PEERS")
            .arg("--etcd-endpoints")
            .arg(etcd.endpoint())
            .arg("--etcd-ca")
            .arg(&root.ca)
            .arg("--etcd-cert")
            .arg(&root.cert)
            .arg("--etcd-key")
            .arg(&root.key)
            .arg("--kubeconfig")
            .arg(&kubeconfig_path)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting clustermesh-apiserver")?,
    );

    // Peer clients, connected once and kept, as a peer's identity-sync keeps its connection.
    let east = etcd_client::Client::connect(etcd.endpoints(), Some(etcd.connect_options_for("remote-east"))).await?;
    let south = etcd_client::Client::connect(etcd.endpoints(), Some(etcd.connect_options_for("remote-south"))).await?;

    // "east": its user reads the exported node; south is not a peer yet.
    // (etcd auth is turned on with the first peer, so south is refused only from then.)
    let ok =
        wait_until(WAIT, || async { read_state(&east).await == Ok(1) && refused(&read_state(&south).await) }).await;
    apiserver.still_running()?;
    anyhow::ensure!(
        ok,
        "remote-east should read {NODE_KEY} ({:?}) and remote-south be refused ({:?})",
        read_state(&east).await,
        read_state(&south).await
    );
    anyhow::ensure!(
        refused(&read_fresh(&etcd, "remote-north").await),
        "a peer named only in another ConfigMap was given a user"
    );

    // connect → "east,south": south reads on its open connection and on a new one, without a restart.
    set_peers(&config_maps, "east,south").await?;
    let ok = wait_until(WAIT, || async { read_state(&south).await == Ok(1) }).await;
    apiserver.still_running()?;
    anyhow::ensure!(ok, "remote-south never read after connect: {:?}", read_state(&south).await);
    assert_eq!(read_fresh(&etcd, "remote-south").await, Ok(1));
    assert_eq!(read_state(&east).await, Ok(1));
    let ok =
        wait_until(WAIT, || async { metric(metrics_port, "causeway_apiserver_peer_users").await == Some(2.0) }).await;
    anyhow::ensure!(ok, "peer_users metric: {:?}", metric(metrics_port, "causeway_apiserver_peer_users").await);

    // disconnect → "east": south is refused, on its open connection and on a new one; east keeps reading.
    set_peers(&config_maps, "east").await?;
    let ok = wait_until(WAIT, || async { refused(&read_state(&south).await) }).await;
    apiserver.still_running()?;
    anyhow::ensure!(ok, "remote-south still reads after disconnect: {:?}", read_state(&south).await);
    let r = read_fresh(&etcd, "remote-south").await;
    anyhow::ensure!(refused(&r), "a new remote-south connection reads after disconnect: {r:?}");
    assert_eq!(read_state(&east).await, Ok(1), "remote-east lost access when south was removed");

    // A bad name is skipped and counted; the process keeps running and the good names keep working.
    set_peers(&config_maps, "east,Not_A_Cluster!,south").await?;
    let ok = wait_until(WAIT, || async { read_state(&south).await == Ok(1) }).await;
    apiserver.still_running()?;
    anyhow::ensure!(ok, "remote-south never read after re-connect beside a bad name: {:?}", read_state(&south).await);
    assert_eq!(metric(metrics_port, "causeway_apiserver_peer_invalid_names").await, Some(1.0));
    assert_eq!(read_state(&east).await, Ok(1));

    // etcd down while south is disconnected: the attempts fail and are retried with backoff until etcd is back
    // (same data), then south is refused.
    let ok =
        wait_until(WAIT, || async { metric(metrics_port, "causeway_apiserver_peer_users").await == Some(2.0) }).await;
    anyhow::ensure!(ok, "the pass adding south back never completed");
    let errors = "causeway_apiserver_peer_user_errors_total";
    let before = metric(metrics_port, errors).await.unwrap_or(0.0);
    etcd.kill();
    set_peers(&config_maps, "east").await?;
    // A failure, and at least one retry that failed too.
    let ok = wait_until(WAIT, || async { metric(metrics_port, errors).await.unwrap_or(0.0) >= before + 2.0 }).await;
    apiserver.still_running()?;
    anyhow::ensure!(ok, "no retried failure while etcd was down: {:?}", metric(metrics_port, errors).await);
    etcd.restart().await;
    let ok = wait_until(WAIT, || async { refused(&read_fresh(&etcd, "remote-south").await) }).await;
    apiserver.still_running()?;
    anyhow::ensure!(ok, "remote-south still reads after etcd came back: {:?}", read_fresh(&etcd, "remote-south").await);
    assert_eq!(read_fresh(&etcd, "remote-east").await, Ok(1));
    let ok =
        wait_until(WAIT, || async { metric(metrics_port, "causeway_apiserver_peer_users").await == Some(1.0) }).await;
    anyhow::ensure!(
        ok,
        "peer_users after the retried removal: {:?}",
        metric(metrics_port, "causeway_apiserver_peer_users").await
    );

    // The other users were never touched: root (the apiserver itself) still exports.
    let mut root_client = etcd.client().await;
    let users: Vec<String> = root_client.user_list().await?.users().to_vec();
    for u in ["root", "admin-west", "externalworkload", "remote-east"] {
        anyhow::ensure!(users.iter().any(|x| x == u), "user {u} missing: {users:?}");
    }
    anyhow::ensure!(!users.iter().any(|x| x == "remote-south"), "{users:?}");
    apiserver.still_running()?;
    Ok(())
}

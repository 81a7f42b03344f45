//! The node's WireGuard public key on its Node (`causeway.io/wireguard-pub-key`), against the kube API stand-in,
//! read back with clustermesh-apiserver's own Node converter (what it exports into node records), so the two sides
//! cannot drift apart:
//!
//! - the publisher loop writes the key beside the interface annotations, merging with other annotations;
//! - the real binary with `--kubeconfig --wireguard-interface` publishes the public half of its state
//!   directory's key (run with `--dry-run`: no privileges, no interface is created); without
//!   `--wireguard-interface` no key annotation is written.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};
use causeway_datapath::egress::interfaces::{Addr, HostNetwork, Link, PublishFilter};
use causeway_datapath::egress::publish::{self, PublishConfig, PublishMetrics, WIREGUARD_KEY_ANNOTATION};
use causeway_datapath::wireguard::{keyfile, PrivateKey};
use clustermesh_apiserver::kube::convert;
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

async fn client(server: &FakeApiServerHandle) -> Result<kube::Client> {
    let kc = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    Ok(kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)?)
}

async fn create_node(api: &Api<Node>, name: &str) -> Result<()> {
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": {"example.com/keep": "me"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.21"}]}
    }))?;
    api.create(&PostParams::default(), &node).await?;
    Ok(())
}

/// Polls until clustermesh-apiserver's view of the Node carries a WireGuard key; returns it.
async fn exported_key(api: &Api<Node>, name: &str) -> Result<String> {
    for _ in 0..1500 {
        let raw = api.get(name).await?;
        if let Some(k) = convert::node_input(&raw).wireguard_pub_key {
            return Ok(k);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("node {name} never carried {WIREGUARD_KEY_ANNOTATION}")
}

#[tokio::test]
async fn the_publisher_writes_the_key_clustermesh_apiserver_exports() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = client(&server).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    create_node(&nodes, "node-a").await?;
    let key = PrivateKey::generate().public_key();
    let network = HostNetwork {
        links: vec![Link { index: 2, name: "eth0".into(), loopback: false, mac: Some([2, 0, 0, 0, 0, 1]) }],
        addrs: vec![Addr { index: 2, ip: "192.168.10.21".parse()?, prefix_len: 24 }],
        default_routes: Vec::new(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(publish::run(
        client.clone(),
        PublishConfig {
            node: "node-a".into(),
            filter: PublishFilter::default(),
            interval: Duration::from_millis(20),
            refresh: Duration::from_secs(600),
            wireguard_pub_key: Some(key),
        },
        move || Ok(network.clone()),
        PublishMetrics::default(),
        async {
            let _ = stopped.await;
        },
    ));
    assert_eq!(exported_key(&nodes, "node-a").await?, key.to_base64());
    let raw = nodes.get("node-a").await?;
    let annotations = raw.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("example.com/keep").map(String::as_str), Some("me"), "a merge patch");
    assert!(annotations.contains_key("egress.causeway.io/interfaces"), "interfaces published in the same patch");
    let _ = stop.send(());
    task.await?;
    server.shutdown().await?;
    Ok(())
}

/// The agent binary, killed and reaped on drop.
struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(node: &str, kubeconfig: &std::path::Path, state: &std::path::Path, wg: bool) -> Result<AgentProc> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway-node-agent"));
    cmd.args(["--node-name", node, "--node-ip", "192.168.10.21", "--dry-run"])
        // Nothing listens there: the mesh stream keeps reconnecting, publishing does not wait for it.
        .args(["--identity-sync-addr", "127.0.0.1:1", "--metrics-addr", "127.0.0.1:0", "--probe-addr", "127.0.0.1:0"])
        .args(["--kubeconfig", &kubeconfig.display().to_string(), "--publish-interval", "1"])
        .args(["--state-dir", &state.display().to_string()])
        .env_remove("CAUSEWAY_WIREGUARD_INTERFACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if wg {
        cmd.args(["--wireguard-interface", "cwwg-unused"]);
    }
    Ok(AgentProc(cmd.spawn()?))
}

#[tokio::test]
async fn the_binary_publishes_its_state_dir_key_only_with_a_wireguard_interface() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = client(&server).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    create_node(&nodes, "with-wg").await?;
    create_node(&nodes, "without-wg").await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    // The key `register` would have created before the agent first ran.
    let key = keyfile::load_or_create(&state.join(keyfile::KEY_FILE))?.public_key();

    let _with = start_agent("with-wg", &kubeconfig, &state, true)?;
    let _without = start_agent("without-wg", &kubeconfig, &dir.path().join("state2"), false)?;
    assert_eq!(exported_key(&nodes, "with-wg").await?, key.to_base64(), "the state dir's key");

    // The other agent published its interfaces, but no key.
    let mut published = false;
    for _ in 0..1500 {
        let a = nodes.get("without-wg").await?.metadata.annotations.unwrap_or_default();
        if a.contains_key("egress.causeway.io/interfaces") {
            assert!(!a.contains_key(WIREGUARD_KEY_ANNOTATION), "no WireGuard interface, no key: {a:?}");
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(published, "the agent without WireGuard never published its interfaces");
    server.shutdown().await?;
    Ok(())
}

//! Interface publishing against the kube API stand-in: the annotations the agent writes on its Node are read back
//! with egress-gw's own parser (`causeway_egress_gw::kube::convert::node`), so the two sides cannot drift apart.
//!
//! - `published_interfaces_round_trip_through_egress_gw_and_follow_changes`: the publisher loop with scripted
//!   address snapshots (no privileges).
//! - `the_binary_publishes_its_netns_interfaces_and_republishes_a_new_address`: the real `causeway-node-agent`
//!   in a network namespace (real netlink dumps), with the stand-in and an egress stream inside the same netns.

mod egress_agent_support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_datapath::egress::interfaces::{Addr, DefaultRoute, HostNetwork, Link, PublishFilter};
use causeway_datapath::egress::publish::{self, PublishConfig, PublishMetrics};
use causeway_egress_gw::kube::convert;
use causeway_testsupport::netns::{self, Netns};
use egress_agent_support::{free_tcp_port, policy, ChildGuard, EgressServer};
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

/// Polls the Node until egress-gw's view of it satisfies `ok`; returns that view.
async fn wait_for_node(
    api: &Api<Node>,
    name: &str,
    what: &str,
    ok: impl Fn(&causeway_egress_gw::core::Node) -> bool,
) -> Result<(Node, causeway_egress_gw::core::Node)> {
    let mut last = None;
    for _ in 0..1500 {
        let raw = api.get(name).await?;
        if let Some(n) = convert::node(&raw) {
            if ok(&n) {
                return Ok((raw, n));
            }
            last = Some(n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("node {name} never showed {what}; last seen by egress-gw: {last:?}")
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().expect("test IP")).collect()
}

#[tokio::test]
async fn published_interfaces_round_trip_through_egress_gw_and_follow_changes() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = client(&server).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    create_node(&nodes, "gw-a").await?;

    let link =
        |index: u32, name: &str| Link { index, name: name.into(), loopback: false, mac: Some([2, 0, 0, 0, 0, 1]) };
    let addr = |index: u32, ip: &str| Addr { index, ip: ip.parse().expect("test IP"), prefix_len: 24 };
    let network = Arc::new(Mutex::new(HostNetwork {
        links: vec![Link { index: 1, name: "lo".into(), loopback: true, mac: None }, link(2, "eth0"), link(3, "eth1")],
        addrs: vec![
            addr(1, "127.0.0.1"),
            addr(2, "192.168.10.21"),
            addr(2, "fe80::1"),
            addr(3, "192.0.2.10"),
            addr(3, "2001:db8::10"),
        ],
        default_routes: vec![DefaultRoute { ipv4: true, index: 2, metric: 0 }],
    }));
    let source = network.clone();
    let metrics = PublishMetrics::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(publish::run(
        client.clone(),
        PublishConfig {
            node: "gw-a".into(),
            filter: PublishFilter::default(),
            interval: Duration::from_millis(20),
            refresh: Duration::from_secs(600),
            wireguard_pub_key: None,
        },
        move || Ok(source.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        metrics.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let (raw, n) = wait_for_node(&nodes, "gw-a", "the published interfaces", |n| !n.interfaces.is_empty()).await?;
    let want: BTreeMap<String, Vec<IpAddr>> =
        [("eth0".to_string(), ips(&["192.168.10.21"])), ("eth1".to_string(), ips(&["192.0.2.10", "2001:db8::10"]))]
            .into();
    assert_eq!(n.interfaces, want, "loopback and link-local left out, both families kept");
    assert_eq!(n.default_interface.as_deref(), Some("eth0"));
    let annotations = raw.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("example.com/keep").map(String::as_str), Some("me"), "a merge patch, not a replace");
    let writes = metrics.published.get();

    // Nothing changes: nothing is written (each write bumps the Node's resourceVersion).
    let rv = nodes.get("gw-a").await?.metadata.resource_version;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(nodes.get("gw-a").await?.metadata.resource_version, rv);
    assert_eq!(metrics.published.get(), writes);

    // The operator adds the egress IP to eth1 and moves the default route: both are re-published.
    {
        let mut net = network.lock().unwrap_or_else(|e| e.into_inner());
        net.addrs.push(addr(3, "192.0.2.99"));
        net.default_routes = vec![DefaultRoute { ipv4: true, index: 3, metric: 0 }];
    }
    let (_, n) = wait_for_node(&nodes, "gw-a", "the added address", |n| {
        n.interfaces.get("eth1").is_some_and(|l| l.contains(&"192.0.2.99".parse().expect("ip")))
    })
    .await?;
    assert_eq!(n.default_interface.as_deref(), Some("eth1"));

    let _ = stop.send(());
    task.await?;
    server.shutdown().await?;
    Ok(())
}

#[test]
fn the_binary_publishes_its_netns_interfaces_and_republishes_a_new_address() -> Result<()> {
    if !netns::privileged("the_binary_publishes_its_netns_interfaces_and_republishes_a_new_address") {
        return Ok(());
    }
    let ns = Netns::new("pubif")?;
    // No dummy module on every kernel: veth pairs inside the namespace stand in for the node's NICs.
    ns.ip("link add eth1 type veth peer name eth1peer")?;
    ns.ip("link set eth1 up")?;
    ns.ip("link set eth1peer up")?;
    ns.ip("addr add 192.0.2.10/24 dev eth1")?;
    ns.ip("-6 addr add 2001:db8::10/64 dev eth1 nodad")?;
    ns.ip("route add default via 192.0.2.1 dev eth1")?;
    // The agent's own VXLAN device (by its --vxlan-device name) and a pod veth: never published.
    ns.ip("link add cw_vxlan type veth peer name vxpeer")?;
    ns.ip("addr add 10.99.0.1/32 dev cw_vxlan")?;
    ns.ip("link add lxc1 type veth peer name lxcpeer")?;
    ns.ip("addr add 10.98.0.1/32 dev lxc1")?;
    let dir = std::env::temp_dir().join(netns::unique_name("cw-pubif"));
    std::fs::create_dir_all(&dir)?;
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RmDir(dir.clone());

    // Everything runs inside the namespace: the stand-in, the egress stream, the agent and the kube client.
    let ns_name = ns.name().to_owned();
    ns.run_in(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
            let kubeconfig = dir.join("kubeconfig");
            server.write_kubeconfig(&kubeconfig)?;
            let nodes: Api<Node> = Api::all(client(&server).await?);
            create_node(&nodes, "gw-a").await?;
            let egress = EgressServer::default();
            egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.0.2.10", &["192.168.10.21"]));
            let egress_addr = egress.serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
            let metrics_port = free_tcp_port()?;
            let _agent = ChildGuard(
                std::process::Command::new(env!("CARGO_BIN_EXE_causeway-node-agent"))
                    .args(["--dry-run", "--node-name", "gw-a", "--node-ip", "192.168.10.21"])
                    .args(["--egress-addr", &egress_addr.to_string()])
                    .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}"), "--probe-addr", "127.0.0.1:0"])
                    .args(["--pod-interface-prefix", "lxc", "--publish-interval", "1"])
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .env_remove("CAUSEWAY_IDENTITY_SYNC_ADDR")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("starting the agent")?,
            );
            let (_, n) =
                wait_for_node(&nodes, "gw-a", "the published interfaces", |n| !n.interfaces.is_empty()).await?;
            let want: BTreeMap<String, Vec<IpAddr>> =
                [("eth1".to_string(), ips(&["192.0.2.10", "2001:db8::10"]))].into();
            assert_eq!(n.interfaces, want, "lo, link-local, cw_vxlan and lxc* left out (netns {ns_name})");
            assert_eq!(n.default_interface.as_deref(), Some("eth1"));

            // The egress IP the operator adds later is published at the next read.
            let out =
                std::process::Command::new("ip").args(["addr", "add", "192.0.2.77/32", "dev", "eth1"]).output()?;
            if !out.status.success() {
                bail!("ip addr add: {}", String::from_utf8_lossy(&out.stderr));
            }
            wait_for_node(&nodes, "gw-a", "192.0.2.77", |n| {
                n.interfaces.get("eth1").is_some_and(|l| l.contains(&"192.0.2.77".parse().expect("ip")))
            })
            .await?;
            Ok(())
        })
    })??;
    Ok(())
}

//! The gateway health probe responder over real UDP sockets: in-process (flag toggling, garbage counted and not
//! answered), and the real `causeway-node-agent` binary on an egress-only node (no identity-sync) in --dry-run,
//! which answers probes but never claims to be a ready gateway.
//!
//! No privileges needed: loopback only, nothing in the kernel is programmed.

mod egress_agent_support;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_api::probe::{Probe, ProbeReply};
use causeway_datapath::egress::probe::{self, GatewayReady, ProbeMetrics};
use causeway_runtime::Health;
use egress_agent_support::{free_tcp_port, free_udp_port, policy, ChildGuard, EgressServer};
use tokio::net::UdpSocket;

/// Sends a probe and returns the first datagram that comes back, decoded as a reply.
async fn ask(client: &UdpSocket, to: std::net::SocketAddr, seq: u64) -> Result<ProbeReply> {
    client.send_to(&Probe { seq }.encode(), to).await?;
    let mut buf = [0u8; 512];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .context("no reply to the probe")??;
    assert_eq!(from, to, "the reply comes from the probed address");
    Ok(ProbeReply::decode(&buf[..n])?)
}

#[tokio::test]
async fn probes_are_answered_with_the_node_name_and_the_current_gateway_flag() -> Result<()> {
    let health = Health::new();
    let metrics = ProbeMetrics::default();
    metrics.register(&health);
    let ready = GatewayReady::new();
    let socket = probe::bind("127.0.0.1:0".parse()?).await?;
    let addr = socket.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(probe::serve(socket, "gw-a".into(), ready.clone(), metrics.clone(), async {
        let _ = stopped.await;
    }));
    let client = UdpSocket::bind("127.0.0.1:0").await?;

    let r = ask(&client, addr, 7).await?;
    assert_eq!((r.seq, r.node.as_str(), r.gateway_ready()), (7, "gw-a", false), "SNAT not attached yet");
    ready.set(true);
    let r = ask(&client, addr, 8).await?;
    assert_eq!((r.seq, r.gateway_ready()), (8, true));

    // Garbage first, then a probe: the first thing that comes back is the probe's reply (garbage got none), and
    // the responder is still serving.
    client.send_to(b"GET / HTTP/1.1\r\nHost: gw-a\r\n\r\n", addr).await?;
    client.send_to(&[0u8; 3], addr).await?;
    client.send_to(&Probe { seq: 1 }.reply("impostor", 1), addr).await?;
    let r = ask(&client, addr, 9).await?;
    assert_eq!(r.seq, 9);
    ready.set(false);
    assert!(!ask(&client, addr, 10).await?.gateway_ready(), "the flag follows the attachment both ways");

    let text = health.render_metrics();
    assert!(text.contains(r#"causeway_node_agent_probe_garbage_total{reason="bad_magic"} 1"#), "{text}");
    assert!(text.contains(r#"causeway_node_agent_probe_garbage_total{reason="short"} 1"#), "{text}");
    assert!(text.contains(r#"causeway_node_agent_probe_garbage_total{reason="kind"} 1"#), "{text}");
    assert!(text.contains("causeway_node_agent_probe_answered_total 4"), "{text}");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task).await.context("the responder did not stop")??;
    Ok(())
}

#[tokio::test]
async fn an_egress_only_agent_without_identity_sync_becomes_ready_and_answers_probes() -> Result<()> {
    let egress = EgressServer::default();
    // This node (192.168.0.1) is not the gateway; the pod 10.1.0.5 leaves through 192.168.0.7.
    egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.0.2.10", &["192.168.0.7"]));
    let egress_addr = egress.serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    let (metrics_port, probe_port) = (free_tcp_port()?, free_udp_port()?);
    let _agent = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_causeway-node-agent"))
            .args(["--dry-run", "--node-name", "node-a", "--node-ip", "192.168.0.1"])
            .args(["--egress-addr", &egress_addr.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--probe-addr", &format!("127.0.0.1:{probe_port}")])
            .env_remove("CAUSEWAY_IDENTITY_SYNC_ADDR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{metrics_port}");
    let mut metrics = None;
    for _ in 0..1000 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                metrics = Some(http.get(format!("{base}/metrics")).send().await?.text().await?);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(metrics) = metrics else { bail!("the egress-only agent never became ready") };
    assert!(metrics.contains(r#"causeway_node_agent_map_entries{map="egress_src"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"causeway_node_agent_stream_revision{stream="egress"}"#), "{metrics}");
    assert!(!metrics.contains(r#"stream="meshview""#), "no mesh stream was started: {metrics}");

    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let r = ask(&client, format!("127.0.0.1:{probe_port}").parse()?, 123).await?;
    assert_eq!((r.seq, r.node.as_str()), (123, "node-a"));
    assert!(!r.gateway_ready(), "--dry-run attaches nothing, so it never claims to be a ready gateway");
    Ok(())
}

#[test]
fn the_binary_refuses_to_run_without_any_input_stream() -> Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_causeway-node-agent"))
        .args(["--dry-run", "--node-name", "node-a", "--node-ip", "192.168.0.1", "--probe-addr", "127.0.0.1:0"])
        .env_remove("CAUSEWAY_IDENTITY_SYNC_ADDR")
        .env_remove("CAUSEWAY_EGRESS_ADDR")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--identity-sync-addr") && err.contains("--egress-addr"), "{err}");
    Ok(())
}

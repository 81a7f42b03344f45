//! The prober over real UDP sockets, with the test playing the node agents: it answers probes (or not, or wrongly)
//! the way `causeway_api::probe` says. Verdicts are read from the channel the controller would read. Waiting has a
//! generous deadline; nothing asserts on timing.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use causeway_api::probe::{Probe, FLAG_GATEWAY_READY};
use causeway_egress_gw::kube::Input;
use causeway_egress_gw::probe::{run, ProbeConfig, ProbeMetrics};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(20);
/// Short rounds keep the test quick; the logic is the same at 100 ms.
const INTERVAL: Duration = Duration::from_millis(20);

/// How the fake agent answers.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Ready,
    Silent,
    NotReady,
    WrongName,
    /// Garbage datagrams first, then the correct reply.
    GarbageThenReady,
}

struct Agent {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Agent {
    async fn start(bind: SocketAddr, name: &str, mode: Mode) -> Result<Agent> {
        let sock = UdpSocket::bind(bind).await?;
        let addr = sock.local_addr()?;
        let mode = Arc::new(Mutex::new(mode));
        let name = name.to_string();
        let task = tokio::spawn({
            let mode = mode.clone();
            async move {
                let mut buf = [0u8; 64];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    let Ok(probe) = Probe::decode(&buf[..n]) else { continue };
                    let m = mode.lock().map(|m| m.clone()).unwrap_or(Mode::Silent);
                    let reply = match m {
                        Mode::Ready => probe.reply(&name, FLAG_GATEWAY_READY),
                        Mode::Silent => continue,
                        Mode::NotReady => probe.reply(&name, 0),
                        Mode::WrongName => probe.reply("someone-else", FLAG_GATEWAY_READY),
                        Mode::GarbageThenReady => {
                            for junk in [
                                &b""[..],
                                b"CWHP",
                                &[0xff; 300],
                                &probe.encode(),
                                &[b'C', b'W', b'H', b'P', 1, 2, 0, 1],
                            ] {
                                let _ = sock.send_to(junk, from).await;
                            }
                            let mut cut = probe.reply(&name, FLAG_GATEWAY_READY);
                            cut[16] = 250;
                            let _ = sock.send_to(&cut, from).await;
                            probe.reply(&name, FLAG_GATEWAY_READY)
                        }
                    };
                    let _ = sock.send_to(&reply, from).await;
                }
            }
        });
        Ok(Agent { addr, mode, task })
    }

    fn set(&self, mode: Mode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = mode;
        }
    }
}

struct Prober {
    targets: watch::Sender<BTreeMap<String, IpAddr>>,
    rx: mpsc::Receiver<Input>,
    metrics: ProbeMetrics,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_prober(port: u16, targets: &[(&str, IpAddr)]) -> Prober {
    let targets = watch::channel(targets.iter().map(|(n, ip)| (n.to_string(), *ip)).collect()).0;
    let (tx, rx) = mpsc::channel(1024);
    let metrics = ProbeMetrics::default();
    let task = tokio::spawn(run(ProbeConfig { port, interval: INTERVAL }, targets.subscribe(), tx, metrics.clone()));
    Prober { targets, rx, metrics, task }
}

impl Prober {
    /// Waits for a verdict about `node` equal to `ok`; returns the verdicts about `node` seen before it.
    async fn wait_verdict(&mut self, node: &str, ok: bool) -> Result<Vec<bool>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Input::Probe { node: n, ok: o })) if n == node => {
                    if o == ok {
                        return Ok(before);
                    }
                    before.push(o);
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("prober ended"),
                Err(_) => bail!("no verdict ok={ok} for {node} within {WAIT:?} (saw {before:?})"),
            }
        }
    }

    /// The next `n` verdicts about `node`.
    async fn verdicts(&mut self, node: &str, n: usize) -> Result<Vec<bool>> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(WAIT, self.rx.recv()).await {
                Ok(Some(Input::Probe { node: m, ok })) if m == node => out.push(ok),
                Ok(Some(_)) => {}
                Ok(None) => bail!("prober ended"),
                Err(_) => bail!("only {out:?} for {node} within {WAIT:?}"),
            }
        }
        Ok(out)
    }
}

fn local(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("loopback IP"), 0)
}

#[tokio::test]
async fn an_answering_agent_passes_and_a_silent_one_fails() -> Result<()> {
    let agent = Agent::start(local("127.0.0.1"), "gw-a", Mode::Ready).await?;
    let mut p = start_prober(agent.addr.port(), &[("gw-a", agent.addr.ip())]);
    p.wait_verdict("gw-a", true).await?;
    assert_eq!(p.verdicts("gw-a", 5).await?, vec![true; 5], "one good verdict per round while it answers");

    agent.set(Mode::Silent);
    p.wait_verdict("gw-a", false).await?;
    assert_eq!(p.verdicts("gw-a", 3).await?, vec![false; 3], "every silent round fails");
    assert!(p.metrics.rounds.get() >= 9);

    agent.set(Mode::Ready);
    p.wait_verdict("gw-a", true).await?;
    Ok(())
}

#[tokio::test]
async fn a_reply_naming_another_node_or_without_the_ready_flag_fails() -> Result<()> {
    let agent = Agent::start(local("127.0.0.1"), "gw-a", Mode::WrongName).await?;
    let mut p = start_prober(agent.addr.port(), &[("gw-a", agent.addr.ip())]);
    assert_eq!(p.verdicts("gw-a", 3).await?, vec![false; 3], "a recycled IP is not the gateway");
    agent.set(Mode::Ready);
    p.wait_verdict("gw-a", true).await?;
    agent.set(Mode::NotReady);
    p.wait_verdict("gw-a", false).await?;
    assert_eq!(p.verdicts("gw-a", 3).await?, vec![false; 3], "alive but without its gateway datapath");
    Ok(())
}

#[tokio::test]
async fn garbage_datagrams_are_ignored_and_the_prober_keeps_going() -> Result<()> {
    let agent = Agent::start(local("127.0.0.1"), "gw-a", Mode::GarbageThenReady).await?;
    let mut p = start_prober(agent.addr.port(), &[("gw-a", agent.addr.ip())]);
    p.wait_verdict("gw-a", true).await?;
    assert_eq!(p.verdicts("gw-a", 5).await?, vec![true; 5]);
    assert!(p.metrics.rejected.get() >= 6, "garbage was received and rejected: {}", p.metrics.rejected.get());
    assert!(!p.task.is_finished());
    Ok(())
}

/// Agents "gw-a" on 127.0.0.1 and "gw-b" on 127.0.0.2 on the same port (the prober has one port for all nodes).
async fn two_agents() -> Result<(Agent, Agent)> {
    for _ in 0..50 {
        let a = Agent::start(local("127.0.0.1"), "gw-a", Mode::Ready).await?;
        if let Ok(b) = Agent::start(SocketAddr::new("127.0.0.2".parse()?, a.addr.port()), "gw-b", Mode::Ready).await {
            return Ok((a, b));
        }
    }
    bail!("no port free on both 127.0.0.1 and 127.0.0.2")
}

#[tokio::test]
async fn targets_follow_the_controller() -> Result<()> {
    // Two agents on different loopback addresses sharing one port, as agents on two nodes would.
    let (a, b) = two_agents().await?;
    let mut p = start_prober(a.addr.port(), &[("gw-a", a.addr.ip())]);
    p.wait_verdict("gw-a", true).await?;
    p.targets.send_replace([("gw-b".to_string(), b.addr.ip())].into());
    p.wait_verdict("gw-b", true).await?;
    // gw-a is no longer probed: once the verdicts in flight are read, only gw-b's follow.
    let mut after = Vec::new();
    for _ in 0..20 {
        match tokio::time::timeout(WAIT, p.rx.recv()).await {
            Ok(Some(Input::Probe { node, .. })) => after.push(node),
            other => bail!("unexpected {other:?}"),
        }
    }
    assert!(after.iter().all(|n| n == "gw-b"), "{after:?}");
    Ok(())
}

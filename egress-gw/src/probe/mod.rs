//! The gateway prober: every probe interval it sends a [`causeway_api::probe::Probe`] to the node agent of every
//! candidate gateway and turns the replies into one verdict per node per round, which the controller's hysteresis
//! ([`crate::core::HealthTracker`]) turns into gateway health.
//!
//! - [`ProbeCore`]: sans-IO. Which nodes to probe, the outstanding sequence numbers, and the verdicts. A round is
//!   good for a node when a reply with that round's sequence number, that node's name and
//!   [`FLAG_GATEWAY_READY`] arrived before the next round starts; it is reported as soon as it arrives, so a
//!   recovering gateway rises without waiting for the round's end. Everything else (silence, a reply from another
//!   node, an agent without its gateway datapath, a late reply) makes the round fail when it closes.
//! - [`run`]: the tokio UDP adapter. Probe targets come from [`crate::kube::Controller::probe_targets`], verdicts
//!   go back to the controller as [`Input::Probe`].

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use causeway_api::probe::{Probe, ProbeReply, FLAG_GATEWAY_READY};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::kube::Input;

/// One probe to send this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub node: String,
    pub ip: IpAddr,
    pub probe: Probe,
}

/// Why a round failed for a node, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No acceptable reply before the round closed.
    NoReply,
    /// The agent answered but its gateway datapath is not installed.
    NotReady,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoReply => "no_reply",
            Failure::NotReady => "not_ready",
        }
    }
}

/// One round's verdict for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub node: String,
    /// `None`: the round passed.
    pub failure: Option<Failure>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// What became of a datagram that arrived on the probe socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// It decided the node's round (passed, or failed because the agent is not ready).
    Verdict(Verdict),
    /// Not a reply (garbage, a probe, another version).
    Malformed,
    /// A sequence number not outstanding: late (its round closed), repeated, or made up.
    Unexpected,
    /// The right sequence number but another node's name: a recycled IP or a stray process. Not taken.
    WrongNode { expected: String, got: String },
}

#[derive(Debug)]
struct Outstanding {
    node: String,
}

/// The sans-IO prober.
#[derive(Debug)]
pub struct ProbeCore {
    targets: BTreeMap<String, IpAddr>,
    next_seq: u64,
    /// This round's unanswered probes by sequence number.
    outstanding: HashMap<u64, Outstanding>,
}

impl ProbeCore {
    /// `first_seq` should differ between processes (the adapter uses the start time), so that a reply to a
    /// previous controller's probe is not taken for one of ours.
    pub fn new(first_seq: u64) -> Self {
        ProbeCore { targets: BTreeMap::new(), next_seq: first_seq, outstanding: HashMap::new() }
    }

    pub fn targets(&self) -> &BTreeMap<String, IpAddr> {
        &self.targets
    }

    /// Replaces the nodes to probe. A node that left is dropped with its outstanding probe and gets no verdict
    /// (it is no longer a gateway; the controller's staleness check takes it down if it was healthy).
    pub fn set_targets(&mut self, targets: BTreeMap<String, IpAddr>) {
        self.outstanding.retain(|_, o| targets.contains_key(&o.node));
        self.targets = targets;
    }

    /// Closes the current round and opens the next: every probe of the closing round still unanswered fails,
    /// and one new probe goes to every target.
    pub fn start_round(&mut self) -> (Vec<Verdict>, Vec<Send>) {
        let mut failed: Vec<Verdict> =
            self.outstanding.drain().map(|(_, o)| Verdict { node: o.node, failure: Some(Failure::NoReply) }).collect();
        failed.sort_by(|a, b| a.node.cmp(&b.node));
        let mut sends = Vec::with_capacity(self.targets.len());
        for (node, ip) in &self.targets {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            self.outstanding.insert(seq, Outstanding { node: node.clone() });
            sends.push(Send { node: node.clone(), ip: *ip, probe: Probe { seq } });
        }
        (failed, sends)
    }

    /// A datagram arrived. Never panics on any input.
    pub fn on_datagram(&mut self, data: &[u8]) -> Reply {
        let Ok(reply) = ProbeReply::decode(data) else { return Reply::Malformed };
        let Some(o) = self.outstanding.get(&reply.seq) else { return Reply::Unexpected };
        if o.node != reply.node {
            return Reply::WrongNode { expected: o.node.clone(), got: reply.node };
        }
        let Some(o) = self.outstanding.remove(&reply.seq) else { return Reply::Unexpected };
        let failure = (reply.flags & FLAG_GATEWAY_READY == 0).then_some(Failure::NotReady);
        Reply::Verdict(Verdict { node: o.node, failure })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub node: String,
    pub reason: String,
}

/// Prober metrics, registered as `causeway_egress_probe_*`.
#[derive(Debug, Clone, Default)]
pub struct ProbeMetrics {
    pub rounds: Counter,
    pub failures: Family<FailureLabels, Counter>,
    /// Datagrams that were not an acceptable reply (garbage, wrong node, late).
    pub rejected: Counter,
    pub send_errors: Counter,
}

impl ProbeMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("egress_probe_rounds", "Gateway probe rounds started", self.rounds.clone());
        r.register("egress_probe_failures", "Failed probe rounds per gateway node and reason", self.failures.clone());
        r.register("egress_probe_rejected", "Datagrams on the probe socket that were not taken", self.rejected.clone());
        r.register("egress_probe_send_errors", "Probes the kernel refused to send", self.send_errors.clone());
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// UDP port node agents answer on.
    pub port: u16,
    /// Time between rounds; also how long a probe may take to be answered.
    pub interval: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { port: causeway_api::probe::DEFAULT_PORT, interval: Duration::from_millis(100) }
    }
}

/// The UDP adapter: probes `targets` every `cfg.interval` and sends the verdicts to the controller. Returns when
/// the controller is gone (either channel closed), or with an error when no IPv4 socket can be bound.
pub async fn run(
    cfg: ProbeConfig,
    mut targets: watch::Receiver<BTreeMap<String, IpAddr>>,
    tx: mpsc::Sender<Input>,
    metrics: ProbeMetrics,
) -> io::Result<()> {
    let v4 = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    // IPv6 may be disabled (some netns, some nodes); then only IPv4 gateways are probed.
    let v6 = match UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no IPv6 probe socket; IPv6 gateway addresses will fail their probes");
            None
        }
    };
    let first_seq =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    let mut core = ProbeCore::new(first_seq);
    core.set_targets(targets.borrow_and_update().clone());
    info!(port = cfg.port, interval = ?cfg.interval, targets = core.targets().len(), "probing gateways");
    let mut tick = tokio::time::interval(cfg.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf4 = [0u8; 512];
    let mut buf6 = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                metrics.rounds.inc();
                let (failed, sends) = core.start_round();
                for v in failed {
                    if report(&tx, &metrics, v).await.is_err() {
                        return Ok(());
                    }
                }
                for s in sends {
                    let sock = match (s.ip, &v6) {
                        (IpAddr::V4(_), _) => &v4,
                        (IpAddr::V6(_), Some(v6)) => v6,
                        (IpAddr::V6(_), None) => continue,
                    };
                    if let Err(e) = sock.send_to(&s.probe.encode(), SocketAddr::new(s.ip, cfg.port)).await {
                        metrics.send_errors.inc();
                        debug!(node = %s.node, ip = %s.ip, error = %e, "probe not sent");
                    }
                }
            }
            r = v4.recv_from(&mut buf4) => {
                if let Some(v) = received(&mut core, &metrics, r.map(|(n, from)| (&buf4[..n], from))) {
                    if report(&tx, &metrics, v).await.is_err() {
                        return Ok(());
                    }
                }
            }
            r = recv6(v6.as_ref(), &mut buf6) => {
                if let Some(v) = received(&mut core, &metrics, r.map(|(n, from)| (&buf6[..n], from))) {
                    if report(&tx, &metrics, v).await.is_err() {
                        return Ok(());
                    }
                }
            }
            changed = targets.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                core.set_targets(targets.borrow_and_update().clone());
                debug!(targets = core.targets().len(), "probe targets changed");
            }
        }
    }
}

async fn recv6(sock: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn received(core: &mut ProbeCore, metrics: &ProbeMetrics, r: io::Result<(&[u8], SocketAddr)>) -> Option<Verdict> {
    let (data, from) = match r {
        Ok(x) => x,
        // ICMP errors surface here on some kernels; the round simply fails.
        Err(e) => {
            debug!(error = %e, "probe socket receive error");
            return None;
        }
    };
    match core.on_datagram(data) {
        Reply::Verdict(v) => Some(v),
        other => {
            metrics.rejected.inc();
            debug!(%from, reply = ?other, "probe datagram not taken");
            None
        }
    }
}

async fn report(tx: &mpsc::Sender<Input>, metrics: &ProbeMetrics, v: Verdict) -> Result<(), ()> {
    if let Some(f) = v.failure {
        metrics.failures.get_or_create(&FailureLabels { node: v.node.clone(), reason: f.as_str().into() }).inc();
    }
    let ok = v.ok();
    tx.send(Input::Probe { node: v.node, ok }).await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use causeway_api::probe::MAX_NAME;

    use super::*;

    fn targets(nodes: &[(&str, &str)]) -> BTreeMap<String, IpAddr> {
        nodes.iter().map(|(n, ip)| (n.to_string(), ip.parse().expect("test IP"))).collect()
    }

    fn seq_of(sends: &[Send], node: &str) -> Probe {
        sends.iter().find(|s| s.node == node).expect("probe sent").probe
    }

    #[test]
    fn every_target_gets_a_fresh_probe_each_round() {
        let mut c = ProbeCore::new(1000);
        c.set_targets(targets(&[("gw-a", "10.0.0.1"), ("gw-b", "fd00::2")]));
        let (failed, sends) = c.start_round();
        assert!(failed.is_empty(), "nothing outstanding before the first round");
        assert_eq!(
            sends.iter().map(|s| (s.node.as_str(), s.ip.to_string())).collect::<Vec<_>>(),
            vec![("gw-a", "10.0.0.1".to_string()), ("gw-b", "fd00::2".to_string())]
        );
        let (_, next) = c.start_round();
        assert_ne!(seq_of(&sends, "gw-a"), seq_of(&next, "gw-a"), "sequence numbers are not reused");
    }

    #[test]
    fn a_ready_reply_from_the_right_node_passes_once() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1"), ("gw-b", "10.0.0.2")]));
        let (_, sends) = c.start_round();
        let reply = seq_of(&sends, "gw-a").reply("gw-a", FLAG_GATEWAY_READY);
        assert_eq!(c.on_datagram(&reply), Reply::Verdict(Verdict { node: "gw-a".into(), failure: None }));
        assert_eq!(c.on_datagram(&reply), Reply::Unexpected, "a duplicate does not count twice");
        // gw-b stayed silent: only it fails when the round closes.
        let (failed, _) = c.start_round();
        assert_eq!(failed, vec![Verdict { node: "gw-b".into(), failure: Some(Failure::NoReply) }]);
    }

    #[test]
    fn a_reply_without_the_ready_flag_fails_the_round() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1")]));
        let (_, sends) = c.start_round();
        let reply = seq_of(&sends, "gw-a").reply("gw-a", 0);
        assert_eq!(
            c.on_datagram(&reply),
            Reply::Verdict(Verdict { node: "gw-a".into(), failure: Some(Failure::NotReady) })
        );
        assert!(c.start_round().0.is_empty(), "decided once; no second verdict at the round's end");
    }

    #[test]
    fn a_reply_naming_another_node_is_not_taken() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1")]));
        let (_, sends) = c.start_round();
        let reply = seq_of(&sends, "gw-a").reply("gw-z", FLAG_GATEWAY_READY);
        assert_eq!(c.on_datagram(&reply), Reply::WrongNode { expected: "gw-a".into(), got: "gw-z".into() });
        let (failed, _) = c.start_round();
        assert_eq!(failed, vec![Verdict { node: "gw-a".into(), failure: Some(Failure::NoReply) }]);
    }

    #[test]
    fn a_late_reply_does_not_count_for_the_next_round() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1")]));
        let (_, first) = c.start_round();
        let (failed, _) = c.start_round();
        assert_eq!(failed.len(), 1);
        let late = seq_of(&first, "gw-a").reply("gw-a", FLAG_GATEWAY_READY);
        assert_eq!(c.on_datagram(&late), Reply::Unexpected);
    }

    #[test]
    fn garbage_never_panics_and_never_passes() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1")]));
        let (_, sends) = c.start_round();
        let good = seq_of(&sends, "gw-a").reply("gw-a", FLAG_GATEWAY_READY);
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0xff; 3], vec![0; 16], vec![0xff; 1500]];
        inputs.push(seq_of(&sends, "gw-a").encode().to_vec());
        for cut in 0..good.len() {
            inputs.push(good[..cut].to_vec());
        }
        let mut long_name = good.clone();
        long_name[16] = MAX_NAME as u8;
        inputs.push(long_name);
        for i in &inputs {
            assert!(!matches!(c.on_datagram(i), Reply::Verdict(_)), "{i:?} taken as a verdict");
        }
        assert!(matches!(c.on_datagram(&good), Reply::Verdict(v) if v.ok()), "the real reply still counts");
    }

    #[test]
    fn a_node_leaving_the_targets_gets_no_verdict() {
        let mut c = ProbeCore::new(1);
        c.set_targets(targets(&[("gw-a", "10.0.0.1"), ("gw-b", "10.0.0.2")]));
        c.start_round();
        c.set_targets(targets(&[("gw-b", "10.0.0.2")]));
        let (failed, sends) = c.start_round();
        assert_eq!(failed.iter().map(|v| v.node.as_str()).collect::<Vec<_>>(), vec!["gw-b"]);
        assert_eq!(sends.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(), vec!["gw-b"]);
    }
}

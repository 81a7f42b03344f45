//! The gateway health probe responder (`--probe-addr`, UDP): the egress-gw controller sends a
//! [`causeway_api::probe::Probe`] every probe interval, and the agent answers each one with its node name and
//! whether its gateway datapath is ready. Answering is all the controller needs to see the agent alive; the flag
//! tells it whether this node can SNAT (see api/src/probe.rs for the wire format).
//!
//! [`answer`] is the sans-IO part; [`serve`] is the socket loop around it. Garbage datagrams are counted and
//! ignored: a port scanner or a misdirected packet never stops the responder, and never gets a reply.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use causeway_api::probe::{Probe, ProbeError, FLAG_GATEWAY_READY};
use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::prometheus_client::metrics::family::Family;
use causeway_runtime::Health;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

/// Whether this agent's gateway SNAT is attached on its external interface. Cloned handles share one flag; the
/// binary sets it after installing SNAT (never in `--dry-run`) and re-checks the attachment periodically.
#[derive(Debug, Clone, Default)]
pub struct GatewayReady(Arc<AtomicBool>);

impl GatewayReady {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, ready: bool) {
        let was = self.0.swap(ready, Ordering::Relaxed);
        if was != ready {
            info!(ready, "gateway datapath readiness changed");
        }
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

type Labels = Vec<(String, String)>;

/// `causeway_node_agent_probe_*` metrics.
#[derive(Clone, Default)]
pub struct ProbeMetrics {
    pub answered: Counter,
    /// Datagrams that were not a probe, by reason.
    pub garbage: Family<Labels, Counter>,
}

impl ProbeMetrics {
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register("node_agent_probe_answered", "Gateway health probes answered", self.answered.clone());
            r.register(
                "node_agent_probe_garbage",
                "Datagrams on the probe port that were not a probe, ignored (label reason)",
                self.garbage.clone(),
            );
        });
    }
}

fn reason(e: &ProbeError) -> &'static str {
    match e {
        ProbeError::Short(_) => "short",
        ProbeError::BadMagic => "bad_magic",
        ProbeError::Version(_) => "version",
        ProbeError::Kind(_) => "kind",
        ProbeError::Name => "name",
    }
}

/// The reply to one datagram, or why there is none.
pub fn answer(datagram: &[u8], node: &str, gateway_ready: bool) -> Result<Vec<u8>, ProbeError> {
    let probe = Probe::decode(datagram)?;
    Ok(probe.reply(node, if gateway_ready { FLAG_GATEWAY_READY } else { 0 }))
}

/// Binds the responder's socket (separately from [`serve`], so the caller knows the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(addr).await
}

/// Answers probes on `socket` until `shutdown` completes.
pub async fn serve(
    socket: UdpSocket,
    node: String,
    ready: GatewayReady,
    metrics: ProbeMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let span = tracing::info_span!("probe_responder", node = %node);
    let _e = span.enter();
    info!(addr = ?socket.local_addr().ok(), "answering gateway health probes");
    // A probe is 16 bytes; anything longer is not one, but reading it whole keeps the next datagram aligned.
    let mut buf = vec![0u8; 2048];
    tokio::pin!(shutdown);
    loop {
        let (n, from) = tokio::select! {
            _ = &mut shutdown => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from an earlier reply (port unreachable) surface here on Linux; keep serving.
                    debug!(error = %e, "probe socket receive error");
                    continue;
                }
            },
        };
        match answer(&buf[..n], &node, ready.get()) {
            Ok(reply) => {
                if let Err(e) = socket.send_to(&reply, from).await {
                    warn!(%from, error = %e, "sending a probe reply");
                    continue;
                }
                metrics.answered.inc();
            }
            Err(e) => {
                debug!(%from, error = %e, "ignoring a datagram that is not a probe");
                metrics.garbage.get_or_create(&vec![("reason".to_owned(), reason(&e).to_owned())]).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::probe::ProbeReply;

    #[test]
    fn a_probe_is_answered_with_the_node_and_the_ready_flag() {
        let p = Probe { seq: 42 }.encode();
        let r = ProbeReply::decode(&answer(&p, "gw-a", true).unwrap()).unwrap();
        assert_eq!((r.seq, r.node.as_str(), r.gateway_ready()), (42, "gw-a", true));
        let r = ProbeReply::decode(&answer(&p, "gw-a", false).unwrap()).unwrap();
        assert!(!r.gateway_ready());
    }

    #[test]
    fn garbage_and_replies_get_no_answer() {
        assert_eq!(answer(b"", "n", true), Err(ProbeError::Short(0)));
        assert_eq!(answer(b"GET / HTTP/1.1\r\n\r\n", "n", true), Err(ProbeError::BadMagic));
        // A reply bounced back at us is not a probe: no reply loop between two agents.
        let reply = Probe { seq: 1 }.reply("other", 0);
        assert_eq!(answer(&reply, "n", true), Err(ProbeError::Kind(2)));
        assert_eq!(reason(&ProbeError::Kind(2)), "kind");
    }
}

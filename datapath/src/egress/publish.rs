//! Publishes this node's interfaces on its Node object: the [`interfaces::INTERFACES_ANNOTATION`] and
//! [`interfaces::DEFAULT_INTERFACE_ANNOTATION`] annotations that the egress-gw controller reads (egress-gw's
//! `kube::convert::node`). The agent polls its addresses every `interval` and merge-patches its own Node when what
//! it would publish changed, when the last write failed, and every `refresh` anyway (someone may have edited the
//! annotation by hand).
//!
//! The same patch carries the node's WireGuard public key as [`WIREGUARD_KEY_ANNOTATION`] when the agent has a
//! WireGuard interface: clustermesh-apiserver exports that annotation in the node record peers (and joined hosts)
//! configure this node as a WireGuard peer from.
//!
//! [`Schedule`] decides when to write (sans-IO, injected clock); [`publish`] is the one kube call.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::Health;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use tracing::{debug, info, warn};

use super::interfaces::{self, HostNetwork, PublishFilter, Published};
use crate::wireguard::PublicKey;

/// The Node annotation holding the node's WireGuard public key (base64), read by clustermesh-apiserver.
pub const WIREGUARD_KEY_ANNOTATION: &str = "causeway.io/wireguard-pub-key";

/// When to write the annotations.
#[derive(Debug, Clone)]
pub struct Schedule {
    refresh: Duration,
    last: Option<(Published, Instant)>,
}

impl Schedule {
    pub fn new(refresh: Duration) -> Self {
        Schedule { refresh, last: None }
    }

    /// Whether `next` must be written at `now`: first time, changed since the last successful write, or the
    /// last write is older than the refresh period.
    pub fn due(&self, next: &Published, now: Instant) -> bool {
        match &self.last {
            None => true,
            Some((p, at)) => p != next || now.saturating_duration_since(*at) >= self.refresh,
        }
    }

    /// Records a successful write (a failed one is not recorded, so it is retried at the next poll).
    pub fn written(&mut self, p: Published, now: Instant) {
        self.last = Some((p, now));
    }
}

/// `causeway_node_agent_interfaces_*` metrics.
#[derive(Clone, Default)]
pub struct PublishMetrics {
    pub published: Counter,
    pub errors: Counter,
}

impl PublishMetrics {
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register(
                "node_agent_interfaces_published",
                "Writes of the egress.causeway.io/interfaces annotations on this node's Node",
                self.published.clone(),
            );
            r.register(
                "node_agent_interfaces_publish_errors",
                "Failed reads of the node's addresses or failed writes of its Node annotations",
                self.errors.clone(),
            );
        });
    }
}

/// The merge patch: `p`'s annotations, plus the WireGuard key annotation when there is a key.
pub fn merge_patch(p: &Published, wireguard_pub_key: Option<&PublicKey>) -> serde_json::Value {
    let mut patch = p.merge_patch();
    if let (Some(key), Some(annotations)) =
        (wireguard_pub_key, patch.pointer_mut("/metadata/annotations").and_then(|a| a.as_object_mut()))
    {
        annotations.insert(WIREGUARD_KEY_ANNOTATION.to_owned(), key.to_base64().into());
    }
    patch
}

/// Merge-patches `node`'s annotations with `p` and the key (other annotations are untouched).
pub async fn publish(
    client: &kube::Client,
    node: &str,
    p: &Published,
    wireguard_pub_key: Option<&PublicKey>,
) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    api.patch(node, &PatchParams::default(), &Patch::Merge(&merge_patch(p, wireguard_pub_key))).await?;
    Ok(())
}

/// How the publisher runs.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// This node's Node name.
    pub node: String,
    pub filter: PublishFilter,
    /// How often addresses are read.
    pub interval: Duration,
    /// Rewrite even when nothing changed, this often.
    pub refresh: Duration,
    /// This node's WireGuard public key, published with every write; `None` without a WireGuard interface.
    pub wireguard_pub_key: Option<PublicKey>,
}

/// Polls the addresses with `read` (the netlink reader, or a test's) and publishes until `shutdown`.
pub async fn run(
    client: kube::Client,
    cfg: PublishConfig,
    mut read: impl FnMut() -> io::Result<HostNetwork>,
    metrics: PublishMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let span = tracing::info_span!("publish_interfaces", node = %cfg.node);
    let _e = span.enter();
    let mut schedule = Schedule::new(cfg.refresh);
    let mut tick = tokio::time::interval(cfg.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let net = match read() {
            Ok(n) => n,
            Err(e) => {
                metrics.errors.inc();
                warn!(error = %e, "reading this node's addresses");
                continue;
            }
        };
        let next = interfaces::select(&net, &cfg.filter);
        let now = Instant::now();
        if !schedule.due(&next, now) {
            continue;
        }
        match publish(&client, &cfg.node, &next, cfg.wireguard_pub_key.as_ref()).await {
            Ok(()) => {
                metrics.published.inc();
                info!(interfaces = %next.interfaces_json(), default = ?next.default_interface,
                      wireguard_pub_key = ?cfg.wireguard_pub_key, "published interfaces");
                schedule.written(next, now);
            }
            Err(e) => {
                metrics.errors.inc();
                warn!(error = %e, "writing the interface and key annotations on the Node; retrying at the next poll");
            }
        }
        debug!("interface publisher tick done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(ip: &str) -> Published {
        let mut p = Published::default();
        p.interfaces.insert("eth1".into(), vec![ip.parse().unwrap()]);
        p
    }

    #[test]
    fn the_patch_carries_the_key_beside_the_interfaces() {
        let key = crate::wireguard::PrivateKey::generate().public_key();
        let p = published("192.0.2.10");
        let with = merge_patch(&p, Some(&key));
        assert_eq!(with["metadata"]["annotations"][WIREGUARD_KEY_ANNOTATION], key.to_base64());
        assert_eq!(
            with["metadata"]["annotations"][interfaces::INTERFACES_ANNOTATION],
            p.merge_patch()["metadata"]["annotations"][interfaces::INTERFACES_ANNOTATION]
        );
        // Without a key the annotation is not touched at all (not even removed: a merge patch null would).
        let without = merge_patch(&p, None);
        assert!(without["metadata"]["annotations"].get(WIREGUARD_KEY_ANNOTATION).is_none());
    }

    #[test]
    fn writes_first_on_change_after_failure_and_on_refresh() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::from_secs(600));
        let a = published("192.0.2.10");
        assert!(s.due(&a, t0), "nothing written yet");
        // The write failed: not recorded, so still due.
        assert!(s.due(&a, t0 + Duration::from_secs(5)));
        s.written(a.clone(), t0 + Duration::from_secs(5));
        assert!(!s.due(&a, t0 + Duration::from_secs(10)), "unchanged");
        assert!(s.due(&published("192.0.2.11"), t0 + Duration::from_secs(10)), "an address changed");
        assert!(s.due(&a, t0 + Duration::from_secs(605)), "refresh period passed");
    }
}

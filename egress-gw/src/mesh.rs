//! The MeshView adapter: follows identity-sync's `causeway.v1.MeshView` stream (like a node agent does) and turns its
//! `Node` objects into the meshed clusters' pod CIDRs ([`crate::core::MeshPodCidrs`]), which it hands to the
//! controller as [`Input::Networks`] together with the configured CIDRs. Reconnects with capped backoff; the view
//! learned so far stays in force while disconnected (a dropped stream must not send mesh traffic to a gateway).

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::watch_event::{Kind as EventKind, Object};
use causeway_api::v1::{WatchEvent, WatchRequest};
use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::core::{merge_mesh_cidrs, ClusterNetworks, MeshNodeEvent, MeshPodCidrs};
use crate::kube::Input;
use crate::metrics::Metrics;

/// Where the stream is and what is configured by flags.
#[derive(Debug, Clone)]
pub struct MeshFollowConfig {
    /// `host:port` or `http://host:port` of identity-sync's MeshView server.
    pub endpoint: String,
    /// This cluster's pod and service CIDRs and the `--mesh-pod-cidrs` (kept; the learned ranges are added).
    pub configured: ClusterNetworks,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// The event as the tracker sees it (`None`: not about nodes).
pub fn node_event(ev: &WatchEvent) -> Option<MeshNodeEvent> {
    match EventKind::try_from(ev.kind).ok()? {
        EventKind::SnapshotBegin => Some(MeshNodeEvent::SnapshotBegin),
        EventKind::SnapshotEnd => Some(MeshNodeEvent::SnapshotEnd),
        EventKind::Upsert => match &ev.object {
            Some(Object::Node(n)) => Some(MeshNodeEvent::Upsert {
                cluster: n.cluster.clone(),
                node: n.name.clone(),
                pod_cidrs: n.pod_cidrs.clone(),
            }),
            _ => None,
        },
        EventKind::Delete => match &ev.object {
            Some(Object::Node(n)) => Some(MeshNodeEvent::Delete { cluster: n.cluster.clone(), node: n.name.clone() }),
            _ => None,
        },
        EventKind::Unspecified => None,
    }
}

/// Follows the stream until `tx` closes. `first_view` turns true once the first view (the end of the first
/// snapshot) has been handed to the controller.
#[tracing::instrument(name = "mesh_view", skip_all, fields(endpoint = %cfg.endpoint))]
pub async fn follow(cfg: MeshFollowConfig, tx: mpsc::Sender<Input>, metrics: Metrics, first_view: watch::Sender<bool>) {
    let uri = if cfg.endpoint.contains("://") { cfg.endpoint.clone() } else { format!("http://{}", cfg.endpoint) };
    let endpoint = match Endpoint::from_shared(uri) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true),
        Err(e) => {
            warn!(error = %e, "invalid --identity-sync-addr; meshed pod CIDRs come from --mesh-pod-cidrs only");
            return;
        }
    };
    let mut tracker = MeshPodCidrs::new();
    let mut delay = cfg.backoff_initial;
    loop {
        let result = async {
            let channel = endpoint.connect().await.map_err(|e| format!("connecting: {e}"))?;
            let req = WatchRequest { resume_revision: 0, resume_epoch: 0, node_name: "egress-gw".into() };
            let mut stream =
                MeshViewClient::new(channel).watch(req).await.map_err(|s| format!("watch: {}", s.message()))?.into_inner();
            info!("following the MeshView stream for meshed clusters' pod CIDRs");
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        let Some(e) = node_event(&ev) else { continue };
                        let rejected = tracker.rejected;
                        if let Some(learned) = tracker.apply(e) {
                            metrics.mesh_clusters.set(i64::try_from(learned.len()).unwrap_or(i64::MAX));
                            let networks = ClusterNetworks {
                                remote_pod_cidrs: merge_mesh_cidrs(&cfg.configured.remote_pod_cidrs, &learned),
                                ..cfg.configured.clone()
                            };
                            log_learned(&learned);
                            if tx.send(Input::Networks(networks)).await.is_err() {
                                return Ok(true);
                            }
                            first_view.send_replace(true);
                        }
                        if tracker.rejected > rejected {
                            metrics.mesh_rejected_cidrs.inc_by(tracker.rejected - rejected);
                            warn!(event = ?ev.object, "a node's pod CIDR in the MeshView stream did not parse; ignored");
                        }
                        delay = cfg.backoff_initial;
                    }
                    Ok(None) => return Err("the stream ended".to_string()),
                    Err(s) => return Err(format!("the stream failed: {}", s.message())),
                }
            }
        }
        .await;
        match result {
            Ok(true) => return,
            Ok(false) => {}
            Err(why) => {
                warn!(error = %why, retry_in = ?delay, "MeshView stream down; keeping the meshed pod CIDRs learned so far")
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(cfg.backoff_max);
    }
}

/// The gate the assignment stream waits on: open once the controller is `synced` and the mesh view arrived
/// (`mesh`), or once `patience` has passed since the controller synced without it (then with the configured
/// CIDRs only, said in a warning), so that agents are not handed assignments that send mesh traffic to a gateway
/// just because the stream was a moment late, nor held up forever when identity-sync is down.
pub fn gate(
    mut synced: watch::Receiver<bool>,
    mut mesh: watch::Receiver<bool>,
    patience: Duration,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        if synced.wait_for(|s| *s).await.is_err() {
            return;
        }
        match tokio::time::timeout(patience, mesh.wait_for(|m| *m)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => warn!(
                waited = ?patience,
                "no MeshView from identity-sync yet: serving assignments with the configured meshed CIDRs only \
                 (--mesh-pod-cidrs); learned ones follow when the stream answers"
            ),
        }
        tx.send_replace(true);
        // Synced stays true once it is; keep the sender alive for the stream's lifetime.
        tx.closed().await;
    });
    (rx, task)
}

fn log_learned(learned: &BTreeMap<String, Vec<IpNet>>) {
    let summary: Vec<String> = learned
        .iter()
        .map(|(c, cidrs)| format!("{c}={}", cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join("+")))
        .collect();
    info!(clusters = learned.len(), cidrs = %summary.join(","), "meshed clusters' pod CIDRs changed");
}

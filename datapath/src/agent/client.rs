//! The gRPC side of the inputs: one task per stream that connects, watches from the current resume point, forwards
//! every event to the agent loop, and reconnects with backoff when the stream ends, fails, or the loop asks for it
//! (after a protocol error). Each connection has a number, so the loop can ignore what a bad connection still had
//! in flight.

use std::future::Future;
use std::time::Duration;

use causeway_api::v1::egress_assignments_client::EgressAssignmentsClient;
use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::{self as pb};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::core::StreamKind;

/// What the stream tasks send to the agent loop.
#[derive(Debug)]
pub enum Input {
    Mesh { conn: u64, event: pb::WatchEvent },
    Egress { conn: u64, event: pb::EgressWatchEvent },
    Connected { stream: StreamKind, conn: u64 },
    Disconnected { stream: StreamKind, conn: u64, error: String },
}

#[derive(Debug, Clone)]
pub struct StreamClientConfig {
    /// "host:port" or "http://host:port".
    pub endpoint: String,
    pub node_name: String,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Handles the loop keeps for one stream task.
pub struct StreamControl {
    /// The (epoch, revision) the next connection resumes from.
    pub resume: watch::Sender<(u64, u64)>,
    /// Set to a connection number to make the task drop that connection.
    pub drop_conn: watch::Sender<u64>,
}

fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        // A server that vanished without closing (node died) is noticed within ~15 s instead of never.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Spawns the MeshView watch task.
pub fn spawn_mesh(cfg: StreamClientConfig, tx: mpsc::Sender<Input>) -> StreamControl {
    let node = cfg.node_name.clone();
    spawn(StreamKind::Mesh, cfg, tx, Input::from_mesh, move |ch: Channel, (epoch, rev)| {
        let node = node.clone();
        async move {
            let req = pb::WatchRequest { resume_revision: rev, node_name: node, resume_epoch: epoch };
            MeshViewClient::new(ch).watch(req).await.map(|r| r.into_inner())
        }
    })
}

/// Spawns the EgressAssignments watch task.
pub fn spawn_egress(cfg: StreamClientConfig, tx: mpsc::Sender<Input>) -> StreamControl {
    let node = cfg.node_name.clone();
    spawn(StreamKind::Egress, cfg, tx, Input::from_egress, move |ch: Channel, (epoch, rev)| {
        let node = node.clone();
        async move {
            let req = pb::EgressWatchRequest { resume_revision: rev, node_name: node, resume_epoch: epoch };
            EgressAssignmentsClient::new(ch).watch(req).await.map(|r| r.into_inner())
        }
    })
}

impl Input {
    fn from_mesh(conn: u64, event: pb::WatchEvent) -> Input {
        Input::Mesh { conn, event }
    }

    fn from_egress(conn: u64, event: pb::EgressWatchEvent) -> Input {
        Input::Egress { conn, event }
    }
}

fn spawn<T, F, Fut>(
    stream: StreamKind,
    cfg: StreamClientConfig,
    tx: mpsc::Sender<Input>,
    wrap: fn(u64, T) -> Input,
    open: F,
) -> StreamControl
where
    T: Send + 'static,
    F: Fn(Channel, (u64, u64)) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Streaming<T>, tonic::Status>> + Send + 'static,
{
    let (resume_tx, resume_rx) = watch::channel((0, 0));
    let (drop_tx, drop_rx) = watch::channel(0);
    tokio::spawn(run(stream, cfg, tx, wrap, open, resume_rx, drop_rx));
    StreamControl { resume: resume_tx, drop_conn: drop_tx }
}

async fn run<T, F, Fut>(
    stream: StreamKind,
    cfg: StreamClientConfig,
    tx: mpsc::Sender<Input>,
    wrap: fn(u64, T) -> Input,
    open: F,
    resume: watch::Receiver<(u64, u64)>,
    mut drop_conn: watch::Receiver<u64>,
) where
    F: Fn(Channel, (u64, u64)) -> Fut,
    Fut: Future<Output = Result<Streaming<T>, tonic::Status>>,
{
    let name = stream.as_str();
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max, Backoff::seed_from(&cfg.node_name));
    let mut conn = 0u64;
    loop {
        conn += 1;
        let from = *resume.borrow();
        let error = match connect_and_open(&cfg.endpoint, &open, from).await {
            Err(e) => e,
            Ok(mut s) => {
                info!(stream = name, endpoint = %cfg.endpoint, conn, epoch = from.0, revision = from.1, "watching");
                if tx.send(Input::Connected { stream, conn }).await.is_err() {
                    return;
                }
                let mut first = true;
                loop {
                    tokio::select! {
                        changed = drop_conn.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            if *drop_conn.borrow_and_update() == conn {
                                break "dropped after a protocol error".to_string();
                            }
                        }
                        m = s.message() => match m {
                            Ok(Some(ev)) => {
                                if first {
                                    backoff.reset();
                                    first = false;
                                }
                                if tx.send(wrap(conn, ev)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "the server ended the stream".to_string(),
                            Err(status) => break format!("{}: {}", status.code(), status.message()),
                        }
                    }
                }
            }
        };
        let delay = backoff.next_delay();
        warn!(stream = name, endpoint = %cfg.endpoint, conn, %error, retry_in = ?delay, "stream disconnected");
        if tx.send(Input::Disconnected { stream, conn, error }).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
        debug!(stream = name, "reconnecting");
    }
}

async fn connect_and_open<T, F, Fut>(addr: &str, open: &F, from: (u64, u64)) -> Result<Streaming<T>, String>
where
    F: Fn(Channel, (u64, u64)) -> Fut,
    Fut: Future<Output = Result<Streaming<T>, tonic::Status>>,
{
    let ep = endpoint(addr).map_err(|e| format!("bad endpoint {addr:?}: {e}"))?;
    let ch = ep.connect().await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    open(ch, from).await.map_err(|s| format!("watch: {}: {}", s.code(), s.message()))
}

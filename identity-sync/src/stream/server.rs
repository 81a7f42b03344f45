//! `causeway.v1.MeshView/Watch`: one client's stream as a small state machine (snapshot, replay, live, reset).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use causeway_api::v1::mesh_view_server::{MeshView, MeshViewServer};
use causeway_api::v1::{watch_event, WatchEvent, WatchRequest};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::core::{Delta, ViewObject};
use crate::stream::convert;
use crate::stream::hub::{Inner, MeshViewHub, Start, Subscription};

/// The tonic service; build it with [`MeshViewHub::server`].
#[derive(Clone)]
pub struct MeshViewService {
    hub: MeshViewHub,
}

impl MeshViewHub {
    /// The gRPC service to add to a `tonic::transport::Server`.
    pub fn server(&self) -> MeshViewServer<MeshViewService> {
        MeshViewServer::new(MeshViewService { hub: self.clone() })
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl MeshView for MeshViewService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        // The name is only for logs; keep a hostile value from flooding them.
        let node: String = req.node_name.chars().take(253).collect();
        let resume = (req.resume_revision != 0).then_some((req.resume_epoch, req.resume_revision));
        let client = Client::new(self.hub.clone(), node, resume);
        let stream = futures::stream::unfold(client, |mut c| async move { c.next().await.map(|e| (Ok(e), c)) });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Keeps the connected-clients gauge right however the stream ends.
struct Connected(Arc<Inner>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.metrics.clients_connected.dec();
    }
}

struct Client {
    hub: MeshViewHub,
    node: String,
    id: u64,
    rx: mpsc::Receiver<Delta>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
    /// Control events to send before anything else (SNAPSHOT_BEGIN).
    pending: VecDeque<WatchEvent>,
    /// A snapshot being sent, and its revision.
    snapshot: Option<(std::vec::IntoIter<ViewObject>, u64)>,
    replay: std::vec::IntoIter<Delta>,
    /// The revision the client will have once it applied what was sent; queued deltas at or below it are skipped.
    sent_rev: u64,
    _connected: Connected,
}

impl Client {
    fn new(hub: MeshViewHub, node: String, resume: Option<(u64, u64)>) -> Self {
        hub.inner.metrics.clients_connected.inc();
        let connected = Connected(hub.inner.clone());
        let sub = hub.subscribe(resume);
        let (_, rx) = mpsc::channel(1);
        let mut c = Client {
            hub,
            node,
            id: 0,
            rx,
            lagged: Arc::default(),
            pending: VecDeque::new(),
            snapshot: None,
            replay: Vec::new().into_iter(),
            sent_rev: 0,
            _connected: connected,
        };
        c.start(sub, resume);
        c
    }

    fn start(&mut self, sub: Subscription, resume: Option<(u64, u64)>) {
        let Subscription { id, rx, lagged, start } = sub;
        self.id = id;
        self.rx = rx;
        self.lagged = lagged;
        let epoch = self.hub.inner.epoch;
        match start {
            Start::Snapshot(s) => {
                info!(node = %self.node, client = id, revision = s.revision, objects = s.objects.len(), "sending snapshot");
                self.pending.push_back(convert::event(watch_event::Kind::SnapshotBegin, s.revision, epoch, None));
                self.sent_rev = s.revision;
                self.snapshot = Some((s.objects.into_iter(), s.revision));
                self.replay = Vec::new().into_iter();
            }
            Start::Replay(deltas) => {
                let from = resume.map(|r| r.1).unwrap_or(0);
                info!(node = %self.node, client = id, from, deltas = deltas.len(), "resuming from the delta log");
                self.sent_rev = from;
                self.replay = deltas.into_iter();
            }
        }
    }

    /// The next event for this client; `None` ends the stream.
    async fn next(&mut self) -> Option<WatchEvent> {
        let epoch = self.hub.inner.epoch;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if let Some((objects, rev)) = &mut self.snapshot {
                let rev = *rev;
                match objects.next() {
                    Some(o) => return Some(convert::upsert(&o, rev, epoch)),
                    None => {
                        self.snapshot = None;
                        return Some(convert::event(watch_event::Kind::SnapshotEnd, rev, epoch, None));
                    }
                }
            }
            if let Some(d) = self.replay.next() {
                if d.revision > self.sent_rev {
                    self.sent_rev = d.revision;
                    return Some(convert::delta(&d, epoch));
                }
                continue;
            }
            if self.lagged.load(Ordering::Acquire) {
                self.reset();
                continue;
            }
            match self.rx.recv().await {
                Some(d) if d.revision > self.sent_rev => {
                    self.sent_rev = d.revision;
                    return Some(convert::delta(&d, epoch));
                }
                Some(_) => continue,
                // The hub dropped our queue: either we lagged (checked at the top of the loop) or it shut down.
                None if self.lagged.load(Ordering::Acquire) => continue,
                None => {
                    debug!(node = %self.node, client = self.id, "mesh view hub closed; ending stream");
                    return None;
                }
            }
        }
    }

    /// The client fell behind: drop what is queued and start over from a fresh snapshot.
    fn reset(&mut self) {
        self.hub.inner.metrics.lagging_client_resets.inc();
        info!(node = %self.node, client = self.id, "client fell behind; resetting it to a fresh snapshot");
        // Drop the old queue before subscribing again so memory never holds two.
        let (_, empty) = mpsc::channel(1);
        self.rx = empty;
        let sub = self.hub.subscribe(None);
        self.start(sub, None);
    }
}

//! `causeway.v1.EgressAssignments/Watch`: one client's stream as a small state machine (wait for the first
//! assignments, snapshot or replay, live deltas, reset to a snapshot when lagging or when the node's zone changes).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use causeway_api::v1::egress_assignments_server::{EgressAssignments, EgressAssignmentsServer};
use causeway_api::v1::{egress_watch_event::Kind, EgressWatchEvent, EgressWatchRequest};
use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::convert;
use super::hub::{AssignmentHub, Delta, Inner, Start, Subscription};
use crate::core::PolicyAssignment;

/// The tonic service; build it with [`AssignmentHub::service`].
#[derive(Clone)]
pub struct AssignmentsService {
    hub: AssignmentHub,
}

impl AssignmentHub {
    /// The gRPC service to add to a `tonic::transport::Server`.
    pub fn service(&self) -> EgressAssignmentsServer<AssignmentsService> {
        EgressAssignmentsServer::new(AssignmentsService { hub: self.clone() })
    }
}

/// Serves the stream on an already bound listener (bind first, so readiness can mean "accepting").
pub async fn serve(listener: TcpListener, hub: AssignmentHub) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(hub.service())
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<EgressWatchEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl EgressAssignments for AssignmentsService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<EgressWatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        // Node names are DNS subdomains; keep a hostile value from flooding logs and lookups.
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
    hub: AssignmentHub,
    node: String,
    /// The zone this client's view was resolved for.
    zone: Option<String>,
    zones: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>,
    zones_open: bool,
    /// Resume point asked for; taken when the client subscribes.
    resume: Option<(u64, u64)>,
    started: bool,
    id: u64,
    rx: mpsc::Receiver<Delta>,
    lagged: Arc<AtomicBool>,
    pending: VecDeque<EgressWatchEvent>,
    /// A snapshot being sent, and its revision.
    snapshot: Option<(std::vec::IntoIter<Arc<PolicyAssignment>>, u64)>,
    replay: std::vec::IntoIter<Delta>,
    /// The revision the client will have once it applied what was sent; queued deltas at or below it are skipped.
    sent_rev: u64,
    _connected: Connected,
}

impl Client {
    fn new(hub: AssignmentHub, node: String, resume: Option<(u64, u64)>) -> Self {
        hub.inner.metrics.clients_connected.inc();
        let connected = Connected(hub.inner.clone());
        let zones = hub.inner.zones.clone();
        Client {
            hub,
            node,
            zone: None,
            zones,
            zones_open: true,
            resume,
            started: false,
            id: 0,
            rx: mpsc::channel(1).1,
            lagged: Arc::default(),
            pending: VecDeque::new(),
            snapshot: None,
            replay: Vec::new().into_iter(),
            sent_rev: 0,
            _connected: connected,
        }
    }

    fn current_zone(&mut self) -> Option<String> {
        self.zones.borrow_and_update().get(&self.node).cloned()
    }

    fn start(&mut self, sub: Subscription, resume: Option<(u64, u64)>) {
        let Subscription { id, rx, lagged, start } = sub;
        self.id = id;
        self.rx = rx;
        self.lagged = lagged;
        let epoch = self.hub.inner.epoch;
        match start {
            Start::Snapshot(s) => {
                info!(node = %self.node, zone = ?self.zone, client = id, revision = s.revision,
                      policies = s.policies.len(), "sending egress assignment snapshot");
                self.pending.push_back(convert::event(Kind::SnapshotBegin, s.revision, epoch, None));
                self.sent_rev = s.revision;
                self.snapshot = Some((s.policies.into_iter(), s.revision));
                self.replay = Vec::new().into_iter();
            }
            Start::Replay(deltas) => {
                let from = resume.map(|r| r.1).unwrap_or(0);
                info!(node = %self.node, client = id, from, deltas = deltas.len(), "resuming egress assignments");
                self.sent_rev = from;
                self.replay = deltas.into_iter();
            }
        }
    }

    fn delta(&self, d: &Delta) -> EgressWatchEvent {
        let epoch = self.hub.inner.epoch;
        match &d.policy {
            Some(p) => convert::upsert(p, self.zone.as_deref(), d.revision, epoch),
            None => convert::delete(&d.name, d.revision, epoch),
        }
    }

    /// The next event for this client; `None` ends the stream.
    async fn next(&mut self) -> Option<EgressWatchEvent> {
        if !self.started {
            // Before the controller's first assignments, a snapshot would tell agents to remove everything.
            let mut ready = self.hub.inner.ready.subscribe();
            ready.wait_for(|r| *r).await.ok()?;
            self.started = true;
            self.zone = self.current_zone();
            let resume = self.resume.take();
            let sub = self.hub.subscribe(resume);
            self.start(sub, resume);
        }
        let epoch = self.hub.inner.epoch;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if let Some((policies, rev)) = &mut self.snapshot {
                let rev = *rev;
                match policies.next() {
                    Some(p) => return Some(convert::upsert(&p, self.zone.as_deref(), rev, epoch)),
                    None => {
                        self.snapshot = None;
                        return Some(convert::event(Kind::SnapshotEnd, rev, epoch, None));
                    }
                }
            }
            if let Some(d) = self.replay.next() {
                if d.revision > self.sent_rev {
                    self.sent_rev = d.revision;
                    return Some(self.delta(&d));
                }
                continue;
            }
            if self.lagged.load(Ordering::Acquire) {
                self.hub.inner.metrics.lagging_client_resets.inc();
                info!(node = %self.node, client = self.id, "client fell behind; resetting it to a fresh snapshot");
                self.reset();
                continue;
            }
            tokio::select! {
                d = self.rx.recv() => match d {
                    Some(d) if d.revision > self.sent_rev => {
                        self.sent_rev = d.revision;
                        return Some(self.delta(&d));
                    }
                    Some(_) => continue,
                    // The hub dropped our queue: we lagged (checked at the top of the loop).
                    None if self.lagged.load(Ordering::Acquire) => continue,
                    None => {
                        debug!(node = %self.node, client = self.id, "assignment hub closed; ending stream");
                        return None;
                    }
                },
                changed = self.zones.changed(), if self.zones_open => {
                    if changed.is_err() {
                        self.zones_open = false;
                        continue;
                    }
                    let zone = self.current_zone();
                    if zone != self.zone {
                        info!(node = %self.node, from = ?self.zone, to = ?zone, "node changed zone; sending a fresh snapshot");
                        self.zone = zone;
                        self.reset();
                    }
                }
            }
        }
    }

    /// Drops what is queued and starts over from a fresh snapshot.
    fn reset(&mut self) {
        // Drop the old queue before subscribing again so memory never holds two.
        self.rx = mpsc::channel(1).1;
        let sub = self.hub.subscribe(None);
        self.start(sub, None);
    }
}

//! `causeway.v1.EgressAssignments/Watch`: one client's stream as a small state machine (wait for the first
//! assignments, snapshot or replay, live deltas, reset to a snapshot when lagging or when the node's zone changes).
//!
//! The service is written by hand rather than generated so the stream can carry [`WireEvent`]s: events whose
//! policy is already encoded, once per zone view and change, and shared by every client of that view. The
//! generated server would take an owned `EgressWatchEvent` per client and encode it per client. The wire format is
//! the same `causeway.v1.EgressAssignments/Watch`, so clients use the generated client as before.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use causeway_api::v1::egress_assignments_server::SERVICE_NAME;
use causeway_api::v1::{egress_watch_event::Kind, EgressWatchRequest};
use futures::Stream;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::convert::WireEvent;
use super::hub::{AssignmentHub, Current, Delta, Inner, Start, Subscription};

const WATCH_PATH: &str = "/causeway.v1.EgressAssignments/Watch";

/// The tonic service (`causeway.v1.EgressAssignments`); build it with [`AssignmentHub::service`].
#[derive(Clone)]
pub struct AssignmentsService {
    hub: AssignmentHub,
}

impl AssignmentHub {
    /// The gRPC service to add to a `tonic::transport::Server`.
    pub fn service(&self) -> AssignmentsService {
        AssignmentsService { hub: self.clone() }
    }
}

/// Serves the stream on an already bound listener (bind first, so readiness can mean "accepting").
pub async fn serve(listener: TcpListener, hub: AssignmentHub) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(hub.service())
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WireEvent, Status>> + Send + 'static>>;

impl NamedService for AssignmentsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AssignmentsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let method = WatchMethod(self.hub.clone());
        Box::pin(async move { Ok(Grpc::new(WatchCodec).server_streaming(method, req).await) })
    }
}

struct WatchMethod(AssignmentHub);

impl ServerStreamingService<EgressWatchRequest> for WatchMethod {
    type Response = WireEvent;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, request: Request<EgressWatchRequest>) -> Self::Future {
        let req = request.into_inner();
        // Node names are DNS subdomains; keep a hostile value from flooding logs and lookups.
        let node: String = req.node_name.chars().take(253).collect();
        let resume = (req.resume_revision != 0).then_some((req.resume_epoch, req.resume_revision));
        let client = Client::new(self.0.clone(), node, resume);
        let stream = futures::stream::unfold(client, |mut c| async move { c.next().await.map(|e| (Ok(e), c)) });
        let stream: WatchStream = Box::pin(stream);
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

/// Decodes `EgressWatchRequest`s and writes [`WireEvent`]s, whose policy bytes are copied, not re-encoded.
struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WireEvent;
    type Decode = EgressWatchRequest;
    type Encoder = WireEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> WireEncoder {
        WireEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

struct WireEncoder;

impl Encoder for WireEncoder {
    type Item = WireEvent;
    type Error = Status;

    fn encode(&mut self, item: WireEvent, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(e.to_string()))
    }
}

struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = EgressWatchRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<EgressWatchRequest>, Status> {
        EgressWatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("bad EgressWatchRequest: {e}")))
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
    pending: VecDeque<WireEvent>,
    /// A snapshot being sent, and its revision.
    snapshot: Option<(std::vec::IntoIter<Arc<Current>>, u64)>,
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
                self.pending.push_back(WireEvent::marker(Kind::SnapshotBegin, s.revision, epoch));
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

    fn delta(&self, d: &Delta) -> WireEvent {
        let epoch = self.hub.inner.epoch;
        match &d.policy {
            Some(p) => WireEvent::upsert(self.view(p), d.revision, epoch),
            None => WireEvent::delete(&d.name, d.revision, epoch),
        }
    }

    /// This node's view of `p`, shared with every other client of the same zone view.
    fn view(&self, p: &Current) -> prost::bytes::Bytes {
        p.view(self.zone.as_deref(), &self.hub.inner.metrics)
    }

    /// The next event for this client; `None` ends the stream.
    async fn next(&mut self) -> Option<WireEvent> {
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
                    Some(p) => return Some(WireEvent::upsert(self.view(&p), rev, epoch)),
                    None => {
                        self.snapshot = None;
                        return Some(WireEvent::marker(Kind::SnapshotEnd, rev, epoch));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use causeway_api::v1::EgressWatchEvent;
    use tokio::sync::watch;

    use super::*;
    use crate::core::{Gateway, GroupAssignment, PolicyAssignment};
    use crate::server::{convert, StreamConfig, StreamMetrics};

    fn gw(n: u8) -> Gateway {
        Gateway { node: format!("gw-{n}"), node_ip: IpAddr::V4(Ipv4Addr::new(172, 18, 0, n)), egress_ips: vec![] }
    }

    fn policy(generation: i64) -> PolicyAssignment {
        PolicyAssignment {
            name: "partner-api".into(),
            generation,
            destination_cidrs: vec!["198.51.100.0/24".parse().expect("cidr")],
            source_ips: (1..=50).map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))).collect(),
            groups: vec![GroupAssignment {
                egress_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20))],
                gateways: vec![gw(1), gw(2)],
                by_zone: BTreeMap::from([("z1".to_string(), vec![gw(1)]), ("z2".to_string(), vec![gw(2)])]),
                healthy: vec![],
            }],
            ..Default::default()
        }
    }

    fn assignments(generation: i64) -> BTreeMap<String, PolicyAssignment> {
        BTreeMap::from([("partner-api".to_string(), policy(generation))])
    }

    async fn next(c: &mut Client) -> WireEvent {
        tokio::time::timeout(Duration::from_secs(5), c.next()).await.expect("an event in time").expect("stream open")
    }

    fn decode(e: &WireEvent) -> EgressWatchEvent {
        EgressWatchEvent::decode(e.encode_to_vec().as_slice()).expect("a valid EgressWatchEvent")
    }

    fn gateways(e: &WireEvent) -> Vec<String> {
        let p = decode(e).policy.expect("an upsert carries its policy");
        p.groups[0].gateways.iter().map(|g| g.node_ip.clone()).collect()
    }

    #[tokio::test]
    async fn clients_of_one_zone_share_one_encoding_per_change_and_other_zones_get_their_own() {
        // a1 and a2 share z1; b1 is in z2; c1's zone is one the policy does not name and "loner" has no zone, so
        // both get the zone-agnostic view.
        let zones: BTreeMap<String, String> =
            [("a1", "z1"), ("a2", "z1"), ("b1", "z2"), ("c1", "z9")].map(|(n, z)| (n.into(), z.into())).into();
        let (_zones_tx, zones_rx) = watch::channel(zones.clone());
        let hub = AssignmentHub::new(StreamConfig::default(), StreamMetrics::default(), zones_rx);
        let encoded = || hub.metrics().views_encoded.get();
        hub.apply(&assignments(1));
        let nodes = ["a1", "a2", "b1", "c1", "loner"];
        let mut clients: Vec<Client> = nodes.iter().map(|n| Client::new(hub.clone(), n.to_string(), None)).collect();
        for c in &mut clients {
            assert_eq!(next(c).await.kind, Kind::SnapshotBegin);
            assert_eq!(next(c).await.kind, Kind::Upsert);
            assert_eq!(next(c).await.kind, Kind::SnapshotEnd);
        }
        assert_eq!(encoded(), 3, "the snapshot was encoded for z1, z2 and the agnostic view, not for 5 clients");

        hub.apply(&assignments(2));
        let mut events = Vec::new();
        for c in &mut clients {
            events.push(next(c).await);
        }
        assert_eq!(encoded(), 6, "the change was encoded once per view (3), not once per client (5)");

        let bytes: Vec<&prost::bytes::Bytes> = events.iter().map(|e| e.policy.as_ref().expect("upsert")).collect();
        assert_eq!(bytes[0].as_ptr(), bytes[1].as_ptr(), "a1 and a2 are sent the very same buffer");
        assert_eq!(bytes[3].as_ptr(), bytes[4].as_ptr(), "an unnamed zone and no zone share the agnostic buffer");
        assert_ne!(bytes[0].as_ptr(), bytes[2].as_ptr(), "z2 has its own");

        // Each client's event is exactly what converting the policy for its own zone gives.
        let (epoch, rev) = (hub.epoch(), hub.revision());
        for (node, e) in nodes.iter().zip(&events) {
            let zone = zones.get(*node).map(String::as_str);
            assert_eq!(decode(e), convert::upsert(&policy(2), zone, rev, epoch), "{node}");
        }
        assert_eq!(gateways(&events[0]), vec!["172.18.0.1"]);
        assert_eq!(gateways(&events[2]), vec!["172.18.0.2"]);
        assert_eq!(gateways(&events[4]), vec!["172.18.0.1", "172.18.0.2"]);
    }

    #[tokio::test]
    async fn a_zone_change_resends_the_new_zones_view() {
        let (zones_tx, zones_rx) = watch::channel(BTreeMap::from([("a1".to_string(), "z1".to_string())]));
        let hub = AssignmentHub::new(StreamConfig::default(), StreamMetrics::default(), zones_rx);
        hub.apply(&assignments(1));
        let mut c = Client::new(hub.clone(), "a1".into(), None);
        assert_eq!(next(&mut c).await.kind, Kind::SnapshotBegin);
        assert_eq!(gateways(&next(&mut c).await), vec!["172.18.0.1"]);
        assert_eq!(next(&mut c).await.kind, Kind::SnapshotEnd);
        zones_tx.send_replace(BTreeMap::from([("a1".to_string(), "z2".to_string())]));
        assert_eq!(next(&mut c).await.kind, Kind::SnapshotBegin);
        assert_eq!(gateways(&next(&mut c).await), vec!["172.18.0.2"], "the cached z1 bytes are not reused");
        assert_eq!(next(&mut c).await.kind, Kind::SnapshotEnd);
    }
}

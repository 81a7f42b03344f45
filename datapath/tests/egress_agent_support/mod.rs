//! Shared by the `egress_agent_*` and `probe_*` tests: a small EgressAssignments server (snapshot, then live
//! upserts; no resume: every connection gets a fresh snapshot, which the agent's protocol allows) and a guard
//! for the agent binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Child;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use causeway_api::v1 as pb;
use causeway_api::v1::egress_assignments_server::{EgressAssignments, EgressAssignmentsServer};
use causeway_api::v1::egress_watch_event::Kind;
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    policies: BTreeMap<String, pb::EgressPolicyAssignment>,
    revision: u64,
    subs: Vec<mpsc::Sender<pb::EgressWatchEvent>>,
}

/// A stand-in for egress-gw's assignment stream.
#[derive(Clone, Default)]
pub struct EgressServer {
    state: Arc<Mutex<State>>,
}

const EPOCH: u64 = 77;

fn event(kind: Kind, revision: u64, policy: Option<pb::EgressPolicyAssignment>) -> pb::EgressWatchEvent {
    pb::EgressWatchEvent { kind: kind as i32, revision, epoch: EPOCH, policy }
}

impl EgressServer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a policy and sends it to connected agents.
    pub fn upsert(&self, p: pb::EgressPolicyAssignment) {
        let mut st = self.lock();
        st.revision += 1;
        st.policies.insert(p.name.clone(), p.clone());
        let ev = event(Kind::Upsert, st.revision, Some(p));
        st.subs.retain(|s| s.try_send(ev.clone()).is_ok());
    }

    /// Serves on `listener` (in whatever netns it was bound) until the test ends.
    pub fn serve(&self, listener: std::net::TcpListener) -> Result<SocketAddr> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let svc = EgressAssignmentsServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("test EgressAssignments server stopped: {e}");
            }
        });
        Ok(addr)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::EgressWatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl EgressAssignments for EgressServer {
    type WatchStream = EventStream;

    async fn watch(&self, _req: Request<pb::EgressWatchRequest>) -> Result<Response<EventStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        let mut st = self.lock();
        let rev = st.revision;
        let first: Vec<pb::EgressWatchEvent> = std::iter::once(event(Kind::SnapshotBegin, rev, None))
            .chain(st.policies.values().map(|p| event(Kind::Upsert, rev, Some(p.clone()))))
            .chain(std::iter::once(event(Kind::SnapshotEnd, rev, None)))
            .collect();
        st.subs.push(tx);
        let live = tokio_stream::wrappers::ReceiverStream::new(rx);
        let all = futures::StreamExt::chain(futures::stream::iter(first), live);
        Ok(Response::new(Box::pin(futures::StreamExt::map(all, Ok))))
    }
}

/// One policy with one group: `sources` leave through `gateways` (node IPs) with `egress_ip`.
pub fn policy(
    name: &str,
    dst: &str,
    sources: &[&str],
    egress_ip: &str,
    gateways: &[&str],
) -> pb::EgressPolicyAssignment {
    pb::EgressPolicyAssignment {
        name: name.into(),
        generation: 1,
        destination_cidrs: vec![dst.into()],
        excluded_cidrs: vec![],
        source_ips: sources.iter().map(|s| s.to_string()).collect(),
        groups: vec![pb::EgressGroupAssignment {
            egress_ips: vec![egress_ip.into()],
            gateways: gateways
                .iter()
                .map(|g| pb::GatewayAssignment { node_ip: g.to_string(), egress_ips: vec![] })
                .collect(),
        }],
    }
}

/// Kills the child process on drop (also when the test panics).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

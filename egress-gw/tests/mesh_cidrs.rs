//! egress-gw learns the meshed clusters' pod CIDRs from identity-sync's MeshView stream (a real tonic server on
//! loopback, scripted here): the snapshot's node ranges reach the controller with the configured ones, per cluster
//! and aggregated; a delta adds a cluster; when the stream drops, what was learned stays (no Networks update that
//! forgets a cluster); after reconnecting, the new snapshot replaces the old view (a cluster gone from it is gone).

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_api::v1::mesh_view_server::{MeshView, MeshViewServer};
use causeway_api::v1::watch_event::{Kind, Object};
use causeway_api::v1::{Node, WatchEvent, WatchRequest};
use causeway_egress_gw::core::ClusterNetworks;
use causeway_egress_gw::kube::Input;
use causeway_egress_gw::mesh::{follow, MeshFollowConfig};
use causeway_egress_gw::metrics::Metrics;
use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type Events = mpsc::Receiver<Result<WatchEvent, Status>>;

/// Each Watch call takes the next scripted connection: a channel the test feeds (and drops to end the stream).
#[derive(Clone, Default)]
struct Scripted {
    connections: Arc<Mutex<VecDeque<Events>>>,
    calls: Arc<Mutex<Vec<WatchRequest>>>,
}

#[tonic::async_trait]
impl MeshView for Scripted {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(req.into_inner());
        let next = self.connections.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        match next {
            Some(rx) => Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))),
            None => Err(Status::unavailable("no more scripted connections")),
        }
    }
}

fn ev(kind: Kind, object: Option<Object>) -> Result<WatchEvent, Status> {
    Ok(WatchEvent { kind: kind as i32, revision: 1, epoch: 1, object })
}

fn node(cluster: &str, name: &str, cidrs: &[&str]) -> Option<Object> {
    Some(Object::Node(Node {
        cluster: cluster.into(),
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        ..Node::default()
    }))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

async fn next_networks(rx: &mut mpsc::Receiver<Input>) -> Result<ClusterNetworks> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(Input::Networks(n))) => return Ok(n),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the follower stopped"),
            Err(_) => bail!("no Networks update within 20 s"),
        }
    }
}

#[tokio::test]
async fn meshed_pod_cidrs_follow_the_mesh_view_stream() -> Result<()> {
    let svc = Scripted::default();
    let (first_tx, first_rx) = mpsc::channel(64);
    let (second_tx, second_rx) = mpsc::channel(64);
    svc.connections.lock().unwrap_or_else(|e| e.into_inner()).extend([first_rx, second_rx]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MeshViewServer::new(svc.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let configured = ClusterNetworks {
        pod_cidrs: vec![net("10.1.0.0/16")],
        service_cidrs: vec![net("10.96.0.0/16")],
        remote_pod_cidrs: BTreeMap::from([("legacy".to_string(), vec![net("10.50.0.0/16")])]),
    };
    let (tx, mut rx) = mpsc::channel(64);
    let metrics = Metrics::default();
    let cfg = MeshFollowConfig {
        endpoint: addr.to_string(),
        configured: configured.clone(),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    };
    let (view_tx, mut first_view) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(follow(cfg, tx, metrics.clone(), view_tx));

    // The first snapshot: west's two nodes, and garbage from a hostile remote.
    first_tx.send(ev(Kind::SnapshotBegin, None)).await?;
    first_tx.send(ev(Kind::Upsert, node("west", "w1", &["10.2.0.0/24"]))).await?;
    first_tx.send(ev(Kind::Upsert, node("west", "w2", &["10.2.1.0/24"]))).await?;
    first_tx.send(ev(Kind::Upsert, node("evil", "x", &["garbage"]))).await?;
    first_tx.send(ev(Kind::SnapshotEnd, None)).await?;
    assert!(!*first_view.borrow(), "no view before the snapshot ended");
    let n = next_networks(&mut rx).await?;
    tokio::time::timeout(Duration::from_secs(20), first_view.wait_for(|v| *v)).await??;
    assert_eq!(n.pod_cidrs, configured.pod_cidrs, "this cluster's ranges are kept");
    assert_eq!(n.service_cidrs, configured.service_cidrs);
    assert_eq!(n.remote_pod_cidrs.get("west"), Some(&vec![net("10.2.0.0/23")]));
    assert_eq!(n.remote_pod_cidrs.get("legacy"), Some(&vec![net("10.50.0.0/16")]), "--mesh-pod-cidrs are kept");
    assert!(!n.remote_pod_cidrs.contains_key("evil"), "a cluster with only garbage adds nothing");
    assert_eq!(metrics.mesh_rejected_cidrs.get(), 1);

    // A delta: north joins.
    first_tx.send(ev(Kind::Upsert, node("north", "n1", &["10.3.0.0/24"]))).await?;
    let n = next_networks(&mut rx).await?;
    assert_eq!(n.remote_pod_cidrs.get("north"), Some(&vec![net("10.3.0.0/24")]));
    assert!(n.remote_pod_cidrs.contains_key("west"));
    assert_eq!(metrics.mesh_clusters.get(), 2);

    // The stream drops: nothing forgets west or north while it reconnects...
    drop(first_tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while svc.calls.lock().unwrap_or_else(|e| e.into_inner()).len() < 2 {
        if tokio::time::Instant::now() > deadline {
            bail!("the follower never reconnected");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rx.try_recv().is_err(), "no Networks update while disconnected");
    // ...and the new snapshot replaces the view: north left the mesh meanwhile.
    second_tx.send(ev(Kind::SnapshotBegin, None)).await?;
    second_tx.send(ev(Kind::Upsert, node("west", "w1", &["10.2.0.0/24"]))).await?;
    second_tx.send(ev(Kind::Upsert, node("west", "w2", &["10.2.1.0/24"]))).await?;
    second_tx.send(ev(Kind::SnapshotEnd, None)).await?;
    let n = next_networks(&mut rx).await.context("after the resync")?;
    assert!(!n.remote_pod_cidrs.contains_key("north"), "{:?}", n.remote_pod_cidrs);
    assert_eq!(n.remote_pod_cidrs.get("west"), Some(&vec![net("10.2.0.0/23")]));
    let calls = svc.calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(calls.iter().all(|c| c.resume_revision == 0), "each connection starts from a snapshot");

    follower.abort();
    server.abort();
    Ok(())
}

/// The assignment stream's gate: shut until the controller synced and the mesh view arrived, or until the patience
/// ran out after the controller synced (identity-sync down must not hold egress back forever).
#[tokio::test]
async fn assignments_wait_for_the_mesh_view_but_not_forever() -> Result<()> {
    use causeway_egress_gw::mesh::gate;
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let (mesh_tx, mesh) = tokio::sync::watch::channel(false);
    let (mut open, _task) = gate(synced, mesh, Duration::from_secs(3600));
    mesh_tx.send_replace(true);
    tokio::task::yield_now().await;
    assert!(!*open.borrow(), "open before the controller synced");
    synced_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(20), open.wait_for(|o| *o)).await??;

    // identity-sync never answers: the gate opens after the patience, counted from the controller's sync.
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let (_mesh_tx, mesh) = tokio::sync::watch::channel(false);
    let (mut open, _task) = gate(synced, mesh, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!*open.borrow(), "the patience counts from the controller's sync, not from the start");
    synced_tx.send_replace(true);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), open.wait_for(|o| *o)).await??;
    assert!(started.elapsed() >= Duration::from_millis(300), "opened before the patience ran out");
    Ok(())
}

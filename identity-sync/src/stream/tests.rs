//! In-process tonic server on 127.0.0.1:0 with a real tonic client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::watch_event::{Kind as EvKind, Object};
use causeway_api::v1::{WatchEvent, WatchRequest};
use causeway_store::validate::RemoteEntry;
use causeway_store::{ClusterId, ClusterName, IpCacheEntry, MaxConnectedClusters, RemoteContext};
use tonic::Streaming;

use super::*;
use crate::core::{CoreConfig, MergedView};

const EAST: &str = "east";

fn hub(cfg: StreamConfig) -> MeshViewHub {
    let mut v = MergedView::new(CoreConfig::default());
    let mode = MaxConnectedClusters::C255;
    v.remote_added(EAST).unwrap();
    v.remote_validated(RemoteContext {
        name: ClusterName::new(EAST).unwrap(),
        id: ClusterId::new(1, mode).unwrap(),
        mode,
    })
    .unwrap();
    MeshViewHub::new(v, cfg, StreamMetrics::default())
}

fn entry(i: u32, identity: u32) -> RemoteEntry {
    RemoteEntry::Ip(IpCacheEntry {
        ip: IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i)),
        host_ip: None,
        id: (1 << 16) + identity,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: format!("pod-{i}"),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    })
}

fn put(hub: &MeshViewHub, i: u32, identity: u32) {
    hub.update(|v| v.entry_upsert(EAST, entry(i, identity))).unwrap();
}

async fn serve(hub: &MeshViewHub) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = hub.server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn watch(addr: SocketAddr, epoch: u64, rev: u64) -> Streaming<WatchEvent> {
    watch_with_window(addr, epoch, rev, None).await
}

/// `window` sets the client's HTTP/2 receive windows; a small one makes a non-reading client push back early.
async fn watch_with_window(addr: SocketAddr, epoch: u64, rev: u64, window: Option<u32>) -> Streaming<WatchEvent> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await
        .unwrap();
    let mut c = MeshViewClient::new(ch);
    c.watch(WatchRequest { resume_revision: rev, node_name: "node-1".into(), resume_epoch: epoch })
        .await
        .unwrap()
        .into_inner()
}

async fn next(s: &mut Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("an event within 20s")
        .expect("stream ok")
        .expect("stream open")
}

fn kind(e: &WatchEvent) -> EvKind {
    EvKind::try_from(e.kind).unwrap_or(EvKind::Unspecified)
}

fn ip_of(e: &WatchEvent) -> String {
    match &e.object {
        Some(Object::Ipcache(i)) => i.ip.clone(),
        other => panic!("not an ipcache event: {other:?}"),
    }
}

/// Reads one full snapshot; returns its revision and object count.
async fn read_snapshot(s: &mut Streaming<WatchEvent>) -> (u64, usize) {
    let begin = next(s).await;
    assert_eq!(kind(&begin), EvKind::SnapshotBegin);
    let mut n = 0;
    loop {
        let e = next(s).await;
        assert_eq!(e.revision, begin.revision, "every snapshot event carries the snapshot revision");
        match kind(&e) {
            EvKind::Upsert => n += 1,
            EvKind::SnapshotEnd => return (begin.revision, n),
            k => panic!("unexpected {k:?} inside a snapshot"),
        }
    }
}

#[tokio::test]
async fn snapshot_then_deltas() {
    let hub = hub(StreamConfig::default());
    for i in 0..3 {
        put(&hub, i, 1);
    }
    let addr = serve(&hub).await;
    let mut s = watch(addr, 0, 0).await;
    let (rev, n) = read_snapshot(&mut s).await;
    assert_eq!((rev, n), (3, 3));
    assert_eq!(hub.metrics().snapshots_sent.get(), 1);
    assert_eq!(hub.metrics().clients_connected.get(), 1);

    put(&hub, 10, 1);
    let e = next(&mut s).await;
    assert_eq!((kind(&e), e.revision, e.epoch), (EvKind::Upsert, 4, hub.epoch()));
    assert_eq!(ip_of(&e), "10.1.0.10");
    hub.update(|v| v.entry_delete(EAST, "cilium/state/ip/v1/default/10.1.0.10")).unwrap();
    let e = next(&mut s).await;
    assert_eq!((kind(&e), e.revision, ip_of(&e).as_str()), (EvKind::Delete, 5, "10.1.0.10"));
    // Re-putting an unchanged value is no delta at all.
    put(&hub, 0, 1);
    assert_eq!(hub.read(|v| v.revision()), 5);

    drop(s);
    // The gauge follows the client going away (tonic drops the stream when the connection closes).
    for _ in 0..200 {
        if hub.metrics().clients_connected.get() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hub.metrics().clients_connected.get(), 0);
}

#[tokio::test]
async fn resume_gets_only_missed_deltas() {
    let hub = hub(StreamConfig::default());
    put(&hub, 0, 1);
    let addr = serve(&hub).await;
    let mut s = watch(addr, 0, 0).await;
    let (rev, _) = read_snapshot(&mut s).await;
    drop(s);

    put(&hub, 1, 1);
    put(&hub, 2, 1);
    put(&hub, 0, 2);
    let mut s = watch(addr, hub.epoch(), rev).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = next(&mut s).await;
        assert_eq!(kind(&e), EvKind::Upsert);
        got.push((e.revision, ip_of(&e)));
    }
    assert_eq!(
        got,
        vec![(rev + 1, "10.1.0.1".to_string()), (rev + 2, "10.1.0.2".to_string()), (rev + 3, "10.1.0.0".to_string())]
    );
    assert_eq!(hub.metrics().resumes.get(), 1);
    assert_eq!(hub.metrics().snapshots_sent.get(), 1);
    // And it stays live.
    put(&hub, 3, 1);
    assert_eq!(next(&mut s).await.revision, rev + 4);

    // Up to date: a resume sends nothing until the next change.
    drop(s);
    let mut s = watch(addr, hub.epoch(), rev + 4).await;
    put(&hub, 4, 1);
    let e = next(&mut s).await;
    assert_eq!((kind(&e), e.revision), (EvKind::Upsert, rev + 5));
}

#[tokio::test]
async fn resume_outside_the_log_or_epoch_gets_a_snapshot() {
    let hub = hub(StreamConfig { client_queue: 64, delta_log: 4 });
    for i in 0..10 {
        put(&hub, i, 1);
    }
    assert_eq!(hub.delta_log_len(), 4);
    let addr = serve(&hub).await;
    // Revision 2 is older than the log (which holds 7..=10).
    let mut s = watch(addr, hub.epoch(), 2).await;
    assert_eq!(read_snapshot(&mut s).await, (10, 10));
    // Revision 6 is just covered: deltas 7..=10.
    let mut s = watch(addr, hub.epoch(), 6).await;
    assert_eq!(next(&mut s).await.revision, 7);
    // Another epoch (the server restarted): snapshot, even for a covered revision.
    let mut s = watch(addr, hub.epoch() + 1, 8).await;
    assert_eq!(read_snapshot(&mut s).await, (10, 10));
    // A revision from the future (a newer server's): snapshot.
    let mut s = watch(addr, hub.epoch(), 99).await;
    assert_eq!(read_snapshot(&mut s).await, (10, 10));
    assert_eq!(hub.metrics().snapshots_sent.get(), 3);
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_hold_back_a_fast_one() {
    const QUEUE: usize = 64;
    const BATCHES: u32 = 200;
    const BATCH: u32 = 50;
    let hub = hub(StreamConfig { client_queue: QUEUE, delta_log: 128 });
    let addr = serve(&hub).await;
    let mut fast = watch(addr, 0, 0).await;
    let (rev0, _) = read_snapshot(&mut fast).await;
    // Never read: its HTTP/2 window (64 KiB) fills, then its queue on the server.
    let _slow = watch_with_window(addr, 0, 0, Some(65_535)).await;

    let mut expect = rev0;
    for b in 0..BATCHES {
        hub.update(|v| {
            for i in 0..BATCH {
                // Pod names make each event big enough that the slow client's windows fill quickly.
                v.entry_upsert(EAST, entry(b * BATCH + i, 1)).unwrap();
            }
        });
        for _ in 0..BATCH {
            let e = next(&mut fast).await;
            expect += 1;
            assert_eq!((kind(&e), e.revision), (EvKind::Upsert, expect), "the fast client gets every delta in order");
        }
        assert!(hub.client_queue_lens().iter().all(|l| *l <= QUEUE), "queues stay bounded");
    }
    // The slow client was dropped from the hub for lagging; it is reset to a snapshot when next polled.
    let subscribers = hub.client_queue_lens().len();
    assert!(
        subscribers == 1 || hub.metrics().lagging_client_resets.get() >= 1,
        "the slow client was dropped or reset ({subscribers} subscribers)"
    );
    assert!(hub.client_queue_lens().iter().all(|l| *l <= QUEUE));
    assert!(hub.delta_log_len() <= 128);
}

#[tokio::test]
async fn a_lagging_client_catches_up_with_a_fresh_snapshot() {
    let hub = hub(StreamConfig { client_queue: 4, delta_log: 16 });
    let addr = serve(&hub).await;
    let mut s = watch(addr, 0, 0).await;
    assert_eq!(read_snapshot(&mut s).await, (0, 0));
    // One batch larger than the queue: the client cannot hold it and is reset.
    hub.update(|v| {
        for i in 0..10 {
            v.entry_upsert(EAST, entry(i, 1)).unwrap();
        }
    });
    assert_eq!(read_snapshot(&mut s).await, (10, 10));
    assert_eq!(hub.metrics().lagging_client_resets.get(), 1);
    put(&hub, 11, 1);
    assert_eq!(next(&mut s).await.revision, 11);
}

#[test]
fn metrics_register_with_the_runtime_registry() {
    let health = causeway_runtime::Health::new();
    let m = StreamMetrics::default();
    m.register(&health);
    m.lagging_client_resets.inc();
    let text = health.render_metrics();
    assert!(text.contains("causeway_meshview_lagging_client_resets_total 1"), "{text}");
    assert!(text.contains("causeway_meshview_clients_connected 0"), "{text}");
}

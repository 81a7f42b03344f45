//! The EgressAssignments stream over a real tonic server and client on loopback: snapshot framing, one delta per
//! changed or removed policy, resume within an epoch, snapshots when the resume point is gone, the per-node zone
//! view, and a client that never reads not holding back another. Waiting has a generous deadline; nothing asserts
//! on timing.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_api::v1::egress_assignments_client::EgressAssignmentsClient;
use causeway_api::v1::egress_watch_event::Kind;
use causeway_api::v1::{EgressPolicyAssignment, EgressWatchEvent, EgressWatchRequest};
use causeway_egress_gw::core::{Gateway, GroupAssignment, PolicyAssignment};
use causeway_egress_gw::server::{serve, AssignmentHub, StreamConfig, StreamMetrics};
use tokio::sync::watch;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn gw(node: &str, node_ip: &str) -> Gateway {
    Gateway { node: node.into(), node_ip: ip(node_ip), egress_ips: vec![] }
}

/// A policy whose single group has gw-a (eu-1a) and gw-b (eu-1b), zone-aware.
fn policy(name: &str, generation: i64) -> PolicyAssignment {
    PolicyAssignment {
        name: name.into(),
        generation,
        destination_cidrs: vec!["198.51.100.0/24".parse().expect("cidr")],
        excluded_cidrs: vec![],
        source_ips: vec![ip("10.0.1.5")],
        groups: vec![GroupAssignment {
            egress_ips: vec![ip("192.0.2.20")],
            gateways: vec![gw("gw-a", "172.18.0.11"), gw("gw-b", "172.18.0.12")],
            by_zone: BTreeMap::from([
                ("eu-1a".to_string(), vec![gw("gw-a", "172.18.0.11")]),
                ("eu-1b".to_string(), vec![gw("gw-b", "172.18.0.12")]),
            ]),
            healthy: vec![ip("172.18.0.11"), ip("172.18.0.12")],
        }],
    }
}

fn set(ps: &[PolicyAssignment]) -> BTreeMap<String, PolicyAssignment> {
    ps.iter().map(|p| (p.name.clone(), p.clone())).collect()
}

struct Server {
    hub: AssignmentHub,
    zones: watch::Sender<BTreeMap<String, String>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(cfg: StreamConfig) -> Result<Server> {
    let zones = watch::channel(BTreeMap::from([
        ("w-a".to_string(), "eu-1a".to_string()),
        ("w-b".to_string(), "eu-1b".to_string()),
    ]))
    .0;
    let hub = AssignmentHub::new(cfg, StreamMetrics::default(), zones.subscribe());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn({
        let hub = hub.clone();
        async move {
            if let Err(e) = serve(listener, hub).await {
                eprintln!("server ended: {e}");
            }
        }
    });
    Ok(Server { hub, zones, addr, task })
}

async fn watch_from(addr: SocketAddr, node: &str, resume: Option<(u64, u64)>) -> Result<Streaming<EgressWatchEvent>> {
    let mut client = EgressAssignmentsClient::connect(format!("http://{addr}")).await?;
    let (resume_epoch, resume_revision) = resume.unwrap_or((0, 0));
    let req = EgressWatchRequest { node_name: node.into(), resume_epoch, resume_revision };
    Ok(client.watch(req).await?.into_inner())
}

async fn next(s: &mut Streaming<EgressWatchEvent>) -> Result<EgressWatchEvent> {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(e))) => Ok(e),
        Ok(Ok(None)) => bail!("stream ended"),
        Ok(Err(e)) => bail!("stream failed: {e}"),
        Err(_) => bail!("no event within {WAIT:?}"),
    }
}

fn kind(e: &EgressWatchEvent) -> Kind {
    Kind::try_from(e.kind).unwrap_or(Kind::Unspecified)
}

/// Reads a whole snapshot; returns its revision, epoch and policies.
async fn snapshot(s: &mut Streaming<EgressWatchEvent>) -> Result<(u64, u64, BTreeMap<String, EgressPolicyAssignment>)> {
    let begin = next(s).await?;
    if kind(&begin) != Kind::SnapshotBegin {
        bail!("expected SNAPSHOT_BEGIN, got {begin:?}");
    }
    let mut policies = BTreeMap::new();
    loop {
        let e = next(s).await?;
        if e.revision != begin.revision || e.epoch != begin.epoch {
            bail!("snapshot event at another revision or epoch: {e:?} (began at {begin:?})");
        }
        match kind(&e) {
            Kind::Upsert => {
                let p = e.policy.context("UPSERT without a policy")?;
                policies.insert(p.name.clone(), p);
            }
            Kind::SnapshotEnd => return Ok((begin.revision, begin.epoch, policies)),
            other => bail!("unexpected {other:?} inside a snapshot"),
        }
    }
}

fn gateway_ips(p: &EgressPolicyAssignment) -> Vec<&str> {
    p.groups[0].gateways.iter().map(|g| g.node_ip.as_str()).collect()
}

#[tokio::test]
async fn snapshot_then_one_delta_per_changed_or_removed_policy() -> Result<()> {
    let srv = start(StreamConfig::default()).await?;
    srv.hub.apply(&set(&[policy("a", 1), policy("b", 1)]));
    let mut s = watch_from(srv.addr, "w-x", None).await?;
    let (rev, epoch, policies) = snapshot(&mut s).await?;
    assert_eq!(rev, 2, "two policies published, one revision each");
    assert_eq!(epoch, srv.hub.epoch());
    assert_eq!(policies.keys().collect::<Vec<_>>(), vec!["a", "b"]);
    let a = &policies["a"];
    assert_eq!(a.destination_cidrs, vec!["198.51.100.0/24"]);
    assert_eq!(a.source_ips, vec!["10.0.1.5"]);
    assert_eq!(a.groups[0].egress_ips, vec!["192.0.2.20"]);

    // b changes and c appears: two UPSERTs; a is untouched and not re-sent.
    srv.hub.apply(&set(&[policy("a", 1), policy("b", 2), policy("c", 1)]));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision, e.epoch), (Kind::Upsert, 3, epoch));
    assert_eq!(e.policy.as_ref().map(|p| (p.name.as_str(), p.generation)), Some(("b", 2)));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Upsert, 4));
    assert_eq!(e.policy.as_ref().map(|p| p.name.as_str()), Some("c"));

    // a is deleted: a DELETE carrying only the name.
    srv.hub.apply(&set(&[policy("b", 2), policy("c", 1)]));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Delete, 5));
    assert_eq!(e.policy, Some(EgressPolicyAssignment { name: "a".into(), ..Default::default() }));
    Ok(())
}

#[tokio::test]
async fn nothing_is_sent_before_the_first_assignments() -> Result<()> {
    // An empty snapshot from a controller that has not listed the cluster yet would wipe every agent.
    let srv = start(StreamConfig::default()).await?;
    let mut s = watch_from(srv.addr, "w-a", None).await?;
    let early = tokio::time::timeout(Duration::from_millis(300), s.message()).await;
    assert!(early.is_err(), "got {early:?} before the controller published anything");
    srv.hub.apply(&set(&[policy("a", 1)]));
    let (rev, _, policies) = snapshot(&mut s).await?;
    assert_eq!((rev, policies.len()), (1, 1));
    Ok(())
}

#[tokio::test]
async fn resume_in_the_same_epoch_gets_only_the_missed_deltas() -> Result<()> {
    let srv = start(StreamConfig::default()).await?;
    srv.hub.apply(&set(&[policy("a", 1)]));
    let mut s = watch_from(srv.addr, "w-a", None).await?;
    let (rev, epoch, _) = snapshot(&mut s).await?;
    drop(s);
    // Missed while disconnected: a changes, b appears.
    srv.hub.apply(&set(&[policy("a", 2), policy("b", 1)]));

    let mut s = watch_from(srv.addr, "w-a", Some((epoch, rev))).await?;
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Upsert, rev + 1), "a delta, not a snapshot: {e:?}");
    assert_eq!(e.policy.as_ref().map(|p| (p.name.as_str(), p.generation)), Some(("a", 2)));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Upsert, rev + 2));
    // And live deltas follow on the same stream.
    srv.hub.apply(&set(&[policy("b", 1)]));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Delete, rev + 3));

    // Resuming at the current revision: no snapshot, just the next delta when it comes.
    let mut s = watch_from(srv.addr, "w-a", Some((epoch, rev + 3))).await?;
    srv.hub.apply(&set(&[policy("b", 2)]));
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Upsert, rev + 4));
    assert_eq!(srv.hub.metrics().resumes.get(), 2);
    Ok(())
}

#[tokio::test]
async fn resume_from_another_epoch_or_a_revision_no_longer_held_gets_a_snapshot() -> Result<()> {
    let srv = start(StreamConfig { client_queue: 64, delta_log: 2 }).await?;
    for g in 1..=5 {
        srv.hub.apply(&set(&[policy("a", g)]));
    }
    let epoch = srv.hub.epoch();
    // Another process's epoch: revision 4 means nothing here.
    let mut s = watch_from(srv.addr, "w-a", Some((epoch.wrapping_add(1), 4))).await?;
    let (rev, e, policies) = snapshot(&mut s).await?;
    assert_eq!((rev, e), (5, epoch));
    assert_eq!(policies["a"].generation, 5);
    // The log holds revisions 4 and 5 only: resuming after 2 would miss revision 3.
    let mut s = watch_from(srv.addr, "w-a", Some((epoch, 2))).await?;
    let (rev, _, _) = snapshot(&mut s).await?;
    assert_eq!(rev, 5);
    // After 3 the log still has everything (4, 5): deltas only.
    let mut s = watch_from(srv.addr, "w-a", Some((epoch, 3))).await?;
    let e = next(&mut s).await?;
    assert_eq!((kind(&e), e.revision), (Kind::Upsert, 4));
    Ok(())
}

#[tokio::test]
async fn each_node_gets_the_gateways_of_its_zone() -> Result<()> {
    let srv = start(StreamConfig::default()).await?;
    srv.hub.apply(&set(&[policy("a", 1)]));
    let (_, _, in_a) = snapshot(&mut watch_from(srv.addr, "w-a", None).await?).await?;
    assert_eq!(gateway_ips(&in_a["a"]), vec!["172.18.0.11"]);
    let (_, _, in_b) = snapshot(&mut watch_from(srv.addr, "w-b", None).await?).await?;
    assert_eq!(gateway_ips(&in_b["a"]), vec!["172.18.0.12"]);
    // A node without a zone label uses the zone-agnostic set.
    let (_, _, no_zone) = snapshot(&mut watch_from(srv.addr, "w-nozone", None).await?).await?;
    assert_eq!(gateway_ips(&no_zone["a"]), vec!["172.18.0.11", "172.18.0.12"]);

    // Deltas are resolved per node too.
    let mut s = watch_from(srv.addr, "w-b", None).await?;
    snapshot(&mut s).await?;
    let mut p = policy("a", 2);
    p.groups[0].by_zone.insert("eu-1b".into(), vec![gw("gw-c", "172.18.0.13")]);
    srv.hub.apply(&set(&[p]));
    let e = next(&mut s).await?;
    assert_eq!(gateway_ips(e.policy.as_ref().context("policy")?), vec!["172.18.0.13"]);

    // The node moves to eu-1a: its view is rebuilt with a fresh snapshot.
    srv.zones.send_modify(|z| {
        z.insert("w-b".into(), "eu-1a".into());
    });
    let (_, _, moved) = snapshot(&mut s).await?;
    assert_eq!(gateway_ips(&moved["a"]), vec!["172.18.0.11"]);
    Ok(())
}

/// A policy big enough (about 200 KB on the wire) that a few of them fill HTTP/2 flow-control windows.
fn big_policy(generation: i64) -> PolicyAssignment {
    let mut p = policy("big", generation);
    p.source_ips = (0..20_000u32).map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))).collect();
    p
}

#[tokio::test]
async fn a_client_that_never_reads_neither_blocks_others_nor_grows_without_bound() -> Result<()> {
    const QUEUE: usize = 4;
    let srv = start(StreamConfig { client_queue: QUEUE, delta_log: 16 }).await?;
    srv.hub.apply(&set(&[big_policy(1)]));
    // Separate connections, so the stalled one's flow control cannot hold back the other's.
    let mut stalled = watch_from(srv.addr, "w-a", None).await?;
    let mut reader = watch_from(srv.addr, "w-b", None).await?;
    snapshot(&mut reader).await?;

    let updates = 120;
    for g in 2..=updates {
        srv.hub.apply(&set(&[big_policy(g)]));
        let e = next(&mut reader).await.with_context(|| format!("reader stuck at generation {g}"))?;
        assert_eq!(e.policy.as_ref().map(|p| p.generation), Some(g));
        let lens = srv.hub.client_queue_lens();
        assert!(lens.iter().all(|l| *l <= QUEUE), "a queue grew past its bound: {lens:?}");
    }
    // ~24 MB were published; the stalled client's queue overflowed and it left the fan-out.
    assert_eq!(srv.hub.client_queue_lens().len(), 1, "only the reader is still fanned out to");

    // When it finally reads, it gets whatever was in flight and then a fresh snapshot of the latest state.
    let mut seen = 0;
    loop {
        let e = next(&mut stalled).await?;
        seen += 1;
        if kind(&e) == Kind::SnapshotBegin && seen > 1 {
            let p = next(&mut stalled).await?.policy.context("snapshot upsert")?;
            assert_eq!(p.generation, updates);
            assert_eq!(kind(&next(&mut stalled).await?), Kind::SnapshotEnd);
            break;
        }
        if seen > updates as usize * 3 {
            bail!("no fresh snapshot after {seen} events");
        }
    }
    assert_eq!(srv.hub.metrics().lagging_client_resets.get(), 1);
    Ok(())
}

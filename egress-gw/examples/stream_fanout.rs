//! How long the EgressAssignments stream takes to deliver one policy change to every watching node agent, as the
//! number of agents grows. This is the "publish" share of a failover, after the probe verdict flipped a gateway
//! and the controller recomputed. Agents are spread over two zones; the server converts and encodes each change
//! once per zone view and sends those bytes to every agent of the zone, so what still grows with agents is
//! framing, HTTP/2 writes and (here, in the same process) the agents' own decoding.
//!
//! `cargo run --release -p causeway-egress-gw --example stream_fanout` prints, per agent count, the p50 and p99
//! over 20 changes of the time from `AssignmentHub::apply` to the last agent holding the change, beside the
//! single-agent baseline of the same run, and how many policy encodings the server made per change. Agents run in
//! the same process over loopback gRPC, so their decoding shares the machine with the server.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_api::v1::egress_assignments_client::EgressAssignmentsClient;
use causeway_api::v1::egress_watch_event::Kind;
use causeway_api::v1::EgressWatchRequest;
use causeway_egress_gw::core::{Gateway, GroupAssignment, PolicyAssignment};
use causeway_egress_gw::server::{serve, AssignmentHub, StreamConfig, StreamMetrics};
use tokio::sync::{mpsc, watch};

const SOURCES: u32 = 1_000;
const TRIALS: usize = 20;

fn policy(generation: i64) -> PolicyAssignment {
    let gw = |n: u8| Gateway {
        node: format!("gw-{n}"),
        node_ip: IpAddr::V4(Ipv4Addr::new(172, 18, 0, n)),
        egress_ips: vec![],
    };
    PolicyAssignment {
        name: "partner-api".into(),
        generation,
        destination_cidrs: vec!["198.51.100.0/24".parse().expect("cidr")],
        excluded_cidrs: vec![],
        source_ips: (0..SOURCES).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))).collect(),
        groups: vec![GroupAssignment {
            egress_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20))],
            gateways: vec![gw(1), gw(2)],
            by_zone: BTreeMap::from([("z1".to_string(), vec![gw(1)]), ("z2".to_string(), vec![gw(2)])]),
            healthy: vec![],
        }],
    }
}

/// Waits until every agent received `generation`; returns when the last one did.
async fn wait_all(
    rx: &mut mpsc::UnboundedReceiver<(usize, i64, Instant)>,
    agents: usize,
    generation: i64,
) -> Result<Instant> {
    let mut seen = vec![false; agents];
    let mut left = agents;
    let mut last = None;
    while left > 0 {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some((i, g, at))) if g == generation && !seen[i] => {
                seen[i] = true;
                left -= 1;
                last = Some(at);
            }
            Ok(Some(_)) => {}
            _ => bail!("agents stopped receiving"),
        }
    }
    last.ok_or_else(|| anyhow::anyhow!("no agents"))
}

/// Runs `agents` watchers; returns (p50, p99) of the delivery time to the last of them and the policy encodings
/// the server made per change.
async fn run(agents: usize) -> Result<(Duration, Duration, f64)> {
    let zones: BTreeMap<String, String> = (0..agents).map(|i| (format!("n{i}"), format!("z{}", 1 + i % 2))).collect();
    let zones_tx = watch::channel(zones).0;
    let hub = AssignmentHub::new(StreamConfig::default(), StreamMetrics::default(), zones_tx.subscribe());
    hub.apply(&BTreeMap::from([("partner-api".to_string(), policy(1))]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve(listener, hub.clone()));

    // Each agent reports (agent, generation, when) for every UPSERT it receives.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, i64, Instant)>();
    let mut tasks = Vec::new();
    for i in 0..agents {
        let mut client = EgressAssignmentsClient::connect(format!("http://{addr}")).await?;
        let req = EgressWatchRequest { node_name: format!("n{i}"), ..Default::default() };
        let mut stream = client.watch(req).await?.into_inner();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(e)) = stream.message().await {
                if e.kind == Kind::Upsert as i32 {
                    let g = e.policy.map_or(0, |p| p.generation);
                    if tx.send((i, g, Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    wait_all(&mut rx, agents, 1).await?;
    let encoded_before = hub.metrics().views_encoded.get();
    let mut times = Vec::new();
    for g in 2..(2 + TRIALS as i64) {
        let t0 = Instant::now();
        hub.apply(&BTreeMap::from([("partner-api".to_string(), policy(g))]));
        let last = wait_all(&mut rx, agents, g).await?;
        times.push(last.duration_since(t0));
    }
    for t in tasks {
        t.abort();
    }
    server.abort();
    let per_change = (hub.metrics().views_encoded.get() - encoded_before) as f64 / TRIALS as f64;
    times.sort();
    Ok((times[TRIALS / 2], times[TRIALS - 1], per_change))
}

#[tokio::main]
async fn main() -> Result<()> {
    println!("one policy with {SOURCES} source IPs, 2 zones; {TRIALS} changes per row");
    let (b50, b99, b_enc) = run(1).await?;
    println!("{:>7} agents: p50 {:>8.2?}  p99 {:>8.2?}  (baseline)  encodings/change {b_enc:.1}", 1, b50, b99);
    for agents in [10, 100, 300] {
        let (p50, p99, enc) = run(agents).await?;
        let ratio = p50.as_secs_f64() / b50.as_secs_f64().max(1e-9);
        println!(
            "{agents:>7} agents: p50 {p50:>8.2?}  p99 {p99:>8.2?}  ({ratio:.1}x the baseline p50)  encodings/change {enc:.1}"
        );
    }
    Ok(())
}

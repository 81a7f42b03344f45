//! export: throughput of the apiserver's write path for 100k pods (ipcache + identities) against raw etcd puts.
//!
//! Measured (a): clustermesh-apiserver's real export loop (`kube::ExportLoop`: the sans-IO `Exporter`, the
//! in-process `LocalAllocator`, and `EtcdSink` = one kvstore `SyncStore` per kind with its coalescing, txn batching,
//! lease pool and synced canaries) fed the converted watch events of 100 namespaces and 100k pods, as its kube
//! watchers would deliver an initial list; timed until it reports ready (everything flushed, canaries written).
//! Measured (b): the kvstore alone: the same keys and values upserted into two `SyncStore`s, until both canaries.
//! Baseline: raw etcd-client txns of 128 puts (etcd's max-txn-ops), 8 txns in flight, on 4 leases, of exactly the
//! keys and values (a) wrote (read back from its etcd). Each run uses a fresh etcd.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use causeway_bench::data::{self, Scale, CLUSTER, CLUSTER_ID};
use causeway_bench::raw;
use causeway_bench::report::{median, spread, Common, Report};
use causeway_kvstore::{LeaseConfig, LeasePool, SyncStore, SyncStoreConfig};
use causeway_runtime::Health;
use causeway_store::{ClusterInfo, Kind};
use causeway_testsupport::Etcd;
use clap::Parser;
use clustermesh_apiserver::export::model::{ContainerPortInput, NamespaceInput, PodInput};
use clustermesh_apiserver::export::Exporter;
use clustermesh_apiserver::kube::{ExportLoop, Input, Object, ObjectKind, EXPORTED_KINDS};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::sink::{EtcdSink, LocalAllocator};
use etcd_client::Client;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Export of 100k pods through the apiserver path vs raw etcd puts")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Scale factor of the synthetic cluster (1.0 = 100k pods).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Txns the raw baseline keeps in flight.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("export failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

const KINDS: [Kind; 2] = [Kind::Ip, Kind::Identities];

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let scale = Scale::scaled(args.scale);
    let mut report = Report::start("export", "apiserver export path vs raw etcd txn puts", &args.common);
    let (mut loop_s, mut store_s, mut raw_s, mut seq_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
    for run in 0..args.common.runs.max(1) {
        let etcd = Etcd::start().await;
        let client = etcd.client().await;
        loop_s.push(export_loop(&client, &scale).await?.as_secs_f64());
        if run == 0 {
            for k in KINDS {
                let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
                let prefix = k.watch_prefix(CLUSTER);
                let resp = kv.get(prefix.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await?;
                kvs.extend(
                    resp.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())),
                );
            }
            ensure!(kvs.len() as u32 == scale.pods + scale.apps, "the export wrote {} entries", kvs.len());
        }
        drop(etcd);

        let etcd = Etcd::start().await;
        store_s.push(sync_stores(&etcd.client().await, &kvs).await?.as_secs_f64());
        drop(etcd);

        let etcd = Etcd::start().await;
        raw_s.push(raw_puts(&etcd.client().await, &kvs, args.in_flight).await?.as_secs_f64());
        drop(etcd);

        let etcd = Etcd::start().await;
        seq_s.push(raw_puts(&etcd.client().await, &kvs, 1).await?.as_secs_f64());
        drop(etcd);
    }
    let n = kvs.len() as f64;
    let rate = |xs: &[f64]| xs.iter().map(|s| n / s).collect::<Vec<f64>>();
    let bytes: usize = kvs.iter().map(|(k, v)| k.len() + v.len()).sum();
    report.row(
        "entries written",
        format!("{} ({} ipcache + {} identities), {:.1} MB", kvs.len(), scale.pods, scale.apps, bytes as f64 / 1e6),
    );
    report.row(
        &format!("baseline: raw txns of 128, {} in flight", args.in_flight),
        spread(&rate(&raw_s), "entries/s", 0),
    );
    report.row("reference: raw txns of 128, 1 in flight", spread(&rate(&seq_s), "entries/s", 0));
    report.row("measured (a): apiserver ExportLoop -> SyncStores", spread(&rate(&loop_s), "entries/s", 0));
    report.row("measured (b): SyncStores alone, same keys/values", spread(&rate(&store_s), "entries/s", 0));
    let (a, b, r) = (median(&rate(&loop_s)), median(&rate(&store_s)), median(&rate(&raw_s)));
    report.row("ratio (a) / raw", format!("{:.2}x", a / r));
    report.row("ratio (b) / raw", format!("{:.2}x", b / r));
    report.row("ratio (b) / raw 1 in flight", format!("{:.2}x", b / median(&rate(&seq_s))));
    report.target(">= 0.5x raw throughput (a)", a >= 0.5 * r);
    Ok(report.finish())
}

fn inputs(scale: &Scale) -> Vec<Input> {
    let mut v = Vec::with_capacity(scale.pods as usize + 16);
    let ns_names: Vec<String> = (0..scale.namespaces).map(|n| format!("ns-{n}")).collect();
    v.push(Input::InitStart(ObjectKind::Namespace));
    for name in &ns_names {
        v.push(Input::InitApply(Object::Namespace(NamespaceInput {
            name: name.clone(),
            labels: [("kubernetes.io/metadata.name".to_string(), name.clone())].into(),
        })));
    }
    v.push(Input::InitDone(ObjectKind::Namespace));
    v.push(Input::InitStart(ObjectKind::Pod));
    for i in 0..scale.pods {
        let app = i % scale.apps;
        let e = data::ipcache_entry(CLUSTER_ID, scale, i, None);
        v.push(Input::InitApply(Object::Pod(PodInput {
            namespace: data::namespace(scale, app),
            name: data::pod_name(app, i),
            labels: data::app_labels(app),
            created: Some(1_700_000_000 + i64::from(i)),
            host_network: false,
            phase: Some("Running".into()),
            pod_ips: vec![e.ip.to_string()],
            host_ip: e.host_ip.map(|ip| ip.to_string()),
            container_ports: vec![ContainerPortInput { name: Some("http".into()), port: 8080, protocol: None }],
        })));
    }
    v.push(Input::InitDone(ObjectKind::Pod));
    for k in [ObjectKind::Node, ObjectKind::Service, ObjectKind::EndpointSlice] {
        v.push(Input::InitStart(k));
        v.push(Input::InitDone(k));
    }
    v
}

/// (a): the real export loop, from the first watch event to ready.
async fn export_loop(client: &Client, scale: &Scale) -> anyhow::Result<Duration> {
    let cluster = ClusterInfo::new(CLUSTER, CLUSTER_ID, data::mode())?;
    let inputs = inputs(scale);
    let t = Instant::now();
    let leases = LeasePool::grant(client.clone(), LeaseConfig::default()).await?;
    let sink = Arc::new(EtcdSink::start(client.clone(), leases.clone(), CLUSTER, &EXPORTED_KINDS));
    let resolver = Arc::new(LocalAllocator::new(cluster.identity_range()));
    let metrics = Metrics::default();
    let health = Health::new();
    let exporter = Exporter::new(cluster, metrics.clone());
    let readiness = clustermesh_apiserver::readiness::Readiness::new(health.clone());
    let export = ExportLoop::new(exporter, sink.clone(), resolver, readiness, metrics);
    // Like the kube watchers' channel: bounded, fed as fast as the loop takes it.
    let (tx, rx) = mpsc::channel(4096);
    let task = tokio::spawn(export.run(rx));
    for input in inputs {
        tx.send(input).await.context("export loop stopped")?;
    }
    while !health.is_ready() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = t.elapsed();
    drop(tx);
    task.await?;
    let writes: u64 = KINDS.iter().filter_map(|k| sink.store(*k)).map(|s| s.stats().snapshot().writes).sum();
    ensure!(writes >= u64::from(scale.pods + scale.apps), "only {writes} writes reached etcd");
    Ok(elapsed)
}

/// (b): the kvstore's SyncStores alone.
async fn sync_stores(client: &Client, kvs: &[(String, Vec<u8>)]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let leases = LeasePool::grant(client.clone(), LeaseConfig::default()).await?;
    let stores: Vec<SyncStore> = KINDS
        .iter()
        .map(|k| {
            let cfg = SyncStoreConfig::new(CLUSTER, k.segment(), k.watch_prefix(CLUSTER));
            SyncStore::start(client.clone(), leases.clone(), cfg)
        })
        .collect();
    for (k, v) in kvs {
        let store = stores.iter().find(|s| k.starts_with(s.prefix())).context("key outside both prefixes")?;
        store.upsert(k.as_str(), v.clone())?;
    }
    for s in &stores {
        s.mark_synced();
    }
    for s in &stores {
        s.wait_synced().await;
    }
    Ok(t.elapsed())
}

/// Baseline: raw txns of 128 puts on 4 leases.
async fn raw_puts(client: &Client, kvs: &[(String, Vec<u8>)], in_flight: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let leases = raw::grant_leases(client, 4, Duration::from_secs(900)).await?;
    raw::bulk_put(client, kvs, 128, in_flight, &leases).await?;
    Ok(t.elapsed())
}

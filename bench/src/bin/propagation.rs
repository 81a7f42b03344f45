//! propagation: latency of a pod change in a remote cluster until the local merged view emits it, at 200 changes/s
//! spread over 8 remotes.
//!
//! In-process variant (the binaries are not wired end to end yet): 8 etcds, one per remote cluster. In each, a
//! kvstore `SyncStore` (lease pool, coalescing, txns) owns the ipcache prefix, preloaded with 1000 pods and synced
//! (canary written). One reader, as identity-sync wires it: per remote a session (cluster config, canary), a
//! WatchStore, `RemoteContext::decode`, then one core loop applying into the merged view and taking its deltas. The
//! driver re-writes one existing pod's ipcache entry every 5 ms, round robin over the remotes, with the send time
//! in the pod name; latency is measured when the merged view's delta for that IP is taken (the point where the
//! gRPC stream hub would fan it out). Baseline, same etcds and rate: raw etcd-client puts, each as its own request,
//! observed by a raw watch per etcd.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway_bench::data::{self, Scale};
use causeway_bench::import;
use causeway_bench::report::{percentile, Common, Report};
use causeway_kvstore::{LeaseConfig, LeasePool, SyncStore, SyncStoreConfig};
use causeway_store::{IpCacheEntry, Kind, StoreKey};
use causeway_testsupport::Etcd;
use clap::Parser;
use etcd_client::{EventType, WatchOptions};
use identity_sync::core::{Change, CoreConfig, MergedView, ViewObject};
use tokio::sync::{mpsc, oneshot};

#[derive(Parser)]
#[command(about = "Pod change propagation latency, 8 remotes, 200 changes/s")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Remote clusters.
    #[arg(long, default_value_t = 8)]
    remotes: u32,
    /// Changes per second, over all remotes.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds measured per phase (after a 2 s warm-up).
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Pods per remote.
    #[arg(long, default_value_t = 1000)]
    pods: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("propagation failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

const WARMUP: Duration = Duration::from_secs(2);

fn cluster(r: u32) -> (String, u32) {
    (format!("remote-{r}"), 10 + r)
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut report = Report::start("propagation", "pod change -> merged view delta, in-process", &args.common);
    let etcds = futures::future::join_all((0..args.remotes).map(|_| Etcd::start())).await;
    let mut clients = Vec::new();
    for e in &etcds {
        clients.push(e.client().await);
    }
    let epoch = Instant::now();
    let scale = Scale { pods: args.pods * args.remotes, apps: 100, nodes: 10, namespaces: 10, ..Scale::FULL };
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let samples_wanted = (args.seconds as f64 * f64::from(args.rate)) as usize;
    let (remotes, pods) = (args.remotes, args.pods);

    // ---- baseline: raw put -> raw watch
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<f64>();
    let mut watchers = Vec::new();
    for c in &clients {
        let (mut wc, lat_tx) = (c.watch_client(), lat_tx.clone());
        let mut stream = wc.watch("bench/raw/", Some(WatchOptions::new().with_prefix())).await?;
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    if ev.event_type() != EventType::Put {
                        continue;
                    }
                    if let Some(t) = ev.kv().and_then(|kv| sent_at(kv.value())) {
                        let _ = lat_tx.send(now_ns(epoch).saturating_sub(t) as f64 / 1e6);
                    }
                }
            }
        }));
    }
    drop(lat_tx);
    let raw_driver = {
        let clients = clients.clone();
        async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u32;
            loop {
                tick.tick().await;
                let r = seq % remotes;
                let i = r * pods + (seq / remotes) % pods;
                let (_, id) = cluster(r);
                let e = data::ipcache_entry(id, &scale, i, Some(format!("lat-{}", now_ns(epoch))));
                let key = format!("bench/raw/{}", e.ip);
                let value = serde_json::to_vec(&e).expect("encodes");
                let mut kv = clients[r as usize].kv_client();
                tokio::spawn(async move {
                    let _ = kv.put(key, value, None).await;
                });
                seq += 1;
            }
        }
    };
    let raw = collect(raw_driver, &mut lat_rx, samples_wanted, args.rate).await;
    for w in watchers {
        w.abort();
    }

    // ---- measured: SyncStore -> WatchStore -> decode -> merged view
    let mut stores = Vec::new();
    for (r, c) in clients.iter().enumerate() {
        let (name, id) = cluster(r as u32);
        let mut c = c.clone();
        let meta = data::meta_entries(&name, id, &[]);
        for (k, v) in meta {
            c.put(k, v, None).await?;
        }
        let leases = LeasePool::grant(c.clone(), LeaseConfig::default()).await?;
        let store = SyncStore::start(c, leases, SyncStoreConfig::new(&name, "ip", Kind::Ip.watch_prefix(&name)));
        for k in 0..args.pods {
            let e = data::ipcache_entry(id, &scale, r as u32 * args.pods + k, None);
            store.upsert(StoreKey::Ip { ip: e.ip }.to_string(), serde_json::to_vec(&e)?)?;
        }
        store.mark_synced();
        stores.push(store);
    }
    for s in &stores {
        s.wait_synced().await;
    }
    let mut core = MergedView::new(CoreConfig::default());
    let (tx, mut rx) = mpsc::channel(import::CHANNEL);
    let mut readers = Vec::new();
    let mut want = HashSet::new();
    for (r, c) in clients.iter().enumerate() {
        let (name, _) = cluster(r as u32);
        let mut c = c.clone();
        let ctx = import::open_session(&mut c, &name, &[Kind::Ip]).await?;
        import::register(&mut core, &ctx)?;
        readers.push(import::spawn_readers(&c, &ctx, &[Kind::Ip], &tx));
        want.insert((Arc::<str>::from(name.as_str()), Kind::Ip));
    }
    drop(tx);
    import::run_until_listed(&mut core, &mut rx, &want).await?;
    anyhow::ensure!(core.ipcache_len() as u32 == scale.pods, "view holds {} entries", core.ipcache_len());

    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<f64>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let core_loop = tokio::spawn(async move {
        let never = HashSet::from([(Arc::<str>::from("never"), Kind::Ip)]);
        let on_deltas = |deltas: Vec<identity_sync::core::Delta>| {
            let now = now_ns(epoch);
            for d in deltas {
                if let Change::Upsert(ViewObject::Ip(v)) = d.change {
                    if let Some(t) = v.pod_name.strip_prefix("lat-").and_then(|t| t.parse::<u64>().ok()) {
                        let _ = lat_tx.send(now.saturating_sub(t) as f64 / 1e6);
                    }
                }
            }
        };
        tokio::select! {
            r = import::run_until(&mut core, &mut rx, &never, on_deltas) => r.map(|_| ()),
            _ = stop_rx => Ok(()),
        }
    });
    let driver = {
        let stores = &stores;
        async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u32;
            loop {
                tick.tick().await;
                let r = seq % remotes;
                let i = r * pods + (seq / remotes) % pods;
                let (_, id) = cluster(r);
                let e = data::ipcache_entry(id, &scale, i, Some(format!("lat-{}", now_ns(epoch))));
                let key = StoreKey::Ip { ip: e.ip }.to_string();
                let _ = stores[r as usize].upsert(key, serde_json::to_vec(&e).expect("encodes"));
                seq += 1;
            }
        }
    };
    let measured = collect(driver, &mut lat_rx, samples_wanted, args.rate).await;
    let _ = stop_tx.send(());
    core_loop.await?.context("core loop")?;
    drop(readers);

    let row = |xs: &[f64]| {
        format!(
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes)",
            percentile(xs, 50.0),
            percentile(xs, 90.0),
            percentile(xs, 99.0),
            xs.last().copied().unwrap_or(0.0),
            xs.len()
        )
    };
    report.row("setup", format!("{} remotes, {} changes/s, {} s measured", args.remotes, args.rate, args.seconds));
    report.row("baseline: raw put -> raw watch event", row(&raw));
    report.row("measured: SyncStore -> WatchStore -> view delta", row(&measured));
    let p99 = percentile(&measured, 99.0);
    report.row("ratio p99 measured / raw", format!("{:.2}x", p99 / percentile(&raw, 99.0).max(1e-3)));
    report.row(
        "ratio p50 measured / raw",
        format!("{:.2}x", percentile(&measured, 50.0) / percentile(&raw, 50.0).max(1e-3)),
    );
    report.target("p99 <= 100 ms", p99 <= 100.0);
    drop(etcds);
    Ok(report.finish())
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn sent_at(value: &[u8]) -> Option<u64> {
    let e: IpCacheEntry = serde_json::from_slice(value).ok()?;
    e.k8s_pod_name.strip_prefix("lat-")?.parse().ok()
}

/// Runs `driver` through a warm-up, then gathers `n` latencies (ms, sorted); gives up after twice the time due.
async fn collect(
    driver: impl std::future::Future<Output = ()>,
    rx: &mut mpsc::UnboundedReceiver<f64>,
    n: usize,
    rate: u32,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let due = WARMUP + Duration::from_secs_f64(2.0 * n as f64 / f64::from(rate.max(1)));
    let gather = async {
        let warm_until = Instant::now() + WARMUP;
        while let Some(ms) = rx.recv().await {
            if Instant::now() < warm_until {
                continue;
            }
            out.push(ms);
            if out.len() >= n {
                break;
            }
        }
    };
    tokio::select! {
        _ = driver => {}
        _ = gather => {}
        _ = tokio::time::sleep(due) => eprintln!("propagation: gave up waiting after {due:?}"),
    }
    out.sort_by(f64::total_cmp);
    out
}

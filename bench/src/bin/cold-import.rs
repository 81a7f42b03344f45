//! cold-import: how long identity-sync takes to import a large remote from nothing, against a raw range read of the
//! same keys.
//!
//! One etcd holds cluster `east`: 100k ipcache entries, 10k services (3 backends each), 1k nodes, 10k identities,
//! its cluster config and canaries, all in the real store encodings. Measured: open a session (marker, cluster
//! config validation, canaries), one WatchStore per kind listing its prefix, `RemoteContext::decode` of every value
//! and applying it into the identity-sync merged view core, until every kind reported ListDone. Baselines: raw
//! etcd-client range reads of the same four prefixes, concurrently, (a) paginated exactly like the WatchStore's
//! listing (1000 keys per page, pinned revision) and (b) one request per prefix.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use causeway_bench::data::{self, Scale, CLUSTER, CLUSTER_ID};
use causeway_bench::import::{self, KINDS};
use causeway_bench::raw;
use causeway_bench::report::{median, spread, Common, Report};
use causeway_kvstore::DEFAULT_PAGE_SIZE;
use causeway_store::Kind;
use causeway_testsupport::Etcd;
use clap::Parser;
use identity_sync::core::{CoreConfig, MergedView, RemoteState};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Cold import of a 100k-entry remote vs a raw etcd range read")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Scale factor of the synthetic cluster (1.0 = 100k pods).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cold-import failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let scale = Scale::scaled(args.scale);
    let mut report = Report::start("cold-import", "WatchStore + decode + merged view vs raw range read", &args.common);
    let etcd = Etcd::start().await;
    let client = etcd.client().await;

    let mut kvs = data::meta_entries(CLUSTER, CLUSTER_ID, &KINDS);
    for k in KINDS {
        kvs.extend(data::kind_entries(CLUSTER, CLUSTER_ID, &scale, k));
    }
    let t = Instant::now();
    raw::bulk_put(&client, &kvs, 128, 8, &[]).await?;
    let bytes: usize = kvs.iter().map(|(k, v)| k.len() + v.len()).sum();
    report.row(
        "dataset",
        format!(
            "{} pods, {} services x{} backends, {} nodes, {} identities: {} keys, {:.1} MB (loaded in {:.1} s)",
            scale.pods,
            scale.services,
            scale.backends_per_service,
            scale.nodes,
            scale.apps,
            kvs.len(),
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        ),
    );
    drop(kvs);

    let prefixes: Vec<String> = KINDS.iter().map(|k| k.watch_prefix(CLUSTER)).collect();
    let (mut paged, mut oneshot, mut measured) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.common.runs.max(1) {
        // Alternate the order so that neither side always reads a warmer etcd.
        let order = if run % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            match which {
                0 => {
                    let t = Instant::now();
                    let r = raw::read_prefixes(&client, &prefixes, Some(DEFAULT_PAGE_SIZE)).await?;
                    paged.push(t.elapsed().as_secs_f64());
                    ensure!(r.keys as u32 == state_keys(&scale), "raw read saw {} keys", r.keys);
                }
                1 => {
                    let t = Instant::now();
                    let r = raw::read_prefixes(&client, &prefixes, None).await?;
                    oneshot.push(t.elapsed().as_secs_f64());
                    ensure!(r.keys as u32 == state_keys(&scale), "raw one-shot read saw {} keys", r.keys);
                }
                _ => {
                    let (d, core) = cold_import(&client).await?;
                    measured.push(d.as_secs_f64());
                    check(&core, &scale)?;
                }
            }
        }
    }

    let (p, o, m) = (median(&paged), median(&oneshot), median(&measured));
    report.row("baseline: raw range read, pages of 1000 (as WatchStore)", spread(&paged, "s", 3));
    report.row("baseline: raw range read, one request per prefix", spread(&oneshot, "s", 3));
    report.row("measured: session + WatchStores + decode + merged view", spread(&measured, "s", 3));
    report.row("ratio measured / raw paginated", format!("{:.2}x", m / p));
    report.row("ratio measured / raw one-shot", format!("{:.2}x", m / o));
    report.row("measured throughput", format!("{:.0} entries/s", f64::from(state_keys(&scale)) / m));
    report.target("<= 2x raw paginated read", m <= 2.0 * p);
    report.target("<= 3 s", m <= 3.0);
    Ok(report.finish())
}

fn state_keys(s: &Scale) -> u32 {
    s.pods + s.services + s.nodes + s.apps
}

/// One cold import into a fresh merged view, timed from the session's first request to the last ListDone applied.
async fn cold_import(client: &etcd_client::Client) -> anyhow::Result<(Duration, MergedView)> {
    let t = Instant::now();
    let mut c = client.clone();
    let ctx = import::open_session(&mut c, CLUSTER, &KINDS).await?;
    let mut core = MergedView::new(CoreConfig::default());
    import::register(&mut core, &ctx)?;
    let (tx, mut rx) = mpsc::channel(import::CHANNEL);
    let readers = import::spawn_readers(client, &ctx, &KINDS, &tx);
    let name: Arc<str> = CLUSTER.into();
    let want: HashSet<(Arc<str>, Kind)> = KINDS.iter().map(|k| (name.clone(), *k)).collect();
    let applied = import::run_until_listed(&mut core, &mut rx, &want).await?;
    let elapsed = t.elapsed();
    drop(readers);
    ensure!(applied.rejected == 0, "{} values were rejected", applied.rejected);
    Ok((elapsed, core))
}

fn check(core: &MergedView, s: &Scale) -> anyhow::Result<()> {
    let status = core.remote_status(CLUSTER).context("remote missing from the view")?;
    ensure!(status.state == RemoteState::Synced, "remote is {:?}, not synced", status.state);
    ensure!(core.ipcache_len() as u32 == s.pods, "ipcache holds {}", core.ipcache_len());
    ensure!(core.identities_len() as u32 == s.apps, "identities: {}", core.identities_len());
    ensure!(core.nodes_len() as u32 == s.nodes, "nodes: {}", core.nodes_len());
    ensure!(status.entries.services == u64::from(s.services), "services: {}", status.entries.services);
    Ok(())
}

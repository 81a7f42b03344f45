//! memory: resident memory per remote ipcache entry held in the identity-sync merged view.
//!
//! The parent loads 100k ipcache entries (real store encoding) into an etcd, then runs a fresh child process of
//! this binary. The child (single-threaded runtime, so one malloc arena) connects, reads VmRSS from
//! /proc/self/status, imports the ipcache prefix through the reader pipeline (WatchStore + decode + merged view
//! core), stops the readers, drops the deltas and reads VmRSS again. The difference per entry is the figure; the
//! child also counts live heap bytes with a counting global allocator, which excludes allocator slack. The
//! comparison is the raw JSON the entries arrive as.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Context};
use causeway_bench::data::{self, Scale, CLUSTER, CLUSTER_ID};
use causeway_bench::import;
use causeway_bench::raw;
use causeway_bench::report::{median, spread, vm_rss, Common, Report};
use causeway_store::Kind;
use causeway_testsupport::Etcd;
use clap::Parser;
use identity_sync::core::{CoreConfig, MergedView};
use tokio::sync::mpsc;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            LIVE.fetch_add(new, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
#[command(about = "RSS per remote ipcache entry in the merged view")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Number of ipcache entries.
    #[arg(long, default_value_t = 100_000)]
    entries: u32,
    /// Internal: run as the measuring child against this etcd endpoint.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.child {
        Some(endpoint) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(child(endpoint.clone(), args.entries)))
            .map(|()| ExitCode::SUCCESS),
        None => tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(parent(args))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("memory failed: {e:#}");
        ExitCode::from(2)
    })
}

async fn parent(args: Args) -> anyhow::Result<ExitCode> {
    let mut report = Report::start("memory", "RSS per remote ipcache entry in the merged view", &args.common);
    let scale = Scale { pods: args.entries, ..Scale::FULL };
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    let mut kvs = data::meta_entries(CLUSTER, CLUSTER_ID, &[Kind::Ip]);
    let ip = data::kind_entries(CLUSTER, CLUSTER_ID, &scale, Kind::Ip);
    let key_bytes: usize = ip.iter().map(|(k, _)| k.len()).sum();
    let value_bytes: usize = ip.iter().map(|(_, v)| v.len()).sum();
    kvs.extend(ip);
    raw::bulk_put(&client, &kvs, 128, 8, &[]).await?;
    drop(kvs);

    let exe = std::env::current_exe()?;
    let (mut rss, mut heap, mut view_rss, mut view_heap) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.common.runs.max(1) {
        let out = std::process::Command::new(&exe)
            .args(["--child", &etcd.endpoint(), "--entries", &args.entries.to_string()])
            .output()
            .context("run the measuring child")?;
        ensure!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("RESULT ")).context("child printed no RESULT line")?;
        let f: Vec<f64> = line.split_whitespace().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
        ensure!(f.len() == 6, "malformed RESULT line {line:?}");
        let n = f64::from(args.entries);
        rss.push((f[1] - f[0]) / n);
        heap.push((f[3] - f[2]) / n);
        view_rss.push((f[4] - f[0]) / n);
        view_heap.push((f[5] - f[2]) / n);
        println!(
            "   child: VmRSS {:.1} MB -> {:.1} MB (readers stopped: {:.1} MB), live heap {:.1} MB -> {:.1} MB ({:.1} MB)",
            f[0] / 1e6,
            f[1] / 1e6,
            f[4] / 1e6,
            f[2] / 1e6,
            f[3] / 1e6,
            f[5] / 1e6
        );
    }
    let n = f64::from(args.entries);
    let raw_value = value_bytes as f64 / n;
    let raw_kv = (key_bytes + value_bytes) as f64 / n;
    let m = median(&rss);
    report.row("entries held", args.entries);
    report.row("baseline: raw JSON value per entry", format!("{raw_value:.0} bytes"));
    report.row("baseline: raw key + JSON value per entry", format!("{raw_kv:.0} bytes"));
    report.row("measured: VmRSS growth per entry (process, readers live)", spread(&rss, "bytes", 0));
    report.row("measured: live heap growth per entry (readers live)", spread(&heap, "bytes", 0));
    report.row("measured: VmRSS growth per entry (view only)", spread(&view_rss, "bytes", 0));
    report.row("measured: live heap growth per entry (view only)", spread(&view_heap, "bytes", 0));
    report.row("ratio VmRSS per entry / raw JSON value", format!("{:.2}x", m / raw_value));
    report.target("<= 400 bytes/entry (VmRSS)", m <= 400.0);
    Ok(report.finish())
}

async fn child(endpoint: String, entries: u32) -> anyhow::Result<()> {
    let mut client = etcd_client::Client::connect([endpoint], None).await?;
    let ctx = import::open_session(&mut client, CLUSTER, &[Kind::Ip]).await?;
    let mut core = MergedView::new(CoreConfig::default());
    import::register(&mut core, &ctx)?;
    let (rss0, heap0) = (vm_rss()?, LIVE.load(Ordering::Relaxed));
    {
        let (tx, mut rx) = mpsc::channel(import::CHANNEL);
        let readers = import::spawn_readers(&client, &ctx, &[Kind::Ip], &tx);
        let want: HashSet<(Arc<str>, Kind)> = [(Arc::<str>::from(CLUSTER), Kind::Ip)].into();
        import::run_until_listed(&mut core, &mut rx, &want).await?;
        let _ = core.take_deltas();
        let (rss, heap) = (vm_rss()?, LIVE.load(Ordering::Relaxed));
        print!("RESULT {rss0} {rss} {heap0} {heap}");
        drop(readers);
        drop(tx);
        // Let the aborted tasks be dropped (and their buffers freed) before measuring.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    let _ = core.take_deltas();
    ensure!(core.ipcache_len() as u32 == entries, "view holds {} entries", core.ipcache_len());
    let (rss1, heap1) = (vm_rss()?, LIVE.load(Ordering::Relaxed));
    println!(" {rss1} {heap1}");
    Ok(())
}

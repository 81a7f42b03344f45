//! `fake-kube-apiserver`: runs the in-memory TEST STAND-IN for the local sandbox.
//! Not a Kubernetes API server for real use: no auth, no admission, no persistence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fake_kube_apiserver::{FakeApiServer, Options};

#[derive(Parser, Debug)]
#[command(version, about = "TEST STAND-IN: minimal in-memory Kubernetes API server (plain HTTP, no auth)")]
struct Args {
    /// Address to listen on; keep it on loopback (there is no authentication).
    #[arg(long, env = "FAKE_KUBE_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long, env = "FAKE_KUBE_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Write events kept for watch resumption; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history_limit: usize,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 3)]
    bookmark_interval_secs: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if !args.listen.ip().is_loopback() {
        tracing::warn!(addr = %args.listen, "listening on a non-loopback address: this server has no authentication");
    }
    let options = Options {
        history_limit: args.history_limit,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs.max(1)),
    };
    let server = FakeApiServer::start_with(args.listen, options).await?;
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path)?;
        tracing::info!(path = %path.display(), "wrote kubeconfig");
    }
    println!("{}", server.url());
    shutdown_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c"),
        _ = term.recv() => Ok(()),
    }
}

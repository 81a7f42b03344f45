//! TEST STAND-IN: a minimal in-memory Kubernetes API server.
//!
//! No kube-apiserver can run where Causeway is tested, so the kube adapters (clustermesh-apiserver's
//! watches, identity-sync's EndpointSlice writer, egress-gw's status writer) are tested against this:
//! plain HTTP on loopback, JSON only, the real list/watch wire protocol (resourceVersions, watch
//! events, bookmarks, 410 Gone). It is never a runtime dependency of any Causeway component.
//! See README.md for exactly what it implements and what it does not.

mod discovery;
mod error;
mod patch;
mod proxy;
mod registry;
mod routes;
mod selectors;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{broadcast, watch as watch_chan};
use tokio::task::JoinHandle;

use crate::store::Store;
use crate::watch::Control;

/// Tunables; `Options::default()` suits most tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many write events are kept for watches to resume from. A watch from an older
    /// resourceVersion gets an ERROR event with 410 Gone. At least 1.
    pub history_limit: usize,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { history_limit: 10_000, bookmark_interval: Duration::from_secs(3) }
    }
}

/// State shared by every request handler and watch task.
pub(crate) struct Shared {
    store: Mutex<Store>,
    rv_rx: watch_chan::Receiver<u64>,
    control: broadcast::Sender<Control>,
    shutdown_rx: watch_chan::Receiver<bool>,
    options: Options,
    addr: SocketAddr,
    /// Watch streams currently open (a test can wait for a client to be watching).
    open_watches: AtomicUsize,
}

impl Shared {
    /// The store, even if a panicking thread poisoned the lock (every write leaves it consistent).
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Entry point: `FakeApiServer::start("127.0.0.1:0".parse()?)`.
pub struct FakeApiServer;

impl FakeApiServer {
    /// Binds `addr` (use port 0 for a free port) and serves with default options.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<FakeApiServerHandle> {
        Self::start_with(addr, Options::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: Options) -> anyhow::Result<FakeApiServerHandle> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the fake kube-apiserver to {addr}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let (rv_tx, rv_rx) = watch_chan::channel(0);
        let (control, _) = broadcast::channel(64);
        let (shutdown_tx, shutdown_rx) = watch_chan::channel(false);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history_limit, rv_tx)),
            rv_rx,
            control,
            shutdown_rx: shutdown_rx.clone(),
            options,
            addr,
            open_watches: AtomicUsize::new(0),
        });
        let app = routes::router(shared.clone());
        let mut graceful = shutdown_rx;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|s| *s).await;
                })
                .await
                .context("serving the fake kube-apiserver")
        });
        tracing::info!(%addr, "fake kube-apiserver (test stand-in) listening");
        Ok(FakeApiServerHandle { addr, shared, shutdown_tx, task: Some(task) })
    }
}

/// A running server. Dropping it stops the server (without waiting); `shutdown` waits.
pub struct FakeApiServerHandle {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch_chan::Sender<bool>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl FakeApiServerHandle {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one context, `fake`, pointing at this server with no credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml())
            .with_context(|| format!("writing kubeconfig to {}", path.display()))
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Drops the whole event history and ends every open watch with an ERROR event carrying
    /// 410 Gone, as if the server had compacted past every watcher. Watches from any resourceVersion
    /// older than the current one now get 410 too; clients must re-list.
    pub fn compact_history(&self) {
        self.shared.store().compact();
        let _ = self.shared.control.send(Control::Expire);
    }

    /// Sends a BOOKMARK now on every open watch that allows bookmarks.
    pub fn force_bookmark(&self) {
        let _ = self.shared.control.send(Control::Bookmark);
    }

    /// How many watch streams are open right now. Tests use it to wait until a client is watching
    /// before they change something the watch must see (or compact the history under it).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Ends every open watch stream cleanly, as a dropped connection would; clients resume from
    /// their last resourceVersion.
    pub fn disconnect_watches(&self) {
        let _ = self.shared.control.send(Control::Disconnect);
    }

    /// Stops accepting requests, ends open watches, and waits for the server task.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown_tx.send_replace(true);
        match self.task.take() {
            Some(task) => task.await.context("the fake kube-apiserver task panicked")?,
            None => Ok(()),
        }
    }
}

impl Drop for FakeApiServerHandle {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
    }
}

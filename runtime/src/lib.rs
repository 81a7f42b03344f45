//! Process plumbing shared by every Causeway binary: log setup, the Prometheus registry, and the HTTP server for
//! `/metrics`, `/healthz`, `/readyz` (plus any extra routes a component adds, such as identity-sync's `/status`).
//!
//! It sits beside the flow rather than in it: components register their metrics and flip readiness here, and
//! nothing here knows about kube, etcd or the datapath.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::net::TcpListener;

pub use prometheus_client;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("cannot listen for /metrics and health probes on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid log format {0:?}: use \"text\" or \"json\"")]
    LogFormat(String),
}

/// Log output format; `json` is meant for production log pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(RuntimeError::LogFormat(other.to_string())),
        }
    }
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG` (default `info`). Calling it twice is
/// harmless (the second call is ignored), which keeps tests that start components in-process simple.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // netlink-packet-route warns on every address dump about IFLA_INET6 attributes newer kernels made longer than it
    // knows (harmless: the attribute is skipped); the node agent dumps addresses every few seconds.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,netlink_packet_route=error"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Readiness and liveness flags plus the metrics registry of one process.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    ready: AtomicBool,
    live: AtomicBool,
    not_ready_reason: Mutex<String>,
    registry: Mutex<Registry>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Health {
            inner: Arc::new(HealthInner {
                ready: AtomicBool::new(false),
                live: AtomicBool::new(true),
                not_ready_reason: Mutex::new("starting".to_string()),
                registry: Mutex::new(Registry::with_prefix("causeway")),
            }),
        }
    }

    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::SeqCst);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        if let Ok(mut r) = self.inner.not_ready_reason.lock() {
            *r = reason.into();
        }
        self.inner.ready.store(false, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::SeqCst);
    }

    /// Registers metrics; names get the `causeway_` prefix.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = self.inner.registry.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut reg)
    }

    /// Prometheus text exposition of everything registered.
    pub fn render_metrics(&self) -> String {
        let reg = self.inner.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        // Encoding into a String cannot fail except on fmt errors, which String never returns.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }

    /// A router with `/metrics`, `/healthz` and `/readyz`. Merge component routes into it before serving.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.clone())
    }
}

async fn metrics(State(h): State<Health>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], h.render_metrics())
        .into_response()
}

async fn healthz(State(h): State<Health>) -> Response {
    if h.inner.live.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not live\n").into_response()
    }
}

async fn readyz(State(h): State<Health>) -> Response {
    if h.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let reason = h.inner.not_ready_reason.lock().map(|r| r.clone()).unwrap_or_default();
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response()
    }
}

/// Binds `addr` and serves `router` in a background task. Returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, router: Router) -> Result<SocketAddr, RuntimeError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| RuntimeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| RuntimeError::Bind { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics/health server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn metrics_are_prefixed_and_readiness_flips() {
        let h = Health::new();
        let c: Counter = Counter::default();
        h.with_registry(|r| r.register("widgets", "Widgets seen", c.clone()));
        c.inc_by(3);
        let text = h.render_metrics();
        assert!(text.contains("causeway_widgets_total 3"), "{text}");
        assert!(!h.is_ready());
        h.set_ready();
        assert!(h.is_ready());
        h.set_not_ready("etcd lost");
        assert!(!h.is_ready());
    }
}

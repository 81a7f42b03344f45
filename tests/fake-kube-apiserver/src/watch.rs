//! Watch streams: newline-delimited `{"type": ..., "object": ...}` events over a chunked response.
//!
//! Each watch is a task that replays the store's history from its cursor, then sleeps until the
//! global resourceVersion moves, a bookmark is due, or a control signal (test hook) arrives.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::registry::ResourceInfo;
use crate::selectors::Filter;
use crate::store::EventType;
use crate::Shared;

/// Signals from the test hooks to every open watch.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    /// Send a BOOKMARK now (to watches that allow bookmarks).
    Bookmark,
    /// End with an ERROR event carrying 410 Gone (after `compact_history`).
    Expire,
    /// End the stream cleanly, as a dropped connection would.
    Disconnect,
}

#[derive(Debug, Clone)]
pub enum WatchStart {
    /// Synthetic ADDED events for the current state first; with `end_bookmark`, then a BOOKMARK
    /// annotated `k8s.io/initial-events-end: "true"` (the `sendInitialEvents=true` protocol).
    Snapshot { end_bookmark: bool },
    /// Only events after this resourceVersion.
    From(u64),
}

#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub info: ResourceInfo,
    pub version: String,
    pub filter: Filter,
    pub start: WatchStart,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
}

pub fn serve(shared: Arc<Shared>, req: WatchRequest) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tracing::debug!(resource = %req.info.plural, start = ?req.start, "watch opened");
    // Counted (and subscribed to control signals) before the response goes out, so that a client
    // holding the response is known to be watching.
    let open = OpenWatch::new(shared.clone());
    let control = shared.control.subscribe();
    tokio::spawn(run(shared, req, tx, open, control));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(ReceiverStream::new(rx)))
        .into_response()
}

struct Sink {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
}

impl Sink {
    /// Returns false once the client has gone away.
    async fn send(&self, event: Value) -> bool {
        let mut line = event.to_string();
        line.push('\n');
        self.tx.send(Ok(Bytes::from(line))).await.is_ok()
    }
}

fn event_line(etype: EventType, obj: &Value, req: &WatchRequest) -> Value {
    let t = match etype {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    };
    json!({"type": t, "object": req.info.present(obj, &req.version)})
}

fn bookmark(rv: u64, req: &WatchRequest, initial_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": req.info.kind,
            "apiVersion": req.info.api_version(&req.version),
            "metadata": metadata,
        }
    })
}

fn gone(rv: u64) -> Value {
    let err = ApiError::gone(format!("too old resource version: {rv}"));
    json!({"type": "ERROR", "object": err.status()})
}

/// Counts a watch as open for as long as its task runs.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run(
    shared: Arc<Shared>,
    req: WatchRequest,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    _open: OpenWatch,
    mut control: broadcast::Receiver<Control>,
) {
    let sink = Sink { tx };
    let mut rv_rx = shared.rv_rx.clone();
    let mut shutdown = shared.shutdown_rx.clone();
    rv_rx.borrow_and_update();
    let key = req.info.key();

    let mut cursor = match req.start {
        WatchStart::Snapshot { end_bookmark } => {
            let (items, rv) = shared.store().snapshot(&req.info, &req.filter);
            for obj in &items {
                if !sink.send(event_line(EventType::Added, obj, &req)).await {
                    return;
                }
            }
            if end_bookmark && !sink.send(bookmark(rv, &req, true)).await {
                return;
            }
            rv
        }
        WatchStart::From(rv) => {
            if shared.store().check_watchable(rv).is_err() {
                sink.send(gone(rv)).await;
                return;
            }
            rv
        }
    };

    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    let interval = shared.options.bookmark_interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        rv_rx.borrow_and_update();
        let batch = shared.store().events_since(&key, cursor, &req.filter);
        match batch {
            Ok((events, new_cursor)) => {
                for (etype, obj) in &events {
                    if !sink.send(event_line(*etype, obj, &req)).await {
                        return;
                    }
                }
                cursor = new_cursor;
            }
            Err(_) => {
                sink.send(gone(cursor)).await;
                return;
            }
        }
        tokio::select! {
            changed = rv_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = ticker.tick(), if req.bookmarks => {
                if !sink.send(bookmark(cursor, &req, false)).await {
                    return;
                }
            }
            signal = control.recv() => match signal {
                Ok(Control::Bookmark) => {
                    if req.bookmarks && !sink.send(bookmark(cursor, &req, false)).await {
                        return;
                    }
                }
                Ok(Control::Expire) => {
                    sink.send(gone(cursor)).await;
                    return;
                }
                Ok(Control::Disconnect) | Err(broadcast::error::RecvError::Closed) => return,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
            },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return,
            _ = sink.tx.closed() => return,
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => return,
        }
    }
}

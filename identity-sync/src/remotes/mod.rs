//! Remote clusters: the config directory ([`config`]), one task per remote ([`task`]), and the manager that starts,
//! restarts and stops tasks as the directory changes.

pub mod config;
pub mod task;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, instrument};

use crate::remotes::config::Change;
use crate::remotes::task::{RemoteEvent, RemoteHandle, TaskEnv};
use crate::status::Status;

/// Keeps one task per configured remote until `env.events` closes. A changed file restarts its remote's task (a
/// new session re-lists everything, and the merged view sweeps what did not come back); a removed file stops the
/// task and drains the remote.
#[instrument(name = "remotes", skip_all, fields(dir = %dir.display()))]
pub async fn run(dir: PathBuf, rescan: Duration, env: TaskEnv, status: Status) {
    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn(config::watch_dir(dir, rescan, tx));
    let mut running: BTreeMap<String, RemoteHandle> = BTreeMap::new();
    let mut first = true;
    while let Some(batch) = rx.recv().await {
        for change in batch {
            match change {
                Change::Added(cfg) | Change::Changed(cfg) => {
                    let name = cfg.name.to_string();
                    // Stop the old session first, so that its ID claim is released before the new one validates.
                    if running.remove(&name).is_some() {
                        info!(remote = %name, "restarting remote with its new config");
                    }
                    let reporter = status.remote(&name);
                    status.config_fixed(&name);
                    running.insert(name, task::spawn(cfg, env.clone(), reporter));
                }
                Change::Removed(name) => {
                    let was_running = running.remove(&name).is_some();
                    status.remove_remote(&name);
                    if was_running {
                        info!(remote = %name, "remote removed; draining its entries");
                        let name: Arc<str> = name.as_str().into();
                        if env.events.send((name, RemoteEvent::Removed)).await.is_err() {
                            break;
                        }
                    }
                }
                Change::Invalid { name, error } => status.config_invalid(&name, &error.to_string()),
                Change::Fixed(name) => status.config_fixed(&name),
            }
        }
        if std::mem::take(&mut first) {
            status.remotes_scanned();
        }
        if env.events.is_closed() {
            break;
        }
    }
    watcher.abort();
}

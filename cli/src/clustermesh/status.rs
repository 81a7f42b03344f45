//! `clustermesh status`: per remote cluster, what this cluster's identity-sync reports on `/status` — connected,
//! synced, entry counts, last error — plus remotes that are configured in the remotes Secret but that
//! identity-sync has not picked up yet. `--wait` polls until every remote is ready, printing progress.
//!
//! The JSON shape is identity-sync's `StatusReport` (identity-sync/src/status/mod.rs); it is read leniently, so a
//! newer identity-sync with more fields still works.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Cluster, REMOTES_SECRET};
use crate::{Error, KubeTarget};

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct RemoteStatus {
    pub name: String,
    pub cluster_id: Option<u32>,
    pub state: String,
    pub connected: bool,
    pub validated: bool,
    pub synced: BTreeMap<String, bool>,
    pub entries: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub config_error: Option<String>,
}

impl RemoteStatus {
    pub fn ready(&self) -> bool {
        self.state == "synced" && self.connected
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct SyncStatus {
    pub cluster: String,
    pub cluster_id: u32,
    pub ready: bool,
    /// Which replica writes the EndpointSlices (absent from an identity-sync without leader election support).
    pub leader: Option<LeaderStatus>,
    pub remotes: Vec<RemoteStatus>,
}

/// The answering replica's part in identity-sync's leader election.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct LeaderStatus {
    pub enabled: bool,
    /// `leader`, `standby` or `unknown`.
    pub role: Option<String>,
    /// Who holds the Lease (writes the EndpointSlices).
    pub holder: Option<String>,
    pub identity: Option<String>,
}

impl LeaderStatus {
    /// One line on who writes the EndpointSlices, or `None` without leader election.
    fn describe(&self) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let me = self.identity.as_deref().unwrap_or("?");
        Some(match (self.role.as_deref(), self.holder.as_deref()) {
            (Some("leader"), _) => format!("EndpointSlices written by this replica ({me}, leader)"),
            (_, Some(holder)) => format!("EndpointSlices written by {holder}; this replica ({me}) stands by"),
            (role, None) => format!("no replica holds the leader Lease yet (this one: {me}, {})", role.unwrap_or("?")),
        })
    }
}

/// Where to read identity-sync's `/status`.
#[derive(Debug, Clone)]
pub enum Source {
    /// A URL reachable from here (port-forward, or a test).
    Url(String),
    /// Through the kube API's service proxy: `/api/v1/namespaces/<ns>/services/<service>:<port>/proxy/status`.
    ServiceProxy { service: String, port: String },
}

/// Remote names configured in the remotes Secret (its config-file keys).
pub fn configured_remotes(secret: &k8s_openapi::api::core::v1::Secret) -> BTreeSet<String> {
    secret
        .data
        .as_ref()
        .map(|d| {
            d.keys()
                .filter(|k| !(k.starts_with('.') || k.ends_with(".crt") || k.ends_with(".key") || k.ends_with(".pem")))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// One row per remote: what identity-sync reports, plus configured remotes it does not report yet.
pub fn rows(status: &SyncStatus, configured: &BTreeSet<String>) -> Vec<RemoteStatus> {
    let mut out = status.remotes.clone();
    for name in configured {
        if !out.iter().any(|r| &r.name == name) {
            out.push(RemoteStatus {
                name: name.clone(),
                state: "not_seen_yet".into(),
                last_error: Some(
                    "in the remotes Secret but not yet reported by identity-sync (the mounted Secret \
                                  refreshes within about a minute)"
                        .into(),
                ),
                ..Default::default()
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `ready/total` and the names of remotes that are not ready with their state.
pub fn progress(rows: &[RemoteStatus]) -> String {
    let ready = rows.iter().filter(|r| r.ready()).count();
    let waiting: Vec<String> = rows.iter().filter(|r| !r.ready()).map(|r| format!("{} {}", r.name, r.state)).collect();
    if waiting.is_empty() {
        format!("{ready}/{} remotes ready", rows.len())
    } else {
        format!("{ready}/{} remotes ready; waiting for {}", rows.len(), waiting.join(", "))
    }
}

pub fn render(status: &SyncStatus, rows: &[RemoteStatus]) -> String {
    let mut out = format!(
        "identity-sync of {} (ID {}): {}\n",
        status.cluster,
        status.cluster_id,
        if status.ready { "ready" } else { "not ready" }
    );
    if let Some(line) = status.leader.as_ref().and_then(LeaderStatus::describe) {
        out.push_str(&line);
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("no remote clusters configured: connect one with `causeway clustermesh connect`\n");
        return out;
    }
    let mut table: Vec<[String; 7]> =
        vec![["REMOTE", "ID", "STATE", "CONNECTED", "SYNCED", "ENTRIES", "LAST ERROR"].map(String::from)];
    for r in rows {
        let synced = r.synced.values().filter(|v| **v).count();
        let entries = if r.entries.is_empty() {
            "-".to_string()
        } else {
            r.entries.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        };
        table.push([
            r.name.clone(),
            r.cluster_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            r.state.clone(),
            if r.connected { "yes" } else { "no" }.into(),
            if r.synced.is_empty() { "-".into() } else { format!("{synced}/{} kinds", r.synced.len()) },
            entries,
            r.config_error.clone().or_else(|| r.last_error.clone()).unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in &table {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn fetch(
    cluster: &Cluster,
    proxy: &kube::Client,
    http: &reqwest::Client,
    source: &Source,
) -> Result<SyncStatus, String> {
    let text = match source {
        Source::Url(url) => {
            let resp = http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", resp.status()));
            }
            resp.text().await.map_err(|e| format!("GET {url}: {e}"))?
        }
        Source::ServiceProxy { service, port } => {
            let path = format!("/api/v1/namespaces/{}/services/{service}:{port}/proxy/status", cluster.namespace);
            let req = http::Request::get(&path).body(Vec::new()).map_err(|e| e.to_string())?;
            // Bounded: a proxied backend that accepts but never answers must not hang the command.
            match tokio::time::timeout(Duration::from_secs(10), proxy.request_text(req)).await {
                Ok(r) => r.map_err(|e| format!("kube API service proxy {path}: {e}"))?,
                Err(_) => return Err(format!("kube API service proxy {path}: no answer within 10s")),
            }
        }
    };
    serde_json::from_str(&text).map_err(|e| format!("identity-sync /status is not the expected JSON: {e}"))
}

/// The result of `status`: the last report and its rows.
pub struct StatusOutcome {
    pub status: SyncStatus,
    pub rows: Vec<RemoteStatus>,
    pub all_ready: bool,
}

/// Reads the status once, or with `wait` until every remote is ready or `timeout` passes (then an error).
/// `progress_out` receives a line whenever the progress changes.
#[tracing::instrument(skip_all, fields(context = ?target.context, namespace))]
pub async fn status(
    target: &KubeTarget,
    namespace: &str,
    source: &Source,
    wait: Option<Duration>,
    mut progress_out: impl FnMut(&str),
) -> Result<StatusOutcome, Error> {
    let cluster = Cluster::open(target, namespace).await?;
    let proxy = target.client_without_retries().await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Http { what: "building the HTTP client".into(), message: e.to_string() })?;
    let start = Instant::now();
    let mut last_progress = String::new();
    loop {
        let configured = match cluster.get_secret(REMOTES_SECRET).await {
            Ok(Some(s)) => configured_remotes(&s),
            _ => BTreeSet::new(),
        };
        let fetched = fetch(&cluster, &proxy, &http, source).await;
        match (fetched, wait) {
            (Ok(status), wait) => {
                let rows = rows(&status, &configured);
                let all_ready = rows.iter().all(RemoteStatus::ready);
                if wait.is_none() || all_ready {
                    return Ok(StatusOutcome { status, rows, all_ready });
                }
                let p = progress(&rows);
                if p != last_progress {
                    progress_out(&format!("[{:>3}s] {p}", start.elapsed().as_secs()));
                    last_progress = p;
                }
                if wait.is_some_and(|t| start.elapsed() >= t) {
                    progress_out(&render(&status, &rows));
                    return Err(Error::Timeout {
                        what: format!("not every remote is ready: {}", progress(&rows)),
                        secs: start.elapsed().as_secs(),
                    });
                }
            }
            (Err(e), None) => return Err(Error::Http { what: "reading identity-sync's status".into(), message: e }),
            (Err(e), Some(t)) => {
                let p = format!("identity-sync not reachable yet: {e}");
                if p != last_progress {
                    progress_out(&format!("[{:>3}s] {p}", start.elapsed().as_secs()));
                    last_progress = p;
                }
                if start.elapsed() >= t {
                    return Err(Error::Timeout { what: e, secs: start.elapsed().as_secs() });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_identity_sync_shape_and_adds_unseen_remotes() {
        // As identity-sync serialises StatusReport (snake_case states, extra fields ignored).
        let json = r#"{"cluster":"east","cluster_id":1,"ready":true,"kube_synced":true,"remotes":[
            {"name":"west","cluster_id":2,"state":"synced","connected":true,"validated":true,
             "synced":{"identities":true,"ipcache":true,"nodes":true,"services":true},
             "entries":{"identities":3,"ipcache":10,"nodes":2,"services":1},"rejected":{},"resyncs":0,
             "last_error":null,"config_error":null,"last_change":"2026-11-23T10:00:00Z"},
            {"name":"north","cluster_id":null,"state":"connecting","connected":false,"validated":false,
             "synced":{},"entries":{},"rejected":{},"resyncs":0,"last_error":"connection refused",
             "config_error":null,"last_change":"2026-11-23T10:00:00Z"}]}"#;
        let s: SyncStatus = serde_json::from_str(json).unwrap_or_default();
        let configured = BTreeSet::from(["west".to_string(), "north".to_string(), "south".to_string()]);
        let r = rows(&s, &configured);
        assert_eq!(r.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["north", "south", "west"]);
        assert_eq!(progress(&r), "1/3 remotes ready; waiting for north connecting, south not_seen_yet");
        let table = render(&s, &r);
        assert!(table.contains("identities=3 ipcache=10 nodes=2 services=1"), "{table}");
        assert!(table.contains("4/4 kinds"), "{table}");
        assert!(table.contains("connection refused"), "{table}");
        assert!(!table.contains("EndpointSlices written"), "no leader election, no line: {table}");
        // With leader election: the replica that answered and the one that writes.
        let json = json.replacen(
            r#""kube_synced":true,"#,
            r#""kube_synced":true,"leader":{"enabled":true,"role":"standby","holder":"identity-sync-a_1","lease":"causeway/causeway-identity-sync","identity":"identity-sync-b_2"},"#,
            1,
        );
        let s: SyncStatus = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(s.remotes.len(), 2, "parsed with the leader field");
        let table = render(&s, &rows(&s, &configured));
        assert!(
            table.contains("EndpointSlices written by identity-sync-a_1; this replica (identity-sync-b_2) stands by"),
            "{table}"
        );
    }
}

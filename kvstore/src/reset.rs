//! Noticing that etcd lost its data (it was restarted empty, or restored from an older
//! backup), so that a writer can redo its whole start sequence.
//!
//! Lost leases alone do not say it: the leases may simply have expired. The detector
//! watches a marker key the writer wrote without a lease (for the apiserver, its cluster
//! config) plus the response headers:
//!
//! * the marker is gone, or was re-created (its create revision changed);
//! * the store revision went backwards (a restore from an older snapshot);
//! * the etcd cluster ID changed (a new cluster behind the same endpoints).
//!
//! Member IDs are deliberately not compared: with several endpoints the client may talk
//! to a different member of the same cluster at each request.

use std::fmt;
use std::time::Duration;

use etcd_client::{Client, KvClient};

use crate::KvError;

/// How often [`ResetDetector::wait_for_reset`] looks by default.
pub const RESET_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What showed that etcd lost its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The marker key is gone.
    MarkerMissing {
        /// The marker key.
        key: String,
    },
    /// The marker key exists but was created again (another create revision).
    MarkerRecreated {
        /// The marker key.
        key: String,
        /// Create revision seen before.
        was: i64,
        /// Create revision now.
        now: i64,
    },
    /// The store revision is lower than one seen before.
    RevisionWentBack {
        /// Highest revision seen before.
        was: i64,
        /// Revision now.
        now: i64,
    },
    /// etcd answers with another cluster ID.
    ClusterIdChanged {
        /// Cluster ID seen before.
        was: u64,
        /// Cluster ID now.
        now: u64,
    },
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::MarkerMissing { key } => write!(f, "marker key {key:?} is gone"),
            ResetReason::MarkerRecreated { key, was, now } => {
                write!(f, "marker key {key:?} was re-created (create revision {was} -> {now})")
            }
            ResetReason::RevisionWentBack { was, now } => write!(f, "store revision went back from {was} to {now}"),
            ResetReason::ClusterIdChanged { was, now } => write!(f, "etcd cluster ID changed from {was:x} to {now:x}"),
        }
    }
}

/// What the last look saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Baseline {
    cluster_id: u64,
    revision: i64,
    marker_create_revision: i64,
}

/// Polls etcd for signs that it lost its data; see the module docs.
///
/// Pull-based: the owner calls [`wait_for_reset`](Self::wait_for_reset), redoes its start
/// sequence (re-writing the marker among other things) when it returns, then calls it
/// again. After a reported reset the detector forgets what it saw, and learns the new
/// state on its next look, so the re-written marker is not reported as another reset.
pub struct ResetDetector {
    kv: KvClient,
    marker: String,
    interval: Duration,
    baseline: Option<Baseline>,
}

impl fmt::Debug for ResetDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResetDetector")
            .field("marker", &self.marker)
            .field("interval", &self.interval)
            .field("baseline", &self.baseline)
            .finish_non_exhaustive()
    }
}

impl ResetDetector {
    /// A detector for `marker`, a key the caller has written without a lease and never
    /// deletes. Call [`check`](Self::check) once right after writing it to learn the
    /// baseline (or let the first look of [`wait_for_reset`](Self::wait_for_reset) do it).
    pub fn new(client: &Client, marker: impl Into<String>, interval: Duration) -> Self {
        Self { kv: client.kv_client(), marker: marker.into(), interval, baseline: None }
    }

    /// The marker key.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Forgets what it saw; the next look learns the state afresh. For an owner that learned
    /// of a reset another way (the [`crate::LeasePool`] closed the [`crate::WriteGate`]) and
    /// re-wrote the marker: without this the re-created marker would be reported as another
    /// reset.
    pub fn forget(&mut self) {
        self.baseline = None;
    }

    /// Looks once. `Ok(None)`: nothing changed (or the baseline was just learned).
    /// After `Ok(Some(_))` the baseline is forgotten.
    pub async fn check(&mut self) -> Result<Option<ResetReason>, KvError> {
        let resp =
            self.kv.get(self.marker.as_str(), None).await.map_err(|e| KvError::request("get", &self.marker, e))?;
        let (cluster_id, revision) = resp.header().map(|h| (h.cluster_id(), h.revision())).unwrap_or_default();
        let marker_create_revision = resp.kvs().first().map(|kv| kv.create_revision());
        let reason = self.baseline.and_then(|was| {
            if cluster_id != 0 && was.cluster_id != 0 && cluster_id != was.cluster_id {
                return Some(ResetReason::ClusterIdChanged { was: was.cluster_id, now: cluster_id });
            }
            match marker_create_revision {
                None => Some(ResetReason::MarkerMissing { key: self.marker.clone() }),
                Some(now) if now != was.marker_create_revision => Some(ResetReason::MarkerRecreated {
                    key: self.marker.clone(),
                    was: was.marker_create_revision,
                    now,
                }),
                Some(_) if revision < was.revision => {
                    Some(ResetReason::RevisionWentBack { was: was.revision, now: revision })
                }
                Some(_) => None,
            }
        });
        self.baseline = match (&reason, marker_create_revision) {
            (None, Some(marker_create_revision)) => Some(Baseline { cluster_id, revision, marker_create_revision }),
            // A reset was reported, or the marker is not there yet: learn again next time.
            _ => None,
        };
        Ok(reason)
    }

    /// Looks every interval until etcd shows it lost its data. Failed looks (etcd down)
    /// are logged at debug level and retried: an outage alone is not a reset.
    pub async fn wait_for_reset(&mut self) -> ResetReason {
        loop {
            match self.check().await {
                Ok(Some(reason)) => return reason,
                Ok(None) => {}
                Err(e) => tracing::debug!(marker = %self.marker, error = %e, "reset check failed; retrying"),
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

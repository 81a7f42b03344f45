//! The kube adapter: reads and writes one `coordination.k8s.io/v1` Lease on a timer, feeds [`Election`], and
//! publishes the resulting [`Role`]. Writes are conditional on the resourceVersion read, so two replicas racing for
//! a free Lease cannot both win: the loser gets 409 Conflict and stays a follower.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::core::{Election, Record, Role, Timing, Write};
use crate::metrics::LeaderMetrics;
use crate::LeaderError;

/// Where the Lease lives and who this replica is.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

/// A running election. Dropping it stops campaigning without releasing; call [`release`](Self::release) on a
/// clean shutdown so that a standby takes over at once instead of after the lease duration.
pub struct Leadership {
    role: watch::Receiver<Role>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    lease: String,
}

impl Leadership {
    /// Starts campaigning for the Lease in the background.
    pub fn spawn(client: kube::Client, cfg: LeaseConfig, metrics: LeaderMetrics) -> Result<Self, LeaderError> {
        cfg.timing.validate().map_err(LeaderError::Timing)?;
        let lease = format!("{}/{}", cfg.namespace, cfg.name);
        let (role_tx, role) = watch::channel(Role::Unknown);
        let (stop, stop_rx) = oneshot::channel();
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let runner =
            Runner { api, name: cfg.name, election: Election::new(cfg.identity, cfg.timing), role_tx, metrics };
        let task = tokio::spawn(runner.run(stop_rx));
        Ok(Self { role, stop: Some(stop), task: Some(task), lease })
    }

    /// `namespace/name` of the Lease.
    pub fn lease(&self) -> &str {
        &self.lease
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.role.borrow() == Role::Leader
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Waits until this replica leads.
    pub async fn leading(&self) {
        wait_for(self.role.clone(), |r| *r == Role::Leader).await;
    }

    /// Waits until this replica, having led, no longer does (it could not renew in time, or another replica took
    /// the Lease). Returns at once if it is not leading now.
    pub async fn lost(&self) {
        wait_for(self.role.clone(), |r| *r != Role::Leader).await;
    }

    /// Stops campaigning and, if this replica leads, gives the Lease up (bounded by a few seconds: a shutdown must
    /// not hang on an unreachable API server).
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                warn!(lease = %self.lease, "giving the Lease up took too long; the standby takes over when it expires");
            }
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until the role satisfies `f` (or the election task is gone).
pub async fn wait_for(mut rx: watch::Receiver<Role>, f: impl Fn(&Role) -> bool) {
    let _ = rx.wait_for(|r| f(r)).await;
}

struct Runner {
    api: Api<Lease>,
    name: String,
    election: Election,
    role_tx: watch::Sender<Role>,
    metrics: LeaderMetrics,
}

impl Runner {
    #[tracing::instrument(name = "leader_election", skip_all, fields(lease = %self.name, identity = %self.election.identity()))]
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let timing = self.election.timing();
        loop {
            self.attempt(timing).await;
            self.publish();
            // Sleep until the next attempt, but wake at the renew deadline to stop acting on time.
            let now = Instant::now();
            let mut next = now + timing.retry_period;
            if let Some(until) = self.election.leading_until().filter(|u| *u > now) {
                next = next.min(until);
            }
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep_until(next.into()) => {}
            }
            self.publish();
        }
        self.give_up().await;
    }

    fn publish(&mut self) {
        let role = self.election.role(Instant::now());
        let leader = role == Role::Leader;
        let changed = self.role_tx.send_if_modified(|r| {
            if *r == role {
                return false;
            }
            *r = role.clone();
            true
        });
        if changed {
            self.metrics.set_leader(leader);
            match &role {
                Role::Leader => info!("became leader"),
                Role::Follower { holder } => info!(holder = holder.as_deref().unwrap_or("<none>"), "standing by"),
                Role::Unknown => {}
            }
        }
    }

    /// One read and, if the election says so, one conditional write. Each call is bounded by the retry period.
    async fn attempt(&mut self, timing: Timing) {
        let bound = timing.retry_period;
        let read = match tokio::time::timeout(bound, self.api.get_opt(&self.name)).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(e)) => return self.failed(&format!("reading the Lease: {e}")),
            Err(_) => return self.failed(&format!("reading the Lease took over {bound:?}")),
        };
        let now = Instant::now();
        let stamp = Timestamp::now();
        let record = read.as_ref().map(record_of);
        let resource_version = read.as_ref().and_then(|l| l.metadata.resource_version.clone());
        match self.election.observe(record, now, stamp.to_string()) {
            Write::None => {}
            Write::Create(rec) => {
                let lease = self.lease_object(&rec, None, stamp, None);
                match tokio::time::timeout(bound, self.api.create(&PostParams::default(), &lease)).await {
                    Ok(Ok(_)) => self.election.written(rec, now),
                    Ok(Err(kube::Error::Api(e))) if e.code == 409 => debug!("another replica created the Lease first"),
                    Ok(Err(e)) => self.failed(&format!("creating the Lease: {e}")),
                    Err(_) => self.failed(&format!("creating the Lease took over {bound:?}")),
                }
            }
            Write::Update(rec) => {
                let lease = self.lease_object(&rec, resource_version, stamp, read.as_ref());
                match tokio::time::timeout(bound, self.api.replace(&self.name, &PostParams::default(), &lease)).await {
                    Ok(Ok(_)) => self.election.written(rec, now),
                    Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                        debug!("the Lease changed under this write; another replica renewed or took it")
                    }
                    Ok(Err(e)) => self.failed(&format!("writing the Lease: {e}")),
                    Err(_) => self.failed(&format!("writing the Lease took over {bound:?}")),
                }
            }
        }
    }

    fn failed(&mut self, what: &str) {
        self.metrics.errors.inc();
        self.election.write_failed();
        warn!(error = what, "leader election: the Lease could not be read or written; retrying");
    }

    fn lease_object(&self, rec: &Record, rv: Option<String>, now: Timestamp, previous: Option<&Lease>) -> Lease {
        let prev_spec = previous.and_then(|l| l.spec.as_ref());
        let same_holder = prev_spec.and_then(|s| s.holder_identity.as_deref()) == rec.holder.as_deref();
        let acquire_time = match (same_holder, prev_spec.and_then(|s| s.acquire_time.clone())) {
            (true, Some(t)) => Some(t),
            _ => rec.holder.as_ref().map(|_| MicroTime(now)),
        };
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: rv,
                labels: previous.and_then(|l| l.metadata.labels.clone()),
                annotations: previous.and_then(|l| l.metadata.annotations.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: rec.holder.clone(),
                lease_duration_seconds: Some(i32::try_from(rec.lease_duration.as_secs()).unwrap_or(i32::MAX)),
                lease_transitions: Some(rec.transitions),
                acquire_time,
                renew_time: rec.holder.as_ref().map(|_| MicroTime(now)),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Writes the released record if this replica leads (one attempt: shutting down).
    async fn give_up(&mut self) {
        let Some(rec) = self.election.release(Instant::now()) else { return };
        self.publish();
        let current = match self.api.get_opt(&self.name).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => return warn!(error = %e, "reading the Lease to give it up"),
        };
        let mine = current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.election.identity());
        if !mine {
            return;
        }
        let rv = current.metadata.resource_version.clone();
        let lease = self.lease_object(&rec, rv, Timestamp::now(), Some(&current));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => info!("gave the Lease up"),
            Err(e) => warn!(error = %e, "giving the Lease up failed; the standby takes over when it expires"),
        }
    }
}

/// The election's view of a Lease. Garbage (negative or missing durations) reads as a lease that expires at once,
/// so a broken object cannot block the election forever.
fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    let secs = spec.lease_duration_seconds.unwrap_or(0).max(0);
    Record {
        holder: spec.holder_identity,
        lease_duration: Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
        transitions: spec.lease_transitions.unwrap_or(0).max(0),
        renew_stamp: spec.renew_time.map(|t| t.0.to_string()),
    }
}

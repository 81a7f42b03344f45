//! Several identity-sync replicas per cluster: each imports every remote and serves the MeshView stream (so node
//! agents can stream from any of them), but only the one holding the leader Lease (`causeway-leader`) writes
//! EndpointSlices. [`supervise`] runs the writer while this replica leads and stops it as soon as it does not.
//!
//! Each term gets a fresh writer: it lists the managed slices when it starts, so a new leader adopts (rewrites or
//! deletes) whatever the previous leader left, and a replica that leads again does not trust what it knew before.

use std::future::Future;

use causeway_leader::{Leadership, Role};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, instrument};

use crate::status::Status;

/// This replica's part in the leader election, as the app needs it.
#[derive(Debug, Clone)]
pub struct Election {
    pub roles: watch::Receiver<Role>,
    /// `namespace/name` of the Lease.
    pub lease: String,
    /// This replica's name in the Lease.
    pub identity: String,
}

impl Election {
    /// `identity` is the one the Lease config gave the election (`LeaseConfig::identity`).
    pub fn of(leadership: &Leadership, identity: &str) -> Self {
        Election {
            roles: leadership.subscribe(),
            lease: leadership.lease().to_string(),
            identity: identity.to_string(),
        }
    }
}

/// Runs `start()`'s future (the EndpointSlice writer) as a task for as long as `roles` says this replica leads,
/// starting a new one each time it leads again, and reports every role on the status board. Returns when the
/// election stops (its sender is gone), with no writer left running.
#[instrument(name = "endpointslice_leader", skip_all, fields(cluster = %cluster, lease = %lease))]
pub async fn supervise<F, Fut>(
    mut roles: watch::Receiver<Role>,
    status: Status,
    cluster: &str,
    lease: &str,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut writer: Option<JoinHandle<()>> = None;
    loop {
        let role = roles.borrow_and_update().clone();
        status.leader_role(&role);
        match (&role, writer.is_some()) {
            (Role::Leader, false) => {
                info!("leading: starting the EndpointSlice writer");
                writer = Some(tokio::spawn(start()));
            }
            (Role::Leader, true) => {}
            (Role::Follower { holder }, running) => {
                let holder = holder.as_deref().unwrap_or("<none>");
                if running {
                    info!(holder, "no longer leading: stopping the EndpointSlice writer");
                    stop(&mut writer).await;
                } else {
                    info!(holder, "standing by: another replica writes the EndpointSlices");
                }
            }
            // Only before the first read of the Lease; nothing runs yet.
            (Role::Unknown, _) => stop(&mut writer).await,
        }
        if roles.changed().await.is_err() {
            if writer.is_some() {
                info!("leader election stopped: stopping the EndpointSlice writer");
            }
            stop(&mut writer).await;
            status.leader_role(&Role::Follower { holder: None });
            return;
        }
    }
}

/// Aborts the writer and waits until it is gone, so that two writers of this replica never overlap.
async fn stop(writer: &mut Option<JoinHandle<()>>) {
    if let Some(task) = writer.take() {
        task.abort();
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Counts writers started and writers still alive (a writer is alive until its future is dropped).
    #[derive(Default)]
    struct Writers {
        started: AtomicUsize,
        alive: AtomicUsize,
    }

    struct Alive(Arc<Writers>);

    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn status() -> Status {
        Status::new("west", 2, causeway_runtime::Health::new(), Duration::from_secs(60))
    }

    /// Lets the supervisor (and the tasks it spawned) run until they are idle.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn counts(w: &Writers) -> (usize, usize) {
        (w.started.load(Ordering::SeqCst), w.alive.load(Ordering::SeqCst))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_runs_exactly_while_leading_and_each_term_gets_a_fresh_one() {
        let writers = Arc::new(Writers::default());
        let (tx, rx) = watch::channel(Role::Unknown);
        let status = status();
        status.leader_election("ns/causeway-identity-sync", "me");
        let w = writers.clone();
        let sup = tokio::spawn(supervise(rx, status.clone(), "west", "ns/causeway-identity-sync", move || {
            w.started.fetch_add(1, Ordering::SeqCst);
            w.alive.fetch_add(1, Ordering::SeqCst);
            let guard = Alive(w.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await
            }
        }));
        settle().await;
        assert_eq!(counts(&writers), (0, 0), "no writer before the Lease is read");
        assert_eq!(status.report().leader.role, Some("unknown"));

        tx.send_replace(Role::Follower { holder: Some("other".into()) });
        settle().await;
        assert_eq!(counts(&writers), (0, 0), "a standby does not write");
        let r = status.report().leader;
        assert_eq!((r.role, r.holder.as_deref()), (Some("standby"), Some("other")));

        tx.send_replace(Role::Leader);
        settle().await;
        assert_eq!(counts(&writers), (1, 1), "the leader writes");
        let r = status.report().leader;
        assert_eq!((r.role, r.holder.as_deref()), (Some("leader"), Some("me")));

        tx.send_replace(Role::Follower { holder: None });
        settle().await;
        assert_eq!(counts(&writers), (1, 0), "losing the Lease stops the writer");

        tx.send_replace(Role::Leader);
        settle().await;
        assert_eq!(counts(&writers), (2, 1), "leading again starts a fresh writer");

        // The election ends (Leadership dropped or released) while leading: the writer stops too.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), sup)
            .await
            .unwrap_or_else(|_| panic!("supervisor did not return"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counts(&writers), (2, 0));
        assert_eq!(status.report().leader.role, Some("standby"));
    }
}

//! Leader election for Causeway's per-cluster controllers, over a `coordination.k8s.io/v1` Lease.
//!
//! It sits beside the flow: identity-sync and egress-gw run several replicas for availability, and this crate
//! decides which one *acts* where only one may (egress-gw: probing, gateway selection, the assignment stream and
//! policy status; identity-sync: EndpointSlice writes). [`core`] is the election without I/O (a fake clock drives
//! its tests); [`kube`] reads and writes the Lease and publishes the [`Role`]. No crate of this kind supports the
//! `kube` 5 client the project uses, hence this one.

pub mod core;
pub mod kube;
pub mod metrics;

use std::time::Duration;

use thiserror::Error;

pub use crate::core::{Role, Timing};
pub use crate::kube::{Leadership, LeaseConfig};
pub use crate::metrics::LeaderMetrics;

#[derive(Debug, Error)]
pub enum LeaderError {
    #[error("leader election timing: {0}")]
    Timing(String),
    #[error("leader election needs the namespace of its Lease: set --leader-elect-namespace or POD_NAMESPACE")]
    NoNamespace,
}

/// Command-line flags shared by the binaries that elect a leader (flatten into their `Args`).
#[derive(Debug, Clone, clap::Args)]
pub struct LeaderArgs {
    /// Run as one of several replicas: only the replica holding the leader Lease acts, the others stand by and
    /// take over when it stops renewing. Needs get/create/update on leases.coordination.k8s.io.
    #[arg(long = "leader-elect", env = "CAUSEWAY_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's, from POD_NAMESPACE).
    #[arg(long = "leader-elect-namespace", env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Name of the leader Lease (default: the component's).
    #[arg(long = "leader-elect-lease-name", env = "CAUSEWAY_LEADER_ELECT_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// How long a Lease holds after its last renewal; a standby takes over this long after the leader stopped.
    #[arg(long = "leader-elect-lease-duration", env = "CAUSEWAY_LEADER_ELECT_LEASE_DURATION", default_value = "15s",
          value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How long a leader keeps acting without a successful renewal (shorter than the lease duration).
    #[arg(long = "leader-elect-renew-deadline", env = "CAUSEWAY_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// Time between two tries to acquire or renew the Lease.
    #[arg(long = "leader-elect-retry-period", env = "CAUSEWAY_LEADER_ELECT_RETRY_PERIOD", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
}

impl LeaderArgs {
    /// The Lease config, or `None` without `--leader-elect`. `default_name` names the Lease unless the flag does.
    pub fn config(&self, default_name: &str) -> Result<Option<LeaseConfig>, LeaderError> {
        if !self.leader_elect {
            return Ok(None);
        }
        let timing = Timing {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        };
        timing.validate().map_err(LeaderError::Timing)?;
        let namespace = self.namespace.clone().filter(|n| !n.is_empty()).ok_or(LeaderError::NoNamespace)?;
        let name = self.lease_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| default_name.to_string());
        Ok(Some(LeaseConfig { namespace, name, identity: identity(), timing }))
    }
}

/// This replica's name in the Lease: the pod's name (POD_NAME, else the host name) and a random suffix, so that a
/// restarted container never mistakes its predecessor's Lease for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "causeway".to_string());
    format!("{base}_{:08x}", rand::random::<u32>())
}

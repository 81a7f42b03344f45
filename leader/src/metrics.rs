//! `causeway_leader_*` metrics: whether this replica leads, how often it became leader, and Lease errors.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Default)]
pub struct LeaderMetrics {
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// Times this replica became leader.
    pub acquired: Counter,
    /// Failed reads or writes of the Lease.
    pub errors: Counter,
}

impl LeaderMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "causeway_leader_is_leader",
            "1 while this replica holds the leader Lease and acts",
            self.leader.clone(),
        );
        r.register("causeway_leader_acquired", "Times this replica became leader", self.acquired.clone());
        r.register("causeway_leader_lease_errors", "Failed reads or writes of the leader Lease", self.errors.clone());
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if leader {
            self.acquired.inc();
        }
    }
}

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
    /// Registers on the component's registry, which prefixes `causeway_` (`causeway_runtime::Health`).
    pub fn register(&self, r: &mut Registry) {
        r.register("leader_is_leader", "1 while this replica holds the leader Lease and acts", self.leader.clone());
        r.register("leader_acquired", "Times this replica became leader", self.acquired.clone());
        r.register("leader_lease_errors", "Failed reads or writes of the leader Lease", self.errors.clone());
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if leader {
            self.acquired.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_the_prefix_once_on_the_runtime_registry() {
        let m = LeaderMetrics::default();
        let mut r = Registry::with_prefix("causeway");
        m.register(&mut r);
        m.set_leader(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("\ncauseway_leader_is_leader 1\n"), "{text}");
        assert!(text.contains("\ncauseway_leader_acquired_total 1\n"), "{text}");
        assert!(!text.contains("causeway_causeway_"), "{text}");
    }
}

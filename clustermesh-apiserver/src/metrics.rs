//! The exporter's Prometheus metrics. The handles are plain atomics, so the sans-IO core can count into them and
//! tests can read them back without a server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
    pub op: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Entries currently exported, per kind (`nodes`, `services`, `ip`, `identities`).
    pub exported_entries: Family<KindLabels, Gauge>,
    /// Upserts and deletes handed to the store, per kind.
    pub writes: Family<WriteLabels, Counter>,
    /// Failures, by short reason (`store_write`, `identity_allocation`, `invalid_wireguard_key`, `invalid_object`).
    pub errors: Family<ErrorLabels, Counter>,
    /// Identities the allocator handed out to this exporter (including re-acquisitions after a release).
    pub identities_allocated: Counter,
    /// Pods that claimed an IP already held by another pod.
    pub ip_conflicts: Counter,
    /// Kubernetes watch events received, per kind.
    pub kube_events: Family<KindLabels, Counter>,
    /// Times this cluster's etcd was found to have lost its data (restarted empty, restored from an older
    /// backup), each followed by a full re-creation of users, cluster config and exported keys.
    pub etcd_resets: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "exported_entries",
            "Store entries currently exported, by kind",
            self.exported_entries.clone(),
        );
        registry.register("export_writes", "Upserts and deletes handed to the store, by kind", self.writes.clone());
        registry.register("export_errors", "Export failures, by reason", self.errors.clone());
        registry.register(
            "identities_allocated",
            "Security identities acquired from the allocator",
            self.identities_allocated.clone(),
        );
        registry.register(
            "ip_conflicts",
            "Pods that claimed an IP already held by another pod",
            self.ip_conflicts.clone(),
        );
        registry.register("kube_events", "Kubernetes watch events received, by kind", self.kube_events.clone());
        registry.register(
            "etcd_resets",
            "Times etcd was found to have lost its data and was re-created (users, cluster config, keys, canaries)",
            self.etcd_resets.clone(),
        );
    }

    pub fn error(&self, reason: &str) {
        self.errors.get_or_create(&ErrorLabels { reason: reason.to_string() }).inc();
    }

    pub fn error_count(&self, reason: &str) -> u64 {
        self.errors.get_or_create(&ErrorLabels { reason: reason.to_string() }).get()
    }

    pub fn write(&self, kind: &str, op: &str) {
        self.writes.get_or_create(&WriteLabels { kind: kind.to_string(), op: op.to_string() }).inc();
    }

    pub fn set_exported(&self, kind: &str, n: usize) {
        self.exported_entries.get_or_create(&KindLabels { kind: kind.to_string() }).set(n as i64);
    }

    pub fn kube_event(&self, kind: &str) {
        self.kube_events.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
    }
}

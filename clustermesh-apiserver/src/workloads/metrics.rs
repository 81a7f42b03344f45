//! Registration metrics (`causeway_workload_registrations_total{result}`, `causeway_workloads_registered`,
//! `causeway_workloads_meshed`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Debug, Clone, Default)]
pub struct WorkloadMetrics {
    /// Register calls by result: `ok`, `denied`, `invalid`, `unknown_workload`, `deleting`, `address_in_use`,
    /// `no_alloc_cidr`, `bad_alloc_cidr`, `overlap`, `node_name_taken` (see `core::Refusal::metric_label`), `error`
    /// (kube/etcd/allocator).
    pub registrations: Family<ResultLabels, Counter>,
    /// External workloads registered with this process.
    pub registered: Gauge,
    /// Of those, hosts in the mesh datapath (registered a WireGuard key: exported with a node record).
    pub meshed: Gauge,
    /// Meshed hosts taken out of the mesh datapath because a cluster Node took their name.
    pub evictions: Counter,
}

impl WorkloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "workload_registrations",
            "External-workload Register calls, by result",
            self.registrations.clone(),
        );
        registry.register(
            "workloads_registered",
            "External workloads registered with this process",
            self.registered.clone(),
        );
        registry.register(
            "workloads_meshed",
            "External workloads in the mesh datapath (registered with a WireGuard key; exported with a node record)",
            self.meshed.clone(),
        );
        registry.register(
            "workload_evictions",
            "Meshed external workloads taken out of the mesh datapath because a cluster Node took their name",
            self.evictions.clone(),
        );
    }

    pub fn result(&self, result: &str) {
        self.registrations.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }
}

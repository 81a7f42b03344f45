//! The controller's Prometheus metrics (registered with the `causeway_` prefix by `causeway-runtime`). Plain atomic
//! handles, so tests read them back without a server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyGroupLabels {
    pub policy: String,
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub healthy: String,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Active gateways per policy and group (zone-agnostic set).
    pub active_gateways: Family<PolicyGroupLabels, Gauge>,
    /// Healthy gateways able to serve each policy and group.
    pub healthy_gateways: Family<PolicyGroupLabels, Gauge>,
    /// Selected source IPs per policy.
    pub source_ips: Family<PolicyLabels, Gauge>,
    /// Policies with at least one problem, by the InvalidSpec reason.
    pub invalid_policies: Family<ReasonLabels, Gauge>,
    /// Gateway health transitions, by the new state.
    pub health_changes: Family<HealthLabels, Counter>,
    /// Current health of each probed gateway node after hysteresis (1 healthy, 0 not).
    pub gateway_healthy: Family<NodeLabels, Gauge>,
    /// Recomputations of every policy (only when an input changed something).
    pub reconciles: Counter,
    /// Status patches written, and those that failed.
    pub status_writes: Counter,
    pub status_write_errors: Counter,
    /// Meshed clusters whose pod CIDRs came from identity-sync's MeshView stream.
    pub mesh_clusters: Gauge,
    /// Node pod CIDRs in the MeshView stream that did not parse (ignored).
    pub mesh_rejected_cidrs: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "egress_active_gateways",
            "Active gateways per policy and group",
            self.active_gateways.clone(),
        );
        registry.register(
            "egress_healthy_gateways",
            "Healthy gateways able to serve each policy and group",
            self.healthy_gateways.clone(),
        );
        registry.register("egress_source_ips", "Selected source pod IPs per policy", self.source_ips.clone());
        registry.register(
            "egress_invalid_policies",
            "Policies reporting InvalidSpec, by reason",
            self.invalid_policies.clone(),
        );
        registry.register("egress_gateway_health_changes", "Gateway health transitions", self.health_changes.clone());
        registry.register(
            "egress_gateway_healthy",
            "Gateway node health after hysteresis (1 healthy, 0 not)",
            self.gateway_healthy.clone(),
        );
        registry.register("egress_reconciles", "Recomputations after a change", self.reconciles.clone());
        registry.register("egress_status_writes", "Policy status patches written", self.status_writes.clone());
        registry.register(
            "egress_status_write_errors",
            "Policy status patches that failed",
            self.status_write_errors.clone(),
        );
        registry.register(
            "egress_mesh_clusters",
            "Meshed clusters whose pod CIDRs were learned from identity-sync's MeshView stream",
            self.mesh_clusters.clone(),
        );
        registry.register(
            "egress_mesh_rejected_cidrs",
            "Node pod CIDRs in the MeshView stream that did not parse (ignored)",
            self.mesh_rejected_cidrs.clone(),
        );
    }

    pub(crate) fn health_change(&self, healthy: bool) {
        self.health_changes.get_or_create(&HealthLabels { healthy: healthy.to_string() }).inc();
    }
}

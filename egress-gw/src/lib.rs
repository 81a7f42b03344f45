//! causeway-egress-gw: the egress gateway controller.
//!
//! Where it sits in the flow: kube API (EgressGatewayPolicy, Pods, Namespaces, Nodes) and gateway probe reports →
//! **selection** → per-policy assignments (source pod IPs, destination and excluded CIDRs, egress IPs, ordered
//! gateway node IPs) streamed to node agents, which program the datapath; and status written back to each policy.
//!
//! - [`core`]: the sans-IO selection core. Objects and probe results in, assignments, status and problems out;
//!   no kube types, an injected clock, no sleeps.
//! - [`spec`]: turns the `causeway-crds` policy type into the core's parsed [`core::PolicySpec`].
//! - [`kube`]: the adapter. Watchers feed the index; the controller writes status, records Events and publishes
//!   the assignments.
//! - [`server`]: the `causeway.v1.EgressAssignments` gRPC stream node agents watch.
//! - [`probe`]: the UDP gateway prober whose verdicts drive gateway health.
//! - [`mesh`]: follows identity-sync's MeshView stream for the meshed clusters' pod CIDRs (never sent to a
//!   gateway).
//! - [`metrics`]: Prometheus gauges and counters.

pub mod core;
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod spec;

//! The sans-IO selection core (the linkerd policy-controller model: objects in, index, outputs out).
//!
//! Adapters apply policies, pods, namespaces, nodes, cluster CIDRs and probe results to an [`Index`], then call
//! [`Index::compute`] for every policy's [`PolicyOutput`]: the assignment node agents program (mapping onto
//! `causeway.v1.EgressPolicyAssignment`), the group statuses and the conditions. Time comes in as arguments.

mod health;
mod index;
mod mesh;
mod model;
#[cfg(test)]
mod tests;

pub use health::{HealthChange, HealthConfig, HealthTracker};
pub use index::Index;
pub use mesh::{merge_mesh_cidrs, MeshNodeEvent, MeshPodCidrs};
pub use model::*;

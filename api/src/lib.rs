//! Wire types for the streams that feed node agents: the mesh view and the egress assignments.
//!
//! identity-sync serves `causeway.v1.MeshView` (mesh.proto); the egress-gw controller serves
//! `causeway.v1.EgressAssignments` (egress.proto); node agents (datapath) consume both. clustermesh-apiserver serves
//! `causeway.v1.Workloads` (workload.proto), which external workloads (VMs) call to register. The protos are the
//! contract; this crate only compiles them.
//!
//! [`probe`] is the UDP gateway health probe between the egress-gw controller and node agents.

pub mod probe;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("causeway.v1");
}

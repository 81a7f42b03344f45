//! Wire types for the stream from identity-sync to node agents.
//!
//! identity-sync serves `causeway.v1.MeshView`; node agents (datapath) consume it. The proto is the contract;
//! this crate only compiles it.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("causeway.v1");
}

//! The sans-IO heart of identity-sync: the merged view of every remote cluster, and the rules that keep it right
//! through disconnects, re-lists, bad values and removed remotes.
//!
//! Adapters feed [`MergedView`] with events (remote life cycle, validated entries from
//! `causeway_store::RemoteContext::decode`, list completion, the local Services and external workloads, clock ticks)
//! and read back:
//! - [`MergedView::services_changed_since`] + [`MergedView::desired_slices`] for the kube adapter;
//! - [`MergedView::take_deltas`] and [`MergedView::snapshot`] for the gRPC stream ([`crate::stream`]);
//! - [`MergedView::remotes`] for status and metrics.
//!
//! No etcd, kube or tokio types appear here, and time is a value passed in, so every rule is a plain unit test.

pub mod local;
pub mod model;
pub mod remote;
pub mod slice_writes;
pub mod slices;
pub mod view;

#[cfg(test)]
mod tests;

pub use local::{AnnotationWarning, LocalService, LocalWorkload};
pub use model::{
    Affinity, Backend, Change, ClusterBackends, Delta, Frontend, GlobalServiceView, IdentityView, IpView, NodeView,
    ObjectKey, Port, Protocol, ServiceKey, Snapshot, ViewObject,
};
pub use remote::{KindCounts, RemoteState, RemoteStatus};
pub use slices::{AddressType, DesiredSlice, SliceEndpoint, SlicePort};
pub use view::{CoreConfig, CoreError, MergedView};

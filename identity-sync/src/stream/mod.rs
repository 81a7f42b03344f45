//! The gRPC side: `causeway.v1.MeshView/Watch`, the merged view as a resumable stream of snapshot + deltas for node
//! agents.
//!
//! [`MeshViewHub`] owns the [`crate::core::MergedView`]. Adapters change the view only through
//! [`MeshViewHub::update`], which publishes the resulting deltas to every client's bounded queue and to a bounded
//! log for resuming clients. A new client gets SNAPSHOT_BEGIN, every object as UPSERT, SNAPSHOT_END (all at the
//! snapshot's revision), then deltas; a client resuming from a revision the log still covers (same epoch) gets only
//! the deltas after it. A client that falls behind by more than its queue is reset to a fresh snapshot instead of
//! slowing the others.
//!
//! ```ignore
//! let hub = MeshViewHub::new(MergedView::new(cfg), StreamConfig::default(), metrics);
//! tonic::transport::Server::builder().add_service(hub.server()).serve(addr).await?;
//! hub.update(|v| v.entry_upsert("east", entry))?;
//! ```

mod convert;
mod hub;
mod server;

#[cfg(test)]
mod tests;

pub use hub::{MeshViewHub, StreamConfig, StreamMetrics};
pub use server::{MeshViewService, WatchStream};

//! The gRPC side: `causeway.v1.EgressAssignments/Watch`, the controller's assignments as a resumable stream of
//! snapshot + deltas for node agents (see `api/proto/causeway/v1/egress.proto`).
//!
//! [`AssignmentHub`] holds the last published assignments, a bounded log of deltas and one bounded queue per
//! client. [`AssignmentHub::follow`] feeds it from the controller's [`crate::kube::Controller::assignments`] watch
//! channel: every policy that changed or disappeared becomes one delta and takes the revision one step further.
//! Revisions count within an epoch, which names this process.
//!
//! Each client gets SNAPSHOT_BEGIN, one UPSERT per policy, SNAPSHOT_END (all at the snapshot's revision), then
//! deltas; a client resuming from a revision the log still holds in the same epoch gets only the deltas after it.
//! Publishing never waits for a client: a client whose queue overflows is dropped from the fan-out and, when it
//! next reads, starts over from a fresh snapshot, so a slow agent costs at most its queue.
//!
//! The view is per node: with zone affinity, the gateways sent for a group are the ones chosen for the node's
//! zone ([`convert::policy_for_zone`]). A node whose zone label changes is sent a fresh snapshot. Nodes of one zone
//! see the same bytes, so each policy version is converted and encoded once per zone view and the encoding is
//! shared by those clients' queues ([`convert::WireEvent`]): publishing a change costs per view, not per agent.
//!
//! ```ignore
//! let hub = AssignmentHub::new(StreamConfig::default(), StreamMetrics::default(), controller.node_zones());
//! hub.follow(controller.assignments(), controller.synced());
//! tokio::spawn(server::serve(listener, hub.clone()));
//! ```

pub mod convert;
mod hub;
mod service;

pub use hub::{AssignmentHub, StreamConfig, StreamMetrics};
pub use service::{serve, AssignmentsService, WatchStream};

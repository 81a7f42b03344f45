//! The node agent: turns identity-sync's MeshView stream and the egress-gw controller's EgressAssignments stream
//! into datapath map operations.
//!
//! ```text
//! MeshView.Watch ──────────► mesh::decode ──────► Mirror ─┐
//! EgressAssignments.Watch ─► assignments::decode ► Mirror ─┼─► DesiredState ─► plan(programmed, desired) ─► Datapath
//!                     (client.rs: tonic, reconnect)       │   (classes.rs)    (plan.rs: minimal, ordered)   (trait)
//! ```
//!
//! Everything except [`client`] and [`run`] is sans-IO: plain state machines and functions in domain types
//! (`IpAddr`, `IpNet`, identities, class and group ids), tested without sockets, kernel or clock. The
//! [`Datapath`] trait is the adapter boundary; [`InMemoryDatapath`] implements it for tests and `--dry-run`, and the
//! BPF-map adapter implements it over the pinned aya maps. See `docs/datapath-agent.md`.

pub mod assignments;
pub mod backoff;
pub mod classes;
pub mod client;
pub mod core;
pub mod datapath;
pub mod desired;
pub mod gc;
pub mod mesh;
pub mod mirror;
pub mod model;
pub mod plan;
pub mod run;

pub use self::core::{AgentCore, GcReport, ReconcileReport, StreamKind};
pub use self::datapath::{Datapath, DatapathError, DropReason, InMemoryDatapath};
pub use self::desired::{DesiredState, LocalNode};
pub use self::gc::GcPolicy;
pub use self::model::MapContents;
pub use self::plan::{plan, Op};

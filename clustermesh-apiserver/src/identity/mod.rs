//! Security identity allocation for the local cluster.
//!
//! - [`allocator`]: the sans-IO core. Label set → numeric ID, reference counted, with a GC grace period. Time is
//!   passed in, so it is tested with a fake clock.
//! - [`kube`]: the thin adapter that persists each allocation as a `CausewayIdentity` object before the ID is
//!   used, restores from those objects on start and deletes garbage-collected ones.

pub mod allocator;
pub mod kube;

pub use allocator::{AllocError, Allocated, IdentityAllocator, Released, RestoreReport};
pub use kube::{GcReport, IdentityError, KubeIdentityStore};

#[cfg(test)]
mod kube_tests;

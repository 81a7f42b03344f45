//! Local kube API adapters: the EndpointSlice writer ([`slices`]), the local Service reflector ([`services`]) and
//! the local external workloads' watcher ([`workloads`]). They only carry out or report; merge decisions are the
//! core's.

pub mod services;
pub mod slices;
pub mod workloads;

//! Local kube API adapters: the EndpointSlice writer ([`slices`]) and the local Service reflector ([`services`]).
//! Both only carry out or report; merge decisions are the core's.

pub mod services;
pub mod slices;

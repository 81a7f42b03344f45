//! The node agent's egress-gateway duties besides programming maps (that is [`crate::agent`]):
//!
//! - [`probe`]: answers the egress-gw controller's UDP health probes, with the gateway-ready flag;
//!
//! Each module keeps its decisions sans-IO (plain functions over bytes and domain types) with a thin adapter for
//! the socket, netlink or the kube API.

pub mod probe;

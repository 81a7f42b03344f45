//! The node agent's egress-gateway duties besides programming maps (that is [`crate::agent`]):
//!
//! - [`probe`]: answers the egress-gw controller's UDP health probes, with the gateway-ready flag;
//! - [`interfaces`] (sans-IO) and [`netlink`] (the rtnetlink reader): which interfaces and addresses this node has
//!   and which of them to publish;
//! - [`publish`]: writes them on this node's Node (optional; needs a kube client);
//! - [`garp`]: gratuitous ARP when this node takes over an egress IP.
//!
//! Each module keeps its decisions sans-IO (plain functions over bytes and domain types) with a thin adapter for
//! the socket, netlink or the kube API.

pub mod garp;
pub mod interfaces;
pub mod netlink;
pub mod probe;
pub mod publish;

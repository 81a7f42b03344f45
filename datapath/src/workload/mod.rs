//! A VM or bare-metal host ("external workload") joining the mesh: the node agent's side of the join script.
//!
//! ```text
//! join script ─► causeway-node-agent register ──mTLS gRPC──► clustermesh-apiserver (causeway.v1.Workloads/Register)
//!                  │ <state dir>/wireguard.key (the agent's key)        │ identity, mesh address, DNS, Service CIDRs
//!                  └► EnvironmentFile (envfile.rs) ◄─────────────────────┘
//!             ─► identity-sync --external-workload + causeway-node-agent --wireguard-interface --mesh-ipv4
//!                  --service-cidrs --home-cluster (host mode: peers with the home cluster's nodes)
//!             ─► causeway-node-agent check-dns (cluster names resolve on the host)
//! ```
//!
//! - [`envfile`]: the registration's answer validated and rendered as an EnvironmentFile (sans-IO), written
//!   atomically.
//! - [`register`]: the tonic client, its retry decisions ([`register::Retry`], sans-IO) and the loop around them.
//! - [`dns`]: resolving a name with the nameservers and search list of a resolv.conf (hickory-resolver).

pub mod dns;
pub mod envfile;
pub mod register;

//! The node datapath: what runs on every node and carries out the control plane's decisions per packet.
//!
//! ```text
//! identity-sync gRPC stream ─┐
//! egress-gw assignments ─────┼─► node agent ─► eBPF maps (ipcache, egress policy, SNAT/conntrack, identity policy)
//!                            │               └► WireGuard tunnels (boringtun on TUN) + routes to remote nodes
//! ```
//!
//! - `bpf/`: the C eBPF programs, compiled by `build.rs` with clang and embedded in this crate; [`bpf`] loads them,
//!   pins their maps under `/sys/fs/bpf/causeway`, attaches them, and wraps every map in typed handles.
//! - [`wireguard`]: one userspace WireGuard interface per node, peers from remote node records.
//! - [`agent`]: the node agent's sans-IO core (streams → desired state → ordered map ops) and its gRPC inputs; the
//!   `causeway-node-agent` binary runs it.
//! - [`egress`]: the agent's gateway duties outside the maps: health probe responder, interface publishing on the
//!   Node, gratuitous ARP on takeover.
//! - [`workload`]: a VM or bare-metal host joining the mesh (`causeway-node-agent register` / `check-dns`; the agent
//!   itself then runs in host mode: only a WireGuard interface, a mesh address and routes to the home cluster).
//!
//! Nothing here talks to etcd; the agent gets its inputs from identity-sync's and egress-gw's streams. The only kube
//! API use is optional: publishing this node's interfaces and WireGuard key on its Node object (`egress::publish`).
//! A joined host's `register` is the one call to the clustermesh-apiserver (`workload::register`, mTLS gRPC).

pub mod agent;
pub mod bpf;
pub mod egress;
pub mod kernel;
pub mod wireguard;
pub mod workload;

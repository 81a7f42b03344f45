//! identity-sync: the reader side of the mesh. One per cluster, it holds one etcd connection per remote cluster,
//! validates what each remote exports, and merges it into one view (global services, remote identities, ipcache,
//! remote nodes). It publishes that view into the local kube API as EndpointSlices and to node agents as a
//! resumable gRPC stream of snapshot + deltas. The local cluster's Ready external workloads (VMs with a WireGuard
//! key) join that view as nodes of the local cluster, so the local node agents peer with them. On such a VM,
//! identity-sync runs in external-workload mode (no kube API): it imports only its home cluster's store, under the
//! home's own name, and streams it to the VM's node agent.
//!
//! ```text
//! remote etcd ─► causeway-kvstore ─► RemoteContext::decode ─► core::MergedView ─┬─► kube adapter (EndpointSlices)
//!                                                                              └─► stream::MeshViewHub ─► agents
//! local ExternalWorkloads (kube) ─► kube::workloads::convert ─► core::MergedView (the local workloads source)
//! ```
//!
//! - [`core`]: the sans-IO merged view; plain state machines fed with events and a clock value.
//! - [`stream`]: the `causeway.v1.MeshView/Watch` tonic server, fed from the core's delta log.
//! - [`election`]: several replicas; only the Lease holder writes EndpointSlices.

pub mod app;
pub mod core;
pub mod election;
pub mod kube;
pub mod remotes;
pub mod status;
pub mod stream;

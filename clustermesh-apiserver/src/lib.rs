//! clustermesh-apiserver: exports one cluster's state into its etcd, for peer clusters to read.
//!
//! It sits at the start of the flow: kube API → **export** → etcd → remote identity-sync. It watches Services,
//! EndpointSlices, Namespaces, Nodes and Pods; allocates a security identity per distinct pod label set; and
//! writes identities, ipcache entries, nodes and global services under the ClusterMesh schema (`causeway-store`).
//!
//! - [`export`]: the sans-IO core. Objects in, desired store entries and identity requests out.
//! - [`kube`]: the adapter. Watches the kube API, feeds the core, carries out its requests, marks kinds synced.
//! - [`sink`]: the traits the adapter writes through (store writer, identity resolver), with in-memory versions.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`node_owners`]: node records have two writers (cluster Nodes, external workloads); a cluster Node wins its
//!   name and evicts a host that held it.
//! - [`peers`]: the `remote-<peer>` etcd users follow the peers ConfigMap `connect`/`disconnect` keep, while
//!   running.
//! - [`readiness`]: `/readyz`, combining the export's state and etcd's.
//! - [`workloads`]: external workloads (VMs) registering over mTLS gRPC, exported like pods (and, with a WireGuard
//!   key, like nodes).

pub mod export;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod node_owners;
pub mod peers;
pub mod readiness;
pub mod sink;
pub mod workloads;

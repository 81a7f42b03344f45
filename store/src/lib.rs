//! The shared store, schema v1: the typed contract between clustermesh-apiserver (writer) and identity-sync (reader).
//!
//! Keys and JSON values follow Cilium ClusterMesh's layout exactly (see `docs/kvstore-schema.md`), so a Causeway
//! cluster and a Cilium cluster can read each other's store. Everything here is sans-IO: codecs, validation and
//! cluster-identity arithmetic. The etcd plumbing lives in `causeway-kvstore`.
//!
//! - [`cluster`]: cluster names, IDs, `maxConnectedClusters` modes and identity ranges.
//! - [`keys`]: typed keys and their string forms.
//! - [`values`]: the JSON value shapes (cluster config, services, MCS service exports, nodes, ipcache entries,
//!   identity labels).
//! - [`canary`]: RFC 3339 timestamps of the synced canaries and the heartbeat.
//! - [`validate`]: strict checks a reader applies before anything enters the merged view.

pub mod canary;
pub mod cluster;
pub mod keys;
pub mod labels;
pub mod validate;
pub mod values;

pub use canary::{format_timestamp, parse_timestamp, CanaryError};
pub use cluster::{ClusterId, ClusterInfo, ClusterName, IdentityRange, MaxConnectedClusters};
pub use keys::{Kind, StoreKey};
pub use labels::{Label, LabelSet};
pub use validate::{Rejected, RemoteContext};
pub use values::{
    ClusterConfig, ClusterService, IpCacheEntry, McsServicePort, NamedPort, Node, NodeAddress, PortConfig,
    ServiceExportSpec,
};

/// Largest value (bytes) a reader accepts for any key. Real entries are well below 64 KiB; a service with thousands
/// of backends can approach a few hundred KiB, so the ceiling is 1 MiB, which is also etcd's default request limit.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

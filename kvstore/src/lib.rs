//! The etcd layer of Causeway.
//!
//! Where it sits in the flow: each cluster's **clustermesh-apiserver** exports its
//! identities, ipcache entries, services and nodes into its own etcd through a
//! [`SyncStore`] per prefix (coalesced, lease-attached writes, a synced canary once the
//! first export is complete). Each peer's **identity-sync** reads that etcd over mTLS as a
//! read-only `remote-<peer>` user through a [`WatchStore`] per prefix (list, then watch,
//! surviving disconnects and compaction).
//!
//! Also here: [`connect`] (endpoints + mTLS, checked with a first request), the
//! [`LeasePool`] behind the writes, [`ensure_auth`] to create the etcd users and roles
//! ([`sync_peer_users`] to follow peers being connected and disconnected),
//! and the [`Heartbeat`] and [`write_cluster_config`] writers, and the [`ResetDetector`]
//! that notices an etcd which lost its data, and the [`WriteGate`] that pauses every write
//! from the moment a reset is suspected until the owner re-created etcd. Keys and values are raw
//! strings and bytes; the typed schema lives in `causeway-store`.

mod auth;
mod backoff;
mod connect;
mod error;
mod gate;
mod lease;
mod list;
mod mesh_keys;
mod reset;
mod sync_store;
mod watch_store;

pub use auth::{
    ensure_auth, external_workload_grants, plan_peer_users, remote_grants, remote_user, sync_peer_users, Grant,
    GrantKind, PeerUserPlan, ADMIN_ROLE, EXTERNAL_WORKLOAD_ROLE, EXTERNAL_WORKLOAD_USER, INIT_LOCK_PREFIX,
    NODE_REGISTER_PREFIX, REMOTE_ROLE, REMOTE_USER_PREFIX, ROOT_ROLE,
};
pub use connect::{connect, EtcdConfig, TlsConfig};
pub use error::KvError;
pub use gate::{GateState, WriteGate};
pub use lease::{LeaseConfig, LeasePool, LeaseStats};
pub use list::{DEFAULT_PAGE_SIZE, MAX_LIST_MESSAGE};
pub use mesh_keys::{
    canary_key, cluster_config_key, write_cluster_config, Heartbeat, HAS_CLUSTER_CONFIG_KEY, HEARTBEAT_INTERVAL,
    HEARTBEAT_KEY,
};
pub use reset::{ResetDetector, ResetReason, RESET_CHECK_INTERVAL};
pub use sync_store::{
    SyncStats, SyncStatsSnapshot, SyncStore, SyncStoreConfig, DEFAULT_MAX_TXN_OPS, DEFAULT_TXNS_IN_FLIGHT,
};
pub use watch_store::{WatchEvent, WatchStats, WatchStore, WatchStoreConfig};

/// Re-exported so callers can hold a client without depending on etcd-client directly.
pub use etcd_client::Client;

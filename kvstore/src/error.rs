use std::path::PathBuf;
use std::time::Duration;

/// Errors of the etcd layer. Every variant names the endpoint, key or prefix involved.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The configuration cannot work (e.g. no endpoints).
    #[error("invalid etcd configuration: {0}")]
    Config(String),

    /// A TLS file (CA, certificate or key) could not be read.
    #[error("cannot read etcd TLS file {path}: check the path and that the Secret is mounted")]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The client could not be built or the first request failed.
    #[error("cannot connect to etcd at {endpoints}: {hint}")]
    Connect {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What to check.
        hint: &'static str,
        /// The etcd-client error.
        #[source]
        source: etcd_client::Error,
    },

    /// etcd did not answer the first request in time.
    #[error(
        "etcd at {endpoints} did not answer within {timeout:?}: check that it is running and \
         reachable from here, and that the endpoint scheme (http/https) matches its TLS setting"
    )]
    ConnectTimeout {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// The connect timeout.
        timeout: Duration,
    },

    /// An etcd request failed.
    #[error("etcd {op} on {target:?} failed")]
    Request {
        /// The operation ("put", "txn", "get", "watch", "lease grant", ...).
        op: &'static str,
        /// The key, prefix or object it was about.
        target: String,
        /// The etcd-client error.
        #[source]
        source: etcd_client::Error,
    },

    /// A write was not sent because the [`crate::WriteGate`] is closed (etcd is being
    /// re-created after a reset); it is retried once the gate opens.
    #[error("write of {key:?} paused: etcd is being re-created after a reset")]
    Paused {
        /// The (first) key of the write.
        key: String,
    },

    /// A key given to a store is not under the store's prefix.
    #[error("key {key:?} is outside the store prefix {prefix:?}; use the store that owns it")]
    KeyOutsidePrefix {
        /// The key.
        key: String,
        /// The store's prefix.
        prefix: String,
    },
}

impl KvError {
    pub(crate) fn request(op: &'static str, target: impl Into<String>, source: etcd_client::Error) -> Self {
        KvError::Request { op, target: target.into(), source }
    }

    /// Whether etcd refused the request for lack of permission (an auth-enabled etcd and a
    /// user whose role does not cover the key).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            KvError::Request { source, .. } | KvError::Connect { source, .. } => is_permission_denied(source),
            _ => false,
        }
    }
}

pub(crate) fn is_permission_denied(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("permission denied"),
        _ => false,
    }
}

pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

pub(crate) fn is_compacted(e: &etcd_client::Error) -> bool {
    e.to_string().contains("compacted")
}

//! The `causeway` command line: the way operators drive Causeway.
//!
//! It sits outside the data flow. It writes the configuration the components read — cluster name and ID, the
//! mesh certificates, the peer config Secret identity-sync mounts — and reads what they report: EgressGatewayPolicy
//! status from the kube API, node agents' SNAT metrics, identity-sync's `/status`. The sandbox runs the real
//! binaries — etcd, clustermesh-apiserver, identity-sync — with the in-memory Kubernetes API stand-in in place of a
//! real kube-apiserver, as a separate process.
//!
//! Each command is a thin adapter (kube, HTTP) around plain functions that decide and render, so that the rules
//! (what `connect` refuses, how a status table reads) are testable without a cluster.

pub mod clustermesh;
pub mod egress;
pub mod external_workload;
pub mod kubectx;
pub mod promtext;
pub mod sandbox;

pub use kubectx::KubeTarget;

/// Errors of the CLI's commands. Messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig ({target}): {message}")]
    Kubeconfig { target: String, message: String },
    #[error("kube API ({target}): {what}: {source}")]
    Kube {
        target: String,
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The request is refused; the message explains why and how to fix it.
    #[error("{0}")]
    Refused(String),
    #[error("certificates: {0}")]
    Pki(#[from] causeway_pki::PkiError),
    #[error("{what}: {message}")]
    Http { what: String, message: String },
    #[error("timed out after {secs}s: {what}")]
    Timeout { what: String, secs: u64 },
}

impl Error {
    pub(crate) fn kube(target: &KubeTarget, what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let target = target.label();
        let what = what.into();
        move |source| Error::Kube { target, what, source }
    }
}

/// Whether a kube error is a 404.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

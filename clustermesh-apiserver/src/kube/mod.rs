//! The kube adapter (in progress).

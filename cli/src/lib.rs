//! The `causeway` command line: the way operators drive Causeway.
//!
//! It sits outside the data flow. It starts things (the local sandbox), writes configuration the components read
//! (peer configs, certificates), and reads the components' status endpoints. The sandbox runs the real binaries —
//! etcd, clustermesh-apiserver, identity-sync — with the in-memory Kubernetes API stand-in in place of a real
//! kube-apiserver, as a separate process.

pub mod sandbox;

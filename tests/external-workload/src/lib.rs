//! TEST HARNESS for an external workload joining the mesh (issue 5, item 2). Never a runtime dependency.
//!
//! Where it sits: it wires cluster "west" the way a real one runs — real etcd with mTLS and auth, the real
//! clustermesh-apiserver (with its `workloads` registration port), west's real identity-sync, and the real
//! causeway-node-agent with WireGuard on node1 — and a "VM" network namespace that joins it by running the real
//! script printed by `causeway external-workload install`, then the two services that script installs, started
//! from the unit files it wrote. Then it checks what a user would: the ExternalWorkload's status, the ipcache entry
//! and identity in etcd, pod and Service reachability over the tunnel, DNS, and what crosses the underlay.
//!
//! Stand-ins, each documented in its module: the kube API (`fake-kube-apiserver`), kube-proxy ([`kube_proxy`]:
//! nftables DNAT from the API's Services and EndpointSlices) and the cluster DNS ([`dns`]: Debian's dnsmasq
//! answering the Services' names).
//!
//! - [`net`]: namespaces and wires (underlay switch, node1 with an echo pod and a DNS pod, vm1), the echo server.
//! - [`testbed`]: the cluster's processes and objects, running the join script and the units it installs.
//!
//! The binaries come from the cargo target directory the test runs from: build them first (`cargo build --bins
//! -p causeway -p clustermesh-apiserver -p identity-sync -p causeway-datapath`). Needs root and network
//! namespaces: tests call [`causeway_testsupport::netns::privileged`] first.

pub mod dns;
pub mod kube_proxy;
pub mod net;
pub mod testbed;

pub use testbed::Testbed;

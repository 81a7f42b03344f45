//! The merged view's objects, in the compact form the core keeps in memory and hands to adapters.
//!
//! Objects are immutable and shared behind `Arc`: a snapshot or a delta is a list of pointers, so taking a snapshot
//! of 100k entries for a connecting agent costs a few hundred kilobytes, not a copy of the view.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Cilium's "ANY": the port applies to every protocol.
    Any,
}

impl Protocol {
    /// Parses the store's spelling; validation already refused anything else.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            "ANY" => Some(Protocol::Any),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Any => "ANY",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named port of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// One ClusterIP of the local Service and the Service's ports: what agents load-balance the backends behind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    /// In the Service's `spec.ports` order.
    pub ports: Vec<Port>,
}

/// One remote backend of a global service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    /// Sorted by name, as the store's port map is.
    pub ports: Vec<Port>,
    pub zone: Option<Box<str>>,
    pub hostname: Option<Box<str>>,
}

/// The backends one source cluster contributes to a global service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterBackends {
    pub cluster: Arc<str>,
    /// Sorted by IP.
    pub backends: Vec<Backend>,
}

/// How a global service prefers its backends (`service.cilium.io/affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// Use local and remote backends alike.
    #[default]
    None,
    /// Prefer local backends; use remote ones only while no local backend is ready.
    Local,
    /// Prefer remote backends; use local ones only while no remote backend exists.
    Remote,
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Local => "local",
            Affinity::Remote => "remote",
        }
    }
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A global service as merged: the remote backends the local cluster should use, after affinity.
///
/// Local backends are not listed; the local cluster's own EndpointSlices already carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalServiceView {
    pub key: ServiceKey,
    pub affinity: Affinity,
    /// The local Service's ClusterIPs with its ports (the local Service defines the frontends); empty for a
    /// headless Service.
    pub frontends: Vec<Frontend>,
    /// One entry per source cluster that has at least one backend in effect, sorted by cluster name.
    pub clusters: Vec<ClusterBackends>,
}

/// A remote security identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityView {
    pub id: u32,
    pub cluster: Arc<str>,
    /// The store's sorted `source:key=value;` form.
    pub labels: Box<str>,
}

/// A remote pod IP and its identity. Kept small: this is the object there are 100k of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpView {
    pub ip: IpAddr,
    pub identity: u32,
    pub host_ip: Option<IpAddr>,
    pub encrypt_key: u8,
    pub cluster_id: u32,
    pub cluster: Arc<str>,
    /// Interned: a cluster has few namespaces and many pods.
    pub namespace: Arc<str>,
    pub pod_name: Box<str>,
}

/// A remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub cluster: Arc<str>,
    pub cluster_id: u32,
    pub name: Box<str>,
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub zone: Option<Box<str>>,
    pub wireguard_pub_key: Box<str>,
}

/// Any object of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewObject {
    Service(Arc<GlobalServiceView>),
    Identity(Arc<IdentityView>),
    Ip(Arc<IpView>),
    Node(Arc<NodeView>),
}

impl ViewObject {
    pub fn key(&self) -> ObjectKey {
        match self {
            ViewObject::Service(s) => ObjectKey::Service(s.key.clone()),
            ViewObject::Identity(i) => ObjectKey::Identity(i.id),
            ViewObject::Ip(i) => ObjectKey::Ip(i.ip),
            ViewObject::Node(n) => ObjectKey::Node { cluster: n.cluster.clone(), name: n.name.clone() },
        }
    }
}

/// What names an object of the view.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    Service(ServiceKey),
    Identity(u32),
    Ip(IpAddr),
    Node { cluster: Arc<str>, name: Box<str> },
}

/// One change of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(ViewObject),
    Delete(ObjectKey),
}

/// A change and the view revision it brings the view to. Revisions increase by one per delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub revision: u64,
    pub change: Change,
}

/// The whole view at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: u64,
    pub objects: Vec<ViewObject>,
}

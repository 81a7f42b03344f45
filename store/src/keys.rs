//! Typed keys of the shared store and their exact string forms.

use std::fmt;
use std::net::IpAddr;

use thiserror::Error;

/// The kinds of state a cluster exports. Each has its own prefix and its own "synced" canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Nodes,
    Services,
    Ip,
    Identities,
    ServiceExports,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities, Kind::ServiceExports];

    /// The path segment after `cilium/state/`.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::Ip => "ip",
            Kind::Identities => "identities",
            Kind::ServiceExports => "serviceexports",
        }
    }

    /// Prefix a reader watches for this kind in one remote's store. Nodes, services and service exports are
    /// namespaced by cluster name; ipcache and identities are not (each remote etcd holds only its own).
    pub fn watch_prefix(self, cluster: &str) -> String {
        match self {
            Kind::Nodes | Kind::Services | Kind::ServiceExports => {
                format!("cilium/state/{}/v1/{}/", self.segment(), cluster)
            }
            Kind::Ip => "cilium/state/ip/v1/default/".to_string(),
            Kind::Identities => "cilium/state/identities/v1/id/".to_string(),
        }
    }

    /// `cilium/synced/<cluster>/cilium/state/<kind>/v1`
    pub fn canary_key(self, cluster: &str) -> String {
        format!("cilium/synced/{}/cilium/state/{}/v1", cluster, self.segment())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

pub const HAS_CLUSTER_CONFIG: &str = "cilium/.has-cluster-config";
pub const HEARTBEAT: &str = "cilium/.heartbeat";
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config/";
pub const STATE_PREFIX: &str = "cilium/state/";
pub const SYNCED_PREFIX: &str = "cilium/synced/";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("key {key:?} is not a valid store key: {why}")]
pub struct KeyError {
    pub key: String,
    pub why: &'static str,
}

/// A parsed store key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreKey {
    ClusterConfig {
        cluster: String,
    },
    HasClusterConfig,
    Heartbeat,
    Node {
        cluster: String,
        name: String,
    },
    Service {
        cluster: String,
        namespace: String,
        name: String,
    },
    ServiceExport {
        cluster: String,
        namespace: String,
        name: String,
    },
    /// An ipcache entry in the `default` address space.
    Ip {
        ip: IpAddr,
    },
    Identity {
        id: u32,
    },
    Synced {
        cluster: String,
        kind: Kind,
    },
}

impl StoreKey {
    pub fn kind(&self) -> Option<Kind> {
        match self {
            StoreKey::Node { .. } => Some(Kind::Nodes),
            StoreKey::Service { .. } => Some(Kind::Services),
            StoreKey::ServiceExport { .. } => Some(Kind::ServiceExports),
            StoreKey::Ip { .. } => Some(Kind::Ip),
            StoreKey::Identity { .. } => Some(Kind::Identities),
            _ => None,
        }
    }

    pub fn parse(key: &str) -> Result<StoreKey, KeyError> {
        let err = |why| KeyError { key: key.to_string(), why };
        let nonempty = |parts: &[&str]| parts.iter().all(|p| !p.is_empty());
        if key == HAS_CLUSTER_CONFIG {
            return Ok(StoreKey::HasClusterConfig);
        }
        if key == HEARTBEAT {
            return Ok(StoreKey::Heartbeat);
        }
        if let Some(cluster) = key.strip_prefix(CLUSTER_CONFIG_PREFIX) {
            if cluster.is_empty() || cluster.contains('/') {
                return Err(err("cluster-config key must name exactly one cluster"));
            }
            return Ok(StoreKey::ClusterConfig { cluster: cluster.to_string() });
        }
        if let Some(rest) = key.strip_prefix(SYNCED_PREFIX) {
            let (cluster, tail) = rest.split_once('/').ok_or_else(|| err("canary key has no cluster"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| tail == format!("cilium/state/{}/v1", k.segment()))
                .ok_or_else(|| err("canary key names an unknown kind"))?;
            if cluster.is_empty() {
                return Err(err("canary key has an empty cluster"));
            }
            return Ok(StoreKey::Synced { cluster: cluster.to_string(), kind });
        }
        let rest = key.strip_prefix(STATE_PREFIX).ok_or_else(|| err("unknown prefix"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["nodes", "v1", cluster, name] if nonempty(&[cluster, name]) => {
                Ok(StoreKey::Node { cluster: cluster.to_string(), name: name.to_string() })
            }
            ["services", "v1", cluster, ns, name] if nonempty(&[cluster, ns, name]) => Ok(StoreKey::Service {
                cluster: cluster.to_string(),
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            ["serviceexports", "v1", cluster, ns, name] if nonempty(&[cluster, ns, name]) => {
                Ok(StoreKey::ServiceExport {
                    cluster: cluster.to_string(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            ["ip", "v1", "default", ip] => {
                ip.parse().map(|ip| StoreKey::Ip { ip }).map_err(|_| err("ipcache key is not an IP address"))
            }
            // IPv6 addresses have no '/', so a longer path is a prefix entry or garbage; neither is a pod IP.
            ["identities", "v1", "id", id] => match id.parse::<u32>() {
                Ok(id) if id > 0 && id < (1 << 24) => Ok(StoreKey::Identity { id }),
                _ => Err(err("identity key is not a 24-bit number")),
            },
            _ => Err(err("unknown or malformed state key")),
        }
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::ClusterConfig { cluster } => write!(f, "{CLUSTER_CONFIG_PREFIX}{cluster}"),
            StoreKey::HasClusterConfig => f.write_str(HAS_CLUSTER_CONFIG),
            StoreKey::Heartbeat => f.write_str(HEARTBEAT),
            StoreKey::Node { cluster, name } => write!(f, "cilium/state/nodes/v1/{cluster}/{name}"),
            StoreKey::Service { cluster, namespace, name } => {
                write!(f, "cilium/state/services/v1/{cluster}/{namespace}/{name}")
            }
            StoreKey::ServiceExport { cluster, namespace, name } => {
                write!(f, "cilium/state/serviceexports/v1/{cluster}/{namespace}/{name}")
            }
            StoreKey::Ip { ip } => write!(f, "cilium/state/ip/v1/default/{ip}"),
            StoreKey::Identity { id } => write!(f, "cilium/state/identities/v1/id/{id}"),
            StoreKey::Synced { cluster, kind } => f.write_str(&kind.canary_key(cluster)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_key_strings_round_trip() {
        let cases = [
            "cilium/cluster-config/east",
            "cilium/.has-cluster-config",
            "cilium/.heartbeat",
            "cilium/state/nodes/v1/east/east-node-2",
            "cilium/state/services/v1/east/shop/cart",
            "cilium/state/serviceexports/v1/east/shop/cart",
            "cilium/state/ip/v1/default/10.1.2.33",
            "cilium/state/ip/v1/default/fd00::21",
            "cilium/state/identities/v1/id/458771",
            "cilium/synced/east/cilium/state/nodes/v1",
            "cilium/synced/east/cilium/state/services/v1",
            "cilium/synced/east/cilium/state/ip/v1",
            "cilium/synced/east/cilium/state/identities/v1",
        ];
        for k in cases {
            let parsed = StoreKey::parse(k).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parsed.to_string(), k);
        }
    }

    #[test]
    fn canary_and_prefixes() {
        assert_eq!(Kind::Ip.canary_key("east"), "cilium/synced/east/cilium/state/ip/v1");
        assert_eq!(Kind::Nodes.watch_prefix("east"), "cilium/state/nodes/v1/east/");
        assert_eq!(Kind::Ip.watch_prefix("east"), "cilium/state/ip/v1/default/");
        assert_eq!(Kind::Identities.watch_prefix("east"), "cilium/state/identities/v1/id/");
    }

    #[test]
    fn garbage_keys_are_errors() {
        for k in [
            "",
            "cilium/state/ip/v1/default/not-an-ip",
            "cilium/state/ip/v1/default/10.0.0.0/8",
            "cilium/state/identities/v1/id/abc",
            "cilium/state/identities/v1/id/0",
            "cilium/state/identities/v1/id/16777216",
            "cilium/state/nodes/v1/east",
            "cilium/state/nodes/v1//n",
            "cilium/state/services/v1/east/shop",
            "cilium/synced/east/cilium/state/bogus/v1",
            "cilium/cluster-config/",
            "other/prefix",
        ] {
            assert!(StoreKey::parse(k).is_err(), "{k:?} parsed");
        }
    }
}

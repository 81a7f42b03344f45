//! JSON value shapes, field for field as ClusterMesh writes them (Go-style names included).
//!
//! Serialization writes every field the way the reference implementation does (no omitted empties unless the
//! reference omits them), so a byte-level golden test can pin the format. Deserialization ignores unknown fields,
//! so newer writers stay readable.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `cilium/cluster-config/<cluster>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub id: u32,
    #[serde(default)]
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capabilities {
    #[serde(rename = "syncedCanaries", default)]
    pub synced_canaries: bool,
    /// 0 (absent) means the default, 255.
    #[serde(rename = "maxConnectedClusters", default)]
    pub max_connected_clusters: u32,
    #[serde(rename = "serviceExportsEnabled", default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
}

/// A port as ClusterMesh writes it: `{"Protocol": "TCP", "Port": 80}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortConfig {
    #[serde(rename = "Protocol")]
    pub protocol: String,
    #[serde(rename = "Port")]
    pub port: u16,
}

/// Port name → port, for one address.
pub type PortMap = BTreeMap<String, PortConfig>;

/// `{"zone": "eu-1a", "forZones": [{"name": "eu-1a"}]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BackendZone {
    #[serde(default)]
    pub zone: String,
    #[serde(rename = "forZones", default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub for_zones: Vec<ForZone>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForZone {
    pub name: String,
}

/// `cilium/state/services/v1/<cluster>/<namespace>/<name>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterService {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    #[serde(default, with = "go_ip_keyed")]
    pub frontends: BTreeMap<IpAddr, PortMap>,
    #[serde(default, with = "go_ip_keyed")]
    pub backends: BTreeMap<IpAddr, PortMap>,
    #[serde(default, with = "go_ip_keyed", skip_serializing_if = "BTreeMap::is_empty")]
    pub hostnames: BTreeMap<IpAddr, String>,
    #[serde(default, with = "go_ip_keyed", skip_serializing_if = "BTreeMap::is_empty")]
    pub zones: BTreeMap<IpAddr, BackendZone>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "includeExternal", default)]
    pub include_external: bool,
    #[serde(default)]
    pub shared: bool,
    #[serde(rename = "clusterID", default)]
    pub cluster_id: u32,
}

/// One address of a node: `{"Type": "InternalIP", "IP": "192.168.10.12"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "IP")]
    pub ip: IpAddr,
}

/// `cilium/state/nodes/v1/<cluster>/<node>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Cluster")]
    pub cluster: String,
    #[serde(rename = "IPAddresses", default, deserialize_with = "null_as_default")]
    pub addresses: Vec<NodeAddress>,
    #[serde(rename = "IPv4AllocCIDR", default, with = "go_ipnet")]
    pub ipv4_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv6AllocCIDR", default, with = "go_ipnet")]
    pub ipv6_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv4HealthIP", default, with = "go_opt_ip")]
    pub ipv4_health_ip: Option<IpAddr>,
    #[serde(rename = "IPv4IngressIP", default, with = "go_opt_ip")]
    pub ipv4_ingress_ip: Option<IpAddr>,
    #[serde(rename = "ClusterID", default)]
    pub cluster_id: u32,
    #[serde(rename = "Source", default)]
    pub source: String,
    #[serde(rename = "EncryptionKey", default)]
    pub encryption_key: u8,
    #[serde(rename = "Labels", default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(rename = "Annotations", default, deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
    #[serde(rename = "WireguardPubKey", default)]
    pub wireguard_pub_key: String,
    #[serde(rename = "BootID", default)]
    pub boot_id: String,
}

impl Node {
    pub const ZONE_LABEL: &'static str = "topology.kubernetes.io/zone";

    pub fn zone(&self) -> Option<&str> {
        self.labels.get(Self::ZONE_LABEL).map(String::as_str)
    }

    pub fn internal_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().filter(|a| a.kind == "InternalIP").map(|a| a.ip)
    }

    pub fn pod_cidrs(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.ipv4_alloc_cidr.iter().chain(self.ipv6_alloc_cidr.iter()).copied()
    }
}

/// `{"Name": "http", "Port": 8080, "Protocol": "TCP"}`
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedPort {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Port")]
    pub port: u16,
    #[serde(rename = "Protocol")]
    pub protocol: String,
}

/// `cilium/state/ip/v1/default/<ip>`: pod IP → security identity and the node that hosts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCacheEntry {
    #[serde(rename = "IP")]
    pub ip: IpAddr,
    #[serde(rename = "HostIP", default, with = "go_opt_ip")]
    pub host_ip: Option<IpAddr>,
    #[serde(rename = "ID")]
    pub id: u32,
    #[serde(rename = "Key", default)]
    pub key: u8,
    #[serde(rename = "Metadata", default)]
    pub metadata: String,
    #[serde(rename = "K8sNamespace", default)]
    pub k8s_namespace: String,
    #[serde(rename = "K8sPodName", default)]
    pub k8s_pod_name: String,
    #[serde(rename = "K8sPodUID", default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<String>,
    #[serde(rename = "K8sServiceAccount", default, skip_serializing_if = "Option::is_none")]
    pub k8s_service_account: Option<String>,
    #[serde(rename = "NamedPorts", default, deserialize_with = "null_as_default")]
    pub named_ports: Vec<NamedPort>,
}

/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`: a Service marked for export by an MCS-API
/// `ServiceExport`, as Cilium's clustermesh-apiserver publishes it with MCS-API on (the service's shape, not its
/// backends; backends travel in the cluster service). Field order and names are Cilium's `MCSAPIServiceSpec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExportSpec {
    pub cluster: String,
    pub name: String,
    pub namespace: String,
    /// The ServiceExport's `spec.exportedAnnotations`.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The ServiceExport's `spec.exportedLabels`.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The ServiceExport's creation time (Go `metav1.Time`: RFC 3339, whole seconds, UTC; `null` when unset, which
    /// readers refuse). Conflicting exports are resolved in favour of the oldest.
    #[serde(rename = "exportCreationTimestamp", default, with = "go_meta_time")]
    pub export_creation_timestamp: Option<chrono::DateTime<chrono::Utc>>,
    /// Always written, `[]` when the service has no ports; `null` reads as empty.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<McsServicePort>,
    /// `ClusterSetIP`, or `Headless` when the Service's clusterIP is `None`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `None` or `ClientIP`.
    #[serde(rename = "sessionAffinity", default)]
    pub session_affinity: String,
    #[serde(rename = "sessionAffinityConfig", default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `IPv4` / `IPv6`, in the Service's order.
    #[serde(
        rename = "ipFamilies",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_families: Vec<String>,
    /// `Cluster` or `Local`.
    #[serde(rename = "internalTrafficPolicy", default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// `PreferClose`, `PreferSameZone` or `PreferSameNode`.
    #[serde(rename = "trafficDistribution", default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

impl ServiceExportSpec {
    pub const CLUSTER_SET_IP: &'static str = "ClusterSetIP";
    pub const HEADLESS: &'static str = "Headless";
}

/// An MCS-API `ServicePort`: `{"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80}`, every field
/// but `port` omitted when empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McsServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(rename = "appProtocol", default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

/// Kubernetes' `SessionAffinityConfig`: `{"clientIP": {"timeoutSeconds": 10800}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientIpConfig {
    #[serde(rename = "timeoutSeconds", default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A Go `map[string]T` keyed by IP address. Go's encoder writes map keys sorted as strings (`10.1.3.17` before
/// `10.1.3.9`), which differs from `IpAddr`'s numeric order, so the writer sorts by the string form to produce the
/// same bytes. A nil Go map is written as `null`, which reads as empty.
mod go_ip_keyed {
    use super::*;
    use serde::ser::SerializeMap;

    pub fn serialize<S: Serializer, V: Serialize>(m: &BTreeMap<IpAddr, V>, s: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<(String, &V)> = m.iter().map(|(k, v)| (k.to_string(), v)).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_entry(&k, v)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<BTreeMap<IpAddr, V>, D::Error> {
        Ok(Option::<BTreeMap<IpAddr, V>>::deserialize(d)?.unwrap_or_default())
    }
}

/// Go's `net.IP` in JSON: a string, where the empty string (or null) is "no address".
mod go_opt_ip {
    use super::*;

    pub fn serialize<S: Serializer>(ip: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match ip {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("invalid IP address {s:?}"))),
        }
    }
}

/// Go's `*net.IPNet` in JSON: `{"IP": "10.1.2.0", "Mask": "<base64 mask bytes>"}` or null.
mod go_ipnet {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Wire {
        #[serde(rename = "IP")]
        ip: String,
        #[serde(rename = "Mask")]
        mask: String,
    }

    pub fn serialize<S: Serializer>(net: &Option<IpNet>, s: S) -> Result<S::Ok, S::Error> {
        let Some(net) = net else { return s.serialize_none() };
        let mask = match net {
            IpNet::V4(n) => n.netmask().octets().to_vec(),
            IpNet::V6(n) => n.netmask().octets().to_vec(),
        };
        Wire { ip: net.network().to_string(), mask: base64::engine::general_purpose::STANDARD.encode(mask) }
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpNet>, D::Error> {
        use serde::de::Error;
        let Some(w) = Option::<Wire>::deserialize(d)? else { return Ok(None) };
        let ip: IpAddr = w.ip.parse().map_err(|_| D::Error::custom(format!("invalid CIDR IP {:?}", w.ip)))?;
        let mask = base64::engine::general_purpose::STANDARD
            .decode(&w.mask)
            .map_err(|_| D::Error::custom(format!("CIDR mask {:?} is not base64", w.mask)))?;
        let prefix = mask_prefix_len(&mask, ip.is_ipv4())
            .ok_or_else(|| D::Error::custom(format!("CIDR mask {:?} is not a valid prefix mask for {ip}", w.mask)))?;
        IpNet::new(ip, prefix).map(|n| Some(n.trunc())).map_err(D::Error::custom)
    }

    /// Prefix length of a contiguous mask; IPv4 accepts Go's 16-byte form (96 leading one bits, then the v4 mask).
    fn mask_prefix_len(mask: &[u8], v4: bool) -> Option<u8> {
        let bits = match (mask.len(), v4) {
            (4, true) | (16, false) => mask,
            (16, true) if mask[..12].iter().all(|b| *b == 0xff) => &mask[12..],
            _ => return None,
        };
        let ones: u32 = bits.iter().map(|b| b.count_ones()).sum();
        let mut expected = vec![0u8; bits.len()];
        for (i, byte) in expected.iter_mut().enumerate() {
            let start = i as u32 * 8;
            *byte = match ones.saturating_sub(start) {
                0 => 0,
                n if n >= 8 => 0xff,
                n => !(0xffu8 >> n),
            };
        }
        (expected == bits).then_some(ones as u8)
    }
}

/// Go's `metav1.Time` in JSON: an RFC 3339 string in UTC with whole seconds, or `null` for the zero time. Readers
/// accept any RFC 3339 time.
mod go_meta_time {
    use super::*;
    use chrono::{DateTime, Utc};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&crate::canary::format_timestamp(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => crate::canary::parse_timestamp(s.as_bytes()).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

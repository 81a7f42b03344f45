//! `clustermesh connect` and `disconnect`: each side gets a peer config for the other in its remotes Secret.
//!
//! For clusters A and B, A's Secret gets the keys `B` (the peer config file identity-sync parses), `B.ca.crt` (B's
//! CA, to verify B's etcd), `B.crt` and `B.key` (a client certificate with CN `remote-A`, signed by B's CA, which
//! B's etcd maps to its read-only `remote-A` user). identity-sync skips `*.crt`/`*.key` as remote names and
//! resolves the relative file names against the mounted directory.
//!
//! The Secret's annotation [`PEER_IDS_ANNOTATION`] remembers each peer's cluster ID, so that a later `connect`
//! can refuse a third cluster that reuses an ID already in the mesh.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_pki::users;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use kube::api::ListParams;
use kube::Api;

use super::{meta, secret_str, Cluster, ClusterSettings, APISERVER_SERVICE, REMOTES_SECRET, SERVER_SECRET};
use crate::{Error, KubeTarget};

/// JSON map peer name → cluster ID, on the remotes Secret.
pub const PEER_IDS_ANNOTATION: &str = "causeway.io/peer-cluster-ids";

/// How peers reach a cluster's clustermesh-apiserver (its etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// `LoadBalancer`, `NodePort` or `ClusterIP`: which of the Service's addresses was used.
    pub via: &'static str,
}

impl Endpoint {
    pub fn url(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("https://[{v6}]:{}", self.port),
            _ => format!("https://{}:{}", self.host, self.port),
        }
    }
}

/// Every address of the Service worth putting in the server certificate: ClusterIPs and load-balancer ingress.
pub fn service_addresses(svc: &Service) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(spec) = &svc.spec {
        out.extend(spec.cluster_ips.clone().unwrap_or_default());
        out.extend(spec.cluster_ip.clone());
    }
    if let Some(ingress) = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref()) {
        for i in ingress {
            out.extend(i.ip.clone());
            out.extend(i.hostname.clone());
        }
    }
    out.retain(|a| !a.is_empty() && a != "None");
    out.dedup();
    out
}

/// For a NodePort (or LoadBalancer) Service, the node addresses peers may use with the node port: they belong in
/// the server certificate too.
pub fn node_port_addresses(svc: &Service, nodes: &[Node]) -> Vec<String> {
    let has_node_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ports| ports.iter().any(|p| p.node_port.is_some()));
    if !has_node_port {
        return Vec::new();
    }
    nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .map(|a| a.address.clone())
        .collect()
}

/// Lists up to `limit` nodes; an error (no RBAC to list nodes) reads as none, because only NodePort needs them.
pub(crate) async fn some_nodes(client: &kube::Client, limit: u32) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().limit(limit))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Picks the address peers should use: the load balancer's ingress, else a node's address with the NodePort, else
/// the ClusterIP (reachable from a peer only when the service networks are routed between clusters).
pub fn pick_endpoint(svc: &Service, nodes: &[Node]) -> Result<Endpoint, String> {
    let spec = svc.spec.as_ref().ok_or("the Service has no spec")?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("etcd"))
        .or_else(|| ports.first())
        .ok_or("the Service has no ports")?;
    let lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    if let Some(i) = lb.and_then(|i| i.iter().find(|i| i.ip.is_some() || i.hostname.is_some())) {
        let host = i.ip.clone().or_else(|| i.hostname.clone()).unwrap_or_default();
        let port = u16::try_from(port.port).map_err(|_| format!("port {} is out of range", port.port))?;
        return Ok(Endpoint { host, port, via: "LoadBalancer" });
    }
    if let Some(node_port) = port.node_port {
        // ExternalIP first (reachable from outside), else InternalIP, of the first node that has one.
        for kind in ["ExternalIP", "InternalIP"] {
            let addr = nodes.iter().find_map(|n| {
                n.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == kind).map(|a| a.address.clone())
            });
            if let Some(host) = addr {
                let port = u16::try_from(node_port).map_err(|_| format!("nodePort {node_port} is out of range"))?;
                return Ok(Endpoint { host, port, via: "NodePort" });
            }
        }
    }
    match spec.cluster_ip.as_deref() {
        Some(ip) if !ip.is_empty() && ip != "None" => {
            let port = u16::try_from(port.port).map_err(|_| format!("port {} is out of range", port.port))?;
            Ok(Endpoint { host: ip.to_string(), port, via: "ClusterIP" })
        }
        _ => Err("the Service has no load-balancer ingress, no NodePort with a node address and no ClusterIP".into()),
    }
}

/// The peer config file identity-sync reads (Cilium's format), naming the TLS files next to it. `tls-server-name`
/// (a Causeway addition) verifies the peer's certificate against `clustermesh-apiserver`, a name every certificate
/// Causeway issues carries, since the address picked (a node's address with the NodePort, a load balancer that
/// appeared later) need not be in it.
pub fn peer_config(peer: &str, endpoint: &Endpoint) -> String {
    format!(
        "endpoints:\n- {}\ntrusted-ca-file: {peer}.ca.crt\ncert-file: {peer}.crt\nkey-file: {peer}.key\n\
         tls-server-name: {APISERVER_SERVICE}\n",
        endpoint.url()
    )
}

/// The Secret keys that belong to `peer`.
pub fn peer_keys(peer: &str) -> [String; 4] {
    [peer.to_string(), format!("{peer}.ca.crt"), format!("{peer}.crt"), format!("{peer}.key")]
}

fn peer_ids(secret: Option<&Secret>) -> BTreeMap<String, u32> {
    secret
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(PEER_IDS_ANNOTATION))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// The rules `connect` enforces between two clusters and the peers each already has. `a_peers`/`b_peers`: peer
/// name → ID already connected to A/B.
pub fn check_pair(
    a: &ClusterSettings,
    a_ctx: &str,
    b: &ClusterSettings,
    b_ctx: &str,
    a_peers: &BTreeMap<String, u32>,
    b_peers: &BTreeMap<String, u32>,
) -> Result<(), Error> {
    for (s, ctx) in [(a, a_ctx), (b, b_ctx)] {
        if s.name == "default" {
            return Err(Error::Refused(format!(
                "the cluster in {ctx} is named \"default\": a meshed cluster needs a unique name; re-run \
                 `causeway clustermesh enable` there with --cluster-name (after deleting ConfigMap causeway-config)"
            )));
        }
        if s.id == 0 {
            return Err(Error::Refused(format!(
                "the cluster {:?} in {ctx} has cluster ID 0, which is reserved: give it a unique ID in 1..={}",
                s.name, s.max_connected_clusters
            )));
        }
        s.validate().map_err(|e| Error::Refused(format!("the cluster in {ctx}: {e}")))?;
    }
    if a.name == b.name {
        return Err(Error::Refused(format!(
            "both clusters are named {:?} ({a_ctx} and {b_ctx}): cluster names must be unique in a mesh",
            a.name
        )));
    }
    if a.id == b.id {
        return Err(Error::Refused(format!(
            "duplicate cluster ID {}: {:?} ({a_ctx}) and {:?} ({b_ctx}) both use it; cluster IDs must be unique in a \
             mesh because they partition the identity space",
            a.id, a.name, b.name
        )));
    }
    if a.max_connected_clusters != b.max_connected_clusters {
        return Err(Error::Refused(format!(
            "max-connected-clusters differs: {} in {a_ctx}, {} in {b_ctx}; every cluster of a mesh must use the same",
            a.max_connected_clusters, b.max_connected_clusters
        )));
    }
    // A third cluster already connected to either side must not share the new peer's name or ID.
    for (peers, local, other, ctx) in [(a_peers, a, b, a_ctx), (b_peers, b, a, b_ctx)] {
        for (name, id) in peers {
            if name != &other.name && *id == other.id {
                return Err(Error::Refused(format!(
                    "duplicate cluster ID {}: {:?} is already connected to {:?} ({ctx}) with that ID, so {:?} cannot \
                     join with it",
                    id, name, local.name, other.name
                )));
            }
        }
    }
    Ok(())
}

/// What connect found and wrote, for the report.
#[derive(Debug, Clone)]
pub struct ConnectReport {
    pub lines: Vec<String>,
}

struct Side {
    cluster: Cluster,
    settings: ClusterSettings,
    remotes: Option<Secret>,
}

impl Side {
    async fn open(target: &KubeTarget, namespace: &str) -> Result<Self, Error> {
        let cluster = Cluster::open(target, namespace).await?;
        let settings = cluster.settings().await?;
        let remotes = cluster.get_secret(REMOTES_SECRET).await?;
        Ok(Side { cluster, settings, remotes })
    }

    async fn endpoint(&self) -> Result<Endpoint, Error> {
        let c = &self.cluster;
        let svc = c
            .services()
            .get_opt(APISERVER_SERVICE)
            .await
            .map_err(Error::kube(&c.target, format!("reading Service {APISERVER_SERVICE}")))?
            .ok_or_else(|| {
                Error::Refused(format!(
                    "{}: no Service {APISERVER_SERVICE} in namespace {}: install the Causeway chart (it creates the \
                     clustermesh-apiserver and its Service) before connecting",
                    c.target.label(),
                    c.namespace
                ))
            })?;
        let nodes = some_nodes(&c.client, 50).await;
        pick_endpoint(&svc, &nodes)
            .map_err(|e| Error::Refused(format!("{}: Service {APISERVER_SERVICE}: {e}", c.target.label())))
    }

    /// Whether this side's server certificate covers `host`.
    async fn server_cert_covers(&self, name: &str) -> Option<bool> {
        let s = self.cluster.get_secret(SERVER_SECRET).await.ok()??;
        let cert = secret_str(&s, causeway_pki::CERT_FILE)?;
        Some(super::sans(&cert).iter().any(|n| n == name))
    }
}

/// Writes `peer`'s entry into `local`'s remotes Secret.
async fn write_peer(
    local: &Side,
    peer: &ClusterSettings,
    endpoint: &Endpoint,
    peer_ca_pem: &str,
    cert: &causeway_pki::IssuedCert,
) -> Result<(), Error> {
    let mut secret = local.remotes.clone().unwrap_or_else(|| Secret {
        metadata: meta(REMOTES_SECRET, &local.cluster.namespace),
        type_: Some("Opaque".into()),
        ..Default::default()
    });
    let [cfg, ca, crt, key] = peer_keys(&peer.name);
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    data.insert(cfg, k8s_openapi::ByteString(peer_config(&peer.name, endpoint).into_bytes()));
    data.insert(ca, k8s_openapi::ByteString(peer_ca_pem.as_bytes().to_vec()));
    data.insert(crt, k8s_openapi::ByteString(cert.cert_pem.as_bytes().to_vec()));
    data.insert(key, k8s_openapi::ByteString(cert.key_pem.as_bytes().to_vec()));
    let mut ids = peer_ids(local.remotes.as_ref());
    ids.insert(peer.name.clone(), peer.id);
    let annotations = secret.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(PEER_IDS_ANNOTATION.into(), serde_json::to_string(&ids).unwrap_or_default());
    local.cluster.put_secret(secret, local.remotes.as_ref()).await?;
    local.cluster.set_peers(&ids.into_keys().collect::<Vec<_>>()).await
}

/// `clustermesh connect`: validates both sides, then writes each side's peer config for the other.
#[tracing::instrument(skip_all, fields(context = ?a.context, destination = ?b.context, namespace))]
pub async fn connect(a: &KubeTarget, b: &KubeTarget, namespace: &str) -> Result<ConnectReport, Error> {
    let sa = Side::open(a, namespace).await?;
    let sb = Side::open(b, namespace).await?;
    check_pair(
        &sa.settings,
        &a.label(),
        &sb.settings,
        &b.label(),
        &peer_ids(sa.remotes.as_ref()),
        &peer_ids(sb.remotes.as_ref()),
    )?;
    let (ca_a, ca_b) = (sa.cluster.ca().await?, sb.cluster.ca().await?);
    let (ep_a, ep_b) = (sa.endpoint().await?, sb.endpoint().await?);
    let mut lines = Vec::new();
    for (side, ep) in [(&sa, &ep_a), (&sb, &ep_b)] {
        lines.push(format!(
            "{} ({}, ID {}): clustermesh-apiserver at {} (via {})",
            side.settings.name,
            side.cluster.target.label(),
            side.settings.id,
            ep.url(),
            ep.via
        ));
        if ep.via == "ClusterIP" {
            lines.push(format!(
                "warning: {} is only reachable through its ClusterIP; its peer must be able to route to that \
                 service network (use a LoadBalancer or NodePort Service otherwise)",
                side.settings.name
            ));
        }
        // Peers verify by the name (tls-server-name in their config), whatever address they dial.
        if side.server_cert_covers(APISERVER_SERVICE).await == Some(false) {
            lines.push(format!(
                "warning: the server certificate of {} does not name {}: peers will fail TLS verification until you \
                 run `causeway clustermesh rotate-certs {}`",
                side.settings.name,
                APISERVER_SERVICE,
                side.cluster.target.context.as_ref().map(|c| format!("--context {c}")).unwrap_or_default()
            ));
        }
    }
    // A reads B's etcd as remote-A, so B's CA signs it; and the other way round.
    let cert_for_a = ca_b.issue_client(&users::remote(&sa.settings.name))?;
    let cert_for_b = ca_a.issue_client(&users::remote(&sb.settings.name))?;
    write_peer(&sa, &sb.settings, &ep_b, ca_b.cert_pem(), &cert_for_a).await?;
    write_peer(&sb, &sa.settings, &ep_a, ca_a.cert_pem(), &cert_for_b).await.map_err(|e| {
        // Half a connection: A reads B but B does not read A. Re-running connect completes it (and disconnect
        // undoes it), so say so rather than leave the operator guessing.
        Error::Refused(format!(
            "{e}\n{} was configured to read {:?}, but writing the other direction failed: re-run `causeway \
             clustermesh connect` to complete it, or `clustermesh disconnect` to undo it",
            sa.settings.name, sb.settings.name
        ))
    })?;
    for (local, peer) in [(&sa, &sb), (&sb, &sa)] {
        lines.push(format!(
            "wrote Secret {namespace}/{REMOTES_SECRET} in {}: peer {:?} (client certificate CN {})",
            local.cluster.target.label(),
            peer.settings.name,
            users::remote(&local.settings.name)
        ));
    }
    lines.push(
        "identity-sync picks the change up from its mounted Secret (kubelet refreshes it within about a \
                minute); follow with `causeway clustermesh status --wait`"
            .into(),
    );
    Ok(ConnectReport { lines })
}

/// `clustermesh disconnect`: removes each side's peer config for the other. Removing the file makes identity-sync
/// drop the connection and drain that peer's entries.
#[tracing::instrument(skip_all, fields(context = ?a.context, destination = ?b.context, namespace))]
pub async fn disconnect(a: &KubeTarget, b: &KubeTarget, namespace: &str) -> Result<ConnectReport, Error> {
    let sa = Side::open(a, namespace).await?;
    let sb = Side::open(b, namespace).await?;
    let mut lines = Vec::new();
    for (local, peer) in [(&sa, &sb), (&sb, &sa)] {
        let Some(existing) = &local.remotes else {
            lines.push(format!("{}: no {REMOTES_SECRET} Secret: not connected", local.cluster.target.label()));
            continue;
        };
        let mut secret = existing.clone();
        let mut removed = false;
        if let Some(data) = secret.data.as_mut() {
            for k in peer_keys(&peer.settings.name) {
                removed |= data.remove(&k).is_some();
            }
        }
        let mut ids = peer_ids(Some(existing));
        removed |= ids.remove(&peer.settings.name).is_some();
        if !removed {
            lines.push(format!(
                "{}: {:?} was not connected to {:?}",
                local.cluster.target.label(),
                peer.settings.name,
                local.settings.name
            ));
            continue;
        }
        secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(PEER_IDS_ANNOTATION.into(), serde_json::to_string(&ids).unwrap_or_default());
        // put_secret merges annotations with the old ones; the map above already holds the full new value.
        local.cluster.put_secret(secret, Some(existing)).await?;
        local.cluster.set_peers(&ids.into_keys().collect::<Vec<_>>()).await?;
        lines.push(format!(
            "removed peer {:?} from Secret {namespace}/{REMOTES_SECRET} in {}",
            peer.settings.name,
            local.cluster.target.label()
        ));
    }
    Ok(ConnectReport { lines })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn node(addrs: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addrs.iter().map(|(t, a)| json!({"type": t, "address": a})).collect();
        serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": {"addresses": addresses}}))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn endpoint_prefers_load_balancer_then_node_port_then_cluster_ip() {
        let lb = svc(json!({"spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.9",
            "ports": [{"name": "metrics", "port": 9962}, {"name": "etcd", "port": 2379, "nodePort": 32379}]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "east.lb.example"}]}}}));
        let nodes = [node(&[("InternalIP", "192.168.1.5")])];
        assert_eq!(pick_endpoint(&lb, &nodes).map(|e| e.url()), Ok("https://east.lb.example:2379".to_string()));
        let np = svc(json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.9",
            "ports": [{"port": 2379, "nodePort": 32379}]}}));
        assert_eq!(
            pick_endpoint(&np, &nodes).map(|e| (e.url(), e.via)),
            Ok(("https://192.168.1.5:32379".into(), "NodePort"))
        );
        let both = [node(&[("InternalIP", "192.168.1.5"), ("ExternalIP", "203.0.113.8")])];
        assert_eq!(pick_endpoint(&np, &both).map(|e| e.host), Ok("203.0.113.8".to_string()));
        assert_eq!(pick_endpoint(&np, &[]).map(|e| e.via), Ok("ClusterIP"));
        let v6 = svc(json!({"spec": {"clusterIP": "fd00::9", "ports": [{"port": 2379}]}}));
        assert_eq!(pick_endpoint(&v6, &[]).map(|e| e.url()), Ok("https://[fd00::9]:2379".to_string()));
        let none = svc(json!({"spec": {"clusterIP": "None", "ports": [{"port": 2379}]}}));
        assert!(pick_endpoint(&none, &[]).is_err());
        assert!(pick_endpoint(&svc(json!({"spec": {}})), &[]).is_err());
    }

    fn s(name: &str, id: u32) -> ClusterSettings {
        ClusterSettings { name: name.into(), id, max_connected_clusters: 255 }
    }

    #[test]
    fn pair_rules() {
        let none = BTreeMap::new();
        let check = |a, b, ap: &BTreeMap<String, u32>, bp: &BTreeMap<String, u32>| {
            check_pair(&a, "context \"a\"", &b, "context \"b\"", ap, bp)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(check(s("east", 1), s("west", 2), &none, &none), "");
        assert!(check(s("default", 1), s("west", 2), &none, &none).contains("named \"default\""));
        assert!(check(s("east", 1), s("west", 0), &none, &none).contains("cluster ID 0"));
        assert!(check(s("east", 3), s("west", 3), &none, &none).contains("duplicate cluster ID 3"));
        assert!(check(s("east", 1), s("east", 2), &none, &none).contains("both clusters are named"));
        let north = BTreeMap::from([("north".to_string(), 2)]);
        assert!(check(s("east", 1), s("west", 2), &north, &none).contains("\"north\" is already connected"));
        // Reconnecting the same peer is fine.
        let west = BTreeMap::from([("west".to_string(), 2)]);
        assert_eq!(check(s("east", 1), s("west", 2), &west, &none), "");
    }
}

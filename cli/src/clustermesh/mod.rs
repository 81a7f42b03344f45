//! `causeway clustermesh enable | rotate-certs | connect | disconnect | status`.
//!
//! What lives where, in the causeway namespace of each cluster:
//!
//! | object | keys | written by |
//! |---|---|---|
//! | ConfigMap `causeway-config` | `cluster-name`, `cluster-id`, `max-connected-clusters`; `peers` | `enable`; `connect`/`disconnect` |
//! | Secret `causeway-clustermesh-ca` | `ca.crt`, `ca.key` | `enable` (never rotated by the CLI) |
//! | Secret `clustermesh-apiserver-server-cert` | `ca.crt`, `tls.crt`, `tls.key` (etcd's server certificate) | `enable`, `rotate-certs` |
//! | Secret `clustermesh-apiserver-admin-cert` | same, CN `root` (the apiserver creates etcd users) | `enable`, `rotate-certs` |
//! | Secret `clustermesh-apiserver-external-workload-cert` | same, CN `externalworkload` | `enable`, `rotate-certs` |
//! | Secret `causeway-clustermesh-remotes` | per peer `<peer>`, `<peer>.ca.crt`, `<peer>.crt`, `<peer>.key` | `connect`, `disconnect` |
//!
//! The remotes Secret is mounted as identity-sync's `--remotes-dir`: each `<peer>` key becomes the peer config file
//! identity-sync parses (identity-sync/src/remotes/config.rs), naming the TLS files next to it by relative path.
//! The client certificate in it has CN `remote-<this cluster>` and is signed by the *peer's* CA, because it is the
//! peer's etcd that checks it.
//!
//! The rules (validation, what an idempotent run leaves alone, the peer config file) are plain functions here and
//! in [`connect`]; the kube reads and writes are thin.

pub mod connect;
pub mod status;

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_pki::{users, CertificateAuthority, ServerNames};
use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::{Error, KubeTarget};

/// Default namespace of Causeway's objects.
pub const DEFAULT_NAMESPACE: &str = "causeway";
/// ConfigMap holding the cluster's name and ID (the chart reads it for every component's flags).
pub const CONFIG_MAP: &str = "causeway-config";
pub const KEY_CLUSTER_NAME: &str = "cluster-name";
pub const KEY_CLUSTER_ID: &str = "cluster-id";
pub const KEY_MAX_CONNECTED_CLUSTERS: &str = "max-connected-clusters";
/// Comma-separated names of the connected peers (for the apiserver's `--peers`: it creates their etcd users).
pub const KEY_PEERS: &str = "peers";
/// The mesh CA of this cluster (signs its etcd's server certificate and every client allowed in).
pub const CA_SECRET: &str = "causeway-clustermesh-ca";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_SECRET: &str = "clustermesh-apiserver-server-cert";
pub const ADMIN_SECRET: &str = "clustermesh-apiserver-admin-cert";
pub const EXTERNAL_WORKLOAD_SECRET: &str = "clustermesh-apiserver-external-workload-cert";
/// The peer configs identity-sync reads (mounted as its `--remotes-dir`).
pub const REMOTES_SECRET: &str = "causeway-clustermesh-remotes";
/// The clustermesh-apiserver's Service (its etcd port is named `etcd`, else the first port is used).
pub const APISERVER_SERVICE: &str = "clustermesh-apiserver";
/// Label on every object the CLI writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "causeway-cli");

/// A cluster's identity in the mesh, as stored in the ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub name: String,
    pub id: u32,
    pub max_connected_clusters: u32,
}

impl ClusterSettings {
    /// Checks the rules every meshed cluster must follow, with messages that say how to fix them. Reuses the
    /// store's name and ID rules (the same ones clustermesh-apiserver applies to its flags).
    pub fn validate(&self) -> Result<(), Error> {
        let mode = MaxConnectedClusters::try_from(self.max_connected_clusters)
            .map_err(|e| Error::Refused(format!("max-connected-clusters: {e}")))?;
        if self.name == "default" {
            return Err(Error::Refused(
                "cluster name \"default\" is not allowed in a mesh: two clusters left at the default would collide; \
                 pass --cluster-name with a unique name"
                    .into(),
            ));
        }
        ClusterName::new_meshed(self.name.clone()).map_err(|e| Error::Refused(e.to_string()))?;
        if self.id == 0 {
            return Err(Error::Refused(format!(
                "cluster ID 0 is reserved (it means \"no cluster\"): pass --cluster-id with a unique ID in 1..={}",
                mode.get()
            )));
        }
        ClusterId::new(self.id, mode).map_err(|e| Error::Refused(e.to_string()))?;
        Ok(())
    }

    fn to_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (KEY_CLUSTER_NAME.to_string(), self.name.clone()),
            (KEY_CLUSTER_ID.to_string(), self.id.to_string()),
            (KEY_MAX_CONNECTED_CLUSTERS.to_string(), self.max_connected_clusters.to_string()),
        ])
    }

    /// Reads the settings from a ConfigMap's data; None when the name or ID is missing.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let (Some(name), Some(id)) = (data.get(KEY_CLUSTER_NAME), data.get(KEY_CLUSTER_ID)) else {
            return Ok(None);
        };
        let id = id.trim().parse().map_err(|_| format!("{KEY_CLUSTER_ID} {id:?} is not a number"))?;
        let max_connected_clusters = match data.get(KEY_MAX_CONNECTED_CLUSTERS) {
            None => 255,
            Some(m) => m.trim().parse().map_err(|_| format!("{KEY_MAX_CONNECTED_CLUSTERS} {m:?} is not a number"))?,
        };
        Ok(Some(ClusterSettings { name: name.trim().to_string(), id, max_connected_clusters }))
    }
}

pub(crate) fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())])),
        ..Default::default()
    }
}

/// The kube objects of one cluster's causeway namespace.
pub(crate) struct Cluster {
    pub target: KubeTarget,
    pub namespace: String,
    pub client: Client,
}

impl Cluster {
    pub async fn open(target: &KubeTarget, namespace: &str) -> Result<Self, Error> {
        Ok(Cluster { target: target.clone(), namespace: namespace.to_string(), client: target.client().await? })
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn get_secret(&self, name: &str) -> Result<Option<Secret>, Error> {
        self.secrets().get_opt(name).await.map_err(Error::kube(&self.target, format!("reading Secret {name}")))
    }

    /// Creates the Secret, or replaces the one read earlier (its resourceVersion guards against a concurrent
    /// writer: a conflict fails rather than overwriting someone else's change).
    pub async fn put_secret(&self, mut secret: Secret, existing: Option<&Secret>) -> Result<(), Error> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        tracing::debug!(secret = %name, namespace = %self.namespace, replace = existing.is_some(), "writing Secret");
        let pp = PostParams::default();
        match existing {
            None => self.secrets().create(&pp, &secret).await.map(drop),
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version.clone();
                secret.metadata.annotations = merge_maps(&old.metadata.annotations, &secret.metadata.annotations);
                secret.metadata.labels = merge_maps(&old.metadata.labels, &secret.metadata.labels);
                self.secrets().replace(&name, &pp, &secret).await.map(drop)
            }
        }
        .map_err(Error::kube(&self.target, format!("writing Secret {name} in namespace {}", self.namespace)))
    }

    /// The cluster's settings from its ConfigMap, or a message saying to run `enable`.
    pub async fn settings(&self) -> Result<ClusterSettings, Error> {
        let not_enabled = || {
            Error::Refused(format!(
                "{}: no cluster name/ID in ConfigMap {CONFIG_MAP} (namespace {}): run `causeway clustermesh enable \
                 --context ... --cluster-name NAME --cluster-id ID` there first",
                self.target.label(),
                self.namespace
            ))
        };
        let cm = self
            .config_maps()
            .get_opt(CONFIG_MAP)
            .await
            .map_err(Error::kube(&self.target, format!("reading ConfigMap {CONFIG_MAP}")))?
            .ok_or_else(not_enabled)?;
        let data = cm.data.unwrap_or_default();
        ClusterSettings::from_data(&data)
            .map_err(|e| Error::Refused(format!("{}: ConfigMap {CONFIG_MAP}: {e}", self.target.label())))?
            .ok_or_else(not_enabled)
    }

    /// Sets the `peers` key of the ConfigMap to `peers` (sorted, comma-separated), keeping its other keys.
    pub async fn set_peers(&self, peers: &[String]) -> Result<(), Error> {
        let what = format!("updating {KEY_PEERS} in ConfigMap {}/{CONFIG_MAP}", self.namespace);
        let Some(mut cm) = self.config_maps().get_opt(CONFIG_MAP).await.map_err(Error::kube(&self.target, &what))?
        else {
            return Ok(());
        };
        let mut sorted = peers.to_vec();
        sorted.sort();
        let value = sorted.join(",");
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        if data.get(KEY_PEERS) == Some(&value) {
            return Ok(());
        }
        data.insert(KEY_PEERS.to_string(), value);
        self.config_maps()
            .replace(CONFIG_MAP, &PostParams::default(), &cm)
            .await
            .map_err(Error::kube(&self.target, what))?;
        Ok(())
    }

    /// The cluster's CA, or a message saying to run `enable`.
    pub async fn ca(&self) -> Result<CertificateAuthority, Error> {
        let secret = self.get_secret(CA_SECRET).await?.ok_or_else(|| {
            Error::Refused(format!(
                "{}: no Secret {CA_SECRET} in namespace {}: run `causeway clustermesh enable` there first",
                self.target.label(),
                self.namespace
            ))
        })?;
        load_ca(&secret).map_err(|e| Error::Refused(format!("{}: Secret {CA_SECRET}: {e}", self.target.label())))
    }
}

fn merge_maps(
    old: &Option<BTreeMap<String, String>>,
    new: &Option<BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let mut out = old.clone().unwrap_or_default();
    out.extend(new.clone().unwrap_or_default());
    (!out.is_empty()).then_some(out)
}

pub(crate) fn secret_str(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn load_ca(secret: &Secret) -> Result<CertificateAuthority, String> {
    let (Some(cert), Some(key)) = (secret_str(secret, causeway_pki::CA_CERT_FILE), secret_str(secret, CA_KEY_FILE))
    else {
        return Err(format!("needs keys {} and {CA_KEY_FILE}", causeway_pki::CA_CERT_FILE));
    };
    CertificateAuthority::from_pem(&cert, &key).map_err(|e| e.to_string())
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn ca_secret(ca: &CertificateAuthority, namespace: &str) -> Secret {
    Secret {
        metadata: meta(CA_SECRET, namespace),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (causeway_pki::CA_CERT_FILE.to_string(), bytes(ca.cert_pem())),
            (CA_KEY_FILE.to_string(), bytes(&ca.key_pem())),
        ])),
        ..Default::default()
    }
}

pub(crate) fn tls_secret(name: &str, namespace: &str, cert: &causeway_pki::IssuedCert) -> Secret {
    Secret {
        metadata: meta(name, namespace),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (causeway_pki::CA_CERT_FILE.to_string(), bytes(&cert.ca_pem)),
            (causeway_pki::CERT_FILE.to_string(), bytes(&cert.cert_pem)),
            (causeway_pki::KEY_FILE.to_string(), bytes(&cert.key_pem)),
        ])),
        ..Default::default()
    }
}

/// Whether `cert_pem` was signed by the CA in `ca_pem` and is valid now.
pub fn verifies_against(cert_pem: &str, ca_pem: &str) -> bool {
    use x509_parser::pem::parse_x509_pem;
    let (Ok((_, cert)), Ok((_, ca))) = (parse_x509_pem(cert_pem.as_bytes()), parse_x509_pem(ca_pem.as_bytes())) else {
        return false;
    };
    let (Ok(cert), Ok(ca)) = (cert.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok() && cert.validity().is_valid()
}

/// The DNS names and IPs in a certificate's subject alternative names.
pub fn sans(cert_pem: &str) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;
    let Ok((_, pem)) = parse_x509_pem(cert_pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok(cert) = pem.parse_x509() else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The names etcd's server certificate is valid for: loopback (the sidecar), the Service's in-cluster names,
/// `<cluster>.mesh.causeway.io` (for peers that reach it through a host alias), the Service's current addresses,
/// and whatever the operator adds.
pub fn server_names(
    settings: &ClusterSettings,
    namespace: &str,
    svc: Option<&Service>,
    extra: &[String],
) -> ServerNames {
    let mut names = ServerNames::loopback();
    let base = APISERVER_SERVICE;
    for dns in [
        base.to_string(),
        format!("{base}.{namespace}"),
        format!("{base}.{namespace}.svc"),
        format!("{base}.{namespace}.svc.cluster.local"),
        format!("{}.mesh.causeway.io", settings.name),
    ] {
        names = names.with_dns(dns);
    }
    let mut add = |value: &str| match value.parse::<IpAddr>() {
        Ok(ip) if !names.ips.contains(&ip) => names.ips.push(ip),
        Ok(_) => {}
        Err(_) if !value.is_empty() && !names.dns.iter().any(|d| d == value) => names.dns.push(value.to_string()),
        Err(_) => {}
    };
    if let Some(svc) = svc {
        for a in connect::service_addresses(svc) {
            add(&a);
        }
    }
    for e in extra {
        add(e);
    }
    names
}

/// What a run of `enable` or `rotate-certs` did, object by object.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub notes: Vec<String>,
}

impl Changes {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (verb, list) in [("created", &self.created), ("updated", &self.updated), ("unchanged", &self.unchanged)] {
            for o in list {
                out.push_str(&format!("{verb:<10} {o}\n"));
            }
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// The leaf certificates `enable` creates and `rotate-certs` renews: Secret name, CN, server or client.
fn leaves() -> [(&'static str, String, bool); 3] {
    [
        (SERVER_SECRET, "clustermesh-apiserver".to_string(), true),
        // The local apiserver's etcd client certificate. CN `root`, not `admin-<cluster>`: the apiserver creates
        // the `remote-<peer>` users and enables etcd auth, which only the root user may do.
        (ADMIN_SECRET, users::ROOT.to_string(), false),
        (EXTERNAL_WORKLOAD_SECRET, users::EXTERNAL_WORKLOAD.to_string(), false),
    ]
}

/// `clustermesh enable`: stores the cluster's name and ID, creates the CA and the leaf certificates. Idempotent:
/// objects that exist and are valid are left alone, so a second run changes nothing.
///
/// `requested`: the name and ID to store. None: use the ones already in the ConfigMap (written by the chart from
/// its values), which must then exist and be valid.
#[tracing::instrument(skip_all, fields(context = ?target.context, namespace))]
pub async fn enable(
    target: &KubeTarget,
    namespace: &str,
    requested: Option<&ClusterSettings>,
    extra_sans: &[String],
) -> Result<Changes, Error> {
    if let Some(s) = requested {
        s.validate()?;
    }
    let c = Cluster::open(target, namespace).await?;
    let mut changes = Changes::default();

    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    let ns_exists =
        namespaces.get_opt(namespace).await.map_err(Error::kube(target, format!("reading Namespace {namespace}")))?;
    if ns_exists.is_none() {
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(namespace.to_string()), ..Default::default() },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .map_err(Error::kube(target, format!("creating Namespace {namespace}")))?;
        changes.created.push(format!("Namespace {namespace}"));
    }

    // The name and ID first: certificates name the cluster (admin-<cluster>), and a cluster that is already
    // meshed must not be renamed behind its peers' backs.
    let cm_label = format!("ConfigMap {namespace}/{CONFIG_MAP}");
    let existing =
        c.config_maps().get_opt(CONFIG_MAP).await.map_err(Error::kube(target, format!("reading {cm_label}")))?;
    let settings = match (requested, &existing) {
        (Some(s), _) => s.clone(),
        (None, Some(cm)) => match ClusterSettings::from_data(&cm.data.clone().unwrap_or_default()) {
            Ok(Some(s)) => {
                s.validate().map_err(|e| Error::Refused(format!("{}: {cm_label}: {e}", target.label())))?;
                s
            }
            Ok(None) | Err(_) => {
                return Err(Error::Refused(format!(
                    "{}: {cm_label} has no valid cluster name and ID: pass --cluster-name and --cluster-id",
                    target.label()
                )))
            }
        },
        (None, None) => {
            return Err(Error::Refused(format!(
                "{}: no {cm_label} yet: pass --cluster-name and --cluster-id (or set cluster.name and cluster.id in                  the chart's values)",
                target.label()
            )))
        }
    };
    let settings = &settings;
    match existing {
        None => {
            let cm = ConfigMap {
                metadata: meta(CONFIG_MAP, namespace),
                data: Some(settings.to_data()),
                ..Default::default()
            };
            c.config_maps()
                .create(&PostParams::default(), &cm)
                .await
                .map_err(Error::kube(target, format!("creating {cm_label}")))?;
            changes.created.push(cm_label);
        }
        Some(mut cm) => {
            let data = cm.data.clone().unwrap_or_default();
            match ClusterSettings::from_data(&data) {
                Ok(Some(current)) if current == *settings => changes.unchanged.push(cm_label),
                Ok(Some(current)) => {
                    return Err(Error::Refused(format!(
                        "{}: this cluster is already enabled as {:?} with ID {} (max-connected-clusters {}); \
                         renaming or renumbering a cluster changes its identities and breaks its peers: disconnect \
                         it from every peer and edit {cm_label} by hand if you really mean to",
                        target.label(),
                        current.name,
                        current.id,
                        current.max_connected_clusters
                    )))
                }
                Ok(None) | Err(_) => {
                    // The ConfigMap exists (e.g. created by the chart) without valid settings: fill them in and keep
                    // its other keys.
                    let mut data = data;
                    data.extend(settings.to_data());
                    cm.data = Some(data);
                    c.config_maps()
                        .replace(CONFIG_MAP, &PostParams::default(), &cm)
                        .await
                        .map_err(Error::kube(target, format!("updating {cm_label}")))?;
                    changes.updated.push(cm_label);
                }
            }
        }
    }

    let ca_label = format!("Secret {namespace}/{CA_SECRET}");
    let ca = match c.get_secret(CA_SECRET).await? {
        Some(secret) => {
            let ca = load_ca(&secret).map_err(|e| {
                Error::Refused(format!(
                    "{ca_label} exists but is not a usable CA ({e}); it is never overwritten, because every peer \
                     trusts it: fix or delete it by hand"
                ))
            })?;
            changes.unchanged.push(ca_label);
            ca
        }
        None => {
            let ca = CertificateAuthority::generate(&format!("causeway-{}-ca", settings.name))?;
            c.put_secret(ca_secret(&ca, namespace), None).await?;
            changes.created.push(ca_label);
            ca
        }
    };

    let svc = c
        .services()
        .get_opt(APISERVER_SERVICE)
        .await
        .map_err(Error::kube(target, format!("reading Service {APISERVER_SERVICE}")))?;
    let mut sans_wanted = extra_sans.to_vec();
    if let Some(svc) = &svc {
        sans_wanted.extend(connect::node_port_addresses(svc, &connect::some_nodes(&c.client, 50).await));
    }
    for (secret_name, cn, server) in leaves() {
        let label = format!("Secret {namespace}/{secret_name}");
        let existing = c.get_secret(secret_name).await?;
        let valid = existing.as_ref().and_then(|s| secret_str(s, causeway_pki::CERT_FILE)).is_some_and(|cert| {
            verifies_against(&cert, ca.cert_pem())
                && existing.as_ref().and_then(|s| secret_str(s, causeway_pki::KEY_FILE)).is_some()
        });
        if valid {
            changes.unchanged.push(label);
            continue;
        }
        let cert = if server {
            ca.issue_server(&cn, &server_names(settings, namespace, svc.as_ref(), &sans_wanted))?
        } else {
            ca.issue_client(&cn)?
        };
        c.put_secret(tls_secret(secret_name, namespace, &cert), existing.as_ref()).await?;
        if existing.is_some() {
            changes.updated.push(format!("{label} (was not signed by the CA or had expired)"));
        } else {
            changes.created.push(label);
        }
    }
    if svc.is_none() {
        changes.notes.push(format!(
            "no Service {APISERVER_SERVICE} in namespace {namespace} yet: the server certificate covers its in-cluster \
             names; once the Service has its external address run `causeway clustermesh rotate-certs` to add it"
        ));
    }
    Ok(changes)
}

/// `clustermesh rotate-certs`: issues new leaf certificates from the existing CA and replaces them in their
/// Secrets. The CA is kept, so peers (which trust the CA, not the leaf) keep trusting the new certificates, and
/// the old ones stay valid until they expire, so nothing breaks while Secret volumes catch up.
#[tracing::instrument(skip_all, fields(context = ?target.context, namespace))]
pub async fn rotate_certs(target: &KubeTarget, namespace: &str, extra_sans: &[String]) -> Result<Changes, Error> {
    let c = Cluster::open(target, namespace).await?;
    let settings = c.settings().await?;
    let ca = c.ca().await?;
    let svc = c
        .services()
        .get_opt(APISERVER_SERVICE)
        .await
        .map_err(Error::kube(target, format!("reading Service {APISERVER_SERVICE}")))?;
    let mut changes = Changes::default();
    let mut sans_wanted = extra_sans.to_vec();
    if let Some(svc) = &svc {
        sans_wanted.extend(connect::node_port_addresses(svc, &connect::some_nodes(&c.client, 50).await));
    }
    for (secret_name, cn, server) in leaves() {
        let existing = c.get_secret(secret_name).await?;
        let mut extra = sans_wanted.clone();
        if server {
            // Keep every name the old server certificate had, so a rotation never drops an address peers use.
            if let Some(old) = existing.as_ref().and_then(|s| secret_str(s, causeway_pki::CERT_FILE)) {
                extra.extend(sans(&old));
            }
        }
        let cert = if server {
            ca.issue_server(&cn, &server_names(&settings, namespace, svc.as_ref(), &extra))?
        } else {
            ca.issue_client(&cn)?
        };
        c.put_secret(tls_secret(secret_name, namespace, &cert), existing.as_ref()).await?;
        let label = format!("Secret {namespace}/{secret_name}");
        if existing.is_some() {
            changes.updated.push(label);
        } else {
            changes.created.push(label);
        }
    }
    changes.unchanged.push(format!("Secret {namespace}/{CA_SECRET} (the CA is kept: peers keep trusting)"));
    changes.notes.push(
        "the remote-<peer> client certificates this CA signed live in the peers' remotes Secrets: renew them with \
         `causeway clustermesh connect` (re-running it re-issues them)"
            .into(),
    );
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn s(name: &str, id: u32) -> ClusterSettings {
        ClusterSettings { name: name.into(), id, max_connected_clusters: 255 }
    }

    #[test]
    fn validation_messages() {
        assert!(s("east", 1).validate().is_ok());
        let msg = |c: ClusterSettings| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(s("default", 1)).contains("\"default\" is not allowed"));
        assert!(msg(s("east", 0)).contains("cluster ID 0 is reserved"));
        assert!(msg(s("east", 256)).contains("out of range"));
        assert!(msg(s("East", 1)).contains("invalid"));
        assert!(msg(ClusterSettings { max_connected_clusters: 100, ..s("east", 1) }).contains("255 or 511"));
    }

    #[test]
    fn settings_round_trip_through_configmap_data() {
        let c = s("west", 7);
        assert_eq!(ClusterSettings::from_data(&c.to_data()), Ok(Some(c)));
        assert_eq!(ClusterSettings::from_data(&BTreeMap::new()), Ok(None));
        let bad = BTreeMap::from([(KEY_CLUSTER_NAME.into(), "x".into()), (KEY_CLUSTER_ID.into(), "seven".into())]);
        assert!(ClusterSettings::from_data(&bad).is_err());
    }

    #[test]
    fn server_names_cover_service_and_extras() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": APISERVER_SERVICE},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "ports": [{"name": "etcd", "port": 2379}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "mesh.example.com"}]}}
        }))
        .unwrap_or_default();
        let n = server_names(&s("east", 1), "causeway", Some(&svc), &["192.0.2.3".into(), "extra.example".into()]);
        for ip in ["10.96.0.20", "198.51.100.7", "192.0.2.3", "127.0.0.1"] {
            assert!(n.ips.contains(&ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))), "{ip}: {n:?}");
        }
        for dns in ["mesh.example.com", "extra.example", "clustermesh-apiserver.causeway.svc", "east.mesh.causeway.io"]
        {
            assert!(n.dns.iter().any(|d| d == dns), "{dns}: {n:?}");
        }
    }
}

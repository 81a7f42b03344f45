//! The sans-IO registration logic: who may register, what a request must look like, and what registering a host
//! changes (identity labels, ipcache entries to write and withdraw, identity to release). No kube, etcd or gRPC
//! types here; the adapter in `server.rs` gathers the inputs and carries out the [`Plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use causeway_store::labels::{CLUSTER_LABEL, NAMESPACE_LABEL, SOURCE_K8S};
use causeway_store::{IpCacheEntry, LabelSet};

/// The CN a client certificate must carry to register (the `externalworkload` user `causeway clustermesh enable`
/// issues a certificate for).
pub const EXTERNAL_WORKLOAD_CN: &str = "externalworkload";

/// The namespace label an external workload gets when its object does not set one (as Cilium did).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a registration is refused. Each maps to one gRPC status code in the adapter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "client certificate CN is {0:?}, not \"externalworkload\": only the external-workload certificate may register"
    )]
    NotExternalWorkload(String),
    #[error("no client certificate: registration needs the external-workload certificate (mTLS)")]
    NoClientCertificate,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(
        "no ExternalWorkload named {0:?} in this cluster: create it first (its name must be the host's name, its \
         labels become the host's identity)"
    )]
    UnknownWorkload(String),
    #[error("ExternalWorkload {0:?} is being deleted")]
    Deleting(String),
    #[error("address {ip} is already registered by external workload {owner:?}")]
    AddressInUse { ip: IpAddr, owner: String },
}

/// Checks the peer's certificate CN (None: no certificate, or no CN in it).
pub fn authorize(cn: Option<&str>, had_certificate: bool) -> Result<(), Refusal> {
    match cn {
        Some(EXTERNAL_WORKLOAD_CN) => Ok(()),
        Some(other) => Err(Refusal::NotExternalWorkload(other.chars().take(64).collect())),
        None if had_certificate => Err(Refusal::NotExternalWorkload(String::new())),
        None => Err(Refusal::NoClientCertificate),
    }
}

/// A validated registration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

impl Request {
    /// The host's addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(self.ipv4)];
        ips.extend(self.ipv6.map(IpAddr::V6));
        ips
    }
}

/// Validates the raw request fields: `name` a DNS subdomain (an object name), `ipv4` a usable unicast IPv4
/// address, `ipv6` empty or a usable unicast IPv6 address.
pub fn parse_request(name: &str, ipv4: &str, ipv6: &str) -> Result<Request, Refusal> {
    let short: String = name.chars().take(64).collect();
    if name.is_empty() || name.len() > 253 {
        return Err(Refusal::Invalid(format!("name {short:?} must be 1 to 253 characters")));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Err(Refusal::Invalid(format!(
            "name {short:?} is not a valid object name (lowercase letters, digits, '-' and '.')"
        )));
    }
    let v4: Ipv4Addr = ipv4.trim().parse().map_err(|_| {
        Refusal::Invalid(format!("ipv4 {:?} is not an IPv4 address", ipv4.chars().take(64).collect::<String>()))
    })?;
    if v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() {
        return Err(Refusal::Invalid(format!("ipv4 {v4} is not a unicast address another host can reach")));
    }
    let v6 = match ipv6.trim() {
        "" => None,
        s => {
            let v6: Ipv6Addr = s.parse().map_err(|_| {
                Refusal::Invalid(format!("ipv6 {:?} is not an IPv6 address", s.chars().take(64).collect::<String>()))
            })?;
            if v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || v6.to_ipv4_mapped().is_some() {
                return Err(Refusal::Invalid(format!("ipv6 {v6} is not a unicast address another host can reach")));
            }
            Some(v6)
        }
    };
    Ok(Request { name: name.to_string(), ipv4: v4, ipv6: v6 })
}

/// The registration an earlier process carried out, rebuilt from the object's status (its `ip` and `ipv6`), so
/// that a restarted apiserver exports registered hosts again without waiting for them to re-register. None when
/// the status holds no usable IPv4 address (never registered, or mangled).
pub fn request_from_status(name: &str, ip: Option<&str>, ipv6: Option<&str>) -> Option<Request> {
    parse_request(name, ip?, ipv6.unwrap_or("")).ok()
}

/// What the adapter read from the ExternalWorkload object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadObject {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Addresses in the object's status (what the last registration wrote, possibly by an earlier process).
    pub status_ips: Vec<IpAddr>,
}

/// The identity labels of an external workload: its object's labels as `k8s:` labels, the namespace label (the
/// object's own `io.kubernetes.pod.namespace` label, or `default`), and this cluster's name as the cluster label
/// (an object's own cluster label is ignored: a host cannot claim another cluster's identity).
pub fn identity_labels(cluster: &str, labels: &BTreeMap<String, String>) -> (LabelSet, String) {
    let namespace = labels.get(NAMESPACE_LABEL).cloned().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let mut set = LabelSet::new();
    for (k, v) in labels {
        if k != NAMESPACE_LABEL && k != CLUSTER_LABEL {
            set.insert(SOURCE_K8S, k, v);
        }
    }
    set.insert(SOURCE_K8S, NAMESPACE_LABEL, &namespace);
    set.insert(SOURCE_K8S, CLUSTER_LABEL, cluster);
    (set, namespace)
}

/// The ipcache entry of one of the host's addresses: the host is its own host IP, and it is named by its
/// namespace label and object name as a pod would be.
pub fn ipcache_entry(ip: IpAddr, id: u32, namespace: &str, name: &str) -> IpCacheEntry {
    IpCacheEntry {
        ip,
        host_ip: Some(ip),
        id,
        key: 0,
        metadata: String::new(),
        k8s_namespace: namespace.to_string(),
        k8s_pod_name: name.to_string(),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: Vec::new(),
    }
}

/// One registered host, as this process exported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub labels: LabelSet,
    pub id: u32,
    pub ips: Vec<IpAddr>,
}

impl Registered {
    /// The registration again (same addresses), e.g. to re-plan it after the object's labels changed.
    pub fn request(&self, name: &str) -> Option<Request> {
        let ipv4 = self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })?;
        let ipv6 = self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        Some(Request { name: name.to_string(), ipv4, ipv6 })
    }
}

/// What registering a host changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub labels: LabelSet,
    pub namespace: String,
    /// The identity this process already holds for `labels` (same labels as last time): no new acquisition.
    pub reuse_id: Option<u32>,
    /// Addresses to export (IPv4 first).
    pub ips: Vec<IpAddr>,
    /// Addresses exported for this host before that it no longer has: their ipcache entries are withdrawn.
    pub withdraw: Vec<IpAddr>,
    /// The label set this process held for the host before, when its labels changed: released after the new one
    /// is acquired.
    pub release: Option<LabelSet>,
}

/// Every host registered with this process, and which host owns which address.
#[derive(Debug, Default)]
pub struct Registry {
    hosts: BTreeMap<String, Registered>,
    owners: BTreeMap<IpAddr, String>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.hosts.get(name)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Decides a registration: refuses unknown or deleting objects and addresses another host holds; otherwise
    /// says what to export and what to withdraw.
    pub fn plan(&self, cluster: &str, req: &Request, object: Option<&WorkloadObject>) -> Result<Plan, Refusal> {
        let object = object.ok_or_else(|| Refusal::UnknownWorkload(req.name.clone()))?;
        if object.deleting {
            return Err(Refusal::Deleting(req.name.clone()));
        }
        let ips = req.ips();
        for ip in &ips {
            if let Some(owner) = self.owners.get(ip).filter(|o| **o != req.name) {
                return Err(Refusal::AddressInUse { ip: *ip, owner: owner.clone() });
            }
        }
        let (labels, namespace) = identity_labels(cluster, &object.labels);
        let previous = self.hosts.get(&req.name);
        let before: BTreeSet<IpAddr> =
            previous.iter().flat_map(|p| p.ips.iter().copied()).chain(object.status_ips.iter().copied()).collect();
        let withdraw = before
            .into_iter()
            .filter(|ip| !ips.contains(ip))
            // An address another host registered since is that host's entry now.
            .filter(|ip| self.owners.get(ip).is_none_or(|o| *o == req.name))
            .collect();
        let (reuse_id, release) = match previous {
            Some(p) if p.labels == labels => (Some(p.id), None),
            Some(p) => (None, Some(p.labels.clone())),
            None => (None, None),
        };
        Ok(Plan { labels, namespace, reuse_id, ips, withdraw, release })
    }

    /// The object of a registered host was deleted: forgets the host and returns what it held (addresses to
    /// withdraw, label set to release). None when this process never registered it.
    pub fn forget(&mut self, name: &str) -> Option<Registered> {
        let gone = self.hosts.remove(name)?;
        for ip in &gone.ips {
            if self.owners.get(ip).is_some_and(|o| o == name) {
                self.owners.remove(ip);
            }
        }
        Some(gone)
    }

    /// Records a carried-out plan.
    pub fn commit(&mut self, name: &str, plan: &Plan, id: u32) {
        if let Some(old) = self.hosts.get(name) {
            for ip in &old.ips {
                if self.owners.get(ip).is_some_and(|o| o == name) {
                    self.owners.remove(ip);
                }
            }
        }
        for ip in &plan.ips {
            self.owners.insert(*ip, name.to_string());
        }
        self.hosts.insert(name.to_string(), Registered { labels: plan.labels.clone(), id, ips: plan.ips.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn object(name: &str, pairs: &[(&str, &str)]) -> WorkloadObject {
        WorkloadObject { name: name.into(), labels: labels(pairs), ..Default::default() }
    }

    fn req(name: &str, v4: &str, v6: &str) -> Request {
        parse_request(name, v4, v6).expect("valid request")
    }

    #[test]
    fn only_the_external_workload_certificate_is_authorized() {
        assert_eq!(authorize(Some("externalworkload"), true), Ok(()));
        assert_eq!(authorize(Some("remote-west"), true), Err(Refusal::NotExternalWorkload("remote-west".into())));
        assert_eq!(authorize(Some("root"), true), Err(Refusal::NotExternalWorkload("root".into())));
        assert_eq!(authorize(None, true), Err(Refusal::NotExternalWorkload(String::new())));
        assert_eq!(authorize(None, false), Err(Refusal::NoClientCertificate));
    }

    #[test]
    fn requests_are_validated() {
        let ok = req("db-vm-1.example", "192.0.2.7", " 2001:db8::7 ");
        assert_eq!(ok.ips(), vec!["192.0.2.7".parse::<IpAddr>().unwrap(), "2001:db8::7".parse().unwrap()]);
        assert_eq!(req("vm", "10.0.0.1", "").ipv6, None);
        for (name, v4, v6, expect) in [
            ("", "10.0.0.1", "", "1 to 253"),
            ("VM", "10.0.0.1", "", "not a valid object name"),
            ("vm_1", "10.0.0.1", "", "not a valid object name"),
            ("-vm", "10.0.0.1", "", "not a valid object name"),
            ("vm..x", "10.0.0.1", "", "not a valid object name"),
            ("vm", "", "", "not an IPv4 address"),
            ("vm", "2001:db8::1", "", "not an IPv4 address"),
            ("vm", "10.0.0.256", "", "not an IPv4 address"),
            ("vm", "0.0.0.0", "", "not a unicast"),
            ("vm", "127.0.0.1", "", "not a unicast"),
            ("vm", "224.0.0.1", "", "not a unicast"),
            ("vm", "10.0.0.1", "10.0.0.2", "not an IPv6 address"),
            ("vm", "10.0.0.1", "::1", "not a unicast"),
            ("vm", "10.0.0.1", "::ffff:10.0.0.1", "not a unicast"),
        ] {
            match parse_request(name, v4, v6) {
                Err(Refusal::Invalid(why)) => assert!(why.contains(expect), "{name}/{v4}/{v6}: {why}"),
                other => panic!("{name}/{v4}/{v6}: expected Invalid({expect}), got {other:?}"),
            }
        }
        assert!(parse_request(&"a".repeat(254), "10.0.0.1", "").is_err());
    }

    #[test]
    fn identity_labels_are_the_object_labels_in_a_namespace_and_this_cluster() {
        let (set, ns) = identity_labels("east", &labels(&[("app", "postgres"), (CLUSTER_LABEL, "west")]));
        assert_eq!(ns, "default");
        assert_eq!(
            set.to_string(),
            "k8s:app=postgres;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=default;"
        );
        let (set, ns) = identity_labels("east", &labels(&[("app", "postgres"), (NAMESPACE_LABEL, "legacy")]));
        assert_eq!(ns, "legacy");
        assert_eq!(set.get(NAMESPACE_LABEL).map(|l| l.value.as_str()), Some("legacy"));
        assert_eq!(set.cluster(), Some("east"));
    }

    #[test]
    fn unknown_and_deleting_objects_are_refused() {
        let reg = Registry::default();
        let r = req("vm", "10.0.0.1", "");
        assert_eq!(reg.plan("east", &r, None), Err(Refusal::UnknownWorkload("vm".into())));
        let mut o = object("vm", &[("app", "x")]);
        o.deleting = true;
        assert_eq!(reg.plan("east", &r, Some(&o)), Err(Refusal::Deleting("vm".into())));
    }

    #[test]
    fn first_registration_exports_every_address_and_acquires() {
        let reg = Registry::default();
        let p = reg.plan("east", &req("vm", "10.0.0.1", "fd00::1"), Some(&object("vm", &[("app", "x")]))).unwrap();
        assert_eq!(p.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap(), "fd00::1".parse().unwrap()]);
        assert_eq!((p.reuse_id, p.release.clone(), p.withdraw.clone()), (None, None, vec![]));
        assert_eq!(p.namespace, "default");
    }

    #[test]
    fn reregistration_with_a_new_address_withdraws_the_old_one_and_keeps_the_identity() {
        let mut reg = Registry::default();
        let o = object("vm", &[("app", "x")]);
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&o)).unwrap();
        reg.commit("vm", &p, 65540);
        let p2 = reg.plan("east", &req("vm", "10.0.0.2", ""), Some(&o)).unwrap();
        assert_eq!(p2.withdraw, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p2.reuse_id, Some(65540));
        assert_eq!(p2.release, None);
        reg.commit("vm", &p2, 65540);
        // The old address is free for another host now.
        let other = object("vm2", &[("app", "y")]);
        assert!(reg.plan("east", &req("vm2", "10.0.0.1", ""), Some(&other)).is_ok());
        // Same request again: nothing to withdraw.
        assert_eq!(reg.plan("east", &req("vm", "10.0.0.2", ""), Some(&o)).unwrap().withdraw, Vec::<IpAddr>::new());
    }

    #[test]
    fn addresses_in_the_status_from_an_earlier_process_are_withdrawn() {
        let reg = Registry::default();
        let mut o = object("vm", &[("app", "x")]);
        o.status_ips = vec!["10.0.0.9".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&o)).unwrap();
        assert_eq!(p.withdraw, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn an_address_held_by_another_host_is_refused_and_never_withdrawn() {
        let mut reg = Registry::default();
        let a = object("a", &[("app", "x")]);
        let p = reg.plan("east", &req("a", "10.0.0.1", ""), Some(&a)).unwrap();
        reg.commit("a", &p, 65540);
        let b = object("b", &[("app", "y")]);
        assert_eq!(
            reg.plan("east", &req("b", "10.0.0.1", ""), Some(&b)),
            Err(Refusal::AddressInUse { ip: "10.0.0.1".parse().unwrap(), owner: "a".into() })
        );
        // b's stale status names a's address: it is not b's to withdraw.
        let mut b_stale = b.clone();
        b_stale.status_ips = vec!["10.0.0.1".parse().unwrap()];
        assert_eq!(reg.plan("east", &req("b", "10.0.0.2", ""), Some(&b_stale)).unwrap().withdraw, Vec::<IpAddr>::new());
    }

    #[test]
    fn changed_labels_acquire_a_new_identity_and_release_the_old() {
        let mut reg = Registry::default();
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&object("vm", &[("app", "x")]))).unwrap();
        reg.commit("vm", &p, 65540);
        let p2 = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&object("vm", &[("app", "z")]))).unwrap();
        assert_eq!(p2.reuse_id, None);
        assert_eq!(p2.release, Some(p.labels.clone()));
        assert_ne!(p2.labels, p.labels);
    }

    #[test]
    fn a_registered_host_replans_with_its_addresses() {
        let mut reg = Registry::default();
        let r = req("vm", "10.0.0.1", "fd00::1");
        let p = reg.plan("east", &r, Some(&object("vm", &[("app", "x")]))).unwrap();
        reg.commit("vm", &p, 65540);
        assert_eq!(reg.get("vm").and_then(|h| h.request("vm")), Some(r));
    }

    #[test]
    fn forgetting_a_host_frees_its_addresses() {
        let mut reg = Registry::default();
        let o = object("vm", &[("app", "x")]);
        let p = reg.plan("east", &req("vm", "10.0.0.1", "fd00::1"), Some(&o)).unwrap();
        reg.commit("vm", &p, 65540);
        let gone = reg.forget("vm").expect("registered");
        assert_eq!((gone.id, gone.ips.len(), gone.labels.clone()), (65540, 2, p.labels.clone()));
        assert!(reg.is_empty());
        assert_eq!(reg.forget("vm"), None);
        assert!(reg.plan("east", &req("other", "10.0.0.1", ""), Some(&object("other", &[]))).is_ok());
    }

    #[test]
    fn a_registration_is_rebuilt_from_a_status() {
        assert_eq!(request_from_status("vm", Some("10.0.0.1"), None), Some(req("vm", "10.0.0.1", "")));
        assert_eq!(
            request_from_status("vm", Some("10.0.0.1"), Some("fd00::1")),
            Some(req("vm", "10.0.0.1", "fd00::1"))
        );
        assert_eq!(request_from_status("vm", None, Some("fd00::1")), None);
        assert_eq!(request_from_status("vm", Some("garbage"), None), None);
    }

    #[test]
    fn ipcache_entry_names_the_host() {
        let e = ipcache_entry("10.0.0.1".parse().unwrap(), 65540, "legacy", "vm");
        assert_eq!(
            (e.id, e.host_ip, e.k8s_namespace.as_str(), e.k8s_pod_name.as_str()),
            (65540, Some(e.ip), "legacy", "vm")
        );
    }
}

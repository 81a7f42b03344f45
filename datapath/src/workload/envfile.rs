//! What `register` writes for the rest of the join: the clustermesh-apiserver's answer, validated, as a systemd
//! EnvironmentFile that bash can `source` too (`KEY=value` lines, values restricted to characters that need no
//! quoting in either). The agent's run flags read the same names (`--mesh-ipv4` ← `CAUSEWAY_MESH_IPV4`, …), and
//! identity-sync's `--cluster-name`/`--cluster-id` read `CAUSEWAY_CLUSTER_NAME`/`CAUSEWAY_CLUSTER_ID`.
//!
//! The response comes from the network: every field is parsed into its type first, so a value that is not an
//! address, CIDR or DNS name is refused instead of being written into a file a shell reads.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use causeway_api::v1::RegisterResponse;
use ipnet::IpNet;

/// The host's security identity.
pub const IDENTITY: &str = "CAUSEWAY_WORKLOAD_IDENTITY";
/// The host's address inside the mesh (on its WireGuard interface).
pub const MESH_IPV4: &str = "CAUSEWAY_MESH_IPV4";
/// The home cluster's Service CIDRs, comma separated.
pub const SERVICE_CIDRS: &str = "CAUSEWAY_SERVICE_CIDRS";
/// The cluster DNS server (ClusterIP of kube-dns); empty when the apiserver did not find it.
pub const CLUSTER_DNS: &str = "CAUSEWAY_CLUSTER_DNS";
/// The cluster domain (`cluster.local`).
pub const CLUSTER_DOMAIN: &str = "CAUSEWAY_CLUSTER_DOMAIN";
/// The cluster the host joined (the agent's `--home-cluster`).
pub const HOME_CLUSTER: &str = "CAUSEWAY_HOME_CLUSTER";
/// The same name under identity-sync's `--cluster-name` variable (its `--external-workload` mode takes the home
/// cluster's name and ID).
pub const CLUSTER_NAME: &str = "CAUSEWAY_CLUSTER_NAME";
/// The home cluster's ID (identity-sync's `--cluster-id`).
pub const CLUSTER_ID: &str = "CAUSEWAY_CLUSTER_ID";
/// The host's alloc CIDR (spec.ipv4AllocCIDR of its ExternalWorkload).
pub const IPV4_ALLOC_CIDR: &str = "CAUSEWAY_IPV4_ALLOC_CIDR";

/// A response field the host cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the apiserver's answer has an unusable {field}: {value:?} ({reason})")]
pub struct InvalidResponse {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> InvalidResponse {
    // Bounded: the value is shown in an error message, whatever its size.
    InvalidResponse { field, value: value.chars().take(80).collect(), reason }
}

/// A successful registration, in domain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub cluster_name: String,
    pub cluster_id: u32,
    pub identity: u32,
    pub mesh_ipv4: Ipv4Addr,
    pub ipv4_alloc_cidr: IpNet,
    pub service_cidrs: Vec<IpNet>,
    pub cluster_dns: Option<IpAddr>,
    pub cluster_domain: String,
}

/// Lower-case DNS labels of `a-z0-9-` joined by dots (a cluster domain, a cluster name).
fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

impl Registration {
    /// Validates the answer of a registration that sent a WireGuard key (so a mesh address is expected).
    pub fn from_response(r: &RegisterResponse) -> Result<Registration, InvalidResponse> {
        if !dns_name(&r.cluster_name) || r.cluster_name.contains('.') {
            return Err(invalid("cluster_name", &r.cluster_name, "not a cluster name"));
        }
        if r.cluster_id == 0 {
            return Err(invalid("cluster_id", "0", "cluster IDs start at 1"));
        }
        if r.identity == 0 {
            return Err(invalid("identity", "0", "identity 0 is reserved"));
        }
        let mesh_ipv4: Ipv4Addr = match r.mesh_ipv4.parse() {
            Ok(ip) => ip,
            Err(_) if r.mesh_ipv4.is_empty() => {
                return Err(invalid("mesh_ipv4", "", "no mesh address: the WireGuard key was not registered"))
            }
            Err(_) => return Err(invalid("mesh_ipv4", &r.mesh_ipv4, "not an IPv4 address")),
        };
        let ipv4_alloc_cidr: IpNet =
            r.ipv4_alloc_cidr.parse().map_err(|_| invalid("ipv4_alloc_cidr", &r.ipv4_alloc_cidr, "not a CIDR"))?;
        if !ipv4_alloc_cidr.contains(&IpAddr::V4(mesh_ipv4)) {
            return Err(invalid("mesh_ipv4", &r.mesh_ipv4, "outside ipv4_alloc_cidr"));
        }
        let mut service_cidrs = Vec::new();
        for c in &r.service_cidrs {
            let net: IpNet = c.trim().parse().map_err(|_| invalid("service_cidrs", c, "not a CIDR"))?;
            if !service_cidrs.contains(&net.trunc()) {
                service_cidrs.push(net.trunc());
            }
        }
        let cluster_dns = match r.cluster_dns.as_str() {
            "" => None,
            s => Some(s.parse().map_err(|_| invalid("cluster_dns", s, "not an IP address"))?),
        };
        let cluster_domain = r.cluster_domain.trim_end_matches('.').to_ascii_lowercase();
        if !dns_name(&cluster_domain) {
            return Err(invalid("cluster_domain", &r.cluster_domain, "not a DNS name"));
        }
        Ok(Registration {
            cluster_name: r.cluster_name.clone(),
            cluster_id: r.cluster_id,
            identity: r.identity,
            mesh_ipv4,
            ipv4_alloc_cidr,
            service_cidrs,
            cluster_dns,
            cluster_domain,
        })
    }

    /// The variables, in file order.
    pub fn variables(&self) -> Vec<(&'static str, String)> {
        let cidrs: Vec<String> = self.service_cidrs.iter().map(ToString::to_string).collect();
        vec![
            (IDENTITY, self.identity.to_string()),
            (MESH_IPV4, self.mesh_ipv4.to_string()),
            (SERVICE_CIDRS, cidrs.join(",")),
            (CLUSTER_DNS, self.cluster_dns.map(|ip| ip.to_string()).unwrap_or_default()),
            (CLUSTER_DOMAIN, self.cluster_domain.clone()),
            (HOME_CLUSTER, self.cluster_name.clone()),
            (CLUSTER_NAME, self.cluster_name.clone()),
            (CLUSTER_ID, self.cluster_id.to_string()),
            (IPV4_ALLOC_CIDR, self.ipv4_alloc_cidr.to_string()),
        ]
    }

    /// The EnvironmentFile text.
    pub fn env_file(&self) -> String {
        let mut out = String::from("# Written by `causeway-node-agent register`: this host's registration.\n");
        for (k, v) in self.variables() {
            out.push_str(&format!("{k}={v}\n"));
        }
        out
    }
}

/// Reads `KEY=value` lines (comments and blank lines skipped, surrounding quotes removed): enough for the files
/// [`Registration::env_file`] writes.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Replaces `path` with `contents` atomically (a reader sees the old or the new file, never a partial one):
/// written to a temporary file in the same directory, synced, then renamed over it. Mode 0644.
pub fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response() -> RegisterResponse {
        RegisterResponse {
            cluster_name: "east".into(),
            cluster_id: 3,
            identity: 70123,
            identity_labels: "k8s:app=vm;".into(),
            ipv4_alloc_cidr: "10.192.7.0/30".into(),
            ipv6_alloc_cidr: String::new(),
            mesh_ipv4: "10.192.7.1".into(),
            cluster_dns: "10.96.0.10".into(),
            cluster_domain: "cluster.local".into(),
            service_cidrs: vec!["10.96.0.0/16".into(), "fd00:96::/112".into()],
        }
    }

    #[test]
    fn a_good_answer_becomes_the_env_file() {
        let reg = Registration::from_response(&response()).expect("valid");
        let vars = parse(&reg.env_file());
        assert_eq!(vars[IDENTITY], "70123");
        assert_eq!(vars[MESH_IPV4], "10.192.7.1");
        assert_eq!(vars[SERVICE_CIDRS], "10.96.0.0/16,fd00:96::/112");
        assert_eq!(vars[CLUSTER_DNS], "10.96.0.10");
        assert_eq!(vars[CLUSTER_DOMAIN], "cluster.local");
        assert_eq!(vars[HOME_CLUSTER], "east");
        assert_eq!(vars[CLUSTER_NAME], "east");
        assert_eq!(vars[CLUSTER_ID], "3");
        assert_eq!(vars[IPV4_ALLOC_CIDR], "10.192.7.0/30");
        // Values need no quoting in bash or systemd.
        for (_, v) in reg.variables() {
            assert!(v.bytes().all(|b| b.is_ascii_alphanumeric() || b".:/,-".contains(&b)), "{v}");
        }
    }

    #[test]
    fn missing_dns_and_no_service_cidrs_are_empty_values() {
        let mut r = response();
        r.cluster_dns.clear();
        r.service_cidrs.clear();
        let vars = parse(&Registration::from_response(&r).expect("valid").env_file());
        assert_eq!(vars[CLUSTER_DNS], "");
        assert_eq!(vars[SERVICE_CIDRS], "");
    }

    #[test]
    fn hostile_or_broken_fields_are_refused() {
        type Mutate = Box<dyn Fn(&mut RegisterResponse)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("cluster_name", Box::new(|r| r.cluster_name = "east\nCAUSEWAY_MESH_IPV4=1.2.3.4".into())),
            ("cluster_name", Box::new(|r| r.cluster_name = "$(reboot)".into())),
            ("cluster_id", Box::new(|r| r.cluster_id = 0)),
            ("identity", Box::new(|r| r.identity = 0)),
            ("mesh_ipv4", Box::new(|r| r.mesh_ipv4.clear())),
            ("mesh_ipv4", Box::new(|r| r.mesh_ipv4 = "fd00::1".into())),
            ("mesh_ipv4", Box::new(|r| r.mesh_ipv4 = "10.1.1.1".into())),
            ("ipv4_alloc_cidr", Box::new(|r| r.ipv4_alloc_cidr = "nope".into())),
            ("service_cidrs", Box::new(|r| r.service_cidrs.push("10.0.0.0/8; rm -rf /".into()))),
            ("cluster_dns", Box::new(|r| r.cluster_dns = "kube-dns".into())),
            ("cluster_domain", Box::new(|r| r.cluster_domain = "cluster local".into())),
        ];
        for (field, mutate) in cases {
            let mut r = response();
            mutate(&mut r);
            let err = Registration::from_response(&r).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn write_atomic_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("cw-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("workload.env");
        write_atomic(&path, "A=1\n").expect("write");
        write_atomic(&path, "A=2\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "A=2\n");
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! `causeway external-workload install NAME`: prints a bash script that joins a VM or bare-metal host to the mesh.
//!
//! Where it sits: this is the host's way in. The script installs the node agent and identity-sync with the cluster's
//! `externalworkload` certificates, registers the host with the clustermesh-apiserver over mTLS
//! (`causeway-node-agent register`: identity, mesh address, cluster DNS, Service CIDRs into `workload.env`), points
//! identity-sync (`--external-workload` mode) at the cluster's etcd so the host learns the mesh, and starts the node
//! agent, which brings up the WireGuard tunnel to the cluster's nodes. It makes cluster names resolvable on the host
//! (systemd-resolved drop-in, else a rewritten resolv.conf with a backup) and checks that with `check-dns`
//! (hickory-resolver). `bash join.sh uninstall` undoes every step. Every step echoes what it does.
//!
//! The script's body is the fixed file `external_workload_join.sh`; only the header (values from the cluster, the
//! certificates as functions) is generated, every value single-quoted for bash.

use k8s_openapi::api::core::v1::{Node, Service};

use crate::clustermesh::connect::{pick_endpoint, Endpoint};
use crate::clustermesh::{secret_str, Cluster, ClusterSettings, APISERVER_SERVICE, EXTERNAL_WORKLOAD_SECRET};
use crate::{Error, KubeTarget};

/// The fixed part of the script (after the generated header).
const BODY: &str = include_str!("external_workload_join.sh");
/// The chart's name for the clustermesh-apiserver Service port that serves registrations.
pub const WORKLOADS_PORT_NAME: &str = "workloads";
/// The WireGuard interface the host's agent creates (overridable with CAUSEWAY_WIREGUARD_INTERFACE when running
/// the script).
pub const WIREGUARD_INTERFACE: &str = "cw_wg";

/// Everything the script embeds.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub name: String,
    pub cluster: ClusterSettings,
    /// Where the node agent binary is on the host running the script.
    pub agent_binary: String,
    /// Where the identity-sync binary is on the host running the script.
    pub identity_sync_binary: String,
    /// The cluster's etcd (clustermesh-apiserver Service, port `etcd`), as the host reaches it; None: unknown.
    pub etcd_endpoint: Option<String>,
    /// The registration endpoint (clustermesh-apiserver Service, port `workloads`); None: unknown.
    pub workloads_endpoint: Option<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where `install` gets the binaries from and which endpoints it overrides.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub agent_binary: String,
    pub identity_sync_binary: String,
    /// Use this etcd endpoint instead of the one read from the Service.
    pub etcd_endpoint: Option<String>,
    /// Use this registration endpoint instead of the one read from the Service.
    pub workloads_endpoint: Option<String>,
}

/// A workload name must be a DNS label (it becomes the node name): lowercase letters, digits and '-', at most 63.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "external workload name {name:?} is invalid: use the host's name as a DNS label (at most 63 lowercase \
             letters, digits and '-', not starting or ending with '-')"
        )))
    }
}

/// An endpoint given on the command line: `https://host:port` with nothing a shell or YAML would interpret.
pub fn validate_endpoint(flag: &str, url: &str) -> Result<(), Error> {
    let rest = url.strip_prefix("https://").unwrap_or_default();
    let ok = !rest.is_empty()
        && rest.contains(':')
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || ".:[]-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Refused(format!("{flag} {url:?} is not an endpoint such as https://192.0.2.10:2379")))
    }
}

/// The Service's endpoint for its port named `port_name`, chosen as `clustermesh connect` chooses the etcd one
/// (load balancer, else NodePort on a node address, else ClusterIP). None when the Service has no such port.
pub fn pick_named_endpoint(svc: &Service, nodes: &[Node], port_name: &str) -> Option<Endpoint> {
    let mut only = svc.clone();
    let spec = only.spec.as_mut()?;
    let ports: Vec<_> = spec.ports.take()?.into_iter().filter(|p| p.name.as_deref() == Some(port_name)).collect();
    if ports.is_empty() {
        return None;
    }
    spec.ports = Some(ports);
    pick_endpoint(&only, nodes).ok()
}

/// Single-quotes a value for bash.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A bash function printing `content` (quoted heredoc delimiter: nothing in it is expanded).
fn printer(function: &str, content: &str) -> String {
    let body = if content.ends_with('\n') { content.to_string() } else { format!("{content}\n") };
    format!("{function}() {{\ncat <<'CAUSEWAY_EOF'\n{body}CAUSEWAY_EOF\n}}\n")
}

/// The join script.
pub fn render_script(p: &JoinParams) -> String {
    let mut s = String::new();
    s.push_str("#!/usr/bin/env bash\n");
    s.push_str(&format!(
        "# Joins this host to Causeway cluster {:?} (ID {}) as external workload {:?}.\n",
        p.cluster.name, p.cluster.id, p.name
    ));
    s.push_str(
        "# Generated by `causeway external-workload install`. It contains a private key: keep it secret.\n\
         #\n\
         # Run it as root on the host. It installs causeway-node-agent and identity-sync with the cluster's\n\
         # externalworkload certificates, registers this host with the clustermesh-apiserver over mTLS (identity,\n\
         # mesh address), configures identity-sync to mirror the cluster's etcd, starts both as systemd units (the\n\
         # agent brings up the WireGuard tunnel to the cluster's nodes), points cluster DNS names at the cluster's\n\
         # DNS server (systemd-resolved drop-in, else /etc/resolv.conf with a backup) and checks that\n\
         # kubernetes.default resolves. `bash join.sh uninstall` removes all of it.\n\
         #\n\
         # Environment: CAUSEWAY_AGENT_BINARY, CAUSEWAY_IDENTITY_SYNC_BINARY (binaries to install),\n\
         # CAUSEWAY_NODE_IP (default: the source address of the default route), CAUSEWAY_ETCD_ENDPOINT and\n\
         # CAUSEWAY_WORKLOADS_ENDPOINT (override the cluster's endpoints), CAUSEWAY_WIREGUARD_INTERFACE (default\n\
         # cw_wg), CAUSEWAY_BPFFS_ROOT, CAUSEWAY_REGISTER_TIMEOUT (default 2m), CAUSEWAY_DNS_CHECK_SECONDS (default\n\
         # 60), CAUSEWAY_JOIN_ROOT (install under another root: everything is written there, registration\n\
         # still happens, nothing is started), CAUSEWAY_JOIN_NO_START=1 (write everything, start nothing).\n\n",
    );
    let vars = [
        ("WORKLOAD_NAME", p.name.clone()),
        ("CLUSTER_NAME", p.cluster.name.clone()),
        ("CLUSTER_ID", p.cluster.id.to_string()),
        ("MAX_CONNECTED_CLUSTERS", p.cluster.max_connected_clusters.to_string()),
        ("DEFAULT_AGENT", p.agent_binary.clone()),
        ("DEFAULT_IDENTITY_SYNC", p.identity_sync_binary.clone()),
        ("DEFAULT_ETCD_ENDPOINT", p.etcd_endpoint.clone().unwrap_or_default()),
        ("DEFAULT_WORKLOADS_ENDPOINT", p.workloads_endpoint.clone().unwrap_or_default()),
    ];
    for (k, v) in vars {
        s.push_str(&format!("{k}={}\n", sh_quote(&v)));
    }
    s.push('\n');
    s.push_str(&printer("write_ca_crt", &p.ca_pem));
    s.push_str(&printer("write_tls_crt", &p.cert_pem));
    s.push_str(&printer("write_tls_key", &p.key_pem));
    s.push('\n');
    s.push_str(BODY);
    s
}

/// The script and what the operator should know before running it (printed on stderr by the CLI).
#[derive(Debug, Clone)]
pub struct Rendered {
    pub script: String,
    pub warnings: Vec<String>,
}

/// Warnings about the endpoints the script will use: unknown, only a ClusterIP, or a server certificate without the
/// name the host verifies it against.
pub fn endpoint_warnings(
    etcd: Option<&str>,
    etcd_via: Option<&str>,
    workloads: Option<&str>,
    server_cert_names: Option<&[String]>,
) -> Vec<String> {
    let mut out = Vec::new();
    match etcd {
        None => out.push(
            "warning: the clustermesh-apiserver Service has no usable etcd address: the script stops unless \
             CAUSEWAY_ETCD_ENDPOINT is set on the host (or pass --etcd-endpoint)"
                .to_string(),
        ),
        Some(_) => {
            // The host's identity-sync verifies etcd's certificate against `clustermesh-apiserver`
            // (tls-server-name in its remote config), whatever address it dials.
            if let Some(names) = server_cert_names {
                if !names.iter().any(|n| n == APISERVER_SERVICE) {
                    out.push(format!(
                        "warning: the clustermesh-apiserver server certificate does not name {APISERVER_SERVICE}: \
                         the host's identity-sync will fail TLS verification of etcd until you run `causeway \
                         clustermesh rotate-certs`"
                    ));
                }
            }
        }
    }
    if etcd_via == Some("ClusterIP") {
        out.push(
            "warning: the clustermesh-apiserver Service has only a ClusterIP: the host must be able to route to the \
             cluster's service network (use a LoadBalancer or NodePort Service otherwise)"
                .to_string(),
        );
    }
    if workloads.is_none() {
        out.push(
            "warning: the clustermesh-apiserver Service has no port named workloads: the script stops unless \
             CAUSEWAY_WORKLOADS_ENDPOINT is set on the host (or pass --workloads-endpoint)"
                .to_string(),
        );
    }
    out
}

/// Reads the cluster's settings, the externalworkload certificate and the apiserver's endpoints, and renders the
/// script.
pub async fn install(
    target: &KubeTarget,
    namespace: &str,
    name: &str,
    opts: &InstallOptions,
) -> Result<Rendered, Error> {
    validate_name(name)?;
    if let Some(url) = &opts.etcd_endpoint {
        validate_endpoint("--etcd-endpoint", url)?;
    }
    if let Some(url) = &opts.workloads_endpoint {
        validate_endpoint("--workloads-endpoint", url)?;
    }
    let c = Cluster::open(target, namespace).await?;
    let settings = c.settings().await?;
    let secret = c.get_secret(EXTERNAL_WORKLOAD_SECRET).await?.ok_or_else(|| {
        Error::Refused(format!(
            "{}: no Secret {EXTERNAL_WORKLOAD_SECRET} in namespace {namespace}: run `causeway clustermesh enable` first",
            target.label()
        ))
    })?;
    let get = |key: &str| {
        secret_str(&secret, key).ok_or_else(|| {
            Error::Refused(format!(
                "Secret {namespace}/{EXTERNAL_WORKLOAD_SECRET} has no {key}: run `causeway clustermesh rotate-certs`"
            ))
        })
    };
    let (ca_pem, cert_pem, key_pem) =
        (get(causeway_pki::CA_CERT_FILE)?, get(causeway_pki::CERT_FILE)?, get(causeway_pki::KEY_FILE)?);
    let svc: Option<Service> = c.services().get_opt(APISERVER_SERVICE).await.ok().flatten();
    let nodes = crate::clustermesh::connect::some_nodes(&c.client, 50).await;
    let safe = |u: &String| u.chars().all(|c| c.is_ascii_alphanumeric() || ".:/[]-".contains(c));
    let picked = svc.as_ref().and_then(|s| pick_endpoint(s, &nodes).ok());
    let etcd_via = if opts.etcd_endpoint.is_some() { None } else { picked.as_ref().map(|e| e.via) };
    let etcd_endpoint = opts.etcd_endpoint.clone().or_else(|| picked.map(|e| e.url()).filter(safe));
    let workloads_endpoint = opts.workloads_endpoint.clone().or_else(|| {
        svc.as_ref().and_then(|s| pick_named_endpoint(s, &nodes, WORKLOADS_PORT_NAME)).map(|e| e.url()).filter(safe)
    });
    let server_cert_names = c
        .get_secret(crate::clustermesh::SERVER_SECRET)
        .await
        .ok()
        .flatten()
        .and_then(|s| secret_str(&s, causeway_pki::CERT_FILE))
        .map(|pem| crate::clustermesh::sans(&pem));
    let warnings = endpoint_warnings(
        etcd_endpoint.as_deref(),
        etcd_via,
        workloads_endpoint.as_deref(),
        server_cert_names.as_deref(),
    );
    let script = render_script(&JoinParams {
        name: name.to_string(),
        cluster: settings,
        agent_binary: opts.agent_binary.clone(),
        identity_sync_binary: opts.identity_sync_binary.clone(),
        etcd_endpoint,
        workloads_endpoint,
        ca_pem,
        cert_pem,
        key_pem,
    });
    Ok(Rendered { script, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_endpoints_and_quoting() {
        assert!(validate_name("vm-1").is_ok());
        for bad in ["", "VM", "vm;rm -rf /", "-vm", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert!(validate_endpoint("--etcd-endpoint", "https://192.0.2.10:2379").is_ok());
        assert!(validate_endpoint("--etcd-endpoint", "https://[2001:db8::1]:2379").is_ok());
        for bad in ["http://192.0.2.10:2379", "https://", "https://x:1;reboot", "https://x:1/$(id)", "https://host"] {
            assert!(validate_endpoint("--etcd-endpoint", bad).is_err(), "{bad}");
        }
    }

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service literal")
    }

    #[test]
    fn workloads_endpoint_is_picked_like_the_etcd_one() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.7"}]}
        }))
        .expect("node literal");
        let ports = json!([
            {"name": "etcd", "port": 2379, "nodePort": 32379},
            {"name": "workloads", "port": 9965, "nodePort": 32765}
        ]);
        let lb = service(json!({
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5", "ports": ports},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}}
        }));
        let url = |s: &Service, n: &[Node]| pick_named_endpoint(s, n, WORKLOADS_PORT_NAME).map(|e| e.url());
        assert_eq!(url(&lb, &[]), Some("https://198.51.100.4:9965".into()));
        let np = service(json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.5", "ports": ports}}));
        assert_eq!(url(&np, std::slice::from_ref(&node)), Some("https://192.0.2.7:32765".into()));
        assert_eq!(
            pick_endpoint(&np, std::slice::from_ref(&node)).map(|e| e.url()),
            Ok("https://192.0.2.7:32379".into())
        );
        let cip = service(json!({"spec": {"clusterIP": "10.96.0.5", "ports": ports}}));
        assert_eq!(url(&cip, &[]), Some("https://10.96.0.5:9965".into()));
        // No port named workloads: unknown (never the etcd port by accident).
        let etcd_only = service(json!({"spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "etcd", "port": 2379}]}}));
        assert_eq!(url(&etcd_only, &[]), None);
    }

    #[test]
    fn endpoint_warnings_say_what_will_fail() {
        let names = vec!["clustermesh-apiserver".to_string(), "198.51.100.4".to_string()];
        let old_cert = vec!["etcd".to_string(), "198.51.100.4".to_string()];
        let ok = endpoint_warnings(
            Some("https://198.51.100.4:2379"),
            Some("LoadBalancer"),
            Some("https://198.51.100.4:9965"),
            Some(&names),
        );
        assert!(ok.is_empty(), "{ok:?}");
        // A NodePort address the certificate never named is fine: the name is what is verified.
        let np = endpoint_warnings(Some("https://203.0.113.9:32379"), Some("NodePort"), Some("x"), Some(&names));
        assert!(np.is_empty(), "{np:?}");
        let w = endpoint_warnings(Some("https://203.0.113.9:2379"), Some("ClusterIP"), None, Some(&old_cert));
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("does not name clustermesh-apiserver") && w[0].contains("rotate-certs"), "{w:?}");
        assert!(w[1].contains("only a ClusterIP"), "{w:?}");
        assert!(w[2].contains("no port named workloads"), "{w:?}");
        assert!(endpoint_warnings(None, None, Some("x"), None)[0].contains("no usable etcd address"));
    }

    #[test]
    fn script_quotes_values_and_parses() {
        let p = JoinParams {
            name: "vm-1".into(),
            cluster: ClusterSettings { name: "west".into(), id: 2, max_connected_clusters: 255 },
            agent_binary: "/opt/it's here/causeway-node-agent".into(),
            identity_sync_binary: "./identity-sync".into(),
            etcd_endpoint: Some("https://192.0.2.10:2379".into()),
            workloads_endpoint: None,
            ca_pem: "CA PEM $(reboot)\n".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY `id`".into(),
        };
        let s = render_script(&p);
        assert!(s.starts_with("#!/usr/bin/env bash\n"));
        assert!(s.contains("WORKLOAD_NAME='vm-1'\nCLUSTER_NAME='west'\nCLUSTER_ID='2'\n"), "{s}");
        assert!(s.contains(r"DEFAULT_AGENT='/opt/it'\''s here/causeway-node-agent'"), "{s}");
        assert!(s.contains("DEFAULT_WORKLOADS_ENDPOINT=''\n"), "{s}");
        assert!(s.contains("cat <<'CAUSEWAY_EOF'\nCA PEM $(reboot)\nCAUSEWAY_EOF\n"), "{s}");
        assert!(s.contains("causeway-node-agent\" register"), "registration step missing");
        assert!(s.contains("check-dns"), "DNS check missing");
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg("/dev/stdin")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().map(|mut i| i.write_all(s.as_bytes())).transpose()?;
                c.wait_with_output()
            });
        let out = out.expect("bash -n");
        assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    }
}

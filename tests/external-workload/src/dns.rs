//! The cluster DNS STAND-IN: Debian's dnsmasq (package `dnsmasq-base`) in the DNS pod, answering
//! `<service>.<namespace>.svc.<domain>` with each Service's ClusterIP as read from the (fake) kube API when it is
//! started. CoreDNS would watch the API; this one is a snapshot, which is all the test needs (its Services exist
//! before the DNS pod starts). Names under the domain it does not know get NXDOMAIN; nothing is forwarded upstream.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use causeway_multicluster_tests::Proc;
use causeway_testsupport::netns::Netns;
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;
use kube::Api;

/// Where Debian installs dnsmasq.
pub fn dnsmasq_binary() -> Result<PathBuf> {
    for p in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("dnsmasq not found: install Debian's dnsmasq-base (scripts/install-deps.sh)")
}

/// `(fqdn, cluster IP)` for every Service with a ClusterIP (pure).
pub fn records(services: &[Service], domain: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = services
        .iter()
        .filter_map(|s| {
            let ip = s.spec.as_ref()?.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None")?;
            let fqdn = format!("{}.{}.svc.{domain}", s.metadata.name.as_deref()?, s.metadata.namespace.as_deref()?);
            Some((fqdn, ip.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Starts dnsmasq in `pod` listening on `listen` (UDP and TCP 53) with the Services' records.
pub async fn start(
    kube: &kube::Client,
    pod: &Netns,
    listen: std::net::Ipv4Addr,
    domain: &str,
    log: &Path,
) -> Result<Proc> {
    let services = Api::<Service>::all(kube.clone()).list(&ListParams::default()).await?.items;
    let mut args = vec![
        format!("--net={}", pod.path().display()),
        dnsmasq_binary()?.to_string_lossy().into_owned(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--pid-file".into(),
        "--user=root".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        "--log-facility=-".into(),
        "--log-queries".into(),
        format!("--local=/{domain}/"),
    ];
    for (name, ip) in records(&services, domain) {
        args.push(format!("--host-record={name},{ip}"));
    }
    Proc::spawn("dnsmasq", Path::new("nsenter"), &args, log).context("starting dnsmasq")
}

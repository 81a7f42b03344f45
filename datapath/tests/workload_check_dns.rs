//! `causeway-node-agent check-dns` (the real binary) in a "VM" network namespace against a real DNS server
//! (dnsmasq with `--host-record`, standing in for the cluster DNS) in another namespace, reached over a veth:
//!
//! - a relative name resolves through the resolv.conf's search list, and the answer is printed;
//! - started before the server, it retries until the server answers;
//! - `--expect` an address the name does not have, or a name that does not exist: non-zero exit, saying why.
//!
//! Root/netns and dnsmasq required: skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes them
//! fail instead.

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Result};
use causeway_testsupport::netns::{self, Netns, NsChild};

const DNS_IP: &str = "10.55.0.1";
const VM_IP: &str = "10.55.0.2";
const SERVICE_IP: &str = "10.97.0.1";

struct Setup {
    vm: Netns,
    dns: Netns,
    resolv_conf: tempfile::NamedTempFile,
}

impl Setup {
    fn new() -> Result<Setup> {
        let vm = Netns::new("dnsvm")?;
        let dns = Netns::new("dnssrv")?;
        netns::veth(&vm, "eth0", &format!("{VM_IP}/24"), &dns, "eth0", &format!("{DNS_IP}/24"))?;
        // What the join script writes: the cluster DNS, the cluster's search domains, Kubernetes' ndots.
        let resolv_conf = tempfile::NamedTempFile::new()?;
        std::fs::write(
            resolv_conf.path(),
            format!(
                "nameserver {DNS_IP}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n\
                 options ndots:5 timeout:1 attempts:1\n"
            ),
        )?;
        Ok(Setup { vm, dns, resolv_conf })
    }

    /// dnsmasq answering only its host records (no upstream, no /etc/hosts), in the foreground; killed on drop.
    fn start_dnsmasq(&self) -> Result<NsChild> {
        let record = format!("--host-record=kubernetes.default.svc.cluster.local,{SERVICE_IP}");
        let listen = format!("--listen-address={DNS_IP}");
        let child = self.dns.spawn(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            "--except-interface=lo",
            "--pid-file=",
            "--log-facility=-",
            "--log-queries",
            &record,
        ])?;
        Ok(child)
    }

    fn check_dns(&self, args: &[&str]) -> Result<std::process::Child> {
        let resolv = self.resolv_conf.path().display().to_string();
        let mut cmd =
            self.vm.command(&[env!("CARGO_BIN_EXE_causeway-node-agent"), "check-dns", "--resolv-conf", &resolv])?;
        cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        Ok(cmd.spawn()?)
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(self.check_dns(args)?.wait_with_output()?)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_dns_resolves_through_the_search_list_and_waits_for_the_server() -> Result<()> {
    if !netns::privileged("check_dns_resolves_through_the_search_list_and_waits_for_the_server") {
        return Ok(());
    }
    let s = Setup::new()?;
    // Nothing answers yet: the check keeps trying.
    let early = s.check_dns(&["--name", "kubernetes.default", "--expect", SERVICE_IP, "--timeout", "60s"])?;
    std::thread::sleep(Duration::from_secs(2));
    let mut dnsmasq = s.start_dnsmasq()?;
    let out = early.wait_with_output()?;
    ensure!(dnsmasq.is_running(), "dnsmasq exited: {:?}", text(&dnsmasq.kill().stderr));
    ensure!(out.status.success(), "check-dns failed: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim(), format!("kubernetes.default {SERVICE_IP}"), "the answer is printed");

    // The fully qualified name, no expectation: whatever it resolves to is printed.
    let out = s.run(&["--name", "kubernetes.default.svc.cluster.local.", "--timeout", "10s"])?;
    ensure!(out.status.success(), "FQDN: {}", text(&out.stderr));
    ensure!(text(&out.stdout).contains(SERVICE_IP), "{}", text(&out.stdout));
    let log = text(&dnsmasq.kill().stderr);
    ensure!(log.contains("kubernetes.default.svc.cluster.local"), "the queries reached dnsmasq: {log}");
    Ok(())
}

#[test]
fn check_dns_fails_on_a_missing_name_or_an_unexpected_answer() -> Result<()> {
    if !netns::privileged("check_dns_fails_on_a_missing_name_or_an_unexpected_answer") {
        return Ok(());
    }
    let s = Setup::new()?;
    let _dnsmasq = s.start_dnsmasq()?;
    // The server is up and answers for the right address (so the failures below are about the answers).
    let ok = s.run(&["--name", "kubernetes.default", "--expect", SERVICE_IP, "--timeout", "30s"])?;
    ensure!(ok.status.success(), "baseline: {}", text(&ok.stderr));

    let wrong = s.run(&["--name", "kubernetes.default", "--expect", "10.97.0.99", "--timeout", "3s"])?;
    let stderr = text(&wrong.stderr);
    ensure!(!wrong.status.success(), "an unexpected answer must fail: {stderr}");
    ensure!(stderr.contains("10.97.0.99") && stderr.contains(SERVICE_IP), "says what it got and wanted: {stderr}");

    let missing = s.run(&["--name", "nothere.default", "--timeout", "3s"])?;
    let stderr = text(&missing.stderr);
    ensure!(!missing.status.success(), "an unknown name must fail: {stderr}");
    ensure!(stderr.contains("did not resolve"), "{stderr}");
    ensure!(text(&missing.stdout).trim().is_empty(), "no answers printed");
    Ok(())
}

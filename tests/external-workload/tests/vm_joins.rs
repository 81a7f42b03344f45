//! A "VM" joins cluster west with the script `causeway external-workload install` prints, run for real inside its
//! own network namespace, and the two services that script installs, started from the unit files it wrote. What a
//! user checks afterwards: the ExternalWorkload's status (identity, address, mesh address, Ready), the host's
//! ipcache entry and identity in west's etcd, the pod reached over WireGuard (and seeing the host's mesh address),
//! the global Service reached by its ClusterIP, its name resolved through the cluster DNS with `check-dns`, only
//! WireGuard on the underlay between the host and the node, and `join.sh uninstall` leaving nothing behind.
//!
//! Root/netns required: skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes it fail instead.
//! Binaries: `cargo build --bins -p causeway -p clustermesh-apiserver -p identity-sync -p causeway-datapath`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use causeway_external_workload_tests::net::{
    echo_from, host_of, install_underlay_counters, underlay_counter, underlay_seen, EchoServer, ECHO_POD_IP, ECHO_PORT,
    NODE1_IP, VM_IP,
};
use causeway_external_workload_tests::testbed::{
    Testbed, DNS_SERVICE_IP, DOMAIN, ECHO_SERVICE_IP, ECHO_SERVICE_PORT, SERVICE_CIDR, SOON, WG_PORT, WORKLOAD,
    WORKLOAD_LABELS,
};
use causeway_testsupport::netns;
use serde_json::Value;

/// The mesh address of vm1: the first usable address of its spec.ipv4AllocCIDR (10.192.1.0/30).
const MESH_IP: &str = "10.192.1.1";

/// The resolv.conf of the machine running the test: the script copies it under its root, and uninstall restores it.
fn host_resolv_conf() -> String {
    std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

/// Polls `check` until it returns Ok, or fails with its last error after `timeout`.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => bail!("{what}: still failing after {timeout:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[test]
fn vm_joins_west_reaches_pod_and_global_service_resolves_dns_and_uninstalls() -> Result<()> {
    if !netns::privileged("vm_joins_west_reaches_pod_and_global_service_resolves_dns_and_uninstalls") {
        return Ok(());
    }
    let mut tb = Testbed::start()?;
    let inner = ["10.244.0.0/16", SERVICE_CIDR, "10.192.0.0/16"];
    install_underlay_counters(&tb.net.vm1, "und0", NODE1_IP, WG_PORT, &inner)?;
    install_underlay_counters(&tb.net.node1, "und0", VM_IP, WG_PORT, &inner)?;

    // A host without an ExternalWorkload object is refused at registration, with the server's reason, and the
    // script stops there: no service units.
    let stray = tb.dir.path().join("join-vm2.sh");
    std::fs::write(&stray, tb.render_join_script("vm2")?)?;
    let stray_root = tb.dir.path().join("vm2-root");
    std::fs::create_dir_all(&stray_root)?;
    let (ok, out, err) = tb.run_join_script(&stray, &stray_root, &[])?;
    assert!(!ok, "joining without an ExternalWorkload succeeded:\n{out}");
    assert!(err.contains("registration failed"), "{out}\n{err}");
    assert!(err.contains("vm2"), "the server's reason does not name the workload:\n{err}");
    assert!(!stray_root.join("etc/systemd/system/causeway-node-agent.service").exists());
    let (ok, out, err) = tb.run_join_script(&stray, &stray_root, &["uninstall"])?;
    ensure!(ok, "uninstall after a refused join failed:\n{out}\n{err}");

    // The join, as a user runs it: script from the CLI, bash inside the host.
    let script = tb.render_join_script(WORKLOAD)?;
    let path = tb.dir.path().join("join.sh");
    std::fs::write(&path, &script)?;
    let root = tb.dir.path().join("vm1-root");
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    let (ok, out, err) = tb.run_join_script(&path, &root, &[])?;
    let join_took = started.elapsed();
    ensure!(ok, "the join script failed:\n{out}\n{err}\n{}", tb.logs());
    for step in ["causeway-join: registering with the clustermesh-apiserver", "causeway-join: registered: identity"] {
        ensure!(out.contains(step), "{step:?} missing from the script's output:\n{out}");
    }

    // The ExternalWorkload's status says who the host is.
    let status = eventually("vm1's status", SOON, || {
        let s = serde_json::to_value(tb.workload()?.status)?;
        let ready =
            s["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        ensure!(ready && s["id"].as_u64().is_some(), "not Ready with an id yet: {s}");
        Ok(s)
    })?;
    assert_eq!(status["ip"], VM_IP.to_string(), "{status}");
    assert_eq!(status["meshIPv4"], MESH_IP, "{status}");
    let id = status["id"].as_u64().context("status.id")?;
    // The key the host registered is the one its agent tunnels with (the key file `register` created).
    let key = std::fs::read_to_string(root.join("var/lib/causeway/wireguard.key"))?;
    let key: causeway_datapath::wireguard::PrivateKey = key.trim().parse()?;
    assert_eq!(status["wireguardPublicKey"], key.public_key().to_base64(), "{status}");

    // west's etcd: the mesh address maps to that identity, and the identity carries the workload's labels.
    let entry = eventually("ipcache entry of the mesh address", SOON, || {
        tb.etcd_get(&format!("cilium/state/ip/v1/default/{MESH_IP}"))?.context("no key yet")
    })?;
    let entry: Value = serde_json::from_str(&entry)?;
    assert_eq!(entry["ID"].as_u64(), Some(id), "{entry}");
    assert_eq!(entry["HostIP"], VM_IP.to_string(), "{entry}");
    let labels = tb.etcd_get(&format!("cilium/state/identities/v1/id/{id}"))?.context("identity not in etcd")?;
    for (k, v) in WORKLOAD_LABELS {
        assert!(labels.contains(&format!("{k}={v};")), "identity {id} labels {labels:?} lack {k}={v}");
    }

    // etcd auth is on: the host's certificate (the one its identity-sync reads with) cannot write the cluster's
    // state.
    let forged = tb.etcd_put_as(&root.join("etc/causeway/certs"), "cilium/state/ip/v1/default/10.244.1.99", "{}");
    let why = format!("{:#}", forged.err().context("the externalworkload certificate wrote into west's ipcache")?);
    assert!(why.contains("permission denied"), "the write failed, but not for lack of permission: {why}");

    // The host's services, as systemd would start them.
    let started = Instant::now();
    tb.start_vm_units(&root)?;
    let units_ready = started.elapsed();

    // A pod over WireGuard: the pod sees the host's mesh address.
    let pod = SocketAddr::from((ECHO_POD_IP, ECHO_PORT));
    let (peer, intact) =
        eventually("vm1 → echo pod", SOON, || echo_from(&tb.net.vm1, pod, b"hello pod")).with_context(|| tb.logs())?;
    assert!(intact, "the echo came back damaged");
    assert_eq!(host_of(&peer), MESH_IP, "the pod saw {peer}");
    // Figures for the reader (never asserted; a debug build on a shared machine): how long the join takes.
    println!(
        "join script (registration included): {join_took:?}; services ready: {units_ready:?}; first pod reply \
         after start: {:?}",
        started.elapsed()
    );

    // The global Service by its ClusterIP (routed into the tunnel, translated by node1's service proxy).
    let svc: SocketAddr = format!("{ECHO_SERVICE_IP}:{ECHO_SERVICE_PORT}").parse()?;
    let (peer, intact) = eventually("vm1 → echo Service", SOON, || echo_from(&tb.net.vm1, svc, b"hello service"))
        .with_context(|| tb.logs())?;
    assert!(intact, "the echo through the Service came back damaged");
    assert_eq!(host_of(&peer), MESH_IP, "the pod behind the Service saw {peer}");

    // Cluster DNS with the resolv.conf the script wrote.
    let agent = root.join("usr/local/bin/causeway-node-agent");
    let name = format!("echo.default.svc.{DOMAIN}");
    let dns = Command::new("nsenter")
        .arg(format!("--net={}", tb.net.vm1.path().display()))
        .arg(&agent)
        .args(["check-dns", "--resolv-conf"])
        .arg(root.join("etc/resolv.conf"))
        .args(["--name", &name, "--expect", ECHO_SERVICE_IP, "--timeout", "30s"])
        .output()?;
    let dns_out = String::from_utf8_lossy(&dns.stdout);
    assert!(dns.status.success(), "check-dns {name}: {dns_out}\n{}", String::from_utf8_lossy(&dns.stderr));
    assert!(dns_out.contains(ECHO_SERVICE_IP), "{dns_out}");
    // A short name, through the search list the script wrote (svc.<domain> first).
    let short = Command::new("nsenter")
        .arg(format!("--net={}", tb.net.vm1.path().display()))
        .arg(&agent)
        .args(["check-dns", "--resolv-conf"])
        .arg(root.join("etc/resolv.conf"))
        .args(["--name", "kube-dns.kube-system", "--expect", DNS_SERVICE_IP, "--timeout", "30s"])
        .output()?;
    assert!(
        short.status.success(),
        "check-dns kube-dns.kube-system: {}{}",
        String::from_utf8_lossy(&short.stdout),
        String::from_utf8_lossy(&short.stderr)
    );

    // The other way: a pod reaches a server on the host at its mesh address, and the host sees the pod's address.
    let _server = EchoServer::start(&tb.net.vm1, SocketAddr::from(([0, 0, 0, 0], 9000)))?;
    let on_host: SocketAddr = format!("{MESH_IP}:9000").parse()?;
    let (peer, intact) = eventually("echo pod → vm1", SOON, || echo_from(&tb.net.echo.ns, on_host, b"hello host"))?;
    assert!(intact, "the host's echo came back damaged");
    assert_eq!(host_of(&peer), ECHO_POD_IP.to_string(), "the host saw {peer}");

    // Running the script again (as users do) keeps the host's identity and address, and traffic flows on.
    let (ok, out, err) = tb.run_join_script(&path, &root, &[])?;
    ensure!(ok, "the second run of the join script failed:\n{out}\n{err}");
    let again = serde_json::to_value(tb.workload()?.status)?;
    assert_eq!((again["id"].as_u64(), &again["meshIPv4"]), (Some(id), &status["meshIPv4"]), "{again}");
    assert_eq!(std::fs::read_to_string(root.join("etc/causeway/resolv.conf.orig"))?, host_resolv_conf());
    let (peer, _) = echo_from(&tb.net.vm1, pod, b"still there")?;
    assert_eq!(host_of(&peer), MESH_IP);

    // Between the host and the node the underlay carried WireGuard and nothing else.
    let from_node = underlay_counter(&tb.net.vm1, "wg")?;
    let from_vm = underlay_counter(&tb.net.node1, "wg")?;
    assert!(from_node > 0 && from_vm > 0, "no WireGuard packets counted ({from_node} in, {from_vm} out)");
    for ns in [&tb.net.vm1, &tb.net.node1] {
        let seen = underlay_seen(ns);
        assert_eq!(underlay_counter(ns, "other")?, 0, "non-WireGuard packets between vm1 and node1: {seen}");
        assert_eq!(underlay_counter(ns, "inner")?, 0, "pod/Service/mesh addresses on the underlay: {seen}");
    }

    // Uninstall: services stopped (as systemctl does), then the script's uninstall.
    tb.stop_vm_units();
    let (ok, out, err) = tb.run_join_script(&path, &root, &["uninstall"])?;
    ensure!(ok, "uninstall failed:\n{out}\n{err}");
    for gone in [
        "etc/causeway",
        "var/lib/causeway",
        "usr/local/bin/causeway-node-agent",
        "usr/local/bin/causeway-identity-sync",
        "etc/systemd/system/causeway-node-agent.service",
        "etc/systemd/system/causeway-identity-sync.service",
    ] {
        assert!(!root.join(gone).exists(), "{gone} is still there after uninstall");
    }
    for dev in [tb.vm_wg.as_str(), "cw_vxlan"] {
        let link = tb.net.vm1.exec_unchecked(&["ip", "link", "show", dev])?;
        assert!(!link.status.success(), "the device {dev} is still there after uninstall");
    }
    assert!(!tb.vm_dirs.pin_dir.exists(), "{} is still pinned after uninstall", tb.vm_dirs.pin_dir.display());
    assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf"))?, host_resolv_conf(), "resolv.conf not restored");
    assert!(!Path::new(&root.join("etc/systemd/resolved.conf.d/causeway.conf")).exists());
    Ok(())
}

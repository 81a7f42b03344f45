//! Fixtures shared by the tests that run the real `causeway-node-agent` binary in a node's network namespace and
//! feed it node records (`wireguard_restart.rs`, `workload_host_mode.rs`): the agent's pin and state directories,
//! the agent process, its readiness, leftover UAPI sockets, and node records in the store's shape.

#![allow(dead_code)] // each test file uses part of it

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{ensure, Result};
use causeway_datapath::bpf::loader;
use causeway_store::validate::RemoteEntry;
use causeway_store::{Node, NodeAddress};
use causeway_testsupport::netns::{self, Netns};

/// An agent's `--bpffs-root` and `--state-dir`, unique per test; removed on drop (programs detached, maps
/// unpinned), even on panic.
pub struct AgentDirs {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl AgentDirs {
    pub fn new(prefix: &str) -> Result<AgentDirs> {
        let name = netns::unique_name(prefix);
        let dirs = AgentDirs {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            state_dir: std::env::temp_dir().join(format!("{name}.state")),
        };
        std::fs::create_dir_all(&dirs.state_dir)?;
        Ok(dirs)
    }
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        if let Err(e) = loader::uninstall(&self.pin_dir) {
            eprintln!("cleanup of {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A UAPI socket file a killed boringtun leaves behind, removed on drop (the interface goes with its netns).
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One agent process (nsenter --net execs it: same pid). SIGTERMed and reaped on drop, unless already killed and
/// reaped (its pid may belong to someone else by then).
pub struct AgentProcess(Option<Child>);

impl AgentProcess {
    pub fn new(child: Child) -> AgentProcess {
        AgentProcess(Some(child))
    }

    /// What a crash looks like: SIGKILL, then reaped.
    pub fn sigkill(&mut self) -> Result<()> {
        if let Some(mut child) = self.0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        if !netns::wait_for(Duration::from_secs(5), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Waits until the agent's `/readyz` at `addr` (inside `ns`) answers 200: streams synced, datapath reconciled.
pub fn wait_ready(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let ready = || {
        ns.run_in(move || -> Option<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            (out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")).then_some(())
        })
        .ok()
        .flatten()
        .is_some()
    };
    ensure!(netns::wait_for(Duration::from_secs(120), ready), "the agent in {} never became ready", ns.name());
    Ok(())
}

/// A node record of cluster `cluster` (ID 2) as a peer's store holds it: one internal IP, one pod CIDR, its
/// WireGuard public key (base64).
pub fn node_record(cluster: &str, name: &str, ip: &str, cidr: &str, key: &str) -> Result<RemoteEntry> {
    Ok(RemoteEntry::Node(Node {
        name: name.into(),
        cluster: cluster.into(),
        addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip.parse()? }],
        ipv4_alloc_cidr: Some(cidr.parse()?),
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: 2,
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: key.into(),
        boot_id: String::new(),
    }))
}

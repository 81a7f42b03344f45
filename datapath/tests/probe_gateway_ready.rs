//! The gateway-ready flag of the health probe against the real datapath: the `causeway-node-agent` binary on an
//! egress-only gateway (no identity-sync) installs SNAT on its external interface in a network namespace, and its
//! probe replies say "ready"; once the datapath is uninstalled under it, the same agent still answers but says
//! "not ready".

mod egress_agent_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_api::probe::{Probe, ProbeReply};
use causeway_datapath::bpf::loader;
use causeway_testsupport::netns::{self, Netns};
use egress_agent_support::{free_tcp_port, free_udp_port, policy, ChildGuard, EgressServer};

/// Pins and state of this test's agent, removed on drop (panics included).
struct Installed {
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = loader::uninstall(&self.pin_dir) {
            eprintln!("cleanup of {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Probes until a reply satisfies `ok` (or the deadline passes); returns the last reply.
async fn probe_until(
    sock: &tokio::net::UdpSocket,
    to: std::net::SocketAddr,
    deadline: Duration,
    ok: impl Fn(&ProbeReply) -> bool,
) -> Result<ProbeReply> {
    let start = Instant::now();
    let mut seq = 0u64;
    let mut last = None;
    while start.elapsed() < deadline {
        seq += 1;
        sock.send_to(&Probe { seq }.encode(), to).await?;
        let mut buf = [0u8; 512];
        if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await {
            if let Ok(r) = ProbeReply::decode(&buf[..n]) {
                if r.seq == seq && ok(&r) {
                    return Ok(r);
                }
                last = Some(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no matching probe reply within {deadline:?}; last {last:?}")
}

#[test]
fn the_gateway_flag_follows_the_snat_attachment_of_the_real_agent() -> Result<()> {
    if !netns::privileged("the_gateway_flag_follows_the_snat_attachment_of_the_real_agent") {
        return Ok(());
    }
    let gw = Netns::new("prbgw")?;
    let ext = Netns::new("prbext")?;
    netns::veth(&gw, "eth0", "192.168.90.1/24", &ext, "eth0", "192.168.90.2/24")?;
    let name = netns::unique_name("cw-probe");
    let installed =
        Installed { pin_dir: PathBuf::from("/sys/fs/bpf").join(&name), state_dir: std::env::temp_dir().join(&name) };
    let (pin_dir, state_dir) = (installed.pin_dir.clone(), installed.state_dir.clone());
    let bin = env!("CARGO_BIN_EXE_causeway-node-agent");
    let common = move |cmd: &mut std::process::Command| {
        cmd.args(["--node-name", "gw-a", "--node-ip", "192.168.90.1", "--vxlan-device", "cw_vxlan"])
            .arg("--bpffs-root")
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .env_remove("CAUSEWAY_DRY_RUN")
            .env_remove("CAUSEWAY_IDENTITY_SYNC_ADDR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    };

    // Everything in the gateway's namespace (threads and children of this closure inherit it; the mounts stay
    // the host's, so the pins land in the real bpffs).
    gw.run_in(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let egress = EgressServer::default();
            egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.168.90.10", &["192.168.90.1"]));
            let egress_addr = egress.serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
            let (probe_port, metrics_port) = (free_udp_port()?, free_tcp_port()?);
            let mut cmd = std::process::Command::new(bin);
            common(&mut cmd);
            cmd.args(["--egress-addr", &egress_addr.to_string(), "--external-interface", "eth0"])
                .args(["--probe-addr", &format!("127.0.0.1:{probe_port}")])
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")]);
            let _agent = ChildGuard(cmd.spawn().context("starting the agent")?);
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let to: std::net::SocketAddr = format!("127.0.0.1:{probe_port}").parse()?;

            let r = probe_until(&sock, to, Duration::from_secs(60), |r| r.gateway_ready()).await?;
            assert_eq!(r.node, "gw-a");

            // An operator uninstalls the datapath under the running agent: SNAT is gone, the agent is not.
            let mut un = std::process::Command::new(bin);
            common(&mut un);
            let out = un.arg("--uninstall").output()?;
            if !out.status.success() {
                bail!("--uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let r = probe_until(&sock, to, Duration::from_secs(10), |r| !r.gateway_ready()).await?;
            assert_eq!(r.node, "gw-a", "still alive and answering");
            Ok(())
        })
    })??;
    drop(installed);
    Ok(())
}

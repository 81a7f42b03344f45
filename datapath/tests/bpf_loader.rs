//! Loader lifecycle on real devices in a network namespace: attach (pinned TCX links), the attachment surviving
//! the loader process's handles, a "restart" that reuses the pinned maps and replaces the program in place,
//! detach of one hook, and full uninstall. What is attached is read back from the kernel (BPF_PROG_QUERY on the device).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use causeway_datapath::bpf::loader::{self, Hook};
use causeway_datapath::bpf::maps::IpcacheEntry;
use causeway_datapath::bpf::{BpfLoader, BpfMaps};
use causeway_testsupport::netns::{self, Netns};

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = loader::uninstall(&self.0);
    }
}

/// How many programs named `program` are attached at TCX ingress of `dev` (kernel names are cut at 15 bytes).
/// Asked of the kernel (BPF_PROG_QUERY), not of our pin directory. This machine's bpftool predates TCX listing.
fn attached(ns: &Netns, dev: &str, program: &str) -> Result<usize> {
    let (dev, short) = (dev.to_owned(), program[..program.len().min(15)].to_owned());
    ns.run_in(move || -> Result<usize, String> {
        let (_rev, progs) = SchedClassifier::query_tcx(&dev, TcAttachType::Ingress).map_err(|e| e.to_string())?;
        Ok(progs.iter().filter(|p| p.name_as_str() == Some(short.as_str())).count())
    })?
    .map_err(|e| anyhow!(e))
}

fn load_and_attach(ns: &Netns, pin_dir: &Path) -> Result<()> {
    let pin_dir = pin_dir.to_path_buf();
    ns.run_in(move || -> Result<(), String> {
        let mut progs = BpfLoader::new(&pin_dir).load().map_err(|e| e.to_string())?;
        progs.attach(Hook::FromPod, "veth0").map_err(|e| e.to_string())?;
        progs.attach(Hook::FromRemoteEth, "veth1").map_err(|e| e.to_string())?;
        // `progs` (every fd this "agent" holds) is dropped here.
        Ok(())
    })?
    .map_err(|e| anyhow!(e))
}

#[test]
fn attach_survives_restart_detach_and_uninstall_clean_up() -> Result<()> {
    if !netns::privileged("attach_survives_restart_detach_and_uninstall_clean_up") {
        return Ok(());
    }
    let ns = Netns::new("bpfld")?;
    ns.ip("link add veth0 type veth peer name veth1")?;
    ns.ip("link set veth0 up")?;
    ns.ip("link set veth1 up")?;
    let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/cw-test-loader-{}", std::process::id())));

    load_and_attach(&ns, &pin.0)?;
    assert_eq!(attached(&ns, "veth0", "cw_from_pod")?, 1, "attached, and still so after the loader's fds closed");
    assert_eq!(attached(&ns, "veth1", "cw_from_remote_eth")?, 1);
    assert!(loader::is_attached(&pin.0, Hook::FromPod, "veth0"));

    // State written by the first "agent".
    let prefix = "10.244.0.0/16".parse()?;
    let entry =
        IpcacheEntry { identity: 1234, cluster_id: 3, is_node: false, remote_cluster: true, tunnel_endpoint: None };
    BpfMaps::open(&pin.0)?.ipcache.upsert(prefix, entry)?;

    // Restart: load again with the same pin dir and attach again. Maps keep their contents; the program is
    // swapped inside the same link, so there is still exactly one.
    load_and_attach(&ns, &pin.0)?;
    assert_eq!(attached(&ns, "veth0", "cw_from_pod")?, 1, "replaced, not stacked");
    assert_eq!(BpfMaps::open(&pin.0)?.ipcache.entries()?, vec![(prefix, entry)], "pinned map contents survive");

    // Detach one hook.
    assert!(loader::detach(&pin.0, Hook::FromPod, "veth0")?);
    assert_eq!(attached(&ns, "veth0", "cw_from_pod")?, 0, "detached");
    assert!(!loader::detach(&pin.0, Hook::FromPod, "veth0")?, "second detach is a no-op");
    assert_eq!(attached(&ns, "veth1", "cw_from_remote_eth")?, 1, "the other hook is untouched");

    // Full uninstall: nothing attached, nothing pinned.
    loader::uninstall(&pin.0)?;
    assert_eq!(attached(&ns, "veth1", "cw_from_remote_eth")?, 0);
    assert!(!pin.0.exists(), "pin directory removed");
    Ok(())
}

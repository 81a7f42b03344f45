//! Putting the programs in place on a node: load (maps pinned by name, reused after a restart), attach to the
//! configured interfaces with pinned TCX links (a restarted agent swaps its program into the same link: no window
//! without one), create the VXLAN collect-metadata device, and write the node config map.
//!
//! All interface work happens in the calling thread's network namespace.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info};

use super::{ip, KernelError};
use crate::bpf::maps::{ConfigMap, NodeConfig};
use crate::bpf::snat;
use crate::bpf::{BpfError, BpfLoader, BpfPrograms, Hook};

/// UDP port of the VXLAN device (IANA's).
pub const VXLAN_PORT: u16 = 4789;

/// What to install on this node.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub pin_dir: PathBuf,
    /// This node's underlay IPv4 (a gateway with this address is local; VXLAN packets are sent from it).
    pub node_ipv4: Ipv4Addr,
    /// Host-side pod veths (cw_from_pod at their ingress).
    pub pod_interfaces: Vec<String>,
    /// Also every interface whose name starts with this (e.g. "lxc"); see [`Installed::attach_pods_by_prefix`].
    pub pod_prefix: Option<String>,
    /// The VXLAN collect-metadata device: created if missing; cw_from_overlay at its ingress.
    pub vxlan_device: String,
    /// The external interface of a gateway node: cw_snat_out at its egress, cw_snat_in at its ingress.
    pub external_interface: Option<String>,
    /// The WireGuard interface: cw_from_remote at its ingress (if it exists when installing).
    pub wireguard_interface: Option<String>,
    /// Whether cw_from_remote drops what the identity policy does not allow.
    pub enforce_policy: bool,
}

/// The loaded and attached programs. Dropping this leaves everything attached (the links are pinned).
pub struct Installed {
    pub programs: BpfPrograms,
    /// The SNAT object, on gateways.
    pub snat: Option<Ebpf>,
    pub vxlan_ifindex: u32,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed").field("pin_dir", &self.pin_dir).field("vxlan_ifindex", &self.vxlan_ifindex).finish()
    }
}

/// Loads the programs, creates the VXLAN device, writes the node config and attaches everything configured.
pub fn install(opts: &InstallOptions) -> Result<Installed, KernelError> {
    let span = tracing::info_span!("datapath_install", pin_dir = %opts.pin_dir.display());
    let _e = span.enter();
    let mut programs = BpfLoader::new(&opts.pin_dir).load()?;
    let vxlan_ifindex = ensure_vxlan(&opts.vxlan_device)?;
    ConfigMap::open(&opts.pin_dir)?.set(NodeConfig {
        node_ipv4: opts.node_ipv4,
        vxlan_ifindex,
        enforce_policy: opts.enforce_policy,
    })?;
    programs.attach(Hook::FromOverlay, &opts.vxlan_device)?;
    for ifname in &opts.pod_interfaces {
        programs.attach(Hook::FromPod, ifname)?;
    }
    if let Some(wg) = &opts.wireguard_interface {
        programs.attach(Hook::FromRemote, wg)?;
    }
    let snat = match &opts.external_interface {
        Some(ext) => {
            let mut obj = load_snat(&opts.pin_dir)?;
            attach_pinned(&mut obj, snat::PROG_OUT, ext, TcAttachType::Egress, &opts.pin_dir)?;
            attach_pinned(&mut obj, snat::PROG_IN, ext, TcAttachType::Ingress, &opts.pin_dir)?;
            Some(obj)
        }
        None => None,
    };
    let mut installed = Installed { programs, snat, vxlan_ifindex, pin_dir: opts.pin_dir.clone() };
    if let Some(prefix) = &opts.pod_prefix {
        installed.attach_pods_by_prefix(prefix)?;
    }
    info!(vxlan = %opts.vxlan_device, vxlan_ifindex, "datapath programs installed");
    Ok(installed)
}

impl Installed {
    /// Attaches cw_from_pod to every interface named `<prefix>…` that does not have it yet; returns the newly
    /// attached ones. The agent calls this periodically, so pods created later get the program.
    pub fn attach_pods_by_prefix(&mut self, prefix: &str) -> Result<Vec<String>, KernelError> {
        let mut added = Vec::new();
        for ifname in interfaces()?.into_iter().filter(|n| n.starts_with(prefix)) {
            if crate::bpf::loader::is_attached(&self.pin_dir, Hook::FromPod, &ifname) {
                continue;
            }
            self.programs.attach(Hook::FromPod, &ifname)?;
            added.push(ifname);
        }
        Ok(added)
    }
}

/// The pin of a TCX link of the SNAT object: `<program>@<ifname>` (each program has one direction; bpffs refuses
/// names with a dot).
fn link_pin(pin_dir: &Path, prog: &str, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{prog}@{ifname}"))
}

/// Whether both SNAT programs are attached to `ifname` through their pinned links and the interface exists: what the
/// health probe reports as "gateway ready".
pub fn snat_attached(pin_dir: &Path, ifname: &str) -> bool {
    [snat::PROG_OUT, snat::PROG_IN].iter().all(|p| link_pin(pin_dir, p, ifname).exists()) && ifindex(ifname).is_ok()
}

fn load_snat(pin_dir: &Path) -> Result<Ebpf, KernelError> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    let mut obj = loader.load(snat::OBJECT).map_err(|e| BpfError::Load { object: "snat", source: Box::new(e) })?;
    for name in [snat::PROG_OUT, snat::PROG_IN] {
        classifier(&mut obj, name)?.load().map_err(|e| BpfError::Program { program: name, source: Box::new(e) })?;
    }
    Ok(obj)
}

fn classifier<'a>(obj: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, KernelError> {
    Ok(obj
        .program_mut(name)
        .ok_or_else(|| KernelError::Invalid(format!("program {name} missing from its object")))?
        .try_into()
        .map_err(|e| BpfError::Program { program: name, source: Box::new(e) })?)
}

/// Attaches with a pinned TCX link, or swaps the program into the existing pinned link (restart: no gap).
fn attach_pinned(
    obj: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    at: TcAttachType,
    pin_dir: &Path,
) -> Result<(), KernelError> {
    let err = |reason: String| BpfError::Attach { program: name, ifname: ifname.to_owned(), reason };
    let pin = link_pin(pin_dir, name, ifname);
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    }
    let prog = classifier(obj, name)?;
    let existing = if pin.exists() {
        Some(PinnedLink::from_pin(&pin).map_err(|e| err(format!("opening pinned link {}: {e:?}", pin.display())))?)
    } else {
        None
    };
    match existing {
        Some(existing) => {
            let link = SchedClassifierLink::try_from(FdLink::from(existing))
                .map_err(|e| err(format!("pinned link {}: {e}", pin.display())))?;
            let id = prog.attach_to_link(link).map_err(|e| err(e.to_string()))?;
            let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
            drop(FdLink::try_from(link).map_err(|e| err(e.to_string()))?);
            debug!(program = name, ifname, "replaced program in pinned TCX link");
        }
        None => {
            let id = prog
                .attach_with_options(ifname, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| err(e.to_string()))?;
            let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
            let fd_link = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
            fd_link.pin(&pin).map_err(|e| err(format!("pinning link at {}: {e}", pin.display())))?;
            debug!(program = name, ifname, "attached with a pinned TCX link");
        }
    }
    Ok(())
}

/// Creates the VXLAN collect-metadata device (`external`: the tunnel key comes from each packet's metadata) if it
/// does not exist, brings it up, and returns its ifindex.
pub fn ensure_vxlan(name: &str) -> Result<u32, KernelError> {
    if ifindex(name).is_err() {
        ip(&["link", "add", name, "type", "vxlan", "external", "dstport", &VXLAN_PORT.to_string()])?;
        info!(device = name, "created VXLAN collect-metadata device");
    }
    ip(&["link", "set", name, "up"])?;
    ifindex(name)
}

/// Deletes an interface (e.g. the VXLAN device on uninstall).
pub fn delete_link(name: &str) -> Result<(), KernelError> {
    ip(&["link", "del", name]).map(drop)
}

/// The ifindex of `name` in the calling thread's namespace (sysfs would show the mount's namespace instead).
pub fn ifindex(name: &str) -> Result<u32, KernelError> {
    let out = ip(&["-o", "link", "show", "dev", name])?;
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| KernelError::Invalid(format!("cannot parse the ifindex of {name} from `{}`", out.trim())))
}

/// Interface names in the calling thread's namespace.
pub fn interfaces() -> Result<Vec<String>, KernelError> {
    let out = ip(&["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| !n.is_empty())
        .collect())
}

/// Removes the SNAT object's links (the agent's uninstall path; `bpf::loader::uninstall` removes the rest).
pub fn detach_snat(pin_dir: &Path, ifname: &str) -> Result<(), KernelError> {
    for name in [snat::PROG_OUT, snat::PROG_IN] {
        let pin = link_pin(pin_dir, name, ifname);
        match PinnedLink::from_pin(&pin) {
            Ok(l) => {
                l.unpin().map_err(|source| BpfError::Io { context: format!("unpinning {}", pin.display()), source })?;
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(KernelError::Invalid(format!("pinned link {}: {e}", pin.display()))),
        }
    }
    Ok(())
}

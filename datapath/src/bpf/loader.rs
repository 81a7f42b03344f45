//! Loading, attaching and detaching.
//!
//! - Maps are pinned by name (`LIBBPF_PIN_BY_NAME` in the C) under the pin directory; loading again with the
//!   same directory reuses them, contents included, which is what lets the agent restart without a blank
//!   datapath.
//! - On kernels with TCX (>= 6.6) each attachment is a BPF link pinned at `<pin dir>/links/<hook>@<ifname>`: it
//!   outlives the agent process, and a restarted agent swaps its freshly loaded program into the same link
//!   atomically (no window without a program). Older kernels get a clsact netlink filter, which also outlives
//!   the process.
//! - [`detach`] removes one of our attachments; [`uninstall`] removes all of them and the pinned maps.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use super::{objects, BpfError};

/// Where the agent pins its maps and links.
pub const PRODUCTION_PIN_DIR: &str = "/sys/fs/bpf/causeway";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const LINKS_SUBDIR: &str = "links";

/// A classifier and the device it belongs on. All run at TC ingress of their device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `cw_from_pod`: host side of a pod's veth.
    FromPod,
    /// `cw_from_overlay`: the VXLAN collect-metadata device (gateway nodes).
    FromOverlay,
    /// `cw_from_remote`: the WireGuard TUN device (L3, IP header at offset 0).
    FromRemote,
    /// `cw_from_remote_eth`: an Ethernet device carrying remote-cluster traffic (e.g. VXLAN).
    FromRemoteEth,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::FromPod, Hook::FromOverlay, Hook::FromRemote, Hook::FromRemoteEth];

    /// The C function (and aya program) name.
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::FromPod => "cw_from_pod",
            Hook::FromOverlay => "cw_from_overlay",
            Hook::FromRemote => "cw_from_remote",
            Hook::FromRemoteEth => "cw_from_remote_eth",
        }
    }

    fn is_steering(self) -> bool {
        matches!(self, Hook::FromPod | Hook::FromOverlay)
    }

    fn link_file(self, ifname: &str) -> String {
        format!("{}@{ifname}", self.program_name())
    }
}

/// Loader options: the pin directory and map size overrides.
#[derive(Clone, Debug)]
pub struct BpfLoader {
    pin_dir: PathBuf,
    max_entries: Vec<(&'static str, u32)>,
}

impl BpfLoader {
    /// Pin under `pin_dir`, which must be inside a bpffs (tests use a unique directory under /sys/fs/bpf).
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self { pin_dir: pin_dir.into(), max_entries: Vec::new() }
    }

    /// The agent's loader: `/sys/fs/bpf/causeway`.
    pub fn production() -> Self {
        Self::new(PRODUCTION_PIN_DIR)
    }

    /// Override a map's capacity (before the map is first created; a pinned map keeps its size).
    pub fn max_entries(mut self, map: &'static str, entries: u32) -> Self {
        self.max_entries.push((map, entries));
        self
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Mount the bpffs if needed, create the pin directory, load both objects (creating or reusing the pinned
    /// maps) and load their programs into the kernel. Nothing is attached yet.
    pub fn load(&self) -> Result<BpfPrograms, BpfError> {
        ensure_bpffs()?;
        fs::create_dir_all(self.pin_dir.join(LINKS_SUBDIR))
            .map_err(|source| BpfError::Io { context: format!("creating {}", self.pin_dir.display()), source })?;
        let steering = self.load_object("steering", objects::STEERING)?;
        let policy = self.load_object("policy", objects::POLICY)?;
        let mut progs = BpfPrograms { steering, policy, pin_dir: self.pin_dir.clone() };
        for hook in Hook::ALL {
            progs
                .classifier_mut(hook)?
                .load()
                .map_err(|e| BpfError::Program { program: hook.program_name(), source: Box::new(e) })?;
        }
        info!(pin_dir = %self.pin_dir.display(), "BPF programs loaded");
        Ok(progs)
    }

    fn load_object(&self, object: &'static str, bytes: &[u8]) -> Result<Ebpf, BpfError> {
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&self.pin_dir);
        for (name, n) in &self.max_entries {
            loader.map_max_entries(name, *n);
        }
        loader.load(bytes).map_err(|e| BpfError::Load { object, source: Box::new(e) })
    }
}

/// The loaded programs. Dropping this does not detach anything that was attached (links are pinned).
pub struct BpfPrograms {
    steering: Ebpf,
    policy: Ebpf,
    pin_dir: PathBuf,
}

impl BpfPrograms {
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The loaded classifier of a hook, e.g. for `TestRun`.
    pub fn classifier(&self, hook: Hook) -> Result<&SchedClassifier, BpfError> {
        let obj = if hook.is_steering() { &self.steering } else { &self.policy };
        let name = hook.program_name();
        obj.program(name)
            .ok_or_else(|| BpfError::Invalid(format!("program {name} missing from its object")))?
            .try_into()
            .map_err(|e| BpfError::Program { program: name, source: Box::new(e) })
    }

    pub fn classifier_mut(&mut self, hook: Hook) -> Result<&mut SchedClassifier, BpfError> {
        let obj = if hook.is_steering() { &mut self.steering } else { &mut self.policy };
        let name = hook.program_name();
        obj.program_mut(name)
            .ok_or_else(|| BpfError::Invalid(format!("program {name} missing from its object")))?
            .try_into()
            .map_err(|e| BpfError::Program { program: name, source: Box::new(e) })
    }

    /// Attach `hook`'s program at TC ingress of `ifname`, replacing our previous program there if any (atomically
    /// on TCX kernels). Idempotent.
    pub fn attach(&mut self, hook: Hook, ifname: &str) -> Result<(), BpfError> {
        let program = hook.program_name();
        let attach_err = |reason: String| BpfError::Attach { program, ifname: ifname.to_owned(), reason };
        if !tcx_supported() {
            return self.attach_netlink(hook, ifname);
        }
        let pin = self.pin_dir.join(LINKS_SUBDIR).join(hook.link_file(ifname));
        let prog = self.classifier_mut(hook)?;
        match PinnedLink::from_pin(&pin) {
            Ok(existing) => {
                // Restart path: same link, new program, no gap.
                let link = SchedClassifierLink::try_from(FdLink::from(existing))
                    .map_err(|e| attach_err(format!("pinned link {}: {e}", pin.display())))?;
                let id = prog.attach_to_link(link).map_err(|e| attach_err(e.to_string()))?;
                // Keep the link attached when `prog` is dropped: the pin holds it.
                let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                std::mem::drop(FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?);
                debug!(program, ifname, "replaced program in pinned TCX link");
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                let id = prog
                    .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(|e| attach_err(e.to_string()))?;
                let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning link at {}: {e}", pin.display())))?;
                debug!(program, ifname, "attached with a pinned TCX link");
            }
            Err(e) => return Err(attach_err(format!("opening pinned link {}: {e}", pin.display()))),
        }
        Ok(())
    }

    fn attach_netlink(&mut self, hook: Hook, ifname: &str) -> Result<(), BpfError> {
        let program = hook.program_name();
        let attach_err = |reason: String| BpfError::Attach { program, ifname: ifname.to_owned(), reason };
        add_clsact(ifname).map_err(|e| attach_err(e.to_string()))?;
        // Replace, not stack: remove our previous filter first.
        let _ = tc::qdisc_detach_program(ifname, TcAttachType::Ingress, program);
        let prog = self.classifier_mut(hook)?;
        let id = prog
            .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
            .map_err(|e| attach_err(e.to_string()))?;
        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        // A netlink filter lives in the qdisc; dropping the link object would detach it.
        std::mem::forget(link);
        Ok(())
    }
}

/// Whether `hook`'s program is attached (by us) to `ifname`, as far as the pin directory tells.
pub fn is_attached(pin_dir: &Path, hook: Hook, ifname: &str) -> bool {
    pin_dir.join(LINKS_SUBDIR).join(hook.link_file(ifname)).exists()
}

/// Remove `hook`'s program from `ifname`. `Ok(false)` if it was not attached.
pub fn detach(pin_dir: &Path, hook: Hook, ifname: &str) -> Result<bool, BpfError> {
    let program = hook.program_name();
    if !tcx_supported() {
        return match tc::qdisc_detach_program(ifname, TcAttachType::Ingress, program) {
            Ok(()) => Ok(true),
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BpfError::Attach { program, ifname: ifname.to_owned(), reason: format!("detach: {e}") }),
        };
    }
    unpin_link(&pin_dir.join(LINKS_SUBDIR).join(hook.link_file(ifname)))
}

fn unpin_link(path: &Path) -> Result<bool, BpfError> {
    match PinnedLink::from_pin(path) {
        // Unpinning drops the last reference once the returned fd closes: the kernel detaches the program.
        Ok(link) => link
            .unpin()
            .map(|_fd| true)
            .map_err(|source| BpfError::Io { context: format!("unpinning {}", path.display()), source }),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BpfError::Invalid(format!("pinned link {}: {e}", path.display()))),
    }
}

/// Full uninstall: detach every program we attached (pinned links) and remove the pinned maps and the pin
/// directory. Maps shared with the SNAT object are removed too: nothing of Causeway's datapath stays behind.
pub fn uninstall(pin_dir: &Path) -> Result<(), BpfError> {
    let io_err = |context: String| move |source| BpfError::Io { context, source };
    let links = pin_dir.join(LINKS_SUBDIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            unpin_link(&e.path())?;
        }
        fs::remove_dir(&links).map_err(io_err(format!("removing {}", links.display())))?;
    }
    match fs::read_dir(pin_dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    warn!(path = %p.display(), "unexpected directory in the pin dir, left in place");
                    continue;
                }
                fs::remove_file(&p).map_err(io_err(format!("unpinning {}", p.display())))?;
            }
            fs::remove_dir(pin_dir).map_err(io_err(format!("removing {}", pin_dir.display())))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("reading {}", pin_dir.display()))(e)),
    }
    info!(pin_dir = %pin_dir.display(), "BPF datapath uninstalled");
    Ok(())
}

fn tcx_supported() -> bool {
    KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0)).unwrap_or(false)
}

/// Add the clsact qdisc; an existing one is fine.
fn add_clsact(ifname: &str) -> Result<(), tc::TcError> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(17 /* EEXIST */) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Mount the bpffs at /sys/fs/bpf unless it is there (fresh machines and some containers lack it).
pub fn ensure_bpffs() -> Result<(), BpfError> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|source| BpfError::Io { context: "reading /proc/self/mounts".into(), source })?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, target, fstype) = (f.next(), f.next(), f.next());
        target == Some(BPFFS_ROOT) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS_ROOT])
        .output()
        .map_err(|source| BpfError::Io { context: "running mount -t bpf".into(), source })?;
    if !out.status.success() {
        return Err(BpfError::Bpffs {
            path: BPFFS_ROOT.into(),
            reason: format!("mount -t bpf failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

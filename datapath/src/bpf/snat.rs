//! SNAT with conntrack on the egress gateway: the loader of `bpf/snat.bpf.c`, typed mirrors of its maps, a
//! table view for listing flows and counting port use, and the garbage collector.
//!
//! Where it sits: the source node marks a pod's egress packet `CW_MARK_EGRESS | group` and steers it to the
//! gateway; on the gateway's external interface `cw_snat_out` (TC egress) rewrites the source to the group's
//! egress IP and a port allocated per (egress IP, destination IP, destination port, protocol), and
//! `cw_snat_in` (TC ingress) rewrites replies back to the pod, after which the kernel routes them to the
//! pod's node. The agent loads this, writes the port range ([`SnatConfig`]), and runs [`Snat::gc`]
//! periodically; the expiry decision is the pure [`expiry`] module, on the agent's [`GcPolicy`] timeouts.
//!
//! Decisions (see the C file for the datapath side):
//! - Marked packets that cannot be translated are dropped and counted (`cw_drops`): a marked group with no
//!   entry in `cw_egress_groups` or of the other family (`SNAT_NO_STATE`), no free port after the bounded
//!   probe (`SNAT_PORTS_EXHAUSTED`), a later IP fragment or a protocol other than TCP/UDP/ICMP echo
//!   (`UNSUPPORTED_L4`). A pod address never leaves the gateway untranslated.
//! - Packets arriving for an egress address with no mapping are passed unchanged (the egress address may be
//!   the node's own) and counted in `cw_snat_stats[IN_NO_STATE]`.
//!
//! Known gaps:
//! - IP fragments: only first fragments are translated. Later fragments of marked flows are dropped; inbound
//!   later fragments pass untranslated, so fragmented replies do not reach the pod.
//! - ICMP errors quoting a translated packet are reverse-translated (outer destination, quoted source address
//!   and port, with the outer/quoted IPv4 and ICMP checksums fixed), but the quoted transport checksum is left
//!   as it was; Linux does not verify it when it matches the error to a socket.
//! - The maps are LRU: under memory pressure an active flow's entry may be evicted. The egress program
//!   re-allocates when it finds its reverse entry gone (`cw_snat_stats[OUT_REPAIRED]`), which may change the
//!   flow's translated port.

pub mod expiry;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::agent::gc::GcPolicy;

pub use expiry::GcPlan;

/// The compiled object (`build.rs` compiles `bpf/snat.bpf.c`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/snat.bpf.o"));

/// Program names in the object.
pub const PROG_OUT: &str = "cw_snat_out";
pub const PROG_IN: &str = "cw_snat_in";
/// Map names in the object (also their pin names).
pub const MAP_FWD: &str = "cw_snat_fwd";
pub const MAP_REV: &str = "cw_snat_rev";
pub const MAP_CONFIG: &str = "cw_snat_config";
pub const MAP_STATS: &str = "cw_snat_stats";
pub const MAP_DROPS: &str = "cw_drops";
pub const MAP_EGRESS_GROUPS: &str = "cw_egress_groups";

/// `family` values (`CW_AF_INET`, `CW_AF_INET6`).
pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// TCP state bits per direction (`CW_SNAT_TCP_*`).
pub const TCP_SYN: u8 = 0x01;
pub const TCP_EST: u8 = 0x02;
pub const TCP_FIN: u8 = 0x04;
pub const TCP_RST: u8 = 0x08;

/// `enum cw_drop_reason` indexes that SNAT uses in `cw_drops`.
pub const DROP_MALFORMED: u32 = 0;
pub const DROP_SNAT_PORTS_EXHAUSTED: u32 = 3;
pub const DROP_SNAT_NO_STATE: u32 = 4;
pub const DROP_UNSUPPORTED_L4: u32 = 6;

/// `enum cw_snat_stat`: indexes of `cw_snat_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum SnatStat {
    OutTranslated = 0,
    OutNewFlow = 1,
    InTranslated = 2,
    InNoState = 3,
    InIcmpError = 4,
    OutRepaired = 5,
    RaceLost = 6,
    InUntrackable = 7,
}

impl SnatStat {
    pub const ALL: [SnatStat; 8] = [
        SnatStat::OutTranslated,
        SnatStat::OutNewFlow,
        SnatStat::InTranslated,
        SnatStat::InNoState,
        SnatStat::InIcmpError,
        SnatStat::OutRepaired,
        SnatStat::RaceLost,
        SnatStat::InUntrackable,
    ];

    /// A metric label.
    pub fn name(self) -> &'static str {
        match self {
            SnatStat::OutTranslated => "out_translated",
            SnatStat::OutNewFlow => "out_new_flow",
            SnatStat::InTranslated => "in_translated",
            SnatStat::InNoState => "in_no_state",
            SnatStat::InIcmpError => "in_icmp_error",
            SnatStat::OutRepaired => "out_repaired",
            SnatStat::RaceLost => "race_lost",
            SnatStat::InUntrackable => "in_untrackable",
        }
    }
}

/// `struct cw_snat_key`: one direction of a flow. Ports are in network byte order, as in the packet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SnatKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

// SAFETY: repr(C), only integers and byte arrays, no implicit padding (checked by the layout test).
unsafe impl aya::Pod for SnatKey {}

/// `struct cw_snat_entry`: the address/port a direction rewrites to, and its activity.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnatEntry {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub tcp_state: u8,
    pub pad: u8,
    pub group: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

// SAFETY: as for SnatKey.
unsafe impl aya::Pod for SnatEntry {}

/// `struct cw_snat_config`: the translated port range (host byte order). All zero means the datapath's
/// defaults (32768-65535, 64 probes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnatConfig {
    pub port_min: u16,
    pub port_max: u16,
    pub probes: u32,
    pub seed: u32,
    pub pad: u32,
}

// SAFETY: as for SnatKey.
unsafe impl aya::Pod for SnatConfig {}

/// Converts the datapath's 16-byte address to an `IpAddr` of `family`.
pub fn addr_of(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

/// The datapath's 16-byte form of an address, and its family.
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (b, AF_INET)
        }
        IpAddr::V6(v6) => (v6.octets(), AF_INET6),
    }
}

impl SnatKey {
    pub fn src(&self) -> IpAddr {
        addr_of(self.family, &self.saddr)
    }
    pub fn dst(&self) -> IpAddr {
        addr_of(self.family, &self.daddr)
    }
    pub fn src_port(&self) -> u16 {
        u16::from_be(self.sport)
    }
    pub fn dst_port(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

impl SnatEntry {
    pub fn ip(&self, family: u8) -> IpAddr {
        addr_of(family, &self.addr)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnatError {
    #[error("loading the SNAT object (pin directory {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("program {0} missing from the SNAT object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the SNAT object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("attaching {program} to {ifname}: {reason}")]
    Attach { program: &'static str, ifname: String, reason: String },
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> SnatError {
    move |e| SnatError::Map { name, source: Box::new(e) }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> SnatError {
    move |e| SnatError::Program { name, source: Box::new(e) }
}

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// bpffs directory the maps are pinned in (by name); `/sys/fs/bpf/causeway` in production. Maps already
    /// pinned there are reused, which is what keeps flows alive across an agent restart.
    pub pin_dir: PathBuf,
    /// Capacity of each of the two conntrack maps (default: the object's 262144).
    pub max_flows: Option<u32>,
}

impl LoadOptions {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        LoadOptions { pin_dir: pin_dir.into(), max_flows: None }
    }
}

/// The loaded SNAT programs and their maps.
pub struct Snat {
    ebpf: Ebpf,
    table: SnatTable,
    pin_dir: PathBuf,
}

/// Subdirectory of the pin directory holding pinned TCX links (shared with the steering loader, whose
/// `uninstall` unpins everything there).
pub const LINKS_SUBDIR: &str = "links";

fn link_pin(pin_dir: &Path, program: &str, ifname: &str) -> PathBuf {
    pin_dir.join(LINKS_SUBDIR).join(format!("{program}@{ifname}"))
}

impl std::fmt::Debug for Snat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snat").finish_non_exhaustive()
    }
}

impl Snat {
    /// Loads both programs into the kernel (not attached) with their maps pinned under `opts.pin_dir`.
    pub fn load(opts: &LoadOptions) -> Result<Snat, SnatError> {
        std::fs::create_dir_all(&opts.pin_dir)
            .map_err(|source| SnatError::PinDir { path: opts.pin_dir.clone(), source })?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&opts.pin_dir);
        if let Some(n) = opts.max_flows {
            loader.map_max_entries(MAP_FWD, n);
            loader.map_max_entries(MAP_REV, n);
        }
        let mut ebpf =
            loader.load(OBJECT).map_err(|e| SnatError::Load { pin_dir: opts.pin_dir.clone(), source: Box::new(e) })?;
        for name in [PROG_OUT, PROG_IN] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or(SnatError::MissingProgram(name))?.try_into().map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
        }
        let fwd = take_hash(&mut ebpf, MAP_FWD)?;
        let rev = take_hash(&mut ebpf, MAP_REV)?;
        Ok(Snat { ebpf, table: SnatTable { fwd, rev }, pin_dir: opts.pin_dir.clone() })
    }

    /// Attaches `cw_snat_out` to the egress and `cw_snat_in` to the ingress of `ifname` (TCX), in the calling
    /// thread's network namespace. Detached when this value is dropped or by [`Snat::detach`].
    pub fn attach(&mut self, ifname: &str) -> Result<(), SnatError> {
        for (name, at) in [(PROG_OUT, TcAttachType::Egress), (PROG_IN, TcAttachType::Ingress)] {
            let prog = self.classifier_mut(name)?;
            prog.attach(ifname, at).map_err(prog_err(name))?;
        }
        Ok(())
    }

    /// Attaches both programs to `ifname` (TCX, calling thread's netns) through links pinned under
    /// `<pin_dir>/links/`, so that they stay attached when this process exits. If links are already pinned there
    /// (an agent restart), the new programs replace the old ones inside the same links, atomically: no packet
    /// passes the interface untranslated in between, and the pinned conntrack maps keep every flow.
    pub fn attach_pinned(&mut self, ifname: &str) -> Result<(), SnatError> {
        let dir = self.pin_dir.join(LINKS_SUBDIR);
        std::fs::create_dir_all(&dir).map_err(|source| SnatError::PinDir { path: dir.clone(), source })?;
        for (name, at) in [(PROG_OUT, TcAttachType::Egress), (PROG_IN, TcAttachType::Ingress)] {
            let pin = link_pin(&self.pin_dir, name, ifname);
            let attach_err = |reason: String| SnatError::Attach { program: name, ifname: ifname.to_owned(), reason };
            let prog = self.classifier_mut(name)?;
            match PinnedLink::from_pin(&pin) {
                Ok(existing) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(existing))
                        .map_err(|e| attach_err(format!("pinned link {}: {e}", pin.display())))?;
                    let id = prog.attach_to_link(link).map_err(|e| attach_err(e.to_string()))?;
                    // The pin keeps the link (and now our program) attached after `prog` is dropped.
                    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                    drop(FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?);
                    tracing::debug!(program = name, ifname, "replaced SNAT program in its pinned TCX link");
                }
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                    let id = prog
                        .attach_with_options(ifname, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
                        .map_err(|e| attach_err(e.to_string()))?;
                    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                    fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning link at {}: {e}", pin.display())))?;
                    tracing::debug!(program = name, ifname, "attached SNAT program with a pinned TCX link");
                }
                Err(e) => return Err(attach_err(format!("opening pinned link {}: {e}", pin.display()))),
            }
        }
        Ok(())
    }

    /// Detaches both programs from `ifname` by unpinning the links [`Snat::attach_pinned`] made. Returns whether
    /// anything was attached. The pinned maps stay (a later attach continues with the same flows).
    pub fn detach_pinned(pin_dir: &Path, ifname: &str) -> Result<bool, SnatError> {
        let mut any = false;
        for name in [PROG_OUT, PROG_IN] {
            let pin = link_pin(pin_dir, name, ifname);
            match PinnedLink::from_pin(&pin) {
                // The kernel detaches the program when the last reference (the returned fd) closes.
                Ok(link) => {
                    link.unpin().map_err(|e| SnatError::Attach {
                        program: name,
                        ifname: ifname.to_owned(),
                        reason: format!("unpinning {}: {e}", pin.display()),
                    })?;
                    any = true;
                }
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SnatError::Attach {
                        program: name,
                        ifname: ifname.to_owned(),
                        reason: format!("pinned link {}: {e}", pin.display()),
                    })
                }
            }
        }
        Ok(any)
    }

    /// Detaches both programs from every interface they were attached to. The pinned maps stay.
    pub fn detach(mut self) -> Result<(), SnatError> {
        for name in [PROG_OUT, PROG_IN] {
            let prog = self.classifier_mut(name)?;
            prog.unload().map_err(prog_err(name))?;
        }
        Ok(())
    }

    /// One of the two programs, for BPF_PROG_TEST_RUN.
    pub fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, SnatError> {
        self.ebpf.program(name).ok_or(SnatError::MissingProgram(name))?.try_into().map_err(prog_err(name))
    }

    fn classifier_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, SnatError> {
        self.ebpf.program_mut(name).ok_or(SnatError::MissingProgram(name))?.try_into().map_err(prog_err(name))
    }

    /// Writes the translated port range.
    pub fn set_config(&mut self, cfg: &SnatConfig) -> Result<(), SnatError> {
        let map = self.ebpf.map_mut(MAP_CONFIG).ok_or(SnatError::MissingMap(MAP_CONFIG))?;
        let mut arr: Array<&mut MapData, SnatConfig> = Array::try_from(map).map_err(map_err(MAP_CONFIG))?;
        arr.set(0, cfg, 0).map_err(map_err(MAP_CONFIG))
    }

    /// The conntrack maps.
    pub fn table(&self) -> &SnatTable {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut SnatTable {
        &mut self.table
    }

    /// `cw_snat_stats` summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<SnatStat, u64>, SnatError> {
        let map = self.ebpf.map(MAP_STATS).ok_or(SnatError::MissingMap(MAP_STATS))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(MAP_STATS))?;
        let mut out = BTreeMap::new();
        for s in SnatStat::ALL {
            let v = arr.get(&(s as u32), 0).map_err(map_err(MAP_STATS))?;
            out.insert(s, v.iter().sum());
        }
        Ok(out)
    }

    /// `cw_drops[reason]` summed over CPUs (shared with the other Causeway programs pinned in the same
    /// directory).
    pub fn drops(&self, reason: u32) -> Result<u64, SnatError> {
        let map = self.ebpf.map(MAP_DROPS).ok_or(SnatError::MissingMap(MAP_DROPS))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(MAP_DROPS))?;
        Ok(arr.get(&reason, 0).map_err(map_err(MAP_DROPS))?.iter().sum())
    }

    /// One GC pass with `now_ns` read from CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`).
    pub fn gc(&mut self, timeouts: &GcPolicy) -> Result<GcReport, SnatError> {
        self.table.gc(monotonic_ns(), timeouts)
    }
}

fn take_hash(ebpf: &mut Ebpf, name: &'static str) -> Result<BpfHashMap<MapData, SnatKey, SnatEntry>, SnatError> {
    let map = ebpf.take_map(name).ok_or(SnatError::MissingMap(name))?;
    BpfHashMap::try_from(map).map_err(map_err(name))
}

/// CLOCK_MONOTONIC in nanoseconds: what `bpf_ktime_get_ns` returns.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC);
    match ts {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; if it ever did, 0 makes every entry look fresh (nothing deleted).
        Err(_) => 0,
    }
}

/// One translated flow, both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub key: SnatKey,
    pub fwd: SnatEntry,
    /// None if the LRU evicted the reverse entry (or it belongs to another flow now).
    pub rev: Option<SnatEntry>,
}

impl Flow {
    pub fn pod(&self) -> (IpAddr, u16) {
        (self.key.src(), self.key.src_port())
    }
    pub fn remote(&self) -> (IpAddr, u16) {
        (self.key.dst(), self.key.dst_port())
    }
    pub fn translated(&self) -> (IpAddr, u16) {
        (self.fwd.ip(self.key.family), self.fwd.port())
    }
}

/// Port use toward one destination: what exhausts is the set of translated ports per
/// (egress IP, destination IP, destination port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortUseKey {
    pub egress: IpAddr,
    pub destination: IpAddr,
    pub destination_port: u16,
    pub proto: u8,
}

/// What a GC pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub flows_deleted: usize,
    pub orphans_deleted: usize,
    pub live: usize,
    /// Entries that were refreshed between the snapshot and the delete, and kept.
    pub revived: usize,
}

/// The two conntrack maps.
pub struct SnatTable {
    fwd: BpfHashMap<MapData, SnatKey, SnatEntry>,
    rev: BpfHashMap<MapData, SnatKey, SnatEntry>,
}

impl std::fmt::Debug for SnatTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnatTable").finish_non_exhaustive()
    }
}

impl SnatTable {
    /// Opens the pinned maps of a running gateway (e.g. for `causeway egress status` or a restarted agent).
    pub fn from_pinned(pin_dir: &Path) -> Result<SnatTable, SnatError> {
        let open = |name: &'static str| -> Result<BpfHashMap<MapData, SnatKey, SnatEntry>, SnatError> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
            let map = Map::from_map_data(data).map_err(map_err(name))?;
            BpfHashMap::try_from(map).map_err(map_err(name))
        };
        Ok(SnatTable { fwd: open(MAP_FWD)?, rev: open(MAP_REV)? })
    }

    /// Snapshot of the forward map. Entries deleted during the walk are skipped.
    pub fn forward_entries(&self) -> Result<Vec<(SnatKey, SnatEntry)>, SnatError> {
        collect(&self.fwd, MAP_FWD)
    }

    /// Snapshot of the reverse map.
    pub fn reverse_entries(&self) -> Result<Vec<(SnatKey, SnatEntry)>, SnatError> {
        collect(&self.rev, MAP_REV)
    }

    /// Every translated flow with its reverse entry (if it still owns one).
    pub fn flows(&self) -> Result<Vec<Flow>, SnatError> {
        let rev: std::collections::HashMap<SnatKey, SnatEntry> = self.reverse_entries()?.into_iter().collect();
        Ok(self
            .forward_entries()?
            .into_iter()
            .map(|(key, fwd)| {
                let rk = expiry::reverse_key(&key, &fwd);
                let rev = rev.get(&rk).filter(|r| expiry::owns(&key, r)).copied();
                Flow { key, fwd, rev }
            })
            .collect())
    }

    /// Translated ports in use per (egress IP, destination IP, destination port, protocol), from the reverse
    /// map (which is the allocation). For the `causeway_snat_ports_in_use` metric and exhaustion alerts.
    pub fn port_use(&self) -> Result<BTreeMap<PortUseKey, usize>, SnatError> {
        let mut out = BTreeMap::new();
        for (k, _) in self.reverse_entries()? {
            let key =
                PortUseKey { egress: k.dst(), destination: k.src(), destination_port: k.src_port(), proto: k.proto };
            *out.entry(key).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// One GC pass at `now_ns`: plan on a snapshot, then delete, re-checking each flow just before deleting it
    /// so that one refreshed meanwhile is kept. Both entries of a flow go together.
    pub fn gc(&mut self, now_ns: u64, timeouts: &GcPolicy) -> Result<GcReport, SnatError> {
        let fwd = self.forward_entries()?;
        let rev = self.reverse_entries()?;
        let plan = expiry::plan(&fwd, &rev, now_ns, timeouts);
        let mut report = GcReport { live: plan.live, ..Default::default() };
        for (fk, rk) in &plan.flows {
            let (Some(fe), Some(re)) = (get(&self.fwd, fk, MAP_FWD)?, get(&self.rev, rk, MAP_REV)?) else {
                // Half gone already: let the next pass judge what is left.
                continue;
            };
            let last = fe.last_seen_ns.max(re.last_seen_ns);
            if !expiry::expired(timeouts, fk.proto, fe.tcp_state | re.tcp_state, last, now_ns) {
                report.revived += 1;
                continue;
            }
            // Reverse first: once it is gone no reply is translated, and the datapath re-creates both entries
            // if the pod sends again.
            remove(&mut self.rev, rk, MAP_REV)?;
            remove(&mut self.fwd, fk, MAP_FWD)?;
            report.flows_deleted += 1;
        }
        for fk in &plan.orphan_fwd {
            match get(&self.fwd, fk, MAP_FWD)? {
                Some(fe) if expiry::expired(timeouts, fk.proto, fe.tcp_state, fe.last_seen_ns, now_ns) => {
                    remove(&mut self.fwd, fk, MAP_FWD)?;
                    report.orphans_deleted += 1;
                }
                Some(_) => report.revived += 1,
                None => {}
            }
        }
        for rk in &plan.orphan_rev {
            match get(&self.rev, rk, MAP_REV)? {
                Some(re) if expiry::expired(timeouts, rk.proto, re.tcp_state, re.last_seen_ns, now_ns) => {
                    remove(&mut self.rev, rk, MAP_REV)?;
                    report.orphans_deleted += 1;
                }
                Some(_) => report.revived += 1,
                None => {}
            }
        }
        tracing::debug!(
            flows_deleted = report.flows_deleted,
            orphans_deleted = report.orphans_deleted,
            live = report.live,
            revived = report.revived,
            "snat gc pass"
        );
        Ok(report)
    }
}

fn collect(
    map: &BpfHashMap<MapData, SnatKey, SnatEntry>,
    name: &'static str,
) -> Result<Vec<(SnatKey, SnatEntry)>, SnatError> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            // The datapath or the LRU deleted the key between get_next_key and lookup.
            Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(out)
}

fn get(
    map: &BpfHashMap<MapData, SnatKey, SnatEntry>,
    key: &SnatKey,
    name: &'static str,
) -> Result<Option<SnatEntry>, SnatError> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(None),
        Err(e) => Err(map_err(name)(e)),
    }
}

fn remove(
    map: &mut BpfHashMap<MapData, SnatKey, SnatEntry>,
    key: &SnatKey,
    name: &'static str,
) -> Result<(), SnatError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(e) => Err(map_err(name)(e)),
    }
}

#[cfg(test)]
mod layout;

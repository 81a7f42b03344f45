//! The eBPF side of the datapath: the compiled C objects, a loader that pins their maps under the bpffs and
//! attaches the classifiers, and typed handles on every map.
//!
//! ```text
//! pod veth (host side, TC ingress) ── cw_from_pod ──► mark CW_MARK_EGRESS|group ──► local SNAT, or
//!                                                     set_tunnel_key(VNI = group) + redirect ─► VXLAN
//! VXLAN device (TC ingress, gateway) ── cw_from_overlay ──► mark restored from the VNI ──► routed to SNAT
//! WireGuard TUN (TC ingress) ── cw_from_remote ──► remote identity (ipcache) ──► identity policy
//! ```
//!
//! Maps are pinned by name under [`PRODUCTION_PIN_DIR`], so a restarted agent finds them with their contents and
//! the attached programs (TCX links, pinned too) keep forwarding meanwhile. See docs/datapath.md.

pub mod loader;
pub mod maps;
pub mod snat;
pub mod types;

pub use loader::{BpfLoader, BpfPrograms, Hook, PRODUCTION_PIN_DIR};
pub use maps::BpfMaps;

/// The compiled objects, embedded at build time (build.rs compiles `bpf/*.bpf.c`).
pub mod objects {
    /// `cw_from_pod`, `cw_from_overlay`.
    pub static STEERING: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steering.bpf.o"));
    /// `cw_from_remote` (L3 devices), `cw_from_remote_eth` (Ethernet devices).
    pub static POLICY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));
    /// Benchmark only: a Cilium-style {saddr, daddr} LPM egress lookup (bench/src/bin/egress-lookup.rs).
    pub static BENCH_BASELINE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench_baseline.bpf.o"));
    /// Tests only: sets a tunnel key and tail-calls a program, standing in for VXLAN decap under TestRun.
    pub static TEST_PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/test_probe.bpf.o"));
}

/// Errors of loading, attaching and map access.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: String, reason: String },
    #[error("loading BPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("BPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching {program} to {ifname}: {reason}")]
    Attach { program: &'static str, ifname: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

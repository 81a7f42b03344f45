//! `#[repr(C)]` mirrors of the C map keys and values in `bpf/include/maps.h` and `egress_group.h`, with
//! conversions from `std::net` / `ipnet` types. `tests/bpf_layout.rs` compares every struct here against the
//! BTF of the compiled objects (size and field offsets), so a change on one side alone fails the build's tests.
//!
//! LPM keys are split the way aya's `LpmTrie` wants them: aya's `Key<K>` carries the `prefixlen` word, and the
//! `*KeyData` structs here are the rest of the C key (the C offsets are the Rust ones plus 4).
//!
//! Addresses are 16 bytes in network order, IPv4 in the first 4 bytes and zeroes after, as in `causeway.h`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// `CW_AF_INET` / `CW_AF_INET6`: the family byte of every key (not the kernel's AF_* values).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `CW_IDENTITY_WORLD`: the identity of any address the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;
/// `CW_MARK_EGRESS` and friends (egress_group.h): the packet mark contract between steering and SNAT.
pub const MARK_EGRESS: u32 = 0xce00_0000;
pub const MARK_MASK: u32 = 0xff00_0000;
pub const GROUP_ID_MASK: u32 = 0x00ff_ffff;
/// `CW_MAX_GATEWAYS`: gateways per egress group.
pub const MAX_GATEWAYS: usize = 8;
/// `CW_IPCACHE_FIXED_BITS`: ipcache key bits before the address, always matched.
pub const IPCACHE_FIXED_BITS: u32 = 32;

/// `CW_CFG_ENFORCE_POLICY`.
pub const CFG_ENFORCE_POLICY: u32 = 0x1;
/// `CW_IPCACHE_F_*`.
pub const IPCACHE_F_NODE: u16 = 0x1;
pub const IPCACHE_F_REMOTE_CLUSTER: u16 = 0x2;
/// `CW_EGRESS_F_EXCLUDED`.
pub const EGRESS_F_EXCLUDED: u32 = 0x1;
/// `CW_DIR_*`, `CW_VERDICT_*`.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// The family byte and 16-byte form of an address.
pub fn addr16(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

/// The address back from a family byte and 16 bytes; `None` for an unknown family.
pub fn ip_from16(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

/// `struct cw_config` (array `cw_config`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    pub node_ipv4: [u8; 4],
    pub vxlan_ifindex: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `struct cw_ipcache_key` minus `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKeyData {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

impl IpcacheKeyData {
    /// The aya LPM key for a prefix: the family bits are always matched.
    pub fn lpm_key(net: IpNet) -> aya::maps::lpm_trie::Key<Self> {
        let (family, addr) = addr16(net.network());
        aya::maps::lpm_trie::Key::new(
            IPCACHE_FIXED_BITS + u32::from(net.prefix_len()),
            Self { family, pad: [0; 3], addr },
        )
    }
}

/// `struct cw_ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub cluster_id: u16,
    pub flags: u16,
    pub tunnel_endpoint: [u8; 4],
}

/// `struct cw_egress_src_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressSrcKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

impl From<IpAddr> for EgressSrcKey {
    fn from(ip: IpAddr) -> Self {
        let (family, addr) = addr16(ip);
        Self { family, pad: [0; 3], addr }
    }
}

/// `struct cw_egress_policy_key`: the destination masked to `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressPolicyKey {
    pub class_id: u32,
    pub family: u8,
    pub prefixlen: u8,
    pub pad: [u8; 2],
    pub addr: [u8; 16],
}

impl EgressPolicyKey {
    pub fn new(class_id: u32, net: IpNet) -> Self {
        let net = net.trunc();
        let (family, addr) = addr16(net.network());
        Self { class_id, family, prefixlen: net.prefix_len(), pad: [0; 2], addr }
    }
}

/// `CW_MAX_PLENS`.
pub const MAX_PLENS: usize = 129;

/// `struct cw_egress_plens`: prefix lengths in use for one family, longest first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPlens {
    pub n: u8,
    pub pad: [u8; 3],
    pub len: [u8; 132],
}

impl Default for EgressPlens {
    fn default() -> Self {
        Self { n: 0, pad: [0; 3], len: [0; 132] }
    }
}

impl EgressPlens {
    /// From any set of lengths: sorted longest first, deduplicated, at most `MAX_PLENS`.
    pub fn from_lengths(lengths: impl IntoIterator<Item = u8>) -> Self {
        let mut v: Vec<u8> = lengths.into_iter().filter(|&l| l <= 128).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.dedup();
        v.truncate(MAX_PLENS);
        let mut out = Self::default();
        out.len[..v.len()].copy_from_slice(&v);
        out.n = v.len() as u8;
        out
    }

    pub fn lengths(&self) -> &[u8] {
        &self.len[..usize::from(self.n).min(MAX_PLENS)]
    }
}

/// `struct cw_egress_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicyValue {
    pub group_id: u32,
    pub flags: u32,
}

/// `struct cw_egress_group` (egress_group.h): the contract with SNAT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressGroupValue {
    pub egress_ip: [u8; 16],
    pub family: u8,
    pub n_gateways: u8,
    pub pad: u16,
    pub gateways: [[u8; 4]; MAX_GATEWAYS],
}

/// `struct cw_egress_ct_key`: ports in network order, 0 for fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressCtKey {
    pub family: u8,
    pub proto: u8,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// `struct cw_egress_ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCtValue {
    pub gateway: [u8; 4],
    pub group_id: u32,
    pub last_seen_ns: u64,
}

/// `struct cw_policy_key`: dport in host order, 0 = any; proto 0 = any.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub identity: u32,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
}

/// `struct cw_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    pub pad: [u8; 3],
}

// SAFETY: all of these are #[repr(C)], Copy, made only of integers and byte arrays laid out without padding
// (checked by tests/bpf_layout.rs), so any byte pattern the kernel hands back is a valid value.
unsafe impl aya::Pod for ConfigValue {}
unsafe impl aya::Pod for IpcacheKeyData {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for EgressSrcKey {}
unsafe impl aya::Pod for EgressPolicyKey {}
unsafe impl aya::Pod for EgressPlens {}
unsafe impl aya::Pod for EgressPolicyValue {}
unsafe impl aya::Pod for EgressGroupValue {}
unsafe impl aya::Pod for EgressCtKey {}
unsafe impl aya::Pod for EgressCtValue {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}

/// One row of the layout contract: a C struct in the BPF objects' BTF and the Rust mirror's size and field
/// offsets. `c_offset_shift` is 4 for LPM key data (the C struct starts with `prefixlen`).
pub struct LayoutSpec {
    pub c_name: &'static str,
    pub rust_size: usize,
    pub c_offset_shift: usize,
    pub fields: &'static [(&'static str, usize)],
}

macro_rules! layout {
    ($c:literal, $ty:ty, $shift:expr, [$($f:ident),* $(,)?]) => {
        LayoutSpec {
            c_name: $c,
            rust_size: std::mem::size_of::<$ty>(),
            c_offset_shift: $shift,
            fields: &[$((stringify!($f), std::mem::offset_of!($ty, $f))),*],
        }
    };
}

/// Every mirrored struct, for the layout test.
pub const LAYOUTS: &[LayoutSpec] = &[
    layout!("cw_config", ConfigValue, 0, [node_ipv4, vxlan_ifindex, flags, pad]),
    layout!("cw_ipcache_key", IpcacheKeyData, 4, [family, pad, addr]),
    layout!("cw_ipcache_value", IpcacheValue, 0, [identity, cluster_id, flags, tunnel_endpoint]),
    layout!("cw_egress_src_key", EgressSrcKey, 0, [family, pad, addr]),
    layout!("cw_egress_policy_key", EgressPolicyKey, 0, [class_id, family, prefixlen, pad, addr]),
    layout!("cw_egress_plens", EgressPlens, 0, [n, pad, len]),
    layout!("cw_egress_policy_value", EgressPolicyValue, 0, [group_id, flags]),
    layout!("cw_egress_group", EgressGroupValue, 0, [egress_ip, family, n_gateways, pad, gateways]),
    layout!("cw_egress_ct_key", EgressCtKey, 0, [family, proto, sport, dport, pad, saddr, daddr]),
    layout!("cw_egress_ct_value", EgressCtValue, 0, [gateway, group_id, last_seen_ns]),
    layout!("cw_policy_key", PolicyKey, 0, [identity, dport, proto, direction]),
    layout!("cw_policy_value", PolicyValue, 0, [verdict, pad]),
];

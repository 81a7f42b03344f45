//! The Rust mirrors of the C structs must have the same layout as what clang compiled: read the struct
//! definitions (size, member names and offsets) from the BTF in the embedded object and compare.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use object::{Object, ObjectSection};

use super::{SnatConfig, SnatEntry, SnatKey, OBJECT};

/// name -> (size, [(member, byte offset)])
type Structs = HashMap<String, (u32, Vec<(String, u32)>)>;

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

/// A minimal reader of the BTF type section: enough to list structs with their members.
fn btf_structs(obj: &[u8]) -> Structs {
    let file = object::File::parse(obj).expect("snat.bpf.o is an ELF object");
    let section = file.section_by_name(".BTF").expect("object carries BTF (built with -g)");
    let btf = section.data().expect("BTF section data");
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic (little endian)");
    let hdr_len = u32_at(btf, 4) as usize;
    let type_off = hdr_len + u32_at(btf, 8) as usize;
    let type_len = u32_at(btf, 12) as usize;
    let str_off = hdr_len + u32_at(btf, 16) as usize;
    let name = |off: u32| -> String {
        let s = &btf[str_off + off as usize..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    let mut out = Structs::new();
    let mut p = type_off;
    while p < type_off + type_len {
        let name_off = u32_at(btf, p);
        let info = u32_at(btf, p + 4);
        let size = u32_at(btf, p + 8);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kflag = info >> 31;
        p += 12;
        match kind {
            // STRUCT: members of 12 bytes (name, type, offset in bits; with kflag the low 24 bits)
            4 => {
                let mut members = Vec::new();
                for i in 0..vlen {
                    let m = p + i * 12;
                    let raw = u32_at(btf, m + 8);
                    let bits = if kflag == 1 { raw & 0x00ff_ffff } else { raw };
                    members.push((name(u32_at(btf, m)), bits / 8));
                }
                out.insert(name(name_off), (size, members));
                p += vlen * 12;
            }
            5 | 15 | 19 => p += vlen * 12, // UNION, DATASEC, ENUM64
            6 | 13 => p += vlen * 8,       // ENUM, FUNC_PROTO
            1 | 14 | 17 => p += 4,         // INT, VAR, DECL_TAG
            3 => p += 12,                  // ARRAY
            _ => {}                        // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        }
    }
    out
}

fn check(structs: &Structs, c_name: &str, rust_size: usize, rust_members: &[(&str, usize)]) {
    let (size, members) = structs.get(c_name).unwrap_or_else(|| panic!("struct {c_name} not in the object's BTF"));
    assert_eq!(*size as usize, rust_size, "sizeof(struct {c_name})");
    let c: Vec<(&str, usize)> = members.iter().map(|(n, o)| (n.as_str(), *o as usize)).collect();
    assert_eq!(c, rust_members, "members and offsets of struct {c_name}");
}

#[test]
fn rust_structs_match_the_c_layout() {
    let s = btf_structs(OBJECT);
    check(
        &s,
        "cw_snat_key",
        size_of::<SnatKey>(),
        &[
            ("saddr", offset_of!(SnatKey, saddr)),
            ("daddr", offset_of!(SnatKey, daddr)),
            ("sport", offset_of!(SnatKey, sport)),
            ("dport", offset_of!(SnatKey, dport)),
            ("proto", offset_of!(SnatKey, proto)),
            ("family", offset_of!(SnatKey, family)),
            ("pad", offset_of!(SnatKey, pad)),
        ],
    );
    check(
        &s,
        "cw_snat_entry",
        size_of::<SnatEntry>(),
        &[
            ("addr", offset_of!(SnatEntry, addr)),
            ("port", offset_of!(SnatEntry, port)),
            ("tcp_state", offset_of!(SnatEntry, tcp_state)),
            ("pad", offset_of!(SnatEntry, pad)),
            ("group", offset_of!(SnatEntry, group)),
            ("created_ns", offset_of!(SnatEntry, created_ns)),
            ("last_seen_ns", offset_of!(SnatEntry, last_seen_ns)),
        ],
    );
    check(
        &s,
        "cw_snat_config",
        size_of::<SnatConfig>(),
        &[
            ("port_min", offset_of!(SnatConfig, port_min)),
            ("port_max", offset_of!(SnatConfig, port_max)),
            ("probes", offset_of!(SnatConfig, probes)),
            ("seed", offset_of!(SnatConfig, seed)),
            ("pad", offset_of!(SnatConfig, pad)),
        ],
    );
}

#[test]
fn enum_values_match_the_c_header() {
    // The constants are restated in Rust; compare them with the header text so a renumbering fails here.
    let header = include_str!("../../../bpf/include/snat.h");
    let causeway = include_str!("../../../bpf/include/causeway.h");
    let value = |text: &str, name: &str| -> u32 {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().any(|w| w.trim_end_matches(',') == name))
            .unwrap_or_else(|| panic!("{name} not found"));
        let v = line
            .split(['=', ' ', '\t', ','])
            .filter(|w| !w.is_empty())
            .skip_while(|w| *w != name)
            .nth(1)
            .unwrap_or_else(|| panic!("no value for {name}"));
        match v.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).expect("hex"),
            None => v.parse().expect("decimal"),
        }
    };
    for s in super::SnatStat::ALL {
        let c_name = format!("CW_SNAT_STAT_{}", s.name().to_uppercase());
        assert_eq!(value(header, &c_name), s as u32, "{c_name}");
    }
    assert_eq!(value(header, "CW_SNAT_TCP_SYN"), super::TCP_SYN as u32);
    assert_eq!(value(header, "CW_SNAT_TCP_EST"), super::TCP_EST as u32);
    assert_eq!(value(header, "CW_SNAT_TCP_FIN"), super::TCP_FIN as u32);
    assert_eq!(value(header, "CW_SNAT_TCP_RST"), super::TCP_RST as u32);
    assert_eq!(value(causeway, "CW_DROP_MALFORMED"), super::DROP_MALFORMED);
    assert_eq!(value(causeway, "CW_DROP_SNAT_PORTS_EXHAUSTED"), super::DROP_SNAT_PORTS_EXHAUSTED);
    assert_eq!(value(causeway, "CW_DROP_SNAT_NO_STATE"), super::DROP_SNAT_NO_STATE);
    assert_eq!(value(causeway, "CW_DROP_UNSUPPORTED_L4"), super::DROP_UNSUPPORTED_L4);
}

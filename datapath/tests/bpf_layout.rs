//! The Rust mirrors of the map keys and values (`causeway_datapath::bpf::types`) must match what clang
//! compiled: this reads the struct definitions (size, members, member offsets) from the BTF section of the
//! embedded objects and compares them with `size_of` / `offset_of!` of the Rust structs. Any divergence (a field
//! added, moved or resized on one side only) fails here. Needs no privileges.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use causeway_datapath::bpf::objects;
use causeway_datapath::bpf::types::LAYOUTS;
use object::{Object, ObjectSection};

/// struct name -> (size, [(member name, byte offset)])
type Structs = HashMap<String, (usize, Vec<(String, usize)>)>;

fn read_u32(b: &[u8], at: usize) -> Result<u32> {
    let w = b.get(at..at + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

/// Walk the BTF type section (kinds from include/uapi/linux/btf.h) and collect the named structs.
fn btf_structs(elf: &[u8]) -> Result<Structs> {
    let file = object::File::parse(elf)?;
    let btf = file.section_by_name(".BTF").context("no .BTF section (objects are built with -g)")?.data()?;
    if btf.get(..2) != Some(&[0x9f, 0xeb]) {
        bail!("not little-endian BTF");
    }
    let hdr_len = read_u32(btf, 4)? as usize;
    let types = hdr_len + read_u32(btf, 8)? as usize;
    let types_end = types + read_u32(btf, 12)? as usize;
    let strings = hdr_len + read_u32(btf, 16)? as usize;
    let name = |off: u32| -> String {
        let s = &btf[(strings + off as usize).min(btf.len())..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    let mut out = Structs::new();
    let mut p = types;
    while p < types_end {
        let (name_off, info, size) = (read_u32(btf, p)?, read_u32(btf, p + 4)?, read_u32(btf, p + 8)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        p += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            k => bail!("unknown BTF kind {k}"),
        };
        if kind == 4 {
            let mut members = Vec::new();
            for i in 0..vlen {
                let m = p + 12 * i;
                let raw = read_u32(btf, m + 8)?;
                let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                if bits % 8 != 0 {
                    bail!("bitfield in {}", name(name_off));
                }
                members.push((name(read_u32(btf, m)?), (bits / 8) as usize));
            }
            out.insert(name(name_off), (size as usize, members));
        }
        p += extra;
    }
    Ok(out)
}

#[test]
fn rust_map_types_match_the_c_layout() -> Result<()> {
    let mut structs = btf_structs(objects::STEERING)?;
    structs.extend(btf_structs(objects::POLICY)?);
    for spec in LAYOUTS {
        let (c_size, c_members) =
            structs.get(spec.c_name).with_context(|| format!("struct {} not in the objects' BTF", spec.c_name))?;
        assert_eq!(*c_size, spec.rust_size + spec.c_offset_shift, "sizeof(struct {})", spec.c_name);
        let mut c_fields: Vec<(String, usize)> = c_members.clone();
        if spec.c_offset_shift == 4 {
            // LPM keys: aya's Key<K> carries the leading prefixlen word.
            assert_eq!(c_fields.first().map(|(n, o)| (n.as_str(), *o)), Some(("prefixlen", 0)), "{}", spec.c_name);
            c_fields.remove(0);
        }
        let rust_fields: Vec<(String, usize)> =
            spec.fields.iter().map(|(n, o)| (n.to_string(), o + spec.c_offset_shift)).collect();
        assert_eq!(c_fields, rust_fields, "members and offsets of struct {}", spec.c_name);
    }
    Ok(())
}

#[test]
fn the_layout_check_would_notice_a_divergence() -> Result<()> {
    // The comparison above is only meaningful if the BTF walk finds real, non-trivial structs.
    let structs = btf_structs(objects::STEERING)?;
    let (size, members) = structs.get("cw_egress_ct_key").context("cw_egress_ct_key in BTF")?;
    assert_eq!(*size, 40);
    assert_eq!(members.last().map(|(n, o)| (n.as_str(), *o)), Some(("daddr", 24)));
    Ok(())
}

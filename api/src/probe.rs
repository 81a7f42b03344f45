//! Gateway health probe: the UDP exchange the egress-gw controller uses to tell whether a gateway node's agent is
//! alive, without waiting on the kube API's node status.
//!
//! The controller sends a [`Probe`] to every candidate gateway's node agent (UDP, default port
//! [`DEFAULT_PORT`]) every probe interval (100 ms by default). The agent answers each one, to the sender's address,
//! with a [`ProbeReply`] that echoes the sequence number and names the node, so a reply from a recycled IP or a
//! stray process is not taken for the gateway. A round with no matching reply within the interval counts as failed;
//! the controller's hysteresis (rise/fall/hold-down) turns rounds into health.
//!
//! Wire format, all integers big-endian:
//!
//! ```text
//! probe: "CWHP" | version u8 = 1 | kind u8 = 1 | flags u16 = 0 | seq u64                      (16 bytes)
//! reply: "CWHP" | version u8 = 1 | kind u8 = 2 | flags u16     | seq u64 | name_len u8 | name (≤ 253 bytes)
//! ```
//!
//! Reply flags: bit 0 ([`FLAG_GATEWAY_READY`]) is set when the agent has its gateway datapath (SNAT on the external
//! interface) installed. An agent that answers without it is alive but cannot serve as a gateway.

use std::fmt;

/// UDP port node agents answer probes on, unless configured otherwise.
pub const DEFAULT_PORT: u16 = 9966;
pub const MAGIC: [u8; 4] = *b"CWHP";
pub const VERSION: u8 = 1;
const KIND_PROBE: u8 = 1;
const KIND_REPLY: u8 = 2;
const HEADER: usize = 16;
/// Longest node name (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// The agent's gateway datapath is installed.
pub const FLAG_GATEWAY_READY: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReply {
    pub seq: u64,
    pub flags: u16,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    Short(usize),
    BadMagic,
    Version(u8),
    Kind(u8),
    Name,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Short(n) => write!(f, "probe datagram too short ({n} bytes)"),
            ProbeError::BadMagic => write!(f, "not a Causeway probe (bad magic)"),
            ProbeError::Version(v) => write!(f, "unsupported probe version {v}"),
            ProbeError::Kind(k) => write!(f, "unexpected probe kind {k}"),
            ProbeError::Name => write!(f, "bad node name in probe reply"),
        }
    }
}

impl std::error::Error for ProbeError {}

fn header(kind: u8, flags: u16, seq: u64) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[..4].copy_from_slice(&MAGIC);
    b[4] = VERSION;
    b[5] = kind;
    b[6..8].copy_from_slice(&flags.to_be_bytes());
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    b
}

/// Checks the header and returns (kind, flags, seq).
fn parse_header(b: &[u8]) -> Result<(u8, u16, u64), ProbeError> {
    if b.len() < HEADER {
        return Err(ProbeError::Short(b.len()));
    }
    if b[..4] != MAGIC {
        return Err(ProbeError::BadMagic);
    }
    if b[4] != VERSION {
        return Err(ProbeError::Version(b[4]));
    }
    let flags = u16::from_be_bytes([b[6], b[7]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[8..16]);
    Ok((b[5], flags, u64::from_be_bytes(seq)))
}

impl Probe {
    pub fn encode(&self) -> [u8; HEADER] {
        header(KIND_PROBE, 0, self.seq)
    }

    pub fn decode(b: &[u8]) -> Result<Probe, ProbeError> {
        match parse_header(b)? {
            (KIND_PROBE, _, seq) => Ok(Probe { seq }),
            (k, _, _) => Err(ProbeError::Kind(k)),
        }
    }

    /// The agent's answer to this probe. A name longer than [`MAX_NAME`] is cut (node names never are).
    pub fn reply(&self, node: &str, flags: u16) -> Vec<u8> {
        let mut name = node.as_bytes();
        if name.len() > MAX_NAME {
            name = &name[..MAX_NAME];
        }
        let mut out = Vec::with_capacity(HEADER + 1 + name.len());
        out.extend_from_slice(&header(KIND_REPLY, flags, self.seq));
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out
    }
}

impl ProbeReply {
    pub fn decode(b: &[u8]) -> Result<ProbeReply, ProbeError> {
        let (kind, flags, seq) = parse_header(b)?;
        if kind != KIND_REPLY {
            return Err(ProbeError::Kind(kind));
        }
        let len = *b.get(HEADER).ok_or(ProbeError::Short(b.len()))? as usize;
        let name = b.get(HEADER + 1..HEADER + 1 + len).ok_or(ProbeError::Name)?;
        let node = std::str::from_utf8(name).map_err(|_| ProbeError::Name)?.to_string();
        Ok(ProbeReply { seq, flags, node })
    }

    pub fn gateway_ready(&self) -> bool {
        self.flags & FLAG_GATEWAY_READY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_reply_round_trip() {
        let p = Probe { seq: 0x0102_0304_0506_0708 };
        let wire = p.encode();
        assert_eq!(&wire[..4], b"CWHP");
        assert_eq!(&wire[8..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(Probe::decode(&wire), Ok(p));
        let r = ProbeReply::decode(&p.reply("gw-a", FLAG_GATEWAY_READY)).unwrap();
        assert_eq!(r, ProbeReply { seq: p.seq, flags: 1, node: "gw-a".into() });
        assert!(r.gateway_ready());
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        assert_eq!(Probe::decode(b"CWHP"), Err(ProbeError::Short(4)));
        assert_eq!(Probe::decode(&[0u8; 16]), Err(ProbeError::BadMagic));
        let mut v2 = Probe { seq: 1 }.encode();
        v2[4] = 2;
        assert_eq!(Probe::decode(&v2), Err(ProbeError::Version(2)));
        // A reply is not a probe, and a probe is not a reply.
        let reply = Probe { seq: 1 }.reply("n", 0);
        assert_eq!(Probe::decode(&reply), Err(ProbeError::Kind(2)));
        assert_eq!(ProbeReply::decode(&Probe { seq: 1 }.encode()), Err(ProbeError::Kind(1)));
        let mut no_name = Probe { seq: 1 }.reply("n", 0);
        no_name.truncate(16);
        assert_eq!(ProbeReply::decode(&no_name), Err(ProbeError::Short(16)));
        // Name length pointing past the datagram.
        let mut cut = reply.clone();
        cut[16] = 200;
        assert_eq!(ProbeReply::decode(&cut), Err(ProbeError::Name));
        let mut bad_utf8 = reply;
        bad_utf8[17] = 0xff;
        assert_eq!(ProbeReply::decode(&bad_utf8), Err(ProbeError::Name));
    }
}

//! Reading a userspace WireGuard device's state over its UAPI socket (`get=1`), the cross-platform text protocol
//! that boringtun and wireguard-go serve.
//!
//! Writes go through wireguard-control; reads are parsed here because wireguard-control's reader prints every
//! key it does not know to stdout (boringtun sends `own_public_key`), which would spam the agent's output on each
//! reconcile, and because the parser is sans-IO and can be tested against malformed replies.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use wireguard_control::Key;

use super::keys::PublicKey;
use super::peers::PeerSpec;

/// A device as `get` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerStatus>,
}

/// One peer with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub spec: PeerSpec,
    /// `last_handshake_time_sec` as reported: 0 means no handshake yet. (wireguard-go reports the Unix time,
    /// boringtun 0.7 the seconds since the handshake, so only "non-zero" is portable.)
    pub last_handshake_sec: u64,
    /// `last_handshake_time_nsec`: with boringtun's "time since", a handshake less than a second ago shows only
    /// here.
    pub last_handshake_nsec: u32,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PeerStatus {
    pub fn has_handshake(&self) -> bool {
        self.last_handshake_sec != 0 || self.last_handshake_nsec != 0 || self.rx_bytes != 0
    }
}

/// A reply that is not a well-formed `get` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("UAPI line {line} is not key=value: {text:?}")]
    Malformed { line: usize, text: String },
    #[error("UAPI line {line}: bad value for {key}: {value:?}")]
    BadValue { line: usize, key: String, value: String },
    #[error("UAPI peer attribute {key} before any public_key (line {line})")]
    NoPeer { line: usize, key: String },
    #[error("the device answered errno={0}")]
    Errno(i32),
    #[error("the reply ended without errno=")]
    Truncated,
}

/// Parses the reply to `get=1` (up to and including `errno=N`).
pub fn parse_get(reply: &str) -> Result<DeviceStatus, UapiError> {
    let mut status = DeviceStatus::default();
    let mut peer: Option<PeerStatus> = None;
    for (i, raw) in reply.lines().enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            continue;
        }
        let (key, value) =
            raw.split_once('=').ok_or_else(|| UapiError::Malformed { line, text: raw.chars().take(80).collect() })?;
        let bad = || UapiError::BadValue { line, key: key.to_owned(), value: value.chars().take(80).collect() };
        let num = |v: &str| v.parse::<u64>().map_err(|_| bad());
        match key {
            "errno" => {
                status.peers.extend(peer.take());
                let code: i32 = value.parse().map_err(|_| bad())?;
                return if code == 0 { Ok(status) } else { Err(UapiError::Errno(code)) };
            }
            "listen_port" => status.listen_port = Some(value.parse().map_err(|_| bad())?),
            "public_key" => {
                status.peers.extend(peer.take());
                let key = Key::from_hex(value).map_err(|_| bad())?;
                peer = Some(PeerStatus {
                    spec: PeerSpec {
                        public_key: PublicKey::from_bytes(key.0),
                        endpoint: None,
                        allowed_ips: Default::default(),
                        keepalive: None,
                    },
                    last_handshake_sec: 0,
                    last_handshake_nsec: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            // Device attributes we do not need.
            "private_key" | "own_public_key" | "fwmark" => {}
            _ => {
                let p = peer.as_mut().ok_or_else(|| UapiError::NoPeer { line, key: key.to_owned() })?;
                match key {
                    "endpoint" => p.spec.endpoint = Some(value.parse::<SocketAddr>().map_err(|_| bad())?),
                    "allowed_ip" => {
                        let net: IpNet = value.parse().map_err(|_| bad())?;
                        p.spec.allowed_ips.insert(net.trunc());
                    }
                    "persistent_keepalive_interval" => {
                        let k: u16 = value.parse().map_err(|_| bad())?;
                        p.spec.keepalive = (k != 0).then_some(k);
                    }
                    "last_handshake_time_sec" => p.last_handshake_sec = num(value)?,
                    "last_handshake_time_nsec" => p.last_handshake_nsec = value.parse().map_err(|_| bad())?,
                    "rx_bytes" => p.rx_bytes = num(value)?,
                    "tx_bytes" => p.tx_bytes = num(value)?,
                    // preshared_key, protocol_version and anything newer.
                    _ => {}
                }
            }
        }
    }
    Err(UapiError::Truncated)
}

/// Asks the device behind `socket` for its state. wireguard-go keeps the connection open after answering and
/// boringtun closes it, so the reply is read up to its `errno=` line.
pub fn get(socket: &Path) -> std::io::Result<Result<DeviceStatus, UapiError>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"get=1\n\n")?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    loop {
        let before = reply.len();
        if reader.read_line(&mut reply)? == 0 {
            break;
        }
        if reply[before..].starts_with("errno=") {
            break;
        }
    }
    Ok(parse_get(&reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b3c0aa8f29b7ec1d6e3e5a0e6c2a1f2b5e2b9d7c3c1b1a0e1f2a3b4c5d6e7f8";
    const B: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn parses_a_boringtun_reply() {
        let reply = format!(
            "own_public_key={A}\nlisten_port=51820\npublic_key={B}\npersistent_keepalive_interval=25\n\
             endpoint=192.168.50.2:51821\nallowed_ip=10.244.2.0/24\nallowed_ip=10.244.2.1/32\n\
             last_handshake_time_sec=3\nlast_handshake_time_nsec=5\nrx_bytes=100\ntx_bytes=200\n\
             public_key={A}\nallowed_ip=fd00::/64\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n"
        );
        let status = parse_get(&reply).expect("valid reply");
        assert_eq!(status.listen_port, Some(51820));
        assert_eq!(status.peers.len(), 2);
        let p = &status.peers[0];
        assert_eq!(p.spec.endpoint, Some("192.168.50.2:51821".parse().unwrap()));
        assert_eq!(p.spec.keepalive, Some(25));
        assert_eq!(p.spec.allowed_ips.len(), 2);
        assert_eq!((p.rx_bytes, p.tx_bytes, p.has_handshake()), (100, 200, true));
        assert!(!status.peers[1].has_handshake());
        // boringtun reports the time since the handshake: one less than a second ago is 0 s and some ns.
        let fresh =
            format!("public_key={B}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=250\nrx_bytes=0\nerrno=0\n");
        assert!(parse_get(&fresh).expect("valid").peers[0].has_handshake());
        assert_eq!(status.peers[1].spec.endpoint, None);
    }

    #[test]
    fn errors_are_values_not_panics() {
        assert_eq!(parse_get("errno=0\n"), Ok(DeviceStatus::default()));
        assert_eq!(parse_get("errno=19\n"), Err(UapiError::Errno(19)));
        assert_eq!(parse_get("listen_port=1\n"), Err(UapiError::Truncated));
        assert_eq!(parse_get(""), Err(UapiError::Truncated));
        assert!(matches!(parse_get("garbage\nerrno=0\n"), Err(UapiError::Malformed { line: 1, .. })));
        assert!(matches!(parse_get("listen_port=99999\nerrno=0\n"), Err(UapiError::BadValue { .. })));
        assert!(matches!(parse_get("public_key=zz\nerrno=0\n"), Err(UapiError::BadValue { .. })));
        assert!(matches!(parse_get("endpoint=1.2.3.4:5\nerrno=0\n"), Err(UapiError::NoPeer { .. })));
        let bad_ip = format!("public_key={B}\nallowed_ip=10.0.0.0/99\nerrno=0\n");
        assert!(matches!(parse_get(&bad_ip), Err(UapiError::BadValue { .. })));
        let bad_count = format!("public_key={B}\nrx_bytes=-1\nerrno=0\n");
        assert!(matches!(parse_get(&bad_count), Err(UapiError::BadValue { .. })));
        // Unknown keys (newer protocol versions) are ignored.
        assert!(parse_get(&format!("public_key={B}\nsome_future_key=1\nerrno=0\n")).is_ok());
    }
}

//! WireGuard tunnels between nodes: pod traffic that crosses nodes (and clusters) is encrypted.
//!
//! ```text
//! remote node records ──► PeerSet::from_nodes (validate) ──► diff against the device ──► one UAPI/netlink update
//!  (key, endpoint,                                                                      + `ip route` per allowed IP
//!   pod CIDRs, node IPs)
//! ```
//!
//! - [`keys`]: Curve25519 keys in `wg`'s base64 form; [`keyfile`]: the node's private key file, shared by the agent
//!   and `causeway-node-agent register`.
//! - [`peers`]: the sans-IO reconciler (no I/O, unit-tested): desired peers from node records, minimal diff,
//!   routes.
//! - [`backend`]: kernel WireGuard when the kernel has it, else boringtun in userspace.
//! - [`tunnel`]: the one interface per node (boringtun `DeviceHandle` on a persistent TUN, or a kernel `wireguard`
//!   link), configured through wireguard-control; it outlives the agent and is re-attached to after a restart;
//!   key rotation; clean shutdown and [`delete_interface`] for uninstall.
//! - [`uapi`]: reading a userspace device's state (`get=1`), parsed without I/O.

pub mod backend;
pub mod keyfile;
pub mod keys;
pub mod peers;
pub mod tunnel;
pub mod uapi;

pub use backend::{choose_backend, probe_kernel_wireguard, BackendKind, BackendPreference, KernelSupport};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use peers::{NodeRecord, PeerChange, PeerSet, PeerSetError, PeerSpec, UpdateStyle};
pub use tunnel::{delete_interface, uapi_socket, ApplyReport, Tunnel, TunnelConfig, DEFAULT_MTU, UAPI_DIR};
pub use uapi::{DeviceStatus, PeerStatus, UapiError};

/// Errors of the WireGuard tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid interface name {name:?}: {reason}")]
    InterfaceName { name: String, reason: String },
    #[error("WireGuard interface {0} is already served by another live device (its UAPI socket answers)")]
    InterfaceInUse(String),
    #[error(transparent)]
    KernelRequired(#[from] backend::KernelRequired),
    #[error("boringtun device {ifname}: {reason}")]
    Boringtun { ifname: String, reason: String },
    #[error("WireGuard UAPI {op} on {ifname}: {source}")]
    Uapi {
        ifname: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard UAPI get on {ifname}: {source}")]
    UapiReply {
        ifname: String,
        #[source]
        source: UapiError,
    },
    #[error("WireGuard device {0} is gone (its UAPI socket does not answer)")]
    DeviceGone(String),
    #[error("starting a handshake on {ifname} (a packet to {addr}): {source}")]
    Handshake {
        ifname: String,
        addr: std::net::IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("network namespace: {0}")]
    Netns(String),
    #[error("WireGuard interface {0} still exists 5 s after shutdown")]
    Shutdown(String),
    #[error("interface {ifname} exists but is a {found}, not a {want}: delete it or pick another name")]
    WrongLinkKind { ifname: String, want: &'static str, found: String },
    #[error(transparent)]
    PeerSet(#[from] PeerSetError),
}

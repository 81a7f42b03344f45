//! Which WireGuard implementation a node uses: the kernel's when it has one (faster, no copies through a TUN),
//! otherwise boringtun in userspace. The decision is a plain function of the operator's preference and what a
//! probe found, so it is tested without a kernel; the probe is the only I/O.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendPreference {
    /// Kernel WireGuard if the kernel has it, else userspace.
    #[default]
    Auto,
    /// Kernel WireGuard or fail.
    Kernel,
    /// Always boringtun in userspace.
    Userspace,
}

impl std::str::FromStr for BackendPreference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendPreference::Auto),
            "kernel" => Ok(BackendPreference::Kernel),
            "userspace" | "boringtun" => Ok(BackendPreference::Userspace),
            other => Err(format!("unknown WireGuard backend {other:?}: expected auto, kernel or userspace")),
        }
    }
}

/// The implementation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The kernel's `wireguard` link type, configured over generic netlink.
    Kernel,
    /// boringtun on a TUN device in this process, configured over its UAPI socket.
    Userspace,
}

impl BackendKind {
    pub(crate) fn wg_backend(self) -> wireguard_control::Backend {
        match self {
            BackendKind::Kernel => wireguard_control::Backend::Kernel,
            BackendKind::Userspace => wireguard_control::Backend::Userspace,
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSupport {
    Available,
    /// Why not (e.g. `ip`'s "Unknown device type").
    Unavailable(String),
}

/// Kernel WireGuard was required and is not there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel WireGuard was required but is unavailable: {0}")]
pub struct KernelRequired(pub String);

/// The decision.
pub fn choose_backend(pref: BackendPreference, kernel: &KernelSupport) -> Result<BackendKind, KernelRequired> {
    match (pref, kernel) {
        (BackendPreference::Userspace, _) => Ok(BackendKind::Userspace),
        (BackendPreference::Auto | BackendPreference::Kernel, KernelSupport::Available) => Ok(BackendKind::Kernel),
        (BackendPreference::Auto, KernelSupport::Unavailable(_)) => Ok(BackendKind::Userspace),
        (BackendPreference::Kernel, KernelSupport::Unavailable(why)) => Err(KernelRequired(why.clone())),
    }
}

/// Whether the kernel can create a `wireguard` link, found by creating one (and deleting it again) in the
/// calling thread's network namespace. That also loads the module when it is installed but not loaded, which a
/// look at `/sys/module` would miss.
pub fn probe_kernel_wireguard() -> KernelSupport {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("cwp{:x}x{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let out = Command::new("ip").args(["link", "add", &name, "type", "wireguard"]).stdin(Stdio::null()).output();
    match out {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["link", "del", &name]).stderr(Stdio::null()).status();
            KernelSupport::Available
        }
        Ok(out) => KernelSupport::Unavailable(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => KernelSupport::Unavailable(format!("cannot run ip: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        let yes = KernelSupport::Available;
        let no = KernelSupport::Unavailable("Error: Unknown device type.".into());
        assert_eq!(choose_backend(BackendPreference::Auto, &yes), Ok(BackendKind::Kernel));
        assert_eq!(choose_backend(BackendPreference::Auto, &no), Ok(BackendKind::Userspace));
        assert_eq!(choose_backend(BackendPreference::Kernel, &yes), Ok(BackendKind::Kernel));
        let err = choose_backend(BackendPreference::Kernel, &no).unwrap_err();
        assert!(err.to_string().contains("Unknown device type"), "{err}");
        assert_eq!(choose_backend(BackendPreference::Userspace, &yes), Ok(BackendKind::Userspace));
        assert_eq!(choose_backend(BackendPreference::Userspace, &no), Ok(BackendKind::Userspace));
    }

    #[test]
    fn preference_parses() {
        assert_eq!("AUTO".parse(), Ok(BackendPreference::Auto));
        assert_eq!("kernel".parse(), Ok(BackendPreference::Kernel));
        assert_eq!("boringtun".parse(), Ok(BackendPreference::Userspace));
        assert!("ipsec".parse::<BackendPreference>().is_err());
    }
}

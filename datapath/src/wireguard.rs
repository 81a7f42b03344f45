//! WireGuard tunnels between nodes (boringtun in userspace, configured over the UAPI with wireguard-control).

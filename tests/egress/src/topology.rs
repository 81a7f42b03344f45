//! The network: every box is a network namespace, every wire a veth.
//!
//! ```text
//!                      ctl (bridge br0 = the underlay switch, 172.31.0.100: egress-gw, kube API proxy)
//!            p1 ┌─────────────┼─────────────┐ p3
//!     und0 172.31.0.11   und0 172.31.0.12   und0 172.31.0.13
//!        gw-a (zone-a)     gw-b (zone-b)      worker (zone-a)        nodes: agent, pods behind lxcN veths
//!     ext0 198.18.1.2    ext0 198.18.2.2    ext0 198.18.3.2          (the egress IPs: each node's ext0 address)
//!            n1 └─────────────┼─────────────┘ n3
//!                      fw (router + nftables allow-list, counters)
//!                             │ srv0 203.0.113.1
//!                      server 203.0.113.10 (legacy, only egress IPs allowed), 203.0.113.200 (open to pod IPs)
//! ```
//!
//! Pods are /32 addresses in their node's pod CIDR (10.244.<n>.0/24), routed by the node through a host-side veth
//! with proxy ARP (the Calico layout). Nodes route each other's pod CIDRs over the underlay (what a CNI does) and
//! everything else to the firewall: a packet that escapes steering leaves with its pod IP, and the firewall drops and
//! counts it. Cutting a node's underlay "cable" is setting the switch-side port (`p<n>` in `ctl`) down.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};
use causeway_datapath::bpf::loader::{self, Hook};
use causeway_testsupport::netns::{self, Netns};

/// The switch's own address: egress-gw's gRPC server listens here.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 100);
/// The legacy server: inside the policy's destination, behind the allow-list.
pub const LEGACY_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A second address of the server, inside the policy's excluded CIDR: open to pod IPs.
pub const EXCLUDED_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// The destination CIDR of the test policies.
pub const DESTINATION_CIDR: &str = "203.0.113.0/24";
/// Excluded from it: traffic there bypasses the gateways.
pub const EXCLUDED_CIDR: &str = "203.0.113.128/25";
/// Every node's pod CIDR is inside this.
pub const POD_SUPERNET: &str = "10.244.0.0/16";
/// The pods' gateway address (proxy-ARPed by the node).
const POD_GATEWAY: &str = "169.254.1.1";
/// External interface of every node (and the group's `interface:`).
pub const EXTERNAL_IF: &str = "ext0";
/// Host-side pod interfaces start with this (`--pod-interface-prefix`).
pub const POD_IF_PREFIX: &str = "lxc";
/// MTU of the pods: room for the VXLAN header on the 1500-byte underlay.
const POD_MTU: &str = "1400";

/// The three nodes: two gateways in different zones and a worker in gw-a's zone.
pub const GW_A: usize = 0;
pub const GW_B: usize = 1;
pub const WORKER: usize = 2;

/// Label that makes a node a candidate gateway in the test policies.
pub const GATEWAY_LABEL: (&str, &str) = ("egress-gw", "true");
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    pub name: &'static str,
    pub zone: &'static str,
    /// Labelled as a gateway from the start.
    pub gateway: bool,
}

pub const NODES: [NodeSpec; 3] = [
    NodeSpec { name: "gw-a", zone: "zone-a", gateway: true },
    NodeSpec { name: "gw-b", zone: "zone-b", gateway: true },
    NodeSpec { name: "worker", zone: "zone-a", gateway: false },
];

/// One node: its namespace, addresses and the agent's pin/state directories (uninstalled on drop).
pub struct Node {
    pub name: String,
    pub zone: String,
    pub initially_gateway: bool,
    /// 1-based, used in every address of the node.
    pub n: u8,
    pub ns: Netns,
    /// Underlay address (the Node's InternalIP).
    pub ip: Ipv4Addr,
    /// The address of its external interface: what the server sees when this node is the gateway.
    pub egress_ip: Ipv4Addr,
    pub pod_cidr: String,
    /// The node's port on the underlay switch (in `ctl`).
    pub switch_port: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    next_pod: AtomicU32,
}

impl Node {
    /// Name of the firewall counter of packets from this node's egress IP to the legacy range.
    pub fn egress_counter(&self) -> String {
        format!("egress_{}", self.n)
    }

    /// Whether the agent has attached its steering program to `ifname` (pinned TCX link).
    pub fn steering_attached(&self, ifname: &str) -> bool {
        loader::is_attached(&self.pin_dir, Hook::FromPod, ifname)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent is gone by now (the cluster kills processes first): detach and unpin what it left.
        if self.pin_dir.exists() {
            if let Err(e) = loader::uninstall(&self.pin_dir) {
                eprintln!("cleanup of {}: {e}", self.pin_dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A pod: a namespace behind its node.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Index into [`Topology::nodes`].
    pub node: usize,
    /// Host-side interface in the node's namespace.
    pub host_if: String,
}

pub struct Topology {
    // Drop order: pods, then nodes (pins), then the rest.
    pub nodes: Vec<Node>,
    pub ctl: Netns,
    pub fw: Netns,
    pub server: Netns,
}

impl Topology {
    pub fn build() -> Result<Topology> {
        let ctl = Netns::new("cwe-ctl")?;
        ctl.ip("link add br0 type bridge")?;
        ctl.ip(&format!("addr add {CONTROL_IP}/24 dev br0"))?;
        ctl.ip("link set br0 up")?;
        let fw = Netns::new("cwe-fw")?;
        fw.router()?;
        let server = Netns::new("cwe-srv")?;
        netns::veth(&fw, "srv0", "203.0.113.1/24", &server, "eth0", &format!("{LEGACY_SERVER}/24"))?;
        server.ip(&format!("addr add {EXCLUDED_SERVER}/24 dev eth0"))?;
        server.ip("route add default via 203.0.113.1")?;

        let mut nodes = Vec::new();
        for (i, spec) in NODES.iter().enumerate() {
            let n = u8::try_from(i + 1).context("node index")?;
            let ns = Netns::new(&format!("cwe-{}", spec.name))?;
            let ip = Ipv4Addr::new(172, 31, 0, 10 + n);
            let egress_ip = Ipv4Addr::new(198, 18, n, 2);
            let switch_port = format!("p{n}");
            netns::veth(&ns, "und0", &format!("{ip}/24"), &ctl, &switch_port, "")?;
            ctl.ip(&format!("link set {switch_port} master br0"))?;
            netns::veth(
                &ns,
                EXTERNAL_IF,
                &format!("{egress_ip}/24"),
                &fw,
                &format!("n{n}"),
                &format!("198.18.{n}.1/24"),
            )?;
            ns.router()?;
            ns.ip(&format!("route add default via 198.18.{n}.1 dev {EXTERNAL_IF}"))?;
            let pod_cidr = format!("10.244.{n}.0/24");
            // Replies to pods that left unsteered (the excluded range) come back through their node.
            fw.ip(&format!("route add {pod_cidr} via {}", Ipv4Addr::new(198, 18, n, 2)))?;
            let unique = netns::unique_name(&format!("cwe-{}", spec.name));
            nodes.push(Node {
                name: spec.name.to_string(),
                zone: spec.zone.to_string(),
                initially_gateway: spec.gateway,
                n,
                ns,
                ip,
                egress_ip,
                pod_cidr,
                switch_port,
                pin_dir: PathBuf::from("/sys/fs/bpf").join(&unique),
                state_dir: std::env::temp_dir().join(format!("{unique}.state")),
                next_pod: AtomicU32::new(0),
            });
        }
        // Pod CIDRs of the other nodes over the underlay: reverse-translated replies go back to the pod's node.
        for a in &nodes {
            for b in nodes.iter().filter(|b| b.n != a.n) {
                a.ns.ip(&format!("route add {} via {}", b.pod_cidr, b.ip))?;
            }
        }
        let topo = Topology { nodes, ctl, fw, server };
        topo.install_firewall()?;
        for node in &topo.nodes {
            netns::ping(&topo.ctl, &node.ip.to_string()).with_context(|| format!("underlay to {}", node.name))?;
        }
        Ok(topo)
    }

    /// The legacy firewall: forwarding to the legacy range (203.0.113.0/25) only from the egress IPs; the
    /// excluded range (203.0.113.128/25) is open to pod IPs; everything else from pods is dropped. Named counters
    /// say who got through and who did not.
    fn install_firewall(&self) -> Result<()> {
        let mut s = String::from("table inet cw_fw {\n");
        for node in &self.nodes {
            s.push_str(&format!("  counter {} {{}}\n", node.egress_counter()));
        }
        s.push_str("  counter pod_ip {}\n  counter excluded_pod {}\n  counter other {}\n");
        s.push_str("  chain forward {\n    type filter hook forward priority 0; policy drop;\n");
        s.push_str("    iifname \"srv0\" accept\n");
        for node in &self.nodes {
            s.push_str(&format!(
                "    ip daddr 203.0.113.0/25 ip saddr {} counter name \"{}\" accept\n",
                node.egress_ip,
                node.egress_counter()
            ));
        }
        s.push_str(&format!(
            "    ip daddr {EXCLUDED_CIDR} ip saddr {POD_SUPERNET} counter name \"excluded_pod\" accept\n"
        ));
        s.push_str(&format!("    ip saddr {POD_SUPERNET} counter name \"pod_ip\" drop\n"));
        s.push_str("    counter name \"other\" drop\n  }\n}\n");
        let file = tempfile::NamedTempFile::new().context("nft script file")?;
        std::fs::write(file.path(), s)?;
        self.fw.exec(&["nft", "-f", &file.path().to_string_lossy()])?;
        Ok(())
    }

    /// Packets counted by the firewall counter `name` (`pod_ip`, `excluded_pod`, `other`, `egress_<n>`).
    pub fn fw_counter(&self, name: &str) -> Result<u64> {
        let out = self.fw.exec(&["nft", "list", "counter", "inet", "cw_fw", name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets" {
                return words.next().and_then(|v| v.parse().ok()).context("packets value");
            }
        }
        bail!("no packet count for {name} in: {text}")
    }

    /// Creates a pod namespace behind node `node` with the next free address; not yet known to the kube API.
    pub fn add_pod(&self, node: usize, name: &str) -> Result<Pod> {
        let host = self.nodes.get(node).context("no such node")?;
        let k = host.next_pod.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(10, 244, host.n, u8::try_from(10 + k).context("too many pods on one node")?);
        let host_if = format!("{POD_IF_PREFIX}{k}");
        let ns = Netns::new("cwe-pod")?;
        netns::veth(&ns, "eth0", "", &host.ns, &host_if, "")?;
        ns.ip(&format!("addr add {ip}/32 dev eth0"))?;
        ns.ip(&format!("link set eth0 mtu {POD_MTU}"))?;
        ns.ip(&format!("route add {POD_GATEWAY} dev eth0 scope link"))?;
        ns.ip(&format!("route add default via {POD_GATEWAY} dev eth0"))?;
        host.ns.ip(&format!("link set {host_if} mtu {POD_MTU}"))?;
        host.ns.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
        host.ns.ip(&format!("route add {ip}/32 dev {host_if}"))?;
        Ok(Pod { name: name.to_string(), ns, ip, node, host_if })
    }

    /// Cuts (or reconnects) a node's underlay cable: its switch port goes down, the node's own interface stays
    /// configured (it only loses carrier), as when a cable or a top-of-rack port fails.
    pub fn set_underlay(&self, node: usize, up: bool) -> Result<()> {
        let port = &self.nodes.get(node).context("no such node")?.switch_port;
        self.ctl.ip(&format!("link set {port} {}", if up { "up" } else { "down" }))?;
        Ok(())
    }
}

impl Topology {
    /// The node whose egress IP this is.
    pub fn node_with_egress_ip(&self, ip: std::net::IpAddr) -> Option<usize> {
        self.nodes.iter().position(|n| std::net::IpAddr::V4(n.egress_ip) == ip)
    }
}

//! Which of this node's interfaces and addresses the agent publishes on its Node, and where an address lives (for
//! gratuitous ARP). Sans-IO: [`HostNetwork`] is a snapshot of links, addresses and default routes (read by
//! [`super::netlink`]); everything here is a plain function of it.
//!
//! The egress-gw controller reads the result from the Node annotations [`INTERFACES_ANNOTATION`] (JSON object:
//! interface name → list of IP strings) and [`DEFAULT_INTERFACE_ANNOTATION`], to check that a policy's `egressIP`
//! exists on a gateway and to resolve `interface:` groups to that interface's address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{json, Value};

/// Node annotation with this node's interfaces and addresses (read by egress-gw's `kube::convert::node`).
pub const INTERFACES_ANNOTATION: &str = "egress.causeway.io/interfaces";
/// Node annotation naming the interface of the default route.
pub const DEFAULT_INTERFACE_ANNOTATION: &str = "egress.causeway.io/default-interface";

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// Ethernet address; `None` for layer-3 devices (TUN, WireGuard), which have no neighbours to tell.
    pub mac: Option<[u8; 6]>,
}

/// One address on an interface, in the kernel's order (the primary address of a subnet first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// A default route (main table) out of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRoute {
    pub ipv4: bool,
    pub index: u32,
    /// Route priority (metric); the lowest wins.
    pub metric: u32,
}

/// A snapshot of the node's network configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNetwork {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub default_routes: Vec<DefaultRoute>,
}

/// Interfaces never published: the agent's own devices and the pods' veths.
#[derive(Debug, Clone, Default)]
pub struct PublishFilter {
    /// Exact names (the VXLAN device, the WireGuard interface, listed pod interfaces).
    pub skip_names: BTreeSet<String>,
    /// Name prefixes (the pod interface prefix).
    pub skip_prefixes: Vec<String>,
}

impl PublishFilter {
    fn skips(&self, name: &str) -> bool {
        self.skip_names.contains(name) || self.skip_prefixes.iter().any(|p| !p.is_empty() && name.starts_with(p))
    }
}

/// What goes on the Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Interface → addresses, IPv4 first, each family in the kernel's order. Interfaces without a publishable
    /// address are left out.
    pub interfaces: BTreeMap<String, Vec<IpAddr>>,
    pub default_interface: Option<String>,
}

/// Link-local addresses (169.254/16, fe80::/10) are per link and mean nothing to another node.
fn link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The interfaces and addresses to publish: every link except loopback and `filter`'s, with its addresses except
/// loopback, link-local, unspecified and multicast ones; the default interface is the one of the IPv4 default
/// route with the lowest metric (else IPv6's), if that interface is published.
pub fn select(net: &HostNetwork, filter: &PublishFilter) -> Published {
    let mut out = Published::default();
    let names: BTreeMap<u32, &Link> = net.links.iter().map(|l| (l.index, l)).collect();
    for v4 in [true, false] {
        for a in net.addrs.iter().filter(|a| a.ip.is_ipv4() == v4) {
            let Some(link) = names.get(&a.index) else { continue };
            if link.loopback || filter.skips(&link.name) {
                continue;
            }
            if a.ip.is_loopback() || a.ip.is_unspecified() || a.ip.is_multicast() || link_local(&a.ip) {
                continue;
            }
            let list = out.interfaces.entry(link.name.clone()).or_default();
            if !list.contains(&a.ip) {
                list.push(a.ip);
            }
        }
    }
    let best = |v4: bool| net.default_routes.iter().filter(|r| r.ipv4 == v4).min_by_key(|r| (r.metric, r.index));
    out.default_interface = best(true)
        .into_iter()
        .chain(best(false))
        .filter_map(|r| names.get(&r.index).map(|l| l.name.clone()))
        .find(|n| out.interfaces.contains_key(n));
    out
}

impl Published {
    /// The interfaces annotation's value: `{"eth1":["192.0.2.10","2001:db8::10"]}`.
    pub fn interfaces_json(&self) -> String {
        let m: BTreeMap<&str, Vec<String>> =
            self.interfaces.iter().map(|(k, v)| (k.as_str(), v.iter().map(ToString::to_string).collect())).collect();
        // A map of strings to lists of strings always serialises.
        serde_json::to_string(&m).unwrap_or_else(|_| "{}".to_owned())
    }

    /// A JSON merge patch (RFC 7386) setting both annotations on the Node; no default interface removes that
    /// annotation. Other annotations are left alone.
    pub fn merge_patch(&self) -> Value {
        json!({
            "metadata": {
                "annotations": {
                    INTERFACES_ANNOTATION: self.interfaces_json(),
                    DEFAULT_INTERFACE_ANNOTATION: self.default_interface,
                }
            }
        })
    }
}

/// Where an address lives: the interface holding `ip` (the first one, if several do).
pub fn holder(net: &HostNetwork, ip: IpAddr) -> Option<&Link> {
    let a = net.addrs.iter().find(|a| a.ip == ip)?;
    net.links.iter().find(|l| l.index == a.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn link(index: u32, name: &str) -> Link {
        Link { index, name: name.into(), loopback: false, mac: Some([2, 0, 0, 0, 0, index as u8]) }
    }

    fn addr(index: u32, s: &str) -> Addr {
        Addr { index, ip: ip(s), prefix_len: 24 }
    }

    fn node() -> HostNetwork {
        HostNetwork {
            links: vec![
                Link { index: 1, name: "lo".into(), loopback: true, mac: None },
                link(2, "eth0"),
                link(3, "eth1"),
                link(4, "cw_vxlan"),
                Link { index: 5, name: "cw_wg0".into(), loopback: false, mac: None },
                link(6, "lxc12ab"),
                link(7, "dummy0"),
            ],
            addrs: vec![
                addr(1, "127.0.0.1"),
                addr(1, "::1"),
                addr(2, "fe80::1"),
                addr(2, "2001:db8:1::2"),
                addr(2, "192.168.10.21"),
                addr(3, "192.0.2.10"),
                addr(3, "192.0.2.11"),
                addr(3, "169.254.3.3"),
                addr(4, "10.99.0.1"),
                addr(5, "10.98.0.1"),
                addr(6, "169.254.1.1"),
                addr(6, "10.97.0.1"),
                // An address on an interface the dump did not list (it vanished between the two dumps).
                addr(42, "10.96.0.1"),
            ],
            default_routes: vec![
                DefaultRoute { ipv4: false, index: 3, metric: 100 },
                DefaultRoute { ipv4: true, index: 3, metric: 200 },
                DefaultRoute { ipv4: true, index: 2, metric: 100 },
            ],
        }
    }

    fn filter() -> PublishFilter {
        PublishFilter {
            skip_names: ["cw_vxlan".to_string(), "cw_wg0".to_string()].into(),
            skip_prefixes: vec!["lxc".into()],
        }
    }

    #[test]
    fn publishes_real_interfaces_only_ipv4_first() {
        let p = select(&node(), &filter());
        assert_eq!(p.interfaces.keys().collect::<Vec<_>>(), vec!["eth0", "eth1"]);
        assert_eq!(p.interfaces["eth0"], vec![ip("192.168.10.21"), ip("2001:db8:1::2")]);
        assert_eq!(p.interfaces["eth1"], vec![ip("192.0.2.10"), ip("192.0.2.11")]);
        assert_eq!(p.default_interface.as_deref(), Some("eth0"), "IPv4, lowest metric");
        assert_eq!(
            p.interfaces_json(),
            r#"{"eth0":["192.168.10.21","2001:db8:1::2"],"eth1":["192.0.2.10","192.0.2.11"]}"#
        );
    }

    #[test]
    fn default_interface_falls_back_and_must_be_published() {
        let mut n = node();
        n.default_routes.retain(|r| !r.ipv4);
        assert_eq!(select(&n, &filter()).default_interface.as_deref(), Some("eth1"), "IPv6's when no IPv4 default");
        // A default route through the agent's own tunnel is not an egress interface.
        n.default_routes = vec![DefaultRoute { ipv4: true, index: 5, metric: 0 }];
        assert_eq!(select(&n, &filter()).default_interface, None);
        let patch = select(&n, &filter()).merge_patch();
        assert_eq!(patch["metadata"]["annotations"][DEFAULT_INTERFACE_ANNOTATION], Value::Null, "removes it");
    }

    #[test]
    fn holder_finds_the_interface_of_an_address() {
        let n = node();
        assert_eq!(holder(&n, ip("192.0.2.11")).map(|l| l.name.as_str()), Some("eth1"));
        assert_eq!(holder(&n, ip("203.0.113.1")), None);
        assert_eq!(holder(&n, ip("10.96.0.1")), None, "address of an unknown link");
    }
}

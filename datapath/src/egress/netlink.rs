//! Reads the calling thread's network namespace over rtnetlink (link, address and route dumps) into a
//! [`HostNetwork`]. The conversion from netlink messages is a plain function ([`from_messages`]); only [`read`]
//! touches a socket.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::interfaces::{Addr, DefaultRoute, HostNetwork, Link};

fn dump(msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    let replies = netlink_request::netlink_request_rtnl(msg, Some(NLM_F_REQUEST | NLM_F_DUMP))?;
    Ok(replies
        .into_iter()
        .filter_map(|m: NetlinkMessage<RouteNetlinkMessage>| match m.payload {
            NetlinkPayload::InnerMessage(inner) => Some(inner),
            _ => None,
        })
        .collect())
}

/// Dumps links, addresses and routes of the calling thread's network namespace.
pub fn read() -> io::Result<HostNetwork> {
    let mut all = dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    all.extend(dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?);
    all.extend(dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))?);
    Ok(from_messages(&all))
}

fn link(m: &LinkMessage) -> Option<Link> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let mac = if m.header.link_layer_type == LinkLayerType::Ether {
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(b);
                Some(mac)
            }
            _ => None,
        })
    } else {
        None
    };
    Some(Link {
        index: m.header.index,
        name,
        loopback: m.header.flags.contains(LinkFlags::Loopback) || m.header.link_layer_type == LinkLayerType::Loopback,
        mac,
    })
}

fn addr(m: &AddressMessage) -> Option<Addr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point links (and the only
    // one IPv6 sends).
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let ip: IpAddr = local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(Addr { index: m.header.index, ip, prefix_len: m.header.prefix_len })
}

fn default_route(m: &RouteMessage) -> Option<DefaultRoute> {
    if m.header.destination_prefix_length != 0 || m.header.kind != RouteType::Unicast {
        return None;
    }
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let ipv4 = match m.header.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return None,
    };
    let index = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .or_else(|| {
            // ECMP default: the first next hop's interface.
            m.attributes.iter().find_map(|a| match a {
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            })
        })?;
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    Some(DefaultRoute { ipv4, index, metric })
}

/// The snapshot in the messages of the three dumps; anything unexpected is skipped.
pub fn from_messages(msgs: &[RouteNetlinkMessage]) -> HostNetwork {
    let mut net = HostNetwork::default();
    for m in msgs {
        match m {
            RouteNetlinkMessage::NewLink(l) => net.links.extend(link(l)),
            RouteNetlinkMessage::NewAddress(a) => net.addrs.extend(addr(a)),
            RouteNetlinkMessage::NewRoute(r) => net.default_routes.extend(default_route(r)),
            _ => {}
        }
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_a_snapshot() {
        let mut eth = LinkMessage::default();
        eth.header.index = 2;
        eth.header.link_layer_type = LinkLayerType::Ether;
        eth.attributes = vec![LinkAttribute::IfName("eth0".into()), LinkAttribute::Address(vec![2, 0, 0, 0, 0, 7])];
        let mut lo = LinkMessage::default();
        lo.header.index = 1;
        lo.header.link_layer_type = LinkLayerType::Loopback;
        lo.attributes = vec![LinkAttribute::IfName("lo".into()), LinkAttribute::Address(vec![0; 6])];
        let mut nameless = LinkMessage::default();
        nameless.header.index = 9;

        let mut a4 = AddressMessage::default();
        a4.header.index = 2;
        a4.header.prefix_len = 24;
        // Point-to-point style: the local address wins over the peer's.
        a4.attributes = vec![
            AddressAttribute::Address("192.168.10.254".parse().unwrap()),
            AddressAttribute::Local("192.168.10.21".parse().unwrap()),
        ];
        let mut a6 = AddressMessage::default();
        a6.header.index = 2;
        a6.attributes = vec![AddressAttribute::Address("2001:db8::21".parse().unwrap())];

        let mut dflt = RouteMessage::default();
        dflt.header.address_family = AddressFamily::Inet;
        dflt.header.kind = RouteType::Unicast;
        dflt.header.table = RouteHeader::RT_TABLE_MAIN;
        dflt.attributes = vec![RouteAttribute::Oif(2), RouteAttribute::Priority(100)];
        let mut other_table = dflt.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        let mut subnet = dflt.clone();
        subnet.header.destination_prefix_length = 24;

        let net = from_messages(&[
            RouteNetlinkMessage::NewLink(eth),
            RouteNetlinkMessage::NewLink(lo),
            RouteNetlinkMessage::NewLink(nameless),
            RouteNetlinkMessage::NewAddress(a4),
            RouteNetlinkMessage::NewAddress(a6),
            RouteNetlinkMessage::NewAddress(AddressMessage::default()),
            RouteNetlinkMessage::NewRoute(dflt),
            RouteNetlinkMessage::NewRoute(other_table),
            RouteNetlinkMessage::NewRoute(subnet),
        ]);
        assert_eq!(
            net.links,
            vec![
                Link { index: 2, name: "eth0".into(), loopback: false, mac: Some([2, 0, 0, 0, 0, 7]) },
                Link { index: 1, name: "lo".into(), loopback: true, mac: None },
            ]
        );
        let ips: Vec<String> = net.addrs.iter().map(|a| a.ip.to_string()).collect();
        assert_eq!(ips, vec!["192.168.10.21", "2001:db8::21"]);
        assert_eq!(net.default_routes, vec![DefaultRoute { ipv4: true, index: 2, metric: 100 }]);
    }
}

//! From the core's view objects to the wire types. Done per client at send time: the log and the queues hold
//! shared pointers, which are much smaller than the encoded messages.

use causeway_api::v1::{self as pb, watch_event};

use crate::core::{Change, Delta, GlobalServiceView, IdentityView, IpView, NodeView, ObjectKey, Port, ViewObject};

pub(crate) fn event(
    kind: watch_event::Kind,
    revision: u64,
    epoch: u64,
    object: Option<watch_event::Object>,
) -> pb::WatchEvent {
    pb::WatchEvent { kind: kind as i32, revision, epoch, object }
}

pub(crate) fn upsert(obj: &ViewObject, revision: u64, epoch: u64) -> pb::WatchEvent {
    event(watch_event::Kind::Upsert, revision, epoch, Some(object(obj)))
}

pub(crate) fn delta(d: &Delta, epoch: u64) -> pb::WatchEvent {
    match &d.change {
        Change::Upsert(o) => upsert(o, d.revision, epoch),
        Change::Delete(k) => event(watch_event::Kind::Delete, d.revision, epoch, Some(key_only(k))),
    }
}

pub(crate) fn object(obj: &ViewObject) -> watch_event::Object {
    match obj {
        ViewObject::Service(s) => watch_event::Object::Service(service(s)),
        ViewObject::Identity(i) => watch_event::Object::Identity(identity(i)),
        ViewObject::Ip(i) => watch_event::Object::Ipcache(ip(i)),
        ViewObject::Node(n) => watch_event::Object::Node(node(n)),
    }
}

/// A DELETE carries only the fields that name the object.
fn key_only(k: &ObjectKey) -> watch_event::Object {
    match k {
        ObjectKey::Service(k) => watch_event::Object::Service(pb::GlobalService {
            namespace: k.namespace.to_string(),
            name: k.name.to_string(),
            ..Default::default()
        }),
        ObjectKey::Identity(id) => watch_event::Object::Identity(pb::Identity { id: *id, ..Default::default() }),
        ObjectKey::Ip(ip) => {
            watch_event::Object::Ipcache(pb::IpCacheEntry { ip: ip.to_string(), ..Default::default() })
        }
        ObjectKey::Node { cluster, name } => watch_event::Object::Node(pb::Node {
            cluster: cluster.to_string(),
            name: name.to_string(),
            ..Default::default()
        }),
    }
}

fn ports(ports: &[Port]) -> Vec<pb::PortSpec> {
    ports
        .iter()
        .map(|p| pb::PortSpec {
            name: p.name.to_string(),
            protocol: p.protocol.as_str().to_string(),
            port: u32::from(p.port),
        })
        .collect()
}

fn service(s: &GlobalServiceView) -> pb::GlobalService {
    pb::GlobalService {
        namespace: s.key.namespace.to_string(),
        name: s.key.name.to_string(),
        affinity: s.affinity.as_str().to_string(),
        frontends: s.frontends.iter().map(|f| pb::Frontend { ip: f.ip.to_string(), ports: ports(&f.ports) }).collect(),
        backends: s
            .clusters
            .iter()
            .flat_map(|c| {
                c.backends.iter().map(move |b| pb::Backend {
                    ip: b.ip.to_string(),
                    cluster: c.cluster.to_string(),
                    ports: ports(&b.ports),
                    zone: b.zone.as_deref().unwrap_or_default().to_string(),
                    hostname: b.hostname.as_deref().unwrap_or_default().to_string(),
                })
            })
            .collect(),
    }
}

fn identity(i: &IdentityView) -> pb::Identity {
    pb::Identity { id: i.id, cluster: i.cluster.to_string(), labels: i.labels.to_string() }
}

fn ip(i: &IpView) -> pb::IpCacheEntry {
    pb::IpCacheEntry {
        ip: i.ip.to_string(),
        identity: i.identity,
        host_ip: i.host_ip.map(|h| h.to_string()).unwrap_or_default(),
        cluster: i.cluster.to_string(),
        cluster_id: i.cluster_id,
        namespace: i.namespace.to_string(),
        pod_name: i.pod_name.to_string(),
        encrypt_key: u32::from(i.encrypt_key),
    }
}

fn node(n: &NodeView) -> pb::Node {
    pb::Node {
        cluster: n.cluster.to_string(),
        name: n.name.to_string(),
        cluster_id: n.cluster_id,
        internal_ips: n.internal_ips.iter().map(ToString::to_string).collect(),
        pod_cidrs: n.pod_cidrs.iter().map(ToString::to_string).collect(),
        zone: n.zone.as_deref().unwrap_or_default().to_string(),
        wireguard_pub_key: n.wireguard_pub_key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Affinity, Frontend, Protocol, ServiceKey};

    #[test]
    fn service_carries_frontends() {
        let port = Port { name: "http".into(), protocol: Protocol::Tcp, port: 80 };
        let v = GlobalServiceView {
            key: ServiceKey::new("shop", "cart"),
            affinity: Affinity::Local,
            frontends: vec![
                Frontend { ip: "10.96.0.10".parse().unwrap_or_else(|e| panic!("{e}")), ports: vec![port.clone()] },
                Frontend { ip: "fd00:96::10".parse().unwrap_or_else(|e| panic!("{e}")), ports: vec![port] },
            ],
            clusters: vec![],
        };
        let pb = service(&v);
        let http = pb::PortSpec { name: "http".into(), protocol: "TCP".into(), port: 80 };
        assert_eq!(
            pb.frontends,
            vec![
                pb::Frontend { ip: "10.96.0.10".into(), ports: vec![http.clone()] },
                pb::Frontend { ip: "fd00:96::10".into(), ports: vec![http] },
            ]
        );
        assert!(pb.backends.is_empty());
    }
}

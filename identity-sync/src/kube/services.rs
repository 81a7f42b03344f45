//! The local cluster's Services, as the merge needs them: which are global, how they share and prefer backends,
//! and how many ready local endpoints they have (for affinity).
//!
//! Two watches (Services, EndpointSlices in all namespaces) feed a pure [`LocalIndex`]; it emits a
//! [`LocalChange`] only when what the core sees of a service changes. Slices identity-sync writes itself are
//! ignored, so remote backends never count as local.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, instrument, warn};

use crate::core::local::LocalService;
use crate::core::model::{Frontend, Port, Protocol, ServiceKey};
use crate::kube::slices::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};

/// What the core is told about local services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalChange {
    /// A global service appeared or changed.
    Upsert(LocalService),
    /// A service is gone or no longer global.
    Delete(ServiceKey),
    /// Both watches have listed once: the core now knows every local global service.
    Synced,
}

#[derive(Debug, Default)]
struct SvcEntry {
    annotations: BTreeMap<String, String>,
    frontends: Vec<Frontend>,
}

/// Services and local ready-endpoint counts, reduced to [`LocalService`]s. Pure.
#[derive(Debug, Default)]
pub struct LocalIndex {
    services: BTreeMap<ServiceKey, SvcEntry>,
    /// Ready endpoints per service, per local slice name.
    ready: BTreeMap<ServiceKey, BTreeMap<String, u32>>,
    /// What the core was last told, per global service.
    emitted: BTreeMap<ServiceKey, LocalService>,
    init_services: Option<BTreeSet<ServiceKey>>,
    init_slices: Option<BTreeSet<(ServiceKey, String)>>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<ServiceKey> {
    Some(ServiceKey::new(meta.namespace.as_deref()?, meta.name.as_deref()?))
}

/// The Service's frontends: each ClusterIP (`spec.clusterIPs`, else `spec.clusterIP`; both families) with the
/// Service's ports. Headless ("None") and unset IPs give none; an unparsable IP is skipped with a warning.
fn frontends_of(s: &Service) -> Vec<Frontend> {
    let Some(spec) = &s.spec else { return Vec::new() };
    let ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let ports: Vec<Port> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            // The API defaults the protocol to TCP; ports outside u16 cannot pass API validation.
            let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(p.port).ok()?;
            Some(Port { name: p.name.as_deref().unwrap_or_default().into(), protocol, port })
        })
        .collect();
    ips.into_iter()
        .map(str::trim)
        .filter(|ip| !ip.is_empty() && !ip.eq_ignore_ascii_case("None"))
        .filter_map(|ip| match ip.parse() {
            Ok(ip) => Some(Frontend { ip, ports: ports.clone() }),
            Err(_) => {
                warn!(service = ?key_of(&s.metadata).map(|k| k.to_string()), ip, "ignoring unparsable ClusterIP");
                None
            }
        })
        .collect()
}

/// `(service, slice name, ready endpoints)` of a local slice; None for slices we manage or that name no service.
fn slice_info(s: &EndpointSlice) -> Option<(ServiceKey, String, u32)> {
    let labels = s.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY) {
        return None;
    }
    let svc = labels.get(SERVICE_NAME_LABEL)?;
    let ns = s.metadata.namespace.as_deref()?;
    let name = s.metadata.name.clone()?;
    // A missing `ready` condition means ready, per the EndpointSlice API.
    let ready = s.endpoints.iter().filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)).count();
    Some((ServiceKey::new(ns, svc), name, u32::try_from(ready).unwrap_or(u32::MAX)))
}

impl LocalIndex {
    fn recompute(&mut self, key: &ServiceKey, out: &mut Vec<LocalChange>) {
        let now = self.services.get(key).and_then(|e| {
            let ready: u32 =
                self.ready.get(key).map(|m| m.values().fold(0u32, |a, b| a.saturating_add(*b))).unwrap_or(0);
            let (svc, warnings) = LocalService::from_annotations(&key.namespace, &key.name, &e.annotations, ready);
            let svc = svc.with_frontends(e.frontends.clone());
            for w in warnings {
                warn!(service = %key, "{w}");
            }
            svc.global.then_some(svc)
        });
        match (now, self.emitted.get(key)) {
            (Some(now), Some(old)) if *old == now => {}
            (Some(now), _) => {
                self.emitted.insert(key.clone(), now.clone());
                out.push(LocalChange::Upsert(now));
            }
            (None, Some(_)) => {
                self.emitted.remove(key);
                out.push(LocalChange::Delete(key.clone()));
            }
            (None, None) => {}
        }
    }

    pub fn service_event(&mut self, ev: Event<Service>) -> Vec<LocalChange> {
        let mut out = Vec::new();
        match ev {
            Event::Init => self.init_services = Some(BTreeSet::new()),
            Event::Apply(s) | Event::InitApply(s) => {
                let Some(key) = key_of(&s.metadata) else { return out };
                if let Some(seen) = &mut self.init_services {
                    seen.insert(key.clone());
                }
                let frontends = frontends_of(&s);
                let annotations = s.metadata.annotations.unwrap_or_default();
                self.services.insert(key.clone(), SvcEntry { annotations, frontends });
                self.recompute(&key, &mut out);
            }
            Event::Delete(s) => {
                let Some(key) = key_of(&s.metadata) else { return out };
                self.services.remove(&key);
                self.recompute(&key, &mut out);
            }
            Event::InitDone => {
                if let Some(seen) = self.init_services.take() {
                    let gone: Vec<ServiceKey> = self.services.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                    for key in gone {
                        self.services.remove(&key);
                        self.recompute(&key, &mut out);
                    }
                }
            }
        }
        out
    }

    pub fn slice_event(&mut self, ev: Event<EndpointSlice>) -> Vec<LocalChange> {
        let mut out = Vec::new();
        match ev {
            Event::Init => self.init_slices = Some(BTreeSet::new()),
            Event::Apply(s) | Event::InitApply(s) => {
                let Some((key, name, ready)) = slice_info(&s) else { return out };
                if let Some(seen) = &mut self.init_slices {
                    seen.insert((key.clone(), name.clone()));
                }
                self.ready.entry(key.clone()).or_default().insert(name, ready);
                self.recompute(&key, &mut out);
            }
            Event::Delete(s) => {
                let Some((key, name, _)) = slice_info(&s) else { return out };
                self.remove_slice(&key, &name);
                self.recompute(&key, &mut out);
            }
            Event::InitDone => {
                if let Some(seen) = self.init_slices.take() {
                    let gone: Vec<(ServiceKey, String)> = self
                        .ready
                        .iter()
                        .flat_map(|(k, m)| m.keys().map(move |n| (k.clone(), n.clone())))
                        .filter(|e| !seen.contains(e))
                        .collect();
                    for (key, name) in gone {
                        self.remove_slice(&key, &name);
                        self.recompute(&key, &mut out);
                    }
                }
            }
        }
        out
    }

    fn remove_slice(&mut self, key: &ServiceKey, name: &str) {
        if let Some(m) = self.ready.get_mut(key) {
            m.remove(name);
            if m.is_empty() {
                self.ready.remove(key);
            }
        }
    }
}

/// Watches local Services and EndpointSlices and sends [`LocalChange`]s until `tx` closes. Watch errors are
/// retried with kube-runtime's default backoff.
#[instrument(name = "local_services", skip_all)]
pub async fn run(client: Client, tx: mpsc::Sender<LocalChange>) {
    let services = watcher::watcher(Api::<Service>::all(client.clone()), watcher::Config::default()).default_backoff();
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client), watcher::Config::default()).default_backoff();
    let mut services = std::pin::pin!(services);
    let mut slices = std::pin::pin!(slices);
    let mut index = LocalIndex::default();
    let (mut services_listed, mut slices_listed, mut synced_sent) = (false, false, false);
    loop {
        let changes = tokio::select! {
            ev = services.next() => match ev {
                Some(Ok(ev)) => {
                    services_listed |= matches!(ev, Event::InitDone);
                    index.service_event(ev)
                }
                Some(Err(e)) => {
                    warn!(error = %e, "watching local Services failed; retrying (check RBAC: list/watch services)");
                    continue;
                }
                None => return,
            },
            ev = slices.next() => match ev {
                Some(Ok(ev)) => {
                    slices_listed |= matches!(ev, Event::InitDone);
                    index.slice_event(ev)
                }
                Some(Err(e)) => {
                    warn!(error = %e, "watching local EndpointSlices failed; retrying (check RBAC: list/watch endpointslices)");
                    continue;
                }
                None => return,
            },
            _ = tx.closed() => return,
        };
        for c in changes {
            if tx.send(c).await.is_err() {
                return;
            }
        }
        if services_listed && slices_listed && !synced_sent {
            synced_sent = true;
            info!("local Services and EndpointSlices listed");
            if tx.send(LocalChange::Synced).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ann: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn slice(name: &str, svc: &str, ready: &[Option<bool>], ours: bool) -> EndpointSlice {
        let mut labels = BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), svc.to_string())]);
        if ours {
            labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
        }
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: ready
                .iter()
                .map(|r| Endpoint {
                    addresses: vec!["10.0.0.1".into()],
                    conditions: Some(EndpointConditions { ready: *r, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ports: None,
        }
    }

    #[test]
    fn only_global_services_reach_the_core_with_local_ready_counts() {
        let mut idx = LocalIndex::default();
        assert!(idx.service_event(Event::Apply(svc("plain", &[]))).is_empty());
        let c = idx.service_event(Event::Apply(svc("cart", &[("service.cilium.io/global", "true")])));
        assert!(matches!(&c[..], [LocalChange::Upsert(s)] if s.global && s.ready_local_endpoints == 0), "{c:?}");
        // Our own slices never count as local.
        assert!(idx.slice_event(Event::Apply(slice("cart-east", "cart", &[Some(true)], true))).is_empty());
        let c = idx.slice_event(Event::Apply(slice("cart-abc", "cart", &[Some(true), None, Some(false)], false)));
        assert!(matches!(&c[..], [LocalChange::Upsert(s)] if s.ready_local_endpoints == 2), "{c:?}");
        // Unchanged: nothing.
        assert!(idx.slice_event(Event::Apply(slice("cart-abc", "cart", &[Some(true), None], false))).is_empty());
        // No longer global: delete.
        let c = idx.service_event(Event::Apply(svc("cart", &[("service.cilium.io/global", "false")])));
        assert_eq!(c, vec![LocalChange::Delete(ServiceKey::new("shop", "cart"))]);
    }

    #[test]
    fn frontends_come_from_cluster_ips_and_ports() {
        use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
        let with_spec = |ips: Option<Vec<&str>>, ip: Option<&str>| {
            let mut s = svc("cart", &[("service.cilium.io/global", "true")]);
            s.spec = Some(ServiceSpec {
                cluster_ips: ips.map(|v| v.into_iter().map(String::from).collect()),
                cluster_ip: ip.map(String::from),
                ports: Some(vec![
                    ServicePort { name: Some("http".into()), port: 80, ..Default::default() },
                    ServicePort {
                        name: Some("dns".into()),
                        protocol: Some("UDP".into()),
                        port: 53,
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            });
            s
        };
        let ports = vec![
            Port { name: "http".into(), protocol: Protocol::Tcp, port: 80 },
            Port { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
        ];
        let fe = |ip: &str| Frontend { ip: ip.parse().unwrap_or_else(|e| panic!("{e}")), ports: ports.clone() };

        // Dual stack: both families; an unparsable IP is skipped.
        let f = frontends_of(&with_spec(Some(vec!["10.96.0.10", "fd00:96::10", "bogus"]), Some("10.96.0.10")));
        assert_eq!(f, vec![fe("10.96.0.10"), fe("fd00:96::10")]);
        // Fallback to spec.clusterIP.
        assert_eq!(frontends_of(&with_spec(None, Some("10.96.0.11"))), vec![fe("10.96.0.11")]);
        // Headless or unset: none.
        assert!(frontends_of(&with_spec(Some(vec!["None"]), Some("None"))).is_empty());
        assert!(frontends_of(&with_spec(None, None)).is_empty());
        assert!(frontends_of(&svc("cart", &[])).is_empty());

        // They reach the core; unchanged re-apply emits nothing; a change emits one upsert.
        let mut idx = LocalIndex::default();
        let c = idx.service_event(Event::Apply(with_spec(Some(vec!["10.96.0.10"]), None)));
        assert!(matches!(&c[..], [LocalChange::Upsert(s)] if s.frontends == vec![fe("10.96.0.10")]), "{c:?}");
        assert!(idx.service_event(Event::Apply(with_spec(Some(vec!["10.96.0.10"]), None))).is_empty());
        let c = idx.service_event(Event::Apply(with_spec(Some(vec!["None"]), None)));
        assert!(matches!(&c[..], [LocalChange::Upsert(s)] if s.frontends.is_empty()), "{c:?}");
    }

    #[test]
    fn relist_drops_what_vanished() {
        let mut idx = LocalIndex::default();
        idx.service_event(Event::Apply(svc("cart", &[("io.cilium/global-service", "true")])));
        idx.service_event(Event::Init);
        idx.service_event(Event::InitApply(svc("other", &[])));
        let c = idx.service_event(Event::InitDone);
        assert_eq!(c, vec![LocalChange::Delete(ServiceKey::new("shop", "cart"))]);
    }
}

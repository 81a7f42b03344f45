//! How long one full `Index::compute` takes as pods and policies grow. The controller recomputes every policy per
//! batch of changes, so this bounds how fast a new pod reaches the assignments (before the agents' share).
//!
//! `cargo run --release -p causeway-egress-gw --example compute_cost` prints the median of 15 computations per
//! size, the 1,000-pod run being the baseline the others are compared with.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use causeway_egress_gw::core::*;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn index(pods: usize, policies: usize) -> Index {
    let mut idx = Index::new(HealthConfig::default());
    let t = Instant::now();
    for n in 0..6u8 {
        let name = format!("gw-{n}");
        idx.apply_node(Node {
            name: name.clone(),
            labels: labels(&[("gw", "true".into()), (ZONE_LABEL, format!("z{}", n % 3))]),
            ips: vec![IpAddr::V4(Ipv4Addr::new(172, 18, 0, 10 + n))],
            interfaces: BTreeMap::from([("eth1".into(), vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))])]),
            default_interface: None,
        });
        for i in 0..3 {
            idx.probe(&name, true, t + Duration::from_millis(100 * i));
        }
    }
    for ns in 0..20 {
        idx.apply_namespace(Namespace { name: format!("ns{ns}"), labels: labels(&[("team", format!("t{}", ns % 5))]) });
    }
    for p in 0..pods {
        let ip = IpAddr::V4(Ipv4Addr::new(10, (p >> 16) as u8, (p >> 8) as u8, p as u8));
        idx.apply_pod(Pod {
            namespace: format!("ns{}", p % 20),
            name: format!("pod{p}"),
            labels: labels(&[("app", format!("app{}", p % 100))]),
            node: Some(format!("w{}", p % 50)),
            ips: vec![ip],
        });
    }
    for p in 0..policies {
        idx.apply_policy(PolicySpec {
            name: format!("policy{p}"),
            generation: 1,
            selectors: vec![SourceSelector {
                pods: Some(Selector::labels(&[("app", &format!("app{}", p % 100))])),
                namespaces: Some(Selector::labels(&[("team", &format!("t{}", p % 5))])),
                nodes: None,
            }],
            destinations: vec![format!("198.{}.0.0/16", p % 250).parse().expect("cidr")],
            excluded: vec![],
            groups: vec![GroupSpec {
                node_selector: Selector::labels(&[("gw", "true")]),
                egress_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))),
                interface: None,
                max_gateway_nodes: Some(2),
            }],
            az_affinity: ZoneAffinity::LocalOnlyFirst,
            malformed: vec![],
        });
    }
    idx
}

fn median_compute(pods: usize, policies: usize) -> (Duration, usize) {
    let mut idx = index(pods, policies);
    let mut times = Vec::new();
    let mut sources = 0;
    for _ in 0..15 {
        let t = Instant::now();
        let out = idx.compute();
        times.push(t.elapsed());
        sources = out.values().filter_map(|o| o.assignment.as_ref()).map(|a| a.source_ips.len()).sum();
    }
    times.sort();
    (times[times.len() / 2], sources)
}

fn main() {
    let (base, base_sources) = median_compute(1_000, 50);
    println!("pods   policies  compute(median)  x baseline  selected source IPs");
    println!("{:>6} {:>9} {:>14.2?} {:>11} {:>20}", 1_000, 50, base, "1.0", base_sources);
    for (pods, policies) in [(10_000, 50), (10_000, 200), (50_000, 200)] {
        let (t, sources) = median_compute(pods, policies);
        println!(
            "{:>6} {:>9} {:>14.2?} {:>11.1} {:>20}",
            pods,
            policies,
            t,
            t.as_secs_f64() / base.as_secs_f64(),
            sources
        );
    }
}

//! Index tests in the linkerd style: apply objects and probe results, compute, check what the outputs now hold.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;

const ROUND: Duration = Duration::from_millis(100);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A gateway-capable node: label `gw=true`, zone, node IP, and `eth1` carrying `egress` addresses.
fn gw_node(name: &str, zone: &str, node_ip: &str, egress: &[&str]) -> Node {
    Node {
        name: name.into(),
        labels: labels(&[("gw", "true"), (ZONE_LABEL, zone)]),
        ips: vec![ip(node_ip)],
        interfaces: BTreeMap::from([
            ("eth0".to_string(), vec![ip(node_ip)]),
            ("eth1".to_string(), egress.iter().map(|s| ip(s)).collect()),
        ]),
        default_interface: Some("eth0".into()),
    }
}

fn worker(name: &str, zone: &str, node_ip: &str) -> Node {
    Node {
        name: name.into(),
        labels: labels(&[(ZONE_LABEL, zone), ("pool", "workers")]),
        ips: vec![ip(node_ip)],
        interfaces: BTreeMap::from([("eth0".to_string(), vec![ip(node_ip)])]),
        default_interface: Some("eth0".into()),
    }
}

fn pod(ns: &str, name: &str, app: &str, node: &str, ips: &[&str]) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        node: Some(node.into()),
        ips: ips.iter().map(|s| ip(s)).collect(),
    }
}

fn group(egress_ip: Option<&str>, max: Option<usize>) -> GroupSpec {
    GroupSpec {
        node_selector: Selector::labels(&[("gw", "true")]),
        egress_ip: egress_ip.map(ip),
        interface: None,
        max_gateway_nodes: max,
    }
}

fn policy(name: &str, app: &str, dest: &[&str], groups: Vec<GroupSpec>) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        generation: 1,
        selectors: vec![SourceSelector { pods: Some(Selector::labels(&[("app", app)])), ..Default::default() }],
        destinations: dest.iter().map(|d| net(d)).collect(),
        excluded: vec![],
        groups,
        az_affinity: ZoneAffinity::Disabled,
        malformed: vec![],
    }
}

/// An index with a clock the test moves by hand.
struct Fx {
    idx: Index,
    now: Instant,
}

impl Fx {
    fn new() -> Self {
        let cfg = HealthConfig {
            rise: 3,
            fall: 3,
            hold_down: Duration::from_secs(2),
            stale_after: Duration::from_millis(600),
        };
        let mut idx = Index::new(cfg);
        idx.apply_namespace(Namespace { name: "shop".into(), labels: labels(&[("team", "payments")]) });
        idx.apply_namespace(Namespace { name: "dev".into(), labels: labels(&[("team", "dev")]) });
        Fx { idx, now: Instant::now() }
    }

    /// One probe round in which `up` nodes answer and `down` nodes do not.
    fn round(&mut self, up: &[&str], down: &[&str]) {
        self.now += ROUND;
        for n in up {
            self.idx.probe(n, true, self.now);
        }
        for n in down {
            self.idx.probe(n, false, self.now);
        }
    }

    fn rounds(&mut self, n: usize, up: &[&str], down: &[&str]) {
        for _ in 0..n {
            self.round(up, down);
        }
    }

    fn out(&mut self, policy: &str) -> PolicyOutput {
        self.idx.compute().remove(policy).expect("policy output")
    }

    fn active(&mut self, policy: &str, group: usize) -> Vec<String> {
        let out = self.out(policy);
        let a = out.assignment.expect("programmed");
        a.groups[group].gateways.iter().map(|g| g.node.clone()).collect()
    }

    fn zone_active(&mut self, policy: &str, zone: &str) -> Vec<String> {
        let out = self.out(policy);
        let a = out.assignment.expect("programmed");
        a.groups[0].by_zone.get(zone).map(|g| g.iter().map(|g| g.node.clone()).collect()).unwrap_or_default()
    }
}

fn three_gateways(fx: &mut Fx) {
    fx.idx.apply_node(gw_node("gw-a", "z1", "172.18.0.11", &["192.0.2.10"]));
    fx.idx.apply_node(gw_node("gw-b", "z2", "172.18.0.12", &["192.0.2.10"]));
    fx.idx.apply_node(gw_node("gw-c", "z2", "172.18.0.13", &["192.0.2.10"]));
    fx.idx.apply_node(worker("w1", "z1", "172.18.0.21"));
    fx.idx.apply_node(worker("w2", "z2", "172.18.0.22"));
}

fn reason(out: &PolicyOutput, type_: &str) -> (bool, String) {
    let c = out.condition(type_).expect("condition present");
    (c.status, c.reason.clone())
}

// ---- source selection -----------------------------------------------------------------------------------------

#[test]
fn selects_pods_by_pod_namespace_and_node_selectors() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    fx.idx.apply_pod(pod("shop", "billing-1", "billing", "w1", &["10.0.1.5", "fd00:10::5"]));
    fx.idx.apply_pod(pod("shop", "billing-2", "billing", "w2", &["10.0.2.6"]));
    fx.idx.apply_pod(pod("dev", "billing-3", "billing", "w1", &["10.0.1.7"]));
    fx.idx.apply_pod(pod("shop", "web-1", "web", "w1", &["10.0.1.8"]));
    let mut unscheduled = pod("shop", "billing-4", "billing", "w1", &[]);
    unscheduled.node = None;
    fx.idx.apply_pod(unscheduled);

    let mut p = policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]);
    p.selectors = vec![SourceSelector {
        pods: Some(Selector::labels(&[("app", "billing")])),
        namespaces: Some(Selector::labels(&[("team", "payments")])),
        nodes: None,
    }];
    fx.idx.apply_policy(p.clone());
    let a = fx.out("p").assignment.expect("programmed");
    assert_eq!(
        a.source_ips,
        vec![ip("10.0.1.5"), ip("10.0.2.6"), ip("fd00:10::5")],
        "dual-stack, dev and web left out"
    );

    // Restricting to pods on workers in z1 drops billing-2 (on w2).
    p.selectors[0].nodes = Some(Selector::labels(&[(ZONE_LABEL, "z1")]));
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.1.5"), ip("fd00:10::5")]);

    // Relabelling the namespace takes its pods out; deleting a pod removes its IPs.
    p.selectors[0].nodes = None;
    fx.idx.apply_policy(p);
    fx.idx.apply_namespace(Namespace { name: "shop".into(), labels: labels(&[("team", "other")]) });
    assert!(fx.out("p").assignment.expect("programmed").source_ips.is_empty());
    fx.idx.apply_namespace(Namespace { name: "shop".into(), labels: labels(&[("team", "payments")]) });
    fx.idx.delete_pod("shop", "billing-1");
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.2.6")]);
}

#[test]
fn match_expressions_and_the_cilium_namespace_label() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_pod(pod("shop", "a", "billing", "w1", &["10.0.1.1"]));
    fx.idx.apply_pod(pod("dev", "b", "billing", "w1", &["10.0.1.2"]));
    fx.idx.apply_pod(pod("dev", "c", "reports", "w1", &["10.0.1.3"]));
    let mut p = policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]);
    // Cilium manifests select the namespace through a pseudo-label in podSelector.
    p.selectors = vec![SourceSelector {
        pods: Some(Selector::labels(&[("app", "billing"), (CILIUM_NAMESPACE_LABEL, "dev")])),
        ..Default::default()
    }];
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.1.2")]);

    let req = |key: &str, op, values: &[&str]| Requirement {
        key: key.into(),
        op,
        values: values.iter().map(|s| s.to_string()).collect(),
    };
    p.selectors = vec![SourceSelector {
        pods: Some(Selector {
            match_labels: Labels::new(),
            requirements: vec![req("app", Operator::NotIn, &["billing"])],
        }),
        ..Default::default()
    }];
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.1.3")]);

    p.selectors = vec![SourceSelector {
        pods: Some(Selector {
            match_labels: Labels::new(),
            requirements: vec![
                req("app", Operator::In, &["billing", "reports"]),
                req("tier", Operator::DoesNotExist, &[]),
            ],
        }),
        namespaces: Some(Selector {
            match_labels: Labels::new(),
            requirements: vec![req("team", Operator::Exists, &[])],
        }),
        nodes: None,
    }];
    fx.idx.apply_policy(p.clone());
    assert_eq!(
        fx.out("p").assignment.expect("programmed").source_ips,
        vec![ip("10.0.1.1"), ip("10.0.1.2"), ip("10.0.1.3")]
    );

    // Namespaces by name through the label the apiserver sets, also before the Namespace object was seen.
    fx.idx.apply_pod(pod("crawler", "d", "crawl", "w1", &["10.0.1.4"]));
    p.selectors = vec![SourceSelector {
        namespaces: Some(Selector::labels(&[(NAMESPACE_NAME_LABEL, "crawler")])),
        ..Default::default()
    }];
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.1.4")]);
    fx.idx.apply_namespace(Namespace { name: "crawler".into(), labels: labels(&[("team", "crawl")]) });
    assert_eq!(fx.out("p").assignment.expect("programmed").source_ips, vec![ip("10.0.1.4")]);

    // A node selector alone selects nothing (the CRD rejects it; the core must not widen it to every pod).
    p.selectors = vec![SourceSelector { nodes: Some(Selector::default()), ..Default::default() }];
    fx.idx.apply_policy(p);
    assert!(fx.out("p").assignment.expect("programmed").source_ips.is_empty());
}

// ---- gateway choice, maxGatewayNodes, stability ----------------------------------------------------------------

#[test]
fn max_gateway_nodes_trims_the_healthy_set_in_name_order() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-c", "gw-b", "gw-a"], &[]);
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(Some("192.0.2.10"), Some(2))]));
    let out = fx.out("p");
    let g = &out.assignment.as_ref().expect("programmed").groups[0];
    assert_eq!(g.gateways.iter().map(|g| g.node.as_str()).collect::<Vec<_>>(), ["gw-a", "gw-b"]);
    assert_eq!(g.gateways[0].node_ip, ip("172.18.0.11"));
    assert_eq!(g.egress_ips, vec![ip("192.0.2.10")]);
    assert!(g.gateways[0].egress_ips.is_empty(), "egressIP groups SNAT to the group's address");
    assert_eq!(out.groups[0].active, vec![ip("172.18.0.11"), ip("172.18.0.12")]);
    assert_eq!(out.groups[0].healthy, vec![ip("172.18.0.11"), ip("172.18.0.12"), ip("172.18.0.13")]);
    assert_eq!(reason(&out, CONDITION_READY), (true, "GatewaysActive".into()));
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (false, "Valid".into()));
}

#[test]
fn adding_a_gateway_never_moves_the_existing_ones() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_policy(policy("full", "billing", &["203.0.113.0/24"], vec![group(None, Some(2))]));
    fx.idx.apply_policy(policy("open", "billing", &["198.51.100.0/24"], vec![group(None, None)]));
    // gw-b and gw-c come up first; gw-a (first by name) joins later.
    fx.rounds(3, &["gw-c", "gw-b"], &[]);
    assert_eq!(fx.active("full", 0), ["gw-b", "gw-c"]);
    assert_eq!(fx.active("open", 0), ["gw-b", "gw-c"]);
    fx.rounds(3, &["gw-a", "gw-b", "gw-c"], &[]);
    assert_eq!(fx.active("full", 0), ["gw-b", "gw-c"], "no room: the newcomer waits");
    assert_eq!(fx.active("open", 0), ["gw-b", "gw-c", "gw-a"], "room: appended, existing positions kept");
    // Its healthy list shows it though.
    assert_eq!(fx.out("full").groups[0].healthy.len(), 3);
}

#[test]
fn a_dead_gateway_is_replaced_in_its_own_slot_and_not_reinstated() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, Some(2))]));
    fx.rounds(3, &["gw-a", "gw-b", "gw-c"], &[]);
    assert_eq!(fx.active("p", 0), ["gw-a", "gw-b"]);

    // Two failed rounds are not enough (fall = 3).
    fx.rounds(2, &["gw-b", "gw-c"], &["gw-a"]);
    assert_eq!(fx.active("p", 0), ["gw-a", "gw-b"]);
    fx.round(&["gw-b", "gw-c"], &["gw-a"]);
    assert_eq!(fx.active("p", 0), ["gw-c", "gw-b"], "gw-b keeps position 1; gw-c takes gw-a's slot");

    // gw-a answers again: first held down, then healthy, but the slot stays with gw-c.
    fx.rounds(5, &["gw-a", "gw-b", "gw-c"], &[]);
    assert!(!fx.out("p").groups[0].healthy.contains(&ip("172.18.0.11")), "hold-down still running");
    fx.rounds(20, &["gw-a", "gw-b", "gw-c"], &[]);
    assert!(fx.out("p").groups[0].healthy.contains(&ip("172.18.0.11")));
    assert_eq!(fx.active("p", 0), ["gw-c", "gw-b"]);
}

#[test]
fn gateways_whose_reports_stop_are_dropped_on_tick() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, Some(1))]));
    fx.rounds(3, &["gw-a", "gw-b"], &[]);
    assert_eq!(fx.active("p", 0), ["gw-a"]);
    // Only gw-b keeps reporting; gw-a's reporter died with it.
    for _ in 0..5 {
        fx.round(&["gw-b"], &[]);
        fx.idx.tick(fx.now);
    }
    assert_eq!(fx.active("p", 0), ["gw-a"], "500 ms of silence is still within stale_after");
    fx.round(&["gw-b"], &[]);
    let changes = fx.idx.tick(fx.now);
    assert_eq!(changes.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(), ["gw-a"]);
    assert_eq!(fx.active("p", 0), ["gw-b"]);
}

#[test]
fn lowering_max_gateway_nodes_keeps_the_oldest_slots() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-b", "gw-c"], &[]);
    let mut p = policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]);
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.active("p", 0), ["gw-b", "gw-c"]);
    fx.rounds(3, &["gw-a", "gw-b", "gw-c"], &[]);
    assert_eq!(fx.active("p", 0), ["gw-b", "gw-c", "gw-a"]);
    p.groups[0].max_gateway_nodes = Some(2);
    fx.idx.apply_policy(p.clone());
    assert_eq!(fx.active("p", 0), ["gw-b", "gw-c"]);
    // Deleting and re-creating the policy starts from scratch.
    fx.idx.delete_policy("p");
    assert!(fx.idx.compute().is_empty());
    fx.idx.apply_policy(p);
    assert_eq!(fx.active("p", 0), ["gw-a", "gw-b"]);
}

#[test]
fn interface_and_default_route_groups_snat_to_each_gateways_own_addresses() {
    let mut fx = Fx::new();
    let mut a = gw_node("gw-a", "z1", "172.18.0.11", &["192.0.2.21", "192.0.2.99", "2001:db8::21"]);
    a.interfaces.insert("eth2".into(), vec![]);
    fx.idx.apply_node(a);
    fx.idx.apply_node(gw_node("gw-b", "z1", "172.18.0.12", &["192.0.2.22"]));
    fx.rounds(3, &["gw-a", "gw-b"], &[]);
    let mut iface = group(None, None);
    iface.interface = Some("eth1".into());
    let mut empty_iface = group(None, None);
    empty_iface.interface = Some("eth2".into());
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![iface, group(None, None), empty_iface]));
    let a = fx.out("p").assignment.expect("programmed");
    let gw = &a.groups[0].gateways;
    assert_eq!(gw[0].egress_ips, vec![ip("192.0.2.21"), ip("2001:db8::21")], "first address of each family");
    assert_eq!(gw[1].egress_ips, vec![ip("192.0.2.22")]);
    assert!(a.groups[0].egress_ips.is_empty());
    // Neither field: the default-route interface's address.
    assert_eq!(a.groups[1].gateways[0].egress_ips, vec![ip("172.18.0.11")]);
    // An interface without addresses (or missing) cannot serve.
    assert!(a.groups[2].gateways.is_empty());
}

// ---- zone affinity ---------------------------------------------------------------------------------------------

fn zoned(fx: &mut Fx, affinity: ZoneAffinity, max: Option<usize>) {
    three_gateways(fx);
    fx.idx.apply_node(worker("w3", "z3", "172.18.0.23"));
    fx.idx.apply_pod(pod("shop", "p1", "billing", "w1", &["10.0.1.5"]));
    fx.idx.apply_pod(pod("shop", "p2", "billing", "w2", &["10.0.2.5"]));
    let mut p = policy("p", "billing", &["203.0.113.0/24"], vec![group(Some("192.0.2.10"), max)]);
    p.az_affinity = affinity;
    fx.idx.apply_policy(p);
    fx.rounds(3, &["gw-a", "gw-b", "gw-c"], &[]);
}

#[test]
fn local_only_uses_only_gateways_in_the_source_zone() {
    let mut fx = Fx::new();
    zoned(&mut fx, ZoneAffinity::LocalOnly, None);
    assert_eq!(fx.zone_active("p", "z1"), ["gw-a"]);
    assert_eq!(fx.zone_active("p", "z2"), ["gw-b", "gw-c"]);
    assert!(fx.zone_active("p", "z3").is_empty(), "no gateway in z3");
    let out = fx.out("p");
    assert!(!out.has_problem(ProblemReason::NoHealthyGateway), "no selected pod runs in z3");
    assert_eq!(out.groups[0].active_by_zone.get("z1"), Some(&vec![ip("172.18.0.11")]));
    assert_eq!(out.groups[0].active, vec![ip("172.18.0.11"), ip("172.18.0.12"), ip("172.18.0.13")]);

    // gw-a dies: z1 has no gateway, and a selected pod runs there.
    fx.rounds(3, &["gw-b", "gw-c"], &["gw-a"]);
    assert!(fx.zone_active("p", "z1").is_empty(), "localOnly never falls back");
    let out = fx.out("p");
    assert!(out.has_problem(ProblemReason::NoHealthyGateway));
    assert!(out.problems.iter().any(|p| p.message.contains("z1")), "{:?}", out.problems);
    assert_eq!(reason(&out, CONDITION_READY), (false, "NoHealthyGateway".into()));
}

#[test]
fn local_only_first_falls_back_and_returns_home() {
    let mut fx = Fx::new();
    zoned(&mut fx, ZoneAffinity::LocalOnlyFirst, None);
    assert_eq!(fx.zone_active("p", "z1"), ["gw-a"]);
    assert_eq!(fx.zone_active("p", "z3"), ["gw-a", "gw-b", "gw-c"], "no local gateway: all of them");
    fx.rounds(3, &["gw-b", "gw-c"], &["gw-a"]);
    assert_eq!(fx.zone_active("p", "z1"), ["gw-b", "gw-c"]);
    assert!(!fx.out("p").has_problem(ProblemReason::NoHealthyGateway));
    // gw-a back after its hold-down: z1 is served locally again.
    fx.rounds(25, &["gw-a", "gw-b", "gw-c"], &[]);
    assert_eq!(fx.zone_active("p", "z1"), ["gw-a"]);
    assert_eq!(fx.zone_active("p", "z2"), ["gw-b", "gw-c"]);
}

#[test]
fn local_priority_prefers_local_gateways_when_trimming() {
    let mut fx = Fx::new();
    zoned(&mut fx, ZoneAffinity::LocalPriority, Some(2));
    assert_eq!(fx.zone_active("p", "z1"), ["gw-a", "gw-b"], "local first, then by name");
    assert_eq!(fx.zone_active("p", "z2"), ["gw-b", "gw-c"]);
    assert_eq!(fx.zone_active("p", "z3"), ["gw-a", "gw-b"]);
    // Zone-agnostic list (for sources without a zone) ignores locality.
    assert_eq!(fx.active("p", 0), ["gw-a", "gw-b"]);

    // gw-a fails: z1 takes the remote gw-c into gw-a's slot; when gw-a returns it takes the remote slot back.
    fx.rounds(3, &["gw-b", "gw-c"], &["gw-a"]);
    assert_eq!(fx.zone_active("p", "z1"), ["gw-c", "gw-b"]);
    fx.rounds(25, &["gw-a", "gw-b", "gw-c"], &[]);
    // One remote slot (the last) goes back to the local gateway; the other remote keeps its position.
    assert_eq!(fx.zone_active("p", "z1"), ["gw-c", "gw-a"]);
    assert_eq!(fx.zone_active("p", "z2"), ["gw-b", "gw-c"], "z2 was never disturbed");
}

// ---- status reasons ---------------------------------------------------------------------------------------------

#[test]
fn both_egress_ip_and_interface_is_invalid_and_not_programmed() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    let mut g = group(Some("192.0.2.10"), None);
    g.interface = Some("eth1".into());
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None), g]));
    let out = fx.out("p");
    assert!(out.assignment.is_none(), "left out of the datapath");
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (true, "BothEgressIPAndInterface".into()));
    assert!(out.condition(CONDITION_INVALID_SPEC).is_some_and(|c| c.message.contains("egressGroups[1]")));
    assert_eq!(reason(&out, CONDITION_READY), (false, "BothEgressIPAndInterface".into()));
}

#[test]
fn egress_ip_on_no_selected_node_is_reported_until_a_node_has_it() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a", "gw-b", "gw-c"], &[]);
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(Some("192.0.2.77"), None)]));
    let out = fx.out("p");
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (true, "EgressIPNotOnAnyNode".into()));
    assert!(out.problems[0].message.contains("192.0.2.77") && out.problems[0].message.contains("gw-a, gw-b, gw-c"));
    assert!(out.assignment.as_ref().is_some_and(|a| a.groups[0].gateways.is_empty()), "fails closed");
    assert!(!reason(&out, CONDITION_READY).0);

    // The agent on gw-b reports the address configured: gw-b alone serves the group.
    fx.idx.apply_node(gw_node("gw-b", "z2", "172.18.0.12", &["192.0.2.10", "192.0.2.77"]));
    let out = fx.out("p");
    assert!(!out.has_problem(ProblemReason::EgressIPNotOnAnyNode));
    assert_eq!(out.groups[0].active, vec![ip("172.18.0.12")]);
    assert_eq!(reason(&out, CONDITION_READY), (true, "GatewaysActive".into()));

    // A selector matching no node says so.
    let mut g = group(Some("192.0.2.10"), None);
    g.node_selector = Selector::labels(&[("gw", "nowhere")]);
    fx.idx.apply_policy(policy("q", "billing", &["203.0.113.0/24"], vec![g]));
    let out = fx.out("q");
    assert!(out
        .problems
        .iter()
        .any(|p| p.reason == ProblemReason::EgressIPNotOnAnyNode && p.message.contains("selects no node")));
}

#[test]
fn two_policies_claiming_the_same_traffic_are_both_flagged() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    fx.idx.apply_pod(pod("shop", "b1", "billing", "w1", &["10.0.1.5"]));
    fx.idx.apply_pod(pod("shop", "r1", "reports", "w1", &["10.0.1.6"]));
    fx.idx.apply_policy(policy("a-billing", "billing", &["203.0.113.0/24"], vec![group(None, None)]));
    // Different pods, same destination: no conflict.
    fx.idx.apply_policy(policy("b-reports", "reports", &["203.0.113.0/24"], vec![group(None, None)]));
    // Same pods, disjoint destination: no conflict.
    fx.idx.apply_policy(policy("c-billing-other", "billing", &["198.51.100.0/24"], vec![group(None, None)]));
    let all = fx.idx.compute();
    assert!(all.values().all(|o| !o.has_problem(ProblemReason::OverlappingPolicy)));

    // Same pods, nested destination.
    fx.idx.apply_policy(policy("d-billing-host", "billing", &["203.0.113.7/32"], vec![group(None, None)]));
    let all = fx.idx.compute();
    for (name, other) in [("a-billing", "d-billing-host"), ("d-billing-host", "a-billing")] {
        let out = &all[name];
        assert_eq!(reason(out, CONDITION_INVALID_SPEC), (true, "OverlappingPolicy".into()), "{name}");
        let msg = &out.condition(CONDITION_INVALID_SPEC).expect("cond").message;
        assert!(msg.contains(other) && msg.contains("shop/b1") && msg.contains("203.0.113.7/32"), "{msg}");
        assert!(out.assignment.is_some(), "still programmed; agents let the first name win");
    }
    assert!(!all["b-reports"].has_problem(ProblemReason::OverlappingPolicy));

    // Excluding the overlap in one of them resolves it.
    let mut a = policy("a-billing", "billing", &["203.0.113.0/24"], vec![group(None, None)]);
    a.excluded = vec![net("203.0.113.0/29")];
    fx.idx.apply_policy(a);
    assert!(!fx.out("d-billing-host").has_problem(ProblemReason::OverlappingPolicy));
}

#[test]
fn excluded_cidr_outside_the_destinations_is_flagged_but_programmed() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    let mut p = policy("p", "billing", &["203.0.113.0/24", "2001:db8:100::/48"], vec![group(None, None)]);
    p.excluded = vec![net("203.0.113.128/25"), net("2001:db8:100:1::/64"), net("198.51.100.0/24")];
    fx.idx.apply_policy(p);
    let out = fx.out("p");
    let problems: Vec<_> = out.problems.iter().map(|p| (p.reason, p.message.clone())).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, ProblemReason::ExcludedCIDROutsideDestinations);
    assert!(problems[0].1.contains("198.51.100.0/24"));
    assert_eq!(reason(&out, CONDITION_READY), (true, "GatewaysActive".into()));
    let a = out.assignment.expect("programmed");
    assert_eq!(a.destination_cidrs, vec![net("203.0.113.0/24"), net("2001:db8:100::/48")]);
    assert_eq!(a.excluded_cidrs, vec![net("198.51.100.0/24"), net("203.0.113.128/25"), net("2001:db8:100:1::/64")]);
}

#[test]
fn no_healthy_gateway_fails_closed() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_pod(pod("shop", "b1", "billing", "w1", &["10.0.1.5"]));
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]));
    let out = fx.out("p");
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (true, "NoHealthyGateway".into()));
    assert_eq!(reason(&out, CONDITION_READY), (false, "NoHealthyGateway".into()));
    let a = out.assignment.expect("still assigned, with no gateway");
    assert!(a.groups[0].gateways.is_empty());
    assert_eq!(a.source_ips, vec![ip("10.0.1.5")], "agents must know which traffic to drop");
    fx.rounds(3, &["gw-a"], &[]);
    assert_eq!(reason(&fx.out("p"), CONDITION_READY), (true, "GatewaysActive".into()));
}

#[test]
fn malformed_fields_block_programming() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    let mut p = policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]);
    p.malformed = vec!["destinationCIDRs[1] \"bogus\" is not a CIDR".into()];
    fx.idx.apply_policy(p);
    let out = fx.out("p");
    assert!(out.assignment.is_none());
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (true, "MalformedSpec".into()));
    assert!(out.condition(CONDITION_INVALID_SPEC).is_some_and(|c| c.message.contains("bogus")));
}

// ---- mesh: in-cluster destinations never use the gateway --------------------------------------------------------

#[test]
fn cluster_and_remote_cidrs_are_carved_out_of_destinations() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.rounds(3, &["gw-a"], &[]);
    fx.idx.set_cluster_networks(ClusterNetworks {
        pod_cidrs: vec![net("10.0.0.0/16"), net("fd00:10::/48")],
        service_cidrs: vec![net("10.96.0.0/12")],
        remote_pod_cidrs: BTreeMap::from([("west".to_string(), vec![net("10.1.0.0/16")])]),
    });
    fx.idx.apply_policy(policy("all", "billing", &["0.0.0.0/0", "::/0"], vec![group(None, None)]));
    let out = fx.out("all");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let a = out.assignment.expect("programmed");
    assert_eq!(
        a.excluded_cidrs,
        vec![net("10.0.0.0/16"), net("10.1.0.0/16"), net("10.96.0.0/12"), net("fd00:10::/48")]
    );

    // A destination entirely inside a meshed cluster's pods is useless: excluded and flagged.
    fx.idx.apply_policy(policy("west", "billing", &["10.1.4.0/24", "203.0.113.0/24"], vec![group(None, None)]));
    let out = fx.out("west");
    assert_eq!(reason(&out, CONDITION_INVALID_SPEC), (true, "DestinationInsideCluster".into()));
    assert!(out.problems[0].message.contains("cluster west's pod CIDR 10.1.0.0/16"), "{:?}", out.problems);
    let a = out.assignment.expect("the rest is programmed");
    assert_eq!(a.excluded_cidrs, vec![net("10.1.4.0/24")]);
}

#[test]
fn outputs_are_deterministic_across_recomputation() {
    let mut fx = Fx::new();
    zoned(&mut fx, ZoneAffinity::LocalPriority, Some(2));
    let first = fx.idx.compute();
    let second = fx.idx.compute();
    assert_eq!(first, second, "computing again without changes changes nothing");
}

// ---- what the adapters read besides the outputs ----------------------------------------------------------------

#[test]
fn matched_pods_counts_selected_pods_not_ips() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]));
    assert_eq!(fx.out("p").matched_pods, 0);
    fx.idx.apply_pod(pod("shop", "billing-1", "billing", "w1", &["10.0.1.5", "fd00:10::5"]));
    fx.idx.apply_pod(pod("shop", "billing-2", "billing", "w2", &["10.0.2.6"]));
    fx.idx.apply_pod(pod("shop", "web-1", "web", "w1", &["10.0.1.8"]));
    let out = fx.out("p");
    assert_eq!(out.matched_pods, 2, "two billing pods, one dual-stack; web left out");
    assert_eq!(out.assignment.expect("programmed").source_ips.len(), 3);
    fx.idx.delete_pod("shop", "billing-2");
    assert_eq!(fx.out("p").matched_pods, 1);
}

#[test]
fn gateway_candidates_are_the_nodes_some_group_selects_with_their_first_ip() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    assert!(fx.idx.gateway_candidates().is_empty(), "no policy, nothing to probe");
    fx.idx.apply_policy(policy("p", "billing", &["203.0.113.0/24"], vec![group(None, None)]));
    let c = fx.idx.gateway_candidates();
    assert_eq!(
        c.into_iter().collect::<Vec<_>>(),
        vec![
            ("gw-a".to_string(), ip("172.18.0.11")),
            ("gw-b".to_string(), ip("172.18.0.12")),
            ("gw-c".to_string(), ip("172.18.0.13")),
        ]
    );
    // A node without an address cannot be reached, so it is not probed; a deleted node leaves the set.
    let mut no_ip = gw_node("gw-d", "z1", "172.18.0.14", &[]);
    no_ip.ips.clear();
    fx.idx.apply_node(no_ip);
    fx.idx.delete_node("gw-b");
    let names: Vec<String> = fx.idx.gateway_candidates().into_keys().collect();
    assert_eq!(names, vec!["gw-a", "gw-c"]);
    fx.idx.delete_policy("p");
    assert!(fx.idx.gateway_candidates().is_empty());
}

#[test]
fn node_zones_lists_nodes_with_a_zone_label() {
    let mut fx = Fx::new();
    three_gateways(&mut fx);
    let mut bare = worker("w3", "", "172.18.0.23");
    bare.labels.remove(ZONE_LABEL);
    fx.idx.apply_node(bare);
    let zones = fx.idx.node_zones();
    assert_eq!(zones.get("gw-a").map(String::as_str), Some("z1"));
    assert_eq!(zones.get("w2").map(String::as_str), Some("z2"));
    assert_eq!(zones.len(), 5, "w3 has no zone: {zones:?}");
}

//! `causeway egress status`: per EgressGatewayPolicy and egress group, the active and healthy gateways (by zone
//! when azAffinity is on), the matched pods, SNAT port use and what is wrong with the policy.
//!
//! Policies and their status come from the kube API (written by egress-gw). SNAT port use comes from the gateway
//! node agents' `causeway_node_agent_snat_ports_in_use{egress_ip,destination}` gauge at
//! `http://<node ip>:<port>/metrics`. An agent that cannot be scraped shows `?` and a footnote; it never fails the
//! command, because status is what an operator reaches for when something is already broken.
//!
//! [`build_report`] and [`render_table`] are plain functions over JSON objects and scraped samples; [`collect`] is
//! the adapter that fetches both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use causeway_crds::egress::{CONDITION_INVALID_SPEC, CONDITION_READY};
use causeway_crds::{EgressGatewayPolicy, EgressGatewayPolicySpec, EgressGatewayPolicyStatus};
use ipnet::IpNet;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::Api;
use serde::Serialize;

use crate::promtext::{self, Sample};
use crate::{Error, KubeTarget};

/// The node agent's SNAT port gauge (with the registry's `causeway_` prefix).
pub const SNAT_METRIC: &str = "causeway_node_agent_snat_ports_in_use";
/// The node agent's default metrics port.
pub const DEFAULT_AGENT_METRICS_PORT: u16 = 9964;

/// A condition worth showing: InvalidSpec that is True, or Ready that is not True.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
}

/// SNAT port use on one gateway, for one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPorts {
    pub node_ip: String,
    /// None: the agent could not be scraped (see the report's `unreachableAgents`).
    pub ports_in_use: Option<u64>,
}

/// One egress group of one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupReport {
    pub index: usize,
    /// `egressIP`, `interface <name>`, or `default route` (the gateway's default-route address).
    pub egress: String,
    #[serde(rename = "activeGatewayIPs")]
    pub active_gateway_ips: Vec<String>,
    #[serde(rename = "activeGatewayIPsByAZ", skip_serializing_if = "BTreeMap::is_empty")]
    pub active_gateway_ips_by_az: BTreeMap<String, Vec<String>>,
    #[serde(rename = "healthyGatewayIPs")]
    pub healthy_gateway_ips: Vec<String>,
    /// Per gateway (active or healthy) the ports used by this group's traffic.
    pub snat: Vec<GatewayPorts>,
}

impl GroupReport {
    /// Sum over the gateways that answered; None when none did.
    pub fn snat_total(&self) -> Option<u64> {
        let known: Vec<u64> = self.snat.iter().filter_map(|g| g.ports_in_use).collect();
        (!known.is_empty()).then(|| known.iter().sum())
    }
}

/// One policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub name: String,
    /// `status.matchedPods`; None when the controller does not (yet) report it.
    pub matched_pods: Option<i64>,
    /// The Ready condition's status (`True`, `False`, `Unknown`), None before the controller wrote status.
    pub ready: Option<String>,
    /// The controller has not caught up with the latest spec (observedGeneration < generation).
    pub stale: bool,
    pub problems: Vec<Problem>,
    /// The object could not be read as an EgressGatewayPolicy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    pub groups: Vec<GroupReport>,
}

/// An agent that could not be scraped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentError {
    pub node_ip: String,
    pub url: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressReport {
    pub policies: Vec<PolicyReport>,
    pub unreachable_agents: Vec<AgentError>,
    /// Which egress-gw replica acts, from its leader Lease; None when the Lease could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerReport>,
}

/// The egress-gw leader Lease (`<namespace>/causeway-egress-gw`), as an operator needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerReport {
    /// The pod that holds the Lease (the holder identity without its random suffix); None: nobody.
    pub leader: Option<String>,
    /// Seconds since the last renewal, by this machine's clock; None when the Lease names no renewal.
    pub renewed_seconds_ago: Option<i64>,
    /// The last renewal is older than the Lease's duration: no replica is acting (assignments already in the
    /// datapath stay; new pods and gateway failures wait for a leader).
    pub expired: bool,
}

/// The leader Lease egress-gw replicas elect with.
pub const CONTROLLER_LEASE: &str = "causeway-egress-gw";

/// The controller line of the report, from the Lease object (JSON) and the current time (Unix seconds).
pub fn controller_report(lease: &serde_json::Value, now_unix: i64) -> ControllerReport {
    let holder = lease.pointer("/spec/holderIdentity").and_then(|v| v.as_str()).filter(|h| !h.is_empty());
    let leader = holder.map(|h| h.rsplit_once('_').map_or(h, |(pod, _)| pod).to_string());
    let renewed = lease
        .pointer("/spec/renewTime")
        .and_then(|v| v.as_str())
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| now_unix - t.as_second());
    let duration = lease.pointer("/spec/leaseDurationSeconds").and_then(|v| v.as_i64()).unwrap_or(0);
    let expired = leader.is_none() || renewed.is_none_or(|ago| ago > duration);
    ControllerReport { leader, renewed_seconds_ago: renewed, expired }
}

fn controller_line(c: &ControllerReport) -> String {
    let ago = c.renewed_seconds_ago.map(|s| format!(", renewed {s}s ago")).unwrap_or_default();
    match (&c.leader, c.expired) {
        (Some(pod), false) => format!("egress-gw: {pod} leads{ago}\n"),
        (Some(pod), true) => format!(
            "egress-gw: NO REPLICA ACTING: {pod}'s leader Lease expired{ago}; assignments already in the datapath stay, \
             new pods and gateway failures wait for a leader\n"
        ),
        (None, _) => "egress-gw: NO REPLICA ACTING: nobody holds the leader Lease\n".to_string(),
    }
}

/// What scraping each agent gave: its samples, or why there are none.
pub type Scrapes = BTreeMap<String, Result<Vec<Sample>, AgentError>>;

fn parse_spec(obj: &serde_json::Value) -> Result<EgressGatewayPolicySpec, String> {
    let spec = obj.get("spec").cloned().unwrap_or(serde_json::Value::Null);
    serde_json::from_value(spec).map_err(|e| format!("spec does not parse: {e}"))
}

fn parse_status(obj: &serde_json::Value) -> Result<Option<EgressGatewayPolicyStatus>, String> {
    match obj.get("status") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(s) => serde_json::from_value(s.clone()).map(Some).map_err(|e| format!("status does not parse: {e}")),
    }
}

fn name_of(obj: &serde_json::Value) -> String {
    obj.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("<unnamed>").to_string()
}

/// Node IPs whose agents may hold SNAT state for some policy: active and healthy gateways. Healthy but inactive
/// gateways are included because flows stay pinned to the gateway they started on after a reassignment.
pub fn gateway_ips(policies: &[serde_json::Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in policies {
        if let Ok(Some(status)) = parse_status(p) {
            for g in status.group_statuses {
                out.extend(g.active_gateway_ips);
                out.extend(g.healthy_gateway_ips);
                out.extend(g.active_gateway_ips_by_az.into_values().flatten());
            }
        }
    }
    out
}

fn parse_nets(cidrs: &[String]) -> Vec<IpNet> {
    cidrs.iter().filter_map(|c| c.parse().ok()).collect()
}

/// Whether a SNAT sample belongs to a group: its destination is in the policy's destinations and not excluded,
/// and its egress IP is the group's (when the group names one; otherwise any egress IP of that gateway counts).
fn sample_matches(s: &Sample, egress_ip: Option<IpAddr>, dst: &[IpNet], excluded: &[IpNet]) -> bool {
    let Some(d) = s.labels.get("destination").and_then(|d| d.parse::<IpAddr>().ok()) else {
        return false;
    };
    if !dst.iter().any(|n| n.contains(&d)) || excluded.iter().any(|n| n.contains(&d)) {
        return false;
    }
    match egress_ip {
        None => true,
        Some(want) => s.labels.get("egress_ip").and_then(|e| e.parse::<IpAddr>().ok()) == Some(want),
    }
}

/// Builds the report from policy objects (as JSON, so that a malformed one or a status field newer than this
/// binary is shown rather than fatal) and the scraped agents.
pub fn build_report(policies: &[serde_json::Value], scrapes: &Scrapes) -> EgressReport {
    let mut out = Vec::new();
    for obj in policies {
        let name = name_of(obj);
        let matched_pods = obj.pointer("/status/matchedPods").and_then(|v| v.as_i64());
        let generation = obj.pointer("/metadata/generation").and_then(|v| v.as_i64());
        let (spec, status) = match (parse_spec(obj), parse_status(obj)) {
            (Ok(spec), Ok(status)) => (spec, status.unwrap_or_default()),
            (Err(e), _) | (_, Err(e)) => {
                out.push(PolicyReport {
                    name,
                    matched_pods,
                    ready: None,
                    stale: false,
                    problems: Vec::new(),
                    unreadable: Some(e),
                    groups: Vec::new(),
                });
                continue;
            }
        };
        let ready = status.conditions.iter().find(|c| c.type_ == CONDITION_READY).map(|c| c.status.clone());
        let problems = status
            .conditions
            .iter()
            .filter(|c| {
                (c.type_ == CONDITION_INVALID_SPEC && c.status == "True")
                    || (c.type_ == CONDITION_READY && c.status != "True")
            })
            .map(|c| Problem { type_: c.type_.clone(), reason: c.reason.clone(), message: c.message.clone() })
            .collect();
        let stale = matches!((status.observed_generation, generation), (Some(o), Some(g)) if o < g);
        let (dst, excluded) = (parse_nets(&spec.destination_cidrs), parse_nets(&spec.excluded_cidrs));
        let mut groups = Vec::new();
        for (index, group) in spec.egress_groups.iter().enumerate() {
            let gs = status.group_statuses.get(index).cloned().unwrap_or_default();
            let egress = match (&group.egress_ip, &group.interface) {
                (Some(ip), _) => ip.clone(),
                (None, Some(ifname)) => format!("interface {ifname}"),
                (None, None) => "default route".to_string(),
            };
            let egress_ip = group.egress_ip.as_deref().and_then(|ip| ip.parse().ok());
            let mut nodes: Vec<String> = Vec::new();
            for ip in gs.active_gateway_ips.iter().chain(gs.active_gateway_ips_by_az.values().flatten()) {
                if !nodes.contains(ip) {
                    nodes.push(ip.clone());
                }
            }
            for ip in &gs.healthy_gateway_ips {
                if !nodes.contains(ip) {
                    nodes.push(ip.clone());
                }
            }
            let snat = nodes
                .into_iter()
                .map(|node_ip| {
                    let ports_in_use = match scrapes.get(&node_ip) {
                        Some(Ok(samples)) => Some(
                            promtext::samples(samples, SNAT_METRIC)
                                .filter(|s| sample_matches(s, egress_ip, &dst, &excluded))
                                .map(|s| if s.value.is_finite() && s.value > 0.0 { s.value as u64 } else { 0 })
                                .sum(),
                        ),
                        _ => None,
                    };
                    GatewayPorts { node_ip, ports_in_use }
                })
                .collect();
            groups.push(GroupReport {
                index,
                egress,
                active_gateway_ips: gs.active_gateway_ips,
                active_gateway_ips_by_az: gs.active_gateway_ips_by_az,
                healthy_gateway_ips: gs.healthy_gateway_ips,
                snat,
            });
        }
        out.push(PolicyReport { name, matched_pods, ready, stale, problems, unreadable: None, groups });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let unreachable_agents = scrapes.values().filter_map(|r| r.as_ref().err().cloned()).collect();
    EgressReport { policies: out, unreachable_agents, controller: None }
}

fn list_or_dash(ips: &[String]) -> String {
    if ips.is_empty() {
        "-".to_string()
    } else {
        ips.join(",")
    }
}

fn active_cell(g: &GroupReport) -> String {
    if g.active_gateway_ips_by_az.is_empty() {
        list_or_dash(&g.active_gateway_ips)
    } else {
        g.active_gateway_ips_by_az
            .iter()
            .map(|(az, ips)| format!("{az}:{}", list_or_dash(ips)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn status_cell(p: &PolicyReport) -> String {
    if p.unreadable.is_some() {
        return "Unreadable".to_string();
    }
    let mut s = match (p.ready.as_deref(), p.problems.iter().find(|c| c.type_ == CONDITION_READY)) {
        (None, _) => "Pending".to_string(),
        (Some("True"), _) => "Ready".to_string(),
        (Some(_), Some(c)) if !c.reason.is_empty() => format!("NotReady({})", c.reason),
        (Some(_), _) => "NotReady".to_string(),
    };
    for c in p.problems.iter().filter(|c| c.type_ == CONDITION_INVALID_SPEC) {
        s.push_str(&format!(" InvalidSpec({})", c.reason));
    }
    if p.stale {
        s.push_str(" (status not yet for the latest spec)");
    }
    s
}

/// The table, footnotes for unreachable agents, and the InvalidSpec/NotReady messages.
pub fn render_table(report: &EgressReport) -> String {
    let controller = report.controller.as_ref().map(controller_line).unwrap_or_default();
    if report.policies.is_empty() {
        return format!("{controller}No EgressGatewayPolicy found.\n");
    }
    // Footnote numbers, one per unreachable agent, in the order they first appear in the table.
    let mut footnotes: Vec<&AgentError> = Vec::new();
    let by_ip: BTreeMap<&str, &AgentError> =
        report.unreachable_agents.iter().map(|a| (a.node_ip.as_str(), a)).collect();
    let mut rows: Vec<[String; 8]> =
        vec![["POLICY", "GROUP", "EGRESS", "ACTIVE", "HEALTHY", "MATCHED PODS", "SNAT PORTS", "STATUS"]
            .map(String::from)];
    for p in &report.policies {
        let pods = p.matched_pods.map(|n| n.to_string()).unwrap_or_else(|| "-".to_string());
        if p.groups.is_empty() {
            rows.push([
                p.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                pods,
                "-".into(),
                status_cell(p),
            ]);
            continue;
        }
        for g in &p.groups {
            let mut marks = Vec::new();
            for gw in g.snat.iter().filter(|gw| gw.ports_in_use.is_none()) {
                let n = match footnotes.iter().position(|a| a.node_ip == gw.node_ip) {
                    Some(i) => i + 1,
                    None => match by_ip.get(gw.node_ip.as_str()) {
                        Some(a) => {
                            footnotes.push(a);
                            footnotes.len()
                        }
                        None => continue,
                    },
                };
                marks.push(format!("?[{n}]"));
            }
            let snat = match (g.snat.is_empty(), g.snat_total(), marks.is_empty()) {
                (true, _, _) => "-".to_string(),
                (false, Some(t), true) => t.to_string(),
                (false, Some(t), false) => format!("{t}+{}", marks.join("")),
                (false, None, _) => marks.join(""),
            };
            rows.push([
                p.name.clone(),
                g.index.to_string(),
                g.egress.clone(),
                active_cell(g),
                list_or_dash(&g.healthy_gateway_ips),
                pods.clone(),
                snat,
                status_cell(p),
            ]);
        }
    }
    let widths: Vec<usize> = (0..8).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = controller;
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for (i, a) in footnotes.iter().enumerate() {
        out.push_str(&format!("[{}] ? = node agent at {} not reachable: {}\n", i + 1, a.url, a.error));
    }
    let mut first = true;
    for p in &report.policies {
        let mut lines = Vec::new();
        if let Some(e) = &p.unreadable {
            lines.push(format!("{}: cannot be read: {e}", p.name));
        }
        for c in &p.problems {
            let msg = if c.message.is_empty() { String::new() } else { format!(": {}", c.message) };
            if c.type_ == CONDITION_READY {
                lines.push(format!("{}: not Ready ({}){msg}", p.name, c.reason));
            } else {
                lines.push(format!("{}: {} {}{msg}", p.name, c.type_, c.reason));
            }
        }
        for l in lines {
            if std::mem::take(&mut first) {
                out.push('\n');
            }
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// `http://<ip>:<port>/metrics`, with brackets for IPv6.
pub fn metrics_url(node_ip: &str, port: u16) -> String {
    match node_ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("http://[{v6}]:{port}/metrics"),
        _ => format!("http://{node_ip}:{port}/metrics"),
    }
}

async fn scrape(http: reqwest::Client, node_ip: String, port: u16) -> (String, Result<Vec<Sample>, AgentError>) {
    let url = metrics_url(&node_ip, port);
    let err = |error: String| AgentError { node_ip: node_ip.clone(), url: url.clone(), error };
    tracing::debug!(node = %node_ip, %url, "scraping node agent metrics");
    let result = match http.get(&url).send().await {
        Err(e) => Err(err(describe_reqwest(&e))),
        Ok(resp) if !resp.status().is_success() => Err(err(format!("HTTP {}", resp.status()))),
        Ok(resp) => match resp.text().await {
            Ok(text) => Ok(promtext::parse(&text)),
            Err(e) => Err(err(describe_reqwest(&e))),
        },
    };
    (node_ip, result)
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    // The innermost cause ("Connection refused (os error 111)") is what tells an operator what to check.
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        return e.to_string();
    };
    let detail = cause.to_string();
    if detail.is_empty() || std::ptr::addr_eq(cause, e as &dyn std::error::Error) {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// Lists the policies and scrapes every gateway's agent (concurrently, each bounded by `timeout`).
#[tracing::instrument(skip_all, fields(context = ?target.context))]
pub async fn collect(
    target: &KubeTarget,
    namespace: &str,
    agent_port: u16,
    timeout: Duration,
) -> Result<EgressReport, Error> {
    let client = target.client().await?;
    // The controller's Lease: shown when readable, never a reason to fail (RBAC, an older egress-gw without it).
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), namespace);
    let controller = match leases.get_opt(CONTROLLER_LEASE).await {
        Ok(Some(l)) => serde_json::to_value(&l)
            .ok()
            .map(|v| controller_report(&v, k8s_openapi::jiff::Timestamp::now().as_second())),
        // No Lease: egress-gw runs without --leader-elect (or not at all); nothing to say about leadership.
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the egress-gw leader Lease");
            None
        }
    };
    let ar = ApiResource::erase::<EgressGatewayPolicy>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if crate::is_not_found(&e) {
            Error::Refused(format!(
                "{}: the EgressGatewayPolicy CRD (egressgatewaypolicies.causeway.io) is not installed; install \
                 Causeway's CRDs (crds/causeway.io_crds.yaml) first",
                target.label()
            ))
        } else {
            Error::kube(target, "listing EgressGatewayPolicies")(e)
        }
    })?;
    let policies: Vec<serde_json::Value> = list.items.iter().filter_map(|o| serde_json::to_value(o).ok()).collect();
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| Error::Http { what: "building the HTTP client".into(), message: e.to_string() })?;
    let mut tasks = tokio::task::JoinSet::new();
    for ip in gateway_ips(&policies) {
        tasks.spawn(scrape(http.clone(), ip, agent_port));
    }
    let mut scrapes = Scrapes::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((ip, r)) = joined {
            scrapes.insert(ip, r);
        }
    }
    let mut report = build_report(&policies, &scrapes);
    report.controller = controller;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_controller_line_names_the_leader_or_says_nobody_acts() {
        let now = "2026-12-06T10:00:30Z".parse::<k8s_openapi::jiff::Timestamp>().map(|t| t.as_second()).unwrap_or(0);
        let lease = |holder: &str, renewed: &str| json!({"spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}});
        let live = controller_report(&lease("egress-gw-7d9f-abc_0a1b2c3d", "2026-12-06T10:00:28.123456Z"), now);
        assert_eq!(live.leader.as_deref(), Some("egress-gw-7d9f-abc"));
        assert_eq!((live.renewed_seconds_ago, live.expired), (Some(2), false));
        assert!(controller_line(&live).starts_with("egress-gw: egress-gw-7d9f-abc leads, renewed 2s ago"));
        let dead = controller_report(&lease("egress-gw-7d9f-abc_0a1b2c3d", "2026-12-06T09:59:00Z"), now);
        assert!(dead.expired);
        assert!(controller_line(&dead).contains("NO REPLICA ACTING") && controller_line(&dead).contains("90s ago"));
        let released = controller_report(&json!({"spec": {"holderIdentity": "", "leaseDurationSeconds": 1}}), now);
        assert_eq!((released.leader, released.expired), (None, true));
        let garbage = controller_report(&json!({"spec": {"holderIdentity": "x", "renewTime": "yesterday"}}), now);
        assert!(garbage.expired, "an unreadable renewal is not a live leader");
    }

    fn policy(name: &str, egress_ip: Option<&str>, status: serde_json::Value) -> serde_json::Value {
        let mut group = json!({"nodeSelector": {"matchLabels": {"egress": "true"}}});
        if let Some(ip) = egress_ip {
            group["egressIP"] = json!(ip);
        }
        json!({
            "apiVersion": "causeway.io/v1alpha1", "kind": "EgressGatewayPolicy",
            "metadata": {"name": name, "generation": 2},
            "spec": {
                "selectors": [{"podSelector": {"matchLabels": {"app": "db-client"}}}],
                "destinationCIDRs": ["203.0.113.0/24"], "excludedCIDRs": ["203.0.113.128/25"],
                "egressGroups": [group]
            },
            "status": status
        })
    }

    fn metrics(lines: &[(&str, &str, u64)]) -> Vec<Sample> {
        let text: String = lines
            .iter()
            .map(|(e, d, n)| format!("{SNAT_METRIC}{{egress_ip=\"{e}\",destination=\"{d}\"}} {n}\n"))
            .collect();
        promtext::parse(&text)
    }

    #[test]
    fn sums_only_the_groups_traffic_and_marks_unreachable_agents() {
        let p = policy(
            "db",
            Some("192.0.2.10"),
            json!({"observedGeneration": 2, "matchedPods": 7,
                   "groupStatuses": [{"activeGatewayIPs": ["10.0.0.1"], "healthyGatewayIPs": ["10.0.0.1", "10.0.0.2"]}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "GatewaysActive", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let mut scrapes = Scrapes::new();
        scrapes.insert(
            "10.0.0.1".into(),
            Ok(metrics(&[
                ("192.0.2.10", "203.0.113.5", 40),
                ("192.0.2.10", "203.0.113.200", 1000), // excluded
                ("192.0.2.99", "203.0.113.5", 500),    // another egress IP
                ("192.0.2.10", "198.51.100.1", 300),   // outside the destinations
            ])),
        );
        scrapes.insert(
            "10.0.0.2".into(),
            Err(AgentError {
                node_ip: "10.0.0.2".into(),
                url: metrics_url("10.0.0.2", 9964),
                error: "timed out".into(),
            }),
        );
        assert_eq!(gateway_ips(std::slice::from_ref(&p)).len(), 2);
        let r = build_report(&[p], &scrapes);
        let g = &r.policies[0].groups[0];
        assert_eq!(g.snat_total(), Some(40));
        assert_eq!(r.policies[0].matched_pods, Some(7));
        let table = render_table(&r);
        assert!(table.contains("40+?[1]"), "{table}");
        assert!(
            table.contains("[1] ? = node agent at http://10.0.0.2:9964/metrics not reachable: timed out"),
            "{table}"
        );
        assert!(table.contains("Ready"), "{table}");
    }

    #[test]
    fn invalid_spec_reason_and_missing_matched_pods_and_unreadable() {
        let p = policy(
            "bad",
            None,
            json!({"observedGeneration": 1,
                   "conditions": [
                     {"type": "Ready", "status": "False", "reason": "InvalidSpec", "lastTransitionTime": "t"},
                     {"type": "InvalidSpec", "status": "True", "reason": "ExcludedCIDROutsideDestinations",
                      "message": "excludedCIDR 10.0.0.0/8 is outside every destinationCIDR", "lastTransitionTime": "t"}]}),
        );
        let junk = json!({"metadata": {"name": "junk"}, "spec": {"egressGroups": "nope"}});
        let r = build_report(&[p, junk], &Scrapes::new());
        assert_eq!(r.policies[0].matched_pods, None);
        assert!(r.policies[0].stale);
        assert!(r.policies[1].unreadable.is_some());
        let table = render_table(&r);
        assert!(table.contains("InvalidSpec(ExcludedCIDROutsideDestinations)"), "{table}");
        assert!(table.contains("bad: InvalidSpec ExcludedCIDROutsideDestinations: excludedCIDR 10.0.0.0/8"), "{table}");
        assert!(table.contains("junk: cannot be read"), "{table}");
        let bad_row = table.lines().find(|l| l.starts_with("bad ")).unwrap_or_default();
        assert!(bad_row.contains("default route"), "{table}");
    }

    #[test]
    fn ipv6_metrics_url() {
        assert_eq!(metrics_url("fd00::1", 9964), "http://[fd00::1]:9964/metrics");
    }
}

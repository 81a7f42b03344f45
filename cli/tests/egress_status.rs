//! `causeway egress status` against the kube API stand-in, with one gateway's node agent served over real HTTP
//! and another gateway unreachable.

mod common;

use causeway_crds::EgressGatewayPolicy;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

const METRIC: &str = "causeway_node_agent_snat_ports_in_use";

/// A node agent's /metrics page over real HTTP on `ip`, port 0. Returns the port.
async fn serve_metrics(ip: &str, body: String) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { body }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

async fn create_policy(api: &Api<EgressGatewayPolicy>, spec: serde_json::Value, status: serde_json::Value) {
    let name = spec["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let obj: EgressGatewayPolicy = serde_json::from_value(spec).unwrap_or_else(|e| panic!("policy literal: {e}"));
    api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_status_table_and_json() -> anyhow::Result<()> {
    let clusters = common::Clusters::start(&["east"]).await?;
    let client = clusters.client("east").await?;
    common::install_crds(&client).await?;
    let api: Api<EgressGatewayPolicy> = Api::all(client.clone());
    // egress-gw's leader Lease, renewed just now by replica egress-gw-0.
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({"metadata": {"name": "causeway"}}))?;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()).create(&Default::default(), &ns).await;
    let renewed = k8s_openapi::jiff::Timestamp::now().to_string();
    let lease: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": "causeway-egress-gw", "namespace": "causeway"},
        "spec": {"holderIdentity": "egress-gw-0_1a2b3c4d", "leaseDurationSeconds": 15, "renewTime": renewed}
    }))?;
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client, "causeway")
        .create(&Default::default(), &lease)
        .await?;

    // Gateway 127.0.0.1 answers; 127.0.0.2 (same port, nothing listening) does not.
    let port = serve_metrics(
        "127.0.0.1",
        format!(
            "# HELP {METRIC} SNAT ports in use\n# TYPE {METRIC} gauge\n\
             {METRIC}{{egress_ip=\"192.0.2.10\",destination=\"203.0.113.5\"}} 37\n\
             {METRIC}{{egress_ip=\"192.0.2.10\",destination=\"203.0.113.6\"}} 5\n\
             {METRIC}{{egress_ip=\"192.0.2.10\",destination=\"198.51.100.9\"}} 900\n\
             {METRIC}{{egress_ip=\"192.0.2.77\",destination=\"203.0.113.5\"}} 11\n"
        ),
    )
    .await?;
    let group = |ip: &str| json!({"nodeSelector": {"matchLabels": {"egress": "true"}}, "egressIP": ip});
    create_policy(
        &api,
        json!({"apiVersion": "causeway.io/v1alpha1", "kind": "EgressGatewayPolicy", "metadata": {"name": "billing-db"},
               "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "billing"}}}],
                        "destinationCIDRs": ["203.0.113.0/24"], "azAffinity": "localOnlyFirst",
                        "egressGroups": [group("192.0.2.10")]}}),
        json!({"observedGeneration": 1, "matchedPods": 12,
               "groupStatuses": [{"activeGatewayIPs": ["127.0.0.1", "127.0.0.2"],
                                  "activeGatewayIPsByAZ": {"eu-1a": ["127.0.0.1"], "eu-1b": ["127.0.0.2"]},
                                  "healthyGatewayIPs": ["127.0.0.1", "127.0.0.2"]}],
               "conditions": [{"type": "Ready", "status": "True", "reason": "GatewaysActive", "message": "",
                               "lastTransitionTime": "2026-11-23T10:00:00Z"}]}),
    )
    .await;
    // Invalid, and written by a controller that does not report matchedPods yet.
    create_policy(
        &api,
        json!({"apiVersion": "causeway.io/v1alpha1", "kind": "EgressGatewayPolicy", "metadata": {"name": "legacy-ftp"},
               "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "ftp"}}}],
                        "destinationCIDRs": ["198.51.100.0/24"], "excludedCIDRs": ["10.0.0.0/8"],
                        "egressGroups": [group("192.0.2.77")]}}),
        json!({"observedGeneration": 1, "groupStatuses": [{"activeGatewayIPs": [], "healthyGatewayIPs": []}],
               "conditions": [
                 {"type": "Ready", "status": "False", "reason": "InvalidSpec", "lastTransitionTime": "2026-11-23T10:00:00Z"},
                 {"type": "InvalidSpec", "status": "True", "reason": "ExcludedCIDROutsideDestinations",
                  "message": "excludedCIDR 10.0.0.0/8 is not inside any destinationCIDR", "lastTransitionTime": "2026-11-23T10:00:00Z"}]}),
    )
    .await;

    let port_s = port.to_string();
    let run = clusters
        .causeway(&["egress", "status", "--context", "east", "--agent-metrics-port", &port_s, "--agent-timeout", "2s"])
        .await?
        .expect_ok("egress status");
    let table = run.stdout;
    println!("{table}");
    assert!(table.lines().next().is_some_and(|l| l.starts_with("egress-gw: egress-gw-0 leads")), "{table}");
    let row = |name: &str| table.lines().find(|l| l.starts_with(name)).map(str::to_string).unwrap_or_default();
    let billing = row("billing-db");
    // 37 + 5 to 203.0.113.0/24 through 192.0.2.10 on the reachable gateway; 900 (other destination) and 11 (other
    // egress IP) are not this group's; the unreachable gateway is a footnoted "?".
    assert!(billing.contains("42+?[1]"), "{table}");
    assert!(billing.contains("eu-1a:127.0.0.1 eu-1b:127.0.0.2"), "{table}");
    assert!(billing.contains(" 12 "), "matched pods: {table}");
    assert!(billing.contains("Ready"), "{table}");
    assert!(table.contains(&format!("[1] ? = node agent at http://127.0.0.2:{port}/metrics not reachable")), "{table}");
    let ftp = row("legacy-ftp");
    assert!(ftp.contains("InvalidSpec(ExcludedCIDROutsideDestinations)"), "{table}");
    let cells: Vec<&str> = ftp.split_whitespace().collect();
    // POLICY GROUP EGRESS ACTIVE HEALTHY MATCHED SNAT STATUS...: no gateways, no matchedPods, no SNAT.
    assert_eq!(&cells[..7], ["legacy-ftp", "0", "192.0.2.77", "-", "-", "-", "-"], "{table}");
    assert!(
        table.contains("legacy-ftp: InvalidSpec ExcludedCIDROutsideDestinations: excludedCIDR 10.0.0.0/8"),
        "{table}"
    );

    let json = clusters
        .causeway(&["egress", "status", "--context", "east", "--agent-metrics-port", &port_s, "-o", "json"])
        .await?
        .expect_ok("egress status -o json");
    let v: serde_json::Value = serde_json::from_str(&json.stdout)?;
    assert_eq!(v["policies"][0]["name"], "billing-db");
    assert_eq!(v["policies"][0]["matchedPods"], 12);
    assert_eq!(v["policies"][0]["groups"][0]["snat"][0], json!({"nodeIp": "127.0.0.1", "portsInUse": 42}));
    assert_eq!(v["policies"][0]["groups"][0]["snat"][1], json!({"nodeIp": "127.0.0.2", "portsInUse": null}));
    assert_eq!(v["policies"][1]["matchedPods"], serde_json::Value::Null);
    assert_eq!(v["policies"][1]["problems"][1]["reason"], "ExcludedCIDROutsideDestinations");
    assert_eq!(v["unreachableAgents"][0]["nodeIp"], "127.0.0.2");
    assert_eq!(
        (v["controller"]["leader"].clone(), v["controller"]["expired"].clone()),
        (json!("egress-gw-0"), json!(false))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_status_without_crd_says_what_to_install() -> anyhow::Result<()> {
    let clusters = common::Clusters::start(&["east"]).await?;
    let run = clusters.causeway(&["egress", "status"]).await?;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("CRD"), "{}", run.stderr);
    Ok(())
}

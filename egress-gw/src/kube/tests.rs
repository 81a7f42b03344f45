//! The adapter against the fake kube API server (`tests/fake-kube-apiserver`, a test stand-in speaking the real
//! list/watch wire protocol): real watchers, real status patches, real Events. Probe rounds are injected as inputs.
//! Waiting is polling with a generous deadline; nothing asserts on timing.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_crds::egress::compat::convert_manifests;
use causeway_crds::EgressGatewayPolicy;
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Node as KNode, Pod as KPod};
use k8s_openapi::api::events::v1::Event as KEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::{convert, spawn_watchers, Controller, Input};
use crate::core::HealthConfig;

async fn fake_kube() -> Result<(FakeApiServerHandle, Client)> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &EgressGatewayPolicy::crd())
        .await
        .context("install EgressGatewayPolicy CRD")?;
    Ok((server, client))
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let obj: K = serde_json::from_value(value)?;
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

fn gateway(name: &str, zone: &str, ip: &str, egress: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"egress-gw": "true", "topology.kubernetes.io/zone": zone},
            "annotations": {
                convert::INTERFACES_ANNOTATION: format!("{{\"eth0\": [\"{ip}\"], \"eth1\": [\"{egress}\"]}}"),
                convert::DEFAULT_INTERFACE_ANNOTATION: "eth0"
            }},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    })
}

async fn setup(client: &Client) -> Result<()> {
    create(
        &Api::<KNamespace>::all(client.clone()),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments", "labels": {"team": "payments"}}}),
    )
    .await?;
    let nodes = Api::<KNode>::all(client.clone());
    create(&nodes, gateway("gw-a", "eu-1a", "172.18.0.11", "192.0.2.20")).await?;
    create(&nodes, gateway("gw-b", "eu-1b", "172.18.0.12", "192.0.2.20")).await?;
    create(
        &nodes,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w1", "labels": {"topology.kubernetes.io/zone": "eu-1a"}},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.21"}]}}),
    )
    .await?;
    // Node status may be dropped on create by a server with a status subresource; set it explicitly.
    for (name, ip) in [("gw-a", "172.18.0.11"), ("gw-b", "172.18.0.12"), ("w1", "172.18.0.21")] {
        let patch = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    let pods = Api::<KPod>::namespaced(client.clone(), "payments");
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "billing-1", "namespace": "payments", "labels": {"app": "billing"}},
               "spec": {"nodeName": "w1", "containers": [{"name": "c", "image": "i"}]}}),
    )
    .await?;
    let patch = json!({"status": {"phase": "Running", "podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}]}});
    pods.patch_status("billing-1", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

fn native_policy() -> Result<EgressGatewayPolicy> {
    let path = format!("{}/../docs/examples/egress/isovalent.yaml", env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let mut policy = convert_manifests(&yaml)?.remove(0).policy;
    // Point the sample at this test's pods and gateways.
    policy.spec.selectors[0].namespace_selector = None;
    policy.spec.selectors[0].pod_selector = Some(causeway_crds::egress::LabelSelector {
        match_labels: [("app".into(), "billing".into())].into(),
        ..Default::default()
    });
    Ok(policy)
}

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(p: &EgressGatewayPolicy, type_: &str) -> Option<(String, String)> {
    let c = p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn probe_rounds(tx: &mpsc::Sender<Input>, up: &[&str], down: &[&str], n: usize) -> Result<()> {
    for _ in 0..n {
        for node in up {
            tx.send(Input::Probe { node: node.to_string(), ok: true }).await?;
        }
        for node in down {
            tx.send(Input::Probe { node: node.to_string(), ok: false }).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn status_events_and_assignments_follow_the_cluster() -> Result<()> {
    let (server, client) = fake_kube().await?;
    setup(&client).await?;
    let policies = Api::<EgressGatewayPolicy>::all(client.clone());
    policies.create(&PostParams::default(), &native_policy()?).await?;

    let (tx, rx) = mpsc::channel(1024);
    let health = HealthConfig { stale_after: Duration::from_secs(3600), ..HealthConfig::default() };
    let process = causeway_runtime::Health::new();
    let metrics = crate::metrics::Metrics::default();
    process.with_registry(|r| metrics.register(r));
    let controller = Controller::new(client.clone(), health).with_metrics(metrics).with_health(process.clone());
    assert!(!process.is_ready());
    let mut assignments = controller.assignments();
    let watchers = spawn_watchers(client.clone(), tx.clone());
    let run = tokio::spawn(controller.run(rx));

    // No probes yet: not ready, no healthy gateway.
    let p = wait_for("NoHealthyGateway status", async || {
        let p = policies.get("partner-api").await?;
        Ok((condition(&p, "Ready") == Some(("False".into(), "NoHealthyGateway".into()))).then_some(p))
    })
    .await?;
    assert_eq!(p.status.as_ref().and_then(|s| s.observed_generation), p.metadata.generation);

    probe_rounds(&tx, &["gw-a", "gw-b"], &[], 3).await?;
    let p = wait_for("Ready with both gateways", async || {
        let p = policies.get("partner-api").await?;
        let ready = condition(&p, "Ready") == Some(("True".into(), "GatewaysActive".into()));
        let active = p.status.as_ref().map(|s| s.group_statuses[0].active_gateway_ips.len()).unwrap_or(0);
        Ok((ready && active == 2).then_some(p))
    })
    .await?;
    let s = p.status.clone().context("status")?;
    // azAffinity localPriority in the sample: per-zone lists, local gateway first.
    assert_eq!(
        s.group_statuses[0].active_gateway_ips_by_az.get("eu-1a"),
        Some(&vec!["172.18.0.11".to_string(), "172.18.0.12".to_string()])
    );
    assert_eq!(
        s.group_statuses[0].active_gateway_ips_by_az.get("eu-1b"),
        Some(&vec!["172.18.0.12".to_string(), "172.18.0.11".to_string()])
    );
    assert_eq!(s.group_statuses[0].healthy_gateway_ips, vec!["172.18.0.11", "172.18.0.12"]);
    assert_eq!(condition(&p, "InvalidSpec"), Some(("False".into(), "Valid".into())));
    assert!(process.is_ready());
    let text = process.render_metrics();
    for line in [
        r#"causeway_egress_active_gateways{policy="partner-api",group="0"} 2"#,
        r#"causeway_egress_healthy_gateways{policy="partner-api",group="0"} 2"#,
        r#"causeway_egress_source_ips{policy="partner-api"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }

    let a = assignments
        .wait_for(|a| a.get("partner-api").is_some_and(|a| !a.groups[0].gateways.is_empty()))
        .await?
        .get("partner-api")
        .cloned()
        .context("assignment")?;
    assert_eq!(a.source_ips, vec!["10.0.1.5".parse::<std::net::IpAddr>()?]);
    assert_eq!(a.destination_cidrs, vec!["198.51.100.0/24".parse::<ipnet::IpNet>()?]);
    assert_eq!(a.excluded_cidrs, vec!["198.51.100.64/26".parse::<ipnet::IpNet>()?]);
    assert_eq!(a.groups[0].egress_ips, vec!["192.0.2.20".parse::<std::net::IpAddr>()?]);

    // gw-a stops answering: it leaves every active set, and an Event says so.
    probe_rounds(&tx, &["gw-b"], &["gw-a"], 3).await?;
    wait_for("failover to gw-b", async || {
        let p = policies.get("partner-api").await?;
        let active = p.status.map(|s| s.group_statuses[0].active_gateway_ips.clone()).unwrap_or_default();
        Ok((active == vec!["172.18.0.12".to_string()]).then_some(()))
    })
    .await?;
    let events = Api::<KEvent>::all(client.clone());
    wait_for("GatewayDeactivated event", async || {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("GatewayDeactivated")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("partner-api")
                    && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some("gw-a")
            })
            .then_some(()))
    })
    .await?;

    // A spec change to an egressIP no gateway has: InvalidSpec with the reason, for the new generation, plus an Event.
    let patch = json!({"spec": {"egressGroups": [{"nodeSelector": {"matchLabels": {"egress-gw": "true"}}, "egressIP": "192.0.2.99"}]}});
    policies.patch("partner-api", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let p = wait_for("EgressIPNotOnAnyNode", async || {
        let p = policies.get("partner-api").await?;
        Ok((condition(&p, "InvalidSpec") == Some(("True".into(), "EgressIPNotOnAnyNode".into()))).then_some(p))
    })
    .await?;
    assert_eq!(p.metadata.generation, Some(2));
    assert_eq!(p.status.as_ref().and_then(|s| s.observed_generation), Some(2));
    assert_eq!(condition(&p, "Ready"), Some(("False".into(), "EgressIPNotOnAnyNode".into())));
    wait_for("InvalidSpec warning event", async || {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("EgressIPNotOnAnyNode")
                    && e.type_.as_deref() == Some("Warning")
                    && e.note.as_deref().is_some_and(|n| n.contains("192.0.2.99"))
            })
            .then_some(()))
    })
    .await?;

    // Both egressIP and interface (the fake server does not run CEL, like a cluster with an older CRD): reported,
    // and the policy is taken out of the assignments.
    let patch = json!({"spec": {"egressGroups": [{"nodeSelector": {"matchLabels": {"egress-gw": "true"}}, "egressIP": "192.0.2.20", "interface": "eth1"}]}});
    policies.patch("partner-api", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for("BothEgressIPAndInterface", async || {
        let p = policies.get("partner-api").await?;
        Ok((condition(&p, "InvalidSpec") == Some(("True".into(), "BothEgressIPAndInterface".into()))).then_some(()))
    })
    .await?;
    assignments.wait_for(|a| !a.contains_key("partner-api")).await?;

    // Deleting the policy removes its assignment.
    policies.patch("partner-api", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"egressGroups": [{"nodeSelector": {"matchLabels": {"egress-gw": "true"}}, "egressIP": "192.0.2.20"}]}}))).await?;
    assignments.wait_for(|a| a.contains_key("partner-api")).await?;
    policies.delete("partner-api", &Default::default()).await?;
    assignments.wait_for(|a| a.is_empty()).await?;

    drop(tx);
    for w in watchers {
        w.abort();
    }
    run.abort();
    server.shutdown().await?;
    Ok(())
}

/// A fresh controller (a restart, a newly elected leader) publishes nothing until the gateways' health is known:
/// before, its first assignments had no healthy gateway (not probed yet), and agents dropped egress traffic until
/// the gateways rose. The probe targets go out during the warm-up; once every candidate rose or failed `fall`
/// rounds, the first publish has the right gateways, and the first status never said NoHealthyGateway.
#[tokio::test]
async fn the_first_publish_waits_until_gateway_health_is_known() -> Result<()> {
    let (_server, client) = fake_kube().await?;
    setup(&client).await?;
    let policies = Api::<EgressGatewayPolicy>::all(client.clone());
    policies.create(&PostParams::default(), &native_policy()?).await?;

    let (tx, rx) = mpsc::channel(1024);
    let health = HealthConfig { stale_after: Duration::from_secs(3600), ..HealthConfig::default() };
    // A warm-up far longer than the test: only settled health may end it.
    let controller = Controller::new(client.clone(), health).with_warmup(Duration::from_secs(3600));
    let (assignments, mut synced, mut targets) =
        (controller.assignments(), controller.synced(), controller.probe_targets());
    let _watchers = spawn_watchers(client.clone(), tx.clone());
    let _run = tokio::spawn(controller.run(rx));

    // Everything is listed and the prober is told what to probe, but nothing is published yet.
    tokio::time::timeout(Duration::from_secs(20), targets.wait_for(|t| t.len() == 2)).await??;
    probe_rounds(&tx, &["gw-a"], &["gw-b"], 2).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!*synced.borrow(), "published before the gateways' health was known");
    assert!(assignments.borrow().is_empty());
    assert!(policies.get("partner-api").await?.status.is_none(), "status written during the warm-up");

    // One more round: gw-a rose (3 good rounds), gw-b failed 3 in a row. Both are known: publish.
    probe_rounds(&tx, &["gw-a"], &["gw-b"], 1).await?;
    tokio::time::timeout(Duration::from_secs(20), synced.wait_for(|s| *s)).await??;
    let first = assignments.borrow().get("partner-api").cloned().context("the first publish has the policy")?;
    let gws: Vec<String> = first.groups[0].gateways.iter().map(|g| g.node.clone()).collect();
    assert_eq!(gws, vec!["gw-a".to_string()], "the first publish carries the gateway that rose");
    let p = wait_for("the first status", async || {
        let p = policies.get("partner-api").await?;
        Ok(p.status.is_some().then_some(p))
    })
    .await?;
    assert_eq!(condition(&p, "Ready"), Some(("True".into(), "GatewaysActive".into())));
    Ok(())
}

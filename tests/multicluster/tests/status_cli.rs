//! `causeway clustermesh status` the way a user runs it: the real CLI binary, pointed at a cluster's kube API, reads
//! the real identity-sync's `/status` through the API's service proxy (Service `identity-sync`, port `metrics`, in
//! namespace `causeway`, as the chart installs it). It must tell the truth: the remote synced with the entry counts
//! identity-sync holds, then, once the remote's etcd is gone, not ready with the error, and `--wait` failing.

use std::path::Path;
use std::process::Output;

use anyhow::{ensure, Context};
use causeway_multicluster_tests::{binary, eventually, start_mesh, Cluster, DEADLINE};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};

const NS: &str = "causeway";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_through_the_service_proxy_tells_the_truth() {
    let mut mesh = start_mesh(&[("east", 1), ("west", 2)], false).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario(&mut mesh).await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// Publishes west's identity-sync as the chart does: a Service with ports grpc and metrics, and the EndpointSlice
/// kube would derive from the pod (here: the process on loopback).
async fn publish_identity_sync(west: &Cluster) -> anyhow::Result<()> {
    let kube = west.kube();
    Api::<Namespace>::all(kube.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}}))?)
        .await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "identity-sync", "namespace": NS},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.7.7", "ports": [
            {"name": "grpc", "port": 9890, "targetPort": "grpc", "protocol": "TCP"},
            {"name": "metrics", "port": 9891, "targetPort": "metrics", "protocol": "TCP"}]}
    }))?;
    Api::<Service>::namespaced(kube.clone(), NS).create(&PostParams::default(), &svc).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "identity-sync-abcde", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "identity-sync"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [west.sync_metrics.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "grpc", "port": west.sync_grpc.port(), "protocol": "TCP"},
                  {"name": "metrics", "port": west.sync_metrics.port(), "protocol": "TCP"}]
    }))?;
    Api::<EndpointSlice>::namespaced(kube, NS).create(&PostParams::default(), &slice).await?;
    Ok(())
}

async fn causeway(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let bin = binary("causeway")?;
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The CLI's JSON entry for remote `name`.
fn cli_remote(out: &Output, name: &str) -> anyhow::Result<Value> {
    let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("not JSON: {}", text(out)))?;
    doc["remotes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name).cloned())
        .with_context(|| format!("remote {name} not in the CLI's output: {doc}"))
}

async fn scenario(mesh: &mut [Cluster]) -> anyhow::Result<()> {
    let (east, west) = match mesh {
        [east, west] => (east, west),
        _ => anyhow::bail!("expected two clusters"),
    };
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    west.connect_to(east)?;
    let direct = west.wait_remote("east", "synced", |r| r["state"] == "synced").await?;
    phase("east synced at west");
    publish_identity_sync(west).await?;
    let kubeconfig = west.dir().join("cli.kubeconfig");
    west.kube_server().write_kubeconfig(&kubeconfig)?;

    // Synced, with the entry counts identity-sync itself reports (read directly above).
    let out = causeway(&kubeconfig, &["clustermesh", "status", "-o", "json"]).await?;
    ensure!(out.status.success(), "status failed: {}", text(&out));
    let r = cli_remote(&out, "east")?;
    ensure!(r["state"] == "synced" && r["connected"] == true, "east not shown synced: {r}");
    ensure!(r["entries"] == direct["entries"], "entry counts differ: CLI {} vs identity-sync {}", r["entries"], direct);
    let table = causeway(&kubeconfig, &["clustermesh", "status"]).await?;
    ensure!(table.status.success() && String::from_utf8_lossy(&table.stdout).contains("east"), "{}", text(&table));
    let waited = causeway(&kubeconfig, &["clustermesh", "status", "--wait", "--wait-timeout", "20s"]).await?;
    ensure!(waited.status.success(), "--wait on a synced mesh failed: {}", text(&waited));

    phase("synced checks done");
    // East's etcd goes away: the status must stop saying ready, carry an error, and --wait must fail.
    east.etcd.kill();
    let shown = eventually("the CLI to show east not ready", DEADLINE, || async {
        let out =
            causeway(&kubeconfig, &["clustermesh", "status", "-o", "json"]).await.map_err(|e| format!("{e:#}"))?;
        let r = cli_remote(&out, "east").map_err(|e| format!("{e:#}"))?;
        if r["connected"] == false && r["last_error"].is_string() {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await?;
    phase("east shown down");
    ensure!(shown["state"] != "synced" || shown["connected"] == false, "{shown}");
    let waited = causeway(&kubeconfig, &["clustermesh", "status", "--wait", "--wait-timeout", "2s"]).await?;
    ensure!(!waited.status.success(), "--wait succeeded with east down: {}", text(&waited));
    ensure!(String::from_utf8_lossy(&waited.stderr).contains("east"), "--wait does not name east: {}", text(&waited));

    phase("--wait failed as it should");
    // No endpoint behind the Service: a clear error naming the proxy path, not a panic or an empty table.
    Api::<EndpointSlice>::namespaced(west.kube(), NS).delete("identity-sync-abcde", &DeleteParams::default()).await?;
    let out = causeway(&kubeconfig, &["clustermesh", "status"]).await?;
    ensure!(!out.status.success(), "status succeeded without identity-sync endpoints: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("proxy") && err.contains("no endpoints available for service \"identity-sync\""),
        "unclear error: {}",
        text(&out)
    );
    phase("no-endpoint error checked");
    Ok(())
}

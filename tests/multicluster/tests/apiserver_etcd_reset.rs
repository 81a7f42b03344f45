//! The apiserver's own etcd is SIGKILLed and comes back empty, as an operator would see it:
//! - `/readyz` of clustermesh-apiserver says not ready while etcd is down, stays so until the store is re-created,
//!   and says ready again only once the export is complete again (every canary and every exported key is back);
//! - etcd's history of the new store starts with the cluster config: no state key, canary or heartbeat was written
//!   into the empty etcd before the apiserver re-created users, roles, auth and the cluster config;
//! - the re-created store is locked down again (a peer's read-only user cannot write).

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_multicluster_tests::{always, eventually, Cluster, ClusterSpec, DEADLINE};
use etcd_client::{EventType, GetOptions, WatchOptions};

const NS: &str = "shop";
const KINDS: [&str; 4] = ["nodes", "services", "ip", "identities"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_etcd_killed_and_restarted_empty() {
    let mut east = Cluster::start(ClusterSpec::new("east", 1).tls(&["west"])).await.expect("start east");
    scenario(&mut east).await.unwrap_or_else(|e| panic!("{e:#}\n{}", east.logs()));
}

/// `(ready, body)` of clustermesh-apiserver's `/readyz`.
async fn readyz(http: &reqwest::Client, east: &Cluster) -> Result<(bool, String), String> {
    let r = http.get(format!("http://{}/readyz", east.apiserver_metrics)).send().await.map_err(|e| e.to_string())?;
    let ready = r.status().is_success();
    Ok((ready, r.text().await.unwrap_or_default()))
}

/// What the apiserver exported: every key under `cilium/state/` and `cilium/synced/` (canaries hold a time, so only
/// their presence is kept).
async fn exported(east: &Cluster) -> anyhow::Result<BTreeMap<String, String>> {
    let mut etcd = east.etcd.client().await;
    let mut out = BTreeMap::new();
    for prefix in ["cilium/state/", "cilium/synced/"] {
        let resp = etcd.get(prefix, Some(GetOptions::new().with_prefix())).await?;
        for kv in resp.kvs() {
            let value = if prefix == "cilium/synced/" { "<time>".to_string() } else { kv.value_str()?.to_string() };
            out.insert(kv.key_str()?.to_string(), value);
        }
    }
    Ok(out)
}

fn complete(export: &BTreeMap<String, String>) -> Result<(), String> {
    let missing: Vec<String> = KINDS
        .iter()
        .map(|k| format!("cilium/synced/east/cilium/state/{k}/v1"))
        .chain(["cilium/state/ip/v1/default/10.1.1.10".into(), "cilium/state/ip/v1/default/10.1.1.11".into()])
        .chain(["cilium/state/services/v1/east/shop/cart".into(), "cilium/state/nodes/v1/east/east-node-1".into()])
        .filter(|k| !export.contains_key(k))
        .collect();
    let service = export.get("cilium/state/services/v1/east/shop/cart").cloned().unwrap_or_default();
    if !missing.is_empty() || !service.contains("10.1.1.10") || !service.contains("10.1.1.11") {
        return Err(format!("missing {missing:?}; service {service}"));
    }
    if !export.keys().any(|k| k.starts_with("cilium/state/identities/v1/id/")) {
        return Err("no identity exported".into());
    }
    Ok(())
}

/// Every put since etcd started, `(revision, key)` in commit order: a watch of all keys from revision 1.
async fn history(east: &Cluster) -> anyhow::Result<Vec<(i64, String)>> {
    let mut etcd = east.etcd.client().await;
    let now = etcd.get("x", None).await?.header().map(|h| h.revision()).unwrap_or_default();
    let mut stream = etcd.watch("", Some(WatchOptions::new().with_all_keys().with_start_revision(1))).await?;
    let mut out: Vec<(i64, String)> = Vec::new();
    while out.last().is_none_or(|(rev, _)| *rev < now) {
        let Some(msg) = tokio::time::timeout(DEADLINE, stream.message()).await?? else { break };
        for ev in msg.events() {
            if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                out.push((kv.mod_revision(), kv.key_str()?.to_string()));
            }
        }
    }
    Ok(out)
}

async fn scenario(east: &mut Cluster) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    east.create_namespace(NS).await?;
    east.create_global_service(NS, "cart", "10.96.1.20", &[]).await?;
    east.add_backend(NS, "cart", "cart-0", "10.1.1.10").await?;
    east.add_backend(NS, "cart", "cart-1", "10.1.1.11").await?;
    let before = eventually("east's export to be complete", DEADLINE, || async {
        let export = exported(east).await.map_err(|e| format!("{e:#}"))?;
        complete(&export).map(|()| export)
    })
    .await?;
    assert!(readyz(&http, east).await.map_err(anyhow::Error::msg)?.0, "ready before the outage");

    // etcd dies: the apiserver must say it is not ready, and keep saying so while etcd is down.
    east.etcd.kill();
    let (_, reason) =
        eventually("clustermesh-apiserver /readyz to report not ready while etcd is down", DEADLINE, || async {
            east.check_alive()?;
            match readyz(&http, east).await? {
                (false, body) => Ok(((), body)),
                (true, body) => Err(format!("still ready: {body}")),
            }
        })
        .await?;
    assert!(reason.contains("etcd"), "the not-ready reason names etcd: {reason}");
    always("clustermesh-apiserver not ready while etcd is down", Duration::from_secs(3), || async {
        match readyz(&http, east).await? {
            (false, _) => Ok(()),
            (true, body) => Err(format!("ready although etcd is down: {body}")),
        }
    })
    .await?;

    // etcd comes back empty. The apiserver may say ready again only once the store is re-created and the whole
    // export is back: at the first ready answer, every canary and every exported key must already be in etcd.
    east.etcd.restart_empty().await;
    let east_ref = &*east;
    eventually("clustermesh-apiserver /readyz to report ready after the restore", DEADLINE, || async {
        east_ref.check_alive()?;
        match readyz(&http, east_ref).await? {
            (true, _) => Ok(()),
            (false, body) => Err(format!("not ready: {body}")),
        }
    })
    .await?;
    let after = exported(east).await?;
    complete(&after).map_err(|e| anyhow::anyhow!("ready, but the export is not complete: {e}"))?;
    assert_eq!(
        after, before,
        "after the restore the store holds exactly what was exported before (identities persist in the kube API)"
    );

    // Nothing was written into the empty etcd before the cluster config (which the apiserver writes after users,
    // roles and auth).
    let history = history(east).await?;
    let first = history.first().cloned().unwrap_or_default();
    assert_eq!(first.1, "cilium/cluster-config/east", "first key written into the reset etcd; history: {history:?}");
    for (rev, key) in &history {
        if key != "cilium/cluster-config/east" && key != "cilium/.has-cluster-config" {
            assert!(*rev > first.0, "{key} written at revision {rev}, before the cluster config ({})", first.0);
        }
    }

    // The re-created store is locked down again.
    let mut as_west = east.etcd.client_as("remote-west").await;
    let err = as_west.put("cilium/state/services/v1/east/shop/cart", "{}", None).await.err();
    assert!(
        err.as_ref().is_some_and(|e| e.to_string().contains("permission denied")),
        "remote-west could write into the restored store: {err:?}"
    );
    let metrics = http.get(format!("http://{}/metrics", east.apiserver_metrics)).send().await?.text().await?;
    assert!(
        metrics.lines().any(|l| l.starts_with("causeway_etcd_resets_total") && l.ends_with(" 1")),
        "one reset counted:\n{}",
        metrics.lines().filter(|l| l.contains("etcd_resets")).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

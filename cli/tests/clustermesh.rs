//! `causeway clustermesh enable | rotate-certs | connect | disconnect` driven as a user would, against kube API
//! stand-ins (one per cluster, as contexts of one kubeconfig).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use causeway::clustermesh::{
    verifies_against, ADMIN_SECRET, CA_SECRET, CONFIG_MAP, EXTERNAL_WORKLOAD_SECRET, REMOTES_SECRET, SERVER_SECRET,
};
use common::Clusters;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use x509_parser::pem::parse_x509_pem;

const NS: &str = "causeway";

async fn secret(client: &Client, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), NS).get_opt(name).await.unwrap_or_else(|e| panic!("get {name}: {e}"))
}

fn data(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap_or_else(|_| panic!("non-UTF-8 value"))))
        .collect()
}

fn common_name(pem: &str) -> String {
    let (_, p) = parse_x509_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("pem: {e}"));
    let cert = p.parse_x509().unwrap_or_else(|e| panic!("x509: {e}"));
    let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_string();
    cn
}

async fn enable(clusters: &Clusters, ctx: &str, name: &str, id: &str) -> common::Run {
    clusters
        .causeway(&["clustermesh", "enable", "--context", ctx, "--cluster-name", name, "--cluster-id", id])
        .await
        .unwrap_or_else(|e| panic!("running enable: {e}"))
}

const LEAVES: [&str; 3] = [SERVER_SECRET, ADMIN_SECRET, EXTERNAL_WORKLOAD_SECRET];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_twice_changes_nothing_and_rotate_renews_leaves_only() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east"]).await?;
    let client = clusters.client("east").await?;

    let first = enable(&clusters, "east", "east", "1").await.expect_ok("first enable");
    assert!(first.stdout.contains(&format!("created    Secret {NS}/{CA_SECRET}")), "{}", first.stdout);
    let mut before = BTreeMap::new();
    for name in [CA_SECRET].iter().chain(LEAVES.iter()) {
        let s = secret(&client, name).await.unwrap_or_else(|| panic!("{name} not created"));
        before.insert(*name, (data(&s), s.metadata.resource_version.clone()));
    }
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get(CONFIG_MAP).await?;
    let cm_data = cm.data.clone().unwrap_or_default();
    assert_eq!(cm_data.get("cluster-name").map(String::as_str), Some("east"));
    assert_eq!(cm_data.get("cluster-id").map(String::as_str), Some("1"));

    let admin = data(&secret(&client, ADMIN_SECRET).await.unwrap_or_default());
    // The apiserver's client certificate is etcd's root user: it creates the remote-<peer> users.
    assert_eq!(common_name(&admin["tls.crt"]), "root");
    let ew = data(&secret(&client, EXTERNAL_WORKLOAD_SECRET).await.unwrap_or_default());
    assert_eq!(common_name(&ew["tls.crt"]), "externalworkload");

    // Second run: every object reported unchanged and byte-for-byte (and resourceVersion) the same.
    let second = enable(&clusters, "east", "east", "1").await.expect_ok("second enable");
    assert!(!second.stdout.contains("created") && !second.stdout.contains("updated"), "{}", second.stdout);
    for (name, (d, rv)) in &before {
        let s = secret(&client, name).await.unwrap_or_default();
        assert_eq!(&data(&s), d, "{name} changed on the second enable");
        assert_eq!(&s.metadata.resource_version, rv, "{name} was rewritten on the second enable");
    }
    let cm2 = Api::<ConfigMap>::namespaced(client.clone(), NS).get(CONFIG_MAP).await?;
    assert_eq!(cm2.metadata.resource_version, cm.metadata.resource_version);

    // A different ID for an enabled cluster is refused.
    let renumber = enable(&clusters, "east", "east", "9").await;
    assert!(!renumber.ok, "{renumber:?}");
    assert!(renumber.stderr.contains("already enabled as \"east\" with ID 1"), "{}", renumber.stderr);

    // Rotation: new leaves, same CA, and each new leaf verifies against that CA.
    let rotated = clusters.causeway(&["clustermesh", "rotate-certs", "--context", "east"]).await?.expect_ok("rotate");
    let ca_after = secret(&client, CA_SECRET).await.unwrap_or_default();
    assert_eq!(data(&ca_after), before[CA_SECRET].0, "the CA changed on rotation");
    assert_eq!(ca_after.metadata.resource_version, before[CA_SECRET].1, "the CA Secret was rewritten");
    let ca_pem = data(&ca_after)["ca.crt"].clone();
    for name in LEAVES {
        let now = data(&secret(&client, name).await.unwrap_or_default());
        let (old, _) = &before[name];
        assert_ne!(now["tls.crt"], old["tls.crt"], "{name}: certificate not renewed\n{}", rotated.stdout);
        assert_ne!(now["tls.key"], old["tls.key"], "{name}: key not renewed");
        assert_eq!(now["ca.crt"], ca_pem, "{name}: bundle names another CA");
        assert_eq!(common_name(&now["tls.crt"]), common_name(&old["tls.crt"]), "{name}: CN changed");
        assert!(verifies_against(&now["tls.crt"], &ca_pem), "{name}: new leaf does not verify against the CA");
        // The old leaf still verifies too: that is what makes the rotation hitless.
        assert!(verifies_against(&old["tls.crt"], &ca_pem), "{name}: old leaf no longer verifies");
    }
    // A certificate from another CA does not verify (the check above can fail).
    let other = causeway_pki::CertificateAuthority::generate("other")?;
    assert!(!verifies_against(&other.issue_client("x")?.cert_pem, &ca_pem));
    Ok(())
}

/// The clustermesh-apiserver Service: `lb` gives it a load-balancer ingress IP, else it is a NodePort Service.
async fn create_apiserver_service(client: &Client, lb: Option<&str>) -> anyhow::Result<()> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "clustermesh-apiserver", "namespace": NS},
        "spec": {"type": if lb.is_some() { "LoadBalancer" } else { "NodePort" }, "clusterIP": "10.96.0.50",
                 "ports": [{"name": "etcd", "port": 2379, "nodePort": 32379}]}
    }))?;
    let api = Api::<Service>::namespaced(client.clone(), NS);
    api.create(&PostParams::default(), &svc).await?;
    if let Some(ip) = lb {
        let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        api.patch_status("clustermesh-apiserver", &PatchParams::default(), &Patch::Merge(status)).await?;
    }
    Ok(())
}

async fn create_node(client: &Client, ip: &str) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))?;
    let api = Api::<Node>::all(client.clone());
    api.create(&PostParams::default(), &node).await?;
    api.patch_status("node-1", &PatchParams::default(), &Patch::Merge(json!({"status": node.status}))).await?;
    Ok(())
}

/// Writes a Secret's keys as files, as a Secret volume would, and parses the directory with identity-sync's own
/// remotes reader.
fn mount_and_parse(s: &Secret, dir: &Path) -> BTreeMap<String, identity_sync::remotes::config::Loaded> {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    for (k, v) in data(s) {
        std::fs::write(dir.join(k), v).unwrap_or_else(|e| panic!("{e}"));
    }
    identity_sync::remotes::config::scan_dir(dir).unwrap_or_else(|e| panic!("scan: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_writes_peer_configs_identity_sync_accepts_and_disconnect_removes_them() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east", "west", "north"]).await?;
    let (east, west) = (clusters.client("east").await?, clusters.client("west").await?);
    // east: NodePort with a node address; west: LoadBalancer. Created before enable, so the server certificates
    // name these addresses.
    create_node(&east, "192.168.10.11").await?;
    create_apiserver_service(&east, None).await?;
    create_apiserver_service(&west, Some("198.51.100.20")).await?;
    enable(&clusters, "east", "east", "1").await.expect_ok("enable east");
    enable(&clusters, "west", "west", "2").await.expect_ok("enable west");

    let run = clusters
        .causeway(&["clustermesh", "connect", "--context", "east", "--destination-context", "west"])
        .await?
        .expect_ok("connect");
    assert!(!run.stdout.contains("warning"), "{}", run.stdout);
    assert!(run.stdout.contains("https://192.168.10.11:32379 (via NodePort)"), "{}", run.stdout);
    assert!(run.stdout.contains("https://198.51.100.20:2379 (via LoadBalancer)"), "{}", run.stdout);

    let tmp = tempfile::tempdir()?;
    let cases =
        [(&east, "east", "west", "https://198.51.100.20:2379"), (&west, "west", "east", "https://192.168.10.11:32379")];
    for (client, local, peer, endpoint) in cases {
        let remotes = secret(client, REMOTES_SECRET).await.unwrap_or_else(|| panic!("no remotes Secret in {local}"));
        let scan = mount_and_parse(&remotes, &tmp.path().join(local));
        assert_eq!(scan.keys().collect::<Vec<_>>(), vec![peer], "{local}: {scan:?}");
        let cfg = scan[peer].as_ref().unwrap_or_else(|e| panic!("{local}: identity-sync refuses the config: {e}"));
        assert_eq!(cfg.endpoints, vec![endpoint.to_string()]);
        let tls = cfg.tls.as_ref().unwrap_or_else(|| panic!("{local}: no TLS"));
        // The trusted CA is the peer's CA, and the client certificate is remote-<local>, signed by it.
        let peer_client = clusters.client(peer).await?;
        let peer_ca = data(&secret(&peer_client, CA_SECRET).await.unwrap_or_default())["ca.crt"].clone();
        assert_eq!(String::from_utf8_lossy(&tls.ca_pem), peer_ca);
        let cert = String::from_utf8_lossy(&tls.cert_pem).into_owned();
        assert_eq!(common_name(&cert), format!("remote-{local}"));
        assert!(verifies_against(&cert, &peer_ca), "{local}: client certificate not signed by {peer}'s CA");
        // The peer's server certificate names the endpoint's host, so TLS verification will pass.
        let server = data(&secret(&peer_client, SERVER_SECRET).await.unwrap_or_default())["tls.crt"].clone();
        let host = endpoint.trim_start_matches("https://").rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
        assert!(causeway::clustermesh::sans(&server).iter().any(|s| s == host), "{peer}'s server cert lacks {host}");
    }

    // Each side lists the other as a peer for its apiserver (which creates the remote-<peer> etcd user).
    for (client, peer) in [(&east, "west"), (&west, "east")] {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get(CONFIG_MAP).await?;
        assert_eq!(cm.data.unwrap_or_default().get("peers").map(String::as_str), Some(peer));
    }

    // A third cluster reusing west's ID is refused, naming the clash.
    let north = clusters.client("north").await?;
    create_apiserver_service(&north, Some("198.51.100.30")).await?;
    enable(&clusters, "north", "north", "2").await.expect_ok("enable north");
    let dup =
        clusters.causeway(&["clustermesh", "connect", "--context", "east", "--destination-context", "north"]).await?;
    assert!(!dup.ok, "{dup:?}");
    assert!(dup.stderr.contains("duplicate cluster ID 2: \"west\" is already connected to \"east\""), "{}", dup.stderr);
    assert!(secret(&north, REMOTES_SECRET).await.is_none(), "a refused connect wrote to north");

    let run = clusters
        .causeway(&["clustermesh", "disconnect", "--context", "east", "--destination-context", "west"])
        .await?
        .expect_ok("disconnect");
    assert_eq!(run.stdout.matches("removed peer").count(), 2, "{}", run.stdout);
    for (client, local) in [(&east, "east"), (&west, "west")] {
        let remotes = secret(client, REMOTES_SECRET).await.unwrap_or_default();
        assert!(data(&remotes).is_empty(), "{local} still has {:?}", data(&remotes).keys().collect::<Vec<_>>());
        assert!(mount_and_parse(&remotes, &tmp.path().join(format!("{local}-after"))).is_empty());
    }
    let cm = Api::<ConfigMap>::namespaced(east.clone(), NS).get(CONFIG_MAP).await?;
    assert_eq!(cm.data.unwrap_or_default().get("peers").map(String::as_str), Some(""));
    // Now north may take ID 2.
    clusters
        .causeway(&["clustermesh", "connect", "--context", "east", "--destination-context", "north"])
        .await?
        .expect_ok("connect north after west left");
    Ok(())
}

/// Writes the ConfigMap the way a chart with default values would, bypassing `enable`'s own checks.
async fn write_settings(client: &Client, name: &str, id: &str) -> anyhow::Result<()> {
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": CONFIG_MAP, "namespace": NS},
        "data": {"cluster-name": name, "cluster-id": id}
    }))?;
    let api = Api::<ConfigMap>::namespaced(client.clone(), NS);
    api.patch(CONFIG_MAP, &PatchParams::apply("test").force(), &Patch::Apply(cm)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_default_name_id_zero_and_duplicate_ids() -> anyhow::Result<()> {
    let clusters = Clusters::start(&["east", "west"]).await?;
    let (east, west) = (clusters.client("east").await?, clusters.client("west").await?);
    // enable itself refuses them...
    let r = enable(&clusters, "east", "default", "1").await;
    assert!(!r.ok && r.stderr.contains("cluster name \"default\" is not allowed"), "{r:?}");
    let r = enable(&clusters, "east", "east", "0").await;
    assert!(!r.ok && r.stderr.contains("cluster ID 0 is reserved"), "{r:?}");

    // Without flags, enable takes the name and ID the chart wrote, and refuses the chart's defaults too.
    let plain = || clusters.causeway(&["clustermesh", "enable", "--context", "west"]);
    let r = plain().await?;
    assert!(!r.ok && r.stderr.contains("pass --cluster-name and --cluster-id"), "{r:?}");
    write_settings(&west, "default", "0").await?;
    let r = plain().await?;
    assert!(!r.ok && r.stderr.contains("\"default\" is not allowed"), "{r:?}");
    write_settings(&west, "west", "2").await?;
    plain().await?.expect_ok("enable west from the chart's ConfigMap");

    enable(&clusters, "east", "east", "1").await.expect_ok("enable east");
    create_apiserver_service(&east, Some("198.51.100.10")).await?;
    create_apiserver_service(&west, Some("198.51.100.20")).await?;
    let connect =
        || clusters.causeway(&["clustermesh", "connect", "--context", "east", "--destination-context", "west"]);

    // ...and connect refuses them when a cluster got them some other way (a chart left at its defaults).
    let cases = [
        ("default", "2", "named \"default\": a meshed cluster needs a unique name"),
        ("west", "0", "has cluster ID 0, which is reserved"),
        (
            "west",
            "1",
            "duplicate cluster ID 1: \"east\" (context \"east\") and \"west\" (context \"west\") both use it",
        ),
        ("east", "2", "both clusters are named \"east\""),
    ];
    for (name, id, message) in cases {
        write_settings(&west, name, id).await?;
        let r = connect().await?;
        assert!(!r.ok, "{name}/{id} was accepted: {r:?}");
        assert!(r.stderr.contains(message), "{name}/{id}: {}", r.stderr);
        assert!(secret(&east, REMOTES_SECRET).await.is_none(), "a refused connect wrote to east");
    }
    write_settings(&west, "west", "2").await?;
    connect().await?.expect_ok("connect with valid settings");

    // Without enable on one side the message says what to run.
    let fresh = Clusters::start(&["a", "b"]).await?;
    enable(&fresh, "a", "a", "1").await.expect_ok("enable a");
    let r = fresh.causeway(&["clustermesh", "connect", "--context", "a", "--destination-context", "b"]).await?;
    assert!(!r.ok && r.stderr.contains("run `causeway clustermesh enable"), "{r:?}");
    Ok(())
}

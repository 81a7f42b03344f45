//! etcd access control: without a certificate from the cluster's CA nobody gets in, and a peer's `remote-<peer>`
//! user can read what ClusterMesh readers need but cannot write anything.

use std::time::Duration;

use causeway_multicluster_tests::{Cluster, ClusterSpec};
use causeway_pki::Pki;
use etcd_client::{Certificate, Client, ConnectOptions, TlsOptions};

async fn get_with(endpoint: &str, opts: ConnectOptions, key: &str) -> Result<usize, String> {
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(opts)).await.map_err(|e| e.to_string())?;
        c.get(key, None).await.map(|r| r.kvs().len()).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_valid_certificates_are_refused_and_peers_are_read_only() {
    let east = Cluster::start(ClusterSpec::new("east", 1).tls(&["west"])).await.expect("start the clusters");
    // Failing by panic while the clusters are alive prints every component log.
    scenario_clients_without_valid_certificates_are_refused_and_peers_are_read_only(&east)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn scenario_clients_without_valid_certificates_are_refused_and_peers_are_read_only(
    east: &Cluster,
) -> anyhow::Result<()> {
    let endpoint = east.etcd.endpoint();
    let config_key = "cilium/cluster-config/east";
    let ca_pem = east.etcd.ca_pem().expect("TLS etcd has a CA").to_string();

    // Sanity: the root user (the apiserver's) reads the cluster config the apiserver wrote.
    let mut root = east.etcd.client().await;
    assert_eq!(root.get(config_key, None).await?.kvs().len(), 1, "east's apiserver did not write its cluster config");

    // No client certificate at all.
    let no_cert = opts().with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(&ca_pem)));
    let r = get_with(&endpoint, no_cert, config_key).await;
    assert!(r.is_err(), "a client without a certificate read east's etcd: {r:?}");

    // A certificate for `root`, but from another CA.
    let other = Pki::loopback()?.client("root")?;
    let foreign =
        opts().with_tls(causeway_testsupport::tls_options(&other).ca_certificate(Certificate::from_pem(&ca_pem)));
    let r = get_with(&endpoint, foreign, config_key).await;
    assert!(r.is_err(), "a client with a certificate from a foreign CA read east's etcd: {r:?}");

    // The peer user reads what a ClusterMesh reader needs.
    let mut west = east.etcd.client_as("remote-west").await;
    for key in [config_key, "cilium/.has-cluster-config", "cilium/synced/east/cilium/state/services/v1"] {
        let got = west.get(key, None).await;
        assert!(
            matches!(&got, Ok(r) if r.kvs().len() == 1),
            "remote-west cannot read {key}: {:?}",
            got.map(|r| r.kvs().len())
        );
    }
    // ...and cannot write or delete anything.
    let denied = |r: Result<(), etcd_client::Error>, what: &str| {
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("permission denied"), "remote-west could {what} (error: {e:?})");
    };
    denied(west.put("cilium/state/services/v1/east/shop/evil", "{}", None).await.map(|_| ()), "write a service");
    denied(west.put(config_key, r#"{"id":9}"#, None).await.map(|_| ()), "overwrite the cluster config");
    denied(west.delete(config_key, None).await.map(|_| ()), "delete the cluster config");
    denied(west.put("cilium/synced/east/cilium/state/ip/v1", "x", None).await.map(|_| ()), "write a canary");
    denied(west.put("unrelated/key", "x", None).await.map(|_| ()), "write outside cilium/");

    // The cluster config is untouched.
    let v = root.get(config_key, None).await?;
    let value: serde_json::Value = serde_json::from_slice(v.kvs()[0].value())?;
    assert_eq!(value["id"], 1, "{value}");
    Ok(())
}

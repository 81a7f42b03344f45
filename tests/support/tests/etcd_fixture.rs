//! Smoke tests of the etcd fixture itself.

use std::time::Duration;

use causeway_pki::Pki;
use causeway_testsupport::Etcd;
use etcd_client::Client;

#[tokio::test]
async fn plaintext_start_kill_restart_keeps_data_and_restart_empty_wipes_it() {
    let mut etcd = Etcd::start().await;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let mut c = etcd.client().await;
    c.put("k", "v", None).await.unwrap();

    etcd.kill();
    assert!(!etcd.is_running());
    let mut c2 = Client::connect(etcd.endpoints(), Some(etcd.connect_options_for("root"))).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), c2.get("k", None)).await.map(|r| r.is_err()).unwrap_or(true),
        "a killed etcd must not answer"
    );

    etcd.restart().await;
    let resp = etcd.client().await.get("k", None).await.unwrap();
    assert_eq!(resp.kvs()[0].value(), b"v");

    let rev = etcd.compact().await;
    assert!(rev >= 2);

    etcd.restart_empty().await;
    let resp = etcd.client().await.get("k", None).await.unwrap();
    assert!(resp.kvs().is_empty());
}

#[tokio::test]
async fn tls_etcd_accepts_issued_certs_and_refuses_clients_without_one() {
    let pki = Pki::loopback().unwrap();
    let etcd = Etcd::start_tls(&pki).await;
    assert!(etcd.endpoint().starts_with("https://"));
    let mut c = etcd.client_as("remote-west").await;
    c.put("k", "v", None).await.unwrap();

    // Trusts the server, presents no certificate.
    let no_cert =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(etcd.ca_pem().unwrap()));
    let opts = etcd_client::ConnectOptions::new().with_tls(no_cert).with_timeout(Duration::from_secs(5));
    let mut anon = Client::connect(etcd.endpoints(), Some(opts)).await.unwrap();
    assert!(anon.get("k", None).await.is_err());
}

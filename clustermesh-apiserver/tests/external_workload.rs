//! External-workload registration end to end: the clustermesh-apiserver binary against real etcd and the fake kube
//! API (the one test stand-in), called over real mTLS gRPC with certificates minted like `causeway clustermesh
//! enable` does. A registered host appears with its identity in etcd's ipcache and in its object's status; unknown
//! names and other certificates are refused; re-registering with a new address leaves no stale entry. A host that
//! registers a WireGuard key joins the mesh datapath: it is exported with a node record (as cluster nodes are) and
//! an ipcache entry for its mesh address, learns its mesh address and the cluster's DNS and Service CIDRs, and
//! refusals (bad key, no or overlapping range) show up as Ready=False in its object's status.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_api::v1::workloads_client::WorkloadsClient;
use causeway_api::v1::{RegisterRequest, RegisterResponse};
use causeway_crds::{CausewayIdentity, ExternalWorkload};
use causeway_pki::{users, CertificateAuthority, IssuedCert, Pki};
use causeway_store::Node;
use causeway_testsupport::{wait_until, Etcd};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::CustomResourceExt;
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// WireGuard public keys as `wg pubkey` prints them.
const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY2: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
/// What the apiserver is told with --service-cidrs.
const SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/12", "fd00:96::/108"];

/// Kills the apiserver when the test ends, however it ends.
struct Apiserver(Child);

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn get(etcd: &mut etcd_client::Client, key: &str) -> Option<String> {
    let resp = etcd.get(key, None).await.ok()?;
    resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// The lease a key is attached to (each apiserver process writes under its own leases).
async fn lease(etcd: &etcd_client::Client, key: &str) -> Option<i64> {
    let resp = etcd.clone().get(key, None).await.ok()?;
    resp.kvs().first().map(|kv| kv.lease())
}

async fn keys(etcd: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    let Ok(resp) = etcd.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await else { return vec![] };
    resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

/// Real etcd, the fake kube API with both CRDs, the mesh PKI and the apiserver serving registrations on `port`.
struct Setup {
    etcd: Etcd,
    _kube: FakeApiServerHandle,
    client: kube::Client,
    pki: Pki,
    port: u16,
    _dir: tempfile::TempDir,
    apiserver: Apiserver,
    args: Vec<String>,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Starts the apiserver and waits for its workloads port.
async fn spawn(args: &[String], port: u16) -> Result<Apiserver> {
    let mut apiserver = Apiserver(
        Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .env("CAUSEWAY_CLUSTER_NAME", "east")
            .env("CAUSEWAY_CLUSTER_ID", "7")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting clustermesh-apiserver")?,
    );
    let up = wait_until(WAIT, || async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
    if let Ok(Some(status)) = apiserver.0.try_wait() {
        bail!("clustermesh-apiserver exited early: {status}");
    }
    anyhow::ensure!(up, "the workloads service never listened on {port}");
    Ok(apiserver)
}

impl Setup {
    /// Stops the apiserver and starts it again with the same flags (etcd and the kube API keep their state).
    async fn restart(&mut self) -> Result<()> {
        let _ = self.apiserver.0.kill();
        let _ = self.apiserver.0.wait();
        self.apiserver = spawn(&self.args, self.port).await?;
        Ok(())
    }

    async fn start() -> Result<Setup> {
        let etcd = Etcd::start().await;
        let kube = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
        let kubeconfig = Kubeconfig::from_yaml(&kube.kubeconfig_yaml())?;
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?,
        )?;
        let dir = tempfile::tempdir()?;
        let kubeconfig_path = dir.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig_path)?;
        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        crds.create(&PostParams::default(), &CausewayIdentity::crd()).await?;
        crds.create(&PostParams::default(), &ExternalWorkload::crd()).await?;

        let pki = Pki::loopback()?;
        let ca = write(dir.path(), "ca.crt", pki.ca().cert_pem())?;
        let cert = write(dir.path(), "tls.crt", &pki.server().cert_pem)?;
        let key = write(dir.path(), "tls.key", &pki.server().key_pem)?;
        let port = free_port()?;
        let args = vec![
            "--etcd-endpoints".to_string(),
            etcd.endpoint(),
            "--kubeconfig".into(),
            kubeconfig_path.display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--workloads-addr".into(),
            format!("127.0.0.1:{port}"),
            "--workloads-tls-ca".into(),
            ca.display().to_string(),
            "--workloads-tls-cert".into(),
            cert.display().to_string(),
            "--workloads-tls-key".into(),
            key.display().to_string(),
            format!("--service-cidrs={}", SERVICE_CIDRS.join(",")),
        ];
        let apiserver = spawn(&args, port).await?;
        Ok(Setup { etcd, _kube: kube, client, pki, port, _dir: dir, apiserver, args })
    }

    /// A gRPC client presenting `cert` (None: no client certificate) and trusting the mesh CA.
    async fn connect(&self, cert: Option<&IssuedCert>) -> Result<WorkloadsClient<Channel>> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pki.ca().cert_pem()))
            .domain_name("localhost");
        if let Some(c) = cert {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        let channel =
            Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))?.tls_config(tls)?.connect().await?;
        Ok(WorkloadsClient::new(channel))
    }

    async fn register_as(
        &self,
        cert: Option<&IssuedCert>,
        name: &str,
        ipv4: &str,
        ipv6: &str,
    ) -> Result<Result<RegisterResponse, tonic::Status>> {
        let mut c = self.connect(cert).await?;
        let req = RegisterRequest { name: name.into(), ipv4: ipv4.into(), ipv6: ipv6.into(), ..Default::default() };
        Ok(c.register(req).await.map(|r| r.into_inner()))
    }

    /// Registers `name` at `ipv4` with the external-workload certificate and a WireGuard key ("" for none).
    async fn register_keyed(
        &self,
        name: &str,
        ipv4: &str,
        key: &str,
    ) -> Result<Result<RegisterResponse, tonic::Status>> {
        let mut c = self.connect(Some(&self.workload_cert()?)).await?;
        let req = RegisterRequest {
            name: name.into(),
            ipv4: ipv4.into(),
            wireguard_pub_key: key.into(),
            ..Default::default()
        };
        Ok(c.register(req).await.map(|r| r.into_inner()))
    }

    /// An ExternalWorkload with `spec.ipv4AllocCIDR` = `cidr` (None: no range).
    async fn create_workload_with(&self, name: &str, labels: Value, cidr: Option<&str>) -> Result<()> {
        let spec = match cidr {
            Some(c) => json!({"ipv4AllocCIDR": c}),
            None => json!({}),
        };
        let obj: ExternalWorkload = serde_json::from_value(json!({
            "apiVersion": "causeway.io/v1alpha1", "kind": "ExternalWorkload",
            "metadata": {"name": name, "labels": labels},
            "spec": spec
        }))?;
        Api::<ExternalWorkload>::all(self.client.clone()).create(&PostParams::default(), &obj).await?;
        Ok(())
    }

    /// The cluster DNS Service the apiserver looks up by default (kube-system/kube-dns).
    async fn create_kube_dns(&self, cluster_ip: &str) -> Result<()> {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))?;
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(self.client.clone(), "kube-system")
            .create(&PostParams::default(), &svc)
            .await?;
        Ok(())
    }

    fn workload_cert(&self) -> Result<IssuedCert> {
        Ok(self.pki.client(users::EXTERNAL_WORKLOAD)?)
    }

    async fn create_workload(&self, name: &str, labels: Value) -> Result<()> {
        let obj: ExternalWorkload = serde_json::from_value(json!({
            "apiVersion": "causeway.io/v1alpha1", "kind": "ExternalWorkload",
            "metadata": {"name": name, "labels": labels},
            "spec": {"ipv4AllocCIDR": "10.192.1.0/30"}
        }))?;
        Api::<ExternalWorkload>::all(self.client.clone()).create(&PostParams::default(), &obj).await?;
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<Value> {
        let obj = Api::<ExternalWorkload>::all(self.client.clone()).get(name).await?;
        Ok(serde_json::to_value(obj.status)?)
    }

    async fn delete_workload(&self, name: &str) -> Result<()> {
        Api::<ExternalWorkload>::all(self.client.clone()).delete(name, &Default::default()).await?;
        Ok(())
    }

    fn still_running(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.apiserver.0.try_wait() {
            bail!("clustermesh-apiserver exited: {status}");
        }
        Ok(())
    }
}

fn ipcache_key(ip: &str) -> String {
    format!("cilium/state/ip/v1/default/{ip}")
}

fn node_key(name: &str) -> String {
    format!("cilium/state/nodes/v1/east/{name}")
}

/// The node record of `name` once `ok` holds for it (None: it never did within [`WAIT`]).
async fn wait_node(etcd: &etcd_client::Client, name: &str, ok: impl Fn(&Node) -> bool) -> Option<Node> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let node = get(&mut etcd.clone(), &node_key(name)).await.and_then(|v| serde_json::from_str::<Node>(&v).ok());
        if let Some(n) = node.filter(|n| ok(n)) {
            return Some(n);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `key` is absent from etcd; false if it never went.
async fn wait_gone(etcd: &etcd_client::Client, key: &str) -> bool {
    wait_until(WAIT, || {
        let mut c = etcd.clone();
        let k = key.to_string();
        async move { get(&mut c, &k).await.is_none() }
    })
    .await
}

/// The parsed ipcache entry of `ip`, once it exists with identity `id`.
async fn wait_ipcache(etcd: &etcd_client::Client, ip: &str, id: u32) -> Result<Value> {
    let ok = wait_until(WAIT, || {
        let mut c = etcd.clone();
        async move {
            let Some(v) = get(&mut c, &ipcache_key(ip)).await else { return false };
            serde_json::from_str::<Value>(&v).is_ok_and(|e| e["ID"] == json!(id))
        }
    })
    .await;
    let raw = get(&mut etcd.clone(), &ipcache_key(ip)).await;
    anyhow::ensure!(ok, "no ipcache entry for {ip} with identity {id}: {raw:?}");
    Ok(serde_json::from_str(&raw.context("entry")?)?)
}

fn ready_condition(status: &Value) -> Value {
    status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_workload_is_exported_with_its_identity_and_status() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload("db-vm-1", json!({"app": "postgres", "io.kubernetes.pod.namespace": "legacy"})).await?;
    let cert = s.workload_cert()?;

    let resp = s.register_as(Some(&cert), "db-vm-1", "192.0.2.7", "2001:db8::7").await?.context("registration")?;
    assert_eq!((resp.cluster_name.as_str(), resp.cluster_id), ("east", 7));
    assert!(resp.identity > 7 << 16 && resp.identity < 8 << 16, "identity {} outside cluster 7's range", resp.identity);
    assert_eq!(
        resp.identity_labels,
        "k8s:app=postgres;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=legacy;"
    );
    assert_eq!(resp.ipv4_alloc_cidr, "10.192.1.0/30");
    let id = resp.identity;

    // The status says so.
    let status = s.status("db-vm-1").await?;
    assert_eq!(status["id"], json!(id));
    assert_eq!(status["ip"], json!("192.0.2.7"));
    assert_eq!(status["ipv6"], json!("2001:db8::7"));
    let ready = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned();
    assert_eq!(ready.as_ref().map(|c| c["status"].clone()), Some(json!("True")), "{status}");

    // etcd has the host's addresses with its identity, and the identity itself, like a pod's.
    let mut c = s.etcd.client().await;
    for ip in ["192.0.2.7", "2001:db8::7"] {
        let found = wait_until(WAIT, || {
            let mut c = c.clone();
            async move { get(&mut c, &ipcache_key(ip)).await.is_some() }
        })
        .await;
        assert!(found, "no ipcache entry for {ip}");
        let entry: Value = serde_json::from_str(&get(&mut c, &ipcache_key(ip)).await.context("entry")?)?;
        assert_eq!(entry["ID"], json!(id), "{entry}");
        assert_eq!(entry["IP"], json!(ip));
        assert_eq!(entry["HostIP"], json!(ip));
        assert_eq!((entry["K8sNamespace"].clone(), entry["K8sPodName"].clone()), (json!("legacy"), json!("db-vm-1")));
    }
    let identity_key = format!("cilium/state/identities/v1/id/{id}");
    let exported = wait_until(WAIT, || {
        let mut c = c.clone();
        let k = identity_key.clone();
        async move { get(&mut c, &k).await.is_some() }
    })
    .await;
    assert!(exported, "identity {id} never exported");
    assert_eq!(get(&mut c, &identity_key).await.as_deref(), Some(resp.identity_labels.as_str()));

    // Registering again with a new IPv4 and no IPv6 replaces the entries: same identity, no stale entry.
    let again = s.register_as(Some(&cert), "db-vm-1", "192.0.2.8", "").await?.context("re-registration")?;
    assert_eq!(again.identity, id);
    let moved = wait_until(WAIT, || {
        let mut c = c.clone();
        async move {
            get(&mut c, &ipcache_key("192.0.2.7")).await.is_none()
                && get(&mut c, &ipcache_key("2001:db8::7")).await.is_none()
                && get(&mut c, &ipcache_key("192.0.2.8")).await.is_some()
        }
    })
    .await;
    assert!(moved, "ipcache after re-registration: {:?}", keys(&mut c, "cilium/state/ip/v1/").await);
    assert_eq!(keys(&mut c, "cilium/state/ip/v1/").await, vec![ipcache_key("192.0.2.8")]);
    let status = s.status("db-vm-1").await?;
    assert_eq!((status["id"].clone(), status["ip"].clone()), (json!(id), json!("192.0.2.8")));
    assert!(status.get("ipv6").is_none_or(Value::is_null), "stale ipv6 in status: {status}");

    // Relabelling the object gives the registered host the new identity, on the same address, without a new call.
    let api = Api::<ExternalWorkload>::all(s.client.clone());
    let patch = json!({"metadata": {"labels": {"app": "mysql", "io.kubernetes.pod.namespace": "legacy"}}});
    api.patch("db-vm-1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    let relabelled = wait_until(WAIT, || {
        let mut c = c.clone();
        async move {
            let Some(v) = get(&mut c, &ipcache_key("192.0.2.8")).await else { return false };
            serde_json::from_str::<Value>(&v).is_ok_and(|e| e["ID"] != json!(id))
        }
    })
    .await;
    assert!(relabelled, "the ipcache entry kept the old identity after the labels changed");
    let entry: Value = serde_json::from_str(&get(&mut c, &ipcache_key("192.0.2.8")).await.context("entry")?)?;
    let new_id = entry["ID"].as_u64().context("ID")?;
    assert_eq!(
        get(&mut c, &format!("cilium/state/identities/v1/id/{new_id}")).await.as_deref(),
        Some("k8s:app=mysql;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=legacy;")
    );
    let status_follows =
        wait_until(WAIT, || async { s.status("db-vm-1").await.is_ok_and(|st| st["id"] == json!(new_id)) }).await;
    assert!(status_follows, "status id: {}", s.status("db-vm-1").await?);

    // Another host may not take the address.
    s.create_workload("db-vm-2", json!({"app": "postgres"})).await?;
    let taken = s.register_as(Some(&cert), "db-vm-2", "192.0.2.8", "").await?;
    assert_eq!(taken.as_ref().map_err(|e| e.code()).err(), Some(Code::AlreadyExists), "{taken:?}");
    s.still_running()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workload_is_refused() -> Result<()> {
    let mut s = Setup::start().await?;
    let cert = s.workload_cert()?;
    let refused = s.register_as(Some(&cert), "no-such-vm", "192.0.2.9", "").await?;
    let status = refused.err().context("an unknown name was accepted")?;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("no ExternalWorkload named \"no-such-vm\""), "{}", status.message());
    let bad = s.register_as(Some(&cert), "Not_A_Name", "192.0.2.9", "").await?;
    assert_eq!(bad.err().map(|e| e.code()), Some(Code::InvalidArgument));
    let mut c = s.etcd.client().await;
    assert_eq!(get(&mut c, &ipcache_key("192.0.2.9")).await, None);
    s.still_running()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_other_than_externalworkload_are_refused() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload("db-vm-1", json!({"app": "postgres"})).await?;

    // Signed by the mesh CA, but for another user: the handshake succeeds, the call is denied.
    for user in [users::remote("west"), users::admin("east"), users::ROOT.to_string()] {
        let cert = s.pki.client(&user)?;
        let denied = s.register_as(Some(&cert), "db-vm-1", "192.0.2.7", "").await?;
        let status = denied.err().with_context(|| format!("{user} was allowed to register"))?;
        assert_eq!(status.code(), Code::PermissionDenied, "{user}: {status:?}");
        assert!(status.message().contains(&user), "{}", status.message());
    }
    // CN externalworkload from another CA, and no certificate at all: the TLS handshake fails.
    let foreign = CertificateAuthority::generate("someone-else")?.issue_client(users::EXTERNAL_WORKLOAD)?;
    let foreign_call = match s.register_as(Some(&foreign), "db-vm-1", "192.0.2.7", "").await {
        Ok(r) => r.is_ok(),
        Err(_) => false,
    };
    assert!(!foreign_call, "a certificate from another CA was accepted");
    let anonymous = match s.register_as(None, "db-vm-1", "192.0.2.7", "").await {
        Ok(r) => r.is_ok(),
        Err(_) => false,
    };
    assert!(!anonymous, "a client without a certificate was accepted");

    let mut c = s.etcd.client().await;
    assert_eq!(get(&mut c, &ipcache_key("192.0.2.7")).await, None);
    assert!(s.status("db-vm-1").await?.is_null(), "status written for a refused registration");
    // The right certificate still works (the refusals were about the certificates, not the setup).
    let ok = s.register_as(Some(&s.workload_cert()?), "db-vm-1", "192.0.2.7", "").await?;
    assert!(ok.is_ok(), "{ok:?}");
    s.still_running()
}

async fn wait_for(etcd: &etcd_client::Client, what: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = keys(&mut etcd.clone(), "cilium/state/ip/v1/").await;
        if what(&found) {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "ipcache never got there: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a restart the host is exported again from its object's status, with the same identity, without
/// registering again; deleting its object withdraws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_survive_a_restart_and_leave_with_their_object() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload("db-vm-1", json!({"app": "postgres"})).await?;
    let id = s.register_as(Some(&s.workload_cert()?), "db-vm-1", "192.0.2.7", "").await?.context("register")?.identity;
    let c = s.etcd.client().await;
    wait_for(&c, |k| k == [ipcache_key("192.0.2.7")]).await;

    let old_lease = lease(&c, &ipcache_key("192.0.2.7")).await.context("lease of the first process")?;
    s.restart().await?;
    // The new process owns the prefix again: it deletes what it did not write itself (the old lease outlives the
    // killed process), so the entry survives only if the new process re-exported it, under its own lease.
    let mut c2 = s.etcd.client().await;
    let reexported = wait_until(WAIT, || {
        let c = c2.clone();
        async move { lease(&c, &ipcache_key("192.0.2.7")).await.is_some_and(|l| l != old_lease) }
    })
    .await;
    assert!(
        reexported,
        "the host was not re-exported after the restart: {:?}",
        keys(&mut c2, "cilium/state/ip/v1/").await
    );
    assert_eq!(keys(&mut c2, "cilium/state/ip/v1/").await, vec![ipcache_key("192.0.2.7")]);
    let entry: Value = serde_json::from_str(&get(&mut c2, &ipcache_key("192.0.2.7")).await.context("entry")?)?;
    assert_eq!(entry["ID"], json!(id), "{entry}");

    Api::<ExternalWorkload>::all(s.client.clone()).delete("db-vm-1", &Default::default()).await?;
    wait_for(&c, |k| k.is_empty()).await;
    // Its name is unknown now.
    let refused = s.register_as(Some(&s.workload_cert()?), "db-vm-1", "192.0.2.7", "").await?;
    assert_eq!(refused.err().map(|e| e.code()), Some(Code::NotFound));
    s.still_running()
}

/// A host registering a WireGuard key is exported like a cluster node (node record with its underlay address, its
/// range as pod CIDR and its key) plus an ipcache entry for its mesh address; it learns its mesh address, the
/// cluster's DNS server and domain and the Service CIDRs. Re-registering with the same inputs changes nothing, a new
/// key replaces the record, an overlapping range of another host is refused (and said so in that host's status),
/// and deleting the object withdraws everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_host_joins_the_mesh_datapath_and_leaves_with_its_object() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_kube_dns("10.96.0.10").await?;
    s.create_workload_with(
        "db-vm-1",
        json!({"app": "postgres", "topology.kubernetes.io/zone": "dc-2"}),
        Some("10.192.1.0/30"),
    )
    .await?;

    let resp = s.register_keyed("db-vm-1", "192.0.2.7", KEY).await?.context("keyed registration")?;
    assert_eq!(resp.mesh_ipv4, "10.192.1.1");
    assert_eq!(resp.cluster_dns, "10.96.0.10");
    assert_eq!(resp.cluster_domain, "cluster.local");
    assert_eq!(resp.service_cidrs, SERVICE_CIDRS.to_vec());
    assert_eq!(resp.ipv4_alloc_cidr, "10.192.1.0/30");
    let id = resp.identity;

    // The node record, in the shape cluster nodes are exported in.
    let c = s.etcd.client().await;
    let node = wait_node(&c, "db-vm-1", |_| true).await.context("no node record for the keyed host")?;
    assert_eq!((node.name.as_str(), node.cluster.as_str(), node.cluster_id), ("db-vm-1", "east", 7));
    assert_eq!(node.internal_ips().collect::<Vec<_>>(), vec!["192.0.2.7".parse::<std::net::IpAddr>()?]);
    assert_eq!(node.ipv4_alloc_cidr, Some("10.192.1.0/30".parse()?));
    assert_eq!(node.wireguard_pub_key, KEY);
    assert_eq!(node.zone(), Some("dc-2"));
    // A peer's reader accepts the record and the mesh entry as this cluster's (name, ID, identity range).
    let peer_view = causeway_store::RemoteContext {
        name: causeway_store::ClusterName::new("east")?,
        id: causeway_store::ClusterId::new(7, causeway_store::MaxConnectedClusters::C255)?,
        mode: causeway_store::MaxConnectedClusters::C255,
    };
    let raw = get(&mut c.clone(), &node_key("db-vm-1")).await.context("node record")?;
    match peer_view.decode(&node_key("db-vm-1"), raw.as_bytes()) {
        Ok(causeway_store::validate::RemoteEntry::Node(n)) => assert_eq!(n, node),
        other => bail!("a peer rejects the node record {raw}: {other:?}"),
    }

    // Both addresses map to the host's identity, and live at the underlay address.
    for ip in ["192.0.2.7", "10.192.1.1"] {
        let entry = wait_ipcache(&c, ip, id).await?;
        assert_eq!((entry["IP"].clone(), entry["HostIP"].clone()), (json!(ip), json!("192.0.2.7")), "{entry}");
        assert_eq!(entry["K8sPodName"], json!("db-vm-1"));
        let raw = get(&mut c.clone(), &ipcache_key(ip)).await.context("entry")?;
        let decoded = peer_view.decode(&ipcache_key(ip), raw.as_bytes());
        assert!(matches!(decoded, Ok(causeway_store::validate::RemoteEntry::Ip(_))), "{ip}: {decoded:?}");
    }
    let status = s.status("db-vm-1").await?;
    assert_eq!((status["meshIPv4"].clone(), status["wireguardPublicKey"].clone()), (json!("10.192.1.1"), json!(KEY)));
    assert_eq!((status["id"].clone(), status["ip"].clone()), (json!(id), json!("192.0.2.7")));
    assert_eq!(ready_condition(&status)["status"], json!("True"), "{status}");

    // Same inputs again: same answer, same record.
    let again = s.register_keyed("db-vm-1", "192.0.2.7", KEY).await?.context("re-registration")?;
    assert_eq!((again.identity, again.mesh_ipv4.as_str()), (id, "10.192.1.1"));
    let before = get(&mut c.clone(), &node_key("db-vm-1")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&mut c.clone(), &node_key("db-vm-1")).await, before, "an identical registration changed the record");
    // A new key replaces the record's key.
    s.register_keyed("db-vm-1", "192.0.2.7", KEY2).await?.context("new key")?;
    let rekeyed = wait_node(&c, "db-vm-1", |n| n.wireguard_pub_key == KEY2).await;
    assert!(
        rekeyed.is_some(),
        "the node record kept the old key: {:?}",
        get(&mut c.clone(), &node_key("db-vm-1")).await
    );
    let status_key = wait_until(WAIT, || async {
        s.status("db-vm-1").await.is_ok_and(|st| st["wireguardPublicKey"] == json!(KEY2))
    })
    .await;
    assert!(status_key, "status key: {}", s.status("db-vm-1").await?);

    // A second host whose range overlaps is refused, and its object says why.
    s.create_workload_with("db-vm-2", json!({"app": "postgres"}), Some("10.192.1.0/29")).await?;
    let overlap = s.register_keyed("db-vm-2", "192.0.2.9", KEY).await?;
    let status = overlap.err().context("an overlapping range was accepted")?;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().contains("\"db-vm-1\"") && status.message().contains("10.192.1.0/30"),
        "{}",
        status.message()
    );
    let refused = s.status("db-vm-2").await?;
    let ready = ready_condition(&refused);
    assert_eq!(
        (ready["status"].clone(), ready["reason"].clone()),
        (json!("False"), json!("AllocCIDROverlap")),
        "{refused}"
    );
    assert!(ready["message"].as_str().is_some_and(|m| m.contains("db-vm-1")), "{ready}");
    let mut c2 = c.clone();
    assert_eq!(get(&mut c2, &node_key("db-vm-2")).await, None);
    assert_eq!(get(&mut c2, &ipcache_key("192.0.2.9")).await, None);
    // A neighbouring range is fine.
    s.delete_workload("db-vm-2").await?;
    s.create_workload_with("db-vm-3", json!({"app": "postgres"}), Some("10.192.1.4/30")).await?;
    let third = s.register_keyed("db-vm-3", "192.0.2.10", KEY).await?.context("disjoint range")?;
    assert_eq!(third.mesh_ipv4, "10.192.1.5");

    // Deleting the object withdraws the node record and both ipcache entries; the other host stays.
    s.delete_workload("db-vm-1").await?;
    for key in [node_key("db-vm-1"), ipcache_key("192.0.2.7"), ipcache_key("10.192.1.1")] {
        assert!(wait_gone(&c, &key).await, "{key} outlived its object");
    }
    assert!(get(&mut c2, &node_key("db-vm-3")).await.is_some());
    assert!(get(&mut c2, &ipcache_key("10.192.1.5")).await.is_some());
    s.still_running()
}

/// Refusals of keyed registrations: a key without a range is FAILED_PRECONDITION, a malformed key
/// INVALID_ARGUMENT; each leaves Ready=False with the reason in the object's status and exports nothing.
/// Registering again without a key withdraws the node record and mesh address. Without a DNS Service the answer's
/// cluster_dns is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_registrations_are_refused_without_a_range_or_with_a_bad_key() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload_with("vm-a", json!({"app": "web"}), None).await?;
    let no_range = s.register_keyed("vm-a", "192.0.2.20", KEY).await?;
    let status = no_range.err().context("a key without a range was accepted")?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("ipv4AllocCIDR"), "{}", status.message());
    let st = s.status("vm-a").await?;
    let ready = ready_condition(&st);
    assert_eq!((ready["status"].clone(), ready["reason"].clone()), (json!("False"), json!("NoAllocCIDR")), "{st}");
    assert!(st.get("id").is_none_or(Value::is_null), "a refused first registration wrote an identity: {st}");

    s.create_workload_with("vm-b", json!({"app": "web"}), Some("10.192.2.0/30")).await?;
    for bad in ["not-a-key", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8A=="] {
        let refused = s.register_keyed("vm-b", "192.0.2.21", bad).await?;
        let status = refused.err().with_context(|| format!("key {bad:?} was accepted"))?;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("WireGuard public key"), "{}", status.message());
    }
    let st = s.status("vm-b").await?;
    assert_eq!(ready_condition(&st)["reason"], json!("InvalidRequest"), "{st}");
    let mut c = s.etcd.client().await;
    for key in [node_key("vm-a"), node_key("vm-b"), ipcache_key("192.0.2.20"), ipcache_key("192.0.2.21")] {
        assert_eq!(get(&mut c, &key).await, None, "{key} exported for a refused registration");
    }

    // A keyed host named like a cluster Node would replace that node's record: refused.
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-1"}}))?;
    Api::<k8s_openapi::api::core::v1::Node>::all(s.client.clone()).create(&PostParams::default(), &node).await?;
    s.create_workload_with("worker-1", json!({"app": "web"}), Some("10.192.4.0/30")).await?;
    let clash = s.register_keyed("worker-1", "192.0.2.22", KEY).await?;
    let status = clash.err().context("a host named like a Node was accepted")?;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("a Node of this cluster is named \"worker-1\""), "{}", status.message());
    assert_eq!(ready_condition(&s.status("worker-1").await?)["reason"], json!("NodeNameTaken"));
    assert_eq!(get(&mut c, &ipcache_key("192.0.2.22")).await, None);

    // Now a good key: joined (and Ready again); the answer has no DNS server (no kube-dns Service here).
    let ok = s.register_keyed("vm-b", "192.0.2.21", KEY).await?.context("keyed registration")?;
    assert_eq!((ok.mesh_ipv4.as_str(), ok.cluster_dns.as_str()), ("10.192.2.1", ""));
    assert!(wait_node(&c, "vm-b", |_| true).await.is_some());
    wait_ipcache(&c, "10.192.2.1", ok.identity).await?;
    assert_eq!(ready_condition(&s.status("vm-b").await?)["status"], json!("True"));
    // Without a key: the node record and the mesh address go, the underlay entry stays.
    let keyless = s.register_keyed("vm-b", "192.0.2.21", "").await?.context("keyless re-registration")?;
    assert_eq!(keyless.mesh_ipv4, "");
    for key in [node_key("vm-b"), ipcache_key("10.192.2.1")] {
        assert!(wait_gone(&c, &key).await, "{key} outlived the key");
    }
    wait_ipcache(&c, "192.0.2.21", ok.identity).await?;
    let st = s.status("vm-b").await?;
    assert!(
        st.get("meshIPv4").is_none_or(Value::is_null) && st.get("wireguardPublicKey").is_none_or(Value::is_null),
        "{st}"
    );
    s.still_running()
}

/// Every delete etcd reports under `prefix` from now on (the watch runs until the test ends).
async fn record_deletes(etcd: &etcd_client::Client, prefix: &str) -> Result<Arc<Mutex<Vec<String>>>> {
    let mut stream = etcd.clone().watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    let deletes = Arc::new(Mutex::new(Vec::new()));
    let out = deletes.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            for e in resp.events() {
                if e.event_type() == etcd_client::EventType::Delete {
                    let key = e.kv().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).unwrap_or_default();
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(key);
                }
            }
        }
    });
    Ok(deletes)
}

/// A keyed host survives an apiserver restart: its node record and mesh entry are exported again by the new
/// process (under its own lease) from the object's status, before the new process's initial sync, so they are
/// never deleted on the way (peers would drop the host's tunnel for a moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_host_is_re_exported_after_a_restart() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload_with("mesh-vm", json!({"app": "db"}), Some("10.192.3.0/31")).await?;
    let resp = s.register_keyed("mesh-vm", "192.0.2.30", KEY).await?.context("register")?;
    assert_eq!(resp.mesh_ipv4, "10.192.3.0", "a /31's first address");
    let c = s.etcd.client().await;
    wait_node(&c, "mesh-vm", |_| true).await.context("node record")?;
    wait_ipcache(&c, "10.192.3.0", resp.identity).await?;
    let old_lease = lease(&c, &node_key("mesh-vm")).await.context("lease of the first process")?;
    let deletes = record_deletes(&c, "cilium/state/").await?;
    s.restart().await?;
    let c2 = s.etcd.client().await;
    let reexported = wait_until(WAIT, || {
        let c = c2.clone();
        async move { lease(&c, &node_key("mesh-vm")).await.is_some_and(|l| l != old_lease) }
    })
    .await;
    assert!(reexported, "the node record was not re-exported after the restart");
    let node = wait_node(&c2, "mesh-vm", |_| true).await.context("node record")?;
    assert_eq!((node.wireguard_pub_key.as_str(), node.ipv4_alloc_cidr), (KEY, Some("10.192.3.0/31".parse()?)));
    let entry = wait_ipcache(&c2, "10.192.3.0", resp.identity).await?;
    assert_eq!(entry["HostIP"], json!("192.0.2.30"));
    // The new process has synced (its canary is written) and still did not delete the host's keys.
    let synced = wait_until(WAIT, || {
        let mut c = c2.clone();
        async move { get(&mut c, "cilium/synced/east/cilium/state/nodes/v1").await.is_some() }
    })
    .await;
    assert!(synced, "the restarted apiserver never wrote its nodes canary");
    let ip_lease = lease(&c2, &ipcache_key("10.192.3.0")).await;
    assert!(ip_lease.is_some_and(|l| l != old_lease), "mesh entry not under the new process's lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = deletes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for key in [node_key("mesh-vm"), ipcache_key("10.192.3.0"), ipcache_key("192.0.2.30")] {
        assert!(!deleted.contains(&key), "{key} was deleted across the restart: {deleted:?}");
    }
    s.still_running()
}

/// A cluster Node that appears after a keyed host of its name joined wins the name: the store's node record
/// becomes the Node's, the host leaves the mesh datapath (mesh address withdrawn, status without mesh address and
/// key, Ready=False NodeNameTaken) but keeps its identity and address, and deleting the host's object afterwards
/// leaves the Node's record alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_takes_a_meshed_hosts_name_evicts_the_host() -> Result<()> {
    let mut s = Setup::start().await?;
    s.create_workload_with("vm-late", json!({"app": "db"}), Some("10.192.6.0/30")).await?;
    let resp = s.register_keyed("vm-late", "192.0.2.30", KEY).await?.context("keyed registration")?;
    let c = s.etcd.client().await;
    let host_ip: std::net::IpAddr = "192.0.2.30".parse()?;
    let hosts = wait_node(&c, "vm-late", |n| n.internal_ips().any(|ip| ip == host_ip)).await;
    hosts.context("no node record for the keyed host")?;
    wait_ipcache(&c, "10.192.6.1", resp.identity).await?;

    // A Node of the same name joins the cluster.
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "vm-late"},
        "spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.50"}]}
    }))?;
    Api::<k8s_openapi::api::core::v1::Node>::all(s.client.clone()).create(&PostParams::default(), &node).await?;
    let node_ip: std::net::IpAddr = "172.18.0.50".parse()?;
    let nodes = wait_node(&c, "vm-late", |n| n.internal_ips().any(|ip| ip == node_ip)).await;
    let Some(record) = nodes else {
        bail!("the Node never got its record; still {:?}", get(&mut c.clone(), &node_key("vm-late")).await);
    };
    assert!(record.wireguard_pub_key != KEY, "the record still carries the host's key: {record:?}");

    // The host is out of the mesh datapath and says why; its identity and underlay address stay.
    let evicted = wait_until(WAIT, || async {
        s.status("vm-late").await.is_ok_and(|st| ready_condition(&st)["reason"] == json!("NodeNameTaken"))
    })
    .await;
    let status = s.status("vm-late").await?;
    assert!(evicted, "no NodeNameTaken in the status: {status}");
    assert_eq!(ready_condition(&status)["status"], json!("False"), "{status}");
    assert!(status["meshIPv4"].is_null() && status["wireguardPublicKey"].is_null(), "{status}");
    assert!(wait_gone(&c, &ipcache_key("10.192.6.1")).await, "the mesh address outlived the eviction");
    wait_ipcache(&c, "192.0.2.30", resp.identity).await?;
    // Registering with a key again is refused: the name is the Node's.
    let again = s.register_keyed("vm-late", "192.0.2.30", KEY).await?;
    assert_eq!(again.err().map(|st| st.code()), Some(Code::AlreadyExists));

    // Deleting the host's object withdraws what it still had, and leaves the Node's record alone.
    s.delete_workload("vm-late").await?;
    assert!(wait_gone(&c, &ipcache_key("192.0.2.30")).await, "the host's address outlived its object");
    let still = wait_node(&c, "vm-late", |n| n.internal_ips().any(|ip| ip == node_ip)).await;
    assert!(still.is_some(), "the Node's record went with the host's object");
    s.still_running()
}

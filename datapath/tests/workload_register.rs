//! `causeway-node-agent register` (the real binary) against an in-test causeway.v1.Workloads server over real mTLS
//! (certificates from causeway-pki, the server's like the clustermesh-apiserver's: DNS names only, dialed by IP):
//!
//! - the binary starts before the server listens and the server then answers UNAVAILABLE twice: it retries through
//!   both, then writes the EnvironmentFile with the response's values, and the key it sent is the public half of
//!   the state directory's `wireguard.key` (the file the agent uses; a second run reuses it);
//! - NOT_FOUND ends it at once (one call) with the server's message and no file;
//! - a server certificate that does not carry the expected name is never accepted, and the command ends at once
//!   (a 10-minute retry budget) saying which name it wanted and what to do; so does a server certificate from
//!   another CA, and a client certificate the server does not trust.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_api::v1::workloads_server::{Workloads, WorkloadsServer};
use causeway_api::v1::{RegisterRequest, RegisterResponse};
use causeway_datapath::wireguard::keyfile;
use causeway_datapath::workload::envfile;
use causeway_pki::{users, CertificateAuthority, IssuedCert, ServerNames};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Answers from a script: `unavailable` UNAVAILABLEs first, then `last` forever. Records every request.
struct Scripted {
    unavailable: usize,
    last: Result<RegisterResponse, (tonic::Code, String)>,
    seen: Arc<Mutex<Vec<RegisterRequest>>>,
}

#[tonic::async_trait]
impl Workloads for Scripted {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        // mTLS really happened: the client presented a certificate.
        let client_certs = req.peer_certs().map(|c| c.len()).unwrap_or(0);
        let n = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.push(req.into_inner());
            seen.len()
        };
        if client_certs == 0 {
            return Err(Status::unauthenticated("no client certificate"));
        }
        if n <= self.unavailable {
            return Err(Status::unavailable(format!("allocator not ready (call {n})")));
        }
        match &self.last {
            Ok(r) => Ok(Response::new(r.clone())),
            Err((code, msg)) => Err(Status::new(*code, msg.clone())),
        }
    }
}

fn response() -> RegisterResponse {
    RegisterResponse {
        cluster_name: "east".into(),
        cluster_id: 7,
        identity: 71234,
        identity_labels: "k8s:app=vm;".into(),
        ipv4_alloc_cidr: "10.192.3.0/30".into(),
        ipv6_alloc_cidr: String::new(),
        mesh_ipv4: "10.192.3.1".into(),
        cluster_dns: "10.97.0.10".into(),
        cluster_domain: "cluster.local".into(),
        service_cidrs: vec!["10.97.0.0/16".into()],
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    client: PathBuf,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let ca = CertificateAuthority::generate("causeway-east-ca")?;
        let client = dir.path().join("client");
        ca.issue_client(users::EXTERNAL_WORKLOAD)?.write_bundle(&client)?;
        Ok(Fixture { dir, ca, client })
    }

    /// The apiserver's server certificate as `causeway clustermesh enable` names it: DNS names, no IP.
    fn server_cert(&self, dns: &[&str]) -> Result<IssuedCert> {
        let names = ServerNames { dns: dns.iter().map(|s| s.to_string()).collect(), ips: Vec::new() };
        Ok(self.ca.issue_server("clustermesh-apiserver", &names)?)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("workload.env")
    }

    fn register(&self, addr: SocketAddr, timeout: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway-node-agent"));
        let p = |f: &str| self.client.join(f).display().to_string();
        cmd.args(["register", "--name", "vm-1", "--apiserver", &format!("https://{addr}")])
            .args(["--ca", &p("ca.crt"), "--cert", &p("tls.crt"), "--key", &p("tls.key")])
            .args(["--node-ip", "192.0.2.50", "--state-dir", &self.state_dir().display().to_string()])
            .args(["--out", &self.out().display().to_string(), "--timeout", timeout])
            .env_remove("CAUSEWAY_APISERVER_SERVER_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Serves `svc` with mTLS on `addr` (client certificates from the fixture's CA required) until the runtime ends.
async fn serve(addr: SocketAddr, server: &IssuedCert, svc: Scripted) -> Result<()> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
        .client_ca_root(Certificate::from_pem(&server.ca_pem))
        .client_auth_optional(false);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let router = Server::builder().tls_config(tls)?.add_service(WorkloadsServer::new(svc));
    tokio::spawn(async move {
        let _ = router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await;
    });
    Ok(())
}

/// Waits for the child (bounded, so a binary that retried forever fails the test instead of hanging it).
async fn finish(child: std::process::Child, within: Duration) -> Result<Output> {
    let pid = child.id();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(within, waiter).await {
        Ok(out) => Ok(out??),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            anyhow::bail!("register still running after {within:?}")
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn key_file(state: &Path) -> Result<String> {
    Ok(keyfile::load_or_create(&state.join(keyfile::KEY_FILE))?.public_key().to_base64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_retries_until_the_server_answers_then_writes_the_env_file() -> Result<()> {
    let f = Fixture::new()?;
    let addr = free_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Started before anything listens: the first attempts are connection failures.
    let child = f.register(addr, "60s").spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(!f.out().exists(), "no file before a registration");
    let server = f.server_cert(&["clustermesh-apiserver", "clustermesh-apiserver.kube-system.svc"])?;
    serve(addr, &server, Scripted { unavailable: 2, last: Ok(response()), seen: seen.clone() }).await?;
    let out = finish(child, Duration::from_secs(90)).await?;
    let stderr = text(&out.stderr);
    ensure!(out.status.success(), "register failed: {stderr}");

    let requests = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(requests.len(), 3, "two UNAVAILABLE answers retried, then the success");
    ensure!(stderr.contains("allocator not ready"), "the retried refusals are logged: {stderr}");
    ensure!(
        stderr.contains("connecting") || stderr.contains("onnect"),
        "connection failures before the server was up are logged and retried: {stderr}"
    );
    let req = &requests[2];
    assert_eq!(req.name, "vm-1");
    assert_eq!(req.ipv4, "192.0.2.50");
    let key = key_file(&f.state_dir())?;
    assert_eq!(req.wireguard_pub_key, key, "the key sent is the state dir's key (the agent's)");
    assert!(requests.iter().all(|r| r.wireguard_pub_key == key), "the same key on every attempt");

    let vars = envfile::parse(&std::fs::read_to_string(f.out()).context("the env file")?);
    let want = [
        ("CAUSEWAY_WORKLOAD_IDENTITY", "71234"),
        ("CAUSEWAY_MESH_IPV4", "10.192.3.1"),
        ("CAUSEWAY_SERVICE_CIDRS", "10.97.0.0/16"),
        ("CAUSEWAY_CLUSTER_DNS", "10.97.0.10"),
        ("CAUSEWAY_CLUSTER_DOMAIN", "cluster.local"),
        ("CAUSEWAY_HOME_CLUSTER", "east"),
        ("CAUSEWAY_CLUSTER_ID", "7"),
    ];
    for (k, v) in want {
        assert_eq!(vars.get(k).map(String::as_str), Some(v), "{k}");
    }
    let stdout = text(&out.stdout);
    ensure!(stdout.contains("identity 71234") && stdout.contains(&key), "summary: {stdout}");

    // Registering again (a reboot) sends the same key: the file is reused, not regenerated.
    let again = finish(f.register(addr, "30s").spawn()?, Duration::from_secs(60)).await?;
    ensure!(again.status.success(), "second run: {}", text(&again.stderr));
    let requests = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(requests.last().map(|r| r.wireguard_pub_key.clone()), Some(key));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_fails_at_once_on_not_found_with_the_servers_message() -> Result<()> {
    let f = Fixture::new()?;
    let addr = free_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = f.server_cert(&["clustermesh-apiserver"])?;
    let message = "no ExternalWorkload named vm-1 in cluster east";
    serve(
        addr,
        &server,
        Scripted { unavailable: 0, last: Err((tonic::Code::NotFound, message.into())), seen: seen.clone() },
    )
    .await?;
    // A 10-minute budget: only giving up at once finishes within the wait below.
    let out = finish(f.register(addr, "10m").spawn()?, Duration::from_secs(60)).await?;
    let stderr = text(&out.stderr);
    ensure!(!out.status.success(), "NOT_FOUND must fail: {stderr}");
    ensure!(stderr.contains(message), "the server's message is shown: {stderr}");
    ensure!(stderr.contains("NotFound"), "and its code: {stderr}");
    assert_eq!(seen.lock().unwrap_or_else(|e| e.into_inner()).len(), 1, "not retried");
    ensure!(!f.out().exists(), "no env file on failure");
    Ok(())
}

/// Runs `register` with a 10-minute retry budget against `server`; only ending at once (a final TLS error) finishes
/// within the wait. Returns stderr; checks that it failed, no request got through and no env file was written.
async fn refused_at_once(f: &Fixture, server: &IssuedCert) -> Result<String> {
    let addr = free_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    serve(addr, server, Scripted { unavailable: 0, last: Ok(response()), seen: seen.clone() }).await?;
    let out = finish(f.register(addr, "10m").spawn()?, Duration::from_secs(60)).await?;
    let stderr = text(&out.stderr);
    ensure!(!out.status.success(), "must not register: {stderr}");
    ensure!(stderr.contains("TLS with the apiserver"), "the TLS failure is named: {stderr}");
    assert!(seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(), "no request reached the service");
    ensure!(!f.out().exists(), "no env file");
    ensure!(!stderr.contains("retrying"), "a certificate problem is not retried: {stderr}");
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_without_the_apiserver_name_is_refused_at_once() -> Result<()> {
    let f = Fixture::new()?;
    // Signed by the right CA, but for another name: the client must not talk to it.
    let stderr = refused_at_once(&f, &f.server_cert(&["etcd.example"])?).await?;
    ensure!(stderr.contains("\"clustermesh-apiserver\"") && stderr.contains("--server-name"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_at_once() -> Result<()> {
    let f = Fixture::new()?;
    let other = CertificateAuthority::generate("causeway-west-ca")?;
    let names = ServerNames { dns: vec!["clustermesh-apiserver".into()], ips: Vec::new() };
    let stderr = refused_at_once(&f, &other.issue_server("clustermesh-apiserver", &names)?).await?;
    ensure!(stderr.contains("not signed by the CA in --ca"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_the_server_does_not_trust_is_refused_at_once() -> Result<()> {
    let f = Fixture::new()?;
    // The host's certificate is from the fixture's CA; this server trusts only another CA's clients.
    let other = CertificateAuthority::generate("causeway-west-ca")?;
    let mut server = f.server_cert(&["clustermesh-apiserver"])?;
    server.ca_pem = other.issue_client(users::EXTERNAL_WORKLOAD)?.ca_pem;
    let stderr = refused_at_once(&f, &server).await?;
    ensure!(stderr.contains("refused this host's client certificate"), "{stderr}");
    Ok(())
}

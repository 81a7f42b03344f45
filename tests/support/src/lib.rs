//! TEST SUPPORT: fixtures shared by integration tests and benchmarks. Never a runtime
//! dependency.
//!
//! [`Etcd`] runs a real single-member etcd (`/usr/bin/etcd`, Debian `etcd-server`) on free
//! loopback ports with a temporary data directory, optionally with mTLS
//! (`--client-cert-auth`, certificates from `causeway-pki`). It can be SIGKILLed,
//! restarted on the same data (or empty), and compacted, which is what the
//! disconnect/compaction tests of the kvstore and identity-sync need.
//!
//! ```no_run
//! # async fn demo() {
//! use causeway_testsupport::Etcd;
//! let etcd = Etcd::start().await;
//! let mut client = etcd.client().await;
//! client.put("k", "v", None).await.unwrap();
//! # }
//! ```
//!
//! If the etcd binary is missing the fixture panics (tests must fail, not skip) and
//! says to run `scripts/install-deps.sh`.
//!
//! [`netns`] builds network-namespace topologies (netns, veth, processes and threads inside them) for the datapath
//! tests, and gates them on root with [`netns::privileged`].

pub mod netns;

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causeway_pki::{CertificateAuthority, IssuedCert, Pki};
use etcd_client::{Certificate, Client, CompactionOptions, ConnectOptions, Identity, TlsOptions};

/// Where the etcd binary is looked for when `CAUSEWAY_ETCD_BIN` is not set.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// How long [`Etcd::start`] waits for etcd to answer before it panics.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The TLS material of a TLS etcd (server side), and the CA to mint clients with.
struct TlsState {
    ca_cert_pem: String,
    ca_key_pem: String,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca_file: PathBuf,
    root: IssuedCert,
}

/// A real etcd process for tests. Killed when dropped.
pub struct Etcd {
    bin: PathBuf,
    child: Option<Child>,
    // Holds the data dir, the logs and the TLS files; removed on drop.
    base: tempfile::TempDir,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsState>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoint", &self.endpoint())
            .field("data_dir", &self.data_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Etcd {
    /// Starts a plaintext etcd on a free loopback port and waits until it answers.
    ///
    /// Panics if the binary is missing or etcd does not come up within
    /// [`START_DEADLINE`] (the panic message includes the tail of etcd's log).
    pub async fn start() -> Etcd {
        Self::start_inner(None).await
    }

    /// Starts an etcd that requires client certificates signed by `pki`'s CA
    /// (`--client-cert-auth`), serving `pki`'s server certificate. The server certificate
    /// must be valid for `127.0.0.1` (see [`Pki::loopback`]).
    ///
    /// The fixture keeps a copy of the CA so that [`Etcd::client_tls_for`] can mint a
    /// certificate for any user.
    pub async fn start_tls(pki: &Pki) -> Etcd {
        let ca = pki.ca();
        let root = pki.client(causeway_pki::users::ROOT).expect("issue the root client certificate");
        let tls = TlsState {
            ca_cert_pem: ca.cert_pem().to_owned(),
            ca_key_pem: ca.key_pem(),
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            ca_file: PathBuf::new(),
            root,
        };
        Self::start_inner(Some((tls, pki.server().clone()))).await
    }

    async fn start_inner(tls: Option<(TlsState, IssuedCert)>) -> Etcd {
        let bin = etcd_binary();
        // CAUSEWAY_ETCD_TMPDIR puts the data dir elsewhere, e.g. on tmpfs (/dev/shm) so that benchmarks measure
        // etcd and Causeway rather than the disk's fsync latency.
        let mut builder = tempfile::Builder::new();
        builder.prefix("causeway-etcd-");
        let base = match std::env::var_os("CAUSEWAY_ETCD_TMPDIR") {
            Some(dir) => builder.tempdir_in(dir),
            None => builder.tempdir(),
        }
        .expect("create a temp dir for etcd");
        let tls = tls.map(|(mut state, server)| {
            let paths = server.write_bundle(&base.path().join("tls")).expect("write etcd server TLS files");
            state.server_cert = paths.cert;
            state.server_key = paths.key;
            state.ca_file = paths.ca;
            state
        });
        let data_dir = base.path().join("data");
        let mut etcd = Etcd { bin, child: None, base, data_dir, client_port: 0, peer_port: 0, tls };
        // Free ports are found by binding port 0; another process may grab one before
        // etcd binds it, so a bind failure is retried with new ports.
        let mut last_log = String::new();
        for _attempt in 0..5 {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            match etcd.spawn_and_wait().await {
                Ok(()) => return etcd,
                Err(StartFailure::AddressInUse(log)) => {
                    last_log = log;
                    let _ = fs::remove_dir_all(&etcd.data_dir);
                }
                Err(StartFailure::Other(msg)) => panic!("{msg}"),
            }
        }
        panic!("etcd could not bind free loopback ports after 5 attempts; last log:\n{last_log}");
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (or `https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// [`Etcd::endpoint`] as a one-element list, the shape clients take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// Whether this etcd requires client certificates.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The data directory (kept across [`Etcd::restart`]).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// etcd's combined stdout/stderr of all runs so far, for debugging failures.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id, if etcd is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CA certificate (PEM) of a TLS etcd.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_cert_pem.as_str())
    }

    /// A client certificate for etcd user `user`, signed by this etcd's CA. With
    /// `--client-cert-auth`, etcd takes the user from the CN.
    ///
    /// Panics if this etcd was not started with [`Etcd::start_tls`].
    pub fn client_tls_for(&self, user: &str) -> IssuedCert {
        let tls = self.tls.as_ref().expect("client_tls_for needs an etcd started with Etcd::start_tls");
        if user == causeway_pki::users::ROOT {
            return tls.root.clone();
        }
        CertificateAuthority::from_pem(&tls.ca_cert_pem, &tls.ca_key_pem)
            .and_then(|ca| ca.issue_client(user))
            .expect("issue a client certificate")
    }

    /// etcd-client connect options for `user` (TLS etcd) or plaintext defaults, with a
    /// short connect timeout so a dead etcd fails fast.
    pub fn connect_options_for(&self, user: &str) -> ConnectOptions {
        let opts =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10));
        match &self.tls {
            None => opts,
            Some(_) => opts.with_tls(tls_options(&self.client_tls_for(user))),
        }
    }

    /// A raw etcd-client connected as `root` (TLS) or anonymously (plaintext).
    pub async fn client(&self) -> Client {
        self.client_as(causeway_pki::users::ROOT).await
    }

    /// A raw etcd-client connected as `user` (the CN of its certificate, TLS only).
    pub async fn client_as(&self, user: &str) -> Client {
        Client::connect(self.endpoints(), Some(self.connect_options_for(user))).await.expect("build an etcd client")
    }

    /// SIGKILLs etcd (no graceful shutdown) and reaps it. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills etcd (if running) and starts it again on the same ports and data dir, so
    /// keys, revisions and leases survive. Waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait().await.unwrap_or_else(|e| panic!("etcd restart failed: {}", e.message()));
    }

    /// Kills etcd (if running), wipes its data dir and starts it empty on the same ports:
    /// a new cluster with revision 1, no keys and no leases.
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.data_dir);
        self.spawn_and_wait().await.unwrap_or_else(|e| panic!("etcd restart (empty) failed: {}", e.message()));
    }

    /// Compacts the key-value history up to the current revision (physically) and returns
    /// that revision. Watchers that try to resume from an older revision are then
    /// cancelled with `compact_revision` set.
    pub async fn compact(&self) -> i64 {
        let mut client = self.client().await;
        let resp = client.get("\0", None).await.expect("read the current revision");
        let rev = resp.header().map(|h| h.revision()).expect("etcd response has a header");
        client.compact(rev, Some(CompactionOptions::new().with_physical())).await.expect("compact");
        rev
    }

    /// The current revision of the store.
    pub async fn revision(&self) -> i64 {
        let mut client = self.client().await;
        let resp = client.get("\0", None).await.expect("read the current revision");
        resp.header().map(|h| h.revision()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.base.path().join("etcd.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), StartFailure> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| StartFailure::Other(format!("open etcd log file: {e}")))?;
        let log_err = log.try_clone().map_err(|e| StartFailure::Other(format!("clone etcd log file: {e}")))?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client_url = self.endpoint();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            // Fast elections keep start/restart quick; the minimum lease TTL stays ~1s.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_err));
        let log_len_before = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let child = cmd.spawn().map_err(|e| {
            StartFailure::Other(format!("cannot run {}: {e}; run scripts/install-deps.sh", self.bin.display()))
        })?;
        self.child = Some(child);

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = self.log();
                    let this_run = log.get(log_len_before as usize..).unwrap_or(&log);
                    if this_run.contains("address already in use") {
                        return Err(StartFailure::AddressInUse(this_run.to_owned()));
                    }
                    return Err(StartFailure::Other(format!(
                        "etcd exited during start-up ({status}); log:\n{}",
                        tail(this_run)
                    )));
                }
            }
            if self.ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(StartFailure::Other(format!(
                    "etcd at {} did not answer within {START_DEADLINE:?}; log:\n{}",
                    self.endpoint(),
                    tail(&self.log())
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self) -> bool {
        let opts = self.connect_options_for(causeway_pki::users::ROOT).with_timeout(Duration::from_secs(1));
        let attempt = async {
            let mut client = Client::connect(self.endpoints(), Some(opts)).await.ok()?;
            // A linearizable read only succeeds once a leader is elected.
            client.get("\0", None).await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Some(_)))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// etcd-client TLS options from an issued client certificate. The server name is left to
/// the endpoint's host (`127.0.0.1`), which the loopback server certificate covers.
pub fn tls_options(cert: &IssuedCert) -> TlsOptions {
    TlsOptions::new()
        .ca_certificate(Certificate::from_pem(&cert.ca_pem))
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
}

enum StartFailure {
    AddressInUse(String),
    Other(String),
}

impl StartFailure {
    fn message(&self) -> String {
        match self {
            StartFailure::AddressInUse(log) => format!("address already in use:\n{}", tail(log)),
            StartFailure::Other(msg) => msg.clone(),
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind a free loopback port")
}

fn etcd_binary() -> PathBuf {
    let bin =
        std::env::var_os("CAUSEWAY_ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN));
    if !bin.is_file() {
        panic!(
            "etcd binary not found at {} (set CAUSEWAY_ETCD_BIN to override). \
             Integration tests need a real etcd: run scripts/install-deps.sh \
             (installs Debian's etcd-server).",
            bin.display()
        );
    }
    bin
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes; returns whether
/// it became true. Use it instead of sleeps when waiting for something to happen.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback TCP proxy in front of a server, which a test can cut and restore. Put it
/// between a client and [`Etcd`] to simulate a network partition while etcd keeps
/// running (and can be written to and compacted meanwhile).
///
/// While blocked, existing connections are closed and new ones are accepted and closed
/// at once, so the client sees resets and retries.
pub struct TcpProxy {
    port: u16,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy").field("port", &self.port).finish()
    }
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target_port`.
    pub async fn start(target_port: u16) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let (b, c) = (blocked.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if b.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                };
                c.lock().unwrap_or_else(|e| e.into_inner()).spawn(task);
            }
        });
        TcpProxy { port, blocked, conns, accept }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>` (or `https://` when `tls`).
    pub fn endpoint(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones until [`TcpProxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }

    /// Lets connections through again.
    pub fn unblock(&self) {
        self.blocked.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

impl Etcd {
    /// The client port (for a [`TcpProxy`] in front of it).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Number of open watch streams, from etcd's `/metrics`
    /// (`etcd_debugging_mvcc_watch_stream_total`); plaintext etcd only. Lets tests check
    /// that a dropped watcher really closed its stream.
    pub async fn watch_streams(&self) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        assert!(!self.is_tls(), "watch_streams reads /metrics over plaintext");
        let mut s =
            tokio::net::TcpStream::connect(("127.0.0.1", self.client_port)).await.expect("connect to etcd metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.expect("request metrics");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watch_stream_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .expect("etcd_debugging_mvcc_watch_stream_total in /metrics")
    }
}

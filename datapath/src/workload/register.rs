//! `causeway-node-agent register`: the host calls causeway.v1.Workloads/Register on its cluster's
//! clustermesh-apiserver over mTLS (the `externalworkload` client certificate) and sends its WireGuard public key.
//!
//! The server presents the clustermesh-apiserver certificate, whose names are the Service's DNS names (the bare
//! `clustermesh-apiserver` among them), never every address a host may dial (a NodePort on any node, a load
//! balancer): so the certificate is verified against a DNS name it carries ([`DEFAULT_SERVER_NAME`], or
//! `--server-name`), the way the kvstore client verifies etcd's copy of that certificate (`TlsConfig::server_name`),
//! whatever address the connection goes to.
//!
//! The apiserver may not be up yet when a host boots: connection failures, calls that fail below gRPC (after a
//! check that it was not the server refusing this host's certificate) and UNAVAILABLE (the apiserver's own
//! "retry": kube API or allocator trouble) are retried with capped exponential backoff until the timeout; any other
//! answer (NOT_FOUND: no ExternalWorkload of that name, PERMISSION_DENIED, INVALID_ARGUMENT,
//! FAILED_PRECONDITION, ALREADY_EXISTS) will not change by retrying and ends the command at once with the server's
//! message. So does a TLS handshake that failed on a certificate no retry can fix (see [`TlsFailure`]): a server
//! certificate from another CA or without the expected name, or the server refusing this host's client
//! certificate. A certificate that is expired or not valid yet is retried (the host's clock may still be syncing).
//! [`Retry`] makes those decisions without I/O.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use causeway_api::v1::workloads_client::WorkloadsClient;
use causeway_api::v1::{RegisterRequest, RegisterResponse};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tracing::{info, warn};

use super::envfile::{InvalidResponse, Registration};
use crate::agent::backoff::Backoff;
use crate::wireguard::PublicKey;

/// The DNS name every clustermesh-apiserver server certificate carries (`causeway clustermesh enable` puts the
/// Service's bare name first among its DNS SANs, whatever the namespace or cluster).
pub const DEFAULT_SERVER_NAME: &str = "clustermesh-apiserver";

/// What to register and where.
#[derive(Clone)]
pub struct RegisterConfig {
    /// The host's name: its ExternalWorkload object's name.
    pub name: String,
    /// `https://HOST:PORT` of the apiserver's workloads service.
    pub apiserver: String,
    /// The DNS name the server certificate is verified against.
    pub server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The host's underlay IPv4 (its WireGuard endpoint).
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub wireguard_pub_key: PublicKey,
    /// Give up retrying after this long.
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Bound of one attempt (connect + call).
    pub attempt_timeout: Duration,
}

impl std::fmt::Debug for RegisterConfig {
    // Never print the key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterConfig")
            .field("name", &self.name)
            .field("apiserver", &self.apiserver)
            .field("server_name", &self.server_name)
            .field("ipv4", &self.ipv4)
            .field("wireguard_pub_key", &self.wireguard_pub_key)
            .finish_non_exhaustive()
    }
}

/// Why registering failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Config(String),
    /// The server answered with a code retrying will not change.
    #[error("the apiserver refused the registration of {name:?} ({code:?}): {message}")]
    Refused { name: String, code: Code, message: String },
    /// The TLS handshake failed in a way retrying cannot fix.
    #[error("TLS with the apiserver at {apiserver} failed: {failure}")]
    Tls { apiserver: String, failure: TlsFailure },
    #[error("no registration within {timeout:?} ({attempts} attempts); last error: {last}")]
    TimedOut { timeout: Duration, attempts: u32, last: String },
    #[error(transparent)]
    Invalid(#[from] InvalidResponse),
}

/// A TLS handshake failure that will not go away by retrying, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    #[error(
        "the server certificate is not signed by the CA in --ca ({0}): the CA file is from another cluster, or the \
         cluster's CA was replaced; fetch the join bundle again (`causeway external-workload install`)"
    )]
    UnknownIssuer(String),
    #[error(
        "the server certificate does not carry the name {server_name:?} ({detail}): pass --server-name with a DNS \
         name it carries, or re-issue it with `causeway clustermesh rotate-certs`"
    )]
    WrongName { server_name: String, detail: String },
    #[error(
        "the server refused this host's client certificate ({0}): it must be the externalworkload certificate \
         issued by this cluster's CA (`causeway external-workload install` writes it)"
    )]
    ClientCertRefused(String),
    #[error("the server certificate is unusable ({0})")]
    BadCertificate(String),
}

impl TlsFailure {
    /// Classifies a rustls error: `Some` when retrying cannot help.
    pub fn classify(e: &rustls::Error, server_name: &str) -> Option<TlsFailure> {
        use rustls::{AlertDescription as A, CertificateError as C};
        let detail = e.to_string();
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => Some(TlsFailure::UnknownIssuer(detail)),
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    Some(TlsFailure::WrongName { server_name: server_name.to_string(), detail })
                }
                // Time: the host's clock may not be set yet at boot. Anything else about the certificate itself
                // (encoding, signature, purpose, algorithm) will not change.
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => None,
                _ => Some(TlsFailure::BadCertificate(detail)),
            },
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied
                | A::CertificateRequired,
            ) => Some(TlsFailure::ClientCertRefused(detail)),
            _ => None,
        }
    }

    /// A fatal alert known only by its name (rustls's `Debug` of [`rustls::AlertDescription`]).
    fn from_alert_name(name: &str) -> Option<TlsFailure> {
        const CLIENT_CERT: &[&str] = &[
            "BadCertificate",
            "UnknownCA",
            "CertificateUnknown",
            "CertificateRevoked",
            "UnsupportedCertificate",
            "AccessDenied",
            "CertificateRequired",
        ];
        CLIENT_CERT
            .contains(&name.trim())
            .then(|| TlsFailure::ClientCertRefused(format!("received fatal alert: {}", name.trim())))
    }

    /// The first rustls error in an error's source chain (tokio-rustls hands it over inside an `io::Error`, whose
    /// `source()` skips it, so those are opened too), classified.
    pub fn find(e: &(dyn std::error::Error + 'static), server_name: &str) -> Option<TlsFailure> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(r) = err.downcast_ref::<rustls::Error>() {
                return TlsFailure::classify(r, server_name);
            }
            let inner = err.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
            if let Some(r) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return TlsFailure::classify(r, server_name);
            }
            // An alert read after the handshake (TLS 1.3: the server checks the client certificate after the client
            // finished) reaches tonic as the rustls error's text only.
            if let Some(alert) =
                inner.and_then(|i| i.to_string().strip_prefix("received fatal alert: ").map(str::to_string))
            {
                return TlsFailure::from_alert_name(&alert);
            }
            cur = err.source();
        }
        None
    }
}

/// Codes worth another attempt: the server is not there or said "try again". (An attempt that hangs is cut by the
/// client's own attempt timeout and retried too, like a connection failure.)
pub fn retryable(code: Code) -> bool {
    code == Code::Unavailable
}

/// The retry schedule: capped exponential backoff, never past the overall timeout.
#[derive(Debug, Clone)]
pub struct Retry {
    timeout: Duration,
    backoff: Backoff,
    attempts: u32,
}

impl Retry {
    pub fn new(timeout: Duration, initial: Duration, max: Duration, seed: u64) -> Self {
        Retry { timeout, backoff: Backoff::new(initial, max, seed), attempts: 0 }
    }

    /// After a retryable failure, `elapsed` since the first attempt: how long to wait before the next attempt, or
    /// `None` when the timeout leaves no room for one.
    pub fn after_failure(&mut self, elapsed: Duration) -> Option<Duration> {
        self.attempts += 1;
        let left = self.timeout.checked_sub(elapsed).filter(|d| !d.is_zero())?;
        Some(self.backoff.next_delay().min(left))
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// One attempt's outcome.
enum Attempt {
    Done(RegisterResponse),
    Retry(String),
    Fatal(Code, String),
    Tls(TlsFailure),
    /// The call failed below gRPC: retried, unless [`diagnose_tls`] finds a certificate problem.
    Transport(String),
}

/// "outer: inner: innermost" for an error and its sources (tonic's connect errors hide the cause in the chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

fn endpoint(cfg: &RegisterConfig) -> Result<Endpoint, RegisterError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.ca_pem))
        .identity(Identity::from_pem(&cfg.cert_pem, &cfg.key_pem))
        .domain_name(cfg.server_name.clone());
    let ep = Endpoint::from_shared(cfg.apiserver.clone())
        .map_err(|e| RegisterError::Config(format!("--apiserver {:?}: {}", cfg.apiserver, chain(&e))))?;
    if ep.uri().scheme_str() != Some("https") {
        return Err(RegisterError::Config(format!("--apiserver {:?} must be an https:// URL (mTLS)", cfg.apiserver)));
    }
    ep.tls_config(tls)
        .map(|ep| ep.connect_timeout(cfg.attempt_timeout))
        .map_err(|e| RegisterError::Config(format!("TLS configuration: {}", chain(&e))))
}

async fn attempt(ep: &Endpoint, req: &RegisterRequest, server_name: &str) -> Attempt {
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => {
            return match TlsFailure::find(&e, server_name) {
                Some(f) => Attempt::Tls(f),
                None => Attempt::Retry(format!("connecting: {}", chain(&e))),
            }
        }
    };
    match WorkloadsClient::new(channel).register(req.clone()).await {
        Ok(r) => Attempt::Done(r.into_inner()),
        Err(s) => match std::error::Error::source(&s) {
            // Failed below gRPC (no answer from the service). With TLS 1.3 a refused client certificate ends up
            // here: the server checks it after the client finished its handshake, and its alert is usually lost to
            // the reset the client's request causes. A plain TLS connection that only reads gets the alert.
            Some(src) => match TlsFailure::find(src, server_name) {
                Some(f) => Attempt::Tls(f),
                None => Attempt::Transport(format!("the call failed: {}", chain(&s))),
            },
            None if retryable(s.code()) => Attempt::Retry(format!("{:?}: {}", s.code(), s.message())),
            None => Attempt::Fatal(s.code(), s.message().to_string()),
        },
    }
}

/// A TLS connection to the apiserver with the same credentials that only reads: `Some` when the handshake or the
/// first read fails with a certificate problem no retry can fix (above all the server's alert refusing this host's
/// client certificate); `None` when TLS is fine or the failure says nothing about certificates.
async fn diagnose_tls(ep: &Endpoint, cfg: &RegisterConfig) -> Option<TlsFailure> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let uri = ep.uri();
    let (host, port) = (uri.host()?.trim_matches(['[', ']']).to_string(), uri.port_u16().unwrap_or(443));
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(cfg.ca_pem.as_bytes()) {
        roots.add(ca.ok()?).ok()?;
    }
    let certs = CertificateDer::pem_slice_iter(cfg.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().ok()?;
    let key = PrivateKeyDer::from_pem_slice(cfg.key_pem.as_bytes()).ok()?;
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(cfg.server_name.clone()).ok()?;
    let bound = cfg.attempt_timeout;
    let tcp = tokio::time::timeout(bound, tokio::net::TcpStream::connect((host.as_str(), port))).await.ok()?.ok()?;
    let mut tls = match tokio::time::timeout(bound, connector.connect(name, tcp)).await.ok()? {
        Ok(s) => s,
        Err(e) => return TlsFailure::find(&e, &cfg.server_name),
    };
    let mut buf = [0u8; 256];
    match tokio::time::timeout(bound, tls.read(&mut buf)).await {
        Ok(Err(e)) => TlsFailure::find(&e, &cfg.server_name),
        _ => None,
    }
}

/// Registers, retrying as described in the module docs; returns the raw answer and its validated form.
pub async fn register(cfg: &RegisterConfig) -> Result<(RegisterResponse, Registration), RegisterError> {
    let span = tracing::info_span!("register", workload = %cfg.name, apiserver = %cfg.apiserver);
    let _e = span.enter();
    let ep = endpoint(cfg)?;
    let req = RegisterRequest {
        name: cfg.name.clone(),
        ipv4: cfg.ipv4.to_string(),
        ipv6: cfg.ipv6.map(|ip| ip.to_string()).unwrap_or_default(),
        wireguard_pub_key: cfg.wireguard_pub_key.to_base64(),
    };
    let started = Instant::now();
    let mut retry = Retry::new(cfg.timeout, cfg.backoff_initial, cfg.backoff_max, Backoff::seed_from(&cfg.name));
    loop {
        let outcome = tokio::time::timeout(cfg.attempt_timeout, attempt(&ep, &req, &cfg.server_name))
            .await
            .unwrap_or_else(|_| Attempt::Retry(format!("no answer within {:?}", cfg.attempt_timeout)));
        let why = match outcome {
            Attempt::Done(resp) => {
                let reg = Registration::from_response(&resp)?;
                info!(identity = reg.identity, mesh_ipv4 = %reg.mesh_ipv4, cluster = %reg.cluster_name, "registered");
                return Ok((resp, reg));
            }
            Attempt::Fatal(code, message) => {
                return Err(RegisterError::Refused { name: cfg.name.clone(), code, message });
            }
            Attempt::Tls(failure) => return Err(RegisterError::Tls { apiserver: cfg.apiserver.clone(), failure }),
            Attempt::Transport(why) => match diagnose_tls(&ep, cfg).await {
                Some(failure) => return Err(RegisterError::Tls { apiserver: cfg.apiserver.clone(), failure }),
                None => why,
            },
            Attempt::Retry(why) => why,
        };
        match retry.after_failure(started.elapsed()) {
            Some(wait) => {
                warn!(error = %why, retry_in = ?wait, "registration not accepted yet; retrying");
                tokio::time::sleep(wait).await;
            }
            None => {
                return Err(RegisterError::TimedOut { timeout: cfg.timeout, attempts: retry.attempts(), last: why })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_retried() {
        assert!(retryable(Code::Unavailable));
        for c in [
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::Unauthenticated,
            Code::Internal,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }

    #[test]
    fn retries_back_off_up_to_the_cap_and_stop_at_the_timeout() {
        let mut r = Retry::new(Duration::from_secs(60), Duration::from_millis(200), Duration::from_secs(5), 1);
        let mut elapsed = Duration::ZERO;
        let mut waits = Vec::new();
        while let Some(w) = r.after_failure(elapsed) {
            waits.push(w);
            elapsed += w + Duration::from_millis(50); // the attempt itself
        }
        assert!(waits[0] <= Duration::from_millis(240), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(5)), "capped: {waits:?}");
        assert!(waits.windows(2).take(4).all(|p| p[1] > p[0]), "grows at first: {waits:?}");
        assert!(elapsed >= Duration::from_secs(60), "kept trying until the timeout: {elapsed:?}");
        assert!(elapsed <= Duration::from_secs(61), "never slept past the timeout: {elapsed:?}");
        assert_eq!(r.attempts() as usize, waits.len() + 1);
    }

    #[test]
    fn certificate_problems_no_retry_can_fix_are_final_and_time_problems_are_retried() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let final_ = |e: E| TlsFailure::classify(&e, "clustermesh-apiserver");
        assert!(matches!(final_(E::InvalidCertificate(C::UnknownIssuer)), Some(TlsFailure::UnknownIssuer(_))));
        let wrong = final_(E::InvalidCertificate(C::NotValidForName));
        assert!(
            matches!(&wrong, Some(TlsFailure::WrongName { server_name, .. }) if server_name == "clustermesh-apiserver")
        );
        assert!(wrong.map(|w| w.to_string()).unwrap_or_default().contains("--server-name"));
        assert!(matches!(final_(E::AlertReceived(A::UnknownCA)), Some(TlsFailure::ClientCertRefused(_))));
        assert!(matches!(final_(E::InvalidCertificate(C::BadSignature)), Some(TlsFailure::BadCertificate(_))));
        assert_eq!(final_(E::InvalidCertificate(C::Expired)), None, "the clock may be wrong at boot: retried");
        assert_eq!(final_(E::InvalidCertificate(C::NotValidYet)), None);
        assert_eq!(final_(E::AlertReceived(A::InternalError)), None);
        // Found inside an io::Error, as tokio-rustls reports it.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, E::InvalidCertificate(C::UnknownIssuer));
        assert!(matches!(TlsFailure::find(&io, "x"), Some(TlsFailure::UnknownIssuer(_))));
        let text = std::io::Error::new(std::io::ErrorKind::InvalidData, E::AlertReceived(A::UnknownCA).to_string());
        assert!(matches!(TlsFailure::find(&text, "x"), Some(TlsFailure::ClientCertRefused(_))));
        let other =
            std::io::Error::new(std::io::ErrorKind::InvalidData, E::AlertReceived(A::InternalError).to_string());
        assert_eq!(TlsFailure::find(&other, "x"), None);
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(TlsFailure::find(&plain, "x"), None);
    }

    #[test]
    fn the_last_wait_is_cut_to_the_time_left() {
        let mut r = Retry::new(Duration::from_secs(10), Duration::from_secs(8), Duration::from_secs(8), 1);
        assert_eq!(r.after_failure(Duration::from_secs(9)), Some(Duration::from_secs(1)));
        assert_eq!(r.after_failure(Duration::from_secs(10)), None);
    }
}

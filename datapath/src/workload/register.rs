//! `causeway-node-agent register`: the host calls causeway.v1.Workloads/Register on its cluster's
//! clustermesh-apiserver over mTLS (the `externalworkload` client certificate) and sends its WireGuard public key.
//!
//! The server presents the clustermesh-apiserver certificate, whose names are the Service's DNS names (the bare
//! `clustermesh-apiserver` among them), never every address a host may dial (a NodePort on any node, a load
//! balancer): so the certificate is verified against a DNS name it carries ([`DEFAULT_SERVER_NAME`], or
//! `--server-name`), the way the kvstore client verifies etcd's copy of that certificate (`TlsConfig::server_name`),
//! whatever address the connection goes to.
//!
//! The apiserver may not be up yet when a host boots: connection failures and UNAVAILABLE (the apiserver's own
//! "retry": kube API or allocator trouble) are retried with capped exponential backoff until the timeout; any other
//! answer (NOT_FOUND: no ExternalWorkload of that name, PERMISSION_DENIED, INVALID_ARGUMENT,
//! FAILED_PRECONDITION, ALREADY_EXISTS) will not change by retrying and ends the command at once with the server's
//! message. [`Retry`] makes those decisions without I/O.

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
    #[error("no registration within {timeout:?} ({attempts} attempts); last error: {last}")]
    TimedOut { timeout: Duration, attempts: u32, last: String },
    #[error(transparent)]
    Invalid(#[from] InvalidResponse),
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

async fn attempt(ep: &Endpoint, req: &RegisterRequest) -> Attempt {
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => return Attempt::Retry(format!("connecting: {}", chain(&e))),
    };
    match WorkloadsClient::new(channel).register(req.clone()).await {
        Ok(r) => Attempt::Done(r.into_inner()),
        Err(s) if retryable(s.code()) => Attempt::Retry(format!("{:?}: {}", s.code(), s.message())),
        Err(s) => Attempt::Fatal(s.code(), s.message().to_string()),
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
        let outcome = tokio::time::timeout(cfg.attempt_timeout, attempt(&ep, &req))
            .await
            .unwrap_or_else(|_| Attempt::Retry(format!("no answer within {:?}", cfg.attempt_timeout)));
        match outcome {
            Attempt::Done(resp) => {
                let reg = Registration::from_response(&resp)?;
                info!(identity = reg.identity, mesh_ipv4 = %reg.mesh_ipv4, cluster = %reg.cluster_name, "registered");
                return Ok((resp, reg));
            }
            Attempt::Fatal(code, message) => {
                return Err(RegisterError::Refused { name: cfg.name.clone(), code, message });
            }
            Attempt::Retry(why) => match retry.after_failure(started.elapsed()) {
                Some(wait) => {
                    warn!(error = %why, retry_in = ?wait, "registration not accepted yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(RegisterError::TimedOut { timeout: cfg.timeout, attempts: retry.attempts(), last: why })
                }
            },
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
    fn the_last_wait_is_cut_to_the_time_left() {
        let mut r = Retry::new(Duration::from_secs(10), Duration::from_secs(8), Duration::from_secs(8), 1);
        assert_eq!(r.after_failure(Duration::from_secs(9)), Some(Duration::from_secs(1)));
        assert_eq!(r.after_failure(Duration::from_secs(10)), None);
    }
}

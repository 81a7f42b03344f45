//! `causeway-node-agent check-dns`: does a cluster name resolve on this host the way its resolv.conf says?
//!
//! The join script points the host's resolver at the cluster DNS (through the tunnel) and searches the cluster
//! domain; this check resolves a name with exactly the nameservers, search list and options of a given resolv.conf
//! (hickory-resolver's own parser), not through libc or /etc/hosts, so a pass means the DNS path works. It retries
//! until the timeout (the tunnel may still be coming up), each attempt with a fresh resolver so that no cached
//! negative answer hides a fix.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;
use tracing::{debug, info};

/// What to check.
#[derive(Debug, Clone)]
pub struct DnsCheck {
    /// The resolv.conf text.
    pub resolv_conf: String,
    pub name: String,
    /// An address that must be among the answers.
    pub expect: Option<IpAddr>,
    pub timeout: Duration,
    /// Pause between attempts.
    pub interval: Duration,
}

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("resolv.conf: {0}")]
    Config(String),
    #[error("{name} did not resolve within {timeout:?}: {last}")]
    Unresolved { name: String, timeout: Duration, last: String },
    #[error("{name} resolved to {answers:?}, never to the expected {expect} within {timeout:?}")]
    Unexpected { name: String, expect: IpAddr, answers: Vec<IpAddr>, timeout: Duration },
}

/// The verdict on one attempt's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Resolved, but not to the expected address.
    Unexpected,
    Empty,
}

pub fn verdict(answers: &[IpAddr], expect: Option<IpAddr>) -> Verdict {
    match expect {
        _ if answers.is_empty() => Verdict::Empty,
        Some(ip) if !answers.contains(&ip) => Verdict::Unexpected,
        _ => Verdict::Pass,
    }
}

fn resolver(resolv_conf: &str) -> Result<Resolver<TokioRuntimeProvider>, DnsError> {
    let (config, mut opts) =
        hickory_resolver::system_conf::parse_resolv_conf(resolv_conf).map_err(|e| DnsError::Config(e.to_string()))?;
    // The check is about the DNS path: never answer from /etc/hosts, and ask for both families.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Config(e.to_string()))
}

/// Resolves until the verdict passes or the timeout; returns the passing answers.
pub async fn check(c: &DnsCheck) -> Result<Vec<IpAddr>, DnsError> {
    let span = tracing::info_span!("check_dns", name = %c.name);
    let _e = span.enter();
    resolver(&c.resolv_conf)?; // a broken file fails at once, not after the timeout
    let started = Instant::now();
    loop {
        let left = c.timeout.saturating_sub(started.elapsed());
        let lookup = async {
            let r = resolver(&c.resolv_conf).map_err(|e| e.to_string())?;
            r.lookup_ip(c.name.as_str()).await.map_err(|e| e.to_string())
        };
        let result = match tokio::time::timeout(left.max(Duration::from_millis(100)), lookup).await {
            Ok(Ok(l)) => Ok(l.iter().collect::<Vec<IpAddr>>()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {left:?}")),
        };
        let (last_answers, last_error) = match result {
            Ok(answers) => match verdict(&answers, c.expect) {
                Verdict::Pass => {
                    info!(?answers, "resolved");
                    return Ok(answers);
                }
                v => {
                    debug!(?answers, ?v, "not the expected answer yet");
                    (answers, format!("{v:?}"))
                }
            },
            Err(e) => {
                debug!(error = %e, "lookup failed");
                (Vec::new(), e)
            }
        };
        if started.elapsed() + c.interval >= c.timeout {
            return Err(match (c.expect, last_answers.is_empty()) {
                (Some(expect), false) => {
                    DnsError::Unexpected { name: c.name.clone(), expect, answers: last_answers, timeout: c.timeout }
                }
                _ => DnsError::Unresolved { name: c.name.clone(), timeout: c.timeout, last: last_error },
            });
        }
        tokio::time::sleep(c.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn verdicts() {
        let a = ips(&["10.96.0.1", "fd00::1"]);
        assert_eq!(verdict(&a, None), Verdict::Pass);
        assert_eq!(verdict(&a, Some("fd00::1".parse().unwrap())), Verdict::Pass);
        assert_eq!(verdict(&a, Some("10.96.0.2".parse().unwrap())), Verdict::Unexpected);
        assert_eq!(verdict(&[], None), Verdict::Empty);
        assert_eq!(verdict(&[], Some("10.96.0.2".parse().unwrap())), Verdict::Empty);
    }

    #[tokio::test]
    async fn a_resolv_conf_without_nameservers_is_refused_up_front() {
        let err = resolver("search cluster.local\n").expect_err("no nameserver");
        assert!(matches!(err, DnsError::Config(_)), "{err}");
        assert!(resolver("nameserver 10.96.0.10\nsearch default.svc.cluster.local cluster.local\noptions ndots:5\n")
            .is_ok());
    }
}

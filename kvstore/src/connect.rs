//! Building an etcd client from endpoints and optional mTLS material.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::KvError;

/// mTLS material for etcd, as PEM. The server certificate is always verified against
/// `ca_pem`; there is deliberately no switch to turn verification off.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA that signed etcd's server certificate.
    pub ca_pem: String,
    /// Client certificate; with `--client-cert-auth` its CN is the etcd user.
    pub cert_pem: Option<String>,
    /// Client private key.
    pub key_pem: Option<String>,
    /// Name to verify the server certificate against, when it differs from the endpoint's
    /// host (e.g. connecting by IP to a certificate issued for a DNS name).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("client_cert", &self.cert_pem.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// CA, client certificate and key from PEM strings.
    pub fn from_pem(ca_pem: impl Into<String>, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            cert_pem: Some(cert_pem.into()),
            key_pem: Some(key_pem.into()),
            server_name: None,
        }
    }

    /// Reads `ca.crt`, `tls.crt` and `tls.key` (the layout of a mounted Kubernetes TLS
    /// Secret) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, KvError> {
        Self::from_files(&dir.join("ca.crt"), &dir.join("tls.crt"), &dir.join("tls.key"))
    }

    /// Reads the CA, client certificate and key from files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, KvError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| KvError::ReadTls { path: path.to_owned(), source })
        };
        Ok(Self::from_pem(read(ca)?, read(cert)?, read(key)?))
    }

    /// Sets the name the server certificate is verified against.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    fn to_options(&self) -> Result<TlsOptions, KvError> {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match (&self.cert_pem, &self.key_pem) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
            (None, None) => {}
            _ => return Err(KvError::Config("a client certificate needs its key and vice versa".into())),
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// How to reach one etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `https://clustermesh-apiserver.kube-system.svc:2379`.
    pub endpoints: Vec<String>,
    /// mTLS material; `None` for plaintext.
    pub tls: Option<TlsConfig>,
    /// How long to wait for the first answer in [`connect`] (also the TCP connect timeout).
    pub connect_timeout: Duration,
    /// Timeout of each unary request (not of watches and keepalive streams).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Plaintext config with default timeouts (5 s connect, 15 s per request).
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
        }
    }

    /// Adds mTLS.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    fn options(&self) -> Result<ConnectOptions, KvError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            // Detect a dead peer on idle connections (e.g. a SIGKILLed etcd behind a LB).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.to_options()?);
        }
        Ok(opts)
    }
}

/// Connects to etcd and checks that it answers (the client itself connects lazily, so a
/// wrong address or certificate would otherwise only show on the first request).
#[tracing::instrument(skip_all, fields(endpoints = %config.endpoints_display()))]
pub async fn connect(config: &EtcdConfig) -> Result<Client, KvError> {
    if config.endpoints.is_empty() {
        return Err(KvError::Config("no etcd endpoints given".into()));
    }
    let endpoints = config.endpoints_display();
    let connect_err =
        |source: etcd_client::Error| KvError::Connect { endpoints: endpoints.clone(), hint: hint_for(&source), source };
    let mut client = Client::connect(&config.endpoints, Some(config.options()?)).await.map_err(connect_err)?;
    // Status needs no key permission, so it works for read-only users too.
    match tokio::time::timeout(config.connect_timeout, client.status()).await {
        Ok(Ok(status)) => {
            tracing::debug!(version = status.version(), "connected to etcd");
            Ok(client)
        }
        Ok(Err(e)) => Err(connect_err(e)),
        Err(_) => Err(KvError::ConnectTimeout { endpoints, timeout: config.connect_timeout }),
    }
}

fn hint_for(e: &etcd_client::Error) -> &'static str {
    let msg = format!("{e:?}").to_ascii_lowercase();
    if msg.contains("certificate") || msg.contains("tls") || msg.contains("handshake") {
        "TLS failed: check that the CA matches etcd's server certificate, that the client \
         certificate is signed by etcd's trusted CA, and the server name"
    } else if msg.contains("permission denied") || msg.contains("authentication") {
        "etcd refused the user: check the client certificate's CN and the etcd users"
    } else if msg.contains("invalid") {
        "check the endpoint URLs (scheme://host:port)"
    } else {
        "check the endpoint address and that etcd is running and reachable"
    }
}

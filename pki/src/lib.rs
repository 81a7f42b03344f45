//! Certificates for the mesh's etcd: a CA, server certificates and per-user client
//! certificates.
//!
//! Where it sits in the flow: every cluster's clustermesh-apiserver runs an etcd that
//! peers read over mTLS. etcd runs with `--client-cert-auth`, so the **common name of a
//! client certificate is the etcd user** (see [`users`]): `root` and `admin-<cluster>` for the
//! local apiserver, `remote-<peer>` for each peer's identity-sync, `externalworkload` for
//! VMs. `causeway clustermesh enable` uses this crate to mint that material, and the
//! integration tests use it to start etcd with TLS.
//!
//! Everything is returned as PEM strings; [`IssuedCert::write_bundle`] writes the files
//! under the names a Kubernetes TLS Secret uses (`ca.crt`, `tls.crt`, `tls.key`).
//!
//! ```
//! use causeway_pki::{CertificateAuthority, ServerNames, users};
//!
//! let ca = CertificateAuthority::generate("causeway-east-ca")?;
//! let server = ca.issue_server("clustermesh-apiserver", &ServerNames::loopback())?;
//! let client = ca.issue_client(&users::remote("west"))?;
//! assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! assert_eq!(client.ca_pem, ca.cert_pem());
//! # Ok::<(), causeway_pki::PkiError>(())
//! ```

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// File name of the CA certificate in a bundle (as in a Kubernetes TLS Secret).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the leaf certificate in a bundle.
pub const CERT_FILE: &str = "tls.crt";
/// File name of the leaf private key in a bundle.
pub const KEY_FILE: &str = "tls.key";

/// Default lifetime of a CA certificate (10 years).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a server or client certificate (3 years).
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(3 * 365 * 24 * 3600);

/// Certificates are valid from this long before they are issued, so that small clock
/// skew between the issuer and the verifier does not reject a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The etcd user names Causeway uses. With `--client-cert-auth`, etcd takes the user
/// from the client certificate's CN, so these are also the CNs to issue.
pub mod users {
    /// etcd's superuser (the `root` role).
    pub const ROOT: &str = "root";
    /// The user a joined VM or bare-metal host connects as.
    pub const EXTERNAL_WORKLOAD: &str = "externalworkload";

    /// Full access for the local clustermesh-apiserver of `cluster`.
    pub fn admin(cluster: &str) -> String {
        format!("admin-{cluster}")
    }

    /// Read-only access for the identity-sync of peer cluster `peer`.
    pub fn remote(peer: &str) -> String {
        format!("remote-{peer}")
    }
}

/// Errors from generating, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("failed to generate the {what} certificate for {name:?}")]
    Generate {
        /// Which certificate: "CA", "server" or "client".
        what: &'static str,
        /// Its common name.
        name: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A common name or DNS name was not acceptable.
    #[error("invalid name {name:?} for a {what} certificate: {reason}")]
    InvalidName {
        /// Which certificate.
        what: &'static str,
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The PEM given to [`CertificateAuthority::from_pem`] could not be used.
    #[error("cannot load the CA from PEM ({what}); pass the CA certificate and its private key in PEM form")]
    LoadCa {
        /// Which part failed: "private key" or "certificate".
        what: &'static str,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// Writing a bundle file failed.
    #[error("cannot write {path}: check that the directory exists and is writable")]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// The names a server certificate is valid for (its subject alternative names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS names, e.g. `clustermesh-apiserver.kube-system.svc`.
    pub dns: Vec<String>,
    /// IP addresses, e.g. the Service's ClusterIP or `127.0.0.1`.
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// `localhost`, `127.0.0.1` and `::1`: what a local etcd (tests, sidecar) needs.
    pub fn loopback() -> Self {
        Self {
            dns: vec!["localhost".to_owned()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        }
    }

    /// Adds a DNS name.
    pub fn with_dns(mut self, name: impl Into<String>) -> Self {
        self.dns.push(name.into());
        self
    }

    /// Adds an IP address.
    pub fn with_ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }
}

/// A certificate and its private key, with the CA that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The common name (for a client certificate: the etcd user).
    pub common_name: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The issuing CA's certificate, PEM.
    pub ca_pem: String,
}

/// Paths of a bundle written by [`IssuedCert::write_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePaths {
    /// `<dir>/ca.crt`
    pub ca: PathBuf,
    /// `<dir>/tls.crt`
    pub cert: PathBuf,
    /// `<dir>/tls.key`
    pub key: PathBuf,
}

impl IssuedCert {
    /// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir`, creating it if needed.
    /// On Unix the key file is written with mode 0600.
    pub fn write_bundle(&self, dir: &Path) -> Result<BundlePaths, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
        let paths = BundlePaths { ca: dir.join(CA_CERT_FILE), cert: dir.join(CERT_FILE), key: dir.join(KEY_FILE) };
        write_file(&paths.ca, &self.ca_pem, false)?;
        write_file(&paths.cert, &self.cert_pem, false)?;
        write_file(&paths.key, &self.key_pem, true)?;
        Ok(paths)
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_owned(), source };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = opts.open(path).map_err(err)?;
    io::Write::write_all(&mut file, contents.as_bytes()).map_err(err)
}

/// A certificate authority that can issue server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    leaf_validity: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("leaf_validity", &self.leaf_validity).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new self-signed CA (ECDSA P-256) valid for [`DEFAULT_CA_VALIDITY`].
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        Self::generate_with_validity(common_name, DEFAULT_CA_VALIDITY)
    }

    /// Generates a new self-signed CA valid for `validity` from now.
    pub fn generate_with_validity(common_name: &str, validity: Duration) -> Result<Self, PkiError> {
        check_common_name("CA", common_name)?;
        let gen_err = |source| PkiError::Generate { what: "CA", name: common_name.to_owned(), source };
        let mut params = base_params(common_name, validity);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Self { issuer: Issuer::new(params, key), cert_pem: cert.pem(), leaf_validity: DEFAULT_LEAF_VALIDITY })
    }

    /// Loads an existing CA from its certificate and private key (PEM), e.g. from the
    /// `ca.crt`/`ca.key` of an existing Secret, so that more certificates can be issued.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::LoadCa { what: "private key", source })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|source| PkiError::LoadCa { what: "certificate", source })?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned(), leaf_validity: DEFAULT_LEAF_VALIDITY })
    }

    /// Sets the lifetime of certificates issued from now on (default
    /// [`DEFAULT_LEAF_VALIDITY`]).
    pub fn with_leaf_validity(mut self, validity: Duration) -> Self {
        self.leaf_validity = validity;
        self
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Keep it secret: whoever holds it can mint any
    /// etcd user, including `root`.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a server certificate for `common_name`, valid for `names`.
    ///
    /// The certificate carries both the server-auth and client-auth usages, because
    /// etcd presents its server certificate on peer connections too.
    pub fn issue_server(&self, common_name: &str, names: &ServerNames) -> Result<IssuedCert, PkiError> {
        check_common_name("server", common_name)?;
        let mut params = base_params(common_name, self.leaf_validity);
        for dns in &names.dns {
            let ia5 = dns.clone().try_into().map_err(|_| PkiError::InvalidName {
                what: "server",
                name: dns.clone(),
                reason: "DNS names must be ASCII",
            })?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params.subject_alt_names.extend(names.ips.iter().copied().map(SanType::IpAddress));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign("server", common_name, params)
    }

    /// Issues a client certificate whose CN is `user` (see [`users`] for the names etcd
    /// expects).
    pub fn issue_client(&self, user: &str) -> Result<IssuedCert, PkiError> {
        check_common_name("client", user)?;
        let mut params = base_params(user, self.leaf_validity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign("client", user, params)
    }

    fn sign(
        &self,
        what: &'static str,
        common_name: &str,
        mut params: CertificateParams,
    ) -> Result<IssuedCert, PkiError> {
        let gen_err = |source| PkiError::Generate { what, name: common_name.to_owned(), source };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(IssuedCert {
            common_name: common_name.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

fn check_common_name(what: &'static str, name: &str) -> Result<(), PkiError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 64 {
        "X.509 limits a common name to 64 characters"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else {
        return Ok(());
    };
    Err(PkiError::InvalidName { what, name: name.to_owned(), reason })
}

fn base_params(common_name: &str, validity: Duration) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    // A random serial: two CAs generated in one second must not issue colliding serials.
    params.serial_number = Some(random_serial());
    params
}

fn random_serial() -> rcgen::SerialNumber {
    // Derived from a fresh key's public bytes: rcgen already depends on a CSPRNG, and this
    // avoids another dependency. The top bit is cleared so the serial stays positive.
    let mut bytes = match KeyPair::generate() {
        Ok(k) => k.public_key_raw()[1..17].to_vec(),
        Err(_) => {
            let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
            nanos.to_be_bytes().to_vec()
        }
    };
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// A CA plus a server certificate: what a TLS etcd needs, with a way to mint clients.
///
/// This is a convenience for tests and the sandbox; production code uses
/// [`CertificateAuthority`] directly.
#[derive(Debug)]
pub struct Pki {
    ca: CertificateAuthority,
    server: IssuedCert,
}

impl Pki {
    /// A fresh CA and an `etcd` server certificate valid for `names`.
    pub fn generate(names: &ServerNames) -> Result<Self, PkiError> {
        let ca = CertificateAuthority::generate("causeway-etcd-ca")?;
        let server = ca.issue_server("etcd", names)?;
        Ok(Self { ca, server })
    }

    /// A fresh CA and a server certificate for [`ServerNames::loopback`].
    pub fn loopback() -> Result<Self, PkiError> {
        Self::generate(&ServerNames::loopback())
    }

    /// The CA.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The server certificate.
    pub fn server(&self) -> &IssuedCert {
        &self.server
    }

    /// Issues a client certificate for etcd user `user`.
    pub fn client(&self, user: &str) -> Result<IssuedCert, PkiError> {
        self.ca.issue_client(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    fn parse(pem: &str) -> x509_parser::pem::Pem {
        parse_x509_pem(pem.as_bytes()).expect("pem").1
    }

    #[test]
    fn client_cert_cn_is_the_user_and_is_signed_by_ca() {
        let ca = CertificateAuthority::generate("test-ca").unwrap();
        let client = ca.issue_client(&users::remote("west")).unwrap();
        let pem = parse(&client.cert_pem);
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "remote-west");
        assert!(!cert.is_ca());

        let ca_pem = parse(ca.cert_pem());
        let ca_cert = ca_pem.parse_x509().unwrap();
        assert!(ca_cert.is_ca());
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn server_cert_has_dns_and_ip_sans() {
        let ca = CertificateAuthority::generate("test-ca").unwrap();
        let names = ServerNames::loopback()
            .with_dns("clustermesh-apiserver.kube-system.svc")
            .with_ip("10.96.0.10".parse().unwrap());
        let server = ca.issue_server("etcd", &names).unwrap();
        let pem = parse(&server.cert_pem);
        let cert = pem.parse_x509().unwrap();
        let sans = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
        assert!(sans.contains(&GeneralName::DNSName("localhost")));
        assert!(sans.contains(&GeneralName::DNSName("clustermesh-apiserver.kube-system.svc")));
        assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(sans.contains(&GeneralName::IPAddress(&[10, 96, 0, 10])));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(cert.validity().is_valid());
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_issuing() {
        let ca = CertificateAuthority::generate("test-ca").unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let client = loaded.issue_client(users::ROOT).unwrap();
        let cert_pem = parse(&client.cert_pem);
        let cert = cert_pem.parse_x509().unwrap();
        let ca_pem = parse(ca.cert_pem());
        let ca_cert = ca_pem.parse_x509().unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
    }

    #[test]
    fn from_pem_rejects_garbage_with_a_clear_error() {
        let err = CertificateAuthority::from_pem("nope", "nope").unwrap_err();
        assert!(matches!(err, PkiError::LoadCa { what: "private key", .. }));
        assert!(err.to_string().contains("PEM"));
    }

    #[test]
    fn invalid_names_are_refused() {
        let ca = CertificateAuthority::generate("test-ca").unwrap();
        assert!(matches!(ca.issue_client(""), Err(PkiError::InvalidName { .. })));
        let names = ServerNames::default().with_dns("bücher.example");
        assert!(matches!(ca.issue_server("etcd", &names), Err(PkiError::InvalidName { .. })));
    }

    #[test]
    fn bundle_uses_kubernetes_tls_secret_names() {
        let pki = Pki::loopback().unwrap();
        let client = pki.client(&users::admin("east")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = client.write_bundle(&dir.path().join("admin")).unwrap();
        assert!(paths.ca.ends_with("ca.crt"));
        assert_eq!(fs::read_to_string(&paths.ca).unwrap(), pki.ca().cert_pem());
        assert_eq!(fs::read_to_string(&paths.cert).unwrap(), client.cert_pem);
        assert_eq!(fs::read_to_string(&paths.key).unwrap(), client.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn serials_differ() {
        let ca = CertificateAuthority::generate("test-ca").unwrap();
        let a = ca.issue_client("a").unwrap();
        let b = ca.issue_client("a").unwrap();
        let sa = parse(&a.cert_pem).parse_x509().unwrap().serial.clone();
        let sb = parse(&b.cert_pem).parse_x509().unwrap().serial.clone();
        assert_ne!(sa, sb);
    }
}

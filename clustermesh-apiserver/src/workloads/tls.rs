//! mTLS for the registration service: the server presents its certificate and requires a client certificate
//! signed by the mesh CA; the handler then checks that certificate's CN (see `core::authorize`).

use std::path::Path;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Server TLS from PEM files: `cert`/`key` are the server's, `ca` verifies clients (client certificates required).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerTlsConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(ca)?))
        .client_auth_optional(false))
}

/// The subject CN of a DER certificate; None when it does not parse or has no (UTF-8) CN.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        p.contents
    }

    #[test]
    fn reads_the_cn_of_issued_certificates() {
        let ca = causeway_pki::CertificateAuthority::generate("test-ca").expect("CA");
        let ew = ca.issue_client(causeway_pki::users::EXTERNAL_WORKLOAD).expect("cert");
        assert_eq!(common_name(&der(&ew.cert_pem)).as_deref(), Some("externalworkload"));
        let remote = ca.issue_client(&causeway_pki::users::remote("west")).expect("cert");
        assert_eq!(common_name(&der(&remote.cert_pem)).as_deref(), Some("remote-west"));
        assert_eq!(common_name(b"not a certificate"), None);
    }
}

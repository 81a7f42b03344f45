//! The service proxy subresource, GET only: `/api/v1/namespaces/{ns}/services/{name}[:{port}]/proxy/{path}`.
//!
//! What the real apiserver does, reduced to what clients of this stand-in need (`causeway clustermesh status` reads
//! identity-sync's `/status` this way): the Service's port is chosen by name or number (the only port when none is
//! given), its endpoint comes from the Service's EndpointSlices (label `kubernetes.io/service-name`, first ready
//! address, the slice port of the same name), and the request is forwarded over plain HTTP/1.1 to that address. The
//! upstream's status code, content type and body are returned as they are. A Service with no ready endpoint is a 503
//! with a `Status` body, as kube-apiserver answers ("no endpoints available for service"); an unreachable endpoint is
//! a 503 too ("error trying to reach service").

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{ApiError, ApiResult};
use crate::selectors::{FieldSelector, Filter, LabelSelector};
use crate::Shared;

/// A parsed proxy path.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub namespace: String,
    pub service: String,
    pub port: Option<String>,
    /// The path on the backend, with its leading '/', plus the query string if any.
    pub path: String,
}

/// Recognises a service proxy path; None for every other path.
pub fn parse(path: &str, query: Option<&str>) -> Option<ProxyTarget> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("services/")?;
    let (name_port, rest) = rest.split_once('/')?;
    let tail = rest.strip_prefix("proxy")?;
    if !(tail.is_empty() || tail.starts_with('/')) {
        return None;
    }
    // `[scheme:]name[:port]`: only plain http is served here.
    let name_port = name_port.strip_prefix("http:").unwrap_or(name_port);
    let (service, port) = match name_port.split_once(':') {
        Some((s, p)) => (s, Some(p.to_string())),
        None => (name_port, None),
    };
    let mut path = if tail.is_empty() { "/".to_string() } else { tail.to_string() };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        path.push('?');
        path.push_str(q);
    }
    Some(ProxyTarget { namespace: namespace.to_string(), service: service.to_string(), port, path })
}

fn unavailable(message: String) -> ApiError {
    ApiError { code: 503, reason: "ServiceUnavailable", message, details: None }
}

/// The backend address for a proxy target, from the Service and its EndpointSlices.
fn resolve(shared: &Shared, t: &ProxyTarget) -> ApiResult<SocketAddr> {
    let store = shared.store();
    let services = store.registry.lookup("", "v1", "services").cloned().ok_or_else(ApiError::no_route)?;
    let slices_info =
        store.registry.lookup("discovery.k8s.io", "v1", "endpointslices").cloned().ok_or_else(ApiError::no_route)?;
    let svc = store.get(&services, Some(&t.namespace), &t.service)?;
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    let port = match &t.port {
        None if ports.len() == 1 => ports[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "service {} has {} ports: name one in the proxy path",
                t.service,
                ports.len()
            )))
        }
        Some(p) => ports
            .iter()
            .find(|sp| {
                sp.get("name").and_then(Value::as_str) == Some(p.as_str())
                    || sp.get("port").and_then(Value::as_u64).map(|n| n.to_string()).as_deref() == Some(p.as_str())
            })
            .cloned()
            .ok_or_else(|| unavailable(format!("no service port {p:?} found for service {:?}", t.service)))?,
    };
    let port_name = port.get("name").and_then(Value::as_str).unwrap_or("");
    let labels = LabelSelector::parse(&format!("kubernetes.io/service-name={}", t.service))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse("").map_err(ApiError::bad_request)?;
    let filter = Filter { namespace: Some(t.namespace.clone()), labels, fields };
    let (slices, _) = store.snapshot(&slices_info, &filter);
    for slice in &slices {
        let Some(slice_port) = slice
            .get("ports")
            .and_then(Value::as_array)
            .and_then(|ps| ps.iter().find(|p| p.get("name").and_then(Value::as_str).unwrap_or("") == port_name))
            .and_then(|p| p.get("port").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.get("endpoints").and_then(Value::as_array).into_iter().flatten() {
            let ready = ep.pointer("/conditions/ready").and_then(Value::as_bool).unwrap_or(true);
            let addr = ep
                .get("addresses")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpAddr>().ok());
            if let (true, Some(ip)) = (ready, addr) {
                return Ok(SocketAddr::new(ip, slice_port));
            }
        }
    }
    Err(unavailable(format!("no endpoints available for service \"{}\"", t.service)))
}

/// One HTTP/1.1 GET with `Connection: close`; returns status, content type and body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Option<String>, Vec<u8>)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut content_type = None;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(v.trim().to_string()),
                "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("malformed chunked body"))?;
    }
    Ok((status, content_type, body))
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// Serves one proxied GET.
pub async fn serve(shared: Arc<Shared>, target: ProxyTarget) -> Response {
    let addr = match resolve(&shared, &target) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    tracing::debug!(service = %target.service, %addr, path = %target.path, "service proxy");
    match tokio::time::timeout(Duration::from_secs(30), get(addr, &target.path)).await {
        Ok(Ok((code, content_type, body))) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = content_type.unwrap_or_else(|| "application/octet-stream".into());
            (code, [(header::CONTENT_TYPE, ct)], body).into_response()
        }
        Ok(Err(e)) => unavailable(format!("error trying to reach service: {e}")).into_response(),
        Err(_) => unavailable("error trying to reach service: timed out".into()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths() {
        let t = parse("/api/v1/namespaces/kube-system/services/identity-sync:metrics/proxy/status", None).unwrap();
        assert_eq!(
            t,
            ProxyTarget {
                namespace: "kube-system".into(),
                service: "identity-sync".into(),
                port: Some("metrics".into()),
                path: "/status".into()
            }
        );
        let t = parse("/api/v1/namespaces/a/services/http:s/proxy", Some("x=1")).unwrap();
        assert_eq!((t.service.as_str(), t.port, t.path.as_str()), ("s", None, "/?x=1"));
        assert!(parse("/api/v1/namespaces/a/services/s", None).is_none());
        assert!(parse("/api/v1/namespaces/a/services/s/proxyfoo", None).is_none());
        assert!(parse("/api/v1/namespaces/a/pods/p/proxy/x", None).is_none());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
        assert_eq!(dechunk(b"ff\r\nab"), None);
    }
}

//! HTTP routing: parses `/api/...` and `/apis/...` paths by hand (the core group's
//! `/namespaces/{name}/status` and `/namespaces/{ns}/{plural}` overlap in ways a route table can't express)
//! and dispatches to the store.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::patch::{self, PatchKind};
use crate::registry::ResourceInfo;
use crate::selectors::{FieldSelector, Filter, LabelSelector};
use crate::store::Preconditions;
use crate::watch::{self, WatchRequest, WatchStart};
use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(|| async { Json(discovery::version()) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/api", get(core_versions))
        .route("/apis", get(group_list))
        .route("/api/{*rest}", any(handle))
        .route("/apis/{*rest}", any(handle))
        .fallback(|| async { ApiError::no_route() })
        .with_state(shared)
}

async fn core_versions(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(discovery::core_versions(&shared.addr.to_string()))
}

async fn group_list(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(discovery::group_list(&shared.store().registry))
}

/// Query parameters, in order; the last occurrence of a name wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> ApiResult<Self> {
        serde_urlencoded::from_str(raw.unwrap_or(""))
            .map(Query)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }

    fn filter(&self, namespace: Option<&str>) -> ApiResult<Filter> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid field selector: {e}")))?;
        Ok(Filter { namespace: namespace.map(str::to_string), labels, fields })
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

/// What a resource path points at.
struct Target {
    info: ResourceInfo,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Resolved {
    Discovery(Value),
    Resource(Target),
}

fn resolve(shared: &Shared, path: &str) -> ApiResult<Resolved> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            let store = shared.store();
            return discovery::group(&store.registry, group).map(Resolved::Discovery).ok_or_else(ApiError::no_route);
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route()),
    };
    let store = shared.store();
    let registry = &store.registry;
    if rest.is_empty() {
        return discovery::resource_list(registry, group, version)
            .map(Resolved::Discovery)
            .ok_or_else(ApiError::no_route);
    }
    // `/namespaces/{ns}/{plural}...` unless, in the core group, `{plural}` is not a namespaced
    // resource: then it is the `namespaces` resource itself (e.g. `/namespaces/{name}/status`).
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && registry.lookup(group, version, rest[2]).is_some_and(|i| i.namespaced);
    let (namespace, rest) = if namespaced_path { (Some(rest[1].to_string()), &rest[2..]) } else { (None, rest) };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let info = registry.lookup(group, version, plural).cloned().ok_or_else(ApiError::no_route)?;
    if namespace.is_some() && !info.namespaced {
        return Err(ApiError::no_route());
    }
    if namespace.is_none() && info.namespaced && name.is_some() {
        return Err(ApiError::no_route());
    }
    let status = match sub {
        None => false,
        Some("status") if info.status_subresource => true,
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Resolved::Resource(Target {
        info,
        version: version.to_string(),
        namespace,
        name: name.map(str::to_string),
        status,
    }))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(target) = crate::proxy::parse(uri.path(), uri.query()) {
        if method != Method::GET {
            return ApiError::method_not_allowed("the service proxy of this stand-in serves GET only").into_response();
        }
        return crate::proxy::serve(shared, target).await;
    }
    let result = dispatch(&shared, &method, &uri, &headers, &body);
    match result {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(%method, %uri, code = err.code, reason = err.reason, message = %err.message, "request failed");
            err.into_response()
        }
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json")
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<Value> {
    let ct = content_type(headers);
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::unsupported_body_type(ct));
    }
    let parsed = if ct.contains("yaml") {
        serde_yaml::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    let value = parsed.map_err(|e| ApiError::bad_request(format!("the request body could not be decoded: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    Ok(value)
}

/// apiVersion and kind in a body, when present, must name the resource at the requested version.
fn check_type(t: &Target, body: &Value) -> ApiResult<()> {
    let want_av = t.info.api_version(&t.version);
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str) {
        if av != want_av {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )));
        }
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str) {
        if kind != t.info.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                t.info.kind
            )));
        }
    }
    Ok(())
}

fn object_response(code: StatusCode, t: &Target, obj: &Value) -> Response {
    (code, Json(t.info.present(obj, &t.version))).into_response()
}

fn dispatch(shared: &Arc<Shared>, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
    let t = match resolve(shared, uri.path())? {
        Resolved::Discovery(doc) if *method == Method::GET => return Ok(Json(doc).into_response()),
        Resolved::Discovery(_) => return Err(ApiError::method_not_allowed("discovery documents are read-only")),
        Resolved::Resource(t) => t,
    };
    let q = Query::parse(uri.query())?;
    let ns = t.namespace.as_deref();
    let info = &t.info;
    tracing::trace!(%method, %uri, "request");

    match (method.clone(), t.name.as_deref()) {
        (Method::GET, None) if q.flag("watch") => start_watch(shared, &t, &q, None),
        (Method::GET, Some(name)) if q.flag("watch") => start_watch(shared, &t, &q, Some(name)),
        (Method::GET, None) => {
            let filter = q.filter(ns)?;
            let limit = match q.get("limit").filter(|l| !l.is_empty()) {
                None => None,
                Some(l) => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?),
            };
            let list = shared.store().list(info, &filter, limit, q.get("continue"))?;
            let mut metadata = json!({"resourceVersion": list.resource_version.to_string()});
            if let Some(c) = list.continue_token {
                metadata["continue"] = json!(c);
            }
            if let Some(r) = list.remaining {
                metadata["remainingItemCount"] = json!(r);
            }
            let items: Vec<Value> = list.items.iter().map(|o| info.present(o, &t.version)).collect();
            Ok(Json(json!({
                "kind": info.list_kind(),
                "apiVersion": info.api_version(&t.version),
                "metadata": metadata,
                "items": items,
            }))
            .into_response())
        }
        (Method::GET, Some(name)) => {
            let obj = shared.store().get(info, ns, name)?;
            Ok(object_response(StatusCode::OK, &t, &obj))
        }
        (Method::POST, None) if !t.status => {
            if info.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed("create a namespaced object under /namespaces/{namespace}/"));
            }
            let body = parse_body(headers, body)?;
            check_type(&t, &body)?;
            let obj = shared.store().create(info, ns, body, q.dry_run())?;
            tracing::debug!(resource = %info.plural, namespace = ?ns, name = ?obj.pointer("/metadata/name"), "created");
            Ok(object_response(StatusCode::CREATED, &t, &obj))
        }
        (Method::PUT, Some(name)) => {
            let body = parse_body(headers, body)?;
            check_type(&t, &body)?;
            let obj = shared.store().update(info, ns, name, body, t.status, q.dry_run())?;
            Ok(object_response(StatusCode::OK, &t, &obj))
        }
        (Method::PATCH, Some(name)) => {
            let ct = content_type(headers);
            let kind = PatchKind::from_content_type(ct).ok_or_else(|| ApiError::unsupported_media_type(ct))?;
            let patch_body = match kind {
                PatchKind::Apply => {
                    if q.get("fieldManager").is_none_or(str::is_empty) {
                        return Err(ApiError::bad_request(
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        ));
                    }
                    let v = patch::parse_apply_body(body).map_err(ApiError::bad_request)?;
                    check_type(&t, &v)?;
                    v
                }
                _ => serde_json::from_slice::<Value>(body)
                    .map_err(|e| ApiError::bad_request(format!("the patch could not be decoded: {e}")))?,
            };
            let (obj, created) = shared.store().patch(info, ns, name, kind, &patch_body, t.status, q.dry_run())?;
            let code = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(object_response(code, &t, &obj))
        }
        (Method::DELETE, Some(name)) if !t.status => {
            let (pre, body_dry_run) = delete_options(body)?;
            let obj = shared.store().delete(info, ns, name, &pre, q.dry_run() || body_dry_run)?;
            tracing::debug!(resource = %info.plural, namespace = ?ns, name, "deleted");
            Ok(object_response(StatusCode::OK, &t, &obj))
        }
        (Method::DELETE, None) if !t.status => {
            let (_, body_dry_run) = delete_options(body)?;
            let filter = q.filter(ns)?;
            let deleted = shared.store().delete_collection(info, &filter, q.dry_run() || body_dry_run)?;
            let rv = shared.store().resource_version();
            let items: Vec<Value> = deleted.iter().map(|o| info.present(o, &t.version)).collect();
            Ok(Json(json!({
                "kind": info.list_kind(),
                "apiVersion": info.api_version(&t.version),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            }))
            .into_response())
        }
        _ => Err(ApiError::method_not_allowed(format!("method {method} is not supported on {}", uri.path()))),
    }
}

/// Reads the optional DeleteOptions body: preconditions and dryRun.
fn delete_options(body: &[u8]) -> ApiResult<(Preconditions, bool)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((Preconditions::default(), false));
    }
    let opts: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the DeleteOptions body could not be decoded: {e}")))?;
    let s = |p: &str| opts.pointer(p).and_then(Value::as_str).map(str::to_string);
    let dry_run = opts.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|v| v == "All"));
    Ok((Preconditions { uid: s("/preconditions/uid"), resource_version: s("/preconditions/resourceVersion") }, dry_run))
}

fn start_watch(shared: &Arc<Shared>, t: &Target, q: &Query, name: Option<&str>) -> ApiResult<Response> {
    let mut filter = q.filter(t.namespace.as_deref())?;
    if let Some(name) = name {
        let by_name = FieldSelector::parse(&format!("metadata.name={name}")).map_err(ApiError::bad_request)?;
        filter.fields = by_name;
    }
    let rv = q.get("resourceVersion").filter(|s| !s.is_empty());
    let start = if q.flag("sendInitialEvents") {
        WatchStart::Snapshot { end_bookmark: true }
    } else {
        match rv {
            None | Some("0") => WatchStart::Snapshot { end_bookmark: false },
            Some(rv) => WatchStart::From(
                rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
            ),
        }
    };
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Duration::from_secs(
            s.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        )),
    };
    Ok(watch::serve(
        shared.clone(),
        WatchRequest {
            info: t.info.clone(),
            version: t.version.clone(),
            filter,
            start,
            bookmarks: q.flag("allowWatchBookmarks"),
            timeout,
        },
    ))
}

//! Errors as the apiserver reports them: a `kind: Status` body with a reason and an HTTP code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// A failed request, rendered as a `meta/v1 Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details.name`, `details.group`, `details.kind` (the resource plural, as the apiserver sends it).
    pub details: Option<(String, String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    pub fn with_details(mut self, name: &str, group: &str, plural: &str) -> Self {
        self.details = Some((name.to_string(), group.to_string(), plural.to_string()));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The path names no resource this server knows.
    pub fn no_route() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
    }

    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        let res = qualified(group, plural);
        Self::new(404, "NotFound", format!("{res} \"{name}\" not found")).with_details(name, group, plural)
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        let res = qualified(group, plural);
        Self::new(409, "AlreadyExists", format!("{res} \"{name}\" already exists")).with_details(name, group, plural)
    }

    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> Self {
        let res = qualified(group, plural);
        Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {res} \"{name}\": {why}"))
            .with_details(name, group, plural)
    }

    pub fn invalid(group: &str, plural: &str, name: &str, why: impl AsRef<str>) -> Self {
        let res = qualified(group, plural);
        Self::new(422, "Invalid", format!("{res} \"{name}\" is invalid: {}", why.as_ref()))
            .with_details(name, group, plural)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"),
        )
    }

    /// Create and update bodies must be JSON (or YAML); protobuf and CBOR are not implemented.
    pub fn unsupported_body_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?}; protobuf and CBOR are not implemented by this test stand-in)"),
        )
    }

    /// What a watch or continue token gets when its resourceVersion was compacted away.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `kind: Status` object for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, group, kind)) = &self.details {
            status["details"] = json!({ "name": name, "group": group, "kind": kind });
        }
        status
    }
}

fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.status())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

//! `CausewayIdentity`: one allocated numeric security identity, persisted so that IDs survive restarts.
//!
//! The object's name is the numeric identity in decimal (for example `65537`); the object is cluster-scoped
//! because identities are. clustermesh-apiserver creates the object *before* the ID is exported or used,
//! restores its allocator from the list of these objects on start, and deletes the object when the identity has
//! been unused for longer than its grace period.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which label set the identity stands for, and which cluster allocated it.
// clippy reads repeated `type_ = "..."` keys across the printcolumn(...) entries as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "causeway.io",
    version = "v1alpha1",
    kind = "CausewayIdentity",
    plural = "causewayidentities",
    singular = "causewayidentity",
    shortname = "cwid",
    category = "causeway",
    status = "CausewayIdentityStatus",
    doc = "A numeric security identity allocated by clustermesh-apiserver. The object name is the identity.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster", description = "Owning cluster"),
    printcolumn(
        name = "Labels",
        type_ = "string",
        json_path = ".spec.labels",
        description = "Identity labels in store form"
    ),
    printcolumn(name = "Last-Used", type_ = "date", json_path = ".status.lastUsed", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct CausewayIdentitySpec {
    /// The identity's sorted label set in store form, each label as `source:key=value;`, exactly as written to
    /// `cilium/state/identities/v1/id/<id>`.
    #[schemars(length(min = 1))]
    pub labels: String,
    /// Name of the cluster that allocated the identity.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$"))]
    pub cluster: String,
}

/// Observed state of an identity.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CausewayIdentityStatus {
    /// RFC 3339 time the identity's last user went away; absent while it is in use. Informational: the
    /// allocator gives every restored identity a full grace period after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

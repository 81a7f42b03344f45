//! Causeway's CustomResourceDefinitions. The Rust types here are the source of truth; the YAML committed in
//! `crds/causeway.io_crds.yaml` is generated from them by the `crdgen` binary and checked for drift in CI.
//!
//! Where it sits in the flow: clustermesh-apiserver persists every security identity it allocates as a
//! [`CausewayIdentity`] (so IDs survive restarts), the egress-gw controller reconciles egress policies, and
//! an [`ExternalWorkload`] admits a VM or bare-metal host that registers with clustermesh-apiserver.
//! Adapters read and write these objects; the domain logic never sees kube types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub mod egress;
pub mod external_workload;
pub mod identity;

pub use egress::{EgressGatewayPolicy, EgressGatewayPolicySpec, EgressGatewayPolicyStatus};
pub use external_workload::{ExternalWorkload, ExternalWorkloadSpec, ExternalWorkloadStatus, WorkloadCondition};
pub use identity::{CausewayIdentity, CausewayIdentitySpec, CausewayIdentityStatus};

/// API group of every Causeway CRD.
pub const GROUP: &str = "causeway.io";

/// Every CRD Causeway installs, in the order they appear in the generated YAML. A new CRD is added here and
/// nowhere else; `crdgen` and the drift test pick it up.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![CausewayIdentity::crd(), EgressGatewayPolicy::crd(), ExternalWorkload::crd()]
}

/// Error from rendering the CRDs to YAML.
#[derive(Debug, thiserror::Error)]
#[error("could not render CRD {name} as YAML: {source}")]
pub struct RenderError {
    pub name: String,
    #[source]
    pub source: serde_yaml::Error,
}

/// All CRDs as one multi-document YAML stream (each document starts with `---`), as committed in
/// `crds/causeway.io_crds.yaml`.
pub fn render_yaml() -> Result<String, RenderError> {
    let mut out = String::new();
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let doc = serde_yaml::to_string(&crd).map_err(|source| RenderError { name, source })?;
        out.push_str("---\n");
        out.push_str(&doc);
    }
    Ok(out)
}

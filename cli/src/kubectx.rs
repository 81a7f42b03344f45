//! Kube contexts like kubectl: `--kubeconfig` (else `$KUBECONFIG`, else `~/.kube/config`) and `--context` (else
//! the kubeconfig's current context).

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::Error;

/// Which cluster to talk to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeTarget {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

impl KubeTarget {
    pub fn new(kubeconfig: Option<PathBuf>, context: Option<String>) -> Self {
        Self { kubeconfig, context }
    }

    /// How this target is named in messages: the context, or "the current context".
    pub fn label(&self) -> String {
        match &self.context {
            Some(c) => format!("context {c:?}"),
            None => "the current context".to_string(),
        }
    }

    /// A client for this target.
    pub async fn client(&self) -> Result<Client, Error> {
        let config = self.config().await?;
        Client::try_from(config).map_err(|e| Error::Kubeconfig { target: self.label(), message: e.to_string() })
    }

    /// A client that does not retry 429/503/504 answers. For the service proxy: the API answers 503 when the
    /// Service has no ready endpoint, and kube's default retries would hide that for minutes.
    pub async fn client_without_retries(&self) -> Result<Client, Error> {
        let mut config = self.config().await?;
        config.default_retry = false;
        Client::try_from(config).map_err(|e| Error::Kubeconfig { target: self.label(), message: e.to_string() })
    }

    async fn config(&self) -> Result<Config, Error> {
        let err = |message: String| Error::Kubeconfig { target: self.label(), message };
        let options = KubeConfigOptions { context: self.context.clone(), ..Default::default() };
        match &self.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path).map_err(|e| err(format!("reading {}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kc, &options).await.map_err(|e| err(e.to_string()))
            }
            None => Config::from_kubeconfig(&options).await.map_err(|e| err(e.to_string())),
        }
    }
}

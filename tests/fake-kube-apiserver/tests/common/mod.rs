//! Shared setup: a fresh server per test and a kube `Client` built from its kubeconfig.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle, Options};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Guards against hangs only; nothing asserts on timing.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub async fn start(options: Options) -> anyhow::Result<(FakeApiServerHandle, Client)> {
    let server = FakeApiServer::start_with("127.0.0.1:0".parse()?, options).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    Ok((server, client))
}

pub async fn start_default() -> anyhow::Result<(FakeApiServerHandle, Client)> {
    start(Options::default()).await
}

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, fut).await.map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))
}

/// The API error a kube call failed with, or a test failure if it failed otherwise.
pub fn api_error<T: std::fmt::Debug>(res: Result<T, kube::Error>) -> anyhow::Result<kube::core::Status> {
    match res {
        Err(kube::Error::Api(status)) => Ok(*status),
        other => anyhow::bail!("expected an API error, got {other:?}"),
    }
}

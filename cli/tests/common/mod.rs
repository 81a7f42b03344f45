//! Shared test setup: in-memory kube API stand-ins (one per "cluster"), one kubeconfig naming them as contexts,
//! and a way to run the real `causeway` binary against them.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::path::{Path, PathBuf};
use std::process::Output;

use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// Several fake kube APIs, each a context (named after its cluster) in one kubeconfig file.
pub struct Clusters {
    pub servers: Vec<(String, FakeApiServerHandle)>,
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Clusters {
    pub async fn start(names: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut servers = Vec::new();
        let (mut clusters, mut contexts) = (String::new(), String::new());
        for name in names {
            let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
            clusters.push_str(&format!("- name: {name}\n  cluster:\n    server: {}\n", server.url()));
            contexts.push_str(&format!(
                "- name: {name}\n  context:\n    cluster: {name}\n    user: nobody\n    namespace: default\n"
            ));
            servers.push((name.to_string(), server));
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n{clusters}users:\n- name: nobody\n  user: {{}}\n\
             contexts:\n{contexts}current-context: {}\n",
            names.first().copied().unwrap_or_default()
        );
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, yaml)?;
        Ok(Self { servers, kubeconfig, _dir: dir })
    }

    /// A kube client for context `name`, read from the same kubeconfig the CLI uses.
    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let opts = KubeConfigOptions { context: Some(name.to_string()), ..Default::default() };
        let cfg = kube::Config::from_custom_kubeconfig(kc, &opts).await?;
        Ok(Client::try_from(cfg)?)
    }

    /// Runs `causeway <args>` with `--kubeconfig` set to this kubeconfig (through the environment, as a user's
    /// shell would).
    pub async fn causeway(&self, args: &[&str]) -> anyhow::Result<Run> {
        run(&self.kubeconfig, args).await
    }
}

/// What one run of the binary printed.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the run succeeded.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(self.ok, "{what} failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

pub async fn run(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("HOME")
        .output()
        .await?;
    Ok(Run::from(out))
}

/// Installs Causeway's CRDs (what `kubectl apply -f crds/` does).
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api = kube::Api::<CustomResourceDefinition>::all(client.clone());
    for crd in causeway_crds::all_crds() {
        api.create(&Default::default(), &crd).await?;
    }
    Ok(())
}

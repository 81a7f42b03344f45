//! `causeway`: the operator's command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "causeway", version, about = "Causeway: multi-cluster mesh and egress gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which cluster: like kubectl, `--kubeconfig` (else $KUBECONFIG, else ~/.kube/config) and `--context`.
#[derive(clap::Args, Clone, Debug)]
struct KubeArgs {
    /// Path to the kubeconfig file.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long)]
    context: Option<String>,
}

impl KubeArgs {
    fn target(&self) -> causeway::KubeTarget {
        causeway::KubeTarget::new(self.kubeconfig.clone(), self.context.clone())
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Connect clusters into a mesh: certificates, cluster name/ID, peer configs, status.
    Clustermesh {
        #[command(subcommand)]
        action: MeshAction,
    },
    /// VMs and bare-metal hosts joining a cluster.
    ExternalWorkload {
        #[command(subcommand)]
        action: ExternalWorkloadAction,
    },
    /// Egress gateway policies.
    Egress {
        #[command(subcommand)]
        action: EgressAction,
    },
    /// A local mesh of two clusters on loopback (etcd, kube API stand-in, clustermesh-apiserver, identity-sync).
    Sandbox {
        #[command(subcommand)]
        action: SandboxAction,
        /// Where the sandbox keeps its state, certificates and logs.
        #[arg(long, default_value = ".sandbox", env = "CAUSEWAY_SANDBOX_DIR", global = true)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum MeshAction {
    /// Store the cluster's name and ID, create the mesh CA and the server, admin and externalworkload
    /// certificates in Secrets. Idempotent: a second run changes nothing.
    Enable {
        #[command(flatten)]
        kube: KubeArgs,
        /// Namespace of Causeway's objects.
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Unique name of this cluster in the mesh (at most 32 of a-z, 0-9, '-'; not "default"). Without it (and
        /// --cluster-id), the name and ID already in ConfigMap causeway-config (e.g. from the chart) are used.
        #[arg(long, requires = "cluster_id")]
        cluster_name: Option<String>,
        /// Unique ID of this cluster in the mesh, 1..=255 (1..=511 with --max-connected-clusters 511).
        #[arg(long, requires = "cluster_name")]
        cluster_id: Option<u32>,
        /// 255 or 511; the same on every cluster of the mesh.
        #[arg(long, default_value_t = 255)]
        max_connected_clusters: u32,
        /// Extra DNS name or IP for the clustermesh-apiserver's server certificate (repeatable).
        #[arg(long = "server-san")]
        server_sans: Vec<String>,
    },
    /// Renew the server, admin and externalworkload certificates from the same CA (peers keep trusting).
    RotateCerts {
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Extra DNS name or IP for the server certificate (repeatable); the old certificate's names are kept.
        #[arg(long = "server-san")]
        server_sans: Vec<String>,
    },
    /// Connect two clusters: each side gets a peer config for the other in its remotes Secret.
    Connect {
        #[command(flatten)]
        kube: KubeArgs,
        /// The other cluster's context (in the same kubeconfig).
        #[arg(long)]
        destination_context: String,
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Disconnect two clusters: removes each side's peer config for the other.
    Disconnect {
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(long)]
        destination_context: String,
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Per remote cluster: connected, synced, entry counts, last error (from identity-sync's /status).
    Status {
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
        /// identity-sync's /status URL (e.g. through a port-forward). Default: the kube API's service proxy.
        #[arg(long)]
        status_url: Option<String>,
        /// identity-sync's Service, for the service proxy.
        #[arg(long, default_value = "identity-sync")]
        sync_service: String,
        /// Port (name or number) of identity-sync's Service serving /status.
        #[arg(long, default_value = "metrics")]
        sync_port: String,
        /// Poll until every remote is ready, showing progress.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        wait_timeout: Duration,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ExternalWorkloadAction {
    /// Print a bash script that joins a VM or bare-metal host NAME (run it there as root).
    Install {
        /// The host's name (a DNS label); it becomes the node name.
        name: String,
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Path of the node agent binary on the host (the script installs it from there; CAUSEWAY_AGENT_BINARY
        /// overrides it when the script runs).
        #[arg(long, default_value = "./causeway-node-agent")]
        agent_binary: String,
        /// Path of the identity-sync binary on the host (CAUSEWAY_IDENTITY_SYNC_BINARY overrides it).
        #[arg(long, default_value = "./identity-sync")]
        identity_sync_binary: String,
        /// The cluster's etcd as the host reaches it (https://HOST:PORT); default: from the clustermesh-apiserver
        /// Service's `etcd` port (load balancer, else NodePort, else ClusterIP).
        #[arg(long)]
        etcd_endpoint: Option<String>,
        /// The registration endpoint (https://HOST:PORT); default: from the Service's `workloads` port, chosen the
        /// same way.
        #[arg(long)]
        workloads_endpoint: Option<String>,
    },
}

#[derive(Subcommand)]
enum EgressAction {
    /// Per policy and egress group: active and healthy gateways (by zone), matched pods, SNAT port use, problems.
    Status {
        #[command(flatten)]
        kube: KubeArgs,
        /// Namespace of Causeway's objects (egress-gw's leader Lease is read there).
        #[arg(long, short = 'n', default_value = causeway::clustermesh::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Port of the node agents' /metrics endpoint on gateway node IPs.
        #[arg(long, default_value_t = causeway::egress::DEFAULT_AGENT_METRICS_PORT)]
        agent_metrics_port: u16,
        /// How long to wait for each agent's metrics.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        agent_timeout: Duration,
    },
}

async fn mesh(action: MeshAction) -> anyhow::Result<()> {
    use causeway::clustermesh::{self, connect, status, ClusterSettings};
    match action {
        MeshAction::Enable { kube, namespace, cluster_name, cluster_id, max_connected_clusters, server_sans } => {
            let settings = match (cluster_name, cluster_id) {
                (Some(name), Some(id)) => Some(ClusterSettings { name, id, max_connected_clusters }),
                _ => None,
            };
            let changes = clustermesh::enable(&kube.target(), &namespace, settings.as_ref(), &server_sans).await?;
            print!("{}", changes.render());
        }
        MeshAction::RotateCerts { kube, namespace, server_sans } => {
            let changes = clustermesh::rotate_certs(&kube.target(), &namespace, &server_sans).await?;
            print!("{}", changes.render());
        }
        MeshAction::Connect { kube, destination_context, namespace } => {
            let dest = causeway::KubeTarget::new(kube.kubeconfig.clone(), Some(destination_context));
            let report = connect::connect(&kube.target(), &dest, &namespace).await?;
            println!("{}", report.lines.join("\n"));
        }
        MeshAction::Disconnect { kube, destination_context, namespace } => {
            let dest = causeway::KubeTarget::new(kube.kubeconfig.clone(), Some(destination_context));
            let report = connect::disconnect(&kube.target(), &dest, &namespace).await?;
            println!("{}", report.lines.join("\n"));
        }
        MeshAction::Status { kube, namespace, status_url, sync_service, sync_port, wait, wait_timeout, output } => {
            let source = match status_url {
                Some(url) => status::Source::Url(url),
                None => status::Source::ServiceProxy { service: sync_service, port: sync_port },
            };
            let wait = wait.then_some(wait_timeout);
            let outcome = status::status(&kube.target(), &namespace, &source, wait, |line| eprintln!("{line}")).await?;
            match output {
                Output::Table => print!("{}", status::render(&outcome.status, &outcome.rows)),
                Output::Json => {
                    let doc = serde_json::json!({
                        "cluster": outcome.status.cluster,
                        "clusterId": outcome.status.cluster_id,
                        "ready": outcome.status.ready,
                        "allRemotesReady": outcome.all_ready,
                        "remotes": outcome.rows,
                    });
                    println!("{}", serde_json::to_string_pretty(&doc)?)
                }
            }
        }
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration such as 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration such as 500ms, 5s or 2m")),
    }
}

#[derive(Subcommand)]
enum SandboxAction {
    /// Start both clusters, create the demo global service, connect them, print the merged view.
    Up {
        /// How long to wait for the clusters to see each other.
        #[arg(long, default_value = "90")]
        timeout_secs: u64,
    },
    /// Stop every sandbox process and delete its state.
    Down,
    /// Print the merged view and the processes.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr and are quiet unless asked for (RUST_LOG=causeway=debug shows every kube write and scrape).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Clustermesh { action } => mesh(action).await?,
        Command::ExternalWorkload {
            action:
                ExternalWorkloadAction::Install {
                    name,
                    kube,
                    namespace,
                    agent_binary,
                    identity_sync_binary,
                    etcd_endpoint,
                    workloads_endpoint,
                },
        } => {
            let opts = causeway::external_workload::InstallOptions {
                agent_binary,
                identity_sync_binary,
                etcd_endpoint,
                workloads_endpoint,
            };
            let rendered = causeway::external_workload::install(&kube.target(), &namespace, &name, &opts).await?;
            for w in &rendered.warnings {
                eprintln!("{w}");
            }
            print!("{}", rendered.script);
        }
        Command::Egress {
            action: EgressAction::Status { kube, namespace, output, agent_metrics_port, agent_timeout },
        } => {
            let report =
                causeway::egress::collect(&kube.target(), &namespace, agent_metrics_port, agent_timeout).await?;
            match output {
                Output::Table => print!("{}", causeway::egress::render_table(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        }
        Command::Sandbox { action, dir } => match action {
            SandboxAction::Up { timeout_secs } => {
                eprintln!("starting the sandbox in {} ...", dir.display());
                let state = causeway::sandbox::up(&dir, Duration::from_secs(timeout_secs))
                    .await
                    .context("sandbox up failed (see the logs named above; `causeway sandbox down` cleans up)")?;
                println!("sandbox up: clusters {} are meshed\n", names(&state));
                print!("{}", causeway::sandbox::describe(&state).await);
                println!("\nstop it with: scripts/sandbox.sh down");
            }
            SandboxAction::Down => {
                let n = causeway::sandbox::down(&dir)?;
                println!("sandbox down: stopped {n} processes, removed {}", dir.display());
            }
            SandboxAction::Status => {
                let state = causeway::sandbox::load_state(&dir)?;
                print!("{}", causeway::sandbox::describe(&state).await);
            }
        },
    }
    Ok(())
}

fn names(state: &causeway::sandbox::SandboxState) -> String {
    state.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(" and ")
}

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
enum EgressAction {
    /// Per policy and egress group: active and healthy gateways (by zone), matched pods, SNAT port use, problems.
    Status {
        #[command(flatten)]
        kube: KubeArgs,
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
    match cli.command {
        Command::Egress { action: EgressAction::Status { kube, output, agent_metrics_port, agent_timeout } } => {
            let report = causeway::egress::collect(&kube.target(), agent_metrics_port, agent_timeout).await?;
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

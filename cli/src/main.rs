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

#[derive(Subcommand)]
enum Command {
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

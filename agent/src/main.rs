//! `coffer-agent`: runs the agent for one instance, or tears down an instance's database when its
//! agent is gone.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coffer_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "coffer-agent", version, about = "Coffer guest agent")]
struct Cli {
    /// Agent config file (TOML).
    #[arg(
        long,
        short,
        env = "COFFER_AGENT_CONFIG",
        default_value = "/etc/coffer/agent.toml"
    )]
    config: PathBuf,
    /// Override the NATS URL from the config file.
    #[arg(long)]
    nats_url: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Stop the database recorded in the state dir without an agent (used on forced deletes).
    Teardown,
    /// Validate the config file and exit.
    CheckConfig,
    /// Create the agent's key pair if needed and print its public key (hex).
    Keygen,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("coffer-agent: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    // A parent may have left SIGINT/SIGTERM blocked (the mask is inherited); we rely on them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    let _ = sigs.thread_unblock();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = AgentConfig::load(&cli.config)?;
    if let Some(url) = cli.nats_url {
        cfg.nats_url = url;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Keygen => {
            let (_, public) = coffer_agent::state::load_or_create_key(&cfg.state_dir)?;
            println!("{}", coffer_proto::seal::to_hex(&public));
            Ok(())
        }
        Command::CheckConfig => {
            println!("config ok: instance {}", cfg.instance_id);
            Ok(())
        }
        Command::Teardown => {
            let pid = coffer_agent::supervisor::kill_recorded(
                &cfg.state_dir,
                Duration::from_secs(cfg.stop_timeout_s),
            );
            match pid {
                Some(p) => println!("stopped database server pid {p}"),
                None => println!("no database server was running"),
            }
            Ok(())
        }
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("installing SIGTERM handler");
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    s.cancel();
                });
                coffer_agent::run(cfg, shutdown).await
            })
        }
    }
}

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
    /// Enrol this host with a controller using a one-time token from its administrator: the
    /// database this agent will run becomes an instance in the controller's API. Then start the
    /// agent (systemctl enable --now coffer-agent).
    Enroll {
        /// The controller's API, e.g. http://controller.example:8779.
        #[arg(long)]
        controller: String,
        /// The one-time token (prefer --token-file or COFFER_ENROL_TOKEN: arguments are visible
        /// to other users of the host until the token is used).
        #[arg(long, env = "COFFER_ENROL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the one-time token ('-' reads standard input).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// CA certificate (PEM) of an https controller.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Seconds to keep retrying while the controller is unreachable.
        #[arg(long, default_value_t = 300)]
        patience_s: u64,
        /// Allow a plain-http controller: the one-time token then crosses the network in the
        /// clear (the NATS creds stay sealed to this host's key). For a controller on this host
        /// or a private link only.
        #[arg(long)]
        insecure: bool,
    },
}

fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let text = if file == std::path::Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading the token file {}", file.display()))?
    };
    let t = text.trim().to_string();
    anyhow::ensure!(!t.is_empty(), "the enrolment token is empty");
    Ok(t)
}

fn enrol_blocking(
    config: &std::path::Path,
    req: coffer_agent::enrol::Request,
) -> anyhow::Result<String> {
    let table = coffer_agent::config::effective_table(config)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(coffer_agent::enrol::enrol(&table, &req))
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
    coffer_common::logging::init("info,async_nats=warn");
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Enroll {
        controller,
        token,
        token_file,
        ca_file,
        patience_s,
        insecure,
    } = command
    {
        let token = match (token, token_file) {
            (Some(t), _) => t,
            (None, Some(f)) => read_token(&f)?,
            (None, None) => anyhow::bail!(
                "give the enrolment token with --token-file FILE (or COFFER_ENROL_TOKEN)"
            ),
        };
        let id = enrol_blocking(
            &cli.config,
            coffer_agent::enrol::Request {
                controller_url: controller,
                token,
                ca_file,
                patience: Duration::from_secs(patience_s),
                insecure,
            },
        )?;
        println!("enrolled as instance {id}; start the agent: systemctl enable --now coffer-agent");
        return Ok(());
    }
    // `run` on a host with an [enrol] section that has not enrolled yet enrols first.
    if matches!(command, Command::Run) {
        let table = coffer_agent::config::effective_table(&cli.config)?;
        if !table.contains_key("instance_id") {
            if let Some(e) = table.get("enrol").cloned() {
                let e: coffer_agent::config::EnrolConfig = e.try_into().context("[enrol]")?;
                enrol_blocking(
                    &cli.config,
                    coffer_agent::enrol::Request {
                        controller_url: e.controller_url,
                        token: read_token(&e.token_file)?,
                        ca_file: e.ca_file,
                        patience: Duration::from_secs(3600),
                        insecure: e.insecure,
                    },
                )?;
            }
        }
    }
    let mut cfg = AgentConfig::load(&cli.config)?;
    if let Some(url) = cli.nats_url {
        cfg.nats_url = url;
    }
    match command {
        Command::Keygen => {
            let (_, public) = coffer_agent::state::load_or_create_key(&cfg.state_dir)?;
            println!("{}", coffer_proto::seal::to_hex(&public));
            Ok(())
        }
        Command::Enroll { .. } => unreachable!("handled above"),
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

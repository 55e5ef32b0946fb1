//! `coffer-controller`: `serve` runs the API and loops; `manage` holds admin subcommands in the
//! spirit of trove-manage.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coffer_controller::store::{FlavorRow, Store};
use coffer_controller::ControllerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "coffer-controller",
    version,
    about = "Coffer controller (Trove-compatible API)"
)]
struct Cli {
    /// Controller config file (TOML).
    #[arg(
        long,
        short,
        env = "COFFER_CONTROLLER_CONFIG",
        default_value = "/etc/coffer/controller.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API until SIGINT/SIGTERM.
    Serve,
    /// Administer datastores, versions and flavors.
    Manage {
        #[command(subcommand)]
        cmd: Manage,
    },
    /// Check the signature of a restore drill report: FILE holds what
    /// `GET /v1.0/{project}/restore_drills/{id}` answered (or its `restore_drill` object).
    /// Exits non-zero unless the report is exactly as the controller signed it.
    DrillVerify {
        file: PathBuf,
        /// The signing key to trust (`manage drill-key` prints it); without it, this
        /// controller's own key (read through --config).
        #[arg(long)]
        signer: Option<String>,
    },
}

#[derive(Subcommand)]
enum Manage {
    /// Apply store migrations and exit.
    DbSync,
    /// Create the NATS authority (operator, account, system keys) if needed and write the
    /// server's auth config and the controller's creds into `nats_auth.dir`.
    NatsSetup,
    /// Create a datastore (no-op if it exists).
    DatastoreUpdate { name: String },
    /// Create or update a datastore version.
    DatastoreVersionUpdate {
        datastore: String,
        /// The operator's label, e.g. `10.11`.
        name: String,
        /// The datastore implementation the agent runs (one of `coffer_proto::Datastore`'s ids).
        manager: String,
        /// The version number, e.g. `10.11.19`.
        version: String,
        /// Mark it inactive (hidden from users).
        #[arg(long)]
        inactive: bool,
        /// Enable root at create and return its password in the create response.
        #[arg(long)]
        root_on_create: bool,
    },
    /// Set a datastore's default version.
    DatastoreDefaultVersion { datastore: String, version: String },
    /// Load the configuration parameters tenants may set for a datastore version (Trove's
    /// `db_load_datastore_config_parameters`): a rules file in Trove's
    /// `{"configuration-parameters": [...]}` format, or, without `--file`, the rules bundled for
    /// the version's manager (generated from the server; see ARCHITECTURE.md).
    DatastoreParametersLoad {
        datastore: String,
        version: String,
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Create or update a flavor.
    FlavorCreate {
        id: String,
        name: String,
        ram_mb: i64,
        vcpus: i64,
        disk_gb: i64,
    },
    /// Allow a flavor for a datastore version (once any is linked, only linked flavors are allowed).
    VersionFlavorAdd(FlavorLink),
    /// Create a one-time enrolment token for a host that joins by itself (`coffer-agent enroll`):
    /// its database becomes a new instance of PROJECT named NAME. Prints the token (shown once).
    EnrolmentTokenCreate {
        /// The project (tenant) the instance will belong to.
        #[arg(long)]
        project: String,
        /// The instance's name.
        #[arg(long)]
        name: String,
        #[arg(long)]
        flavor: String,
        #[arg(long, default_value_t = coffer_proto::Datastore::DEFAULT.id().to_string())]
        datastore: String,
        #[arg(long)]
        version: String,
        /// Volume size in GB (what quotas and the API show).
        #[arg(long, default_value_t = 1)]
        volume_size: i64,
        /// Seconds until an unused token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
    /// Remove a flavor link.
    VersionFlavorDelete(FlavorLink),
    /// Print the public key that signs restore drill reports (to check them with
    /// `drill-verify --signer`).
    DrillKey,
}

// The arguments of `version-flavor-add` and `-delete` (a doc comment here would be their help).
#[derive(clap::Args)]
struct FlavorLink {
    datastore: String,
    version: String,
    flavor: String,
}

impl FlavorLink {
    /// Links (`linked`) or unlinks the flavor and says so.
    async fn set(self, store: &Store, linked: bool) -> anyhow::Result<()> {
        let FlavorLink {
            datastore,
            version,
            flavor,
        } = self;
        store
            .link_flavor(&datastore, &version, &flavor, linked)
            .await?;
        if linked {
            println!("flavor {flavor} allowed for {datastore} {version}");
        } else {
            println!("flavor {flavor} no longer linked to {datastore} {version}");
        }
        Ok(())
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("coffer-controller: {e:#}");
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
    coffer_common::logging::init("info,async_nats=warn,sqlx=warn");
    if let Command::DrillVerify { file, signer } = &cli.command {
        return drill_verify(&cli.config, file, signer.as_deref());
    }
    let cfg = ControllerConfig::load(&cli.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve => {
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
                coffer_controller::run(cfg, shutdown).await
            }
            Command::Manage { cmd } => manage(cfg, cmd).await,
            Command::DrillVerify { .. } => unreachable!("handled before the runtime starts"),
        }
    })
}

/// `drill-verify`: checks a drill report's signature against the trusted signing key.
fn drill_verify(
    config: &std::path::Path,
    file: &std::path::Path,
    signer: Option<&str>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let d = if v.get("restore_drill").is_some() {
        &v["restore_drill"]
    } else {
        &v
    };
    let (Some(report), Some(signature), Some(signed_by)) = (
        d["report_text"].as_str(),
        d["signature"].as_str(),
        d["signer"].as_str(),
    ) else {
        anyhow::bail!(
            "{} holds no signed report (report_text, signature, signer): is the drill finished?",
            file.display()
        );
    };
    let trusted = match signer {
        Some(s) => s.to_string(),
        None => {
            let cfg = ControllerConfig::load(config).with_context(|| {
                "reading the controller's config for its drill key; or pass --signer <key> \
                 (printed by `coffer-controller manage drill-key` on the controller)"
            })?;
            coffer_controller::nats_auth::drill_key(&cfg.data_dir)?.public_key()
        }
    };
    if signed_by != trusted {
        anyhow::bail!("the report was signed by {signed_by}, not by the trusted key {trusted}");
    }
    coffer_controller::workflow::drill::verify_report(report, signature, &trusted)?;
    let r: serde_json::Value = serde_json::from_str(report)?;
    println!(
        "signature OK: restore drill {} of instance {} {} (backup {}, restored to {}, signed by {trusted})",
        r["drill_id"].as_str().unwrap_or("?"),
        r["instance_id"].as_str().unwrap_or("?"),
        if r["passed"] == serde_json::Value::Bool(true) { "PASSED" } else { "FAILED" },
        r["backup_id"].as_str().unwrap_or("?"),
        r["restored_point"].as_str().unwrap_or("?"),
    );
    Ok(())
}

async fn manage(cfg: ControllerConfig, cmd: Manage) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let store = Store::connect(&cfg.store_url()?).await?;
    match cmd {
        Manage::DbSync => println!("store is up to date"),
        Manage::DrillKey => println!(
            "{}",
            coffer_controller::nats_auth::drill_key(&cfg.data_dir)?.public_key()
        ),
        Manage::NatsSetup => {
            let a = cfg
                .nats_auth
                .as_ref()
                .context("nats-setup needs a [nats_auth] section in the controller config")?;
            let auth = coffer_controller::nats_auth::Authority::load_or_create(a)?;
            auth.setup(&store.revocations().await?)?;
            println!("{}", a.dir.join("server-auth.conf").display());
        }
        Manage::DatastoreUpdate { name } => {
            let id = store.upsert_datastore(&name).await?;
            println!("datastore {name} ({id})");
        }
        Manage::DatastoreVersionUpdate {
            datastore,
            name,
            manager,
            version,
            inactive,
            root_on_create,
        } => {
            let id = store
                .upsert_version(
                    &datastore,
                    &name,
                    &manager,
                    &version,
                    !inactive,
                    root_on_create,
                )
                .await?;
            println!("datastore version {datastore} {name} ({id})");
        }
        Manage::DatastoreDefaultVersion { datastore, version } => {
            store.set_default_version(&datastore, &version).await?;
            println!("default version of {datastore} is {version}");
        }
        Manage::DatastoreParametersLoad {
            datastore,
            version,
            file,
        } => {
            let v = store.named_version(&datastore, &version).await?;
            let text = match &file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => v
                    .datastore()
                    .ok()
                    .and_then(|d| d.bundled_rules(&v.version))
                    .with_context(|| {
                        format!(
                            "no bundled parameters for {} {}; pass --file",
                            v.manager, v.version
                        )
                    })?
                    .to_string(),
            };
            let rules: coffer_common::config_rules::RulesFile =
                serde_json::from_str(&text).context("parsing the parameters file")?;
            store.load_params(&v.id, &rules.parameters).await?;
            println!(
                "{} configuration parameters loaded for {datastore} {version}",
                rules.parameters.len()
            );
        }
        Manage::FlavorCreate {
            id,
            name,
            ram_mb,
            vcpus,
            disk_gb,
        } => {
            store
                .upsert_flavor(&FlavorRow {
                    id: id.clone(),
                    name,
                    ram: ram_mb,
                    vcpus,
                    disk: disk_gb,
                })
                .await?;
            println!("flavor {id}");
        }
        Manage::VersionFlavorAdd(l) => l.set(&store, true).await?,
        Manage::EnrolmentTokenCreate {
            project,
            name,
            flavor,
            datastore,
            version,
            volume_size,
            ttl,
        } => {
            let v = store.named_version(&datastore, &version).await?;
            store
                .flavor(&flavor)
                .await?
                .with_context(|| format!("flavor '{flavor}' does not exist"))?;
            anyhow::ensure!(ttl >= 1, "--ttl must be at least 1 second");
            let t = coffer_controller::ops::enrol::create_token(
                &store,
                &coffer_controller::ops::enrol::TokenSpec {
                    project,
                    name,
                    version_id: v.id,
                    flavor_id: flavor,
                    volume_size,
                    instance_id: None,
                    ttl_s: ttl,
                },
            )
            .await?;
            eprintln!(
                "enrolment token {} (single use, expires in {ttl} s); on the host run:\n  \
                 coffer-agent enroll --controller URL --token-file FILE_WITH_THE_TOKEN",
                t.id
            );
            println!("{}", t.token);
        }
        Manage::VersionFlavorDelete(l) => l.set(&store, false).await?,
    }
    Ok(())
}

//! Controller configuration (TOML, unknown keys rejected) and the token file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// HTTP listen address, e.g. `127.0.0.1:8779`.
    pub listen: String,
    /// Directory holding the controller's keys (and the SQLite store, unless `[store]` names
    /// another).
    pub data_dir: PathBuf,
    /// This controller's name among those sharing a store (default: `<hostname>:<listen>`); it
    /// holds leases under it, so it must be unique and stay the same across restarts.
    pub controller_id: Option<String>,
    /// Where the controller's state lives (default: SQLite in `data_dir`).
    #[serde(default)]
    pub store: StoreConfig,
    /// NATS server URL.
    pub nats_url: String,
    /// Replicas of every JetStream stream Coffer creates (intents, events, each instance's
    /// objects): 1 on a single server, 3 on a three-node cluster (a stream then survives the
    /// loss of one node). Raised on existing streams at start.
    #[serde(default = "d::<1>")]
    pub nats_replicas: u64,
    /// The NATS URL handed to agents, when they reach NATS by another address than the
    /// controller (default: `nats_url`).
    pub agent_nats_url: Option<String>,
    /// The controller's own NATS credentials (a creds file), when the server requires them.
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) that signed the NATS server's certificate: connect with TLS.
    /// Handed to the agents too.
    pub nats_ca_file: Option<PathBuf>,
    /// Serve the API over HTTPS.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Issue a NATS identity per agent (decentralized JWT auth); see `manage nats-setup`.
    pub nats_auth: Option<crate::nats_auth::NatsAuthConfig>,
    /// Token file (TOML, `[[token]]` entries with `token`, `project`, `admin`).
    pub token_file: PathBuf,
    /// A heartbeat older than this marks the instance's agent lost (ERROR).
    #[serde(default = "d::<15>")]
    pub heartbeat_expiry_s: u64,
    /// Lease granted by each heartbeat reply.
    #[serde(default = "d::<6000>")]
    pub lease_ms: u64,
    /// A build that has not finished after this long ends in ERROR.
    #[serde(default = "d::<900>")]
    pub build_timeout_s: u64,
    /// A running backup whose agent has been silent (and whose record unchanged) this long ends
    /// FAILED.
    #[serde(default = "d::<300>")]
    pub backup_timeout_s: u64,
    /// How long a delete waits for the agent before tearing the instance down without it.
    #[serde(default = "d::<30>")]
    pub delete_grace_s: u64,
    /// On exit, ask every agent to stop its database cleanly and exit (the embedded demo does:
    /// its databases must not outlive it). Off by default: a controller restart touches nothing.
    #[serde(default)]
    pub stop_agents_on_exit: bool,
    /// Backup storage, keys and strategy, handed to every agent (none: backups are refused).
    pub backup: Option<coffer_common::backup::BackupConfig>,
    /// Start an instance's agent again when it has died (the process provisioner's agents are
    /// local processes). Off only to simulate hosts that are gone for good.
    #[serde(default = "default_true")]
    pub respawn_agents: bool,
    /// The datastore a create without `datastore` gets when several are registered (Trove's
    /// `default_datastore`); with one registered, that one.
    pub default_datastore: Option<String>,
    /// Replicas: strategy, limits, automatic failover.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// How agents are placed.
    pub provisioner: crate::provisioner::ProvisionerConfig,
}

/// `[replication]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// One of `Datastore::CONFIGURABLE_REPLICATION` (the first is the default), for new
    /// replicas of datastores that have a choice.
    pub strategy: String,
    /// Most replicas one create may ask for (`replica_count`).
    pub max_replicas: u32,
    /// Eject a source by itself when its heartbeat expires and it has replicas.
    pub auto_failover: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            strategy: coffer_proto::Datastore::CONFIGURABLE_REPLICATION[0].into(),
            max_replicas: 3,
            auto_failover: false,
        }
    }
}

/// `[store]`: `url = "sqlite:///var/lib/coffer/coffer.db"` or a shared server's URL
/// (`store::dialect`), whose password comes from `password_file` rather than the URL, so it
/// never sits in a config that is shown or copied.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl ControllerConfig {
    /// This controller's name ([`ControllerConfig::controller_id`]).
    pub fn controller_id(&self) -> String {
        self.controller_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), self.listen)
        })
    }

    /// The store's URL, with the password from `password_file` when one is set.
    pub fn store_url(&self) -> anyhow::Result<String> {
        let url = match &self.store.url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("coffer.db").display()),
        };
        let Some(file) = &self.store.password_file else {
            return Ok(url);
        };
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("reading the store password file {}", file.display()))?;
        let enc: String = password
            .trim_end_matches(['\r', '\n'])
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        match url.split_once("://") {
            Some((scheme, rest)) if rest.contains('@') && !rest.split('@').next().unwrap_or("").contains(':') => {
                let (user, host) = rest.split_once('@').unwrap_or_default();
                Ok(format!("{scheme}://{user}:{enc}@{host}"))
            }
            _ => bail!("[store] password_file needs a URL that names its user and no password (scheme://user@host/db)"),
        }
    }
}

fn default_true() -> bool {
    true
}

/// `N`, for `#[serde(default = "d::<N>")]`.
fn d<const N: u64>() -> u64 {
    N
}

impl ControllerConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading controller config {}", path.display()))?;
        let c: ControllerConfig = toml::from_str(&text)
            .with_context(|| format!("parsing controller config {}", path.display()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=5).contains(&self.nats_replicas) {
            bail!(
                "nats_replicas = {} is out of range: JetStream keeps 1 to 5 replicas of a stream (3 on a three-node cluster)",
                self.nats_replicas
            );
        }
        if self.nats_auth.is_none() {
            bail!(
                "[nats_auth] is required: every agent gets its own NATS identity (set dir = \
                 \"<controller data dir>/nats-auth\", then run `coffer-controller manage nats-setup`)"
            );
        }
        let interval = self.provisioner.heartbeat_interval_ms();
        if self.lease_ms + 2 * interval >= self.heartbeat_expiry_s * 1000 {
            bail!(
                "heartbeat_expiry_s ({} s) must exceed lease_ms ({} ms) + 2 x the agents' heartbeat interval ({} ms)",
                self.heartbeat_expiry_s,
                self.lease_ms,
                interval
            );
        }
        // Fencing: a source's lease runs from when it sent its last answered heartbeat, which is
        // never later than when the controller received it, so the source is read-only by
        // lease + watchdog tick + fence bound after the controller's last sight of it; the
        // controller may only declare it lost a margin after that.
        let fenced_by = self.lease_ms
            + coffer_proto::FENCE_WATCH_MS
            + coffer_proto::FENCE_BOUND_MS
            + coffer_proto::FENCE_MARGIN_MS;
        if fenced_by > self.heartbeat_expiry_s * 1000 {
            bail!(
                "heartbeat_expiry_s ({} s) must be at least lease_ms ({} ms) + the agents' fence bound ({} ms) + watchdog tick ({} ms) + margin ({} ms) = {} ms, so that a cut-off source is read-only before it is declared lost",
                self.heartbeat_expiry_s,
                self.lease_ms,
                coffer_proto::FENCE_BOUND_MS,
                coffer_proto::FENCE_WATCH_MS,
                coffer_proto::FENCE_MARGIN_MS,
                fenced_by
            );
        }
        let choices = coffer_proto::Datastore::CONFIGURABLE_REPLICATION;
        if !choices.contains(&self.replication.strategy.as_str()) {
            bail!(
                "replication.strategy '{}' is not one of {}",
                self.replication.strategy,
                choices.join(", ")
            );
        }
        Ok(())
    }
}

/// Who a token belongs to.
#[derive(Debug, Clone)]
pub struct Principal {
    pub project: String,
    pub admin: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: toml::Spanned<String>,
    project: String,
    #[serde(default)]
    admin: bool,
}

/// The API's tokens, kept as SHA-256 digests and compared in constant time (a lookup's duration
/// says nothing about how much of a guessed token was right).
pub struct Tokens {
    entries: Vec<([u8; 32], Principal)>,
}

fn digest(token: &str) -> [u8; 32] {
    openssl::sha::sha256(token.as_bytes())
}

impl Tokens {
    /// The principal a token belongs to. Every entry is compared, whatever matched.
    pub fn lookup(&self, token: &str) -> Option<&Principal> {
        let d = digest(token);
        let mut found = None;
        for (h, p) in &self.entries {
            if openssl::memcmp::eq(h, &d) {
                found = Some(p);
            }
        }
        found
    }

    /// Tokens from the text of a token file; an entry that is malformed, too short, or repeats an
    /// earlier token is an error naming its line.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let f: TokenFile = toml::from_str(text)?;
        let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
        let mut entries: Vec<([u8; 32], Principal)> = vec![];
        let mut lines: Vec<usize> = vec![];
        for t in f.token {
            let line = line_of(t.token.span().start);
            let token = t.token.into_inner();
            if token.len() < 16 {
                bail!(
                    "line {line}: the token for project {} is shorter than 16 characters",
                    t.project
                );
            }
            if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
                bail!("line {line}: a token may not hold white space or control characters");
            }
            if t.project.is_empty() || !coffer_proto::subjects::valid_token(&t.project) {
                bail!(
                    "line {line}: project '{}' is not a valid project id",
                    t.project
                );
            }
            let d = digest(&token);
            if let Some(i) = entries.iter().position(|(h, _)| *h == d) {
                bail!(
                    "line {line}: this token repeats the one on line {}; every token must be unique",
                    lines[i]
                );
            }
            entries.push((
                d,
                Principal {
                    project: t.project,
                    admin: t.admin,
                },
            ));
            lines.push(line);
        }
        Ok(Tokens { entries })
    }
}

/// Loads the token file; any malformed or repeated entry stops the controller with its line.
pub fn load_tokens(path: &Path) -> anyhow::Result<Tokens> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    Tokens::parse(&text).with_context(|| format!("token file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(expiry: u64, lease: u64, hb: u64) -> String {
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nnats_url = \"nats://x\"\ntoken_file = \"/t\"\n\
             heartbeat_expiry_s = {expiry}\nlease_ms = {lease}\n[nats_auth]\ndir = \"/n\"\n[provisioner]\nkind = \"process\"\n\
             agent_binary = \"/a\"\ninstances_dir = \"/i\"\nport_min = 1\nport_max = 2\nheartbeat_interval_ms = {hb}\n"
        )
    }

    #[test]
    fn expiry_must_exceed_lease_plus_two_intervals() {
        let ok: ControllerConfig = toml::from_str(&cfg(15, 6000, 2000)).unwrap();
        ok.validate().unwrap();
        let bad: ControllerConfig = toml::from_str(&cfg(10, 6000, 2000)).unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("heartbeat_expiry_s"), "{err}");
    }

    #[test]
    fn expiry_leaves_room_for_the_fence() {
        // The test kit's settings: 1000 + 50 + 2000 + 500 <= 4000.
        let ok: ControllerConfig = toml::from_str(&cfg(4, 1000, 500)).unwrap();
        ok.validate().unwrap();
        // 3 s passes the interval rule (1000 + 2 x 500 < 3000) but not the fence's.
        let bad: ControllerConfig = toml::from_str(&cfg(3, 1000, 500)).unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("fence bound") && err.contains("3550 ms"),
            "{err}"
        );
    }

    #[test]
    fn token_files_are_checked_line_by_line() {
        let good = "[[token]]\ntoken = \"aaaaaaaaaaaaaaaa1\"\nproject = \"p1\"\n\n\
                    [[token]]\ntoken = \"bbbbbbbbbbbbbbbb2\"\nproject = \"p2\"\nadmin = true\n";
        let t = Tokens::parse(good).unwrap();
        assert_eq!(t.lookup("aaaaaaaaaaaaaaaa1").unwrap().project, "p1");
        assert!(t.lookup("bbbbbbbbbbbbbbbb2").unwrap().admin);
        assert!(t.lookup("aaaaaaaaaaaaaaaa").is_none());
        let dup = format!("{good}\n[[token]]\ntoken = \"aaaaaaaaaaaaaaaa1\"\nproject = \"p3\"\n");
        let err = format!("{:#}", Tokens::parse(&dup).err().unwrap());
        assert!(err.contains("line 11") && err.contains("line 2"), "{err}");
        let short = "[[token]]\ntoken = \"short\"\nproject = \"p\"\n";
        let err = format!("{:#}", Tokens::parse(short).err().unwrap());
        assert!(err.contains("line 2") && err.contains("shorter"), "{err}");
        let malformed = "[[token]]\ntoken = \"aaaaaaaaaaaaaaaa1\"\nproject = p\n";
        let err = format!("{:#}", Tokens::parse(malformed).err().unwrap());
        assert!(err.contains("line 3"), "{err}");
        let bad_project = "[[token]]\ntoken = \"aaaaaaaaaaaaaaaa1\"\nproject = \"a/b\"\n";
        assert!(Tokens::parse(bad_project).is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = cfg(15, 6000, 2000).replace("lease_ms", "lease_msec");
        assert!(toml::from_str::<ControllerConfig>(&text).is_err());
    }
}

//! Enrolment of a host the controller did not provision (a deb/rpm install on an existing database
//! host, or a VM booted from the guest image): the agent makes and saves its key pair, then trades
//! a one-time token for its instance id and NATS identity (`POST /v1.0/agents/enrol`).
//!
//! Idempotent: the key is saved before the controller is contacted and the token binds to it, so
//! a retry (a lost answer, a reboot) gets the same instance and credentials. The answer is written
//! to `<state_dir>/enrolment.toml`, which [`crate::config::effective_table`] merges under the
//! operator's own config; the NATS creds arrive sealed to the agent's key.

use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::ENROLMENT_FILE;

/// Where and how to enrol.
pub struct Request {
    pub controller_url: String,
    /// The one-time token (a secret: never logged).
    pub token: String,
    pub ca_file: Option<PathBuf>,
    /// How long to keep retrying while the controller is unreachable.
    pub patience: Duration,
    /// Whether a plain-http controller is allowed.
    pub insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    enrolment: Enrolment,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Enrolment {
    instance_id: String,
    nats_url: String,
    nats_creds_sealed: Option<String>,
    nats_ca: Option<String>,
    heartbeat_interval_ms: u64,
    datastore: Option<String>,
    backup_toml: Option<String>,
}

#[derive(Deserialize)]
struct Fault {
    #[serde(flatten)]
    body: std::collections::HashMap<String, serde_json::Value>,
}

/// The instance id this state dir is enrolled as, if any.
pub fn enrolled_as(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join(ENROLMENT_FILE)).ok()?;
    let t: toml::Table = toml::from_str(&text).ok()?;
    t.get("instance_id")?.as_str().map(str::to_string)
}

/// Enrols this host (the effective config table: state dir and `[listen]`); returns the instance
/// id. Already enrolled: returns the recorded id without contacting the controller.
pub async fn enrol(table: &toml::Table, req: &Request) -> anyhow::Result<String> {
    let state_dir = PathBuf::from(
        table
            .get("state_dir")
            .and_then(|v| v.as_str())
            .context("state_dir")?,
    );
    if let Some(id) = enrolled_as(&state_dir) {
        info!(instance = %id, "already enrolled");
        return Ok(id);
    }
    check_scheme(&req.controller_url, req.insecure)?;
    let listen = table.get("listen").and_then(|v| v.as_table());
    let bind = listen
        .and_then(|l| l.get("bind_address"))
        .and_then(|v| v.as_str())
        .unwrap_or("0.0.0.0")
        .to_string();
    let port = listen
        .and_then(|l| l.get("port"))
        .and_then(|v| v.as_integer())
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .context("[listen] port must be 1-65535")?;
    // A database already serving the port is not ours to take over.
    let probe = if bind == "0.0.0.0" || bind == "::" {
        "127.0.0.1".to_string()
    } else {
        bind.clone()
    };
    if let Some(addr) = (probe.as_str(), port).to_socket_addrs()?.next() {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            bail!(
                "port {port} on this host already has a server listening (a database not run by \
                 Coffer?). Coffer's agent runs its own database: stop that server (systemctl \
                 disable --now <its service>) or set [listen] port to a free port, then enrol \
                 again"
            );
        }
    }
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // The key pair first: the token binds to it on first use.
    let (secret, public) = crate::state::load_or_create_key(&state_dir)?;
    let url = format!(
        "{}/v1.0/agents/enrol",
        req.controller_url.trim_end_matches('/')
    );
    let host = match listen
        .and_then(|l| l.get("advertise_host"))
        .and_then(|v| v.as_str())
    {
        Some(h) => h.to_string(),
        None if bind != "0.0.0.0" && bind != "::" => bind.clone(),
        None => outbound_address(&req.controller_url).unwrap_or_else(|| "127.0.0.1".into()),
    };
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(ca) = &req.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let client = client.build()?;
    let body = serde_json::json!({
        "token": req.token,
        "public_key": coffer_proto::seal::to_hex(&public),
        "host": host,
        "port": port,
    });
    let deadline = Instant::now() + req.patience;
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_secs(1), Duration::from_secs(10));
    let answer: Answer = loop {
        let outcome = client.post(&url).json(&body).send().await;
        let retry_why = match outcome {
            Ok(r) if r.status().is_success() => {
                break r.json().await.context("reading the enrolment answer")?
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!(
                    "the controller refused the enrolment ({status}): {}",
                    fault_message(&text)
                );
            }
            Ok(r) => format!("the controller answered {}", r.status()),
            Err(e) => format!("the controller is unreachable: {e}"),
        };
        let wait = coffer_common::retry::next(&mut backoff);
        if Instant::now() + wait > deadline {
            bail!(
                "{retry_why} (tried for {} s); check --controller and the network",
                req.patience.as_secs()
            );
        }
        warn!(url = %url, "{retry_why}; retrying in {:.1} s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    };
    let e = answer.enrolment;
    if !coffer_proto::subjects::valid_token(&e.instance_id) {
        bail!("the controller sent an invalid instance id");
    }
    let mut out = toml::Table::new();
    out.insert("instance_id".into(), e.instance_id.clone().into());
    out.insert("nats_url".into(), e.nats_url.into());
    out.insert(
        "heartbeat_interval_ms".into(),
        (e.heartbeat_interval_ms as i64).into(),
    );
    if let Some(sealed) = &e.nats_creds_sealed {
        let sealed = coffer_proto::seal::from_hex(sealed).context("sealed creds are not hex")?;
        let creds = coffer_proto::seal::open(
            &secret,
            &coffer_proto::seal::enrolment_creds_context(&e.instance_id),
            &sealed,
        )
        .map_err(|e| anyhow::anyhow!("opening the NATS creds sealed to this agent: {e}"))?;
        let path = state_dir.join("nats.creds");
        coffer_strategies::fsutil::write_atomic(&path, &creds, 0o600)?;
        out.insert("nats_creds".into(), path.display().to_string().into());
    }
    if let Some(ca) = &e.nats_ca {
        let path = state_dir.join("nats-ca.pem");
        coffer_strategies::fsutil::write_atomic(&path, ca.as_bytes(), 0o644)?;
        out.insert("nats_ca_file".into(), path.display().to_string().into());
    }
    if !table.contains_key("datastore") {
        let mut ds = toml::Table::new();
        ds.insert(
            "kind".into(),
            e.datastore
                .unwrap_or_else(|| coffer_proto::Datastore::DEFAULT.id().into())
                .into(),
        );
        out.insert("datastore".into(), toml::Value::Table(ds));
    }
    if let Some(b) = &e.backup_toml {
        // Only the [backup] table: nothing else the answer holds reaches the agent's config.
        let mut b: toml::Table = toml::from_str(b).context("the controller's [backup] table")?;
        if let Some(extra) = b.keys().find(|k| *k != "backup") {
            bail!("the controller's answer sets '{extra}', which enrolment does not apply");
        }
        if let Some(v) = b.remove("backup") {
            out.insert("backup".into(), v);
        }
    }
    let text = format!(
        "# Written by `coffer-agent enroll`: this host's identity, assigned by the controller.\n\
         # The agent's own config ({}) overrides anything here.\n{}",
        "/etc/coffer/agent.toml",
        toml::to_string(&out)?
    );
    coffer_strategies::fsutil::write_atomic(
        &state_dir.join(ENROLMENT_FILE),
        text.as_bytes(),
        0o600,
    )?;
    hand_over(&state_dir)?;
    info!(instance = %e.instance_id, "enrolled");
    Ok(e.instance_id)
}

/// An `https` controller, or `http` only when allowed.
fn check_scheme(url: &str, insecure: bool) -> anyhow::Result<()> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") || (insecure && lower.starts_with("http://")) {
        return Ok(());
    }
    if lower.starts_with("http://") {
        bail!(
            "the controller {url} is plain http: the one-time token would cross the network in \
             the clear. Use its https address (with --ca-file for a private CA), or pass \
             --insecure (insecure = true in [enrol]) for a controller on this host or a private link"
        );
    }
    bail!("the controller URL {url} must start with https:// (or http:// with --insecure)")
}

/// Run as root (an administrator's `coffer-agent enroll`), the files go to the service's user:
/// the owner of the state dir's parent (`/var/lib/coffer`, made by the package).
fn hand_over(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Some(parent) = state_dir.parent() else {
        return Ok(());
    };
    let m = std::fs::metadata(parent)?;
    if m.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (
        Some(nix::unistd::Uid::from_raw(m.uid())),
        Some(nix::unistd::Gid::from_raw(m.gid())),
    );
    for p in [
        state_dir.to_path_buf(),
        state_dir.join("agent.key"),
        state_dir.join("nats.creds"),
        state_dir.join("nats-ca.pem"),
        state_dir.join(ENROLMENT_FILE),
    ] {
        if p.exists() {
            nix::unistd::chown(&p, uid, gid)
                .with_context(|| format!("handing {} to the coffer user", p.display()))?;
        }
    }
    Ok(())
}

/// The local address this host uses to reach the controller (no packet is sent).
fn outbound_address(controller_url: &str) -> Option<String> {
    let rest = controller_url.split("://").nth(1)?;
    let hostport = rest.split('/').next()?;
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let target = addr.to_socket_addrs().ok()?.next()?;
    let sock = UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

/// The message of a Trove-format error body (`{"badRequest": {"message": ...}}`).
fn fault_message(text: &str) -> String {
    serde_json::from_str::<Fault>(text)
        .ok()
        .and_then(|f| {
            f.body.values().find_map(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| text.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_controller_needs_insecure() {
        assert!(check_scheme("https://c.example:8779", false).is_ok());
        let err = check_scheme("http://c.example:8779", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--insecure"), "{err}");
        assert!(check_scheme("http://127.0.0.1:8779", true).is_ok());
        assert!(check_scheme("ftp://c.example", true).is_err());
        assert!(check_scheme("HTTPS://C.EXAMPLE", false).is_ok());
    }
}

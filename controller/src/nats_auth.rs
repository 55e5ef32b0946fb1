//! Per-agent NATS identities with the server's decentralized JWT authentication.
//!
//! The controller holds an operator key, the `COFFER` account key (which signs user JWTs) and a
//! system account key, as nkey seeds in 0600 files under `nats_auth.dir`. `manage nats-setup`
//! writes the server's part of the configuration (operator JWT, system account, a `full` resolver
//! preloaded with both account JWTs) and the controller's own credentials.
//!
//! Every placed agent gets its own user JWT that allows only its own subjects: heartbeats and
//! events for its instance, calls to its instance, its own durable consumer on the intent stream,
//! and replies on its own inbox prefix `_INBOX.<instance>`. Deleting the instance revokes the user
//! in the account JWT (the revocations live in the store, shared by every controller), which the
//! controller pushes to the server through the system account; the server then disconnects it
//! and refuses it from then on (the `full` resolver keeps that across restarts, and passes it to
//! the cluster's other servers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use coffer_proto::subjects;
use nkeys::KeyPair;
use serde::Deserialize;
use serde_json::{json, Value};

/// `[nats_auth]` in the controller config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuthConfig {
    /// Directory of the authority's keys (0600) and the files `nats-setup` writes.
    pub dir: PathBuf,
}

pub struct Authority {
    dir: PathBuf,
    operator: KeyPair,
    account: KeyPair,
    system: KeyPair,
    /// The object store bucket agents may use for backups, if any.
    backup_bucket: Option<String>,
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn load_or_create(dir: &Path, name: &str, make: fn() -> KeyPair) -> anyhow::Result<KeyPair> {
    let p = dir.join(format!("{name}.nk"));
    if let Ok(seed) = std::fs::read_to_string(&p) {
        return KeyPair::from_seed(seed.trim())
            .with_context(|| format!("{} holds no valid seed", p.display()));
    }
    let kp = make();
    write_private(&p, &kp.seed().context("encoding a seed")?)?;
    Ok(kp)
}

/// The controller's restore drill signing key (Ed25519, `drill.nk` in `dir`, 0600), created on
/// first use: `coffer-controller manage drill-key` prints its public half, which
/// `coffer-controller drill-verify` checks reports against.
pub fn drill_key(dir: &Path) -> anyhow::Result<KeyPair> {
    load_or_create(dir, "drill", KeyPair::new_account)
}

/// The controller's X25519 key pair (`controller.key` in `dir`, 0600), created on first use.
/// Agents seal secrets in their replies to its public half (`Call.reply_key`).
pub fn controller_key(dir: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let path = dir.join("controller.key");
    let secret = match std::fs::read_to_string(&path) {
        Ok(t) => coffer_proto::seal::from_hex(t.trim())
            .with_context(|| format!("{} does not hold a hex key", path.display()))?,
        Err(_) => {
            let (secret, _) = coffer_proto::seal::generate()?;
            write_private(&path, &coffer_proto::seal::to_hex(&secret))?;
            secret
        }
    };
    let public = coffer_proto::seal::public_of(&secret)?;
    Ok((secret, public))
}

/// Encodes and signs a JWT the way nats-server expects (`ed25519-nkey`), expiring at `exp` (Unix
/// seconds) when given.
fn encode_jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: Value,
    exp: Option<i64>,
) -> anyhow::Result<String> {
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": coffer_proto::now_unix_s(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    if let Some(exp) = exp {
        claims["exp"] = json!(exp);
    }
    let payload = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let sig = issuer
        .sign(signing_input.as_bytes())
        .context("signing a JWT")?;
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

/// A creds file (user JWT + seed) in the format NATS clients read.
fn creds(jwt: &str, user: &KeyPair) -> anyhow::Result<String> {
    Ok(format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        user.seed().context("encoding a seed")?
    ))
}

/// The most subscriptions one agent's connection may hold (it needs its call subject, its inbox
/// and a few consumers' deliveries).
pub const AGENT_MAX_SUBS: i64 = 64;
/// The largest message one agent may publish (the server refuses more): a backup's chunks and
/// the largest call answers fit well inside it.
pub const AGENT_MAX_PAYLOAD: i64 = 1 << 20;

/// How long a restore grant lets its holder read the chain it names.
pub const RESTORE_GRANT_TTL_S: i64 = 6 * 3600;

/// What one agent may publish and subscribe to; with backups in NATS (`bucket`), also its own
/// instance's stream: publishing its objects and reading them back by subject, nothing else
/// (no listing, purging, deleting or consumers; another instance's objects need a grant).
pub fn agent_permissions(instance: &str, bucket: Option<&str>) -> (Vec<String>, Vec<String>) {
    let s = subjects::INTENT_STREAM;
    let c = subjects::agent_consumer(instance);
    let mut publish = vec![
        subjects::heartbeat(instance),
        subjects::event(instance),
        format!("$JS.API.STREAM.INFO.{s}"),
        format!("$JS.API.CONSUMER.INFO.{s}.{c}"),
        format!(
            "$JS.API.CONSUMER.CREATE.{s}.{c}.{}",
            subjects::intent(instance)
        ),
        format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{c}"),
        format!("$JS.ACK.{s}.{c}.>"),
    ];
    if let Some(b) = bucket {
        publish.extend(coffer_common::storage::nats::agent_publish_permissions(
            b, instance,
        ));
    }
    let subscribe = vec![
        subjects::call(instance),
        format!("{}.>", subjects::agent_inbox_prefix(instance)),
    ];
    (publish, subscribe)
}

impl Authority {
    pub fn load_or_create(cfg: &NatsAuthConfig) -> anyhow::Result<Authority> {
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("creating {}", cfg.dir.display()))?;
        crate::private(&cfg.dir, 0o700)?;
        Ok(Authority {
            dir: cfg.dir.clone(),
            operator: load_or_create(&cfg.dir, "operator", KeyPair::new_operator)?,
            account: load_or_create(&cfg.dir, "account", KeyPair::new_account)?,
            system: load_or_create(&cfg.dir, "system", KeyPair::new_account)?,
            backup_bucket: None,
        })
    }

    /// Lets agents use the backup bucket `bucket` of the NATS object store.
    pub fn with_backup_bucket(mut self, bucket: Option<String>) -> Self {
        self.backup_bucket = bucket;
        self
    }

    /// Revocations an older controller kept in the authority directory (`revocations.json`),
    /// to be moved into the store once.
    pub fn legacy_revocations(&self) -> BTreeMap<String, i64> {
        std::fs::read_to_string(self.dir.join("revocations.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Marks the legacy revocations file as moved into the store.
    pub fn legacy_revocations_moved(&self) -> std::io::Result<()> {
        std::fs::rename(
            self.dir.join("revocations.json"),
            self.dir.join("revocations.json.in-store"),
        )
    }

    /// An account's claims (`jetstream`: with JetStream limits).
    fn account_claims(jetstream: bool) -> Value {
        let mut limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                                "wildcards": true, "conn": -1, "leaf": -1});
        if jetstream {
            for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[k] = json!(-1);
            }
        }
        json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2})
    }

    /// The COFFER account JWT with the revocations `rev` (every one so far, from the store:
    /// always pushed whole).
    pub fn account_jwt(&self, rev: &BTreeMap<String, i64>) -> anyhow::Result<String> {
        let mut nats = Self::account_claims(true);
        if !rev.is_empty() {
            nats["revocations"] = json!(rev);
        }
        let key = self.account.public_key();
        encode_jwt(&self.operator, &key, "COFFER", nats, None)
    }

    fn system_jwt(&self) -> anyhow::Result<String> {
        let nats = Self::account_claims(false);
        encode_jwt(&self.operator, &self.system.public_key(), "SYS", nats, None)
    }

    /// The server's part of the configuration (revocations `rev` preloaded).
    pub fn server_config(&self, rev: &BTreeMap<String, i64>) -> anyhow::Result<String> {
        let op = encode_jwt(
            &self.operator,
            &self.operator.public_key(),
            "coffer-operator",
            json!({"system_account": self.system.public_key(), "type": "operator", "version": 2}),
            None,
        )?;
        Ok(format!(
            "# Written by coffer-controller manage nats-setup.\n\
             operator: {op}\n\
             system_account: {sys}\n\
             resolver: {{ type: full, dir: {jwt_dir:?}, allow_delete: false, interval: \"2m\", timeout: \"1.9s\" }}\n\
             resolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
            sys = self.system.public_key(),
            jwt_dir = self.dir.join("jwt").display().to_string(),
            sys_jwt = self.system_jwt()?,
            acc = self.account.public_key(),
            acc_jwt = self.account_jwt(rev)?,
        ))
    }

    /// A new user `name` of `issuer`'s account: `(creds file text, user public key)`.
    fn user(
        &self,
        issuer: &KeyPair,
        name: &str,
        nats: Value,
        exp: Option<i64>,
    ) -> anyhow::Result<(String, String)> {
        let user = KeyPair::new_user();
        let jwt = encode_jwt(issuer, &user.public_key(), name, nats, exp)?;
        Ok((creds(&jwt, &user)?, user.public_key()))
    }

    /// Credentials of a user that may do anything within `issuer`'s account.
    fn plain_user(&self, issuer: &KeyPair, name: &str) -> anyhow::Result<String> {
        let nats = json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
        Ok(self.user(issuer, name, nats, None)?.0)
    }

    /// Credentials of the controller itself (anything within the COFFER account).
    pub fn controller_creds(&self) -> anyhow::Result<String> {
        self.plain_user(&self.account, "coffer-controller")
    }

    /// Credentials in the system account (pushing account JWTs). Only the controller has them.
    pub fn system_creds(&self) -> anyhow::Result<String> {
        self.plain_user(&self.system, "coffer-system")
    }

    /// A new identity for one instance's agent: `(creds file text, user public key)`.
    pub fn agent_creds(&self, instance: &str) -> anyhow::Result<(String, String)> {
        if !subjects::valid_token(instance) {
            bail!("instance id '{instance}' cannot be a subject token");
        }
        let (publish, subscribe) = agent_permissions(instance, self.backup_bucket.as_deref());
        let nats = json!({
            "pub": {"allow": publish}, "sub": {"allow": subscribe},
            "resp": {"max": 1, "ttl": 60_000_000_000u64},
            "subs": AGENT_MAX_SUBS, "data": -1, "payload": AGENT_MAX_PAYLOAD,
            "type": "user", "version": 2,
        });
        self.user(&self.account, &format!("agent-{instance}"), nats, None)
    }

    /// Short-lived credentials that may read exactly `objects` (owner, key) of the NATS storage
    /// `bucket` by direct get, for the agent of `instance` (replies on its inbox prefix): a
    /// restore's grant to another instance's chain. Expires after [`RESTORE_GRANT_TTL_S`].
    pub fn restore_grant(
        &self,
        instance: &str,
        bucket: &str,
        objects: &[(String, String)],
    ) -> anyhow::Result<String> {
        if !subjects::valid_token(instance) {
            bail!("instance id '{instance}' cannot be a subject token");
        }
        // A point-in-time restore reads its source's archive: one permission for all of it
        // (its segments are many; a permission each would not fit a connection's first line).
        let mut publish: Vec<String> = objects
            .iter()
            .map(|(owner, key)| {
                if key.starts_with(coffer_common::archive::PREFIX) {
                    coffer_common::storage::nats::archive_read_permission(bucket, owner)
                } else {
                    coffer_common::storage::nats::object_read_permission(bucket, owner, key)
                }
            })
            .collect();
        publish.sort();
        publish.dedup();
        let nats = json!({
            "pub": {"allow": publish},
            "sub": {"allow": [format!("{}.>", subjects::agent_inbox_prefix(instance))]},
            "subs": 8, "data": -1, "payload": 4096,
            "type": "user", "version": 2,
        });
        let name = format!("restore-grant-{instance}");
        let exp = coffer_proto::now_unix_s() + RESTORE_GRANT_TTL_S;
        Ok(self.user(&self.account, &name, nats, Some(exp))?.0)
    }

    /// Writes the server config and the controller's and system's creds into the auth dir.
    pub fn setup(&self, rev: &BTreeMap<String, i64>) -> anyhow::Result<()> {
        write_private(
            &self.dir.join("server-auth.conf"),
            &self.server_config(rev)?,
        )?;
        write_private(
            &self.dir.join("controller.creds"),
            &self.controller_creds()?,
        )?;
        write_private(&self.dir.join("system.creds"), &self.system_creds()?)?;
        Ok(())
    }

    /// Sends the account JWT with the revocations `rev` to the servers
    /// (`$SYS.REQ.ACCOUNT.<acc>.CLAIMS.UPDATE`; a cluster's `full` resolvers pass it on).
    pub async fn push_account(
        &self,
        nats_url: &str,
        ca: Option<&Path>,
        rev: &BTreeMap<String, i64>,
    ) -> anyhow::Result<()> {
        let mut opts = async_nats::ConnectOptions::with_credentials(&self.system_creds()?)
            .context("reading system creds")?;
        if let Some(ca) = ca {
            opts = opts
                .add_root_certificates(ca.to_path_buf())
                .require_tls(true);
        }
        let sys = opts
            .name("coffer-controller-system")
            .connect(coffer_common::nats::servers(nats_url)?)
            .await
            .context("connecting to NATS as the system account")?;
        let subject = format!(
            "$SYS.REQ.ACCOUNT.{}.CLAIMS.UPDATE",
            self.account.public_key()
        );
        let reply = sys
            .request(subject, self.account_jwt(rev)?.into())
            .await
            .context("pushing the account JWT")?;
        let text = String::from_utf8_lossy(&reply.payload).to_string();
        if !text.contains("\"code\":200") {
            bail!("the server refused the account JWT: {text}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_verify_with_their_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(&NatsAuthConfig {
            dir: dir.path().to_path_buf(),
        })
        .unwrap();
        let jwt = a.account_jwt(&BTreeMap::new()).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = data_encoding::BASE64URL_NOPAD
            .decode(parts[2].as_bytes())
            .unwrap();
        a.operator
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        let claims: Value = serde_json::from_slice(
            &data_encoding::BASE64URL_NOPAD
                .decode(parts[1].as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["nats"]["limits"]["streams"], -1);
        // Keys persist.
        let b = Authority::load_or_create(&NatsAuthConfig {
            dir: dir.path().to_path_buf(),
        })
        .unwrap();
        assert_eq!(a.account.public_key(), b.account.public_key());
        let (creds, user) = a.agent_creds("inst-1").unwrap();
        assert!(creds.contains("BEGIN NATS USER JWT") && creds.ends_with("*\n"));
        assert!(user.starts_with('U'));
        assert!(a.agent_creds("a.b").is_err());
    }

    #[test]
    fn agents_are_confined_to_their_own_subjects() {
        let (p, s) = agent_permissions("inst-77", None);
        let shared: Vec<_> = p.iter().filter(|x| !x.contains("inst-77")).collect();
        assert_eq!(shared, vec!["$JS.API.STREAM.INFO.COFFER_INTENTS"], "{p:?}");
        assert!(s.iter().all(|x| x.contains("inst-77")), "{s:?}");
        assert!(
            !p.iter()
                .chain(s.iter())
                .any(|x| x.contains('*') || x == ">"),
            "no wildcards across instances"
        );
        // With backups in NATS: its own instance's stream, and nothing of anyone else's.
        let (p, _) = agent_permissions("inst-77", Some("coffer-backups"));
        let extra: Vec<_> = p.iter().filter(|x| !x.contains("COFFER_INTENTS")).collect();
        assert!(extra.iter().any(|x| x.contains("coffer-backups")));
        assert!(extra.iter().all(|x| x.contains("inst-77")), "{extra:?}");
        assert!(!p.iter().any(|x| x.contains("PURGE")
            || x.contains("STREAM.DELETE")
            || x.contains("MSG.DELETE")
            || x.contains("CONSUMER.CREATE.CFS")
            || x.contains('*')));
    }

    #[test]
    fn a_restore_grant_reads_exactly_its_chain_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(&NatsAuthConfig {
            dir: dir.path().to_path_buf(),
        })
        .unwrap();
        let objects = vec![
            ("src-1".to_string(), "b1.json".to_string()),
            ("src-1".to_string(), "b1.cfbk".to_string()),
        ];
        let creds = a.restore_grant("dst-2", "bk", &objects).unwrap();
        let jwt = creds.lines().nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &data_encoding::BASE64URL_NOPAD
                .decode(jwt.split('.').nth(1).unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
        let exp = claims["exp"].as_i64().unwrap();
        assert!(
            exp > coffer_proto::now_unix_s()
                && exp <= coffer_proto::now_unix_s() + RESTORE_GRANT_TTL_S
        );
        let publish: Vec<&str> = claims["nats"]["pub"]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(publish.len(), 2);
        assert!(
            publish
                .iter()
                .all(|p| p.starts_with("$JS.API.DIRECT.GET.CFS_bk_src-1.cfs.bk.src-1.")),
            "{publish:?}"
        );
        assert_eq!(
            claims["nats"]["sub"]["allow"],
            json!([format!("{}.>", subjects::agent_inbox_prefix("dst-2"))])
        );
        assert!(a.restore_grant("a.b", "bk", &objects).is_err());
    }
}

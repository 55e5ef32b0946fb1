//! Enrolment: a host the controller did not provision (a deb/rpm install on an existing machine)
//! or a VM booted from the guest image joins with a one-time token.
//!
//! An administrator creates the token (`coffer-controller manage enrolment-token-create` or
//! `POST /v1.0/{project}/mgmt/enrolment-tokens`); only its SHA-256 is stored. The agent makes its
//! key pair first, then calls `POST /v1.0/agents/enrol` with the token and its public key: the
//! first use binds the token to that key, creates the instance (a host) or completes it (a VM),
//! and answers with the instance id and the agent's NATS identity sealed to the agent's key. A
//! retry with the same key gets the same answer; another key, or an expired token, is refused.

use coffer_proto::seal;
use serde::{Deserialize, Serialize};

use super::instances::{commit_new, Commit, NewInstance, TokenBinding};
use crate::error::ApiError;
use crate::store::{Store, TokenRow};
use crate::App;

/// What an enrolled agent is told: its instance, where NATS is, and its creds sealed to its key.
#[derive(Debug, Serialize)]
pub struct Enrolment {
    pub instance_id: String,
    pub nats_url: String,
    pub nats_creds_sealed: Option<String>,
    pub nats_ca: Option<String>,
    pub heartbeat_interval_ms: u64,
    pub datastore: Option<String>,
    pub backup_toml: Option<String>,
}

/// Tokens are `coffer-enrol-` + 32 random bytes in hex.
pub const TOKEN_PREFIX: &str = "coffer-enrol-";

/// What a token enrols into.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub project: String,
    pub name: String,
    pub version_id: String,
    pub flavor_id: String,
    pub volume_size: i64,
    /// The instance being placed (a VM); `None` for a host, whose instance is made at first use.
    pub instance_id: Option<String>,
    pub ttl_s: i64,
}

/// A token as created: the secret is shown once.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub token: String,
    pub expires_unix: i64,
}

fn hash(token: &str) -> String {
    seal::to_hex(&openssl::sha::sha256(token.as_bytes()))
}

/// A Unix time in RFC 3339, as the API shows expiries.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Creates a one-time token.
pub async fn create_token(store: &Store, spec: &TokenSpec) -> anyhow::Result<NewToken> {
    let mut secret = [0u8; 32];
    openssl::rand::rand_bytes(&mut secret)?;
    let token = format!("{TOKEN_PREFIX}{}", seal::to_hex(&secret));
    let id = uuid::Uuid::new_v4().to_string();
    let expires_unix = coffer_proto::now_unix_s() + spec.ttl_s;
    let row = TokenRow {
        id: id.clone(),
        project: spec.project.clone(),
        name: spec.name.clone(),
        version_id: spec.version_id.clone(),
        flavor_id: spec.flavor_id.clone(),
        volume_size: spec.volume_size,
        instance_id: spec.instance_id.clone(),
        public_key: None,
        creds_sealed: None,
        expires_unix,
    };
    store.insert_token(&row, &hash(&token)).await?;
    Ok(NewToken {
        id,
        token,
        expires_unix,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolReq {
    pub token: String,
    pub public_key: String,
    /// Where clients reach the database (the host's address as the agent sees it).
    pub host: String,
    pub port: u16,
}

async fn token_row(app: &App, token: &str) -> anyhow::Result<Option<TokenRow>> {
    app.store.token_by_hash(&hash(token)).await
}

fn creds_context(token_id: &str) -> String {
    format!("coffer enrolment creds v1 token={token_id}")
}

/// `POST /v1.0/agents/enrol`: the token is the authorisation.
pub async fn enrol(app: &App, req: EnrolReq) -> Result<Enrolment, ApiError> {
    let key = seal::from_hex(&req.public_key)
        .filter(|k| k.len() == 32)
        .ok_or_else(|| ApiError::bad_request("public_key must be 64 hex digits (X25519)."))?;
    if req.port == 0 || req.host.is_empty() || req.host.len() > 255 {
        return Err(ApiError::bad_request(
            "host and port must name where clients reach the database.",
        ));
    }
    let unknown = || {
        ApiError::unauthorized(
            "This enrolment token is not known. Ask an administrator for a new one \
             (coffer-controller manage enrolment-token-create).",
        )
    };
    if !req.token.starts_with(TOKEN_PREFIX) {
        return Err(unknown());
    }
    let row = token_row(app, &req.token).await?.ok_or_else(unknown)?;
    match &row.public_key {
        Some(bound) if *bound != req.public_key => {
            return Err(ApiError::forbidden(
                "This enrolment token was already used by another host (tokens are single-use). \
                 Ask an administrator for a new one.",
            ))
        }
        Some(_) if bound_to(app, &row, &req.public_key).await? => {
            return answer(app, &row, &key).await
        }
        // Claimed by this key, but the first use was cut short (the controller died before
        // its binding committed): this retry finishes it.
        Some(_) => return finish(app, &row, &req, &key).await,
        None => {}
    }
    if row.expires_unix < coffer_proto::now_unix_s() {
        return Err(ApiError::unauthorized(format!(
            "This enrolment token expired at {}. Ask an administrator for a new one.",
            rfc3339(row.expires_unix)
        )));
    }
    // Claim the token for this key (one winner among concurrent first uses).
    let claimed = app.store.claim_token(&row.id, &req.public_key).await?;
    if !claimed {
        // Lost a race: answer as a retry would (or refuse another key).
        let again = token_row(app, &req.token).await?.ok_or_else(unknown)?;
        if again.public_key.as_deref() != Some(req.public_key.as_str()) {
            return Err(ApiError::forbidden(
                "This enrolment token was already used by another host (tokens are single-use).",
            ));
        }
        return wait_answer(app, &req.token, &key).await;
    }
    let done = finish(app, &row, &req, &key).await;
    if done.is_err() {
        // Release the claim: the same host may retry.
        let _ = app
            .store
            .release_token(&row.id, row.instance_id.as_deref())
            .await;
    }
    done
}

/// Whether the token's instance holds this agent's key: the binding committed (the key and
/// the token's record of it are written in one transaction).
async fn bound_to(app: &App, row: &TokenRow, public_key: &str) -> Result<bool, ApiError> {
    Ok(match &row.instance_id {
        Some(id) => app
            .store
            .instance(id)
            .await?
            .is_some_and(|r| r.agent_public_key == public_key),
        None => false,
    })
}

/// Binds a claimed token and answers.
async fn finish(
    app: &App,
    row: &TokenRow,
    req: &EnrolReq,
    key: &[u8],
) -> Result<Enrolment, ApiError> {
    bind(app, row, req, key).await?;
    let row = token_row(app, &req.token)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the enrolment token vanished"))?;
    answer(app, &row, key).await
}

/// First use: issues the agent's NATS identity and creates (host) or completes (VM) the
/// instance, with the token's record of it in the same transaction.
async fn bind(app: &App, row: &TokenRow, req: &EnrolReq, key: &[u8]) -> Result<(), ApiError> {
    let id = row
        .instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (creds, nats_user) = super::agent_creds(app, &id)?;
    let creds_sealed = creds
        .map(|c| seal::seal(&app.reply_public_key, &creds_context(&row.id), c.as_bytes()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("sealing the creds: {e}"))?;
    let binding = TokenBinding {
        token_id: row.id.clone(),
        creds_sealed,
    };
    if row.instance_id.is_some() {
        // A VM the controller booted: its build (the `vm_build` workflow) waits for this key.
        let done = app
            .store
            .enrol_vm(
                &id,
                &seal::to_hex(key),
                &nats_user,
                &binding.token_id,
                binding.creds_sealed.as_deref(),
            )
            .await?;
        app.wake_workflows();
        if !done {
            return Err(ApiError::conflict(format!(
                "Instance {id} is gone or enrolled by another agent."
            )));
        }
    } else {
        if let Some(other) = app.store.live_instances().await?.into_iter().find(|r| {
            r.host.as_deref() == Some(req.host.as_str()) && r.port == Some(req.port as i64)
        }) {
            return Err(ApiError::conflict(format!(
                "{}:{} is already instance {}; delete it first or enrol with another [listen] port.",
                req.host, req.port, other.id
            )));
        }
        let version = app
            .store
            .version(&row.version_id)
            .await?
            .ok_or_else(|| ApiError::bad_request("The token's datastore version is gone."))?;
        let flavor = app
            .store
            .flavor(&row.flavor_id)
            .await?
            .ok_or_else(|| ApiError::bad_request("The token's flavor is gone."))?;
        let n = NewInstance {
            id: id.clone(),
            project: row.project.clone(),
            name: row.name.clone(),
            flavor,
            volume_size: row.volume_size,
            databases: vec![],
            users: vec![],
            restore_from: None,
            overrides: vec![],
            modules: vec![],
            configuration: None,
            // An enrolled host's root stays disabled until someone enables it (the password
            // could not be shown to anyone).
            root_password: None,
            version,
            throwaway: false,
        };
        commit_new(
            app,
            &n,
            key,
            &nats_user,
            (&req.host, req.port),
            Commit::Insert(crate::status::PlacedBy::Enrolled, Some(binding)),
        )
        .await?;
        app.wake_outbox();
    }
    Ok(())
}

/// A retry that raced the first use: waits briefly for it to finish.
async fn wait_answer(app: &App, token: &str, key: &[u8]) -> Result<Enrolment, ApiError> {
    for _ in 0..50 {
        if let Some(r) = token_row(app, token).await? {
            if bound_to(app, &r, &seal::to_hex(key)).await? {
                return answer(app, &r, key).await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(in_progress())
}

fn in_progress() -> ApiError {
    ApiError::conflict("This token's enrolment is still in progress; retry in a few seconds.")
}

/// The enrolment answer: the instance, where NATS is, and the agent's creds sealed to its key.
async fn answer(app: &App, row: &TokenRow, key: &[u8]) -> Result<Enrolment, ApiError> {
    let Some(id) = &row.instance_id else {
        return Err(in_progress());
    };
    let creds_sealed = match &row.creds_sealed {
        Some(c) => {
            let creds = seal::open(&app.reply_secret_key, &creds_context(&row.id), c)
                .map_err(|e| anyhow::anyhow!("opening the kept creds: {e}"))?;
            Some(seal::to_hex(
                &seal::seal(key, &seal::enrolment_creds_context(id), &creds)
                    .map_err(|e| anyhow::anyhow!("sealing the creds: {e}"))?,
            ))
        }
        None => None,
    };
    let version = app.store.version(&row.version_id).await?;
    let nats_ca = app.cfg.nats_ca_file.as_ref().map(|p| {
        std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading the NATS CA {}: {e}", p.display()))
    });
    Ok(Enrolment {
        instance_id: id.clone(),
        nats_url: super::agent_nats_url(app),
        nats_creds_sealed: creds_sealed,
        nats_ca: nats_ca.transpose()?,
        heartbeat_interval_ms: app.provisioner.heartbeat_interval_ms(),
        datastore: version.map(|v| v.manager),
        backup_toml: super::instances::agent_backup_toml(app)?,
    })
}

//! Enrolment: a host the controller did not provision (a deb/rpm install on an existing machine)
//! or a VM booted from the guest image joins with a one-time token.
//!
//! An administrator creates the token (`coffer-controller manage enrolment-token-create` or
//! `POST /v1.0/{project}/mgmt/enrolment-tokens`); only its SHA-256 is stored. The agent makes its
//! key pair first, then calls `POST /v1.0/agents/enrol` with the token and its public key: the
//! first use binds the token to that key, creates the instance (a host) or completes it (a VM),
//! and answers with the instance id and the agent's NATS identity sealed to the agent's key. A
//! retry with the same key gets the same answer; another key, or an expired token, is refused.

use axum::body::Bytes;
use axum::extract::Path;
use coffer_proto::seal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::instances::{commit_new, Commit, NewInstance};
use super::{ok, parse_body, ApiError, ApiResult, AppState, Caller};
use crate::store::{self, Store};
use crate::App;

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

fn now_unix() -> i64 {
    coffer_proto::now_unix_ms() / 1000
}

/// Creates a one-time token.
pub async fn create_token(store: &Store, spec: &TokenSpec) -> anyhow::Result<NewToken> {
    let mut secret = [0u8; 32];
    openssl::rand::rand_bytes(&mut secret)?;
    let token = format!("{TOKEN_PREFIX}{}", seal::to_hex(&secret));
    let id = uuid::Uuid::new_v4().to_string();
    let expires_unix = now_unix() + spec.ttl_s;
    sqlx::query(
        "INSERT INTO enrolment_tokens (id, token_hash, project_id, name, datastore_version_id, \
         flavor_id, volume_size, instance_id, created, expires_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(hash(&token))
    .bind(&spec.project)
    .bind(&spec.name)
    .bind(&spec.version_id)
    .bind(&spec.flavor_id)
    .bind(spec.volume_size)
    .bind(&spec.instance_id)
    .bind(store::now())
    .bind(expires_unix)
    .execute(&store.pool)
    .await?;
    Ok(NewToken {
        id,
        token,
        expires_unix,
    })
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `POST /v1.0/{project}/mgmt/enrolment-tokens` (admin):
/// `{"enrolment_token": {"name", "flavorRef", "volume": {"size"}, "datastore": {"type", "version"}, "ttl"}}`.
pub async fn create(st: AppState, c: Caller, Path(_p): Path<String>, body: Bytes) -> ApiResult {
    if !c.admin {
        return Err(ApiError::forbidden(
            "Creating enrolment tokens is an administrator's action (admin role required).",
        ));
    }
    let body = parse_body(&body)?;
    let t = match body.get("enrolment_token") {
        Some(Value::Object(o)) => o,
        _ => {
            return Err(ApiError::validation(
                "'enrolment_token' is a required property",
            ))
        }
    };
    const KEYS: &[&str] = &[
        "name",
        "flavorRef",
        "volume",
        "datastore",
        "ttl",
        "project_id",
    ];
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::validation(format!(
            "enrolment_token Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let name = match t.get("name") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(ApiError::validation(
                "enrolment_token['name'] is a required string",
            ))
        }
    };
    super::instances::check_name("Instance name", &name, 255)?;
    let flavor = match t.get("flavorRef") {
        Some(Value::String(s)) => Some(s.rsplit('/').next().unwrap_or(s).to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
    .ok_or_else(|| ApiError::validation("enrolment_token['flavorRef'] is required"))?;
    let flavor =
        st.store.flavor(&flavor).await?.ok_or_else(|| {
            ApiError::bad_request(format!("Flavor '{flavor}' could not be found."))
        })?;
    let volume_size = t
        .get("volume")
        .and_then(|v| v.get("size"))
        .and_then(Value::as_i64)
        .unwrap_or(1);
    if !(1..=10_000).contains(&volume_size) {
        return Err(ApiError::validation(
            "enrolment_token['volume']['size'] must be 1-10000",
        ));
    }
    let ds = t.get("datastore");
    let version = super::instances::resolve_version(
        &st,
        ds.and_then(|d| d.get("type")).and_then(Value::as_str),
        ds.and_then(|d| d.get("version")).and_then(Value::as_str),
    )
    .await?;
    let ttl = match t.get("ttl") {
        None | Some(Value::Null) => 3600,
        Some(v) => v
            .as_i64()
            .filter(|n| (60..=7 * 86_400).contains(n))
            .ok_or_else(|| {
                ApiError::validation("enrolment_token['ttl'] must be 60-604800 seconds")
            })?,
    };
    let project = match t.get("project_id") {
        Some(Value::String(p)) => p.clone(),
        _ => c.project.clone(),
    };
    let spec = TokenSpec {
        project,
        name: name.clone(),
        version_id: version.id.clone(),
        flavor_id: flavor.id.clone(),
        volume_size,
        instance_id: None,
        ttl_s: ttl,
    };
    let tok = create_token(&st.store, &spec).await?;
    ok(json!({"enrolment_token": {
        "id": tok.id,
        "name": name,
        "token": tok.token,
        "tenant_id": spec.project,
        "expires": rfc3339(tok.expires_unix),
        "datastore": {"type": version.datastore_name, "version": version.name},
        "flavor": {"id": flavor.id},
        "volume": {"size": volume_size},
    }}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolReq {
    token: String,
    public_key: String,
    /// Where clients reach the database (the host's address as the agent sees it).
    host: String,
    port: u16,
}

struct TokenRow {
    id: String,
    project: String,
    name: String,
    version_id: String,
    flavor_id: String,
    volume_size: i64,
    instance_id: Option<String>,
    public_key: Option<String>,
    creds_sealed: Option<Vec<u8>>,
    expires_unix: i64,
}

async fn token_row(app: &App, token: &str) -> anyhow::Result<Option<TokenRow>> {
    use sqlx::Row;
    let r = sqlx::query("SELECT * FROM enrolment_tokens WHERE token_hash = ?")
        .bind(hash(token))
        .fetch_optional(&app.store.pool)
        .await?;
    Ok(r.map(|r| TokenRow {
        id: r.get("id"),
        project: r.get("project_id"),
        name: r.get("name"),
        version_id: r.get("datastore_version_id"),
        flavor_id: r.get("flavor_id"),
        volume_size: r.get("volume_size"),
        instance_id: r.get("instance_id"),
        public_key: r.get("public_key"),
        creds_sealed: r.get("creds_sealed"),
        expires_unix: r.get("expires_unix"),
    }))
}

fn creds_context(token_id: &str) -> String {
    format!("coffer enrolment creds v1 token={token_id}")
}

/// `POST /v1.0/agents/enrol`: the token is the authorisation.
pub async fn enrol(st: AppState, body: Bytes) -> ApiResult {
    let req: EnrolReq = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid enrolment request: {e}")))?;
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
    let row = token_row(&st, &req.token).await?.ok_or_else(unknown)?;
    match &row.public_key {
        Some(bound) if *bound != req.public_key => {
            return Err(ApiError::forbidden(
                "This enrolment token was already used by another host (tokens are single-use). \
                 Ask an administrator for a new one.",
            ))
        }
        Some(_) => return answer(&st, &row, &key).await,
        None => {}
    }
    if row.expires_unix < now_unix() {
        return Err(ApiError::unauthorized(format!(
            "This enrolment token expired at {}. Ask an administrator for a new one.",
            rfc3339(row.expires_unix)
        )));
    }
    // Claim the token for this key (one winner among concurrent first uses).
    let claimed = sqlx::query(
        "UPDATE enrolment_tokens SET public_key = ?, used_at = ? WHERE id = ? AND public_key IS NULL",
    )
    .bind(&req.public_key)
    .bind(store::now())
    .bind(&row.id)
    .execute(&st.store.pool)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        // Lost a race: answer as a retry would (or refuse another key).
        let again = token_row(&st, &req.token).await?.ok_or_else(unknown)?;
        if again.public_key.as_deref() != Some(req.public_key.as_str()) {
            return Err(ApiError::forbidden(
                "This enrolment token was already used by another host (tokens are single-use).",
            ));
        }
        return wait_answer(&st, &req.token, &key).await;
    }
    match bind(&st, &row, &req, &key).await {
        Ok(()) => {
            let row = token_row(&st, &req.token).await?.ok_or_else(unknown)?;
            answer(&st, &row, &key).await
        }
        Err(e) => {
            // Release the claim: the same host may retry.
            let _ = sqlx::query(
                "UPDATE enrolment_tokens SET public_key = NULL, used_at = NULL, instance_id = ? \
                 WHERE id = ?",
            )
            .bind(&row.instance_id)
            .bind(&row.id)
            .execute(&st.store.pool)
            .await;
            Err(e)
        }
    }
}

/// First use: issues the agent's NATS identity and creates (host) or completes (VM) the instance.
async fn bind(app: &App, row: &TokenRow, req: &EnrolReq, key: &[u8]) -> Result<(), ApiError> {
    let id = row
        .instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (creds, nats_user) = match &app.authority {
        Some(a) => {
            let (c, u) = a.agent_creds(&id)?;
            (Some(c), u)
        }
        None => (None, String::new()),
    };
    let creds_sealed = match &creds {
        Some(c) => Some(
            seal::seal(&app.reply_public_key, &creds_context(&row.id), c.as_bytes())
                .map_err(|e| anyhow::anyhow!("sealing the creds: {e}"))?,
        ),
        None => None,
    };
    if row.instance_id.is_some() {
        // A VM the controller booted: its build waits for this key.
        let done = sqlx::query(
            "UPDATE instances SET agent_public_key = ?, agent_nats_user = ?, updated = ? \
             WHERE id = ? AND deleted = 0 AND agent_public_key = ''",
        )
        .bind(seal::to_hex(key))
        .bind(&nats_user)
        .bind(store::now())
        .bind(&id)
        .execute(&app.store.pool)
        .await?
        .rows_affected();
        if done != 1 {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "conflict",
                format!("Instance {id} is gone or already enrolled."),
            ));
        }
    } else {
        if let Some(other) = app.store.live_instances().await?.into_iter().find(|r| {
            r.host.as_deref() == Some(req.host.as_str()) && r.port == Some(req.port as i64)
        }) {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "conflict",
                format!(
                    "{}:{} is already instance {}; delete it first or enrol with another [listen] port.",
                    req.host, req.port, other.id
                ),
            ));
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
        };
        commit_new(
            app,
            &n,
            key,
            &nats_user,
            (&req.host, req.port),
            Commit::Insert("enrolled"),
        )
        .await?;
        app.outbox_wake.notify_one();
    }
    sqlx::query("UPDATE enrolment_tokens SET instance_id = ?, creds_sealed = ? WHERE id = ?")
        .bind(&id)
        .bind(&creds_sealed)
        .bind(&row.id)
        .execute(&app.store.pool)
        .await?;
    Ok(())
}

/// A retry that raced the first use: waits briefly for it to finish.
async fn wait_answer(app: &App, token: &str, key: &[u8]) -> ApiResult {
    for _ in 0..50 {
        if let Some(r) = token_row(app, token).await? {
            if r.instance_id.is_some() && (r.creds_sealed.is_some() || app.authority.is_none()) {
                return answer(app, &r, key).await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "conflict",
        "This token's enrolment is still in progress; retry in a few seconds.",
    ))
}

/// The enrolment answer: the instance, where NATS is, and the agent's creds sealed to its key.
async fn answer(app: &App, row: &TokenRow, key: &[u8]) -> ApiResult {
    let Some(id) = &row.instance_id else {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "conflict",
            "This token's enrolment is still in progress; retry in a few seconds.",
        ));
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
    let nats_ca = match &app.cfg.nats_ca_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading the NATS CA {}: {e}", p.display()))?,
        ),
        None => None,
    };
    ok(json!({"enrolment": {
        "instance_id": id,
        "nats_url": app.cfg.agent_nats_url.clone().unwrap_or_else(|| app.cfg.nats_url.clone()),
        "nats_creds_sealed": creds_sealed,
        "nats_ca": nats_ca,
        "heartbeat_interval_ms": app.provisioner.heartbeat_interval_ms(),
        "datastore": version.map(|v| v.manager),
        "backup_toml": super::instances::agent_backup_toml(app)?,
    }}))
}

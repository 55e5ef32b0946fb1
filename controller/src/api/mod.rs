//! The OpenStack Database API v1.0 (Trove wire format): routes, authentication, errors.
//!
//! Errors always use Trove's one-key body (`{"badRequest": {"code": 400, "message": "..."}}`),
//! the framework's own included (body too large, unparsable query, a body not declared JSON);
//! unknown routes and wrong methods are 404 `itemNotFound`, as in Trove.

mod access;
pub(crate) mod backups;
mod catalog;
pub(crate) mod configurations;
mod drills;
pub mod enrol;
pub(crate) mod instances;
mod logs;
mod metrics;
mod modules;
mod parse;
mod quotas;
pub mod replicas;
mod schedules;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::App;

pub use crate::error::ApiError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ self.key: { "code": self.status.as_u16(), "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// 200 with a JSON body.
pub fn ok(v: Value) -> ApiResult {
    Ok((StatusCode::OK, Json(v)).into_response())
}

/// 202 with an empty body (but a JSON content type, as Trove sends).
pub fn accepted() -> ApiResult {
    empty(StatusCode::ACCEPTED)
}

/// `status` with an empty body and a JSON content type.
pub fn empty(status: StatusCode) -> ApiResult {
    Ok((status, [(header::CONTENT_TYPE, "application/json")], "").into_response())
}

pub use crate::ops::Caller;

impl Caller {
    /// `https://HOST/v1.0/{p}/{resource}/{id}` and the bookmark form, as Trove renders them.
    pub fn links(&self, resource: &str, id: &str) -> Value {
        json!([
            {"href": format!("https://{}/v1.0/{}/{}/{}", self.host, self.project, resource, id), "rel": "self"},
            {"href": format!("https://{}/{}/{}", self.host, resource, id), "rel": "bookmark"},
        ])
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "The request you have made requires authentication: no X-Auth-Token header.",
                )
            })?;
        let principal = app.tokens.lookup(token).ok_or_else(|| {
            ApiError::unauthorized(
                "The request you have made requires authentication: the token is not valid.",
            )
        })?;
        let project = parts
            .uri
            .path()
            .trim_start_matches('/')
            .split('/')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if project != principal.project && !principal.admin {
            return Err(ApiError::forbidden(format!(
                "User with tenant id {} cannot access this resource.",
                principal.project
            )));
        }
        Ok(Caller {
            project,
            admin: principal.admin,
            host: host_of(&parts.headers),
        })
    }
}

fn host_of(h: &HeaderMap) -> String {
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_string()
}

/// The largest request body the API reads (a larger one is a 413 `overLimit`).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The most users, databases (or other items) one request may name; more is a 413 before
/// anything is stored. Everything a request names travels in one intent, which must stay well
/// inside NATS's message size.
pub const MAX_ITEMS_PER_REQUEST: usize = 100;

/// Refuses a list longer than [`MAX_ITEMS_PER_REQUEST`].
pub fn check_count(what: &str, n: usize) -> Result<(), ApiError> {
    if n > MAX_ITEMS_PER_REQUEST {
        return Err(ApiError::over_limit(format!(
            "{what} names {n} items; one request may name at most {MAX_ITEMS_PER_REQUEST}. Send them in several requests."
        )));
    }
    Ok(())
}

/// Whether a header map declares a JSON body (`application/json`, parameters allowed).
fn declares_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether a request carries a body at all.
fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// Trove's fault key for a status the handlers do not produce themselves (webob's class name
/// without `HTTP`, first letter lower-cased).
fn fault_key(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 | 405 => "itemNotFound",
        409 => "conflict",
        413 => "overLimit",
        415 => "unsupportedMediaType",
        422 => "unprocessableEntity",
        501 => "notImplemented",
        s if s >= 500 => "instanceFault",
        _ => "badRequest",
    }
}

/// Counts each request by its route template (never an id) and times it.
async fn counted(axum::extract::State(app): AppState, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Methods are bounded too: a client may send any token as one.
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD => req.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let t = std::time::Instant::now();
    // One trace per request: the intents it queues carry it to the agents.
    let tp = crate::telemetry::request_trace(
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let span = tracing::info_span!(
        "request",
        trace_id = crate::telemetry::trace_id(&tp).unwrap_or_default()
    );
    let mut resp = tracing::Instrument::instrument(
        crate::telemetry::in_trace(tp.clone(), next.run(req)),
        span,
    )
    .await;
    if let Ok(v) = tp.parse() {
        resp.headers_mut().insert("traceparent", v);
    }
    app.telemetry.request(
        &method,
        &route,
        resp.status().as_u16(),
        t.elapsed().as_secs_f64(),
    );
    resp
}

/// Every request and answer passes here: a body must be declared JSON (415 otherwise, nothing
/// done), and any error the framework answers by itself (body too large, a query or path it could
/// not parse) is rewritten into Trove's one-key JSON body, so clients meet one error format.
async fn trove_errors(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && has_body(req.headers())
        && !declares_json(req.headers())
    {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupportedMediaType",
            "The request body must be JSON: send it with 'Content-Type: application/json'.",
        )
        .into_response();
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || declares_json(resp.headers()) {
        return resp;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("The request body is larger than the {MAX_BODY_BYTES} bytes the API accepts.")
        }
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            "The resource could not be found.".to_string()
        }
        _ => {
            let body = axum::body::to_bytes(resp.into_body(), 4096)
                .await
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body).trim().to_string();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("The request could not be handled.")
                    .to_string()
            } else {
                format!("{text}.")
            }
        }
    };
    let status = if status == StatusCode::METHOD_NOT_ALLOWED {
        StatusCode::NOT_FOUND
    } else {
        status
    };
    ApiError::new(status, fault_key(status), message).into_response()
}

/// Characters that must not stand in a name or description shown to people: control characters
/// (NUL, newline, escape, ...), bidirectional overrides, embeddings, isolates and marks (which
/// make a name read differently from what it is), line/paragraph separators and zero-width ones.
pub fn hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks a free-text field (instance, backup, configuration or module name or description):
/// at most `max` bytes and no [`hidden_char`].
pub fn check_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.len() > max {
        return Err(ApiError::validation(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if let Some(c) = s.chars().find(|c| hidden_char(*c)) {
        return Err(ApiError::validation(format!(
            "{what} holds the character U+{:04X}: control and bidirectional-formatting characters are not allowed",
            c as u32
        )));
    }
    Ok(())
}

/// Parses a request body as a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "Malformed request body: expected a JSON object.",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "Malformed request body: {e}."
        ))),
    }
}

/// `?limit=&marker=` of list routes.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Page {
    pub limit: Option<String>,
    pub marker: Option<String>,
}

/// `?limit=` of a list: a positive integer, 20 when not given.
pub fn limit_of(limit: Option<&str>) -> Result<usize, ApiError> {
    let Some(s) = limit else { return Ok(20) };
    s.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request(format!("limit must be a positive integer, not '{s}'."))
    })
}

/// What a list answer needs for its `next` link: the limit asked and the next marker, if any.
pub struct NextPage {
    limit: Option<String>,
    marker: Option<String>,
}

impl Page {
    /// Slices `items` (already ordered) after the marker; returns the page and its [`NextPage`].
    pub fn apply<T>(
        self,
        items: Vec<T>,
        id: impl Fn(&T) -> String,
    ) -> Result<(Vec<T>, NextPage), ApiError> {
        let limit = limit_of(self.limit.as_deref())?.min(1000);
        let start = match &self.marker {
            None => 0,
            Some(m) => items
                .iter()
                .position(|x| id(x) == *m)
                .map_or(items.len(), |p| p + 1),
        };
        let total = items.len();
        let page: Vec<T> = items.into_iter().skip(start).take(limit).collect();
        let marker = page.last().map(&id).filter(|_| start + page.len() < total);
        let limit = self.limit;
        Ok((page, NextPage { limit, marker }))
    }

    /// A page read from the store by `read(marker, n)`, which returns up to `n` items after the
    /// marker (one more than the limit is asked for, to know whether a next page exists).
    pub async fn fetch<T, F, Fut>(
        self,
        read: F,
        id: impl Fn(&T) -> String,
    ) -> Result<(Vec<T>, NextPage), ApiError>
    where
        F: FnOnce(Option<String>, usize) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<T>>>,
    {
        let limit = limit_of(self.limit.as_deref())?.min(1000);
        let mut page = read(self.marker.clone(), limit + 1).await?;
        let more = page.len() > limit;
        page.truncate(limit);
        let marker = page.last().map(&id).filter(|_| more);
        Ok((
            page,
            NextPage {
                limit: self.limit,
                marker,
            },
        ))
    }
}

impl NextPage {
    /// 200 with `body`, plus `links: [{rel: next}]` when there is a next page.
    pub fn wrap(self, caller: &Caller, resource: &str, mut body: Value) -> ApiResult {
        if let Some(m) = self.marker {
            let limit = self.limit.unwrap_or_else(|| "20".into());
            body["links"] = json!([{
                "rel": "next",
                "href": format!("https://{}/v1.0/{}/{}?limit={}&marker={}", caller.host, caller.project, resource, limit, m),
            }]);
        }
        ok(body)
    }
}

/// The v1.0 version document.
fn v1_doc(h: &HeaderMap) -> Value {
    json!({
        "id": "v1.0", "status": "CURRENT", "updated": "2012-08-01T00:00:00Z",
        "links": [{"rel": "self", "href": format!("http://{}/v1.0/", host_of(h))}],
    })
}

async fn versions(headers: HeaderMap) -> Json<Value> {
    Json(json!({"versions": [v1_doc(&headers)]}))
}

async fn version(headers: HeaderMap) -> Json<Value> {
    Json(json!({"version": v1_doc(&headers)}))
}

async fn not_found() -> ApiError {
    ApiError::not_found("The resource could not be found.")
}

/// The whole API.
pub fn router(app: Arc<App>) -> Router {
    let p = |path: &str| format!("/v1.0/{{project}}{path}");
    Router::new()
        .route("/", get(versions))
        .route("/v1.0", get(version))
        .route("/v1.0/", get(version))
        .route("/metrics", get(metrics::scrape))
        .route("/v1.0/agents/enrol", post(enrol::enrol))
        .route(&p("/mgmt/enrolment-tokens"), post(enrol::create))
        .route(&p("/flavors"), get(catalog::list_flavors))
        .route(&p("/flavors/{id}"), get(catalog::show_flavor))
        .route(&p("/datastores"), get(catalog::list_datastores))
        .route(
            &p("/datastores/versions/{vid}"),
            get(catalog::show_version_by_id),
        )
        .route(&p("/datastores/{ds}"), get(catalog::show_datastore))
        .route(&p("/datastores/{ds}/versions"), get(catalog::list_versions))
        .route(
            &p("/datastores/{ds}/versions/{v}"),
            get(catalog::show_version),
        )
        .route(
            &p("/datastores/{ds}/versions/{v}/flavors"),
            get(catalog::version_flavors),
        )
        .route(
            &p("/instances"),
            get(instances::list).post(instances::create),
        )
        .route(&p("/instances/detail"), get(instances::list))
        .route(
            &p("/instances/{id}"),
            get(instances::show)
                .put(instances::update)
                .patch(instances::update)
                .delete(instances::delete),
        )
        .route(&p("/instances/{id}/action"), post(instances::action))
        .route(
            &p("/instances/{id}/databases"),
            get(access::list_databases).post(access::create_databases),
        )
        .route(
            &p("/instances/{id}/databases/{name}"),
            get(access::show_database).delete(access::delete_database),
        )
        .route(
            &p("/instances/{id}/users"),
            get(access::list_users)
                .post(access::create_users)
                .put(access::change_passwords),
        )
        .route(
            &p("/instances/{id}/users/{user}"),
            get(access::show_user)
                .put(access::update_user)
                .delete(access::delete_user),
        )
        .route(
            &p("/instances/{id}/users/{user}/databases"),
            get(access::list_access).put(access::grant_access),
        )
        .route(
            &p("/instances/{id}/users/{user}/databases/{db}"),
            delete(access::revoke_access),
        )
        .route(
            &p("/instances/{id}/root"),
            get(access::root_show)
                .post(access::root_enable)
                .delete(access::root_disable),
        )
        .route(
            &p("/mgmt/quotas/{project_id}"),
            get(quotas::show).put(quotas::update),
        )
        .route(&p("/limits"), get(quotas::limits))
        .route(&p("/backups"), get(backups::list).post(backups::create))
        .route(
            &p("/backup_schedules"),
            get(schedules::list).post(schedules::create),
        )
        .route(
            &p("/restore_drills"),
            get(drills::list).post(drills::create),
        )
        .route(&p("/restore_drills/{id}"), get(drills::show))
        .route(
            &p("/backup_schedules/{id}"),
            get(schedules::show).delete(schedules::delete),
        )
        .route(
            &p("/backups/{id}"),
            get(backups::show).delete(backups::delete),
        )
        .route(
            &p("/instances/{id}/backups"),
            get(backups::list_for_instance),
        )
        .route(
            &p("/instances/{id}/configuration"),
            get(configurations::instance_default),
        )
        .route(
            &p("/instances/{id}/log"),
            get(logs::list).post(logs::action),
        )
        .route(&p("/modules"), get(modules::list).post(modules::create))
        .route(
            &p("/modules/{id}"),
            get(modules::show)
                .put(modules::update)
                .delete(modules::delete),
        )
        .route(&p("/modules/{id}/instances"), get(modules::instances))
        .route(
            &p("/instances/{id}/modules"),
            get(modules::instance_list).post(modules::instance_apply),
        )
        .route(
            &p("/instances/{id}/modules/{mid}"),
            delete(modules::instance_remove),
        )
        .route(&p("/instances/{id}/log/{name}/tail"), get(logs::tail))
        .route(
            &p("/configurations"),
            get(configurations::list).post(configurations::create),
        )
        .route(
            &p("/configurations/{id}"),
            get(configurations::show)
                .put(configurations::update)
                .patch(configurations::update)
                .delete(configurations::delete),
        )
        .route(
            &p("/configurations/{id}/instances"),
            get(configurations::instances),
        )
        .route(
            &p("/datastores/{ds}/versions/{v}/parameters"),
            get(configurations::list_params),
        )
        .route(
            &p("/datastores/{ds}/versions/{v}/parameters/{name}"),
            get(configurations::show_param),
        )
        .route(
            &p("/datastores/versions/{vid}/parameters"),
            get(configurations::list_params),
        )
        .route(
            &p("/datastores/versions/{vid}/parameters/{name}"),
            get(configurations::show_param),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn(trove_errors))
        .layer(middleware::from_fn_with_state(app.clone(), counted))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Shorthand for handlers.
pub type AppState = State<Arc<App>>;
/// `/v1.0/{project}/{resource}/{id}`: the project and one id.
pub type ItemPath = Path<(String, String)>;
/// An item's sub-item (`.../{id}/users/{user}`): the project, the id and the sub-item's.
pub type SubPath = Path<(String, String, String)>;
/// A sub-item's sub-item (`.../{id}/users/{user}/databases/{db}`).
pub type SubSubPath = Path<(String, String, String, String)>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A text accepted for a name or description holds no hidden character and fits.
        #[test]
        fn accepted_texts_hold_nothing_hidden(s in "\\PC{0,40}|.{0,40}|[\\x00-\\x1f\\u{200b}-\\u{206f}a-z]{0,20}") {
            match check_text("name", &s, 255) {
                Ok(()) => prop_assert!(!s.chars().any(hidden_char) && s.len() <= 255),
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    // The refusal never echoes the text back.
                    prop_assert!(s.is_empty() || !e.message.contains(&s) || s.chars().all(|c| c.is_ascii_alphanumeric()));
                }
            }
        }

        /// Any hidden character anywhere makes the text refused.
        #[test]
        fn a_hidden_character_anywhere_is_refused(
            before in "[a-z ]{0,10}", after in "[a-z ]{0,10}",
            hidden in prop_oneof![Just('\u{0}'), Just('\n'), Just('\u{1b}'), Just('\u{202e}'),
                                  Just('\u{2066}'), Just('\u{200f}'), Just('\u{feff}'), Just('\u{2028}')],
        ) {
            let s = format!("{before}{hidden}{after}");
            prop_assert!(check_text("name", &s, 255).is_err());
        }

        /// Database and user names the controller accepts use only the plain alphabet.
        #[test]
        fn accepted_identifiers_are_plain(s in "\\PC{0,90}|[a-zA-Z0-9_.$-]{0,90}") {
            if parse::check_name("user", &s, 80).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= 80);
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c)));
            }
        }
    }

    #[test]
    fn framework_statuses_get_trove_keys() {
        assert_eq!(fault_key(StatusCode::PAYLOAD_TOO_LARGE), "overLimit");
        assert_eq!(
            fault_key(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "unsupportedMediaType"
        );
        assert_eq!(fault_key(StatusCode::METHOD_NOT_ALLOWED), "itemNotFound");
        assert_eq!(
            fault_key(StatusCode::INTERNAL_SERVER_ERROR),
            "instanceFault"
        );
    }
}

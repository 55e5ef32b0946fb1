//! The controller's one error type: what went wrong, already in Trove's terms (status, fault
//! key, message). The domain and workflow layers return it; the API renders it
//! (`api::trove_errors`), so the mapping to Trove's errors lives in one place.

use axum::http::StatusCode;
use tracing::error;

/// An API error in Trove's format.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub key: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, key: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            key,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "badRequest", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "itemNotFound", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessableEntity", m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    pub fn over_limit(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "overLimit", m)
    }
    pub fn not_implemented(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "notImplemented", m)
    }
    pub fn validation(m: impl std::fmt::Display) -> Self {
        Self::bad_request(format!("Validation error: {m}"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if let Some(t) = e.downcast_ref::<crate::store::IntentTooLarge>() {
            return Self::over_limit(format!("{t}."));
        }
        let id = uuid::Uuid::new_v4();
        error!(error_id = %id, error = %format!("{e:#}"), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "instanceFault",
            format!("Internal Server Error. Please keep this ID to help us figure out what went wrong: ({id})."),
        )
    }
}

impl From<crate::store::Owned> for ApiError {
    fn from(o: crate::store::Owned) -> Self {
        ApiError::unprocessable(format!(
            "Instance {} is busy with another operation (workflow {}); retry once it ends.",
            o.instance, o.workflow
        ))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

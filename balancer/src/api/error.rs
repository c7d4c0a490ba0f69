//! The API's one error type: a stable code, a human message, the right status.
//!
//! Every failure — a rejected body, a bad path, a refused token, a store conflict — leaves as
//! `{"error": {"code", "message"}}`. Internal details (SQL, paths) are logged, never returned.

use crate::store::StoreError;
use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::validate::Invalid;
use allot_http::json::JsonRejection;
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A failed API call.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// Overrides the code's usual status where HTTP has a more precise one (413, 405).
    status: Option<StatusCode>,
    /// With `not_leader`: where the leader of what was asked is reached.
    leader_url: Option<String>,
}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
            leader_url: None,
        }
    }

    /// The same error naming where the leader is reached (an empty URL names none).
    pub fn with_leader_url(mut self, url: Option<String>) -> Self {
        self.leader_url = url.filter(|u| !u.is_empty());
        self
    }

    /// A `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The stable code, for tests and logs.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human message (the console shows it to the operator who caused it).
    pub fn message(&self) -> &str {
        &self.message
    }

    fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.leader_url = self.leader_url;
        (status, Json(body)).into_response()
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownProduct(name) => Self::new(
                ErrorCode::UnknownProduct,
                format!("unknown product {name:?}"),
            ),
            StoreError::NotFound(what) => {
                Self::new(ErrorCode::NotFound, format!("{what} not found"))
            }
            StoreError::Conflict(why) => Self::new(ErrorCode::Conflict, why),
            StoreError::Fenced { .. } => Self::new(
                ErrorCode::NotLeader,
                "this balancer was deposed by a newer leader; send the request to the leader",
            ),
            other => {
                tracing::error!(error = %other, "store failure");
                Self::new(
                    ErrorCode::Unavailable,
                    "the balancer's store failed; see its log",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let error = Self::bad_request(rejection.to_string());
        // Keep HTTP's more precise statuses for a body too large or not JSON.
        if status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            error.with_status(status)
        } else {
            error
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

/// The answer for a URL no route serves.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

/// The answer for a known URL with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::bad_request("method not allowed on this endpoint")
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

//! The metering server's API errors: one enum, each variant a stable code and an HTTP status.
//!
//! Handlers return [`ApiError`]; its `IntoResponse` writes `{"error": {"code", "message"}}`
//! (`allot_core::error::ErrorBody`). Internal failures are logged here and answered with a bare
//! `internal`, never with SQL text or paths. [`ApiJson`] (the shared `allot_http::json` checks)
//! and [`ApiPath`] make body and path rejections (bad syntax, unknown fields, a body over
//! 64 KiB) answer in the same shape.

use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::validate::{Invalid, MAX_BODY_BYTES};
use allot_http::json::JsonRejection;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why a request to the metering server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, an unknown field or an out-of-range value.
    #[error("{0}")]
    BadRequest(String),
    /// The body is over the 64 KiB limit.
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The body is not `application/json` (no or another content type).
    #[error("{0}")]
    NotJson(String),
    /// The route exists but not for this method.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// Missing or wrong bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// The ACL refuses the requester.
    #[error("{0}")]
    Forbidden(String),
    /// No such route.
    #[error("no such path")]
    NotFound,
    /// The product is not defined on this server.
    #[error("unknown product {0:?}")]
    UnknownProduct(String),
    /// No unit could be granted.
    #[error("{0}")]
    LicenseUnavailable(String),
    /// A limit of the product's options caps the requester; the message names it.
    #[error("{0}")]
    LimitReached(String),
    /// The server's balancer lease ran out: it may not grant new checkouts.
    #[error("{0}")]
    LicenseExpired(String),
    /// The handle is unknown or has staled out.
    #[error("unknown or staled-out handle")]
    BadHandle,
    /// An operator revoked the checkout; the message says when and why.
    #[error("{0}")]
    LicenseRevoked(String),
    /// No live checkout has the public id asked for.
    #[error("{0}")]
    UnknownCheckout(String),
    /// The request contradicts the state (a move id reused for another move).
    #[error("{0}")]
    Conflict(String),
    /// A configured limit is reached, the store failed earlier, or the server is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a failure of the store; the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_)
            | ApiError::TooLarge
            | ApiError::NotJson(_)
            | ApiError::MethodNotAllowed => ErrorCode::BadRequest,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::LimitReached(_) => ErrorCode::LimitReached,
            ApiError::NotFound => ErrorCode::NotFound,
            ApiError::UnknownProduct(_) => ErrorCode::UnknownProduct,
            ApiError::LicenseUnavailable(_) => ErrorCode::LicenseUnavailable,
            ApiError::LicenseExpired(_) => ErrorCode::LicenseExpired,
            ApiError::BadHandle => ErrorCode::BadHandle,
            ApiError::LicenseRevoked(_) => ErrorCode::LicenseRevoked,
            ApiError::UnknownCheckout(_) => ErrorCode::NotFound,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            other => StatusCode::from_u16(other.code().http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let body = ErrorBody::new(self.code(), self.to_string());
        (self.status(), axum::Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::NotJson => ApiError::NotJson(rejection.to_string()),
            JsonRejection::TooLarge(_) => ApiError::TooLarge,
            JsonRejection::Malformed(why) => ApiError::BadRequest(why),
        }
    }
}

/// A JSON body (checked by the shared [`allot_http::json::Json`]: content type, size, a JSON
/// object, no unknown field) whose rejections are [`ApiError`]s, so every failure has the JSON
/// error shape and this server's codes (axum's own `Json` answers in plain text).
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(allot_http::json::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path parameters whose rejections (say, a segment that is not UTF-8 once percent-decoded) are
/// [`ApiError`]s: axum's own `Path` answers those in plain text.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    axum::extract::Path<T>:
        axum::extract::FromRequestParts<S, Rejection = axum::extract::rejection::PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

//! The JSON body extractor of both servers, so a body is checked the same way everywhere and
//! the checks live once: the content type must be `application/json` (415 otherwise), the body
//! at most the router's `DefaultBodyLimit` (413), a JSON object (see
//! `allot_core::validate::json_object`) and a valid `T` (400; unknown fields are refused by
//! `T`'s own `deny_unknown_fields`).
//!
//! Each server keeps its own error type with its own stable codes, and wraps [`Json`] through
//! axum's `via` so every refusal answers in that type:
//!
//! ```
//! # use axum::response::{IntoResponse, Response};
//! # pub struct ApiError;
//! # impl IntoResponse for ApiError { fn into_response(self) -> Response { ().into_response() } }
//! impl From<allot_http::json::JsonRejection> for ApiError {
//!     fn from(rejection: allot_http::json::JsonRejection) -> Self {
//!         // map NotJson, TooLarge and Malformed to the server's own codes
//!         # let _ = rejection;
//!         ApiError
//!     }
//! }
//!
//! #[derive(axum::extract::FromRequest)]
//! #[from_request(via(allot_http::json::Json), rejection(ApiError))]
//! pub struct ApiJson<T>(pub T);
//! ```

use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::validate;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// A request body of `T`, read as JSON after the checks above. Servers wrap it (see the module
/// doc) rather than use it directly, so their refusals carry their own error type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

/// Why a body was refused. Servers convert it into their own error type; on its own it answers
/// `{"error": {"code": "bad_request", "message"}}` with [`JsonRejection::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonRejection {
    /// No content type, or another one than `application/json`.
    #[error("expected a request with `Content-Type: application/json`")]
    NotJson,
    /// The body is over the router's limit; axum's own description of it.
    #[error("{0}")]
    TooLarge(String),
    /// The body could not be read, is not a JSON object, or is not a valid `T`: what is wrong,
    /// for the caller to fix.
    #[error("{0}")]
    Malformed(String),
}

impl JsonRejection {
    /// The HTTP status of this refusal: 415, 413 or 400.
    pub fn status(&self) -> StatusCode {
        match self {
            JsonRejection::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            JsonRejection::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for JsonRejection {
    fn into_response(self) -> Response {
        let body = ErrorBody::new(ErrorCode::BadRequest, self.to_string());
        (self.status(), axum::Json(body)).into_response()
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = JsonRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, JsonRejection> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(validate::is_json_content_type);
        if !json {
            return Err(JsonRejection::NotJson);
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(JsonRejection::TooLarge(rejection.body_text()));
            }
            Err(rejection) => return Err(JsonRejection::Malformed(rejection.body_text())),
        };
        validate::json_object(&bytes).map_err(|e| JsonRejection::Malformed(e.to_string()))?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(JsonRejection::Malformed(rejection.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        #[allow(dead_code)]
        units: u32,
    }

    async fn extract(content_type: Option<&str>, body: &str) -> Result<Json<Req>, JsonRejection> {
        let mut req = axum::http::Request::builder().method("POST").uri("/");
        if let Some(ct) = content_type {
            req = req.header(axum::http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(Body::from(body.to_owned())).unwrap();
        Json::<Req>::from_request(req, &()).await
    }

    #[tokio::test]
    async fn a_body_is_refused_for_its_type_shape_or_fields() {
        assert_eq!(
            extract(None, r#"{"units": 1}"#).await.unwrap_err(),
            JsonRejection::NotJson
        );
        assert_eq!(
            extract(Some("text/plain"), r#"{"units": 1}"#)
                .await
                .unwrap_err()
                .status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let not_object = extract(Some("application/json"), "[1]").await.unwrap_err();
        assert_eq!(not_object.status(), StatusCode::BAD_REQUEST);
        let unknown = extract(Some("application/json"), r#"{"units": 1, "x": 2}"#)
            .await
            .unwrap_err();
        assert!(matches!(unknown, JsonRejection::Malformed(_)));
        assert!(
            extract(Some("application/json"), r#"{"units": 1}"#)
                .await
                .is_ok()
        );
    }
}

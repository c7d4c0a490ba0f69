//! Requests refused for their credentials, counted and logged in one place whichever extractor
//! or policy refused them: a middleware that reads the answer's status (401 `unauthorized`,
//! 403 `forbidden`), so no refusal path can forget to count itself. The log names the method
//! and path, never the presented token. Each server brings its own counter (its own metric
//! name and registry).

use allot_core::ErrorCode;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;

/// How a server counts and logs its refusals: the state of [`count_refused`].
#[derive(Clone)]
pub struct Refusals {
    /// Increments the server's counter for a reason (`unauthorized` or `forbidden`).
    count: Arc<dyn Fn(ErrorCode) + Send + Sync>,
    /// A 403 is an ACL's ordinary decision (logged at info), not a credential refused (warn).
    forbidden_by_acl: bool,
}

impl Refusals {
    /// Refusals counted by `count`, every one logged as a warning.
    pub fn new(count: impl Fn(ErrorCode) + Send + Sync + 'static) -> Self {
        Self {
            count: Arc::new(count),
            forbidden_by_acl: false,
        }
    }

    /// A 403 comes from a product's ACL, a policy working as configured: logged at info so
    /// it does not drown the warnings about tokens.
    pub fn forbidden_by_acl(mut self) -> Self {
        self.forbidden_by_acl = true;
        self
    }
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals")
            .field("forbidden_by_acl", &self.forbidden_by_acl)
            .finish_non_exhaustive()
    }
}

/// The middleware: `.layer(axum::middleware::from_fn_with_state(refusals, count_refused))`.
pub async fn count_refused(
    State(refusals): State<Refusals>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let reason = match response.status() {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        _ => return response,
    };
    (refusals.count)(reason);
    if reason == ErrorCode::Forbidden && refusals.forbidden_by_acl {
        tracing::info!(%method, %path, reason = reason.as_str(), "request refused by an ACL");
    } else {
        tracing::warn!(%method, %path, reason = reason.as_str(), "request refused for its credentials");
    }
    response
}

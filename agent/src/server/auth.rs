//! The two credentials of the metering server's API, as axum extractors: the balancer's token
//! ([`BalancerAuth`]) and the optional client key ([`ClientAuth`]). Both are kept as SHA-256
//! digests and compared in constant time; a refusal is an [`ApiError::Unauthorized`], counted
//! and logged by the router's refusal layer.

use super::App;
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The digest a secret is kept as, so the process compares and holds only digests after start.
pub(super) fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The balancer's bearer token, checked in constant time against its SHA-256.
pub(super) struct BalancerAuth;

/// The client key, when one is configured.
pub(super) struct ClientAuth;

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn matches(expected: &[u8; 32], presented: Option<&str>) -> bool {
    presented.is_some_and(|p| bool::from(hash(p).ct_eq(expected)))
}

impl FromRequestParts<App> for BalancerAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        match &app.token {
            Some(t) if matches(t, bearer(parts)) => Ok(BalancerAuth),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

impl FromRequestParts<App> for ClientAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        match &app.client_key {
            None => Ok(ClientAuth),
            Some(k) if matches(k, bearer(parts)) => Ok(ClientAuth),
            Some(_) => Err(ApiError::Unauthorized),
        }
    }
}

//! Outbound calls from the balancer to metering servers: status, release, grant.
//!
//! Every call carries the server's own token, has a timeout, and is idempotent on the server's
//! side (moves by move id), so a call whose answer was lost can simply be sent again.

use crate::auth::ServerTokens;
use crate::store::ServerRecord;
use allot_core::domain::MoveKind;
use allot_core::error::ErrorBody;
use allot_core::wire::agent::{
    AgentStatus, BatchResponse, HolderPage, MoveBatch, MoveRequest, MoveResponse, RevokeRequest,
    Revoked,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Why a call to a metering server failed. Displayed in run records and logs.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer: refused, reset, timed out. The server's state is unknown.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server answered with an error: it did not apply this call (whether it applied an
    /// earlier send of the same move depends on where it refused; see the move executor).
    #[error("refused with {status}: {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code the server gave.
        code: String,
        /// Its message.
        message: String,
    },
}

/// A client of every metering server's balancer-facing API.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    tokens: ServerTokens,
}

impl AgentClient {
    /// A client whose calls give up after `timeout` and that trusts `trust`'s CAs for HTTPS.
    pub fn new(tokens: ServerTokens, timeout: Duration, trust: &allot_http::tls::Trust) -> Self {
        let http = trust
            .client_builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(4)
            .build()
            .expect("a reqwest client with rustls");
        Self { http, tokens }
    }

    /// `GET /v1/status` (resets the server's since-last counters unless `peek`).
    pub async fn status(
        &self,
        server: &ServerRecord,
        peek: bool,
    ) -> Result<AgentStatus, CallError> {
        let path = if peek {
            "/v1/status?peek=true"
        } else {
            "/v1/status"
        };
        let mut status: AgentStatus = self
            .call::<(), _>(server, reqwest::Method::GET, path, None)
            .await?;
        // Sorted by product, so a run finds each of its cells' statuses by a binary search
        // (`balance::reported`), not a scan of the server's products.
        status
            .products
            .sort_unstable_by(|a, b| a.product.cmp(&b.product));
        Ok(status)
    }

    /// `POST /v1/allocations/release` or `/grant`.
    pub async fn send_move(
        &self,
        server: &ServerRecord,
        kind: MoveKind,
        request: &MoveRequest,
    ) -> Result<MoveResponse, CallError> {
        let path = match kind {
            MoveKind::Release => "/v1/allocations/release",
            MoveKind::Grant => "/v1/allocations/grant",
            MoveKind::Retire => "/v1/allocations/retire",
        };
        self.call(server, reqwest::Method::POST, path, Some(request))
            .await
    }

    /// `POST /v1/allocations/batch`: several moves in one request, one outcome each.
    pub async fn send_batch(
        &self,
        server: &ServerRecord,
        batch: &MoveBatch,
    ) -> Result<BatchResponse, CallError> {
        self.call(
            server,
            reqwest::Method::POST,
            "/v1/allocations/batch",
            Some(batch),
        )
        .await
    }

    /// `GET /v1/checkouts?…`: one page of the server's holders (`params` are the query's
    /// name/value pairs, encoded here).
    pub async fn holders(
        &self,
        server: &ServerRecord,
        params: &[(&str, String)],
    ) -> Result<HolderPage, CallError> {
        let mut url = reqwest::Url::parse("http://query.invalid/v1/checkouts")
            .expect("a constant URL parses");
        url.query_pairs_mut()
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        let path = format!("/v1/checkouts?{}", url.query().unwrap_or(""));
        self.call::<(), _>(server, reqwest::Method::GET, &path, None)
            .await
    }

    /// `POST /v1/checkouts/{id}/revoke` (`id` is a validated public id: no escaping needed).
    pub async fn revoke(
        &self,
        server: &ServerRecord,
        id: &str,
        request: &RevokeRequest,
    ) -> Result<Revoked, CallError> {
        let path = format!("/v1/checkouts/{id}/revoke");
        self.call(server, reqwest::Method::POST, &path, Some(request))
            .await
    }

    /// Sends the call with the server's token; during a rotation's grace, with the previous
    /// token first and, if the server refuses it as `unauthorized` (it was restarted with the
    /// new one), again with the new one. A refused call changed nothing, so resending is safe.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        server: &ServerRecord,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CallError> {
        let url = format!("{}{path}", server.url.trim_end_matches('/'));
        let salts = server.token_salts(chrono::Utc::now());
        let mut result = Err(CallError::Unreachable(format!("{url}: no token")));
        for salt in salts {
            let token = self.tokens.token(&server.name, salt);
            result = self.attempt(method.clone(), &url, &token, body).await;
            match &result {
                Err(CallError::Refused { status: 401, .. }) => continue,
                _ => break,
            }
        }
        result
    }

    async fn attempt<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        token: &str,
        body: Option<&B>,
    ) -> Result<T, CallError> {
        let mut request = self.http.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => (body.error.code.to_string(), body.error.message),
                Err(_) => ("?".into(), String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Err(CallError::Refused {
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Unreachable(format!("{url}: unreadable answer: {e}")))
    }
}

//! The Rust client of the metering server: plain calls, and a [`Lease`] that heartbeats while
//! it lives and checks in when dropped. Each call runs in a `tracing` span named after it,
//! carrying the product or move id (never a handle or a key), so a caller's logs say which call
//! failed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), allot_agent::client::ClientError> {
//! use allot_agent::client::Client;
//! use allot_core::wire::agent::CheckoutRequest;
//! let client = Client::new("http://127.0.0.1:7401")?;
//! let lease = client
//!     .lease(&CheckoutRequest {
//!         product: "cad".into(),
//!         user: "ann".into(),
//!         host: "ws1".into(),
//!         groups: vec![],
//!         units: 1,
//!         wait_seconds: 0,
//!     })
//!     .await?;
//! // ... run the licensed work ...
//! lease.checkin().await?;
//! # Ok(()) }
//! ```

use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::wire::Health;
use allot_core::wire::agent::{
    AgentProduct, AgentProducts, AgentStatus, BorrowRequest, BorrowResponse, CheckoutRequest,
    CheckoutResponse, HandleRequest, HandleResponse, HeartbeatRequest, MoveRequest, MoveResponse,
    ProductDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{status} {}: {}", body.error.code, body.error.message)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's error.
        body: ErrorBody,
    },
    /// The server could not be reached or answered something that is not allot's JSON.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The URL given is not usable.
    #[error("bad server URL {0:?}")]
    Url(String),
}

impl ClientError {
    /// The server's stable error code, when the server answered one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.error.code),
            _ => None,
        }
    }
}

/// A connection pool to one metering server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

impl Client {
    /// A client of the server at `url` (e.g. `http://127.0.0.1:7401`).
    pub fn new(url: &str) -> Result<Self, ClientError> {
        Self::with_trust(url, &allot_http::tls::Trust::default())
    }

    /// A client of the server at `url` that also trusts `trust`'s CAs (an `https://` server
    /// whose certificate a private CA signed).
    pub fn with_trust(url: &str, trust: &allot_http::tls::Trust) -> Result<Self, ClientError> {
        allot_core::validate::http_url("url", url).map_err(|_| ClientError::Url(url.to_owned()))?;
        let http = trust
            .client_builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Client {
            http,
            base: url.trim_end_matches('/').to_owned(),
            bearer: None,
        })
    }

    /// Presents `token` as `Authorization: Bearer` (the client key, or the server token for the
    /// balancer-facing calls).
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        self.bearer = token;
        self
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.bearer {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send<T: DeserializeOwned>(rb: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = rb.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorCode::Internal,
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        });
        Err(ClientError::Api {
            status: status.as_u16(),
            body,
        })
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    /// Checks units out (waits in the queue if `wait_seconds > 0`). The caller heartbeats and
    /// checks in; [`Client::lease`] does both for you.
    #[tracing::instrument(skip_all, fields(product = %req.product, units = req.units))]
    pub async fn checkout(&self, req: &CheckoutRequest) -> Result<CheckoutResponse, ClientError> {
        let rb = self
            .request(reqwest::Method::POST, "/v1/checkout")
            .json(req)
            .timeout(Duration::from_secs(u64::from(req.wait_seconds) + 30));
        Self::send(rb).await
    }

    /// Keeps a checkout alive, reporting the program's idle seconds when known.
    #[tracing::instrument(skip_all)]
    pub async fn heartbeat(
        &self,
        handle: &str,
        idle_seconds: Option<u32>,
    ) -> Result<HandleResponse, ClientError> {
        self.post(
            "/v1/heartbeat",
            &HeartbeatRequest {
                handle: handle.to_owned(),
                idle_seconds,
            },
        )
        .await
    }

    /// Borrows one unit for offline use for `req.hours`.
    #[tracing::instrument(skip_all, fields(product = %req.product, hours = req.hours))]
    pub async fn borrow(&self, req: &BorrowRequest) -> Result<BorrowResponse, ClientError> {
        self.post("/v1/borrow", req).await
    }

    /// Returns a borrowed unit before its time.
    #[tracing::instrument(skip_all)]
    pub async fn return_borrow(&self, handle: &str) -> Result<HandleResponse, ClientError> {
        Self::send(self.request(
            reqwest::Method::POST,
            &format!("/v1/borrow/{handle}/return"),
        ))
        .await
    }

    /// Ends a checkout.
    #[tracing::instrument(skip_all)]
    pub async fn checkin(&self, handle: &str) -> Result<HandleResponse, ClientError> {
        self.post(
            "/v1/checkin",
            &HandleRequest {
                handle: handle.to_owned(),
            },
        )
        .await
    }

    /// The server's products as its clients see them.
    #[tracing::instrument(skip_all)]
    pub async fn products(&self) -> Result<AgentProducts, ClientError> {
        self.get("/v1/products").await
    }

    /// The balancer's view (needs the server token); resets the since-last counters.
    #[tracing::instrument(skip_all)]
    pub async fn status(&self) -> Result<AgentStatus, ClientError> {
        self.get("/v1/status").await
    }

    /// Releases free units to the reserve (server token).
    #[tracing::instrument(skip_all, fields(move_id = %req.move_id, product = %req.product, units = req.units))]
    pub async fn release(&self, req: &MoveRequest) -> Result<MoveResponse, ClientError> {
        self.post("/v1/allocations/release", req).await
    }

    /// Grants units from the reserve (server token).
    #[tracing::instrument(skip_all, fields(move_id = %req.move_id, product = %req.product, units = req.units))]
    pub async fn grant(&self, req: &MoveRequest) -> Result<MoveResponse, ClientError> {
        self.post("/v1/allocations/grant", req).await
    }

    /// Defines a product or replaces its policy (server token).
    #[tracing::instrument(skip_all, fields(product = %product))]
    pub async fn define(
        &self,
        product: &str,
        def: &ProductDefinition,
    ) -> Result<AgentProduct, ClientError> {
        Self::send(
            self.request(reqwest::Method::PUT, &format!("/v1/products/{product}"))
                .json(def),
        )
        .await
    }

    /// The server's health.
    #[tracing::instrument(skip_all)]
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/healthz").await
    }

    /// Checks out and starts heartbeating; the returned [`Lease`] checks in when dropped.
    #[tracing::instrument(skip_all, fields(product = %req.product, units = req.units))]
    pub async fn lease(&self, req: &CheckoutRequest) -> Result<Lease, ClientError> {
        let grant = self.checkout(req).await?;
        let (lost_tx, lost) = watch::channel(None);
        let client = self.clone();
        let handle = grant.handle.clone();
        let idle = Arc::new(AtomicU64::new(0));
        let idle_seen = idle.clone();
        let every = Duration::from_secs(u64::from(grant.heartbeat_seconds.max(1)));
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                // 0: not measured; n + 1: idle for n seconds.
                let idle_seconds = match idle_seen.load(Ordering::Relaxed) {
                    0 => None,
                    n => Some(u32::try_from(n - 1).unwrap_or(u32::MAX)),
                };
                match client.heartbeat(&handle, idle_seconds).await {
                    Ok(HandleResponse {
                        notice: Some(notice),
                        ..
                    }) => tracing::warn!(%notice, "the metering server says this checkout is idle"),
                    Ok(_) => {}
                    Err(e) if e.code() == Some(ErrorCode::BadHandle) => {
                        tracing::warn!("checkout lost (staled out or unknown to the server)");
                        let _ = lost_tx.send(Some(LeaseEnd::Lost));
                        return;
                    }
                    Err(ClientError::Api { body, .. })
                        if body.error.code == ErrorCode::LicenseRevoked =>
                    {
                        tracing::warn!(reason = %body.error.message, "checkout revoked by an administrator");
                        let _ = lost_tx.send(Some(LeaseEnd::Revoked(body.error.message)));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
                }
            }
        });
        Ok(Lease {
            client: self.clone(),
            grant,
            heartbeat: Some(heartbeat),
            lost,
            idle,
        })
    }
}

/// How a checkout ended on the server's side while its holder still held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The server no longer knows the handle (it staled out, or the server lost it).
    Lost,
    /// An administrator revoked it (`410 license_revoked`): the server's message, with when
    /// and why. The holder must stop using the product; its units went to someone else.
    Revoked(String),
}

/// A live checkout: heartbeats in the background; [`Lease::checkin`] ends it, and dropping it
/// ends it too (from a spawned task, so a tokio runtime must be running).
#[derive(Debug)]
pub struct Lease {
    client: Client,
    grant: CheckoutResponse,
    heartbeat: Option<JoinHandle<()>>,
    lost: watch::Receiver<Option<LeaseEnd>>,
    /// The idle seconds the next heartbeat reports, plus one (0: not measured).
    idle: Arc<AtomicU64>,
}

impl Lease {
    /// Sets the idle time the next heartbeats report (the product's idle rules judge it).
    pub fn report_idle(&self, seconds: u32) {
        self.idle.store(u64::from(seconds) + 1, Ordering::Relaxed);
    }

    /// The server's answer: handle, units, heartbeat interval, overdraft.
    pub fn grant(&self) -> &CheckoutResponse {
        &self.grant
    }

    /// Whether the server no longer holds the checkout for us (staled out or revoked).
    pub fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    /// How the checkout ended on the server's side, if it did.
    pub fn ended(&self) -> Option<LeaseEnd> {
        self.lost.borrow().clone()
    }

    /// Resolves when a heartbeat learns that the checkout ended on the server's side (staled
    /// out or revoked); never while it lives.
    pub async fn wait_ended(&self) -> LeaseEnd {
        let mut rx = self.lost.clone();
        loop {
            if let Some(end) = rx.borrow_and_update().clone() {
                return end;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stops heartbeating and forgets the checkout without checking it in: for one the server
    /// already ended (a revoked checkout answers a checkin `410` anyway).
    pub fn forget(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        self.grant.handle.clear();
    }

    /// Ends the checkout now and reports the outcome.
    pub async fn checkin(mut self) -> Result<(), ClientError> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let result = self.client.checkin(&self.grant.handle).await.map(|_| ());
        self.grant.handle.clear();
        result
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.grant.handle.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let handle = std::mem::take(&mut self.grant.handle);
            rt.spawn(async move {
                if let Err(e) = client.checkin(&handle).await {
                    tracing::warn!(error = %e, "checkin on drop failed");
                }
            });
        }
    }
}

//! The metering server's outbound calls to the balancer: `POST /v1/sync` and
//! `POST /v1/instant-balance`, with the server's own token.
//!
//! Several balancer URLs may be configured (`--balancer a,b`): a call tries them in order,
//! starting with the one that answered last, so a dead first URL costs one failed attempt only
//! until another one answers. Any failure (unreachable, timeout, an error status such as a
//! follower's `not_leader`) moves on to the next URL; the call fails only when all did.
//! The orchestration — what a sync changes, when an instant balance is asked — lives in the
//! server's `sync` and `pull` modules; this module only talks HTTP, below them.

use allot_core::error::ErrorBody;
use allot_core::trigger::TriggerConfig;
use allot_core::wire::balancer::{
    InstantBalanceRequest, InstantBalanceResponse, SyncRequest, SyncResponse,
};
use allot_core::wire::records::{RecordAck, RecordBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Longest a sync attempt may take on one URL before the next is tried.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a batch of records may take to be stored.
const RECORDS_TIMEOUT: Duration = Duration::from_secs(10);

/// How the metering server works with its balancer (absent: standalone, no lease).
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// Balancer base URLs, tried in order.
    pub urls: Vec<String>,
    /// How often the lease is renewed and the products refreshed.
    pub sync_interval: Duration,
    /// How long a hard-stop checkout that found nothing free is held for an instant balance.
    pub instant_wait: Duration,
    /// When to ask for an instant balance (the pure policy's knobs).
    pub trigger: TriggerConfig,
    /// CA certificates, beside the system's, trusted for an `https://` balancer.
    pub trust: allot_http::tls::Trust,
}

impl BalancerConfig {
    /// Defaults for `urls`: sync every 30 s, hold 500 ms, the trigger's default knobs.
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            sync_interval: Duration::from_secs(30),
            instant_wait: Duration::from_millis(500),
            trigger: TriggerConfig::default(),
            trust: allot_http::tls::Trust::default(),
        }
    }
}

/// A client of the balancer's metering-server API.
#[derive(Debug)]
pub struct BalancerLink {
    http: reqwest::Client,
    urls: Vec<String>,
    token: String,
    /// The URL that answered last: the first one tried next time.
    preferred: AtomicUsize,
    instant_timeout: Duration,
}

impl BalancerLink {
    /// A client of `urls` presenting `token`. Instant requests give up after the trigger's
    /// in-flight timeout, so a request the trigger no longer waits for is not left open.
    pub fn new(config: &BalancerConfig, token: &str) -> Self {
        let http = config
            .trust
            .client_builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(2)
            .build()
            .expect("a reqwest client with rustls");
        Self {
            http,
            urls: config
                .urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            token: token.to_owned(),
            preferred: AtomicUsize::new(0),
            instant_timeout: Duration::from_millis(config.trigger.in_flight_timeout_ms.max(1)),
        }
    }

    /// `POST /v1/sync`. Returns when the successful request was sent (Unix ms, the lease's
    /// start) and the answer.
    #[tracing::instrument(skip_all)]
    pub async fn sync(&self, now: impl Fn() -> u64) -> Result<(u64, SyncResponse), String> {
        let body = SyncRequest {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.post("/v1/sync", &body, SYNC_TIMEOUT, now).await
    }

    /// `POST /v1/instant-balance`. The units arrive as a grant on this server's API before the
    /// answer does.
    #[tracing::instrument(skip_all, fields(product = %req.product, units = req.units, request_id = %req.request_id))]
    pub async fn instant(
        &self,
        req: &InstantBalanceRequest,
    ) -> Result<InstantBalanceResponse, String> {
        self.post(
            "/v1/instant-balance",
            req,
            self.instant_timeout,
            crate::clock::now_ms,
        )
        .await
        .map(|(_, r)| r)
    }

    /// `POST /v1/records`: a batch of usage and denial records; the answer means every record
    /// of it is stored.
    #[tracing::instrument(skip_all, fields(usage = batch.usage.len(), denials = batch.denials.len()))]
    pub async fn records(&self, batch: &RecordBatch) -> Result<RecordAck, String> {
        self.post("/v1/records", batch, RECORDS_TIMEOUT, crate::clock::now_ms)
            .await
            .map(|(_, ack)| ack)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
        now: impl Fn() -> u64,
    ) -> Result<(u64, T), String> {
        let first = self.preferred.load(Ordering::Relaxed) % self.urls.len().max(1);
        let mut errors = Vec::new();
        for i in 0..self.urls.len() {
            let index = (first + i) % self.urls.len();
            let url = format!("{}{path}", self.urls[index]);
            let sent = now();
            match self.attempt(&url, body, timeout).await {
                Ok(answer) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((sent, answer));
                }
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    /// One request to one URL; its span names the URL, so a failover is visible in the log.
    #[tracing::instrument(skip_all, fields(url = %url))]
    async fn attempt<B: Serialize, T: DeserializeOwned>(
        &self,
        url: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, String> {
        let response = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("unreachable: {}", chain(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("unreachable: {}", chain(&e)))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => format!(
                    "refused with {}: {}: {}",
                    status.as_u16(),
                    b.error.code,
                    b.error.message
                ),
                Err(_) => format!("refused with {}", status.as_u16()),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer: {e}"))
    }
}

/// An error and its causes on one line (reqwest's own message omits the cause, e.g. "connection
/// refused"), so the log says why.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

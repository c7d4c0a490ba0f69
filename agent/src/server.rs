//! The metering server: HTTP handlers, the group-commit writer and the staleout task around an
//! `allot_core::checkout::Book`.
//!
//! Shape: one std `Mutex` guards the book and the waiters' wake-up channels; it is never held
//! across an `.await`. A mutating handler decides under the lock, appends its [`Mutation`] to the
//! writer's channel *under the same lock* (so the log order is the decision order), releases
//! the lock, and awaits the writer's acknowledgement before answering. The writer takes every
//! pending mutation at once, commits them in one SQLite transaction and then acknowledges each:
//! group commit, with no answer ever preceding its durability. A crash therefore loses only
//! unacknowledged work, and what survives is a prefix of the decision order, which is itself a
//! valid state (hard stop never over-granted at any point of it).

use crate::balancer::{BalancerConfig, BalancerLink};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::metrics::{DenialReason, InstantOutcome, Metrics};
use crate::store::{self, LeaseRecord, Mutation, Store, StoreError};
use allot_core::ErrorCode;
use allot_core::checkout::{
    self, Book, Handle, Limits, Millis, MoveRefusal, Outcome, Refusal, Served, Who,
};
use allot_core::domain::Enforcement;
use allot_core::error::ErrorBody;
use allot_core::trigger::{TriggerState, instant_request, next_check_at};
use allot_core::validate::{self, MAX_BODY_BYTES};
use allot_core::wire::Health;
use allot_core::wire::agent::{
    AgentProduct, AgentProducts, AgentStatus, CheckoutRequest, CheckoutResponse, HandleRequest,
    HandleResponse, MoveRequest, MoveResponse, ProductDefinition,
};
use allot_core::wire::balancer::{InstantBalanceRequest, SyncResponse};
use axum::extract::{DefaultBodyLimit, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest a client may ask to wait in the queue: one hour.
pub const MAX_WAIT_SECONDS: u32 = 3600;

/// A product from `--products-file`: its policy and, optionally, its allocation (standalone
/// use, without a balancer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalProduct {
    /// The product's name.
    pub product: String,
    /// Units this server holds; absent → left as the store has it (the balancer's moves).
    #[serde(default)]
    pub allocation: Option<u32>,
    /// The policy.
    pub policy: ProductDefinition,
}

/// The `--products-file` format: `{"products": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductsFile {
    /// Product definitions applied at start.
    pub products: Vec<LocalProduct>,
}

/// Everything the server needs besides its listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where `agent.db` lives.
    pub data_dir: PathBuf,
    /// The server's name in status reports.
    pub name: String,
    /// The token the balancer presents; `None` disables the balancer-facing API (401).
    pub token: Option<String>,
    /// The key clients present; `None` lets any client on the network check out.
    pub client_key: Option<String>,
    /// Products applied at start (from `--products-file`).
    pub products: Vec<LocalProduct>,
    /// Caps on live checkouts and waiting clients.
    pub limits: Limits,
    /// The balancer this server syncs with, asks for instant balances and holds a lease from;
    /// `None`: standalone (no lease, no instant balance).
    pub balancer: Option<BalancerConfig>,
    /// Serve HTTPS with this certificate; `None`: plain HTTP.
    pub tls: Option<allot_tls::ServerTls>,
}

impl ServerConfig {
    /// A configuration with defaults, for tests and embedding.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            name: "agent".to_owned(),
            token: None,
            client_key: None,
            products: Vec::new(),
            limits: Limits::default(),
            balancer: None,
            tls: None,
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened, loaded or closed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A configured product is invalid.
    #[error("products file: {0}")]
    Config(String),
    /// The balancer settings are unusable.
    #[error("balancer: {0}")]
    Balancer(String),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Now as Unix milliseconds: the only clock the shell reads for the book.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh random handle (128 bits from the OS's generator via UUID v4).
fn new_handle() -> Handle {
    Handle(uuid::Uuid::new_v4().as_u128())
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// What the writer task receives. `Write` is by far the most common message, so it is not
/// boxed to keep the other variants small.
#[allow(clippy::large_enum_variant)]
enum WriterMsg {
    /// Persist, then acknowledge (if anyone waits).
    Write(Mutation, Option<oneshot::Sender<bool>>),
    /// Acknowledge once everything sent before is durable.
    Barrier(oneshot::Sender<bool>),
    /// Flush, write the totals, close the store and say so.
    Close(oneshot::Sender<()>),
}

/// A granted checkout handed to a waiting client, with its durability acknowledgement.
struct WaiterGrant {
    served: Served,
    durable: oneshot::Receiver<bool>,
}

/// An instant-balance request sent and not answered yet.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Its id, so a late answer of an older request clears nothing.
    id: uuid::Uuid,
    /// When it was sent.
    since: Millis,
    /// Whether it asked for units clients were waiting for.
    urgent: bool,
}

/// Per-product state of the instant-balance trigger that the book does not keep.
#[derive(Debug, Default)]
struct PullTrack {
    /// The latest request sent, while unanswered.
    in_flight: Option<InFlight>,
    /// Urgent units asked by every request still unanswered.
    urgent_in_flight: u64,
    /// When the balancer last granted fewer units than asked (the pool is scarce).
    short_answer_at: Option<Millis>,
    /// When it last granted fewer than the urgent units asked (none to spare for them).
    urgent_short_at: Option<Millis>,
    /// When the trigger is due again by time alone (`trigger::next_check_at`): the timer task
    /// evaluates it then.
    recheck_at: Option<Millis>,
}

/// The state behind the lock.
struct Inner {
    book: Book,
    /// Wake-up channels of queued clients, by waiter id.
    waiters: HashMap<u64, oneshot::Sender<WaiterGrant>>,
    /// The deadline the timer task sleeps until (a staleout or a trigger re-evaluation), so a
    /// new deadline only wakes it when earlier.
    armed: Millis,
    /// Instant-balance trigger state, by product.
    pulls: HashMap<String, PullTrack>,
    /// When the last successful sync was sent, so an expired lease can say since when the
    /// balancer has been unreachable.
    synced_at: Option<Millis>,
}

/// The balancer link and its settings, when one is configured.
struct Balancing {
    link: BalancerLink,
    config: BalancerConfig,
}

/// Lets a repeated warning through at most once per interval, counting what it held back, so
/// a long outage logs its reason without flooding the log.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// `Some(held back since the last one)` when a line may be logged now.
    fn ready(&mut self, every: Duration) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// How often a failing sync or instant balance is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The longest the timer task sleeps without looking at its deadlines again.
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(3600);

/// The shortest wait of an urgent pull for an urgent request in flight (or after an answer that
/// did not cover it), whatever the hold bound: a server configured with no hold never asks in a
/// loop.
const MIN_URGENT_RETRY_MS: u64 = 100;

/// What every handler shares.
struct Shared {
    inner: Mutex<Inner>,
    writer: mpsc::UnboundedSender<WriterMsg>,
    timer_wake: Notify,
    metrics: Metrics,
    token: Option<[u8; 32]>,
    client_key: Option<[u8; 32]>,
    name: String,
    /// Set when a batch failed to commit: memory is ahead of the log, so refuse mutations.
    poisoned: AtomicBool,
    stopping: watch::Sender<bool>,
    /// `None` when standalone.
    balancer: Option<Balancing>,
    /// Rate limit of the instant-balance failure warnings.
    instant_failures: Mutex<Throttle>,
}

type App = Arc<Shared>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a mutation to the log. Called with the lock held (`_inner` proves it), so the log
    /// order is the decision order.
    fn log(&self, _inner: &mut Inner, m: Mutation) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.writer.send(WriterMsg::Write(m, Some(tx)));
        rx
    }

    /// Appends a mutation nobody waits for (staleouts, compensations).
    fn log_quiet(&self, _inner: &mut Inner, m: Mutation) {
        let _ = self.writer.send(WriterMsg::Write(m, None));
    }

    fn check_writable(&self) -> Result<(), ApiError> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable(
                "the local store failed; restart the server".to_owned(),
            ));
        }
        Ok(())
    }

    /// Hands checkouts to waiting clients. A waiter that is gone (disconnected) gets its
    /// checkout checked in again at once, which may serve the next waiter.
    fn dispatch(&self, inner: &mut Inner, served: Vec<Served>, now: Millis) {
        let mut queue: VecDeque<Served> = served.into();
        while let Some(s) = queue.pop_front() {
            let durable = self.log(inner, Mutation::Checkout(s.grant.record.clone()));
            let handle = s.grant.record.handle;
            let delivered = match inner.waiters.remove(&s.waiter) {
                Some(tx) => tx.send(WaiterGrant { served: s, durable }).is_ok(),
                None => false,
            };
            if !delivered {
                let (product, more) = match inner.book.checkin(handle, now, &mut new_handle) {
                    Ok(x) => x,
                    Err(_) => continue,
                };
                self.log_quiet(inner, Mutation::Checkin { handle, product });
                queue.extend(more);
            }
        }
    }

    /// Checks in a checkout whose client will never learn its handle (its request was dropped).
    fn abandon(&self, handle: Handle) {
        let mut inner = self.lock();
        let now = now_ms();
        if let Ok((product, served)) = inner.book.checkin(handle, now, &mut new_handle) {
            self.log_quiet(&mut inner, Mutation::Checkin { handle, product });
            self.dispatch(&mut inner, served, now);
        }
    }

    /// Wakes the timer task if a new deadline is earlier than the one it sleeps until.
    fn arm(&self, inner: &mut Inner, deadline: Millis) {
        if deadline < inner.armed {
            inner.armed = deadline;
            self.timer_wake.notify_one();
        }
    }

    /// Waits until everything logged so far is durable.
    async fn barrier(&self) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        let _ = self.writer.send(WriterMsg::Barrier(tx));
        durable(rx).await
    }
}

/// Awaits a writer acknowledgement.
async fn durable(rx: oneshot::Receiver<bool>) -> Result<(), ApiError> {
    match rx.await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::Internal("store write failed".to_owned())),
        Err(_) => Err(ApiError::Unavailable("the server is stopping".to_owned())),
    }
}

/// Checks a checkout in if the request that created it is dropped before answering.
struct PendingCheckout<'a> {
    app: &'a Shared,
    handle: Option<Handle>,
}

impl PendingCheckout<'_> {
    fn disarm(mut self) {
        self.handle = None;
    }
}

impl Drop for PendingCheckout<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.app.abandon(h);
        }
    }
}

/// Takes a queued client out of the queue if its request is dropped (client disconnect), and
/// gives back a checkout handed to it that it never received.
struct QueuedGuard<'a> {
    app: &'a App,
    product: String,
    waiter: u64,
    rx: Option<oneshot::Receiver<WaiterGrant>>,
}

/// How a queued client's wait ended.
enum WaitEnd {
    /// A checkout was handed to it (possibly racing with its leaving).
    Served(WaiterGrant),
    /// It left the queue without one.
    Left {
        /// The lease had run out when it left (a lease refusal, not a denial).
        lease_expired: bool,
    },
}

impl QueuedGuard<'_> {
    /// Leaves the queue (timeout or shutdown), serving the waiters behind that its leaving
    /// lets through. Returns a grant that raced with the leaving.
    fn leave(&mut self, timed_out: bool) -> WaitEnd {
        let mut inner = self.app.lock();
        let now = now_ms();
        if let Some(left) =
            inner
                .book
                .cancel_wait(&self.product, self.waiter, timed_out, now, &mut new_handle)
        {
            inner.waiters.remove(&self.waiter);
            self.rx = None;
            self.app.dispatch(&mut inner, left.served, now);
            pull(self.app, &mut inner, &self.product, now);
            return WaitEnd::Left {
                lease_expired: left.lease_expired,
            };
        }
        drop(inner);
        // Not queued any more: it was served under the lock, so the grant is already sent.
        match self.rx.take().and_then(|mut rx| rx.try_recv().ok()) {
            Some(g) => WaitEnd::Served(g),
            None => WaitEnd::Left {
                lease_expired: false,
            },
        }
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if self.rx.is_some()
            && let WaitEnd::Served(g) = self.leave(false)
        {
            self.app.abandon(g.served.grant.record.handle);
        }
    }
}

/// The balancer's bearer token, checked in constant time against its SHA-256.
struct BalancerAuth;

/// The client key, when one is configured.
struct ClientAuth;

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

fn parse_handle(s: &str) -> Result<Handle, ApiError> {
    s.parse().map_err(|_| ApiError::BadHandle)
}

fn validate_checkout(req: &CheckoutRequest) -> Result<(), ApiError> {
    validate::path_name("product", &req.product)?;
    validate::name("user", &req.user)?;
    validate::name("host", &req.host)?;
    if req.groups.len() > validate::MAX_ACL_ENTRIES {
        return Err(ApiError::BadRequest(format!(
            "groups: must hold at most {} entries",
            validate::MAX_ACL_ENTRIES
        )));
    }
    for g in &req.groups {
        validate::name("groups", g)?;
    }
    validate::units("units", req.units)?;
    if req.wait_seconds > MAX_WAIT_SECONDS {
        return Err(ApiError::BadRequest(format!(
            "wait_seconds: must be at most {MAX_WAIT_SECONDS}, got {}",
            req.wait_seconds
        )));
    }
    Ok(())
}

fn answer(grant: &checkout::Grant) -> CheckoutResponse {
    CheckoutResponse {
        handle: grant.record.handle.to_string(),
        units: grant.record.units,
        heartbeat_seconds: grant.heartbeat_seconds,
        overdraft: grant.record.overdraft,
    }
}

/// Checks units of a product out; optionally waits in the first-come-first-served queue.
#[utoipa::path(post, path = "/v1/checkout", tag = "clients", security(("clientKey" = []), ()),
    request_body = CheckoutRequest,
    responses(
        (status = 200, description = "Granted", body = CheckoutResponse),
        (status = 403, description = "`forbidden`: the product's ACL refuses the requester", body = ErrorBody),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`license_unavailable`: none free under hard stop, or the wait timed out", body = ErrorBody),
        (status = 410, description = "`license_expired`: this server's lease from the balancer ran out", body = ErrorBody),
        (status = 503, description = "`unavailable`: a limit is reached, the store failed, or the server is stopping", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(product = %req.product))]
async fn checkout_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<CheckoutRequest>,
) -> Result<Json<CheckoutResponse>, ApiError> {
    let started = Instant::now();
    validate_checkout(&req)?;
    app.check_writable()?;
    let who = Who {
        user: &req.user,
        host: &req.host,
        groups: &req.groups,
    };
    let now = now_ms();
    enum Next {
        Granted(checkout::Grant, oneshot::Receiver<bool>),
        Queued(u64, oneshot::Receiver<WaiterGrant>),
    }
    // With a balancer, a hard-stop checkout that finds nothing free is held in the queue
    // (FIFO with the waiting clients) while an instant balance is asked for.
    let hold = app.balancer.is_some();
    let next = {
        let mut inner = app.lock();
        let mut outcome = inner.book.checkout(
            &req.product,
            who,
            req.units,
            req.wait_seconds > 0 || hold,
            now,
            new_handle(),
        );
        if hold && req.wait_seconds == 0 && outcome == Err(Refusal::Full) {
            // No room to hold it: the plain answer, as without a balancer.
            outcome = inner
                .book
                .checkout(&req.product, who, req.units, false, now, new_handle());
        }
        let next = match outcome {
            Ok(Outcome::Granted(grant)) => {
                let ack = app.log(&mut inner, Mutation::Checkout(grant.record.clone()));
                let deadline =
                    checkout::staleout_deadline(now, policy_staleout(&inner, &req.product));
                app.arm(&mut inner, deadline);
                Ok(Next::Granted(grant, ack))
            }
            Ok(Outcome::Queued(waiter)) => {
                let (tx, rx) = oneshot::channel();
                inner.waiters.insert(waiter, tx);
                Ok(Next::Queued(waiter, rx))
            }
            Err(refusal) => Err((refusal, inner.synced_at)),
        };
        if next.is_ok() {
            pull(&app, &mut inner, &req.product, now);
        }
        next
    };
    match next {
        Ok(Next::Granted(grant, ack)) => {
            let pending = PendingCheckout {
                app: &app,
                handle: Some(grant.record.handle),
            };
            durable(ack).await?;
            pending.disarm();
            app.metrics.checkout(
                &req.product,
                grant.record.overdraft,
                started.elapsed().as_secs_f64(),
            );
            if grant.record.overdraft {
                tracing::warn!(product = %req.product, "overdraft checkout granted beyond the allocation");
            }
            Ok(Json(answer(&grant)))
        }
        Ok(Next::Queued(waiter, rx)) => wait_in_queue(&app, req, waiter, rx, started).await,
        Err((refusal, synced_at)) => Err(refused(&app, &req.product, refusal, synced_at)),
    }
}

fn policy_staleout(inner: &Inner, product: &str) -> u32 {
    inner.book.policy(product).map_or(0, |p| p.staleout_seconds)
}

/// A Unix-ms instant as RFC 3339, for messages.
fn rfc3339(ms: Millis) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// Why an expired lease refuses: when it ended and since when no sync succeeded.
fn lease_message(since: Millis, synced_at: Option<Millis>) -> String {
    match synced_at {
        Some(synced) if since > 0 => format!(
            "this server's lease from the balancer expired at {}: the balancer has been \
             unreachable since {} (the last successful sync); new checkouts resume after the \
             next successful sync",
            rfc3339(since),
            rfc3339(synced)
        ),
        _ => "this server has no lease from the balancer yet (it has never synced with it); \
              new checkouts start after the first successful sync"
            .to_owned(),
    }
}

fn refused(app: &Shared, product: &str, refusal: Refusal, synced_at: Option<Millis>) -> ApiError {
    match refusal {
        Refusal::LeaseExpired { since } => {
            // Not a denial: no move of units could have prevented it.
            app.metrics.lease_refusal(product);
            ApiError::LicenseExpired(lease_message(since, synced_at))
        }
        Refusal::UnknownProduct => ApiError::UnknownProduct(product.to_owned()),
        Refusal::Forbidden(why) => {
            app.metrics.denial(product, DenialReason::Forbidden);
            ApiError::Forbidden(why.to_string())
        }
        Refusal::Unavailable => {
            app.metrics.denial(product, DenialReason::Unavailable);
            ApiError::LicenseUnavailable(format!("no free unit of {product:?} on this server"))
        }
        Refusal::Full => {
            app.metrics.denial(product, DenialReason::Limit);
            ApiError::Unavailable(
                "this server's limit of checkouts or waiting clients is reached; retry later"
                    .to_owned(),
            )
        }
    }
}

async fn wait_in_queue(
    app: &App,
    req: CheckoutRequest,
    waiter: u64,
    rx: oneshot::Receiver<WaiterGrant>,
    started: Instant,
) -> Result<Json<CheckoutResponse>, ApiError> {
    let mut guard = QueuedGuard {
        app,
        product: req.product.clone(),
        waiter,
        rx: Some(rx),
    };
    let mut stopping = app.stopping.subscribe();
    let mut wait = Duration::from_secs(u64::from(req.wait_seconds));
    if let Some(b) = &app.balancer {
        // Held for an instant balance: the longer of the client's wait and the hold bound.
        wait = wait.max(b.config.instant_wait);
    }
    let got = {
        let rx = guard.rx.as_mut().expect("receiver present until taken");
        tokio::select! {
            r = rx => r.ok(),
            _ = tokio::time::sleep(wait) => None,
            _ = stopping.wait_for(|s| *s) => None,
        }
    };
    let got = match got {
        Some(g) => {
            guard.rx = None;
            WaitEnd::Served(g)
        }
        None => guard.leave(!*app.stopping.borrow()),
    };
    drop(guard);
    let (served, ack) = match got {
        WaitEnd::Served(WaiterGrant { served, durable }) => (served, durable),
        WaitEnd::Left { lease_expired } => {
            return Err(wait_ended(app, &req, wait, lease_expired));
        }
    };
    let pending = PendingCheckout {
        app,
        handle: Some(served.grant.record.handle),
    };
    durable(ack).await?;
    pending.disarm();
    app.metrics.checkout(
        &req.product,
        served.grant.record.overdraft,
        started.elapsed().as_secs_f64(),
    );
    Ok(Json(answer(&served.grant)))
}

/// The answer to a queued client that left the queue without a checkout, counted.
fn wait_ended(
    app: &Shared,
    req: &CheckoutRequest,
    wait: Duration,
    lease_expired: bool,
) -> ApiError {
    if *app.stopping.borrow() {
        return ApiError::Unavailable("the server is stopping".to_owned());
    }
    if lease_expired {
        // The lease ran out while it waited: nothing could be granted any more, whatever units
        // the balancer moved. A lease refusal, not a denial.
        let (since, synced_at) = {
            let inner = app.lock();
            (inner.book.lease().unwrap_or(0), inner.synced_at)
        };
        app.metrics.lease_refusal(&req.product);
        return ApiError::LicenseExpired(lease_message(since, synced_at));
    }
    if req.wait_seconds == 0 {
        // Held only for an instant balance that brought nothing in time.
        app.metrics.denial(&req.product, DenialReason::Unavailable);
        return ApiError::LicenseUnavailable(format!(
            "no free unit of {:?} on this server, and none arrived from the balancer \
             within {} ms",
            req.product,
            wait.as_millis()
        ));
    }
    app.metrics.denial(&req.product, DenialReason::Timeout);
    ApiError::LicenseUnavailable(format!(
        "no unit of {:?} freed within {} s",
        req.product, req.wait_seconds
    ))
}

/// Keeps a checkout alive.
#[utoipa::path(post, path = "/v1/heartbeat", tag = "clients", security(("clientKey" = []), ()),
    request_body = HandleRequest,
    responses(
        (status = 200, description = "The checkout's new staleout", body = HandleResponse),
        (status = 404, description = "`bad_handle`: unknown or staled out", body = ErrorBody)))]
async fn heartbeat_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<HandleRequest>,
) -> Result<Json<HandleResponse>, ApiError> {
    let handle = parse_handle(&req.handle)?;
    let now = now_ms();
    let deadline = app
        .lock()
        .book
        .heartbeat(handle, now)
        .map_err(|_| ApiError::BadHandle)?;
    app.metrics.heartbeat();
    Ok(Json(HandleResponse {
        handle: req.handle,
        staleout_in_seconds: checkout::seconds_until(deadline, now),
    }))
}

/// Ends a checkout.
#[utoipa::path(post, path = "/v1/checkin", tag = "clients", security(("clientKey" = []), ()),
    request_body = HandleRequest,
    responses(
        (status = 200, description = "Checked in", body = HandleResponse),
        (status = 404, description = "`bad_handle`: unknown or staled out", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
async fn checkin_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<HandleRequest>,
) -> Result<Json<HandleResponse>, ApiError> {
    let handle = parse_handle(&req.handle)?;
    app.check_writable()?;
    let now = now_ms();
    let (product, ack) = {
        let mut inner = app.lock();
        let (product, served) = inner
            .book
            .checkin(handle, now, &mut new_handle)
            .map_err(|_| ApiError::BadHandle)?;
        let ack = app.log(
            &mut inner,
            Mutation::Checkin {
                handle,
                product: product.clone(),
            },
        );
        app.dispatch(&mut inner, served, now);
        pull(&app, &mut inner, &product, now);
        (product, ack)
    };
    app.metrics.checkin(&product);
    durable(ack).await?;
    Ok(Json(HandleResponse {
        handle: req.handle,
        staleout_in_seconds: 0,
    }))
}

/// Products with their allocation, in use, free and waiting.
#[utoipa::path(get, path = "/v1/products", tag = "clients", security(("clientKey" = []), ()),
    responses((status = 200, description = "Every product this server knows", body = AgentProducts)))]
async fn products_handler(State(app): State<App>, _auth: ClientAuth) -> Json<AgentProducts> {
    Json(AgentProducts {
        products: app.lock().book.products(),
    })
}

/// Reads `peek` from the status query: `true`/`1` reads without resetting the counters.
fn parse_peek(query: Option<&str>) -> Result<bool, ApiError> {
    let mut peek = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        peek = match pair {
            "peek" | "peek=true" | "peek=1" => true,
            "peek=false" | "peek=0" => false,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "query: expected peek=true or peek=false, got {:?}",
                    pair.chars().take(64).collect::<String>()
                )));
            }
        };
    }
    Ok(peek)
}

/// `GET /v1/status[?peek=true]`: a plain read resets the since-last counters (the balancer's
/// runs read them once per run); a peek (the doctor) leaves them for the next run.
#[utoipa::path(get, path = "/v1/status", tag = "balancer", security(("serverToken" = [])),
    params(("peek" = Option<bool>, Query, description = "`true`: read without resetting the `since_last` counters (the doctor)")),
    responses(
        (status = 200, description = "Per-product figures", body = AgentStatus),
        (status = 503, description = "`unavailable`: the store failed", body = ErrorBody)))]
async fn status_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    RawQuery(query): RawQuery,
) -> Result<Json<AgentStatus>, ApiError> {
    let peek = parse_peek(query.as_deref())?;
    let products = app.lock().book.status(!peek);
    // Report nothing that is not yet durable.
    app.barrier().await?;
    Ok(Json(AgentStatus {
        server: app.name.clone(),
        products,
    }))
}

async fn move_handler(
    app: &App,
    req: MoveRequest,
    release: bool,
) -> Result<Json<MoveResponse>, ApiError> {
    validate::path_name("product", &req.product)?;
    validate::units("units", req.units)?;
    app.check_writable()?;
    let now = now_ms();
    let (response, ack, fresh) = {
        let mut inner = app.lock();
        let outcome = if release {
            inner.book.release(req.move_id, &req.product, req.units)
        } else {
            inner
                .book
                .grant(req.move_id, &req.product, req.units, now, &mut new_handle)
        };
        let outcome = outcome.map_err(|r| match r {
            MoveRefusal::UnknownProduct => ApiError::UnknownProduct(req.product.clone()),
            MoveRefusal::Conflict => ApiError::Conflict(format!(
                "move {} was already applied as another move",
                req.move_id
            )),
        })?;
        let fresh = outcome.applied.is_some();
        let ack = match outcome.applied {
            Some(applied) => {
                let ack = app.log(&mut inner, Mutation::Move { applied, at: now });
                app.dispatch(&mut inner, outcome.served, now);
                pull(app, &mut inner, &req.product, now);
                tracing::info!(move_id = %req.move_id, product = %req.product, release,
                units = outcome.response.units, allocation = outcome.response.allocation,
                generation = outcome.response.generation, "move applied");
                ack
            }
            None => {
                // A repeat: answer only once the first application is durable.
                let (tx, rx) = oneshot::channel();
                let _ = app.writer.send(WriterMsg::Barrier(tx));
                rx
            }
        };
        (outcome.response, ack, fresh)
    };
    durable(ack).await?;
    if fresh && !release {
        crate::fault::point("agent_grant_applied");
    }
    Ok(Json(response))
}

/// Releases free units to the reserve (never in-use units); idempotent by `move_id`.
#[utoipa::path(post, path = "/v1/allocations/release", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "What was released, and the allocation after", body = MoveResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`conflict`: the move id was used for another move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
async fn release_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, true).await
}

/// Adds units from the reserve; idempotent by `move_id`.
#[utoipa::path(post, path = "/v1/allocations/grant", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "What was granted, and the allocation after", body = MoveResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`conflict`: the move id was used for another move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
async fn grant_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, false).await
}

/// Defines a product or replaces its policy and logs it.
fn define(
    app: &Shared,
    inner: &mut Inner,
    product: &str,
    def: ProductDefinition,
    now: Millis,
) -> oneshot::Receiver<bool> {
    let policy: allot_core::domain::Policy = def.into();
    let (_, served) = inner
        .book
        .define(product, policy.clone(), now, &mut new_handle);
    let (allocation, generation, _) = inner.book.figures(product).unwrap_or_default();
    let ack = app.log(
        inner,
        Mutation::Product {
            name: product.to_owned(),
            policy,
            allocation,
            generation,
        },
    );
    app.dispatch(inner, served, now);
    ack
}

/// Defines a product or replaces its policy (the balancer pushes definitions here).
#[utoipa::path(put, path = "/v1/products/{product}", tag = "balancer", security(("serverToken" = [])),
    params(("product" = String, Path, description = "The product's name")),
    request_body = ProductDefinition,
    responses(
        (status = 200, description = "The product as this server now applies it", body = AgentProduct),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
async fn define_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiPath(product): ApiPath<String>,
    ApiJson(def): ApiJson<ProductDefinition>,
) -> Result<Json<AgentProduct>, ApiError> {
    validate::path_name("product", &product)?;
    validate::policy(&def.clone().into())?;
    app.check_writable()?;
    let now = now_ms();
    let (ack, view) = {
        let mut inner = app.lock();
        let ack = define(&app, &mut inner, &product, def, now);
        let view = inner
            .book
            .products()
            .into_iter()
            .find(|p| p.product == product);
        (ack, view)
    };
    let view = view.ok_or_else(|| ApiError::Internal("defined product vanished".to_owned()))?;
    durable(ack).await?;
    tracing::info!(%product, "product defined");
    Ok(Json(view))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The process serves requests", body = Health)))]
async fn health_handler() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        leader: false,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Prometheus metrics (text exposition).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "The metrics", body = String, content_type = "text/plain")))]
async fn metrics_handler(State(app): State<App>) -> Response {
    let (products, live, lease) = {
        let inner = app.lock();
        (
            inner.book.products(),
            inner.book.live_checkouts(),
            inner.book.lease(),
        )
    };
    let left = lease.map(|until| until.saturating_sub(now_ms()) / 1000);
    let body = app.metrics.render(&products, live, left);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_handler() -> Json<&'static utoipa::openapi::OpenApi> {
    static DOCUMENT: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(crate::openapi::document))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Every route with its OpenAPI operation. `routes!` registers a handler at the path and
/// methods its `#[utoipa::path]` names, so a route cannot be served undocumented.
fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(health_handler))
        .routes(routes!(metrics_handler))
        .routes(routes!(openapi_handler))
        .routes(routes!(checkout_handler))
        .routes(routes!(heartbeat_handler))
        .routes(routes!(checkin_handler))
        .routes(routes!(products_handler))
        .routes(routes!(define_handler))
        .routes(routes!(status_handler))
        .routes(routes!(release_handler))
        .routes(routes!(grant_handler))
}

/// The operations of [`routes`], before the shared error responses are added.
pub(crate) fn documented_routes() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

fn router(app: App) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_refused,
        ))
        .with_state(app)
}

/// Logs and counts every request refused for its credentials, in one place whichever
/// extractor or policy refused it. The log names the method and path, never the presented
/// token; an ACL refusal (403) is an ordinary policy decision, logged at info.
async fn count_refused(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    match response.status() {
        StatusCode::UNAUTHORIZED => {
            app.metrics.refused(ErrorCode::Unauthorized);
            tracing::warn!(%method, %path, "request refused: bad or missing token");
        }
        StatusCode::FORBIDDEN => {
            app.metrics.refused(ErrorCode::Forbidden);
            tracing::info!(%method, %path, "request refused by an ACL");
        }
        _ => {}
    }
    response
}

/// The group-commit writer: takes every pending mutation, commits them in one transaction,
/// then acknowledges each. On a failed commit it poisons the server (memory is ahead of the
/// log) and answers every waiter with failure.
async fn writer_task(mut store: Store, mut rx: mpsc::UnboundedReceiver<WriterMsg>, app: App) {
    let mut msgs = Vec::with_capacity(1024);
    let mut batch: Vec<Mutation> = Vec::with_capacity(1024);
    let mut acks: Vec<oneshot::Sender<bool>> = Vec::with_capacity(1024);
    loop {
        if rx.recv_many(&mut msgs, 4096).await == 0 {
            return;
        }
        let mut close = None;
        for m in msgs.drain(..) {
            match m {
                WriterMsg::Write(m, ack) => {
                    batch.push(m);
                    acks.extend(ack);
                }
                WriterMsg::Barrier(ack) => acks.push(ack),
                WriterMsg::Close(done) => close = Some(done),
            }
        }
        let totals = {
            let inner = app.lock();
            if close.is_some() {
                inner.book.totals()
            } else {
                let touched = store::touched(&batch);
                inner
                    .book
                    .totals()
                    .into_iter()
                    .filter(|(n, _)| touched.contains(&n.as_str()))
                    .collect()
            }
        };
        let ok = if app.poisoned.load(Ordering::Relaxed) {
            false
        } else if batch.is_empty() && totals.is_empty() {
            true
        } else {
            match store.write_batch(&batch, &totals).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, mutations = batch.len(), "store write failed; refusing further changes");
                    app.poisoned.store(true, Ordering::Relaxed);
                    false
                }
            }
        };
        batch.clear();
        for a in acks.drain(..) {
            let _ = a.send(ok);
        }
        if let Some(done) = close {
            if let Err(e) = store.close().await {
                tracing::error!(error = %e, "closing the store failed");
            }
            let _ = done.send(());
            return;
        }
    }
}

/// Sleeps until the next deadline — a staleout, or a trigger re-evaluation that time alone
/// makes due — or until woken by an earlier one; then stales out what is due, hands the freed
/// units to waiters and evaluates the due triggers.
async fn timer_task(app: App) {
    let mut stopping = app.stopping.subscribe();
    loop {
        let next = {
            let mut inner = app.lock();
            let now = now_ms();
            let mut due: Vec<String> = inner
                .pulls
                .iter()
                .filter(|(_, t)| t.recheck_at.is_some_and(|at| at <= now))
                .map(|(p, _)| p.clone())
                .collect();
            due.sort_unstable();
            for product in due {
                pull(&app, &mut inner, &product, now);
            }
            let (staled, served) = inner.book.expire(now, &mut new_handle);
            let mut touched: Vec<Arc<str>> = Vec::new();
            for (handle, product) in staled {
                app.metrics.staleout(&product);
                tracing::info!(%product, "checkout staled out");
                touched.push(product.clone());
                app.log_quiet(&mut inner, Mutation::Checkin { handle, product });
            }
            app.dispatch(&mut inner, served, now);
            touched.sort_unstable();
            touched.dedup();
            for product in touched {
                pull(&app, &mut inner, &product, now);
            }
            let recheck = inner.pulls.values().filter_map(|t| t.recheck_at).min();
            let next = match (inner.book.next_deadline(), recheck) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            inner.armed = next.unwrap_or(Millis::MAX);
            next
        };
        // At most an hour: a far deadline is simply looked at again.
        let wait = next.map_or(MAX_TIMER_SLEEP, |d| {
            Duration::from_millis(d.saturating_sub(now_ms())).min(MAX_TIMER_SLEEP)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = app.timer_wake.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Evaluates the instant-balance trigger (`allot_core::trigger`) for `product` after a change
/// of its allocation, in-use count or queue, after an answer, and when the timer task finds it
/// due. When it asks, sends the request from a spawned task; either way, schedules the next
/// evaluation that time alone makes due (`next_check_at`: an in-flight request's end, a
/// back-off's end), so clients still waiting after an answer of none are asked for again.
/// Called with the lock held; never awaits, so the balancer's grant — which arrives on this
/// server's API while the request is in flight — takes the lock and wakes the waiters.
fn pull(app: &App, inner: &mut Inner, product: &str, now: Millis) {
    let Some(balancing) = &app.balancer else {
        return;
    };
    if let Some(track) = inner.pulls.get_mut(product) {
        track.recheck_at = None;
    }
    // Without a lease nothing is asked; the sync that renews it evaluates every product.
    if !inner.book.leased(now) {
        return;
    }
    match inner.book.policy(product) {
        Some(p) if p.enforcement != Enforcement::NoStop => {}
        _ => return,
    }
    let Some((allocation, _, in_use)) = inner.book.figures(product) else {
        return;
    };
    let short_units = inner.book.queued_units(product);
    let trigger = &balancing.config.trigger;
    let track = inner.pulls.entry(product.to_owned()).or_default();
    let mut state = TriggerState {
        now,
        allocation: u64::from(allocation),
        in_use: u64::from(in_use),
        short_units,
        in_flight_since: track.in_flight.map(|f| f.since),
        in_flight_urgent: track.in_flight.is_some_and(|f| f.urgent),
        in_flight_urgent_units: track.urgent_in_flight,
        short_answer_at: track.short_answer_at,
        urgent_short_at: track.urgent_short_at,
    };
    let asked = instant_request(&state, trigger).map(|p| {
        let request = InstantBalanceRequest {
            request_id: uuid::Uuid::new_v4(),
            product: product.to_owned(),
            units: u32::try_from(p.units).unwrap_or(u32::MAX),
            urgent_units: Some(u32::try_from(p.urgent).unwrap_or(u32::MAX)),
        };
        track.in_flight = Some(InFlight {
            id: request.request_id,
            since: now,
            urgent: p.urgent > 0,
        });
        track.urgent_in_flight += p.urgent;
        state.in_flight_since = Some(now);
        state.in_flight_urgent = p.urgent > 0;
        state.in_flight_urgent_units = track.urgent_in_flight;
        request
    });
    track.recheck_at = next_check_at(&state, trigger);
    if let Some(at) = track.recheck_at {
        app.arm(inner, at);
    }
    if let Some(request) = asked {
        inner.book.count_instant_request(product);
        tracing::debug!(%product, units = request.units, urgent = request.urgent(), allocation,
            in_use, short_units, request_id = %request.request_id,
            "asking the balancer for an instant balance");
        tokio::spawn(instant_balance(app.clone(), request));
    }
}

/// Sends one instant-balance request and books its answer: clears the in-flight mark, records a
/// short answer (a failed request counts as an answer of none) and evaluates the trigger again:
/// while clients are still short a burst is served by a chain of requests, one at a time, and
/// after a short answer the trigger's back-off says when to ask again.
async fn instant_balance(app: App, request: InstantBalanceRequest) {
    let Some(balancing) = &app.balancer else {
        return;
    };
    let result = balancing.link.instant(&request).await;
    let now = now_ms();
    let product = request.product.as_str();
    let granted = result.as_ref().map_or(0, |a| a.granted);
    let outcome = match &result {
        Ok(_) if granted >= u64::from(request.units) => InstantOutcome::Granted,
        Ok(_) => InstantOutcome::Short,
        Err(_) => InstantOutcome::Failed,
    };
    app.metrics.instant_request(product, outcome);
    {
        let mut inner = app.lock();
        if let Some(track) = inner.pulls.get_mut(product) {
            if track.in_flight.is_some_and(|f| f.id == request.request_id) {
                track.in_flight = None;
            }
            track.urgent_in_flight = track
                .urgent_in_flight
                .saturating_sub(u64::from(request.urgent()));
            if track.in_flight.is_none() {
                track.urgent_in_flight = 0;
            }
            if granted < u64::from(request.units) {
                track.short_answer_at = Some(now);
            }
            if granted < u64::from(request.urgent()) {
                track.urgent_short_at = Some(now);
            }
        }
        pull(&app, &mut inner, product, now);
    }
    match result {
        Ok(answer) => {
            tracing::debug!(%product, asked = request.units, urgent = request.urgent(),
                granted = answer.granted, allocation = answer.allocation,
                "instant balance answered");
        }
        Err(e) => {
            let ready = app
                .instant_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ready(FAILURE_LOG_EVERY);
            if let Some(held_back) = ready {
                tracing::warn!(%product, units = request.units, error = %e, held_back,
                    "instant balance failed; held checkouts are denied after the hold bound");
            }
        }
    }
}

/// Applies a sync answer: defines or updates every product's policy, adopts the books'
/// allocations after a reset, renews the lease (`sent + lease_seconds`) and waits until all of
/// it is durable.
async fn apply_sync(app: &App, resp: SyncResponse, sent: Millis) -> Result<(), String> {
    let until = sent.saturating_add(u64::from(resp.lease_seconds).saturating_mul(1000));
    let acks = {
        let mut inner = app.lock();
        let now = now_ms();
        let mut acks = Vec::new();
        for p in resp.products {
            if let Err(e) =
                validate::path_name("product", &p.name).and_then(|()| validate::policy(&p.policy))
            {
                tracing::warn!(product = %p.name, error = %e, "sync: product skipped");
                continue;
            }
            if inner.book.policy(&p.name) != Some(&p.policy) {
                tracing::info!(product = %p.name, "sync: product defined or its policy updated");
                acks.push(define(app, &mut inner, &p.name, p.policy.into(), now));
            }
        }
        if resp.reset {
            let books: HashMap<&str, (u32, u64)> = resp
                .allocations
                .iter()
                .map(|a| {
                    let units = u32::try_from(a.units).unwrap_or(u32::MAX);
                    (a.product.as_str(), (units, a.generation))
                })
                .collect();
            for view in inner.book.products() {
                let (units, generation) = books
                    .get(view.product.as_str())
                    .copied()
                    .unwrap_or_default();
                let Some((allocation, generation, served)) = inner.book.adopt_allocation(
                    &view.product,
                    units,
                    generation,
                    now,
                    &mut new_handle,
                ) else {
                    continue;
                };
                acks.push(app.log(
                    &mut inner,
                    Mutation::Product {
                        name: view.product.clone(),
                        policy: view.policy,
                        allocation,
                        generation,
                    },
                ));
                app.dispatch(&mut inner, served, now);
                tracing::warn!(product = %view.product, before = view.allocated, allocation,
                    generation, in_use = view.in_use,
                    "this server had been declared lost: adopted the balancer's allocation");
            }
        }
        let served = inner.book.set_lease(Some(until), now, &mut new_handle);
        acks.push(app.log(
            &mut inner,
            Mutation::Lease(LeaseRecord {
                until,
                synced_at: sent,
            }),
        ));
        app.dispatch(&mut inner, served, now);
        inner.synced_at = Some(sent);
        for view in inner.book.products() {
            pull(app, &mut inner, &view.product, now);
        }
        acks
    };
    for ack in acks {
        durable(ack)
            .await
            .map_err(|e| format!("cannot store the sync: {e}"))?;
    }
    Ok(())
}

/// Syncs with the balancer at start and every sync interval: learns the products, renews the
/// lease, adopts the books after a reset. A failure never stops the server; it is logged with
/// its reason (at most once a minute) and retried at the next interval.
async fn sync_task(app: App) {
    let Some(balancing) = &app.balancer else {
        return;
    };
    let mut stopping = app.stopping.subscribe();
    let mut throttle = Throttle::default();
    let mut failing = false;
    let mut named = false;
    loop {
        let attempt = tokio::select! {
            r = balancing.link.sync(now_ms) => Some(r),
            _ = stopping.wait_for(|s| *s) => None,
        };
        let Some(attempt) = attempt else { return };
        let result = match attempt {
            Ok((sent, resp)) => {
                if !named && resp.server != app.name {
                    tracing::warn!(balancer_name = %resp.server, name = %app.name,
                        "the balancer knows this server under another name than --name");
                }
                named = true;
                let reset = resp.reset;
                apply_sync(&app, resp, sent).await.map(|()| reset)
            }
            Err(e) => Err(e),
        };
        app.metrics.balancer_up(result.is_ok());
        match result {
            Ok(reset) => {
                if failing || reset {
                    tracing::info!(reset, "sync with the balancer succeeded; lease renewed");
                }
                failing = false;
                throttle = Throttle::default();
            }
            Err(e) => {
                failing = true;
                if let Some(held_back) = throttle.ready(FAILURE_LOG_EVERY) {
                    let (lease, synced_at) = {
                        let inner = app.lock();
                        (inner.book.lease().unwrap_or(0), inner.synced_at)
                    };
                    let lease = if lease == 0 {
                        "none".to_owned()
                    } else {
                        rfc3339(lease)
                    };
                    tracing::warn!(error = %e, held_back, lease_until = %lease,
                        last_sync = %synced_at.map_or_else(|| "never".to_owned(), rfc3339),
                        "sync with the balancer failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(balancing.config.sync_interval) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Runs the metering server on `listener` until `shutdown` resolves, then stops accepting,
/// finishes in-flight requests (waiting clients are answered `unavailable`), flushes the log
/// and closes the store.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let balancer = match &config.balancer {
        Some(b) => {
            let token = config.token.as_deref().ok_or_else(|| {
                ServeError::Balancer(
                    "--balancer needs --token (the server's token, presented to the balancer)"
                        .to_owned(),
                )
            })?;
            if b.urls.is_empty() {
                return Err(ServeError::Balancer("--balancer names no URL".to_owned()));
            }
            let mut config = b.clone();
            // An urgent pull is held back at most the hold bound (`trigger` rules 2 and 3).
            config.trigger.urgent_retry_ms = u64::try_from(b.instant_wait.as_millis())
                .unwrap_or(u64::MAX)
                .max(MIN_URGENT_RETRY_MS);
            Some(Balancing {
                link: BalancerLink::new(b, token),
                config,
            })
        }
        None => None,
    };
    let mut store = Store::open(&config.data_dir).await?;
    let mut book = Book::new(config.limits);
    let now = now_ms();
    store.load(&mut book, now).await?;
    let lease = store.load_lease().await?;
    if balancer.is_some() {
        // Never synced: no lease, so no new checkouts until the first sync succeeds.
        book.set_lease(Some(lease.map_or(0, |l| l.until)), now, &mut new_handle);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (stopping, _) = watch::channel(false);
    let app: App = Arc::new(Shared {
        inner: Mutex::new(Inner {
            book,
            waiters: HashMap::new(),
            armed: Millis::MAX,
            pulls: HashMap::new(),
            synced_at: lease.map(|l| l.synced_at),
        }),
        writer: tx,
        timer_wake: Notify::new(),
        metrics: Metrics::with_balancer(balancer.is_some()).named(&config.name),
        token: config.token.as_deref().map(hash),
        client_key: config.client_key.as_deref().map(hash),
        name: config.name.clone(),
        poisoned: AtomicBool::new(false),
        stopping,
        balancer,
        instant_failures: Mutex::new(Throttle::default()),
    });
    let writer = tokio::spawn(writer_task(store, rx, app.clone()));

    // Local product definitions (standalone use), logged like any other change.
    let mut acks = Vec::new();
    for lp in &config.products {
        validate::path_name("product", &lp.product)
            .and_then(|()| validate::policy(&lp.policy.clone().into()))
            .map_err(|e| ServeError::Config(format!("{}: {e}", lp.product)))?;
        let mut inner = app.lock();
        acks.push(define(
            &app,
            &mut inner,
            &lp.product,
            lp.policy.clone(),
            now,
        ));
        if let Some(target) = lp.allocation
            && let Some((allocation, generation, served)) =
                inner
                    .book
                    .set_allocation(&lp.product, target, now, &mut new_handle)
        {
            let policy = lp.policy.clone().into();
            acks.push(app.log(
                &mut inner,
                Mutation::Product {
                    name: lp.product.clone(),
                    policy,
                    allocation,
                    generation,
                },
            ));
            app.dispatch(&mut inner, served, now);
            if allocation != target {
                tracing::warn!(product = %lp.product, target, allocation,
                        "allocation lowered only to the units in use");
            }
        }
    }
    for ack in acks {
        durable(ack)
            .await
            .map_err(|e| ServeError::Config(format!("cannot store local products: {e}")))?;
    }

    let addr = listener.local_addr()?;
    {
        let inner = app.lock();
        tracing::info!(
            listen = %addr,
            name = %config.name,
            data_dir = %config.data_dir.display(),
            products = inner.book.products().len(),
            live_checkouts = inner.book.live_checkouts(),
            balancer_api = config.token.is_some(),
            tls = config.tls.is_some(),
            client_key = config.client_key.is_some(),
            max_checkouts = config.limits.max_checkouts,
            max_waiting = config.limits.max_waiting,
            balancer = ?config.balancer.as_ref().map(|b| &b.urls),
            lease_until = ?inner.book.lease().map(rfc3339),
            "metering server started"
        );
    }
    if config.token.is_none() {
        tracing::warn!("no --token configured: the balancer-facing API answers 401");
    }
    if config.client_key.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(listen = %addr, "no --client-key configured and listening beyond loopback: any host that reaches this port can check licenses out");
    }
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(listen = %addr, "plain HTTP beyond loopback: tokens and keys cross the network in clear text; use --tls-cert/--tls-key or a TLS-terminating proxy");
    }

    let timer = tokio::spawn(timer_task(app.clone()));
    let sync = tokio::spawn(sync_task(app.clone()));
    let stop_app = app.clone();
    let graceful = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        stop_app.stopping.send_replace(true);
    };
    let served = match &config.tls {
        Some(tls) => match tls.listener(listener) {
            Ok(listener) => {
                axum::serve(listener, router(app.clone()))
                    .with_graceful_shutdown(graceful)
                    .await
            }
            Err(e) => Err(e),
        },
        None => {
            axum::serve(listener, router(app.clone()))
                .with_graceful_shutdown(graceful)
                .await
        }
    };
    app.stopping.send_replace(true);
    let _ = timer.await;
    let _ = sync.await;
    let (done_tx, done_rx) = oneshot::channel();
    let _ = app.writer.send(WriterMsg::Close(done_tx));
    let _ = done_rx.await;
    let _ = writer.await;
    tracing::info!("metering server stopped; store closed");
    served?;
    Ok(())
}

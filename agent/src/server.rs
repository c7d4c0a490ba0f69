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

use crate::error::{ApiError, ApiJson};
use crate::metrics::{DenialReason, Metrics};
use crate::store::{self, Mutation, Store, StoreError};
use allot_core::checkout::{
    self, Book, Handle, Limits, Millis, MoveRefusal, Outcome, Refusal, Served, Who,
};
use allot_core::validate::{self, MAX_BODY_BYTES};
use allot_core::wire::Health;
use allot_core::wire::agent::{
    AgentProduct, AgentProducts, AgentStatus, CheckoutRequest, CheckoutResponse, HandleRequest,
    HandleResponse, MoveRequest, MoveResponse, ProductDefinition,
};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
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

/// The state behind the lock.
struct Inner {
    book: Book,
    /// Wake-up channels of queued clients, by waiter id.
    waiters: HashMap<u64, oneshot::Sender<WaiterGrant>>,
    /// The deadline the staleout task sleeps until, so a checkout only wakes it when earlier.
    armed: Millis,
}

/// What every handler shares.
struct Shared {
    inner: Mutex<Inner>,
    writer: mpsc::UnboundedSender<WriterMsg>,
    staleout_wake: Notify,
    metrics: Metrics,
    token: Option<[u8; 32]>,
    client_key: Option<[u8; 32]>,
    name: String,
    /// Set when a batch failed to commit: memory is ahead of the log, so refuse mutations.
    poisoned: AtomicBool,
    stopping: watch::Sender<bool>,
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

    /// Wakes the staleout task if a new deadline is earlier than the one it sleeps until.
    fn arm(&self, inner: &mut Inner, deadline: Millis) {
        if deadline < inner.armed {
            inner.armed = deadline;
            self.staleout_wake.notify_one();
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
    app: &'a Shared,
    product: String,
    waiter: u64,
    rx: Option<oneshot::Receiver<WaiterGrant>>,
}

impl QueuedGuard<'_> {
    /// Leaves the queue (timeout or shutdown). Returns a grant that raced with the leaving.
    fn leave(&mut self, timed_out: bool) -> Option<WaiterGrant> {
        let mut inner = self.app.lock();
        if inner
            .book
            .cancel_wait(&self.product, self.waiter, timed_out)
        {
            inner.waiters.remove(&self.waiter);
            self.rx = None;
            return None;
        }
        drop(inner);
        // Not queued any more: it was served under the lock, so the grant is already sent.
        self.rx.take().and_then(|mut rx| rx.try_recv().ok())
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if self.rx.is_some()
            && let Some(g) = self.leave(false)
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
    let next = {
        let mut inner = app.lock();
        let outcome = inner.book.checkout(
            &req.product,
            who,
            req.units,
            req.wait_seconds > 0,
            now,
            new_handle(),
        );
        match outcome {
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
            Err(refusal) => Err(refusal),
        }
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
        Err(refusal) => Err(refused(&app, &req.product, refusal)),
    }
}

fn policy_staleout(inner: &Inner, product: &str) -> u32 {
    inner.book.policy(product).map_or(0, |p| p.staleout_seconds)
}

fn refused(app: &Shared, product: &str, refusal: Refusal) -> ApiError {
    match refusal {
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
    app: &Shared,
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
    let wait = Duration::from_secs(u64::from(req.wait_seconds));
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
            Some(g)
        }
        None => guard.leave(!*app.stopping.borrow()),
    };
    drop(guard);
    let Some(WaiterGrant {
        served,
        durable: ack,
    }) = got
    else {
        if *app.stopping.borrow() {
            return Err(ApiError::Unavailable("the server is stopping".to_owned()));
        }
        app.metrics.denial(&req.product, DenialReason::Timeout);
        return Err(ApiError::LicenseUnavailable(format!(
            "no unit of {:?} freed within {} s",
            req.product, req.wait_seconds
        )));
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
        (product, ack)
    };
    app.metrics.checkin(&product);
    durable(ack).await?;
    Ok(Json(HandleResponse {
        handle: req.handle,
        staleout_in_seconds: 0,
    }))
}

async fn products_handler(State(app): State<App>, _auth: ClientAuth) -> Json<AgentProducts> {
    Json(AgentProducts {
        products: app.lock().book.products(),
    })
}

async fn status_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
) -> Result<Json<AgentStatus>, ApiError> {
    let products = app.lock().book.status(true);
    // Report nothing that is not yet durable.
    app.barrier().await?;
    Ok(Json(AgentStatus {
        server: app.name.clone(),
        products,
    }))
}

async fn move_handler(
    app: &Shared,
    req: MoveRequest,
    release: bool,
) -> Result<Json<MoveResponse>, ApiError> {
    validate::path_name("product", &req.product)?;
    validate::units("units", req.units)?;
    app.check_writable()?;
    let now = now_ms();
    let (response, ack) = {
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
        let ack = match outcome.applied {
            Some(applied) => {
                let ack = app.log(&mut inner, Mutation::Move { applied, at: now });
                app.dispatch(&mut inner, outcome.served, now);
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
        (outcome.response, ack)
    };
    durable(ack).await?;
    Ok(Json(response))
}

async fn release_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, true).await
}

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

async fn define_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    Path(product): Path<String>,
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

async fn health_handler() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        leader: false,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn metrics_handler(State(app): State<App>) -> Response {
    let (products, live) = {
        let inner = app.lock();
        (inner.book.products(), inner.book.live_checkouts())
    };
    let body = app.metrics.render(&products, live);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

async fn openapi_handler() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .route("/v1/openapi.json", get(openapi_handler))
        .route("/v1/checkout", post(checkout_handler))
        .route("/v1/heartbeat", post(heartbeat_handler))
        .route("/v1/checkin", post(checkin_handler))
        .route("/v1/products", get(products_handler))
        .route("/v1/products/{product}", put(define_handler))
        .route("/v1/status", get(status_handler))
        .route("/v1/allocations/release", post(release_handler))
        .route("/v1/allocations/grant", post(grant_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
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

/// Sleeps until the next staleout deadline (or until woken by an earlier one), then stales out
/// what is due and hands the freed units to waiters.
async fn staleout_task(app: App) {
    let mut stopping = app.stopping.subscribe();
    loop {
        let next = {
            let mut inner = app.lock();
            let now = now_ms();
            let (staled, served) = inner.book.expire(now, &mut new_handle);
            for (handle, product) in staled {
                app.metrics.staleout(&product);
                tracing::info!(%product, "checkout staled out");
                app.log_quiet(&mut inner, Mutation::Checkin { handle, product });
            }
            app.dispatch(&mut inner, served, now);
            let next = inner.book.next_deadline();
            inner.armed = next.unwrap_or(Millis::MAX);
            next
        };
        let sleep = match next {
            Some(d) => {
                tokio::time::Instant::now() + Duration::from_millis(d.saturating_sub(now_ms()))
            }
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(sleep) => {}
            _ = app.staleout_wake.notified() => {}
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
    let mut store = Store::open(&config.data_dir).await?;
    let mut book = Book::new(config.limits);
    let now = now_ms();
    store.load(&mut book, now).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (stopping, _) = watch::channel(false);
    let app: App = Arc::new(Shared {
        inner: Mutex::new(Inner {
            book,
            waiters: HashMap::new(),
            armed: Millis::MAX,
        }),
        writer: tx,
        staleout_wake: Notify::new(),
        metrics: Metrics::new(),
        token: config.token.as_deref().map(hash),
        client_key: config.client_key.as_deref().map(hash),
        name: config.name.clone(),
        poisoned: AtomicBool::new(false),
        stopping,
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
            client_key = config.client_key.is_some(),
            max_checkouts = config.limits.max_checkouts,
            max_waiting = config.limits.max_waiting,
            "metering server started"
        );
    }
    if config.token.is_none() {
        tracing::warn!("no --token configured: the balancer-facing API answers 401");
    }
    if config.client_key.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(listen = %addr, "no --client-key configured and listening beyond loopback: any host that reaches this port can check licenses out");
    }

    let staleout = tokio::spawn(staleout_task(app.clone()));
    let stop_app = app.clone();
    let served = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            stop_app.stopping.send_replace(true);
        })
        .await;
    app.stopping.send_replace(true);
    let _ = staleout.await;
    let (done_tx, done_rx) = oneshot::channel();
    let _ = app.writer.send(WriterMsg::Close(done_tx));
    let _ = done_rx.await;
    let _ = writer.await;
    tracing::info!("metering server stopped; store closed");
    served?;
    Ok(())
}

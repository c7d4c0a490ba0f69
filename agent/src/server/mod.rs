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
//!
//! Where each part lives:
//! - this module: the shared state (`Shared`, the book behind its lock), the router and [`run`];
//! - `config`: [`ServerConfig`], the `--products-file` format and [`ServeError`];
//! - `auth`: the balancer-token and client-key extractors;
//! - `handlers`: the HTTP handlers by caller (clients, balancer, meta) and their route table;
//! - `openapi`: the document of that table, and the route serving it;
//! - `writer`: the group-commit writer;
//! - `tasks`: the timer task (staleouts, due trigger re-evaluations);
//! - `pull`: the instant-balance trigger's shell and its request to the balancer;
//! - `sync`: the periodic sync with the balancer (products, lease, reset).

mod auth;
mod callbacks;
mod config;
mod handlers;
pub mod openapi;
mod pull;
mod records;
mod sync;
mod tasks;
mod writer;

pub use config::{LocalProduct, ProductsFile, ServeError, ServerConfig};
pub use handlers::MAX_WAIT_SECONDS;

use crate::balancer::{BalancerConfig, BalancerLink};
use crate::clock::{now_ms, rfc3339};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Mutation, Store};
use allot_core::checkout::{Book, Handle, Millis, Served};
use allot_core::validate::{self, MAX_BODY_BYTES};
use allot_core::wire::agent::ProductDefinition;
use allot_http::refusals::{Refusals, count_refused};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use pull::PullTrack;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use writer::WriterMsg;

/// A fresh random handle (128 bits from the OS's generator via UUID v4).
fn new_handle() -> Handle {
    Handle(uuid::Uuid::new_v4().as_u128())
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
    /// The deadline the timer task sleeps until (a staleout or a trigger re-evaluation), so a
    /// new deadline only wakes it when earlier.
    armed: Millis,
    /// Instant-balance trigger state, by product.
    pulls: HashMap<String, PullTrack>,
    /// When the last successful sync was sent, so an expired lease can say since when the
    /// balancer has been unreachable.
    synced_at: Option<Millis>,
    /// Clients' callbacks, by id and by waiter.
    callbacks: callbacks::Callbacks,
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
    /// Hosts a callback's webhook may name (`--callback-hosts`).
    callback_hosts: Vec<String>,
    /// Calls the callbacks' webhooks.
    webhooks: reqwest::Client,
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
                None => {
                    let Inner {
                        callbacks, book, ..
                    } = &mut *inner;
                    match callbacks.served(s.waiter, &s.grant, book, now) {
                        Some((id, webhook)) => {
                            self.callback_ready(inner, id, webhook, now);
                            true
                        }
                        None => false,
                    }
                }
            };
            if !delivered {
                let (product, more) = match inner.book.give_back(handle, now, &mut new_handle) {
                    Ok(x) => x,
                    Err(_) => continue,
                };
                // Its client never had it: no usage to record.
                let usage = None;
                self.log_quiet(
                    inner,
                    Mutation::Checkin {
                        handle,
                        product,
                        usage,
                    },
                );
                queue.extend(more);
            }
        }
    }

    /// A unit is kept for callback `id`: the timer learns the hold's deadline, and its webhook,
    /// if any, is called (a few tries; the client's long-poll is the fallback).
    fn callback_ready(&self, inner: &mut Inner, id: u128, webhook: Option<String>, now: Millis) {
        let Some(c) = inner.callbacks.get_mut(id) else {
            return;
        };
        let until = c.claim_by.unwrap_or(now);
        let status = c.status(id, &inner.book, now);
        self.arm(inner, until);
        self.metrics.callback_ready(&status.product);
        let Some(url) = webhook else {
            return;
        };
        let client = self.webhooks.clone();
        tokio::spawn(async move {
            for attempt in 1..=3u32 {
                match client.post(&url).json(&status).send().await {
                    Ok(r) if r.status().is_success() => return,
                    Ok(r) => {
                        tracing::warn!(status = %r.status(), attempt, "callback webhook refused")
                    }
                    Err(e) => tracing::warn!(error = %e, attempt, "callback webhook failed"),
                }
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
        });
    }

    /// Checks in a checkout whose client will never learn its handle (its request was dropped).
    fn abandon(&self, handle: Handle) {
        let mut inner = self.lock();
        let now = now_ms();
        if let Ok((product, served)) = inner.book.give_back(handle, now, &mut new_handle) {
            let usage = None;
            self.log_quiet(
                &mut inner,
                Mutation::Checkin {
                    handle,
                    product,
                    usage,
                },
            );
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
        writer::durable(rx).await
    }
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

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Refusals counted in this server's metrics; a 403 is a product's ACL deciding, not a
/// credential refused.
fn refusals(app: App) -> Refusals {
    Refusals::new(move |reason| app.metrics.refused(reason)).forbidden_by_acl()
}

/// The whole API: the documented routes, the JSON error shape for unknown paths and methods,
/// the body limit and the refusal counting.
fn router(app: App) -> Router {
    let (router, _) = openapi::routes().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            refusals(app.clone()),
            count_refused,
        ))
        .with_state(app)
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
                .max(pull::MIN_URGENT_RETRY_MS);
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
            callbacks: callbacks::Callbacks::default(),
        }),
        writer: tx,
        timer_wake: Notify::new(),
        metrics: Metrics::with_balancer(balancer.is_some()).named(&config.name),
        token: config.token.as_deref().map(auth::hash),
        client_key: config.client_key.as_deref().map(auth::hash),
        name: config.name.clone(),
        poisoned: AtomicBool::new(false),
        stopping,
        balancer,
        instant_failures: Mutex::new(Throttle::default()),
        callback_hosts: config.callback_hosts.clone(),
        webhooks: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ServeError::Balancer(format!("webhook client: {e}")))?,
    });
    let commits = Arc::new(Notify::new());
    let writer = writer::spawn(store.into_writer().await?, rx, app.clone(), commits.clone())?;
    let checkpointer = tokio::spawn(
        crate::store::Checkpointer::open(&config.data_dir)
            .await?
            .run(app.stopping.subscribe(), commits),
    );

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
        writer::durable(ack)
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

    let timer = tokio::spawn(tasks::timer_task(app.clone()));
    let sync = tokio::spawn(sync::sync_task(app.clone()));
    let shipper = tokio::spawn(records::ship_task(app.clone(), config.data_dir.clone()));
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
    let _ = shipper.await;
    let _ = checkpointer.await;
    let (done_tx, done_rx) = oneshot::channel();
    let _ = app.writer.send(WriterMsg::Close(done_tx));
    let _ = done_rx.await;
    // It has closed the store and is returning.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    tracing::info!("metering server stopped; store closed");
    served?;
    Ok(())
}

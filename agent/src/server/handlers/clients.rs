//! The clients' calls: checkout (granted at once, or queued first come first served, or held
//! for an instant balance), heartbeat, checkin and the product list. Every decision is the
//! book's; these handlers validate, log the decision to the writer and answer once durable.

use super::super::auth::ClientAuth;
use super::super::pull::pull;
use super::super::records;
use super::super::writer::durable;
use super::super::{App, Inner, Shared, WaiterGrant, new_handle};
use super::holders::revoke_locked;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::metrics::DenialReason;
use crate::store::Mutation;
use allot_core::ErrorCode;
use allot_core::checkout::{
    self, BadHandle, CheckoutId, Handle, IdleVerdict, Millis, Outcome, Refusal, Who,
};
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::{
    AgentProducts, BorrowRequest, BorrowResponse, CheckoutRequest, CheckoutResponse, HandleRequest,
    HandleResponse, HeartbeatRequest,
};
use allot_core::wire::records::EndedBy;
use axum::Json;
use axum::extract::State;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The longest a client may ask to wait in the queue: one hour.
pub const MAX_WAIT_SECONDS: u32 = 3600;

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

/// How a queued client's wait ended. Lives on one request's stack, once: not boxed.
#[allow(clippy::large_enum_variant)]
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

fn parse_handle(s: &str) -> Result<Handle, ApiError> {
    s.parse().map_err(|_| ApiError::BadHandle)
}

/// The answer to a heartbeat or checkin of a handle that is not live.
fn handle_refused(refusal: BadHandle) -> ApiError {
    match refusal {
        BadHandle::Unknown => ApiError::BadHandle,
        BadHandle::Revoked { at, reason } => ApiError::LicenseRevoked(format!(
            "this checkout was revoked at {}: {reason}",
            rfc3339(at)
        )),
    }
}

pub(super) fn validate_checkout(req: &CheckoutRequest) -> Result<(), ApiError> {
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
pub(super) async fn checkout_handler(
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
        Err((refusal, synced_at)) => Err(refused(&app, &req, refusal, synced_at)),
    }
}

fn policy_staleout(inner: &Inner, product: &str) -> u32 {
    inner.book.policy(product).map_or(0, |p| p.staleout_seconds)
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

/// Counts a denial and records it for the balancer (its outbox row commits with the next
/// batch; a denial changes nothing else, so nothing waits for it).
fn denied(app: &Shared, req: &CheckoutRequest, reason: DenialReason, code: ErrorCode) {
    app.metrics.denial(&req.product, reason);
    let now = now_ms();
    let Some(mut record) = records::denial(
        app,
        &req.product,
        &req.user,
        &req.host,
        &req.groups,
        code.as_str(),
        now,
    ) else {
        return;
    };
    let mut inner = app.lock();
    // A shortage denial takes the class the balancer gave the shortfall it answered last
    // (within the hold bound and a margin); a policy denial has none.
    if matches!(reason, DenialReason::Unavailable | DenialReason::Timeout) {
        record.free_elsewhere = inner
            .pulls
            .get(&req.product)
            .and_then(|t| t.shortage(now, SHORTAGE_CLASS_MS));
    }
    app.log_quiet(&mut inner, Mutation::Denial(record));
}

/// How long the balancer's classification of a shortfall describes the denials after it.
const SHORTAGE_CLASS_MS: Millis = 10_000;

pub(super) fn refused(
    app: &Shared,
    req: &CheckoutRequest,
    refusal: Refusal,
    synced_at: Option<Millis>,
) -> ApiError {
    let product = req.product.as_str();
    match refusal {
        Refusal::LeaseExpired { since } => {
            // Not a denial: no move of units could have prevented it.
            app.metrics.lease_refusal(product);
            ApiError::LicenseExpired(lease_message(since, synced_at))
        }
        Refusal::UnknownProduct => ApiError::UnknownProduct(product.to_owned()),
        Refusal::Forbidden(why) => {
            denied(app, req, DenialReason::Forbidden, ErrorCode::Forbidden);
            ApiError::Forbidden(why.to_string())
        }
        Refusal::Unavailable => {
            denied(
                app,
                req,
                DenialReason::Unavailable,
                ErrorCode::LicenseUnavailable,
            );
            ApiError::LicenseUnavailable(format!("no free unit of {product:?} on this server"))
        }
        Refusal::Limit { scope, name, max } => {
            denied(app, req, DenialReason::PolicyLimit, ErrorCode::LimitReached);
            ApiError::LimitReached(format!(
                "the limit for {scope} {name:?} on {product:?} is reached: at most {max} \
                 unit(s) held at once on this server"
            ))
        }
        Refusal::BorrowNotAllowed => ApiError::Forbidden(format!(
            "{product:?} may not be borrowed (its policy's max_borrow_hours is 0)"
        )),
        Refusal::BorrowTooLong { max_hours } => ApiError::BadRequest(format!(
            "hours: {product:?} may be borrowed for at most {max_hours} hours"
        )),
        Refusal::Full => {
            denied(app, req, DenialReason::Limit, ErrorCode::Unavailable);
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
        denied(
            app,
            req,
            DenialReason::Unavailable,
            ErrorCode::LicenseUnavailable,
        );
        return ApiError::LicenseUnavailable(format!(
            "no free unit of {:?} on this server, and none arrived from the balancer \
             within {} ms",
            req.product,
            wait.as_millis()
        ));
    }
    denied(
        app,
        req,
        DenialReason::Timeout,
        ErrorCode::LicenseUnavailable,
    );
    ApiError::LicenseUnavailable(format!(
        "no unit of {:?} freed within {} s",
        req.product, req.wait_seconds
    ))
}

/// Keeps a checkout alive; with the client's idle time, applies the product's idle rules (a
/// notice in the answer, then the checkout revoked and recorded as ended by `idle`).
#[utoipa::path(post, path = "/v1/heartbeat", tag = "clients", security(("clientKey" = []), ()),
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "The checkout's new staleout, and an idle notice if one is due", body = HandleResponse),
        (status = 400, description = "`bad_request`: a malformed handle or idle time", body = ErrorBody),
        (status = 404, description = "`bad_handle`: unknown or staled out", body = ErrorBody),
        (status = 410, description = "`license_revoked`: an administrator revoked this checkout, or it was idle past the product's `idle_revoke_seconds`; stop using the product", body = ErrorBody)))]
pub(super) async fn heartbeat_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HandleResponse>, ApiError> {
    let handle = parse_handle(&req.handle)?;
    if req.idle_seconds.is_some_and(|s| s > MAX_IDLE_SECONDS) {
        return Err(ApiError::BadRequest(format!(
            "idle_seconds: must be at most {MAX_IDLE_SECONDS}"
        )));
    }
    let now = now_ms();
    let beat = {
        let mut inner = app.lock();
        let beat = inner
            .book
            .heartbeat(handle, req.idle_seconds, now)
            .map_err(handle_refused)?;
        match beat {
            (_, IdleVerdict::Revoke { idle_seconds }) => {
                app.check_writable()?;
                let limit = inner
                    .book
                    .product_of(handle)
                    .and_then(|p| inner.book.policy(p))
                    .map_or(0, |p| p.options.idle_revoke_seconds);
                let reason = format!(
                    "idle for {idle_seconds} s (the product's idle_revoke_seconds is {limit})"
                );
                let id = CheckoutId::of(handle);
                let (outcome, _, ack) =
                    revoke_locked(&app, &mut inner, id, &reason, EndedBy::Idle, now)?;
                Err((outcome.holder.product, id, reason, ack))
            }
            beat => Ok(beat),
        }
    };
    let (deadline, verdict) = match beat {
        Ok(beat) => beat,
        Err((product, id, reason, ack)) => {
            durable(ack).await?;
            app.metrics.revocation(&product);
            tracing::info!(checkout = %id, product = %product, %reason,
                "checkout revoked for idleness");
            return Err(ApiError::LicenseRevoked(format!(
                "this checkout was revoked at {}: {reason}",
                rfc3339(now)
            )));
        }
    };
    app.metrics.heartbeat();
    let (notice, idle_revoke_in_seconds) = match verdict {
        IdleVerdict::Notify { revoke_in } => (
            Some(match revoke_in {
                Some(s) => format!(
                    "this checkout is idle; it will be taken back after {s} s more of idleness"
                ),
                None => "this checkout is idle; check it in if you no longer use it".to_owned(),
            }),
            revoke_in,
        ),
        _ => (None, None),
    };
    Ok(Json(HandleResponse {
        handle: req.handle,
        staleout_in_seconds: checkout::seconds_until(deadline, now),
        notice,
        idle_revoke_in_seconds,
    }))
}

/// The longest idle time a heartbeat may report: a year.
const MAX_IDLE_SECONDS: u32 = 31_536_000;

/// Ends a checkout.
#[utoipa::path(post, path = "/v1/checkin", tag = "clients", security(("clientKey" = []), ()),
    request_body = HandleRequest,
    responses(
        (status = 200, description = "Checked in", body = HandleResponse),
        (status = 404, description = "`bad_handle`: unknown or staled out", body = ErrorBody),
        (status = 410, description = "`license_revoked`: an administrator revoked this checkout (its units are already free)", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn checkin_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<HandleRequest>,
) -> Result<Json<HandleResponse>, ApiError> {
    let handle = parse_handle(&req.handle)?;
    app.check_writable()?;
    let now = now_ms();
    let (product, ack) = {
        let mut inner = app.lock();
        let ended = inner.book.ended(handle);
        let (product, served) = inner
            .book
            .checkin(handle, now, &mut new_handle)
            .map_err(handle_refused)?;
        let ack = app.log(
            &mut inner,
            Mutation::Checkin {
                handle,
                product: product.clone(),
                usage: ended.and_then(|e| records::usage(&app, &e, EndedBy::Checkin, now)),
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
        notice: None,
        idle_revoke_in_seconds: None,
    }))
}

/// Borrows one unit for offline use: held without heartbeats until returned or until the
/// hours asked (at most the product's `max_borrow_hours`) are up; survives restarts of both
/// processes; never revoked nor reclaimed by the balancer.
#[utoipa::path(post, path = "/v1/borrow", tag = "clients", security(("clientKey" = []), ()),
    request_body = BorrowRequest,
    responses(
        (status = 200, description = "Borrowed", body = BorrowResponse),
        (status = 400, description = "`bad_request`: a bad field, or more hours than the policy allows", body = ErrorBody),
        (status = 403, description = "`forbidden`: the ACL refuses the requester, or the product may not be borrowed", body = ErrorBody),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`license_unavailable`: no unit free now; `limit_reached`: a limit caps the requester", body = ErrorBody),
        (status = 410, description = "`license_expired`: this server's lease from the balancer ran out", body = ErrorBody),
        (status = 503, description = "`unavailable`: a limit is reached, the store failed, or the server is stopping", body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(product = %req.product))]
pub(super) async fn borrow_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<BorrowRequest>,
) -> Result<Json<BorrowResponse>, ApiError> {
    let as_checkout = CheckoutRequest {
        product: req.product,
        user: req.user,
        host: req.host,
        groups: req.groups,
        units: 1,
        wait_seconds: 0,
    };
    validate_checkout(&as_checkout)?;
    if req.hours == 0 || req.hours > validate::MAX_BORROW_HOURS {
        return Err(ApiError::BadRequest(format!(
            "hours: must be between 1 and {}, got {}",
            validate::MAX_BORROW_HOURS,
            req.hours
        )));
    }
    app.check_writable()?;
    let who = Who {
        user: &as_checkout.user,
        host: &as_checkout.host,
        groups: &as_checkout.groups,
    };
    let now = now_ms();
    let until = now.saturating_add(u64::from(req.hours) * 3_600_000);
    let granted = {
        let mut inner = app.lock();
        match inner
            .book
            .borrow(&as_checkout.product, who, 1, until, now, new_handle())
        {
            Ok(grant) => {
                let ack = app.log(&mut inner, Mutation::Checkout(grant.record.clone()));
                app.arm(&mut inner, until);
                pull(&app, &mut inner, &as_checkout.product, now);
                Ok((grant, ack))
            }
            Err(refusal) => Err((refusal, inner.synced_at)),
        }
    };
    let (grant, ack) = granted.map_err(|(r, synced)| refused(&app, &as_checkout, r, synced))?;
    let pending = PendingCheckout {
        app: &app,
        handle: Some(grant.record.handle),
    };
    durable(ack).await?;
    pending.disarm();
    app.metrics.checkout(&as_checkout.product, false, 0.0);
    tracing::info!(user = %as_checkout.user, host = %as_checkout.host, hours = req.hours,
        "unit borrowed for offline use");
    Ok(Json(BorrowResponse {
        handle: grant.record.handle.to_string(),
        id: CheckoutId::of(grant.record.handle).to_string(),
        product: as_checkout.product,
        units: grant.record.units,
        until: chrono::DateTime::from_timestamp_millis(i64::try_from(until).unwrap_or(i64::MAX))
            .unwrap_or_default(),
    }))
}

/// Returns a borrowed unit before its time: a checkin of the borrow (its usage record ends
/// `checkin`; one left to run out ends `staleout`).
#[utoipa::path(post, path = "/v1/borrow/{handle}/return", tag = "clients", security(("clientKey" = []), ()),
    params(("handle" = String, Path, description = "The handle `POST /v1/borrow` answered")),
    responses(
        (status = 200, description = "Returned", body = HandleResponse),
        (status = 400, description = "`bad_request`: not a handle", body = ErrorBody),
        (status = 404, description = "`bad_handle`: unknown, already returned or expired", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn return_handler(
    State(app): State<App>,
    auth: ClientAuth,
    ApiPath(handle): ApiPath<String>,
) -> Result<Json<HandleResponse>, ApiError> {
    let h = parse_handle(&handle)?;
    if !app.lock().book.is_borrowed(h) {
        return Err(ApiError::BadHandle);
    }
    checkin_handler(State(app), auth, ApiJson(HandleRequest { handle })).await
}

/// Products with their allocation, in use, free and waiting.
#[utoipa::path(get, path = "/v1/products", tag = "clients", security(("clientKey" = []), ()),
    responses((status = 200, description = "Every product this server knows", body = AgentProducts)))]
pub(super) async fn products_handler(
    State(app): State<App>,
    _auth: ClientAuth,
) -> Json<AgentProducts> {
    Json(AgentProducts {
        products: app.lock().book.products(),
    })
}

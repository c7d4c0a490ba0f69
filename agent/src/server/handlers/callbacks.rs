//! The callback calls (`super::super::callbacks` keeps their state): register, long-poll,
//! claim, cancel. The queue and the kept unit are the book's; these validate and answer.

use super::super::auth::ClientAuth;
use super::super::callbacks::{self, Callback, RENEW_MS};
use super::super::pull::pull;
use super::super::{App, new_handle};
use super::clients::{refused, validate_checkout};
use super::holders::query;
use crate::clock::now_ms;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::store::Mutation;
use allot_core::checkout::{Outcome, Who};
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::{
    CallbackRequest, CallbackState, CallbackStatus, CheckoutRequest, CheckoutResponse,
};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The longest a kept unit waits for its claim.
const MAX_HOLD_SECONDS: u32 = 600;
/// The longest a callback stays queued.
const MAX_CALLBACK_WAIT_SECONDS: u32 = 86_400;
/// The longest one long-poll waits.
const MAX_POLL_SECONDS: u32 = 30;

fn unknown(id: &str) -> ApiError {
    ApiError::UnknownCheckout(format!("no callback {id} on this server"))
}

fn parse(id: &str) -> Result<u128, ApiError> {
    callbacks::parse_id(id).ok_or_else(|| {
        ApiError::BadRequest("id: expected a callback id, `cb_` and 32 hex digits".to_owned())
    })
}

/// Leaves a callback in the product's queue instead of waiting on an open request; answers
/// its id (the client's secret) and its place. If a unit is free now it is kept at once.
#[utoipa::path(post, path = "/v1/callbacks", tag = "clients", security(("clientKey" = []), ()),
    request_body = CallbackRequest,
    responses(
        (status = 201, description = "Registered: waiting in the queue, or ready at once", body = CallbackStatus),
        (status = 400, description = "`bad_request`: a bad field, or a webhook host off the server's allow-list", body = ErrorBody),
        (status = 403, description = "`forbidden`: the product's ACL refuses the requester", body = ErrorBody),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`limit_reached`: a limit caps the requester", body = ErrorBody),
        (status = 410, description = "`license_expired`: this server's lease from the balancer ran out", body = ErrorBody),
        (status = 503, description = "`unavailable`: too many waiting clients, or the server is stopping", body = ErrorBody)))]
pub(super) async fn register_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiJson(req): ApiJson<CallbackRequest>,
) -> Result<(StatusCode, Json<CallbackStatus>), ApiError> {
    let as_checkout = CheckoutRequest {
        product: req.product.clone(),
        user: req.user.clone(),
        host: req.host.clone(),
        groups: req.groups.clone(),
        units: req.units,
        wait_seconds: 0,
    };
    validate_checkout(&as_checkout)?;
    if req.hold_seconds == 0 || req.hold_seconds > MAX_HOLD_SECONDS {
        return Err(ApiError::BadRequest(format!(
            "hold_seconds: must be between 1 and {MAX_HOLD_SECONDS}, got {}",
            req.hold_seconds
        )));
    }
    if req.wait_seconds == 0 || req.wait_seconds > MAX_CALLBACK_WAIT_SECONDS {
        return Err(ApiError::BadRequest(format!(
            "wait_seconds: must be between 1 and {MAX_CALLBACK_WAIT_SECONDS}, got {}",
            req.wait_seconds
        )));
    }
    if let Some(url) = &req.webhook {
        validate::http_url("webhook", url)?;
        if !callbacks::host_allowed(url, &app.callback_hosts) {
            return Err(ApiError::BadRequest(
                "webhook: its host is not on this server's callback allow-list \
                 (--callback-hosts); leave the webhook out and long-poll instead"
                    .to_owned(),
            ));
        }
    }
    app.check_writable()?;
    let now = now_ms();
    let who = Who {
        user: &req.user,
        host: &req.host,
        groups: &req.groups,
    };
    let id = uuid::Uuid::new_v4().as_u128();
    let mut callback = Callback {
        product: req.product.clone(),
        state: CallbackState::Waiting,
        waiter: None,
        kept: None,
        handle: None,
        claim_by: None,
        renew_by: req.webhook.is_none().then(|| now + RENEW_MS),
        expires_at: now + u64::from(req.wait_seconds) * 1000,
        hold_ms: u64::from(req.hold_seconds) * 1000,
        webhook: req.webhook.clone(),
        changed_at: now,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let status = {
        let mut inner = app.lock();
        if inner.callbacks.len() >= callbacks::MAX_CALLBACKS {
            return Err(ApiError::Unavailable(
                "this server's limit of callbacks is reached; retry later".to_owned(),
            ));
        }
        let outcome = inner
            .book
            .checkout(&req.product, who, req.units, true, now, new_handle());
        match outcome {
            Ok(Outcome::Granted(grant)) => {
                app.log_quiet(&mut inner, Mutation::Checkout(grant.record.clone()));
                callback.keep(&grant, &mut inner.book, now);
                inner.callbacks.insert(id, callback);
                app.callback_ready(&mut inner, id, req.webhook.clone(), now);
            }
            Ok(Outcome::Queued(waiter)) => {
                callback.waiter = Some(waiter);
                app.arm(
                    &mut inner,
                    callback
                        .expires_at
                        .min(callback.renew_by.unwrap_or(u64::MAX)),
                );
                inner.callbacks.insert(id, callback);
            }
            Err(refusal) => {
                let synced = inner.synced_at;
                drop(inner);
                return Err(refused(&app, &as_checkout, refusal, synced));
            }
        }
        pull(&app, &mut inner, &req.product, now);
        let inner = &mut *inner;
        let c = inner.callbacks.get_mut(id).expect("inserted above");
        c.status(id, &inner.book, now)
    };
    tracing::info!(product = %req.product, state = ?status.state, webhook = req.webhook.is_some(),
        "callback registered");
    Ok((StatusCode::CREATED, Json(status)))
}

/// The query of a long-poll.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PollParams {
    /// Wait up to this many seconds (0–30) for the callback to change before answering.
    #[serde(default)]
    wait_seconds: u32,
}

/// Where a callback stands; with `wait_seconds`, a long-poll that answers as soon as it
/// changes. Each poll renews a callback without a webhook for another minute.
#[utoipa::path(get, path = "/v1/callbacks/{id}", tag = "clients", security(("clientKey" = []), ()),
    params(("id" = String, Path, description = "The callback's id (`cb_…`)"), PollParams),
    responses(
        (status = 200, description = "Where it stands", body = CallbackStatus),
        (status = 400, description = "`bad_request`: not a callback id, or a wait over 30 s", body = ErrorBody),
        (status = 404, description = "`not_found`: no such callback (or long forgotten)", body = ErrorBody)))]
pub(super) async fn poll_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiPath(text): ApiPath<String>,
    uri: Uri,
) -> Result<Json<CallbackStatus>, ApiError> {
    let params: PollParams = query(&uri)?;
    let id = parse(&text)?;
    if params.wait_seconds > MAX_POLL_SECONDS {
        return Err(ApiError::BadRequest(format!(
            "wait_seconds: must be at most {MAX_POLL_SECONDS}"
        )));
    }
    let wake = {
        let mut inner = app.lock();
        let now = now_ms();
        let c = inner.callbacks.get_mut(id).ok_or_else(|| unknown(&text))?;
        if c.state == CallbackState::Waiting && c.webhook.is_none() {
            c.renew_by = Some(now + RENEW_MS);
        }
        (c.state == CallbackState::Waiting && params.wait_seconds > 0).then(|| c.wake.clone())
    };
    if let Some(wake) = wake {
        // Registered before the state is read again under the lock below, a change made in
        // between still wakes it.
        let changed = wake.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let still_waiting = app
            .lock()
            .callbacks
            .get_mut(id)
            .is_some_and(|c| c.state == CallbackState::Waiting);
        if still_waiting {
            let _ =
                tokio::time::timeout(Duration::from_secs(u64::from(params.wait_seconds)), changed)
                    .await;
        }
    }
    let mut inner = app.lock();
    let now = now_ms();
    let inner = &mut *inner;
    let c = inner.callbacks.get_mut(id).ok_or_else(|| unknown(&text))?;
    Ok(Json(c.status(id, &inner.book, now)))
}

/// Claims the unit kept for a callback: it becomes the client's checkout (heartbeat it as
/// any other).
#[utoipa::path(post, path = "/v1/callbacks/{id}/claim", tag = "clients", security(("clientKey" = []), ()),
    params(("id" = String, Path, description = "The callback's id (`cb_…`)")),
    responses(
        (status = 200, description = "The checkout", body = CheckoutResponse),
        (status = 400, description = "`bad_request`: not a callback id", body = ErrorBody),
        (status = 404, description = "`not_found`: no such callback", body = ErrorBody),
        (status = 409, description = "`license_unavailable`: still waiting, or its hold ended unclaimed, or it ended", body = ErrorBody)))]
pub(super) async fn claim_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiPath(text): ApiPath<String>,
) -> Result<Json<CheckoutResponse>, ApiError> {
    let id = parse(&text)?;
    let answer = {
        let mut inner = app.lock();
        let now = now_ms();
        let inner = &mut *inner;
        let c = inner.callbacks.get_mut(id).ok_or_else(|| unknown(&text))?;
        let status = c.status(id, &inner.book, now);
        match status.state {
            CallbackState::Ready => {
                let handle = c.handle.expect("a ready callback keeps a checkout");
                // Its first heartbeat: the hold becomes the product's staleout.
                inner
                    .book
                    .heartbeat(handle, None, now)
                    .map_err(|_| ApiError::LicenseUnavailable("the hold ended".to_owned()))?;
                c.state = CallbackState::Claimed;
                c.changed_at = now;
                c.kept.clone().expect("a ready callback keeps its answer")
            }
            CallbackState::Claimed => c.kept.clone().expect("a claimed callback keeps its answer"),
            CallbackState::Waiting => {
                return Err(ApiError::LicenseUnavailable(format!(
                    "no unit is kept for this callback yet (position {} in the queue)",
                    status.position.unwrap_or(0)
                )));
            }
            CallbackState::Ended => {
                return Err(ApiError::LicenseUnavailable(
                    "this callback ended without a checkout (its wait or hold ran out, or it \
                     was cancelled); register again"
                        .to_owned(),
                ));
            }
        }
    };
    // The kept checkout was logged when it was kept: answer once it is durable.
    app.barrier().await?;
    Ok(Json(answer))
}

/// Cancels a callback: it leaves the queue, or gives back the unit kept for it.
#[utoipa::path(delete, path = "/v1/callbacks/{id}", tag = "clients", security(("clientKey" = []), ()),
    params(("id" = String, Path, description = "The callback's id (`cb_…`)")),
    responses(
        (status = 200, description = "Cancelled (or already over)", body = CallbackStatus),
        (status = 400, description = "`bad_request`: not a callback id", body = ErrorBody),
        (status = 404, description = "`not_found`: no such callback", body = ErrorBody)))]
pub(super) async fn cancel_handler(
    State(app): State<App>,
    _auth: ClientAuth,
    ApiPath(text): ApiPath<String>,
) -> Result<Json<CallbackStatus>, ApiError> {
    let id = parse(&text)?;
    let mut guard = app.lock();
    let now = now_ms();
    let inner = &mut *guard;
    let c = inner.callbacks.get_mut(id).ok_or_else(|| unknown(&text))?;
    let product = c.product.clone();
    let (waiter, kept) = match c.state {
        CallbackState::Waiting => (c.waiter, None),
        CallbackState::Ready => (None, c.handle),
        _ => (None, None),
    };
    if matches!(c.state, CallbackState::Waiting | CallbackState::Ready) {
        c.end(now);
    }
    let status = c.status(id, &inner.book, now);
    let mut served = Vec::new();
    if let Some(w) = waiter {
        inner.callbacks.forget_waiter(w);
        if let Some(left) = inner
            .book
            .cancel_wait(&product, w, false, now, &mut new_handle)
        {
            served = left.served;
        }
    }
    if let Some(handle) = kept
        && let Ok((p, more)) = inner.book.give_back(handle, now, &mut new_handle)
    {
        // Its client never had it: no usage to record.
        app.log_quiet(
            inner,
            Mutation::Checkin {
                handle,
                product: p,
                usage: None,
            },
        );
        served.extend(more);
    }
    app.dispatch(inner, served, now);
    pull(&app, inner, &product, now);
    Ok(Json(status))
}

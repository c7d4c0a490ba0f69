//! The instant-balance trigger's shell: per-product state the book does not keep, the pure
//! policy (`allot_core::trigger`) evaluated under the lock, and the spawned request to the
//! balancer whose answer is booked back. The policy decides; this module only translates.

use super::{App, FAILURE_LOG_EVERY, Inner};
use crate::clock::now_ms;
use crate::metrics::InstantOutcome;
use allot_core::checkout::Millis;
use allot_core::domain::Enforcement;
use allot_core::trigger::{TriggerState, instant_request, next_check_at};
use allot_core::wire::balancer::InstantBalanceRequest;

/// The shortest wait of an urgent pull for an urgent request in flight (or after an answer that
/// did not cover it), whatever the hold bound: a server configured with no hold never asks in a
/// loop.
pub(super) const MIN_URGENT_RETRY_MS: u64 = 100;

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
pub(super) struct PullTrack {
    /// The latest request sent, while unanswered.
    in_flight: Option<InFlight>,
    /// Urgent units asked by every request still unanswered.
    urgent_in_flight: u64,
    /// When the balancer last granted fewer units than asked (the pool is scarce).
    short_answer_at: Option<Millis>,
    /// When it last granted fewer than the urgent units asked (none to spare for them).
    urgent_short_at: Option<Millis>,
    /// The newest classification of a shortfall the balancer gave (when, and whether units
    /// were free elsewhere), for the records of the denials it leads to.
    shortage: Option<(Millis, bool)>,
    /// When the trigger is due again by time alone (`trigger::next_check_at`): the timer task
    /// evaluates it then.
    pub(super) recheck_at: Option<Millis>,
}

impl PullTrack {
    /// Whether the balancer's newest shortfall, if no older than `within` ms at `now`, found
    /// units free elsewhere: how a denial after it is classified.
    pub(super) fn shortage(&self, now: Millis, within: Millis) -> Option<bool> {
        self.shortage
            .filter(|(at, _)| now.saturating_sub(*at) <= within)
            .map(|(_, free)| free)
    }
}

/// Evaluates the instant-balance trigger (`allot_core::trigger`) for `product` after a change
/// of its allocation, in-use count or queue, after an answer, and when the timer task finds it
/// due. When it asks, sends the request from a spawned task; either way, schedules the next
/// evaluation that time alone makes due (`next_check_at`: an in-flight request's end, a
/// back-off's end), so clients still waiting after an answer of none are asked for again.
/// Called with the lock held; never awaits, so the balancer's grant — which arrives on this
/// server's API while the request is in flight — takes the lock and wakes the waiters.
pub(super) fn pull(app: &App, inner: &mut Inner, product: &str, now: Millis) {
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
            if let Some(free) = result.as_ref().ok().and_then(|a| a.free_elsewhere) {
                track.shortage = Some((now, free));
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

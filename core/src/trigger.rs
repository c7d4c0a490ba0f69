//! The agent-side instant-balance trigger: when a metering server asks the balancer for units,
//! how many, and how many of them clients are waiting for.
//!
//! A metering server serves checkouts from its own allocation. The scheduled balance run moves
//! units to where demand is expected, but between runs a site can run dry. Pulling only when a
//! checkout finds nothing free (SMS's instant balancing) makes that checkout wait a round trip —
//! or be denied when the round trip is longer than the hold bound. This policy instead pulls
//! **proactively**: as soon as the free units fall below a *low watermark*, it asks for enough to
//! refill a *headroom* above the watermark, so the next checkouts find units already there.
//!
//! The policy is two pure functions of the same state, called by the metering server after
//! every change of a product's allocation, in-use count or wait queue, after every answer, and
//! at the time [`next_check_at`] names (the workload simulator calls them at the same points).
//! They read everything — including `now` — from their arguments:
//!
//! - [`instant_request`] says whether to ask now: `Some(Pull { units, urgent })`, or `None`.
//!   The caller sends the request (`urgent_units = urgent`), records `in_flight_since =
//!   Some(now)` and `in_flight_urgent = urgent > 0`, and clears both when that request's answer
//!   (or error) arrives. An answer of fewer units than asked — a failed request counts as an
//!   answer of none — sets `short_answer_at = Some(now)`; one of fewer units than its `urgent`
//!   also sets `urgent_short_at = Some(now)`.
//! - [`next_check_at`] says when the decision can change by the passage of time alone (an
//!   in-flight request times out, a back-off ends) while units are needed: the caller evaluates
//!   the trigger again at that time, because nothing else may happen before — with clients
//!   queued after an answer of 0 units, the reserve may refill without this server being told.
//!
//! # Rules
//!
//! 1. **Urgent or proactive.** With `free = allocation − in_use`, the *deficit* is
//!    `short_units − free`: units clients are waiting for that the server does not have. A pull
//!    with a deficit is *urgent*; without one it is *proactive* (rule 4), a top-up. The balancer
//!    covers urgent units from the reserve and, if it must, by reclaiming free units elsewhere,
//!    a top-up from the reserve only, so a request says which of its units are urgent.
//! 2. **Requests in flight.** A proactive pull waits for any request in flight: while a request
//!    sent at `t` is unanswered and `now < t + in_flight_timeout_ms`, nothing proactive is asked
//!    (a lost request blocks top-ups for at most that timeout). An urgent pull never waits for a
//!    proactive request, and waits for an urgent one only until `t + urgent_retry_ms` (the hold
//!    bound; never more than the in-flight timeout): by then the clients held for it have been
//!    answered, and a lost request must not keep the clients still queued from being asked for.
//!    When the deficit has grown beyond the urgent units in flight (`in_flight_urgent_units`:
//!    clients queued since), the extra units are asked for, urgent only, no top-up, a fifth of
//!    `urgent_retry_ms` after the latest request was sent — soon enough for the hold bound,
//!    late enough that a burst is asked for in a few requests.
//! 3. **Short answers.** After a short answer, proactive pulls back off for `backoff_ms` (a few
//!    seconds: the pool is scarce, and asking again at once would only load the balancer). The
//!    back-off never delays an urgent pull. An answer that did not cover its urgent units (the
//!    estate had none to spare for them) makes the next urgent pull wait `urgent_retry_ms`
//!    (at most the in-flight timeout) after it, so clients still queued are asked for again at
//!    that pace — never in a loop, and never later than the hold bound.
//! 4. **Sizes.** With `load = in_use + short_units`, `watermark = max(low_watermark_min_units,
//!    ⌈load × low_watermark_percent / 100⌉)` — it grows with the load, so a busy site keeps more
//!    units spare — and `headroom = 2 × watermark`. A proactive pull happens when the `spare`
//!    units (free units left after serving `short_units`) fall below the watermark. The request
//!    is `deficit + headroom − spare` units, at least one and at most `max_request_units`; of
//!    these, `urgent = min(deficit, units)`.
//! 5. **Idle sites do not pull.** With nothing in use and nobody short, nothing is asked, so an
//!    idle site's units can stay in the reserve (the planner's `buffer_units` should be at least
//!    [`TriggerConfig::headroom`] so a scheduled run never reclaims what this policy would pull
//!    straight back — that would be ping-pong).
//! 6. **Time.** When a pull is wanted but rules 2 or 3 hold it back, [`next_check_at`] is the
//!    first instant at which none of them does any more (always after `now`); at that instant
//!    [`instant_request`] asks, unless the state changed meanwhile. Otherwise it is `None`: only
//!    a change of the state can make the trigger ask. So an urgent need is never held back longer
//!    than [`TriggerConfig::urgent_retry`] after the latest urgent request or urgent short
//!    answer.

use serde::{Deserialize, Serialize};

/// Wall-clock time as milliseconds since the Unix epoch (the same unit as the checkout book).
pub type Millis = u64;

/// What the metering server knows about one product when it decides whether to ask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TriggerState {
    /// The time of the decision; the policy reads no clock.
    pub now: Millis,
    /// Units the server holds for the product now (as applied).
    pub allocation: u64,
    /// Units checked out now; may exceed the allocation under `soft_stop`.
    pub in_use: u64,
    /// Units asked by clients that are not served yet: the checkout being decided plus the
    /// queued clients. These must be covered before any spare counts.
    pub short_units: u64,
    /// When the unanswered request for this product was sent, if one is in flight.
    pub in_flight_since: Option<Millis>,
    /// Whether the request in flight asked for urgent units (ignored when none is in flight).
    #[serde(default)]
    pub in_flight_urgent: bool,
    /// The urgent units asked by every request still in flight; 0 when unknown (then the urgent
    /// request in flight stands for the whole deficit).
    #[serde(default)]
    pub in_flight_urgent_units: u64,
    /// When the balancer last answered with fewer units than asked (the pool is scarce).
    pub short_answer_at: Option<Millis>,
    /// When the balancer last answered with fewer units than the request's urgent ones.
    #[serde(default)]
    pub urgent_short_at: Option<Millis>,
}

/// Knobs of the trigger; the defaults suit a site of tens of units and a WAN round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct TriggerConfig {
    /// The watermark as a share of the units in use, in percent, so busy sites keep more spare.
    pub low_watermark_percent: u32,
    /// The smallest watermark, in units: a site with one user still keeps a spare unit.
    pub low_watermark_min_units: u64,
    /// A request unanswered this long no longer blocks a proactive pull (a lost message
    /// heals). The metering server also gives up on the request's HTTP call after it.
    pub in_flight_timeout_ms: u64,
    /// The longest an urgent pull waits for an urgent request in flight, or after an answer
    /// that did not cover its urgent units: the hold bound (capped by `in_flight_timeout_ms`).
    /// The metering server sets it to its own hold bound (`--instant-wait-ms`, at least
    /// 100 ms).
    pub urgent_retry_ms: u64,
    /// After a short answer, proactive pulls wait this long (urgent pulls do not).
    pub backoff_ms: u64,
    /// The most units one request asks for, so one site cannot drain the reserve at once.
    pub max_request_units: u64,
}

impl Default for TriggerConfig {
    /// A 10 % (at least one unit) watermark, a 5 s in-flight timeout, a 500 ms urgent retry
    /// (the design's hold bound), a 5 s back-off.
    fn default() -> Self {
        Self {
            low_watermark_percent: 10,
            low_watermark_min_units: 1,
            in_flight_timeout_ms: 5_000,
            urgent_retry_ms: 500,
            backoff_ms: 5_000,
            max_request_units: 1_000,
        }
    }
}

impl TriggerConfig {
    /// The low watermark for a site with `in_use` units in use: below this many free units, the
    /// site pulls (rule 4).
    pub fn watermark(&self, in_use: u64) -> u64 {
        let share = (u128::from(in_use) * u128::from(self.low_watermark_percent)).div_ceil(100);
        u64::try_from(share)
            .unwrap_or(u64::MAX)
            .max(self.low_watermark_min_units)
    }

    /// How long an urgent pull is held back at most (rules 2 and 3): `urgent_retry_ms`, never
    /// more than `in_flight_timeout_ms`.
    pub fn urgent_retry(&self) -> u64 {
        self.urgent_retry_ms.min(self.in_flight_timeout_ms)
    }

    /// The free units a pull refills to (twice the watermark). A planner buffer of at least
    /// this much keeps scheduled runs and the trigger from undoing each other.
    pub fn headroom(&self, in_use: u64) -> u64 {
        self.watermark(in_use).saturating_mul(2)
    }
}

/// An instant-balance request to send: `units` in all, of which `urgent` are for clients
/// waiting now (the request's `urgent_units`); the rest is a top-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pull {
    /// Units to ask for: at least 1, at most `max_request_units`.
    pub units: u64,
    /// Of `units`, those clients are waiting for (0 for a proactive top-up); never more than
    /// `units`.
    pub urgent: u64,
}

/// The pull the state wants, if any, and until when rules 2 and 3 hold it back (`None`: not
/// held back). Both public functions read this one assessment, so they cannot disagree.
fn assess(state: &TriggerState, config: &TriggerConfig) -> Option<(Pull, Option<Millis>)> {
    if state.in_use == 0 && state.short_units == 0 {
        return None;
    }
    let free = state.allocation.saturating_sub(state.in_use);
    let deficit = state.short_units.saturating_sub(free);
    // The load the watermark follows includes the clients about to be served.
    let load = state.in_use.saturating_add(state.short_units);
    let watermark = config.watermark(load);
    let headroom = config.headroom(load);
    let spare = free.saturating_sub(state.short_units);
    if deficit == 0 && spare >= watermark {
        return None;
    }
    let units = deficit
        .saturating_add(headroom.saturating_sub(spare))
        .clamp(1, config.max_request_units.max(1));
    let pull = Pull {
        units,
        urgent: deficit.min(units),
    };
    let now = state.now;
    let mut until: Option<Millis> = None;
    let mut hold_until = |end: Millis| {
        if now < end {
            until = Some(until.map_or(end, |u| u.max(end)));
        }
    };
    if deficit > 0 {
        let retry = config.urgent_retry();
        // Clients queued after the urgent request in flight was sent are not covered by it:
        // they are asked for at once, on their own (rule 2), so a burst is not served one
        // round trip after another past the hold bound.
        // They are batched: asked for a fifth of the retry after the latest request was sent,
        // so a burst costs a few requests, not one per client.
        let covered = state.in_flight_urgent_units;
        if state.in_flight_urgent
            && covered > 0
            && deficit > covered
            && state
                .urgent_short_at
                .is_none_or(|at| now >= at.saturating_add(retry))
            && let Some(sent) = state.in_flight_since
        {
            let batched = sent.saturating_add(retry / 5);
            let extra = (deficit - covered).clamp(1, config.max_request_units.max(1));
            let pull = Pull {
                units: extra,
                urgent: extra,
            };
            return Some((pull, (now < batched).then_some(batched)));
        }
        if state.in_flight_urgent
            && let Some(sent) = state.in_flight_since
        {
            hold_until(sent.saturating_add(retry));
        }
        if let Some(at) = state.urgent_short_at {
            hold_until(at.saturating_add(retry));
        }
    } else {
        if let Some(sent) = state.in_flight_since {
            hold_until(sent.saturating_add(config.in_flight_timeout_ms));
        }
        for at in [state.short_answer_at, state.urgent_short_at]
            .into_iter()
            .flatten()
        {
            hold_until(at.saturating_add(config.backoff_ms));
        }
    }
    Some((pull, until))
}

/// What to ask the balancer for now, or `None`; see the [module documentation](self) for the
/// rules. Pure and total: any state gives an answer, none panics.
pub fn instant_request(state: &TriggerState, config: &TriggerConfig) -> Option<Pull> {
    match assess(state, config) {
        Some((pull, None)) => Some(pull),
        _ => None,
    }
}

/// When [`instant_request`], asked with this state at a later `now`, would ask although it does
/// not ask now: the end of the in-flight wait or back-off that holds a wanted pull back (rule 6).
/// Always after `state.now`; `None` when nothing is wanted (only a change of the state can make
/// the trigger ask) or when [`instant_request`] asks now. Pure and total.
pub fn next_check_at(state: &TriggerState, config: &TriggerConfig) -> Option<Millis> {
    assess(state, config).and_then(|(_, until)| until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(allocation: u64, in_use: u64, short_units: u64) -> TriggerState {
        TriggerState {
            now: 1_000_000,
            allocation,
            in_use,
            short_units,
            ..TriggerState::default()
        }
    }

    fn at(s: &TriggerState, now: Millis) -> TriggerState {
        TriggerState { now, ..*s }
    }

    #[test]
    fn clients_queued_after_an_urgent_request_are_asked_for_at_once() {
        let c = TriggerConfig::default();
        let mut s = state(10, 10, 5);
        s.in_flight_since = Some(s.now - 10);
        s.in_flight_urgent = true;
        s.in_flight_urgent_units = 2;
        // Batched: a fifth of the retry after the request in flight was sent.
        assert_eq!(instant_request(&s, &c), None);
        assert_eq!(
            next_check_at(&s, &c),
            Some(s.now - 10 + c.urgent_retry() / 5)
        );
        let later = at(&s, s.now - 10 + c.urgent_retry() / 5);
        assert_eq!(
            instant_request(&later, &c),
            Some(Pull {
                units: 3,
                urgent: 3
            })
        );
        s.in_flight_urgent_units = 5;
        assert_eq!(instant_request(&s, &c), None);
    }

    #[test]
    fn idle_site_does_not_pull() {
        let c = TriggerConfig::default();
        assert_eq!(instant_request(&state(0, 0, 0), &c), None);
        assert_eq!(instant_request(&state(5, 0, 0), &c), None);
        assert_eq!(next_check_at(&state(5, 0, 0), &c), None);
    }

    #[test]
    fn enough_spare_does_not_pull() {
        let c = TriggerConfig::default();
        // 50 in use: watermark 5; 6 free.
        assert_eq!(instant_request(&state(56, 50, 0), &c), None);
        assert_eq!(next_check_at(&state(56, 50, 0), &c), None);
    }

    #[test]
    fn below_watermark_refills_to_headroom() {
        let c = TriggerConfig::default();
        // 50 in use: watermark 5, headroom 10; 3 free → ask 7, none of them urgent.
        assert_eq!(
            instant_request(&state(53, 50, 0), &c),
            Some(Pull {
                units: 7,
                urgent: 0
            })
        );
    }

    #[test]
    fn deficit_asks_for_deficit_plus_headroom() {
        let c = TriggerConfig::default();
        // Nothing free, a checkout of 2 waiting: load 12, watermark 2, headroom 4 → 2 + 4, of
        // which the 2 are urgent.
        assert_eq!(
            instant_request(&state(10, 10, 2), &c),
            Some(Pull {
                units: 6,
                urgent: 2
            })
        );
        // One free, three waiting: a deficit of 2.
        assert_eq!(
            instant_request(&state(11, 10, 3), &c).map(|p| p.urgent),
            Some(2)
        );
    }

    #[test]
    fn a_proactive_pull_waits_for_a_request_in_flight_until_the_timeout() {
        let c = TriggerConfig::default();
        let mut s = state(53, 50, 0);
        for urgent in [false, true] {
            s.in_flight_urgent = urgent;
            s.in_flight_since = Some(s.now - 10);
            assert_eq!(instant_request(&s, &c), None);
            assert_eq!(
                next_check_at(&s, &c),
                Some(s.now - 10 + c.in_flight_timeout_ms)
            );
            s.in_flight_since = Some(s.now - c.in_flight_timeout_ms);
            assert!(instant_request(&s, &c).is_some());
        }
    }

    #[test]
    fn a_proactive_request_in_flight_never_blocks_an_urgent_pull() {
        let c = TriggerConfig::default();
        let mut s = state(10, 10, 1);
        s.in_flight_since = Some(s.now - 1);
        s.in_flight_urgent = false;
        assert_eq!(instant_request(&s, &c).map(|p| p.urgent), Some(1));
    }

    #[test]
    fn a_lost_request_blocks_an_urgent_pull_no_longer_than_the_hold_bound() {
        let c = TriggerConfig::default();
        let mut s = state(10, 10, 1);
        // Sent 600 ms ago and never answered: past the 500 ms hold bound.
        s.in_flight_since = Some(s.now - 600);
        s.in_flight_urgent = true;
        assert!(instant_request(&s, &c).is_some());
        // Sent 400 ms ago: the urgent request in flight holds the next one back until 500 ms.
        s.in_flight_since = Some(s.now - 400);
        assert_eq!(instant_request(&s, &c), None);
        let next = next_check_at(&s, &c);
        assert_eq!(next, Some(s.now + 100));
        assert!(instant_request(&at(&s, s.now + 100), &c).is_some());
    }

    #[test]
    fn an_answer_short_of_urgent_units_is_asked_again_after_the_retry_interval() {
        let c = TriggerConfig::default();
        // An answer of 0 units 100 ms ago; the client is still queued.
        let mut s = state(0, 0, 1);
        s.short_answer_at = Some(s.now - 100);
        s.urgent_short_at = Some(s.now - 100);
        assert_eq!(instant_request(&s, &c), None);
        let next = next_check_at(&s, &c).expect("a retry is due");
        assert_eq!(next, s.now - 100 + c.urgent_retry_ms);
        assert_eq!(instant_request(&at(&s, next - 1), &c), None);
        assert_eq!(
            instant_request(&at(&s, next), &c).map(|p| p.urgent),
            Some(1)
        );
        // Once nobody waits, nothing is due.
        s.short_units = 0;
        assert_eq!(next_check_at(&s, &c), None);
    }

    #[test]
    fn short_answer_backs_off_proactive_but_not_urgent_pulls() {
        let c = TriggerConfig::default();
        let mut s = state(53, 50, 0);
        s.short_answer_at = Some(s.now - 1);
        assert_eq!(instant_request(&s, &c), None);
        assert_eq!(next_check_at(&s, &c), Some(s.now - 1 + c.backoff_ms));
        s.short_units = 4; // now short: urgent
        assert!(instant_request(&s, &c).is_some());
        s.short_units = 0;
        s.short_answer_at = Some(s.now - c.backoff_ms);
        assert!(instant_request(&s, &c).is_some());
    }

    #[test]
    fn a_short_answer_backs_off_proactive_pulls_for_a_few_seconds_only() {
        let c = TriggerConfig::default();
        let mut s = state(53, 50, 0);
        s.short_answer_at = Some(s.now - 10_000);
        assert!(instant_request(&s, &c).is_some());
    }

    #[test]
    fn next_check_waits_for_every_hold_to_end() {
        let c = TriggerConfig::default();
        let mut s = state(53, 50, 0);
        s.in_flight_since = Some(s.now - 1_000);
        s.short_answer_at = Some(s.now - 500);
        // The later of the in-flight timeout (+4 s) and the back-off end (+4.5 s).
        assert_eq!(next_check_at(&s, &c), Some(s.now + 4_500));
        // Asking now: nothing to wait for.
        assert_eq!(next_check_at(&state(53, 50, 0), &c), None);
    }

    #[test]
    fn request_is_capped() {
        let c = TriggerConfig {
            max_request_units: 3,
            ..TriggerConfig::default()
        };
        assert_eq!(
            instant_request(&state(0, 0, 100), &c),
            Some(Pull {
                units: 3,
                urgent: 3
            })
        );
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let c = TriggerConfig {
            low_watermark_percent: u32::MAX,
            low_watermark_min_units: u64::MAX,
            in_flight_timeout_ms: u64::MAX,
            urgent_retry_ms: u64::MAX,
            backoff_ms: u64::MAX,
            max_request_units: 0,
        };
        let s = TriggerState {
            now: u64::MAX,
            allocation: u64::MAX,
            in_use: u64::MAX,
            short_units: u64::MAX,
            in_flight_since: Some(u64::MAX),
            in_flight_urgent: true,
            in_flight_urgent_units: u64::MAX,
            short_answer_at: Some(0),
            urgent_short_at: Some(u64::MAX),
        };
        let _ = instant_request(&s, &c);
        let _ = next_check_at(&s, &c);
        let s = TriggerState { now: 0, ..s };
        let _ = instant_request(&s, &c);
        assert!(next_check_at(&s, &c).is_none_or(|t| t > 0));
        let _ = instant_request(&TriggerState::default(), &c);
        let _ = next_check_at(&TriggerState::default(), &c);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn any_state() -> impl Strategy<Value = TriggerState> {
            (
                (0u64..10_000, 0u64..500, 0u64..500, 0u64..50),
                (
                    proptest::option::of(0u64..20_000),
                    any::<bool>(),
                    proptest::option::of(0u64..200_000),
                    proptest::option::of(0u64..200_000),
                ),
            )
                .prop_map(
                    |(
                        (now, allocation, in_use, short_units),
                        (sent, in_flight_urgent, short, urgent_short),
                    )| TriggerState {
                        now: now + 100_000,
                        allocation,
                        in_use,
                        short_units,
                        in_flight_since: sent.map(|s| s + 90_000),
                        in_flight_urgent,
                        in_flight_urgent_units: 0,
                        short_answer_at: short,
                        urgent_short_at: urgent_short,
                    },
                )
        }

        /// The same state with no time after `now` (as the metering server records it).
        fn in_the_past(mut s: TriggerState) -> TriggerState {
            let now = s.now;
            for t in [
                &mut s.in_flight_since,
                &mut s.short_answer_at,
                &mut s.urgent_short_at,
            ] {
                *t = t.map(|t| t.min(now));
            }
            s
        }

        fn deficit(s: &TriggerState) -> u64 {
            s.short_units
                .saturating_sub(s.allocation.saturating_sub(s.in_use))
        }

        proptest! {
            #[test]
            fn request_is_within_bounds(s in any_state(), cap in 1u64..100) {
                let c = TriggerConfig { max_request_units: cap, ..TriggerConfig::default() };
                if let Some(p) = instant_request(&s, &c) {
                    prop_assert!((1..=cap).contains(&p.units));
                    prop_assert!(p.urgent <= p.units);
                    prop_assert_eq!(p.urgent, deficit(&s).min(p.units));
                }
            }

            #[test]
            fn a_proactive_pull_never_overlaps_a_request_in_flight(s in any_state()) {
                let c = TriggerConfig::default();
                if let Some(sent) = s.in_flight_since
                    && s.now < sent + c.in_flight_timeout_ms
                    && let Some(p) = instant_request(&s, &c)
                {
                    prop_assert!(p.urgent > 0, "a top-up while a request is in flight");
                }
            }

            #[test]
            fn an_urgent_pull_never_overlaps_a_recent_urgent_request(s in any_state()) {
                let c = TriggerConfig::default();
                if s.in_flight_urgent
                    && let Some(sent) = s.in_flight_since
                    && s.now < sent + c.urgent_retry_ms
                {
                    prop_assert_eq!(instant_request(&s, &c), None);
                }
            }

            #[test]
            fn a_short_client_triggers_unless_an_urgent_request_holds_it_back(
                mut s in any_state(),
            ) {
                // Neither a proactive request in flight nor a top-up's short answer holds an
                // urgent pull back.
                s.in_flight_urgent = false;
                s.urgent_short_at = None;
                let c = TriggerConfig::default();
                if deficit(&s) > 0 {
                    prop_assert!(instant_request(&s, &c).is_some_and(|p| p.urgent > 0));
                }
            }

            #[test]
            fn an_urgent_pull_is_never_held_back_longer_than_the_retry_interval(
                s in any_state().prop_map(in_the_past),
                retry in 1u64..10_000,
            ) {
                let c = TriggerConfig { urgent_retry_ms: retry, ..TriggerConfig::default() };
                if deficit(&s) > 0 && instant_request(&s, &c).is_none() {
                    let next = next_check_at(&s, &c);
                    let bound = s.now + retry.min(c.in_flight_timeout_ms);
                    prop_assert!(next.is_some_and(|t| t <= bound), "{:?}", next);
                }
            }

            #[test]
            fn next_check_is_in_the_future_or_none(s in any_state()) {
                let c = TriggerConfig::default();
                prop_assert!(next_check_at(&s, &c).is_none_or(|t| t > s.now));
            }

            #[test]
            fn time_alone_changes_nothing_before_the_next_check(
                s in any_state(),
                later in 0u64..300_000,
            ) {
                // A caller that evaluates again only at `next_check_at` misses no request.
                let c = TriggerConfig::default();
                let now = instant_request(&s, &c);
                let next = next_check_at(&s, &c);
                let then = TriggerState { now: s.now + later, ..s };
                match (now, next) {
                    (Some(p), _) => {
                        prop_assert_eq!(next, None);
                        prop_assert_eq!(instant_request(&then, &c), Some(p));
                    }
                    (None, None) => prop_assert_eq!(instant_request(&then, &c), None),
                    (None, Some(t)) => {
                        let asked = instant_request(&then, &c);
                        prop_assert_eq!(asked.is_some(), then.now >= t);
                        let at_next = TriggerState { now: t, ..s };
                        prop_assert!(instant_request(&at_next, &c).is_some());
                    }
                }
            }

            #[test]
            fn a_full_answer_silences_the_trigger(mut s in any_state()) {
                // Once the units asked for arrive, the same load asks for nothing more.
                s.in_flight_since = None;
                prop_assume!(s.in_use <= s.allocation);
                let c = TriggerConfig::default();
                if let Some(p) = instant_request(&s, &c) {
                    s.allocation += p.units;
                    prop_assert_eq!(instant_request(&s, &c), None);
                    prop_assert_eq!(next_check_at(&s, &c), None);
                }
            }
        }
    }
}

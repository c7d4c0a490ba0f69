//! The agent-side instant-balance trigger: when a metering server asks the balancer for units,
//! and how many.
//!
//! A metering server serves checkouts from its own allocation. The scheduled balance run moves
//! units to where demand is expected, but between runs a site can run dry. Pulling only when a
//! checkout finds nothing free (SMS's instant balancing) makes that checkout wait a round trip —
//! or be denied when the round trip is longer than the hold bound. This policy instead pulls
//! **proactively**: as soon as the free units fall below a *low watermark*, it asks for enough to
//! refill a *headroom* above the watermark, so the next checkouts find units already there.
//!
//! The policy is one pure function, [`instant_request`], called by the metering server after
//! every change of a product's allocation, in-use count or wait queue (and by the workload
//! simulator at the same points). It reads everything — including `now` — from its arguments
//! and returns how many units to ask for, or `None`. The caller sends the request, records
//! `in_flight_since = Some(now)`, and clears it when the answer (or an error) arrives; when the
//! balancer answered with fewer units than asked, it records `short_answer_at = Some(now)`.
//!
//! # Rules
//!
//! 1. **At most one request in flight per product.** While a request sent at `t` is unanswered
//!    and `now < t + in_flight_timeout_ms`, nothing is asked. A lost request therefore blocks
//!    the product for at most the timeout.
//! 2. **Urgent pull.** When clients need more units than are free (`short_units > free`: a
//!    checkout being decided or queued clients), the request is always made (rule 1 aside): it
//!    asks for the deficit plus the headroom.
//! 3. **Proactive pull.** Otherwise, when the free units left after serving `short_units` fall
//!    below the low watermark, it asks for enough to bring them back up to the headroom — unless
//!    the balancer answered short less than `backoff_ms` ago (the pool is scarce: asking again at
//!    once would only load the balancer).
//! 4. **Sizes.** With `load = in_use + short_units`, `watermark = max(low_watermark_min_units,
//!    ⌈load × low_watermark_percent / 100⌉)` — it grows with the load, so a busy site keeps more
//!    units spare — and `headroom = 2 × watermark`. The request is `deficit + headroom − spare`,
//!    where `spare` is the free units left after serving `short_units`; it is at least one unit
//!    and at most `max_request_units`.
//! 5. **Idle sites do not pull.** With nothing in use and nobody short, nothing is asked, so an
//!    idle site's units can stay in the reserve (the planner's `buffer_units` should be at least
//!    [`TriggerConfig::headroom`] so a scheduled run never reclaims what this policy would pull
//!    straight back — that would be ping-pong).

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
    /// When the balancer last answered with fewer units than asked (the pool is scarce).
    pub short_answer_at: Option<Millis>,
}

/// Knobs of the trigger; the defaults suit a site of tens of units and a WAN round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TriggerConfig {
    /// The watermark as a share of the units in use, in percent, so busy sites keep more spare.
    pub low_watermark_percent: u32,
    /// The smallest watermark, in units: a site with one user still keeps a spare unit.
    pub low_watermark_min_units: u64,
    /// A request unanswered this long no longer blocks the next one (a lost message heals).
    pub in_flight_timeout_ms: u64,
    /// After a short answer, proactive pulls wait this long (urgent pulls do not).
    pub backoff_ms: u64,
    /// The most units one request asks for, so one site cannot drain the reserve at once.
    pub max_request_units: u64,
}

impl Default for TriggerConfig {
    /// A 10 % (at least one unit) watermark, a 5 s in-flight timeout, a 60 s back-off.
    fn default() -> Self {
        Self {
            low_watermark_percent: 10,
            low_watermark_min_units: 1,
            in_flight_timeout_ms: 5_000,
            backoff_ms: 60_000,
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

    /// The free units a pull refills to (twice the watermark). A planner buffer of at least
    /// this much keeps scheduled runs and the trigger from undoing each other.
    pub fn headroom(&self, in_use: u64) -> u64 {
        self.watermark(in_use).saturating_mul(2)
    }
}

/// How many units to ask the balancer for now, or `None`; see the [module documentation](self)
/// for the rules. Pure and total: any state gives an answer, none panics.
pub fn instant_request(state: &TriggerState, config: &TriggerConfig) -> Option<u64> {
    if let Some(sent) = state.in_flight_since
        && state.now < sent.saturating_add(config.in_flight_timeout_ms)
    {
        return None;
    }
    let free = state.allocation.saturating_sub(state.in_use);
    let deficit = state.short_units.saturating_sub(free);
    if state.in_use == 0 && state.short_units == 0 {
        return None;
    }
    // The load the watermark follows includes the clients about to be served.
    let load = state.in_use.saturating_add(state.short_units);
    let watermark = config.watermark(load);
    let headroom = config.headroom(load);
    let spare = free.saturating_sub(state.short_units);
    if deficit == 0 {
        if spare >= watermark {
            return None;
        }
        if let Some(at) = state.short_answer_at
            && state.now < at.saturating_add(config.backoff_ms)
        {
            return None;
        }
    }
    let units = deficit.saturating_add(headroom.saturating_sub(spare));
    Some(units.clamp(1, config.max_request_units.max(1)))
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

    #[test]
    fn idle_site_does_not_pull() {
        let c = TriggerConfig::default();
        assert_eq!(instant_request(&state(0, 0, 0), &c), None);
        assert_eq!(instant_request(&state(5, 0, 0), &c), None);
    }

    #[test]
    fn enough_spare_does_not_pull() {
        let c = TriggerConfig::default();
        // 50 in use: watermark 5; 6 free.
        assert_eq!(instant_request(&state(56, 50, 0), &c), None);
    }

    #[test]
    fn below_watermark_refills_to_headroom() {
        let c = TriggerConfig::default();
        // 50 in use: watermark 5, headroom 10; 3 free → ask 7.
        assert_eq!(instant_request(&state(53, 50, 0), &c), Some(7));
    }

    #[test]
    fn deficit_asks_for_deficit_plus_headroom() {
        let c = TriggerConfig::default();
        // Nothing free, a checkout of 2 waiting: load 12, watermark 2, headroom 4 → 2 + 4.
        assert_eq!(instant_request(&state(10, 10, 2), &c), Some(6));
    }

    #[test]
    fn one_request_in_flight_until_timeout() {
        let c = TriggerConfig::default();
        let mut s = state(10, 10, 1);
        s.in_flight_since = Some(s.now - 10);
        assert_eq!(instant_request(&s, &c), None);
        s.in_flight_since = Some(s.now - c.in_flight_timeout_ms);
        assert!(instant_request(&s, &c).is_some());
    }

    #[test]
    fn short_answer_backs_off_proactive_but_not_urgent_pulls() {
        let c = TriggerConfig::default();
        let mut s = state(53, 50, 0);
        s.short_answer_at = Some(s.now - 1);
        assert_eq!(instant_request(&s, &c), None);
        s.short_units = 4; // now short: urgent
        assert!(instant_request(&s, &c).is_some());
        s.short_units = 0;
        s.short_answer_at = Some(s.now - c.backoff_ms);
        assert!(instant_request(&s, &c).is_some());
    }

    #[test]
    fn request_is_capped() {
        let c = TriggerConfig {
            max_request_units: 3,
            ..TriggerConfig::default()
        };
        assert_eq!(instant_request(&state(0, 0, 100), &c), Some(3));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let c = TriggerConfig {
            low_watermark_percent: u32::MAX,
            low_watermark_min_units: u64::MAX,
            in_flight_timeout_ms: u64::MAX,
            backoff_ms: u64::MAX,
            max_request_units: 0,
        };
        let s = TriggerState {
            now: u64::MAX,
            allocation: u64::MAX,
            in_use: u64::MAX,
            short_units: u64::MAX,
            in_flight_since: Some(u64::MAX),
            short_answer_at: Some(0),
        };
        let _ = instant_request(&s, &c);
        let _ = instant_request(&TriggerState::default(), &c);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn any_state() -> impl Strategy<Value = TriggerState> {
            (
                0u64..10_000,
                0u64..500,
                0u64..500,
                0u64..50,
                proptest::option::of(0u64..20_000),
                proptest::option::of(0u64..200_000),
            )
                .prop_map(|(now, allocation, in_use, short_units, sent, short)| {
                    TriggerState {
                        now: now + 100_000,
                        allocation,
                        in_use,
                        short_units,
                        in_flight_since: sent.map(|s| s + 90_000),
                        short_answer_at: short,
                    }
                })
        }

        proptest! {
            #[test]
            fn request_is_within_bounds(s in any_state(), cap in 1u64..100) {
                let c = TriggerConfig { max_request_units: cap, ..TriggerConfig::default() };
                if let Some(units) = instant_request(&s, &c) {
                    prop_assert!((1..=cap).contains(&units));
                }
            }

            #[test]
            fn never_two_requests_in_flight(s in any_state()) {
                let c = TriggerConfig::default();
                if let Some(sent) = s.in_flight_since
                    && s.now < sent + c.in_flight_timeout_ms
                {
                    prop_assert_eq!(instant_request(&s, &c), None);
                }
            }

            #[test]
            fn a_short_client_always_triggers_when_nothing_is_in_flight(mut s in any_state()) {
                s.in_flight_since = None;
                let c = TriggerConfig::default();
                if s.short_units > s.allocation.saturating_sub(s.in_use) {
                    prop_assert!(instant_request(&s, &c).is_some());
                }
            }

            #[test]
            fn a_full_answer_silences_the_trigger(mut s in any_state()) {
                // Once the units asked for arrive, the same load asks for nothing more.
                s.in_flight_since = None;
                prop_assume!(s.in_use <= s.allocation);
                let c = TriggerConfig::default();
                if let Some(units) = instant_request(&s, &c) {
                    s.allocation += units;
                    prop_assert_eq!(instant_request(&s, &c), None);
                }
            }
        }
    }
}

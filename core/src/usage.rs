//! Concurrency over a window from usage records, and what it suggests at renewal: the pure
//! arithmetic behind `GET /v1/usage/renewal` (no clock, no I/O; times are Unix milliseconds).

/// How a product was used over a window: the step function of units in use, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Profile {
    /// The most units in use at once.
    pub peak: u64,
    /// Units in use at the 95th percentile of the window's time (95 % of the time at or below).
    pub p95: u64,
    /// Mean units in use, weighted by time.
    pub average: f64,
    /// Milliseconds with at least `cap` units in use.
    pub at_cap_ms: i64,
}

/// One checkout as the profile reads it: `[start, end)` holding `units`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// When it was granted.
    pub start: i64,
    /// When it ended.
    pub end: i64,
    /// Units held.
    pub units: u64,
}

/// The profile of `intervals` clipped to `[from, to)`; `cap` is the purchased total.
pub fn profile(intervals: &[Interval], from: i64, to: i64, cap: u64) -> Profile {
    if to <= from {
        return Profile::default();
    }
    // Ends sort before starts at the same instant, so a checkin and a checkout in the same
    // millisecond never count as held together.
    let mut events: Vec<(i64, i64)> = Vec::with_capacity(intervals.len() * 2);
    for i in intervals {
        let (start, end) = (i.start.max(from), i.end.min(to));
        if start >= end || i.units == 0 {
            continue;
        }
        let units = i64::try_from(i.units).unwrap_or(i64::MAX);
        events.push((start, units));
        events.push((end, -units));
    }
    events.sort_unstable_by_key(|&(t, d)| (t, d));
    // Time spent at each level, then the levels read in order.
    let mut at_level: std::collections::BTreeMap<u64, i64> = std::collections::BTreeMap::new();
    let (mut level, mut since, mut peak) = (0i64, from, 0u64);
    for (t, d) in events {
        if t > since {
            *at_level.entry(level.max(0) as u64).or_default() += t - since;
            since = t;
        }
        level += d;
        peak = peak.max(level.max(0) as u64);
    }
    *at_level.entry(level.max(0) as u64).or_default() += to - since;
    let total = (to - from) as f64;
    let average = at_level
        .iter()
        .map(|(&l, &ms)| l as f64 * ms as f64)
        .sum::<f64>()
        / total;
    let mut p95 = 0;
    let mut seen = 0i64;
    for (&l, &ms) in &at_level {
        seen += ms;
        p95 = l;
        if seen as f64 >= 0.95 * total {
            break;
        }
    }
    let at_cap_ms = at_level.range(cap.max(1)..).map(|(_, &ms)| ms).sum::<i64>();
    Profile {
        peak,
        p95,
        average,
        at_cap_ms,
    }
}

/// What a product's use over a renewal window suggests: buy when users were turned away with
/// nothing free, drop what was never used, otherwise keep. A suggestion, never an action.
pub fn renewal_suggestion(purchased: u64, p: &Profile, denials_true: u64) -> String {
    let hours_at_cap = p.at_cap_ms as f64 / 3_600_000.0;
    if purchased == 0 {
        return "nothing purchased".into();
    }
    if denials_true > 0 {
        return format!(
            "buy: all {purchased} units were in use for {hours_at_cap:.1} h and {denials_true} \
             checkouts were denied with none free anywhere"
        );
    }
    if p.peak < purchased {
        let spare = purchased - p.peak;
        return format!(
            "drop up to {spare}: never more than {} of {purchased} in use (95 % of the time \
             {} or fewer)",
            p.peak, p.p95
        );
    }
    format!("keep {purchased}: all were needed at the peak and no checkout went unserved")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: i64 = 3_600_000;

    fn at(start: i64, end: i64, units: u64) -> Interval {
        Interval { start, end, units }
    }

    #[test]
    fn a_known_day() {
        // Two units for the first half, one for the rest; a checkin and a checkout at 6 h
        // never overlap.
        let day = [at(0, 12 * H, 1), at(0, 6 * H, 1), at(6 * H, 12 * H, 1)];
        let p = profile(&day, 0, 24 * H, 2);
        assert_eq!(p.peak, 2);
        assert_eq!(p.at_cap_ms, 12 * H);
        assert!((p.average - 1.0).abs() < 1e-9);
        assert_eq!(p.p95, 2);
        // Clipped to a window that starts before and ends inside.
        let p = profile(&day, -24 * H, 3 * H, 2);
        assert!((p.average - 6.0 / 27.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.p95, 2);
    }

    #[test]
    fn suggestions_follow_the_figures() {
        let quiet = profile(&[at(0, H, 3)], 0, 10 * H, 10);
        assert!(renewal_suggestion(10, &quiet, 0).starts_with("drop up to 7"));
        let full = profile(&[at(0, 10 * H, 10)], 0, 10 * H, 10);
        assert!(renewal_suggestion(10, &full, 0).starts_with("keep 10"));
        assert!(renewal_suggestion(10, &full, 4).starts_with("buy"));
    }

    proptest! {
        #[test]
        fn the_figures_are_ordered_and_bounded(
            raw in prop::collection::vec((0i64..1_000, 1i64..500, 1u64..5), 0..40),
            cap in 1u64..20,
        ) {
            let intervals: Vec<Interval> =
                raw.iter().map(|&(s, len, u)| at(s, s + len, u)).collect();
            let p = profile(&intervals, 100, 1_200, cap);
            let sum: u64 = intervals.iter().map(|i| i.units).sum();
            prop_assert!(p.p95 <= p.peak);
            prop_assert!(p.peak <= sum);
            prop_assert!(p.average <= p.peak as f64 + 1e-9);
            prop_assert!(p.at_cap_ms >= 0 && p.at_cap_ms <= 1_100);
            // The mean is the clipped unit-time over the window.
            let unit_ms: i64 = intervals
                .iter()
                .map(|i| (i.end.min(1_200) - i.start.max(100)).max(0) * i.units as i64)
                .sum();
            prop_assert!((p.average - unit_ms as f64 / 1_100.0).abs() < 1e-6);
        }
    }
}

//! Demand signals: what a (server, product) cell is expected to need, read from the balancer's
//! own history of usage samples.
//!
//! Every balance run records, per cell, the peak in use since the previous run. From those
//! samples this module derives three numbers, all in units:
//!
//! - **level** — rises at once and decays over hours: the largest sample peak, each discounted
//!   by its age with a half-life ([`SignalConfig::half_life_ms`]). One idle interval therefore
//!   does not erase what the last burst needed; a quiet afternoon slowly does.
//! - **window peak** — the largest sample peak of the last [`SignalConfig::window_ms`]: the
//!   planner takes back units above what this implies only once the excess has lasted the
//!   whole window (as Kubernetes' autoscaler holds a scale-down until its stabilisation window
//!   has passed).
//! - **forecast** — the largest sample peak in the look-ahead ([`SignalConfig::lookahead_ms`])
//!   starting at the same time yesterday and the same time last week, so units are in place
//!   before a recurring rise instead of being pulled one instant balance at a time.
//!
//! The function is pure: `now` is an argument, samples may come in any order, and samples from
//! the future (clock skew between balancers) are ignored. The balancer feeds it from its store
//! and the workload simulator from the samples its own runs record, so both see the same
//! signals for the same history.

use serde::{Deserialize, Serialize};

/// Wall-clock time as milliseconds since the Unix epoch.
pub type Millis = u64;

const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;
const WEEK: Millis = 7 * DAY;

/// One usage sample of a cell: the highest units in use over the interval that ended `at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeakSample {
    /// When the interval ended (the run that read it).
    pub at: Millis,
    /// The highest units in use over the interval.
    pub peak: u64,
}

/// The demand signals of one cell (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signals {
    /// The decaying level: rises at once, halves every half-life.
    pub level: u64,
    /// The largest peak of the last window; `u64::MAX` while the history does not cover the
    /// whole window (no excess can be said to have lasted it).
    pub window_peak: u64,
    /// The largest peak of the look-ahead, yesterday and last week.
    pub forecast: u64,
}

/// How far back and ahead the signals look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignalConfig {
    /// The level halves every this long.
    pub half_life_ms: Millis,
    /// Excess above the window's peak is released only once it has lasted this long.
    pub window_ms: Millis,
    /// How far past the same time yesterday and last week the forecast looks.
    pub lookahead_ms: Millis,
}

impl Default for SignalConfig {
    /// A two-hour half-life, a one-week window (office demand repeats weekly: a unit idle a
    /// whole week is not needed where it is), a one-hour look-ahead.
    fn default() -> Self {
        Self {
            half_life_ms: 2 * HOUR,
            window_ms: 7 * DAY,
            lookahead_ms: HOUR,
        }
    }
}

impl SignalConfig {
    /// The oldest sample any signal reads at `now`: the history a caller must provide.
    pub fn horizon(&self, now: Millis) -> Millis {
        now.saturating_sub(WEEK)
    }

    /// The time ranges `[from, to]` a caller must read samples from at `now`: the recent past
    /// (level and window) and the two forecast look-aheads.
    pub fn ranges(&self, now: Millis) -> [(Millis, Millis); 3] {
        let recent = self
            .window_ms
            .max(self.half_life_ms.saturating_mul(LEVEL_HALF_LIVES));
        let ahead = |lag: Millis| {
            let from = now.saturating_sub(lag);
            (from, from.saturating_add(self.lookahead_ms).min(now))
        };
        [(now.saturating_sub(recent), now), ahead(DAY), ahead(WEEK)]
    }
}

/// Samples older than this many half-lives are worth less than 1/64 of their peak: ignored.
const LEVEL_HALF_LIVES: u64 = 6;

/// The demand signals of a cell at `now` from its samples (any order).
pub fn signals(samples: &[PeakSample], now: Millis, config: &SignalConfig) -> Signals {
    let mut out = Signals::default();
    let mut oldest = now;
    let half_life = config.half_life_ms.max(1);
    let [recent, yesterday, last_week] = config.ranges(now);
    for s in samples.iter().filter(|s| s.at <= now) {
        let age = now - s.at;
        if s.at >= recent.0 {
            let decayed = if age == 0 {
                s.peak
            } else {
                // Integer-exact halvings, then a linear step within the current half-life, so
                // the level is deterministic across platforms.
                let halvings = age / half_life;
                if halvings >= 64 {
                    0
                } else {
                    let whole = s.peak >> halvings;
                    let part = age % half_life;
                    // whole × (1 − part / (2 × half_life)), rounded up.
                    let cut = u128::from(whole) * u128::from(part) / (2 * u128::from(half_life));
                    whole - u64::try_from(cut).unwrap_or(whole)
                }
            };
            out.level = out.level.max(decayed);
            oldest = oldest.min(s.at);
            if age < config.window_ms {
                out.window_peak = out.window_peak.max(s.peak);
            }
        }
        for (from, to) in [yesterday, last_week] {
            if from < to && (from..=to).contains(&s.at) {
                out.forecast = out.forecast.max(s.peak);
            }
        }
    }
    // The history covers the window when a sample is at least 7/8 of a window old (runs need
    // not fall exactly on its start).
    if now - oldest < config.window_ms - config.window_ms / 8 {
        out.window_peak = u64::MAX;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 30 * DAY;

    fn at(ago: Millis, peak: u64) -> PeakSample {
        PeakSample {
            at: NOW - ago,
            peak,
        }
    }

    #[test]
    fn level_rises_at_once_and_decays_by_half_lives() {
        let c = SignalConfig::default();
        assert_eq!(signals(&[at(0, 40)], NOW, &c).level, 40);
        assert_eq!(signals(&[at(2 * HOUR, 40)], NOW, &c).level, 20);
        assert_eq!(signals(&[at(4 * HOUR, 40)], NOW, &c).level, 10);
        // Half-way through a half-life: three quarters.
        assert_eq!(signals(&[at(HOUR, 40)], NOW, &c).level, 30);
        // One idle sample does not erase a burst.
        assert_eq!(signals(&[at(15 * 60_000, 40), at(0, 0)], NOW, &c).level, 38);
    }

    #[test]
    fn window_peak_forgets_after_the_window() {
        let c = SignalConfig::default();
        let s = signals(
            &[at(c.window_ms - HOUR, 9), at(c.window_ms + HOUR, 30)],
            NOW,
            &c,
        );
        assert_eq!(s.window_peak, 9);
    }

    #[test]
    fn a_history_shorter_than_the_window_proves_no_idleness() {
        let c = SignalConfig::default();
        let s = signals(&[at(HOUR, 0), at(0, 0)], NOW, &c);
        assert_eq!(s.window_peak, u64::MAX);
        assert_eq!(s.level, 0);
    }

    #[test]
    fn forecast_reads_yesterday_and_last_week_ahead() {
        let c = SignalConfig::default();
        // Yesterday, 30 min later than now; last week, 2 h later (outside the look-ahead).
        let s = signals(
            &[at(DAY - 30 * 60_000, 12), at(WEEK - 2 * HOUR, 50)],
            NOW,
            &c,
        );
        assert_eq!(s.forecast, 12);
        let s = signals(&[at(WEEK - 10 * 60_000, 50)], NOW, &c);
        assert_eq!(s.forecast, 50);
    }

    #[test]
    fn future_samples_are_ignored() {
        let c = SignalConfig::default();
        let s = signals(
            &[PeakSample {
                at: NOW + 1,
                peak: 99,
            }],
            NOW,
            &c,
        );
        assert_eq!((s.level, s.forecast), (0, 0));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn samples() -> impl Strategy<Value = Vec<PeakSample>> {
            proptest::collection::vec(
                (0..8 * DAY, 0u64..1_000).prop_map(|(ago, peak)| at(ago, peak)),
                0..40,
            )
        }

        /// Samples most of which saw nothing in use, as most cells' do.
        fn mostly_idle() -> impl Strategy<Value = Vec<PeakSample>> {
            proptest::collection::vec(
                (0..8 * DAY, prop_oneof![3 => Just(0u64), 1 => 1u64..1_000])
                    .prop_map(|(ago, peak)| at(ago, peak)),
                0..40,
            )
        }

        proptest! {
            #[test]
            fn order_does_not_matter(mut s in samples()) {
                let c = SignalConfig::default();
                let a = signals(&s, NOW, &c);
                s.reverse();
                prop_assert_eq!(a, signals(&s, NOW, &c));
            }

            #[test]
            fn monotone_in_demand(s in samples(), k in 0usize..40, more in 0u64..100) {
                // Raising one sample's peak never lowers a signal.
                let c = SignalConfig::default();
                let before = signals(&s, NOW, &c);
                let mut t = s.clone();
                if let Some(x) = t.get_mut(k) {
                    x.peak += more;
                }
                let after = signals(&t, NOW, &c);
                prop_assert!(after.level >= before.level);
                prop_assert!(after.window_peak >= before.window_peak);
                prop_assert!(after.forecast >= before.forecast);
            }

            #[test]
            fn idle_samples_weigh_nothing_but_the_oldest(s in mostly_idle()) {
                // What the store reads (`Store::peak_samples`): samples with a positive peak,
                // and the oldest of the recent past as peak 0. The signals are the same.
                let c = SignalConfig::default();
                let [recent, ..] = c.ranges(NOW);
                let in_recent = |x: &&PeakSample| x.at >= recent.0 && x.at <= recent.1;
                let mut read: Vec<PeakSample> = s.iter().filter(|x| x.peak > 0).copied().collect();
                if let Some(oldest) = s.iter().filter(in_recent).map(|x| x.at).min() {
                    read.push(PeakSample { at: oldest, peak: 0 });
                }
                prop_assert_eq!(signals(&read, NOW, &c), signals(&s, NOW, &c));
            }

            #[test]
            fn level_never_exceeds_the_largest_peak(s in samples()) {
                let c = SignalConfig::default();
                let top = s.iter().map(|x| x.peak).max().unwrap_or(0);
                let got = signals(&s, NOW, &c);
                prop_assert!(got.level <= top && got.forecast <= top);
                prop_assert!(got.window_peak <= top || got.window_peak == u64::MAX);
                prop_assert!(got.level >= got.window_peak.min(
                    s.iter().filter(|x| x.at == NOW).map(|x| x.peak).max().unwrap_or(0)));
            }
        }
    }
}

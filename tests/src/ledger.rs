//! The clients' ledger of what they held, and the sweep that checks it against what was
//! purchased: the over-grant check as a client sees it.
//!
//! Each interval is a time a client *believed* it held some units of a product, measured on the
//! client's own monotonic clock. The fault tests choose the ends so that every interval lies
//! inside the time the granting server held the checkout (see `tests/tests/faults.rs`); then,
//! if the servers never had more units checked out at once than was purchased, neither did the
//! clients, and [`sweep`] finding more is a real over-grant.

use std::fmt;
use std::time::Duration;

/// One holding: `units` of a product held by `holder` over `[start, end)`, in time since the
/// run's epoch. Half-open: a unit checked in at `t` may be granted again at `t`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    /// Who held it, for the failure message (handle, server, how it ended).
    pub holder: String,
    /// Units held.
    pub units: u64,
    /// When the grant arrived.
    pub start: Duration,
    /// When the client stopped believing it held it.
    pub end: Duration,
}

/// An instant at which the holdings summed above capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    /// When the excess began.
    pub at: Duration,
    /// Units held at once.
    pub held: u64,
    /// Every holding live at that instant.
    pub holders: Vec<Interval>,
}

impl fmt::Display for Excess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} units held at once at {:?}:", self.held, self.at)?;
        for h in &self.holders {
            write!(
                f,
                "\n    {} unit(s) over [{:?}, {:?}): {}",
                h.units, h.start, h.end, h.holder
            )?;
        }
        Ok(())
    }
}

/// What a sweep found for one product.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// The most units held at once.
    pub peak: u64,
    /// When that peak was first reached.
    pub peak_at: Duration,
    /// How long the holdings were at capacity or above: evidence the load pressed on the limit.
    pub at_capacity: Duration,
    /// Each time the holdings rose above capacity (the first instant of each episode), at most
    /// [`MAX_EXCESSES`] of them.
    pub excesses: Vec<Excess>,
}

/// How many excess episodes a sweep reports in full.
pub const MAX_EXCESSES: usize = 5;

/// Sweeps the intervals in time order and finds the most units held at once and every time the
/// holdings exceeded `capacity`. At equal times ends are taken before starts (intervals are
/// half-open), so a unit handed from one holder to the next at the same instant is never
/// counted twice. Empty intervals (`end <= start`) hold nothing.
pub fn sweep(intervals: &[Interval], capacity: u64) -> Sweep {
    // (time, 0 = end / 1 = start, index): ends sort before starts at equal times.
    let mut events: Vec<(Duration, u8, usize)> = Vec::with_capacity(intervals.len() * 2);
    for (i, h) in intervals.iter().enumerate() {
        if h.end > h.start {
            events.push((h.start, 1, i));
            events.push((h.end, 0, i));
        }
    }
    events.sort_unstable();
    let mut out = Sweep::default();
    let mut live: Vec<usize> = Vec::new();
    let mut held: u64 = 0;
    let mut full_since: Option<Duration> = None;
    let mut over = false;
    for (at, kind, i) in events {
        if kind == 0 {
            held -= intervals[i].units;
            live.retain(|&j| j != i);
        } else {
            held += intervals[i].units;
            live.push(i);
        }
        if held > out.peak {
            out.peak = held;
            out.peak_at = at;
        }
        match (held >= capacity && held > 0, full_since) {
            (true, None) => full_since = Some(at),
            (false, Some(since)) => {
                out.at_capacity += at - since;
                full_since = None;
            }
            _ => {}
        }
        if held > capacity && !over {
            if out.excesses.len() < MAX_EXCESSES {
                out.excesses.push(Excess {
                    at,
                    held,
                    holders: live.iter().map(|&j| intervals[j].clone()).collect(),
                });
            }
            over = true;
        } else if held <= capacity {
            over = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn held(holder: &str, units: u64, start: u64, end: u64) -> Interval {
        Interval {
            holder: holder.to_owned(),
            units,
            start: ms(start),
            end: ms(end),
        }
    }

    #[test]
    fn overlapping_holdings_above_capacity_are_caught() {
        let intervals = [
            held("a", 1, 0, 100),
            held("b", 1, 50, 150),
            held("c", 1, 120, 200),
        ];
        let found = sweep(&intervals, 1);
        assert_eq!(found.peak, 2);
        assert_eq!(found.peak_at, ms(50));
        // Two episodes: a+b from 50, b+c from 120.
        assert_eq!(found.excesses.len(), 2, "{found:?}");
        let first = &found.excesses[0];
        assert_eq!((first.at, first.held), (ms(50), 2));
        let names: Vec<&str> = first.holders.iter().map(|h| h.holder.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(found.excesses[1].at, ms(120));
        let message = first.to_string();
        assert!(message.contains("2 units held at once") && message.contains(": b"));
    }

    #[test]
    fn units_count_not_holders() {
        let found = sweep(&[held("a", 2, 0, 10), held("b", 2, 5, 20)], 3);
        assert_eq!((found.peak, found.excesses.len()), (4, 1));
        let within = sweep(&[held("a", 2, 0, 10), held("b", 1, 5, 20)], 3);
        assert_eq!((within.peak, within.excesses.len()), (3, 0));
        assert_eq!(within.at_capacity, ms(5));
    }

    #[test]
    fn a_unit_handed_on_at_the_same_instant_is_not_counted_twice() {
        // b starts exactly when a ends, c exactly when b ends: ends before starts.
        let intervals = [
            held("c", 1, 200, 300),
            held("b", 1, 100, 200),
            held("a", 1, 0, 100),
        ];
        let found = sweep(&intervals, 1);
        assert_eq!(found.peak, 1);
        assert!(found.excesses.is_empty(), "{found:?}");
        assert_eq!(found.at_capacity, ms(300));
    }

    #[test]
    fn empty_intervals_hold_nothing() {
        let found = sweep(&[held("a", 1, 10, 10), held("b", 1, 20, 5)], 0);
        assert_eq!(found, Sweep::default());
    }

    #[test]
    fn one_overlap_by_a_millisecond_is_enough() {
        let found = sweep(&[held("a", 1, 0, 101), held("b", 1, 100, 200)], 1);
        assert_eq!(found.excesses.len(), 1);
        assert_eq!(found.excesses[0].at, ms(100));
    }
}

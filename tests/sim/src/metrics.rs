//! What a run measured, and the small sharing rules the baselines and the fairness reference
//! use (largest-remainder apportionment and max-min water-filling).

use crate::workload::{Arrival, Fault, HOUR, Workload};

/// Safety violations; every one of them must stay zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Violations {
    /// A server with more units in use than it holds, or allocations above purchased.
    pub over_grant: u64,
    /// A grant the reserve could not cover.
    pub negative_reserve: u64,
    /// reserve + in transit + Σ allocation ≠ purchased after an event.
    pub conservation: u64,
}

impl Violations {
    /// All violations together.
    pub fn total(&self) -> u64 {
        self.over_grant + self.negative_reserve + self.conservation
    }
}

/// One policy's figures over one workload.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// The policy's name.
    pub policy: String,
    /// Checkout attempts.
    pub checkouts: u64,
    /// Checkouts denied.
    pub denials: u64,
    /// Denied while enough free units sat elsewhere (other sites or the reserve).
    pub false_denials_all: u64,
    /// Denied while enough free units sat where the balancer could reach them.
    pub false_denials_reachable: u64,
    /// Units × hours of denied checkouts: the work that did not get done.
    pub unserved_seat_hours: f64,
    /// Checkouts held while their server asked for an instant balance.
    pub waited: u64,
    /// How long each of them waited, in ms.
    pub waits: Vec<u64>,
    /// 99th percentile of `waits`, filled by `finish`.
    pub wait_p99_ms: u64,
    /// Units moved (each release and each grant counts).
    pub units_moved: u64,
    /// Moves that moved units (each release and each grant counts once, whatever its size).
    pub moves: u64,
    /// Messages between sites and the balancer: instant requests, releases, grants.
    pub transactions: u64,
    /// Instant-balance requests sent by metering servers.
    pub instant_requests: u64,
    /// Scheduled runs made (the advice experiment compares schedules).
    pub scheduled_runs: u64,
    /// Units moved back within an hour of moving the other way.
    pub ping_pong_units: u64,
    /// Time from the demand step until the destination held 95 % of its new level.
    pub step_time: Option<u64>,
    /// Checkouts and denials at the first partitioned site during its partition.
    pub partition_site: (u64, u64),
    /// Σ over scarce samples of the share of the pool missing from where max-min puts it.
    pub fairness_gap_sum: f64,
    /// Samples under scarcity.
    pub fairness_samples: u64,
    /// Safety violations.
    pub violations: Violations,
    /// (checkouts, denials) per hour of simulated time.
    pub hourly: Vec<(u64, u64)>,
    /// Checkouts that waited on an instant balance, per hour of simulated time.
    pub hourly_waited: Vec<u64>,
    /// The product whose allocations are sampled: the one with the most units purchased.
    pub plotted_product: usize,
    /// (time, allocation per site, in use per site) of `plotted_product`, sampled.
    pub alloc_series: Vec<(u64, Vec<u64>, Vec<u64>)>,
    /// Hours measured (the evaluation period in the advice experiment).
    pub hours: f64,
    /// What the advisor recommended, for advised policies.
    pub advice: Option<allot_core::advisor::Advice>,
    partition: Option<(u16, u64, u64)>,
}

impl Metrics {
    /// Empty figures for a policy over a workload.
    pub fn new(policy: &str, w: &Workload) -> Self {
        let partition = w.faults.iter().find_map(|f| match *f {
            Fault::Partition { site, from, to } => Some((site, from, to)),
            _ => None,
        });
        let plotted_product = (0..w.purchased.len())
            .max_by_key(|&p| (w.purchased[p], std::cmp::Reverse(p)))
            .unwrap_or(0);
        Self {
            policy: policy.into(),
            plotted_product,
            hourly: vec![(0, 0); w.duration.div_ceil(HOUR) as usize + 1],
            hourly_waited: vec![0; w.duration.div_ceil(HOUR) as usize + 1],
            hours: w.duration as f64 / HOUR as f64,
            partition,
            ..Self::default()
        }
    }

    /// Figures count from `from` on (the advice experiment's evaluation period): per-hour
    /// rates are over the hours left.
    pub fn measure_from(&mut self, w: &Workload, from: u64) {
        self.hours = w.duration.saturating_sub(from) as f64 / HOUR as f64;
    }

    fn in_partition(&self, a: &Arrival) -> bool {
        self.partition
            .is_some_and(|(s, from, to)| a.site == s && (from..to).contains(&a.at))
    }

    /// Counts a checkout attempt.
    pub fn asked(&mut self, a: &Arrival) {
        self.checkouts += 1;
        let h = (a.at / HOUR) as usize;
        if let Some(x) = self.hourly.get_mut(h) {
            x.0 += 1;
        }
        if self.in_partition(a) {
            self.partition_site.0 += 1;
        }
    }

    /// Counts a denial of an attempt, with whether free units existed elsewhere.
    pub fn denied(&mut self, a: &Arrival, free_anywhere: bool, free_reachable: bool) {
        self.denials += 1;
        self.false_denials_all += u64::from(free_anywhere);
        self.false_denials_reachable += u64::from(free_reachable);
        self.unserved_seat_hours += f64::from(a.units) * a.hold as f64 / HOUR as f64;
        let h = (a.at / HOUR) as usize;
        if let Some(x) = self.hourly.get_mut(h) {
            x.1 += 1;
        }
        if self.in_partition(a) {
            self.partition_site.1 += 1;
        }
    }

    /// Counts a checkout that waited on an instant balance.
    pub fn waited(&mut self, at: u64, ms: u64) {
        self.waited += 1;
        if let Some(x) = self.hourly_waited.get_mut((at / HOUR) as usize) {
            *x += 1;
        }
        self.waits.push(ms);
    }

    /// Counts units moved.
    pub fn moved(&mut self, units: u64) {
        self.units_moved += units;
        self.moves += u64::from(units > 0);
    }

    /// Derives the percentiles once the run is over.
    pub fn finish(&mut self) {
        self.waits.sort_unstable();
        self.wait_p99_ms = percentile(&self.waits, 0.99);
    }

    /// Denials / checkouts.
    pub fn denial_rate(&self) -> f64 {
        ratio(self.denials, self.checkouts)
    }

    /// Denial rate of the partitioned site during its partition.
    pub fn partition_denial_rate(&self) -> f64 {
        ratio(self.partition_site.1, self.partition_site.0)
    }

    /// Mean fairness gap under scarcity, as a share of the pool.
    pub fn fairness_gap(&self) -> f64 {
        if self.fairness_samples == 0 {
            0.0
        } else {
            self.fairness_gap_sum / self.fairness_samples as f64
        }
    }
}

/// a / b, or 0 when b is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The q-quantile of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Splits `total` units in proportion to `weights` by largest remainder (ties to the lower
/// index); equal shares when every weight is zero.
pub fn apportion(total: u64, weights: &[f64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: f64 = weights.iter().sum();
    let weights: Vec<f64> = if sum > 0.0 {
        weights.to_vec()
    } else {
        vec![1.0; weights.len()]
    };
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut out: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut given: u64 = out.iter().sum();
    // Float rounding can overshoot by a unit at huge totals: take it back from the largest.
    while given > total {
        let i = (0..out.len()).max_by_key(|&i| out[i]).expect("non-empty");
        out[i] -= 1;
        given -= 1;
    }
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take((total - given) as usize) {
        out[i] += 1;
    }
    out
}

/// Max-min fair shares of `capacity` over `wants` (water-filling, no floors, equal weights):
/// the reference the fairness gap is measured against, and Doorman's FairShare.
pub fn water_fill(capacity: u64, wants: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; wants.len()];
    let mut left = capacity;
    let mut open: Vec<usize> = (0..wants.len()).filter(|&i| wants[i] > 0).collect();
    while left > 0 && !open.is_empty() {
        let share = (left / open.len() as u64).max(1);
        let mut next = Vec::new();
        for &i in &open {
            if left == 0 {
                break;
            }
            let give = share.min(wants[i] - out[i]).min(left);
            out[i] += give;
            left -= give;
            if out[i] < wants[i] {
                next.push(i);
            }
        }
        open = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_is_exact_and_proportional() {
        assert_eq!(apportion(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(apportion(10, &[3.0, 1.0]), vec![8, 2]);
        assert_eq!(apportion(5, &[0.0, 0.0]), vec![3, 2]);
        assert_eq!(apportion(7, &[0.2, 0.3, 0.5]).iter().sum::<u64>(), 7);
    }

    #[test]
    fn water_fill_is_max_min() {
        assert_eq!(water_fill(10, &[2, 8, 8]), vec![2, 4, 4]);
        assert_eq!(water_fill(100, &[2, 8]), vec![2, 8]);
        assert_eq!(water_fill(3, &[5, 5, 5, 5]).iter().sum::<u64>(), 3);
    }

    #[test]
    fn p99_of_a_hundred() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.99), 0);
    }
}

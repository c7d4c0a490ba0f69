//! Workloads: who asks for which product where and when, generated from a seed (or replayed
//! from a real log), plus the faults and the purchases the policies are measured under.
//!
//! Simulated time is milliseconds from the start of the run; t = 0 is a Monday 00:00 UTC for
//! the synthetic workloads. Every site has a UTC offset, and demand follows the site's local
//! clock. Arrivals are a non-homogeneous Poisson process per (site, product), drawn by
//! thinning, with exponential holding times: denied checkouts are lost (Erlang's
//! blocked-calls-cleared model), so a stationary workload can be checked against Erlang B.

use crate::rng::Rng;

/// One second of simulated time.
pub const SECOND: u64 = 1_000;
/// One minute of simulated time.
pub const MINUTE: u64 = 60 * SECOND;
/// One hour of simulated time.
pub const HOUR: u64 = 60 * MINUTE;
/// One day of simulated time.
pub const DAY: u64 = 24 * HOUR;
/// One week of simulated time.
pub const WEEK: u64 = 7 * DAY;

/// A metering server's site.
#[derive(Debug, Clone)]
pub struct Site {
    /// A human name for tables and plots.
    pub name: String,
    /// Local time = UTC + this; demand follows local office hours.
    pub utc_offset_minutes: i32,
}

/// One checkout attempt: the unit of demand every policy sees identically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When the client asks.
    pub at: u64,
    /// The site whose metering server it asks.
    pub site: u16,
    /// The product.
    pub product: u16,
    /// Units it asks for (multi-unit checkouts occur in HPC logs).
    pub units: u32,
    /// How long it holds the units once granted.
    pub hold: u64,
}

/// A fault injected into every balancing policy's run (the oracle has no network to fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The site cannot reach the balancer (nor be reached) in `[from, to)`; it keeps serving
    /// from what it holds.
    Partition {
        /// The cut-off site.
        site: u16,
        /// Start of the partition.
        from: u64,
        /// End of the partition.
        to: u64,
    },
    /// The balancer is down in `[from, to)`: no scheduled run, no instant balance.
    BalancerDown {
        /// Start of the outage.
        from: u64,
        /// End of the outage.
        to: u64,
    },
    /// The site's metering server crashes at `at`: its checkouts are lost and it serves nobody
    /// until `at + down_for`; its allocation is durable and survives.
    Crash {
        /// The crashing site.
        site: u16,
        /// When it crashes.
        at: u64,
        /// How long it stays down.
        down_for: u64,
    },
}

/// A demand step: measured as the time until the destination site holds 95 % of its new
/// demand level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// When demand moves.
    pub at: u64,
    /// The site that gains the demand.
    pub to_site: u16,
    /// Units (summed over products) the destination should hold right after the step: its new
    /// mean load.
    pub new_level: f64,
}

/// Everything one run of every policy needs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name, used in tables, file names and on the command line.
    pub name: String,
    /// One sentence for the docs.
    pub description: String,
    /// The metering servers.
    pub sites: Vec<Site>,
    /// Product names (index = product id).
    pub products: Vec<String>,
    /// Units purchased per product.
    pub purchased: Vec<u64>,
    /// Length of the simulation.
    pub duration: u64,
    /// Every checkout attempt, sorted by time.
    pub arrivals: Vec<Arrival>,
    /// Faults every balancing policy suffers.
    pub faults: Vec<Fault>,
    /// The demand step, if this workload has one.
    pub step: Option<Step>,
}

impl Workload {
    /// Mean offered load (units × time / duration) per (site, product): what a static split
    /// proportional to average demand divides by.
    pub fn mean_load(&self) -> Vec<Vec<f64>> {
        let mut load = vec![vec![0.0; self.products.len()]; self.sites.len()];
        for a in &self.arrivals {
            load[a.site as usize][a.product as usize] += a.units as f64 * a.hold as f64;
        }
        for row in &mut load {
            for x in row.iter_mut() {
                *x /= self.duration.max(1) as f64;
            }
        }
        load
    }
}

/// Office hours on a site's local clock, as a share of the weekday peak (weekends and nights
/// keep 3 %).
pub fn office(local_minutes_of_week: u64) -> f64 {
    let day = local_minutes_of_week / (24 * 60);
    if day >= 5 {
        return 0.03;
    }
    let h = (local_minutes_of_week % (24 * 60)) as f64 / 60.0;
    let low = 0.03;
    match h {
        h if h < 7.0 => low,
        h if h < 9.0 => low + (1.0 - low) * (h - 7.0) / 2.0,
        h if h < 12.0 => 1.0,
        h if h < 13.0 => 0.8,
        h if h < 17.0 => 1.0,
        h if h < 19.0 => 1.0 - (1.0 - low) * (h - 17.0) / 2.0,
        _ => low,
    }
}

/// Minutes since local Monday 00:00 at time `t` for a site with this UTC offset.
pub fn local_minutes(t: u64, utc_offset_minutes: i32) -> u64 {
    let m = (t / MINUTE) as i64 + i64::from(utc_offset_minutes);
    m.rem_euclid(7 * 24 * 60) as u64
}

/// The ten sites of the synthetic estates: ten time zones from UTC−8 to UTC+9.
pub fn world_sites() -> Vec<Site> {
    [
        ("san-francisco", -480),
        ("new-york", -300),
        ("sao-paulo", -180),
        ("london", 0),
        ("paris", 60),
        ("johannesburg", 120),
        ("dubai", 240),
        ("bangalore", 330),
        ("singapore", 480),
        ("tokyo", 540),
    ]
    .into_iter()
    .map(|(name, off)| Site {
        name: name.into(),
        utc_offset_minutes: off,
    })
    .collect()
}

/// Parameters of a synthetic workload's arrival process.
pub struct Synth<'a> {
    /// The sites.
    pub sites: Vec<Site>,
    /// Number of products.
    pub products: usize,
    /// Length of the run.
    pub duration: u64,
    /// Mean holding time.
    pub hold_mean: u64,
    /// Offered load in Erlangs of (site, product) at time t.
    pub load: &'a dyn Fn(usize, usize, u64) -> f64,
    /// An upper bound of `load` per (site, product), for thinning.
    pub max_load: &'a dyn Fn(usize, usize) -> f64,
    /// The seed.
    pub seed: u64,
}

/// Draws the arrivals of a synthetic workload, sorted by time.
pub fn synthesize(s: &Synth<'_>) -> Vec<Arrival> {
    let mut out = Vec::new();
    for site in 0..s.sites.len() {
        for product in 0..s.products {
            let mut rng = Rng::new(s.seed ^ (((site as u64) << 32 | product as u64) * 0x9e37));
            let max = (s.max_load)(site, product);
            if max <= 0.0 {
                continue;
            }
            // Arrival rate per ms at the bound.
            let rate = max / s.hold_mean as f64;
            let mut t = 0.0;
            loop {
                t += rng.exp(1.0 / rate);
                if t >= s.duration as f64 {
                    break;
                }
                let at = t as u64;
                let accept = (s.load)(site, product, at) / max;
                if rng.unit() <= accept {
                    let hold = (rng.exp(s.hold_mean as f64) as u64).max(SECOND);
                    out.push(Arrival {
                        at,
                        site: site as u16,
                        product: product as u16,
                        units: 1,
                        hold,
                    });
                }
            }
        }
    }
    out.sort_by_key(|a| (a.at, a.site, a.product));
    out
}

/// Oracle denial rate (checkouts denied / checkouts) of one product's arrivals against one
/// central pool of `units`: the quantity [`calibrate`] searches over.
pub fn pool_denial_rate(arrivals: &[Arrival], product: u16, units: u64) -> f64 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut ends: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let (mut used, mut asked, mut denied) = (0u64, 0u64, 0u64);
    for a in arrivals.iter().filter(|a| a.product == product) {
        while let Some(&Reverse((end, u))) = ends.peek() {
            if end > a.at {
                break;
            }
            used -= u;
            ends.pop();
        }
        asked += 1;
        if used + u64::from(a.units) <= units {
            used += u64::from(a.units);
            ends.push(Reverse((a.at + a.hold, u64::from(a.units))));
        } else {
            denied += 1;
        }
    }
    if asked == 0 {
        0.0
    } else {
        denied as f64 / asked as f64
    }
}

/// Per product, the smallest purchase whose one-pool (oracle) denial rate is at most `target`:
/// sizes every workload so the oracle denies about `target`, whatever its shape.
pub fn calibrate(arrivals: &[Arrival], products: usize, target: f64) -> Vec<u64> {
    (0..products)
        .map(|p| {
            let p = p as u16;
            let mut hi = 1u64;
            while pool_denial_rate(arrivals, p, hi) > target {
                hi *= 2;
            }
            let mut lo = 0u64; // rate(lo) > target or lo == 0
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if pool_denial_rate(arrivals, p, mid) > target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            hi
        })
        .collect()
}

/// The base peak load (Erlangs at a site of weight 1) of product `p` in the synthetic estates.
fn product_peak(p: usize) -> f64 {
    2.0 + ((p * 7) % 19) as f64 * 1.5
}

/// The weight of site `s` in the synthetic estates (0.6 … 1.4).
fn site_weight(s: usize) -> f64 {
    0.6 + 0.1 * ((s * 3) % 9) as f64
}

/// Size knobs shared by every synthetic workload, so tests can run a small estate.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Number of products (≤ 20 in the docs' runs).
    pub products: usize,
    /// Length of the run.
    pub duration: u64,
    /// Multiplies every load (the docs use 1.5: a week of about a million checkouts).
    pub load: f64,
    /// Mean holding time.
    pub hold_mean: u64,
    /// The seed.
    pub seed: u64,
}

impl Default for Scale {
    /// The documented estate: 10 sites, 20 products, one week, 12-minute holds, about a
    /// million checkouts.
    fn default() -> Self {
        Self {
            products: 20,
            duration: WEEK,
            load: 1.5,
            hold_mean: 12 * MINUTE,
            seed: 1,
        }
    }
}

/// Names of the synthetic workloads, in the order of the docs.
pub const SYNTHETIC: [&str; 8] = [
    "follow-the-sun",
    "login-storm",
    "night-batch",
    "step",
    "scarcity",
    "partition",
    "holiday",
    "faults",
];

/// The oracle denial rate every calibrated workload is sized for.
pub const ORACLE_TARGET: f64 = 0.015;

/// Builds a synthetic workload by name, or `None` for an unknown name.
pub fn synthetic(name: &str, scale: Scale) -> Option<Workload> {
    let mut sites = world_sites();
    let np = scale.products;
    let base = move |s: usize, p: usize| product_peak(p) * site_weight(s) * scale.load;
    let offsets: Vec<i32> = match name {
        // Three clusters of zones: everyone logs in at about the same time.
        "login-storm" | "scarcity" => vec![-300, -300, -240, 0, 0, 60, 60, 120, 180, 330],
        _ => sites.iter().map(|s| s.utc_offset_minutes).collect(),
    };
    for (site, off) in sites.iter_mut().zip(&offsets) {
        site.utc_offset_minutes = *off;
    }
    let offs = offsets.clone();
    let ftsun = move |s: usize, p: usize, t: u64| base(s, p) * office(local_minutes(t, offs[s]));
    let step_at = 2 * DAY + 8 * HOUR; // Wednesday 08:00 UTC: Johannesburg 10:00.
    let (from_site, to_site) = (3usize, 5usize);
    let offs = offsets.clone();
    let storm = move |s: usize, p: usize, t: u64| {
        let m = local_minutes(t, offs[s]);
        let h = (m % (24 * 60)) as f64 / 60.0;
        if m / (24 * 60) >= 5 {
            return base(s, p) * 0.03;
        }
        // Nobody before 08:30; everyone at 08:30, settling to the plateau by 10:00.
        let shape = match h {
            h if h < 8.5 => 0.03,
            h if h < 10.0 => 1.3 - 0.3 * (h - 8.5) / 1.5,
            _ => office(m),
        };
        base(s, p) * shape
    };
    let offs = offsets.clone();
    let load: Box<dyn Fn(usize, usize, u64) -> f64> = match name {
        "follow-the-sun" | "night-batch" | "partition" | "faults" => Box::new(ftsun),
        "login-storm" => Box::new(storm),
        "scarcity" => Box::new(ftsun),
        "step" => Box::new(move |s, p, t| {
            let own = ftsun(s, p, t);
            if t < step_at {
                own
            } else if s == from_site {
                own * 0.2
            } else if s == to_site {
                own + 0.8 * base(from_site, p) * office(local_minutes(t, offs[s]))
            } else {
                own
            }
        }),
        "holiday" => Box::new(move |s, p, t| {
            // Singapore and Tokyo are off on Wednesday and Thursday (local).
            let day = local_minutes(t, offs[s]) / (24 * 60);
            if s >= 8 && (2..=3).contains(&day) {
                base(s, p) * 0.03
            } else {
                ftsun(s, p, t)
            }
        }),
        _ => return None,
    };
    let max = move |s: usize, p: usize| base(s, p) * 1.3 * if s == to_site { 2.0 } else { 1.0 };
    let mut arrivals = synthesize(&Synth {
        sites: sites.clone(),
        products: np,
        duration: scale.duration,
        hold_mean: scale.hold_mean,
        load: &*load,
        max_load: &max,
        seed: scale.seed
            ^ name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31) + u64::from(b)),
    });
    if name == "night-batch" {
        // Every night at 01:00 local, Sao Paulo and Bangalore start 25 batch jobs per product
        // for the first five products within ten minutes, each holding about two hours.
        let mut rng = Rng::new(scale.seed ^ 0xba7c);
        for day in 0..scale.duration.div_ceil(DAY) {
            for &s in &[2usize, 7] {
                let start = (day * DAY + HOUR) as i64 - i64::from(offsets[s]) * MINUTE as i64;
                for p in 0..np.min(5) {
                    let jobs = (25.0 * scale.load).round() as u64;
                    for _ in 0..jobs {
                        let at = start + rng.below(10 * MINUTE) as i64;
                        if at < 0 || at as u64 >= scale.duration {
                            continue;
                        }
                        arrivals.push(Arrival {
                            at: at as u64,
                            site: s as u16,
                            product: p as u16,
                            units: 1,
                            hold: HOUR + rng.below(2 * HOUR),
                        });
                    }
                }
            }
        }
        arrivals.sort_by_key(|a| (a.at, a.site, a.product));
    }
    let purchased = if name == "scarcity" {
        // 30 % short of the aggregate weekday peak: demand exceeds purchases for hours.
        (0..np)
            .map(|p| {
                let peak = (0..(DAY / (15 * MINUTE)))
                    .map(|k| {
                        (0..sites.len())
                            .map(|s| load(s, p, k * 15 * MINUTE))
                            .sum::<f64>()
                    })
                    .fold(0.0, f64::max);
                (peak * 0.7).round().max(1.0) as u64
            })
            .collect()
    } else {
        calibrate(&arrivals, np, ORACLE_TARGET)
    };
    let mut faults = Vec::new();
    if name == "partition" {
        // London cut off on Tuesday from 05:00 to 12:00 local, across its morning ramp.
        faults.push(Fault::Partition {
            site: 3,
            from: DAY + 5 * HOUR,
            to: DAY + 12 * HOUR,
        });
    }
    if name == "faults" {
        faults.push(Fault::BalancerDown {
            from: 3 * DAY + 6 * HOUR,
            to: 3 * DAY + 10 * HOUR,
        });
        faults.push(Fault::Crash {
            site: 4,
            at: 4 * DAY + 10 * HOUR,
            down_for: 30 * MINUTE,
        });
        faults.push(Fault::Partition {
            site: 8,
            from: DAY + 20 * HOUR,
            to: 2 * DAY + 4 * HOUR,
        });
    }
    let step = (name == "step").then(|| Step {
        at: step_at,
        to_site: to_site as u16,
        new_level: (0..np).map(|p| load(to_site, p, step_at + HOUR)).sum(),
    });
    let description = match name {
        "follow-the-sun" => "office hours in ten time zones from UTC-8 to UTC+9",
        "login-storm" => "three clusters of zones; everyone logs in at 08:30 local",
        "night-batch" => {
            "follow-the-sun plus 25 two-hour batch jobs per product at 01:00 in two sites"
        }
        "step" => {
            "follow-the-sun; on Wednesday 08:00 UTC 80 % of London's demand moves to Johannesburg"
        }
        "scarcity" => "clustered zones; purchases 30 % below the aggregate peak",
        "partition" => {
            "follow-the-sun; London cut off from the balancer on Tuesday 05:00-12:00 local"
        }
        "holiday" => "follow-the-sun; Singapore and Tokyo on holiday Wednesday and Thursday",
        "faults" => {
            "follow-the-sun; balancer down 4 h, a metering-server crash, Singapore cut off across its morning"
        }
        _ => "",
    };
    Some(Workload {
        name: name.into(),
        description: description.into(),
        sites,
        products: (0..np).map(|p| format!("product-{p:02}")).collect(),
        purchased,
        duration: scale.duration,
        arrivals,
        faults,
        step,
    })
}

/// A stationary Poisson workload (constant load per site), for the Erlang-B checks.
pub fn stationary(
    sites: usize,
    load_per_site: f64,
    hold_mean: u64,
    duration: u64,
    seed: u64,
) -> Workload {
    let site_list: Vec<Site> = (0..sites)
        .map(|s| Site {
            name: format!("site-{s}"),
            utc_offset_minutes: 0,
        })
        .collect();
    let arrivals = synthesize(&Synth {
        sites: site_list.clone(),
        products: 1,
        duration,
        hold_mean,
        load: &|_, _, _| load_per_site,
        max_load: &|_, _| load_per_site,
        seed,
    });
    Workload {
        name: "stationary".into(),
        description: "constant Poisson load".into(),
        sites: site_list,
        products: vec!["product-00".into()],
        purchased: vec![0],
        duration,
        arrivals,
        faults: Vec::new(),
        step: None,
    }
}

/// Erlang's B formula: the blocking probability of `servers` units offered `load` Erlangs.
pub fn erlang_b(servers: u64, load: f64) -> f64 {
    let mut b = 1.0;
    for k in 1..=servers {
        b = load * b / (k as f64 + load * b);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_b_matches_the_issue_figures() {
        // 100 licences, 80 Erlangs: 0.4 % as one pool; 20 units per 16 Erlangs: 6.4 %.
        assert!((erlang_b(100, 80.0) - 0.004).abs() < 0.001);
        assert!((erlang_b(20, 16.0) - 0.064).abs() < 0.003);
    }

    #[test]
    fn office_hours_peak_at_midday_and_idle_at_night() {
        assert_eq!(office(10 * 60), 1.0);
        assert_eq!(office(3 * 60), 0.03);
        assert_eq!(office(5 * 24 * 60 + 10 * 60), 0.03);
    }

    #[test]
    fn local_time_wraps_the_week() {
        assert_eq!(local_minutes(0, -60), 7 * 24 * 60 - 60);
        assert_eq!(local_minutes(HOUR, 60), 120);
    }
}

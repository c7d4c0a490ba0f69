//! The discrete-event engine: one balancing policy over one workload.
//!
//! Every policy sees the same arrivals. Metering servers grant from their own allocation; a
//! message between a site and the balancer takes `latency` one way; a move takes effect where it
//! lands (a release when the server applies it, a grant when the server receives it), and units
//! between the two ends are *in transit*. The books (`reserve + in_transit + Σ allocation =
//! purchased`), the hard stop (`in_use ≤ allocation`) and the reserve's sign are checked after
//! every event, and every failure is counted as a safety violation.
//!
//! allot's policy is the shipped one and nothing else: the scheduled runs call the real demand
//! signals ([`allot_core::demand::signals`]) over the samples the runs record, exactly as the
//! balancer's runs do, and the real planner ([`allot_core::planner::plan_product`]); the
//! balancer's instant handler is the real instant plan ([`allot_core::instant::plan_instant`]);
//! the metering servers call the real trigger ([`allot_core::trigger::instant_request`]). The
//! simulator only carries messages, keeps the books and measures.//!
//! Laid out by side: this file holds the policies, the configuration, the event queue and the
//! safety checks; `site` the metering servers (checkouts, the wait queue, the trigger); `events`
//! what each message does where it lands; `balancer` the balancer's runs and instant handler
//! (the shipped planner and instant plan for allot, the baselines' own) and the advice hook.

use crate::advice::{Recorder, SampleCounts, Tuned, advisor_input};
use crate::metrics::{Metrics, apportion, water_fill};
use crate::workload::{Arrival, DAY, Fault, HOUR, MINUTE, Workload};
use allot_core::advisor::{CellSettings, advise};
use allot_core::demand::{PeakSample, SignalConfig, signals};
use allot_core::domain::RunTrigger;
use allot_core::instant::{InstantAsk, plan_instant};
use allot_core::planner::{
    CellSnapshot, DEFAULT_HOLD_MS, Demand, Move, PlannerConfig, ProductSnapshot, plan_product,
};
use allot_core::trigger::{TriggerConfig, TriggerState, instant_request, next_check_at};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

/// How a policy balances; see docs/simulator.md for each one's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One central pool, zero latency: the floor no split can beat.
    Oracle,
    /// Equal shares, never moved.
    StaticEqual,
    /// Shares proportional to each site's mean demand over the run, never moved.
    StaticProportional,
    /// SMS 2.0 scheduled balancing only: in use plus a buffer, the rest in proportion.
    Sms {
        /// Time between runs.
        interval: u64,
    },
    /// Pull when empty: the denied checkout triggers a one-unit instant balance.
    InstantOnly,
    /// Doorman-style lease refresh of wants (in use + denials): ProportionalShare or FairShare.
    Doorman {
        /// Time between refreshes.
        interval: u64,
        /// FairShare (max-min) instead of ProportionalShare.
        fair: bool,
    },
    /// Sentinel-style threshold borrowing: borrow 10 % at 90 % used, free pool first, then
    /// unused units of other sites.
    Sentinel,
    /// allot: the shipped policy — the real planner on a schedule, with or without the real
    /// trigger and instant plan (instant balancing off hands the reserve out, as the planner's
    /// `instant_balancing` setting says).
    Allot {
        /// Time between scheduled runs.
        interval: u64,
        /// Whether metering servers call the trigger (instant balancing on).
        instant: bool,
        /// Whether the advisor's recommendations, read from the training period's history,
        /// are applied at its end (see [`crate::advice`] and [`SimConfig::train`]).
        advised: bool,
    },
}

/// A named policy: a column of the results tables.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The column name.
    pub name: String,
    /// Its behaviour.
    pub kind: Kind,
}

impl Policy {
    fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

/// Every policy of the results tables, the oracle first and allot last.
pub fn all_policies() -> Vec<Policy> {
    vec![
        Policy::new("oracle", Kind::Oracle),
        Policy::new("static-equal", Kind::StaticEqual),
        Policy::new("static-prop", Kind::StaticProportional),
        Policy::new("sms-24h", Kind::Sms { interval: DAY }),
        Policy::new("sms-1h", Kind::Sms { interval: HOUR }),
        Policy::new(
            "sms-15m",
            Kind::Sms {
                interval: 15 * MINUTE,
            },
        ),
        Policy::new("instant-only", Kind::InstantOnly),
        Policy::new(
            "doorman-prop",
            Kind::Doorman {
                interval: MINUTE,
                fair: false,
            },
        ),
        Policy::new(
            "doorman-fair",
            Kind::Doorman {
                interval: MINUTE,
                fair: true,
            },
        ),
        Policy::new("sentinel", Kind::Sentinel),
        Policy::new(
            "allot-sched-24h",
            Kind::Allot {
                interval: DAY,
                instant: false,
                advised: false,
            },
        ),
        Policy::new(
            "allot-sched-1h",
            Kind::Allot {
                interval: HOUR,
                instant: false,
                advised: false,
            },
        ),
        Policy::new(
            "allot-sched-15m",
            Kind::Allot {
                interval: 15 * MINUTE,
                instant: false,
                advised: false,
            },
        ),
        Policy::new(
            "allot",
            Kind::Allot {
                interval: 15 * MINUTE,
                instant: true,
                advised: false,
            },
        ),
    ]
}

/// The policies of the advice experiment: the oracle, allot and allot's scheduled path alone
/// every hour, each un-tuned and with the advisor's recommendations applied after training.
pub fn advice_policies() -> Vec<Policy> {
    let allot = |name: &str, interval: u64, instant: bool, advised: bool| {
        Policy::new(
            name,
            Kind::Allot {
                interval,
                instant,
                advised,
            },
        )
    };
    vec![
        Policy::new("oracle", Kind::Oracle),
        allot("allot", 15 * MINUTE, true, false),
        allot("allot-advised", 15 * MINUTE, true, true),
        allot("allot-sched-1h", HOUR, false, false),
        allot("allot-sched-1h-advised", HOUR, false, true),
    ]
}

/// Knobs of the simulated estate, shared by every policy of a run.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// One-way latency of every message between a site and the balancer.
    pub latency: u64,
    /// How long a metering server holds a checkout while it asks for an instant balance.
    pub hold_bound: u64,
    /// The real trigger policy's knobs (allot only).
    pub trigger: TriggerConfig,
    /// The real planner's knobs (allot only); `instant_balancing` follows the policy.
    pub planner: PlannerConfig,
    /// The real demand signals' knobs (allot only).
    pub signals: SignalConfig,
    /// How long units granted to a cell are held (allot only), as the balancer's `--hold-seconds`.
    pub hold: u64,
    /// Sampling period of the time series (allocations, fairness, the step).
    pub sample_every: u64,
    /// Length of the training period of the advice experiment (0: none). When set, every
    /// policy's figures count only what happens after it, so un-tuned and advised runs are
    /// compared on the same evaluation period, and advised policies apply the advisor's
    /// recommendations, read from the history of this period, at its end.
    pub train: u64,
}

impl Default for SimConfig {
    /// 50 ms one way, the design's 500 ms hold bound, and allot's shipped defaults.
    fn default() -> Self {
        Self {
            latency: 50,
            hold_bound: 500,
            trigger: TriggerConfig::default(),
            planner: PlannerConfig::default(),
            signals: SignalConfig::default(),
            hold: DEFAULT_HOLD_MS,
            sample_every: 5 * MINUTE,
            train: 0,
        }
    }
}

/// Samples older than this are never read by the demand signals.
const HISTORY: u64 = 8 * DAY;

/// A checkout held while its server asks for an instant balance.
#[derive(Debug, Clone, Copy)]
struct Pending {
    id: u64,
    units: u64,
    hold: u64,
    arrived: u64,
}

/// One (site, product): the metering server's side plus the counters the balancer reads.
#[derive(Debug, Clone)]
struct Cell {
    site: usize,
    product: usize,
    alloc: u64,
    in_use: u64,
    queue: VecDeque<Pending>,
    queued_units: u64,
    in_flight_since: Option<u64>,
    in_flight_urgent: bool,
    /// Urgent units asked by requests still unanswered, and how many requests those are.
    urgent_in_flight: u64,
    requests_in_flight: u32,
    short_answer_at: Option<u64>,
    urgent_short_at: Option<u64>,
    /// When a re-evaluation of the trigger is scheduled.
    recheck_at: Option<u64>,
    /// Since the last scheduled run.
    peak: u64,
    denials: u64,
    /// Since the last sample (fairness reference).
    sample_denials: u64,
    /// The peak in use recorded by each scheduled run, as the balancer's usage samples.
    samples: VecDeque<PeakSample>,
    /// The demand and in use the last scheduled run saw (the balancer's memory of it).
    seen: (Demand, u64),
    /// When units were last granted to the cell.
    granted_at: Option<u64>,
    epoch: u32,
    /// Recent moves for ping-pong: (time, +units granted / −units released).
    recent_moves: VecDeque<(u64, i64)>,
    /// Units asked by instant requests since the last scheduled run (the history's sample).
    instant_units: u64,
    /// Instant requests since the last scheduled run.
    instant_count: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Books {
    purchased: u64,
    reserve: u64,
    in_transit: u64,
}

#[derive(Debug, Clone)]
enum Ev {
    Depart {
        cell: usize,
        units: u64,
        epoch: u32,
    },
    HoldExpire {
        cell: usize,
        id: u64,
    },
    InstantAtBalancer {
        cell: usize,
        units: u64,
        deficit: u64,
    },
    Grant {
        cell: usize,
        units: u64,
        reply: Option<Reply>,
    },
    /// `for_cell`: a reclaim for this asker, and the answer to its instant request when this
    /// release carries that answer.
    Release {
        cell: usize,
        units: u64,
        for_cell: Option<(usize, Option<Reply>)>,
    },
    ReleaseConfirm {
        product: usize,
        units: u64,
        for_cell: Option<(usize, Option<Reply>)>,
    },
    /// The metering server re-evaluates its trigger (`next_check_at`).
    Recheck {
        cell: usize,
    },
    RunGrants {
        product: usize,
        grants: Vec<(usize, u64)>,
    },
    /// A scheduled run; stale when its generation is not the schedule's current one (the
    /// schedule changed since it was queued).
    Scheduled {
        generation: u32,
    },
    Sample,
    /// The end of the training period: figures restart from here.
    Measure,
    /// The end of the training period for an advised policy: ask the advisor, apply.
    Advise,
    Crash {
        site: usize,
        down_for: u64,
    },
}

/// The answer to an instant request, carried by the grant that ends it: (units asked, urgent
/// units asked, units already granted by earlier grants of the same answer).
type Reply = (u64, u64, u64);

struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // A min-heap on (time, sequence): ties run in the order they were scheduled.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Runs one policy over one workload and returns its metrics.
pub fn run(w: &Workload, policy: &Policy, cfg: &SimConfig) -> Metrics {
    if policy.kind == Kind::Oracle {
        return run_oracle(w, policy, cfg.train);
    }
    let mut sim = Sim::new(w, policy, cfg);
    sim.run();
    sim.metrics
}

/// The oracle: one pool per product, no latency, no faults; figures count from `measure_from`.
fn run_oracle(w: &Workload, policy: &Policy, measure_from: u64) -> Metrics {
    let mut m = Metrics::new(&policy.name, w);
    m.measure_from(w, measure_from);
    let mut used = vec![0u64; w.products.len()];
    let mut ends: BinaryHeap<std::cmp::Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    for a in &w.arrivals {
        while let Some(&std::cmp::Reverse((end, p, u))) = ends.peek() {
            if end > a.at {
                break;
            }
            used[p] -= u;
            ends.pop();
        }
        let p = a.product as usize;
        let u = u64::from(a.units);
        let measured = a.at >= measure_from;
        if measured {
            m.asked(a);
        }
        if used[p] + u <= w.purchased[p] {
            used[p] += u;
            ends.push(std::cmp::Reverse((a.at + a.hold, p, u)));
        } else if measured {
            m.denied(a, false, false);
        }
    }
    m
}

struct Sim<'a> {
    w: &'a Workload,
    kind: Kind,
    cfg: &'a SimConfig,
    np: usize,
    cells: Vec<Cell>,
    books: Vec<Books>,
    heap: BinaryHeap<Entry>,
    seq: u64,
    next_id: u64,
    down_until: Vec<u64>,
    metrics: Metrics,
    now: u64,
    /// Configured `min_units` / `buffer_units` per cell: 0 / 0 (un-tuned) until advice is
    /// applied; the runs and the instant handler honour them on top of their own signals.
    settings: Vec<CellSettings>,
    /// The schedule's generation: bumped when advice replaces it, so queued runs go stale.
    generation: u32,
    /// Remaining run times of an advised cron; `None` runs every `interval`.
    cron_runs: Option<VecDeque<u64>>,
    /// The training period's history (advised policies only, until the advice is made).
    recorder: Option<Recorder>,
}

impl<'a> Sim<'a> {
    fn new(w: &'a Workload, policy: &Policy, cfg: &'a SimConfig) -> Self {
        let np = w.products.len();
        let ns = w.sites.len();
        let mut cells = Vec::with_capacity(ns * np);
        for site in 0..ns {
            for product in 0..np {
                cells.push(Cell {
                    site,
                    product,
                    alloc: 0,
                    in_use: 0,
                    queue: VecDeque::new(),
                    queued_units: 0,
                    in_flight_since: None,
                    in_flight_urgent: false,
                    urgent_in_flight: 0,
                    requests_in_flight: 0,
                    short_answer_at: None,
                    urgent_short_at: None,
                    recheck_at: None,
                    peak: 0,
                    denials: 0,
                    sample_denials: 0,
                    samples: VecDeque::new(),
                    seen: (Demand::default(), 0),
                    granted_at: None,
                    epoch: 0,
                    recent_moves: VecDeque::new(),
                    instant_units: 0,
                    instant_count: 0,
                });
            }
        }
        let mean = w.mean_load();
        let books = (0..np)
            .map(|p| {
                let purchased = w.purchased[p];
                let shares = match policy.kind {
                    Kind::StaticProportional => {
                        let weights: Vec<f64> = (0..ns).map(|s| mean[s][p]).collect();
                        apportion(purchased, &weights)
                    }
                    // allot starts as the balancer does with a new product: every unit in
                    // the reserve, the first run granting what each site wants.
                    Kind::Allot { .. } => vec![0; ns],
                    _ => apportion(purchased, &vec![1.0; ns]),
                };
                let reserve = purchased - shares.iter().sum::<u64>();
                for (s, units) in shares.into_iter().enumerate() {
                    cells[s * np + p].alloc = units;
                }
                Books {
                    purchased,
                    reserve,
                    in_transit: 0,
                }
            })
            .collect();
        let mut sim = Sim {
            w,
            kind: policy.kind,
            cfg,
            np,
            cells,
            books,
            heap: BinaryHeap::new(),
            seq: 0,
            next_id: 0,
            down_until: vec![0; ns],
            metrics: Metrics::new(&policy.name, w),
            now: 0,
            settings: vec![CellSettings::default(); ns * np],
            generation: 0,
            cron_runs: None,
            recorder: None,
        };
        if cfg.train > 0 {
            sim.at(cfg.train, Ev::Measure);
            if let Kind::Allot { advised: true, .. } = policy.kind {
                sim.recorder = Some(Recorder::default());
                sim.at(cfg.train, Ev::Advise);
            }
        }
        if matches!(
            policy.kind,
            Kind::Sms { .. } | Kind::Doorman { .. } | Kind::Allot { .. }
        ) {
            sim.at(0, Ev::Scheduled { generation: 0 });
        }
        sim.at(0, Ev::Sample);
        for f in &w.faults {
            if let Fault::Crash { site, at, down_for } = *f {
                sim.at(
                    at,
                    Ev::Crash {
                        site: site as usize,
                        down_for,
                    },
                );
            }
        }
        sim
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn run(&mut self) {
        let arrivals = &self.w.arrivals;
        let mut next = 0usize;
        loop {
            let heap_at = self.heap.peek().map(|e| e.at);
            let arrival_at = arrivals.get(next).map(|a| a.at);
            match (heap_at, arrival_at) {
                (None, None) => break,
                (Some(h), a) if a.is_none_or(|a| h <= a) => {
                    let e = self.heap.pop().expect("peeked");
                    if e.at > self.w.duration && matches!(e.ev, Ev::Scheduled { .. } | Ev::Sample) {
                        continue;
                    }
                    self.now = e.at;
                    self.event(e.ev);
                }
                _ => {
                    let a = arrivals[next];
                    next += 1;
                    self.now = a.at;
                    self.checkout(&a);
                    self.check(a.product as usize);
                }
            }
        }
        self.metrics.finish();
    }

    // ---- reachability -------------------------------------------------------------------

    fn balancer_up(&self, t: u64) -> bool {
        !self
            .w
            .faults
            .iter()
            .any(|f| matches!(*f, Fault::BalancerDown { from, to } if (from..to).contains(&t)))
    }

    fn partitioned(&self, site: usize, t: u64) -> bool {
        self.w.faults.iter().any(|f| {
            matches!(*f, Fault::Partition { site: s, from, to }
                if s as usize == site && (from..to).contains(&t))
        })
    }

    /// Whether the balancer and the site can talk now.
    fn reachable(&self, site: usize, t: u64) -> bool {
        self.balancer_up(t) && !self.partitioned(site, t) && self.down_until[site] <= t
    }

    fn cell(&self, site: usize, product: usize) -> usize {
        site * self.np + product
    }

    // ---- safety ---------------------------------------------------------------------------

    /// The invariants, after every event that touched `product`.
    fn check(&mut self, product: usize) {
        let b = self.books[product];
        let mut allocated = 0u64;
        for s in 0..self.w.sites.len() {
            let c = &self.cells[s * self.np + product];
            allocated += c.alloc;
            if c.in_use > c.alloc {
                self.metrics.violations.over_grant += 1;
            }
        }
        if allocated > b.purchased {
            self.metrics.violations.over_grant += 1;
        }
        if b.reserve + b.in_transit + allocated != b.purchased {
            self.metrics.violations.conservation += 1;
        }
    }
}

mod balancer;
mod events;
mod site;

pub use balancer::doorman_proportional;

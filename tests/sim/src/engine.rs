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
//! simulator only carries messages, keeps the books and measures.

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

    // ---- metering server ------------------------------------------------------------------

    fn record_in_use(&mut self, k: usize) {
        let c = &mut self.cells[k];
        c.peak = c.peak.max(c.in_use);
    }

    fn checkout(&mut self, a: &Arrival) {
        let (s, p) = (a.site as usize, a.product as usize);
        let k = self.cell(s, p);
        let u = u64::from(a.units);
        self.metrics.asked(a);
        if self.down_until[s] > self.now {
            self.deny(k, u, a.hold, a.at);
            return;
        }
        let c = &self.cells[k];
        if c.queue.is_empty() && c.alloc.saturating_sub(c.in_use) >= u {
            self.grant_checkout(k, u, a.hold);
        } else {
            match self.kind {
                Kind::Allot { instant: true, .. } => {
                    self.next_id += 1;
                    let id = self.next_id;
                    let c = &mut self.cells[k];
                    c.queue.push_back(Pending {
                        id,
                        units: u,
                        hold: a.hold,
                        arrived: a.at,
                    });
                    c.queued_units += u;
                    self.at(
                        self.now + self.cfg.hold_bound,
                        Ev::HoldExpire { cell: k, id },
                    );
                }
                Kind::InstantOnly => {
                    self.deny(k, u, a.hold, a.at);
                    if self.cells[k].in_flight_since.is_none() {
                        self.send_instant(k, u, u);
                    }
                }
                _ => self.deny(k, u, a.hold, a.at),
            }
        }
        self.after_change(k);
    }

    /// Calls the policy's agent-side hook after anything changed at a cell.
    fn after_change(&mut self, k: usize) {
        let now = self.now;
        match self.kind {
            Kind::Allot { instant: true, .. } => {
                let c = &self.cells[k];
                let mut state = TriggerState {
                    now,
                    allocation: c.alloc,
                    in_use: c.in_use,
                    short_units: c.queued_units,
                    in_flight_since: c.in_flight_since,
                    in_flight_urgent: c.in_flight_urgent,
                    in_flight_urgent_units: c.urgent_in_flight,
                    short_answer_at: c.short_answer_at,
                    urgent_short_at: c.urgent_short_at,
                };
                if let Some(pull) = instant_request(&state, &self.cfg.trigger) {
                    self.send_instant(k, pull.units, pull.urgent);
                    let c = &self.cells[k];
                    state.in_flight_since = c.in_flight_since;
                    state.in_flight_urgent = c.in_flight_urgent;
                    state.in_flight_urgent_units = c.urgent_in_flight;
                }
                // As the metering server's timer task: re-evaluate when time alone can change
                // the decision.
                if let Some(at) = next_check_at(&state, &self.cfg.trigger) {
                    let c = &mut self.cells[k];
                    if c.recheck_at.is_none_or(|t| at < t || t <= now) {
                        c.recheck_at = Some(at);
                        self.at(at, Ev::Recheck { cell: k });
                    }
                }
            }
            Kind::Sentinel => {
                let c = &self.cells[k];
                let timed_out = c
                    .in_flight_since
                    .is_some_and(|t| now >= t + self.cfg.trigger.in_flight_timeout_ms);
                let backing_off = c
                    .short_answer_at
                    .is_some_and(|t| now < t + self.cfg.trigger.backoff_ms);
                if (c.in_flight_since.is_none() || timed_out)
                    && !backing_off
                    && c.in_use > 0
                    && c.in_use * 10 >= c.alloc * 9
                {
                    let units = c.alloc.div_ceil(10).max(1);
                    self.send_instant(k, units, 0);
                }
            }
            Kind::InstantOnly => {
                let c = &mut self.cells[k];
                if c.in_flight_since
                    .is_some_and(|t| now >= t + self.cfg.trigger.in_flight_timeout_ms)
                {
                    c.in_flight_since = None;
                }
            }
            _ => {}
        }
    }

    fn grant_checkout(&mut self, k: usize, units: u64, hold: u64) {
        let c = &mut self.cells[k];
        c.in_use += units;
        let epoch = c.epoch;
        self.record_in_use(k);
        self.at(
            self.now + hold,
            Ev::Depart {
                cell: k,
                units,
                epoch,
            },
        );
    }

    fn deny(&mut self, k: usize, units: u64, hold: u64, arrived: u64) {
        let (s, p) = (self.cells[k].site, self.cells[k].product);
        let mut anywhere = self.books[p].reserve;
        let mut reachable = if self.reachable(s, self.now) {
            self.books[p].reserve
        } else {
            0
        };
        let own_reachable = self.reachable(s, self.now);
        for o in 0..self.w.sites.len() {
            if o == s {
                continue;
            }
            let c = &self.cells[o * self.np + p];
            let free = c.alloc.saturating_sub(c.in_use);
            anywhere += free;
            if own_reachable && self.reachable(o, self.now) {
                reachable += free;
            }
        }
        let c = &mut self.cells[k];
        c.denials += units;
        c.sample_denials += units;
        let a = Arrival {
            at: arrived,
            site: s as u16,
            product: p as u16,
            units: units as u32,
            hold,
        };
        self.metrics
            .denied(&a, anywhere >= units, reachable >= units);
    }

    /// Grants queued checkouts in FIFO order while units are free.
    fn serve_queue(&mut self, k: usize) {
        loop {
            let c = &mut self.cells[k];
            let Some(&head) = c.queue.front() else { break };
            if c.alloc.saturating_sub(c.in_use) < head.units {
                break;
            }
            c.queue.pop_front();
            c.queued_units -= head.units;
            self.metrics.waited(head.arrived, self.now - head.arrived);
            self.grant_checkout(k, head.units, head.hold);
        }
    }

    fn send_instant(&mut self, k: usize, units: u64, deficit: u64) {
        let now = self.now;
        let site = self.cells[k].site;
        let c = &mut self.cells[k];
        c.in_flight_since = Some(now);
        c.in_flight_urgent = deficit > 0;
        c.urgent_in_flight += deficit;
        c.requests_in_flight += 1;
        c.instant_units += units;
        c.instant_count += 1;
        self.metrics.transactions += 1;
        self.metrics.instant_requests += 1;
        if self.reachable(site, now) {
            self.at(
                now + self.cfg.latency,
                Ev::InstantAtBalancer {
                    cell: k,
                    units,
                    deficit,
                },
            );
        } else {
            self.lost_request(k, units, deficit);
        }
    }

    /// A request that never reaches the balancer: the metering server's call fails after its
    /// timeout, an answer of none.
    fn lost_request(&mut self, k: usize, units: u64, deficit: u64) {
        self.at(
            self.now + self.cfg.trigger.in_flight_timeout_ms,
            Ev::Grant {
                cell: k,
                units: 0,
                reply: Some((units, deficit.min(units), 0)),
            },
        );
    }

    // ---- events ---------------------------------------------------------------------------

    fn event(&mut self, ev: Ev) {
        let lat = self.cfg.latency;
        match ev {
            Ev::Depart { cell, units, epoch } => {
                if self.cells[cell].epoch != epoch {
                    return; // lost in a crash
                }
                self.cells[cell].in_use -= units;
                self.record_in_use(cell);
                self.serve_queue(cell);
                self.after_change(cell);
                self.check(self.cells[cell].product);
            }
            Ev::HoldExpire { cell, id } => {
                let c = &mut self.cells[cell];
                if let Some(i) = c.queue.iter().position(|x| x.id == id) {
                    let x = c.queue.remove(i).expect("found");
                    c.queued_units -= x.units;
                    self.metrics.waited(x.arrived, self.now - x.arrived);
                    self.deny(cell, x.units, x.hold, x.arrived);
                    self.serve_queue(cell);
                }
            }
            Ev::InstantAtBalancer {
                cell,
                units,
                deficit,
            } => {
                if !self.balancer_up(self.now) {
                    self.lost_request(cell, units, deficit);
                    return;
                }
                let p = self.cells[cell].product;
                // When the reserve cannot cover the urgent units, the balancer reads the donors'
                // statuses before it plans (the releases leave a round trip later); otherwise
                // it plans with what its last run saw.
                let status_read = self.books[p].reserve < deficit.min(units);
                let plan = matches!(self.kind, Kind::Allot { .. })
                    .then(|| self.plan_instant(cell, units, deficit, status_read));
                let g = plan
                    .as_ref()
                    .map_or(units.min(self.books[p].reserve), |plan| plan.from_reserve);
                self.books[p].reserve -= g;
                self.books[p].in_transit += g;
                if g > 0 {
                    self.metrics.moved(g);
                }
                let now = self.now;
                if let Some(r) = &mut self.recorder {
                    if g > 0 {
                        r.instant_grant(self.w, now, self.cells[cell].site, p, g);
                    }
                    r.run(now, RunTrigger::Instant, u64::from(g > 0));
                }
                self.metrics.transactions += 1;
                // When a reclaim is under way, its first grant carries the answer, so the
                // asker does not ask again before the reclaimed units arrive.
                let reclaiming = match plan {
                    Some(plan) => {
                        let asks: Vec<(usize, u64)> = plan
                            .releases
                            .iter()
                            .map(|&(site, units)| (self.cell(site as usize, p), units))
                            .collect();
                        let delay = if status_read { 2 * lat } else { 0 };
                        self.send_reclaims(cell, &asks, (units, deficit.min(units), g), delay)
                    }
                    None => {
                        g < units
                            && self.reclaim(
                                cell,
                                units - g,
                                deficit.saturating_sub(g),
                                (units, deficit.min(units), g),
                            )
                    }
                };
                if !reclaiming || g > 0 {
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell,
                            units: g,
                            reply: (!reclaiming).then_some((units, deficit.min(units), 0)),
                        },
                    );
                }
                self.check(p);
            }
            Ev::Grant { cell, units, reply } => {
                let p = self.cells[cell].product;
                self.books[p].in_transit -= units;
                let c = &mut self.cells[cell];
                c.alloc += units;
                if units > 0 {
                    c.granted_at = Some(self.now);
                }
                if let Some((asked, urgent, before)) = reply {
                    c.requests_in_flight = c.requests_in_flight.saturating_sub(1);
                    c.urgent_in_flight = c.urgent_in_flight.saturating_sub(urgent);
                    if c.requests_in_flight == 0 {
                        c.in_flight_since = None;
                        c.in_flight_urgent = false;
                        c.urgent_in_flight = 0;
                    }
                    let granted = before + units;
                    if granted < asked {
                        c.short_answer_at = Some(self.now);
                    }
                    if granted < urgent {
                        c.urgent_short_at = Some(self.now);
                    }
                }
                if units > 0 {
                    self.ping_pong(cell, units as i64);
                }
                self.serve_queue(cell);
                self.after_change(cell);
                self.check(p);
            }
            Ev::Release {
                cell,
                units,
                for_cell,
            } => {
                let p = self.cells[cell].product;
                let c = &mut self.cells[cell];
                let r = units.min(c.alloc.saturating_sub(c.in_use));
                c.alloc -= r;
                self.books[p].in_transit += r;
                if r > 0 {
                    self.ping_pong(cell, -(r as i64));
                    self.metrics.moved(r);
                }
                self.at(
                    self.now + lat,
                    Ev::ReleaseConfirm {
                        product: p,
                        units: r,
                        for_cell,
                    },
                );
                self.after_change(cell);
                self.check(p);
            }
            Ev::ReleaseConfirm {
                product,
                units,
                for_cell,
            } => {
                let b = &mut self.books[product];
                b.in_transit -= units;
                b.reserve += units;
                if let Some((to, reply)) = for_cell
                    && (units > 0 || reply.is_some())
                {
                    let g = units.min(b.reserve);
                    b.reserve -= g;
                    b.in_transit += g;
                    self.metrics.moved(g);
                    self.metrics.transactions += 1;
                    let now = self.now;
                    if g > 0
                        && let Some(r) = &mut self.recorder
                    {
                        r.instant_grant(self.w, now, self.cells[to].site, product, g);
                    }
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell: to,
                            units: g,
                            reply,
                        },
                    );
                }
                self.check(product);
            }
            Ev::RunGrants { product, grants } => {
                for (cell, units) in grants {
                    if !self.reachable(self.cells[cell].site, self.now) {
                        continue;
                    }
                    let b = &mut self.books[product];
                    let g = units.min(b.reserve);
                    if g == 0 {
                        continue;
                    }
                    b.reserve -= g;
                    b.in_transit += g;
                    self.metrics.moved(g);
                    self.metrics.transactions += 1;
                    self.at(
                        self.now + lat,
                        Ev::Grant {
                            cell,
                            units: g,
                            reply: None,
                        },
                    );
                }
                self.check(product);
            }
            Ev::Scheduled { generation } => {
                if generation != self.generation {
                    return;
                }
                let interval = match self.kind {
                    Kind::Sms { interval }
                    | Kind::Doorman { interval, .. }
                    | Kind::Allot { interval, .. } => interval,
                    _ => return,
                };
                let now = self.now;
                let next = match &mut self.cron_runs {
                    Some(runs) => {
                        while runs.front().is_some_and(|&t| t <= now) {
                            runs.pop_front();
                        }
                        runs.front().copied()
                    }
                    None => Some(now + interval),
                };
                if let Some(next) = next {
                    self.at(next, Ev::Scheduled { generation });
                }
                if self.balancer_up(now) {
                    self.metrics.scheduled_runs += 1;
                    let moves: u64 = (0..self.np).map(|p| self.scheduled(p)).sum();
                    if let Some(r) = &mut self.recorder {
                        r.run(now, RunTrigger::Scheduled, moves);
                    }
                }
            }
            Ev::Measure => {
                let violations = self.metrics.violations;
                self.metrics = Metrics::new(&self.metrics.policy, self.w);
                self.metrics.measure_from(self.w, self.now);
                self.metrics.violations = violations;
            }
            Ev::Advise => self.advise(),
            Ev::Recheck { cell } => {
                if self.cells[cell].recheck_at == Some(self.now) {
                    self.cells[cell].recheck_at = None;
                    self.after_change(cell);
                }
            }
            Ev::Sample => {
                self.sample();
                self.at(self.now + self.cfg.sample_every, Ev::Sample);
            }
            Ev::Crash { site, down_for } => {
                self.down_until[site] = self.now + down_for;
                for p in 0..self.np {
                    let k = self.cell(site, p);
                    let c = &mut self.cells[k];
                    c.in_use = 0;
                    c.epoch += 1;
                    let lost: Vec<Pending> = c.queue.drain(..).collect();
                    c.queued_units = 0;
                    for x in lost {
                        self.deny(k, x.units, x.hold, x.arrived);
                    }
                    self.check(p);
                }
            }
        }
    }

    /// Matches a move against opposite moves of the same cell within the last hour.
    fn ping_pong(&mut self, k: usize, signed: i64) {
        let now = self.now;
        let c = &mut self.cells[k];
        while c.recent_moves.front().is_some_and(|&(t, _)| t + HOUR < now) {
            c.recent_moves.pop_front();
        }
        let mut left = signed.unsigned_abs() as i64;
        for m in c.recent_moves.iter_mut() {
            if left == 0 {
                break;
            }
            if m.1.signum() == -signed.signum() && m.1 != 0 {
                let matched = left.min(m.1.abs());
                self.metrics.ping_pong_units += matched as u64;
                left -= matched;
                m.1 -= matched * m.1.signum();
            }
        }
        if left > 0 {
            c.recent_moves.push_back((now, left * signed.signum()));
        }
    }

    /// The baselines' instant handler when the reserve is short (allot's is the real instant
    /// plan): release free units from the sites that need them least, then grant them to the
    /// asker. Returns whether any release was sent; the largest carries the answer to the asker.
    fn reclaim(&mut self, asker: usize, short: u64, urgent: u64, answer: Reply) -> bool {
        let p = self.cells[asker].product;
        let now = self.now;
        // (spare above own needs, free, site) per reachable donor.
        let mut donors: Vec<(u64, u64, usize)> = (0..self.w.sites.len())
            .filter(|&s| s != self.cells[asker].site && self.reachable(s, now))
            .map(|s| {
                let k = s * self.np + p;
                let c = &self.cells[k];
                // A cell is never reclaimed below its configured `min_units` (0 un-tuned).
                let kept = (c.in_use + c.queued_units).max(u64::from(self.settings[k].min_units));
                let free = c.alloc.saturating_sub(kept);
                let spare = match self.kind {
                    // Sentinel lends only what keeps the lender below its own threshold.
                    Kind::Sentinel => c.alloc.saturating_sub((c.in_use * 10).div_ceil(9) + 1),
                    _ => free,
                };
                (spare, free, s)
            })
            .filter(|d| d.1 > 0)
            .collect();
        donors.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut asks = vec![0u64; self.w.sites.len()];
        let mut left = short;
        for d in &donors {
            let take = d.0.min(left);
            asks[d.2] += take;
            left -= take;
        }
        // Below the donors' own headroom only for clients waiting right now.
        let mut urgent_left = urgent.min(left);
        for d in &donors {
            let take = (d.1 - asks[d.2].min(d.1)).min(urgent_left);
            asks[d.2] += take;
            urgent_left -= take;
        }
        let asks: Vec<(usize, u64)> = asks
            .into_iter()
            .enumerate()
            .filter(|a| a.1 > 0)
            .map(|(s, units)| (self.cell(s, p), units))
            .collect();
        self.send_reclaims(asker, &asks, answer, 0)
    }

    /// Sends the releases of a reclaim for `asker` (cell, units); once each is confirmed its
    /// units are granted to the asker, and the largest carries the answer to its request.
    /// Returns whether any release was sent.
    fn send_reclaims(
        &mut self,
        asker: usize,
        asks: &[(usize, u64)],
        answer: Reply,
        delay: u64,
    ) -> bool {
        let answer_by = asks
            .iter()
            .enumerate()
            .max_by_key(|(i, a)| (a.1, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let mut sent = false;
        for (i, &(cell, units)) in asks.iter().enumerate() {
            if units > 0 {
                self.metrics.transactions += 1;
                let reply = (Some(i) == answer_by).then_some(answer);
                self.at(
                    self.now + delay + self.cfg.latency,
                    Ev::Release {
                        cell,
                        units,
                        for_cell: Some((asker, reply)),
                    },
                );
                sent = true;
            }
        }
        sent
    }

    /// One product's scheduled run: compute targets by the policy, release, then grant.
    /// Returns the moves it sent.
    fn scheduled(&mut self, p: usize) -> u64 {
        let now = self.now;
        let ns = self.w.sites.len();
        let live: Vec<usize> = (0..ns).filter(|&s| self.reachable(s, now)).collect();
        let ks: Vec<usize> = live.iter().map(|&s| self.cell(s, p)).collect();
        let pool: u64 =
            self.books[p].reserve + ks.iter().map(|&k| self.cells[k].alloc).sum::<u64>();
        let targets: Vec<u64> = match self.kind {
            Kind::Sms { .. } => {
                let base: Vec<u64> = ks
                    .iter()
                    .map(|&k| {
                        let c = &self.cells[k];
                        c.in_use + c.in_use.div_ceil(10).max(1)
                    })
                    .collect();
                let total: u64 = base.iter().sum();
                let weights: Vec<f64> = base.iter().map(|&b| b as f64).collect();
                if total <= pool {
                    let extra = apportion(pool - total, &weights);
                    base.iter().zip(extra).map(|(b, e)| b + e).collect()
                } else {
                    apportion(pool, &weights)
                }
            }
            Kind::Doorman { fair, .. } => {
                let wants: Vec<u64> = ks
                    .iter()
                    .map(|&k| {
                        let c = &self.cells[k];
                        // What a client would sensibly ask for: its peak, the demand it
                        // turned away, and the same 10 % (at least one unit) spare as SMS.
                        c.in_use.max(c.peak) + c.denials + c.in_use.div_ceil(10).max(1)
                    })
                    .collect();
                if fair {
                    water_fill(pool, &wants)
                } else {
                    doorman_proportional(pool, &wants)
                }
            }
            Kind::Allot { instant, .. } => {
                let moves = self.plan_allot(p, &ks, instant);
                for &k in &ks {
                    if let Some(r) = &mut self.recorder {
                        let c = &self.cells[k];
                        let counts = SampleCounts {
                            allocation: c.alloc,
                            in_use: c.in_use,
                            peak_in_use: c.peak.max(c.in_use),
                            denials: c.denials,
                            waiting: c.queued_units,
                            instant_requests: c.instant_units,
                        };
                        r.sample(self.w, now, c.site, p, counts);
                    }
                    let c = &mut self.cells[k];
                    c.peak = c.in_use;
                    c.denials = 0;
                    c.instant_units = 0;
                    c.instant_count = 0;
                }
                return moves;
            }
            _ => return 0,
        };
        let mut moves = 0;
        let mut grants = Vec::new();
        for (&k, &t) in ks.iter().zip(&targets) {
            let c = &mut self.cells[k];
            if t < c.alloc {
                let units = c.alloc - t;
                moves += 1;
                self.metrics.transactions += 1;
                self.at(
                    now + self.cfg.latency,
                    Ev::Release {
                        cell: k,
                        units,
                        for_cell: None,
                    },
                );
            } else if t > c.alloc {
                grants.push((k, t - c.alloc));
            }
            let c = &mut self.cells[k];
            c.peak = c.in_use;
            c.denials = 0;
        }
        moves += grants.len() as u64;
        if !grants.is_empty() {
            self.at(
                now + 2 * self.cfg.latency,
                Ev::RunGrants { product: p, grants },
            );
        }
        moves
    }

    /// The balancer's view of one reachable cell at a run: what its status reports, the
    /// signals of its recorded samples, its configured min and buffer, whether it is held —
    /// the same inputs `build_snapshot` gives the planner. Records the run's sample first, as
    /// the balancer records a run's samples before it reads the signals.
    fn run_view(&mut self, k: usize) -> CellSnapshot {
        let now = self.now;
        self.record_in_use(k);
        let set = self.settings[k];
        let c = &mut self.cells[k];
        c.samples.push_back(PeakSample {
            at: now,
            peak: c.peak,
        });
        while c.samples.front().is_some_and(|s| s.at + HISTORY < now) {
            c.samples.pop_front();
        }
        let demand = Demand {
            peak_in_use: c.peak,
            denials: c.denials,
            waiting: c.queued_units,
            instant_requests: c.instant_count,
            signals: signals(c.samples.make_contiguous(), now, &self.cfg.signals),
        };
        c.seen = (demand, c.in_use);
        CellSnapshot {
            server: c.site as u32,
            allocation: c.alloc,
            in_use: c.in_use,
            min_units: u64::from(set.min_units),
            buffer_units: u64::from(set.buffer_units),
            draining: false,
            recently_granted: c.granted_at.is_some_and(|t| t + self.cfg.hold > now),
            demand,
        }
    }

    /// The planner's configuration for this policy: the shipped defaults, with instant
    /// balancing as the policy has it.
    fn planner_config(&self) -> PlannerConfig {
        let instant = matches!(self.kind, Kind::Allot { instant: true, .. });
        PlannerConfig {
            instant_balancing: instant,
            ..self.cfg.planner
        }
    }

    /// allot's scheduled run of one product: the balancer's snapshot → the real planner → its
    /// moves, releases first (returned: how many were sent). Units of unreachable sites are set
    /// aside, and a product with units in transit is skipped, as the balancer does.
    fn plan_allot(&mut self, p: usize, live: &[usize], _instant: bool) -> u64 {
        let now = self.now;
        let mut cells = Vec::with_capacity(live.len());
        for &k in live {
            cells.push(self.run_view(k));
        }
        if self.books[p].in_transit > 0 {
            return 0;
        }
        let set_aside: u64 = (0..self.w.sites.len())
            .map(|s| self.cell(s, p))
            .filter(|k| !live.contains(k))
            .map(|k| self.cells[k].alloc)
            .sum();
        let snapshot = ProductSnapshot {
            product: p as u32,
            purchased: self.books[p].purchased - set_aside,
            reserve: self.books[p].reserve,
            in_transit: 0,
            cells,
        };
        let plan = match plan_product(&snapshot, &self.planner_config()) {
            Ok(plan) => plan,
            Err(_) => {
                self.metrics.violations.conservation += 1;
                return 0;
            }
        };
        let moves = plan.moves.len() as u64;
        let mut grants = Vec::new();
        for m in plan.moves {
            let k = self.cell(m.server() as usize, p);
            match m {
                Move::Release { units, .. } => {
                    self.metrics.transactions += 1;
                    self.at(
                        now + self.cfg.latency,
                        Ev::Release {
                            cell: k,
                            units,
                            for_cell: None,
                        },
                    );
                }
                Move::Grant { units, .. } => grants.push((k, units)),
            }
        }
        if !grants.is_empty() {
            self.at(
                now + 2 * self.cfg.latency,
                Ev::RunGrants { product: p, grants },
            );
        }
        moves
    }

    /// The balancer's instant handler for allot: the real instant plan over the books now and
    /// what the last run saw of each reachable cell (the balancer's memory), `deficit` of the
    /// `units` asked being urgent.
    fn plan_instant(
        &self,
        asker: usize,
        units: u64,
        deficit: u64,
        fresh: bool,
    ) -> allot_core::instant::InstantPlan {
        let now = self.now;
        let p = self.cells[asker].product;
        let cells: Vec<CellSnapshot> = (0..self.w.sites.len())
            .filter(|&s| s == self.cells[asker].site || self.reachable(s, now))
            .map(|s| {
                let k = self.cell(s, p);
                let c = &self.cells[k];
                let set = self.settings[k];
                CellSnapshot {
                    server: s as u32,
                    allocation: c.alloc,
                    in_use: if fresh {
                        c.in_use
                    } else {
                        c.seen.1.min(c.alloc)
                    },
                    min_units: u64::from(set.min_units),
                    buffer_units: u64::from(set.buffer_units),
                    draining: false,
                    recently_granted: c.granted_at.is_some_and(|t| t + self.cfg.hold > now),
                    demand: if fresh {
                        Demand {
                            waiting: c.queued_units,
                            ..c.seen.0
                        }
                    } else {
                        c.seen.0
                    },
                }
            })
            .collect();
        let urgent = deficit.min(units);
        plan_instant(
            self.books[p].reserve,
            &cells,
            &InstantAsk {
                asker: self.cells[asker].site as u32,
                urgent,
                topup: units - urgent,
            },
            &self.planner_config(),
        )
    }

    /// The end of the training period of an advised policy: the real advisor reads the
    /// recorded history, and its schedule and cell settings replace the current ones.
    fn advise(&mut self) {
        let Some(history) = self.recorder.take() else {
            return;
        };
        let Kind::Allot { interval, .. } = self.kind else {
            return;
        };
        let input = advisor_input(self.w, &history, interval, &self.settings, self.now);
        drop(history);
        let advice = advise(&input);
        let tuned = Tuned::from_advice(self.w, &advice, &self.settings, self.now, self.w.duration);
        self.settings = tuned.settings;
        if let Some(runs) = tuned.runs {
            self.generation += 1;
            let mut runs: VecDeque<u64> = runs.into();
            if let Some(first) = runs.pop_front() {
                let generation = self.generation;
                self.at(first, Ev::Scheduled { generation });
            }
            self.cron_runs = Some(runs);
        }
        self.metrics.advice = Some(advice);
    }

    /// Time series, the step metric and the fairness reference.
    fn sample(&mut self) {
        let now = self.now;
        let ns = self.w.sites.len();
        let k0 = self.metrics.plotted_product;
        let row: Vec<u64> = (0..ns)
            .map(|s| self.cells[s * self.np + k0].alloc)
            .collect();
        let used: Vec<u64> = (0..ns)
            .map(|s| self.cells[s * self.np + k0].in_use)
            .collect();
        self.metrics.alloc_series.push((now, row, used));
        if let Some(step) = self.w.step
            && now >= step.at
            && self.metrics.step_time.is_none()
        {
            let held: u64 = (0..self.np)
                .map(|p| self.cells[self.cell(step.to_site as usize, p)].alloc)
                .sum();
            if held as f64 >= 0.95 * step.new_level {
                self.metrics.step_time = Some(now - step.at);
            }
        }
        for p in 0..self.np {
            let demand: Vec<u64> = (0..ns)
                .map(|s| {
                    let c = &self.cells[s * self.np + p];
                    c.in_use + c.queued_units + c.sample_denials
                })
                .collect();
            let purchased = self.books[p].purchased;
            if demand.iter().sum::<u64>() > purchased && purchased > 0 {
                let fair = water_fill(purchased, &demand);
                let gap: u64 = (0..ns)
                    .map(|s| fair[s].saturating_sub(self.cells[s * self.np + p].alloc))
                    .sum();
                self.metrics.fairness_gap_sum += gap as f64 / purchased as f64;
                self.metrics.fairness_samples += 1;
            }
            for s in 0..ns {
                self.cells[s * self.np + p].sample_denials = 0;
            }
        }
    }
}

/// Doorman's ProportionalShare: everyone gets its want if all fit; otherwise an equal share
/// capped by its want, and the rest in proportion to what each still wants.
pub fn doorman_proportional(capacity: u64, wants: &[u64]) -> Vec<u64> {
    let total: u64 = wants.iter().sum();
    if total <= capacity || wants.is_empty() {
        return wants.to_vec();
    }
    let equal = capacity / wants.len() as u64;
    let mut out: Vec<u64> = wants.iter().map(|&w| w.min(equal)).collect();
    let left = capacity - out.iter().sum::<u64>();
    let extra: Vec<f64> = wants
        .iter()
        .zip(&out)
        .map(|(&w, &o)| (w - o) as f64)
        .collect();
    for (o, e) in out.iter_mut().zip(apportion(left, &extra)) {
        *o += e;
    }
    out
}

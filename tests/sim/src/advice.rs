//! The advice experiment: the history a balancer keeps, recorded in the simulator in exactly the
//! shape the real advisor ([`allot_core::advisor::advise`]) reads, and the advisor's answer
//! turned back into the simulator's schedule and per-cell settings.
//!
//! An advised policy runs un-tuned through the training period (`SimConfig::train`) while a
//! [`Recorder`] keeps what `balancer/src/advice.rs` reads from the store: a usage sample per
//! (server, product) per scheduled run, every grant of an instant balance, every run with its
//! moves, and the schedule's run times. At the end of the period [`advisor_input`] builds the
//! advisor's input from it, the real advisor answers, and [`Tuned::from_advice`] maps the
//! recommended cron to run times (parsed with `croner`, as the balancer does) and the
//! recommended `min_units` / `buffer_units` to cells. Nothing of the advisor is re-implemented.
//!

use crate::workload::{MINUTE, Workload};
use allot_core::advisor::{
    Action, Advice, AdvisorInput, CellConfig, CellSettings, CurrentSchedule, InstantBalance,
    RunRecord, ServerSite, UsageSample, Window,
};
use allot_core::domain::RunTrigger;
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Year};

/// Unix milliseconds of simulated time 0: Monday 2024-01-01 00:00 UTC, so the synthetic
/// workloads' Monday start is a Monday on the advisor's calendar too (its working hours are
/// Monday to Friday).
pub const EPOCH_MS: i64 = 1_704_067_200_000;

/// Unix milliseconds of a simulated instant.
pub fn unix_ms(t: u64) -> i64 {
    EPOCH_MS + i64::try_from(t).unwrap_or(i64::MAX - EPOCH_MS)
}

/// The history of the training period, as the balancer's store would hold it.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// One per reachable (server, product) per scheduled run.
    pub samples: Vec<UsageSample>,
    /// One per grant of an instant balance (the store's `instant_grants_between` rows).
    pub instant_balances: Vec<InstantBalance>,
    /// Scheduled and instant runs with their moves.
    pub runs: Vec<RunRecord>,
    /// Scheduled run times, the schedule's expansion over the window.
    pub scheduled_at: Vec<i64>,
}

/// The per-cell counters a usage sample reports, read at a scheduled run.
#[derive(Debug, Clone, Copy)]
pub struct SampleCounts {
    /// Units the server holds once the run's moves land (the plan's target).
    pub allocation: u64,
    /// Units checked out now.
    pub in_use: u64,
    /// Highest in use since the previous run.
    pub peak_in_use: u64,
    /// Units denied since the previous run.
    pub denials: u64,
    /// Units of clients held now.
    pub waiting: u64,
    /// Units asked by instant requests since the previous run.
    pub instant_requests: u64,
}

fn u32_of(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Recorder {
    /// Records one cell's sample of a scheduled run at `t`.
    pub fn sample(&mut self, w: &Workload, t: u64, site: usize, product: usize, c: SampleCounts) {
        self.samples.push(UsageSample {
            at_ms: unix_ms(t),
            server: w.sites[site].name.clone(),
            product: w.products[product].clone(),
            allocation: u32_of(c.allocation),
            in_use: u32_of(c.in_use),
            peak_in_use: u32_of(c.peak_in_use),
            denials: u32_of(c.denials),
            waiting: u32_of(c.waiting),
            instant_requests: u32_of(c.instant_requests),
        });
    }

    /// Records a grant of `units` to a cell by an instant balance at `t`.
    pub fn instant_grant(&mut self, w: &Workload, t: u64, site: usize, product: usize, units: u64) {
        self.instant_balances.push(InstantBalance {
            at_ms: unix_ms(t),
            server: w.sites[site].name.clone(),
            product: w.products[product].clone(),
            units: u32_of(units),
        });
    }

    /// Records a run at `t` and the moves it made.
    pub fn run(&mut self, t: u64, trigger: RunTrigger, moves: u64) {
        if trigger == RunTrigger::Scheduled {
            self.scheduled_at.push(unix_ms(t));
        }
        self.runs.push(RunRecord {
            at_ms: unix_ms(t),
            trigger,
            moves: Some(u32_of(moves)),
        });
    }
}

/// The 5-field cron in UTC that runs every `interval` from simulated time 0, as an operator
/// would have configured the un-tuned schedule.
pub fn interval_cron(interval: u64) -> String {
    let minutes = (interval / MINUTE).max(1);
    match minutes {
        m if m < 60 => format!("*/{m} * * * *"),
        m if m < 1440 && m % 60 == 0 => format!("0 */{} * * *", m / 60),
        1440 => "0 0 * * *".to_string(),
        // Not expressible as one cron; the advisor falls back to the recorded run times.
        m => format!("*/{} * * * *", m.min(59)),
    }
}

/// What the balancer's `advise` gathers from its store, gathered from the simulation instead:
/// the training window `[0, until)`, the sites' fixed offsets, the recorded history, the
/// fixed-interval schedule and the cells' current settings.
pub fn advisor_input(
    w: &Workload,
    history: &Recorder,
    interval: u64,
    settings: &[CellSettings],
    until: u64,
) -> AdvisorInput {
    let np = w.products.len();
    AdvisorInput {
        window: Window {
            from_ms: unix_ms(0),
            to_ms: unix_ms(until),
        },
        now_ms: unix_ms(until),
        servers: w
            .sites
            .iter()
            .map(|s| ServerSite {
                server: s.name.clone(),
                site: s.name.clone(),
                utc_offset_minutes: Some(s.utc_offset_minutes),
                timezone: None,
            })
            .collect(),
        samples: history.samples.clone(),
        instant_balances: history.instant_balances.clone(),
        runs: history.runs.clone(),
        schedule: CurrentSchedule {
            cron: interval_cron(interval),
            timezone: "UTC".to_string(),
            utc_offset_minutes: Some(0),
            interval_minutes: Some(u32_of(interval / MINUTE)),
            run_times_ms: history.scheduled_at.clone(),
        },
        cells: settings
            .iter()
            .enumerate()
            .map(|(k, s)| CellConfig {
                server: w.sites[k / np].name.clone(),
                product: w.products[k % np].clone(),
                min_units: s.min_units,
                buffer_units: s.buffer_units,
            })
            .collect(),
        tuning: Default::default(),
        purchased: w
            .products
            .iter()
            .cloned()
            .zip(w.purchased.iter().copied())
            .collect(),
    }
}

/// The advice applied to the simulation: new settings per cell and, when the schedule changed,
/// the run times of the recommended cron.
#[derive(Debug, Clone)]
pub struct Tuned {
    /// Settings per cell (index `site × products + product`).
    pub settings: Vec<CellSettings>,
    /// Simulated run times of the recommended schedule in `[from, to]`; `None` keeps the
    /// current interval.
    pub runs: Option<Vec<u64>>,
}

impl Tuned {
    /// Applies every `Change` of `advice` (like `allot-balancer advice apply`, no autotune
    /// bounds) to `current`, and expands a changed cron over `[from, to]`.
    pub fn from_advice(
        w: &Workload,
        advice: &Advice,
        current: &[CellSettings],
        from: u64,
        to: u64,
    ) -> Self {
        let np = w.products.len();
        let mut settings = current.to_vec();
        for c in advice.cells.iter().filter(|c| c.action == Action::Change) {
            let site = w.sites.iter().position(|s| s.name == c.server);
            let product = w.products.iter().position(|p| *p == c.product);
            if let (Some(s), Some(p)) = (site, product) {
                settings[s * np + p] = c.recommended;
            }
        }
        let s = &advice.schedule;
        let runs = (s.action == Action::Change)
            .then(|| cron_runs(&s.recommended.cron, from, to))
            .flatten();
        Self { settings, runs }
    }
}

/// The run times (simulated ms) of a UTC cron in `[from, to]`, or `None` when it does not parse.
pub fn cron_runs(cron: &str, from: u64, to: u64) -> Option<Vec<u64>> {
    let parsed = CronParser::builder()
        .year(Year::Disallowed)
        .build()
        .parse(cron)
        .ok()?;
    // Strictly after one millisecond before `from`, so a run at `from` itself counts.
    let start = DateTime::<Utc>::from_timestamp_millis(unix_ms(from) - 1)?;
    let end = unix_ms(to);
    Some(
        parsed
            .iter_after(start)
            .map(|t| t.timestamp_millis())
            .take_while(|t| *t <= end)
            .map(|t| (t - EPOCH_MS) as u64)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{DAY, HOUR};

    #[test]
    fn epoch_is_a_monday() {
        let t = DateTime::<Utc>::from_timestamp_millis(EPOCH_MS).expect("valid");
        assert_eq!(t.format("%A %H:%M").to_string(), "Monday 00:00");
    }

    #[test]
    fn interval_crons_expand_to_the_fixed_grid() {
        assert_eq!(interval_cron(15 * MINUTE), "*/15 * * * *");
        assert_eq!(interval_cron(HOUR), "0 */1 * * *");
        assert_eq!(interval_cron(DAY), "0 0 * * *");
        let runs = cron_runs(&interval_cron(15 * MINUTE), DAY, DAY + HOUR).expect("parses");
        assert_eq!(
            runs,
            (0..=4).map(|k| DAY + k * 15 * MINUTE).collect::<Vec<_>>()
        );
        let extra = cron_runs("5,20,35,50 7 * * *", 0, DAY).expect("parses");
        assert_eq!(extra[0], 7 * HOUR + 5 * MINUTE);
        assert_eq!(extra.len(), 4);
        assert!(cron_runs("not a cron", 0, DAY).is_none());
    }
}

//! The trend advisor: reads the balancer's history and recommends a schedule and per-cell
//! `min_units` / `buffer_units`, each with its evidence and its expected effect.
//!
//! Pure like the planner: [`advise`] takes everything — samples, instant balances, runs, the
//! current schedule already expanded into run times by the caller (the core has no cron parser
//! and no time-zone database), the current settings, the window and `now` — as one
//! [`AdvisorInput`] and returns an [`Advice`]. No clock, no I/O, no randomness, no hash-map
//! iteration: the same input gives the same advice, byte for byte. [`apply_bounds`] clamps an
//! advice to the operator's [`AutotuneBounds`] before the balancer applies it by itself.
//!
//! Local times: every server belongs to a site with a fixed UTC offset (the caller resolves an
//! IANA zone to the offset over the window; a zone given without offset is read as UTC unless it
//! is itself a fixed offset, and a note says so). The schedule's own offset places the cron.
//!
//! # Rules
//!
//! Thresholds are the fields of [`Tuning`]; defaults in ⟨angle brackets⟩. Only samples, events
//! and runs inside the window (ending no later than `now`) count.
//!
//! **Schedule.** The current interval is the caller's `interval_minutes`, else the median gap
//! between the schedule's run times, else 60. Candidate intervals are the "round" ones a 5-field
//! cron can keep evenly: 5, 10, 15, 20, 30 minutes; 1, 2, 3, 4, 6, 8, 12, 24 hours.
//! 1. *Instant balances between runs → more often.* Instant balances that belong to a daily
//!    peak of rule 2 (from 30 minutes before its onset to one interval, at least an hour, after)
//!    are left to that rule. When the others average at least ⟨3⟩ a day, each one's *phase*
//!    (minutes since the scheduled run before it) is measured. The new interval `r` is the
//!    longest round one, shorter than the current and not below ⟨5⟩ minutes, that would have
//!    avoided at least ⟨50⟩ % of them: those a full `r` after their run, less what the first `r`
//!    minutes after a run see at their rate (a denser schedule makes every minute one of the
//!    first `r`; it does not make instant balances vanish). If none qualifies, runs do not hold
//!    them off — as many come right after a run as later, like proactive pulls that follow the
//!    clients rather than the schedule — so a denser schedule would only add runs and moves;
//!    the buffers must (rule 5), and the evidence says so.
//! 2. *Daily peak at a site → a run shortly before it.* Pressure events (instant balances at the
//!    exact time; denials, waiting clients or instant requests in a sample at the start of that
//!    sample's interval when no instant balance pins them) are placed on the site's local clock in
//!    15-minute slots. The slot where pressure occurs on the most local days is a daily pattern
//!    if that is at least ⟨3⟩ days and ⟨50⟩ % of the days the site was observed, and that slot
//!    with its two neighbours holds at least ⟨50⟩ % of the site's pressure (pressure all day
//!    long is a shortage for the buffers, not a peak). Its onset is the median over those days
//!    of the earliest event from 30 minutes before the slot to its end.
//!    The schedule covers it if on ⟨80⟩ % of those days a current run fell ⟨5⟩..=⟨30⟩ minutes
//!    before the onset; otherwise a run is wanted at onset − ⟨15⟩ minutes (on a 5-minute grid).
//! 3. *Runs that move nothing → less often.* When the window holds at least ⟨7⟩ days, every
//!    scheduled run of the last 7 days moved nothing (`moves`, or when absent no allocation
//!    changed in the samples taken at that run), and there were no instant balances, denials or
//!    waiting clients in that time, the interval doubles to the next round one, up to ⟨240⟩
//!    minutes — runs also reconcile the books and sample the history, so they never stop.
//! 4. *Otherwise no change*, stated explicitly with the figures that show the schedule fits; a
//!    flat history changes nothing. A new cron keeps the new interval's grid in phase with the
//!    first wanted pre-peak run (else with the current runs); further wanted runs add their
//!    minute (and, at intervals of an hour or more, their hour) to the cron's lists, which may add
//!    a few runs. The cron is standard 5-field, in the current schedule's time zone.
//!
//! **Cells** (per server and product; the interval below is the *recommended* one).
//! 5. *Buffer* = the free units that would have covered the rise of demand within one interval:
//!    for each sample, demand of the following samples up to one interval later (at least the
//!    next sample) — peak in use plus the larger of denials and waiting (units granted by
//!    instant balances are already in the peak) — minus in use at the sample. The day's largest
//!    rise is taken per local day and the need is the ⟨95⟩th percentile over days (a buffer is
//!    constant, so it must cover the daily ramp, not 95 % of quiet intervals), capped at
//!    2 × observed peak + 1. It rises to the need only when the cell saw pressure (denials,
//!    waiting, instant requests or instant balances) and the need exceeds the current buffer by
//!    the dead band (max(⟨1⟩ unit, ⟨10⟩ %)). It falls only without pressure and when the current
//!    buffer exceeds 2 × need + ⟨2⟩, to need + 25 %. Applying a change and advising again on the
//!    same history gives no further change.
//! 6. *Min* = the floor of demand during the site's working hours (⟨08:00–18:00⟩, ⟨Mon–Fri⟩
//!    local): the day's lowest in use in working hours, its ⟨20⟩th percentile over at least
//!    ⟨3⟩ days — "consistently above zero" when positive — of which ⟨50⟩ % (rounded up) is
//!    recommended, to keep floors small since a floor holds units other sites may be denied.
//!    It rises only when the cell saw pressure and by at least the dead band ⟨1⟩; it falls to
//!    that value when the current min exceeds the working floor itself.
//! 7. *The pool's room.* Buffers and mins are held all day, and every unit of a product's
//!    pool held at one cell is a unit another cell cannot have: at the product's busiest run
//!    (the most units its cells needed together at one run: in use, plus denials since the
//!    previous run or clients waiting, whichever is larger) the cells' raises
//!    together must fit in the pool's room, purchased − that. The raises of a product's
//!    cells that would exceed it get the room, shared in proportion to what each asked
//!    (rounded down); none when the pool had no room. Purchases come from the caller
//!    ([`AdvisorInput::purchased`]); without them the pool is known only once it ran dry —
//!    denials although instant balances served the product (the balancer found no unit
//!    anywhere) — and is then read as the most units its cells held at one run; otherwise
//!    nothing is held back.
//!
//! **Bounds.** [`apply_bounds`] clamps what autotune may apply: buffers and mins to their
//! maxima, the interval into [min, max] on the round grid. A clamped change that would no longer
//! move in the recommended direction becomes "keep"; nothing the advisor kept is changed.

mod cells;
mod local;
mod schedule;

use crate::domain::RunTrigger;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The span of history analysed, as Unix milliseconds `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Window {
    /// First instant analysed.
    pub from_ms: i64,
    /// End of the window (exclusive).
    pub to_ms: i64,
}

impl Window {
    /// Whether an instant falls in the window.
    pub fn contains(&self, at_ms: i64) -> bool {
        self.from_ms <= at_ms && at_ms < self.to_ms
    }

    /// Length in days, at least one minute's worth, so per-day rates never divide by zero.
    pub fn days(&self) -> f64 {
        (self
            .to_ms
            .saturating_sub(self.from_ms)
            .max(local::MINUTE_MS)) as f64
            / local::DAY_MS as f64
    }

    /// Human form, quoted in every piece of evidence so a reader knows what it came from.
    pub fn describe(&self) -> String {
        let fmt = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|| format!("{ms} ms"))
        };
        format!(
            "window {} to {} ({:.1} days)",
            fmt(self.from_ms),
            fmt(self.to_ms),
            self.days()
        )
    }
}

/// Where a metering server is, so its demand can be read on its users' clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSite {
    /// The metering server's name.
    pub server: String,
    /// The site (office, region) it serves; peaks are found per site.
    pub site: String,
    /// Minutes east of UTC over the window, as the caller resolved the site's zone.
    #[serde(default)]
    pub utc_offset_minutes: Option<i32>,
    /// The site's IANA zone or fixed offset, for display and as a fallback offset.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// One usage sample of a (server, product) cell, recorded by a balance run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSample {
    /// When the run sampled it (Unix ms).
    pub at_ms: i64,
    /// The metering server.
    pub server: String,
    /// The product.
    pub product: String,
    /// Units the server held after the run.
    pub allocation: u32,
    /// Units checked out at the sample.
    pub in_use: u32,
    /// Highest in use since the previous sample: the demand the allocation had to carry.
    pub peak_in_use: u32,
    /// Checkouts denied since the previous sample: demand it failed to carry.
    pub denials: u32,
    /// Clients queued at the sample.
    pub waiting: u32,
    /// Units asked for by instant-balance requests since the previous sample.
    pub instant_requests: u32,
}

/// One instant balance served for a server, with its exact time (samples only have counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantBalance {
    /// When it happened (Unix ms).
    pub at_ms: i64,
    /// The server that ran dry.
    pub server: String,
    /// The product.
    pub product: String,
    /// Units granted.
    pub units: u32,
}

/// One recorded balance run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// When it ran (Unix ms).
    pub at_ms: i64,
    /// What started it; only scheduled runs judge the schedule.
    pub trigger: RunTrigger,
    /// Moves it made; when absent, inferred from allocation changes in its samples.
    #[serde(default)]
    pub moves: Option<u32>,
}

/// The schedule in force, as the caller (which owns the cron parser) expanded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentSchedule {
    /// The cron expression.
    pub cron: String,
    /// The zone it is read in; the recommended cron uses the same zone.
    pub timezone: String,
    /// Minutes east of UTC of that zone over the window; UTC when absent and not parseable.
    #[serde(default)]
    pub utc_offset_minutes: Option<i32>,
    /// The typical gap between runs, when the caller knows it.
    #[serde(default)]
    pub interval_minutes: Option<u32>,
    /// Its run times over the window (Unix ms), so coverage of peaks is measured, not guessed.
    #[serde(default)]
    pub run_times_ms: Vec<i64>,
}

/// The two per-cell settings the advisor tunes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CellSettings {
    /// Floor the balancer never reclaims below while the server is alive.
    pub min_units: u32,
    /// Free units the server should hold above its demand.
    pub buffer_units: u32,
}

/// The current settings of one (server, product) cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellConfig {
    /// The metering server.
    pub server: String,
    /// The product.
    pub product: String,
    /// Current `min_units`.
    pub min_units: u32,
    /// Current `buffer_units`.
    pub buffer_units: u32,
}

/// The advisor's thresholds; the defaults are the ones documented in the module rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tuning {
    /// Instant balances per day from which rule 1 looks at the schedule.
    pub instant_balances_per_day: f64,
    /// Share of instant balances a denser schedule must meet for rule 1 to recommend it.
    pub avoidable_percent: u32,
    /// Shortest interval the advisor ever suggests.
    pub min_interval_minutes: u32,
    /// Days a peak must recur on (rule 2).
    pub pattern_min_days: u32,
    /// Share of the site's observed days a peak must recur on (rule 2).
    pub pattern_percent: u32,
    /// Share of a site's pressure (days × slots) a peak's slot and its neighbours must hold.
    pub peak_share_percent: u32,
    /// Share of pattern days on which a current run must precede the peak to cover it.
    pub covered_percent: u32,
    /// How long before a peak the wanted run is.
    pub lead_minutes: u32,
    /// A run closer to the peak than this is too late to help.
    pub lead_min_minutes: u32,
    /// A run earlier than this before the peak is too early to count as "shortly before".
    pub lead_max_minutes: u32,
    /// Days of runs that moved nothing before rule 3 relaxes the schedule.
    pub quiet_days: u32,
    /// Longest interval rule 3 relaxes to.
    pub quiet_interval_ceiling_minutes: u32,
    /// Percentile of daily largest rises a buffer must cover.
    pub buffer_percentile: u32,
    /// Smallest buffer increase worth making, in units.
    pub buffer_dead_band_units: u32,
    /// Smallest buffer increase worth making, in percent of the current buffer.
    pub buffer_dead_band_percent: u32,
    /// Slack above twice the need before a buffer is lowered.
    pub buffer_decrease_slack_units: u32,
    /// Start of the sites' working hours, minute of the local day.
    pub working_start_minute: u32,
    /// End of the sites' working hours (exclusive), minute of the local day.
    pub working_end_minute: u32,
    /// Whether working hours are Monday to Friday only.
    pub working_weekdays_only: bool,
    /// Percentile of daily working-hour floors read as "the floor of demand".
    pub min_floor_percentile: u32,
    /// Share of that floor recommended as `min_units` (floors are kept small).
    pub min_share_percent: u32,
    /// Smallest min increase worth making, in units.
    pub min_dead_band_units: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            instant_balances_per_day: 3.0,
            avoidable_percent: 50,
            min_interval_minutes: 5,
            pattern_min_days: 3,
            pattern_percent: 50,
            peak_share_percent: 50,
            covered_percent: 80,
            lead_minutes: 15,
            lead_min_minutes: 5,
            lead_max_minutes: 30,
            quiet_days: 7,
            quiet_interval_ceiling_minutes: 240,
            buffer_percentile: 95,
            buffer_dead_band_units: 1,
            buffer_dead_band_percent: 10,
            buffer_decrease_slack_units: 2,
            working_start_minute: 8 * 60,
            working_end_minute: 18 * 60,
            working_weekdays_only: true,
            min_floor_percentile: 20,
            min_share_percent: 50,
            min_dead_band_units: 1,
        }
    }
}

/// Everything the advisor reads; the balancer fills it from its history store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvisorInput {
    /// The history analysed.
    pub window: Window,
    /// The caller's clock; history after it is ignored.
    pub now_ms: i64,
    /// Each server's site and clock.
    #[serde(default)]
    pub servers: Vec<ServerSite>,
    /// Usage samples, in any order.
    #[serde(default)]
    pub samples: Vec<UsageSample>,
    /// Instant balances, in any order.
    #[serde(default)]
    pub instant_balances: Vec<InstantBalance>,
    /// Balance runs, in any order.
    #[serde(default)]
    pub runs: Vec<RunRecord>,
    /// The schedule in force.
    pub schedule: CurrentSchedule,
    /// Current settings per cell; a cell with samples but no settings is read as 0 / 0.
    #[serde(default)]
    pub cells: Vec<CellConfig>,
    /// Units purchased per product, when the caller knows them: rule 7 then weighs raises
    /// against the purchase itself instead of estimating the pool from the history.
    #[serde(default)]
    pub purchased: BTreeMap<String, u64>,
    /// Thresholds.
    #[serde(default)]
    pub tuning: Tuning,
}

/// Which rule produced a piece of evidence, so tools can group and filter recommendations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Rule 1: instant balances between runs.
    InstantBalancesBetweenRuns,
    /// Rule 2: a daily peak at a site.
    DailyPeak,
    /// Rule 3: runs that moved nothing.
    QuietRuns,
    /// Rule 4: the schedule fits.
    ScheduleFits,
    /// Rule 5: the buffer against the rise of demand.
    Buffer,
    /// Rule 6: the min against the working-hours floor.
    Min,
    /// Rule 7: raises held to the room of the product's pool at its busiest run.
    PoolRoom,
    /// Not enough history to judge.
    NoData,
    /// Autotune bounds held a change back.
    AutotuneBounds,
}

/// Why a recommendation is what it is: the figures, the window they came from, in words too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evidence {
    /// The rule that read these figures.
    pub rule: Rule,
    /// The history they came from.
    pub window: Window,
    /// For the person reviewing the advice; always names the window.
    pub text: String,
    /// The same figures for scripts, by stable name.
    pub figures: BTreeMap<String, f64>,
}

/// What applying a recommendation should change, in words and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Effect {
    /// For the person reviewing the advice.
    pub text: String,
    /// The same figures for scripts, by stable name.
    pub figures: BTreeMap<String, f64>,
}

/// Whether a recommendation changes anything, so "no change" is said, not implied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Keep the current value; the evidence says why it fits.
    Keep,
    /// Apply the recommended value.
    Change,
}

/// A schedule as a cron expression with its zone and the gap it keeps between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleSpec {
    /// Standard 5-field cron expression.
    pub cron: String,
    /// The zone it is read in.
    pub timezone: String,
    /// The regular gap between runs.
    pub interval_minutes: u32,
    /// Runs per day the expression makes (extra pre-peak runs included).
    pub runs_per_day: u32,
}

/// The recommended schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleRecommendation {
    /// Keep or change.
    pub action: Action,
    /// The schedule in force.
    pub current: ScheduleSpec,
    /// The schedule to apply (equal to `current` when keeping).
    pub recommended: ScheduleSpec,
    /// Minutes of the day (schedule zone) a run is wanted at, before a site's peak; the cron's
    /// grid is kept in phase with the first. Kept so [`apply_bounds`] can rebuild the cron.
    pub anchor_minutes: Vec<u32>,
    /// Minute of the day (schedule zone) the recommended grid of runs passes through: the first
    /// anchor, else the current runs' phase, so a new interval does not shift runs needlessly.
    pub grid_minute: u32,
    /// The figures behind it.
    pub evidence: Vec<Evidence>,
    /// What it should change.
    pub expected_effect: Vec<Effect>,
}

/// The recommended settings of one (server, product) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CellRecommendation {
    /// The metering server.
    pub server: String,
    /// The product.
    pub product: String,
    /// The server's site.
    pub site: String,
    /// Keep or change (either setting).
    pub action: Action,
    /// Settings in force.
    pub current: CellSettings,
    /// Settings to apply (equal to `current` when keeping).
    pub recommended: CellSettings,
    /// Highest in use seen in the window; bounds what a buffer may sensibly be.
    pub observed_peak: u32,
    /// The figures behind it (buffer, then min).
    pub evidence: Vec<Evidence>,
    /// What it should change.
    pub expected_effect: Vec<Effect>,
}

/// The advisor's answer: one schedule recommendation and one per cell, sorted by server and
/// product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Advice {
    /// The history analysed (its end clipped to `now`).
    pub window: Window,
    /// The `now` it was computed at.
    pub generated_at_ms: i64,
    /// The schedule.
    pub schedule: ScheduleRecommendation,
    /// Per (server, product).
    pub cells: Vec<CellRecommendation>,
    /// Caveats about the input (unresolved zones, cells without settings, …).
    pub notes: Vec<String>,
}

impl Advice {
    /// Whether anything is recommended to change, so callers can say "nothing to do".
    pub fn has_changes(&self) -> bool {
        self.schedule.action == Action::Change
            || self.cells.iter().any(|c| c.action == Action::Change)
    }
}

/// What the opt-in `autotune` setting may apply on its own; set by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// Part of a request (`PUT /v1/autotune`): a misspelt bound must be an error, not ignored.
#[serde(deny_unknown_fields)]
pub struct AutotuneBounds {
    /// Largest `buffer_units` autotune may set.
    pub max_buffer_units: u32,
    /// Largest `min_units` autotune may set.
    pub max_min_units: u32,
    /// Shortest interval between scheduled runs autotune may set.
    pub min_interval_minutes: u32,
    /// Longest interval between scheduled runs autotune may set.
    pub max_interval_minutes: u32,
}

/// The history of one cell, sorted by time, with its site's clock.
pub(crate) struct CellHistory<'a> {
    pub(crate) server: &'a str,
    pub(crate) product: &'a str,
    pub(crate) site: &'a str,
    pub(crate) offset: i32,
    pub(crate) samples: Vec<&'a UsageSample>,
    pub(crate) instants: Vec<i64>,
}

/// Input indexed once: every rule reads these, so the loops over raw input live here.
pub(crate) struct Prepared<'a> {
    pub(crate) input: &'a AdvisorInput,
    pub(crate) window: Window,
    pub(crate) schedule_offset: i32,
    /// Cells keyed by (server, product), in order.
    pub(crate) cells: BTreeMap<(&'a str, &'a str), CellHistory<'a>>,
    /// Scheduled run times (schedule's run times and recorded scheduled runs), sorted.
    pub(crate) scheduled_runs: Vec<i64>,
    pub(crate) notes: Vec<String>,
}

impl<'a> Prepared<'a> {
    fn new(input: &'a AdvisorInput) -> Self {
        let mut notes = Vec::new();
        let to_ms = input.window.to_ms.min(input.now_ms);
        if to_ms < input.window.to_ms {
            notes.push("the window ends after now; history is read up to now".to_string());
        }
        // ±2^50 ms is ±35,000 years: every time the rules derive from the window then fits in
        // an i64 without overflow checks, whatever a malformed input holds.
        const LIMIT: i64 = 1 << 50;
        let from_ms = input.window.from_ms.clamp(-LIMIT, LIMIT);
        let window = Window {
            from_ms,
            to_ms: to_ms.clamp(from_ms, LIMIT),
        };
        let (schedule_offset, note) = local::resolve_offset(
            input.schedule.utc_offset_minutes,
            Some(&input.schedule.timezone),
        );
        notes.extend(note.map(|n| format!("schedule: {n}")));

        let mut sites: BTreeMap<&str, (&str, i32)> = BTreeMap::new();
        for s in &input.servers {
            let (offset, note) = local::resolve_offset(s.utc_offset_minutes, s.timezone.as_deref());
            notes.extend(note.map(|n| format!("server {}: {n}", s.server)));
            sites.insert(&s.server, (&s.site, offset));
        }
        let mut cells: BTreeMap<(&str, &str), CellHistory<'a>> = BTreeMap::new();
        let mut unknown_servers = BTreeSet::new();
        let mut cell = |server: &'a str, product: &'a str| -> (&'a str, &'a str) {
            let (site, offset) = sites.get(server).copied().unwrap_or_else(|| {
                unknown_servers.insert(server);
                (server, 0)
            });
            cells
                .entry((server, product))
                .or_insert_with(|| CellHistory {
                    server,
                    product,
                    site,
                    offset,
                    samples: Vec::new(),
                    instants: Vec::new(),
                });
            (server, product)
        };
        let mut sample_keys = Vec::new();
        let mut instant_keys = Vec::new();
        for c in &input.cells {
            cell(&c.server, &c.product);
        }
        for s in input.samples.iter().filter(|s| window.contains(s.at_ms)) {
            sample_keys.push((cell(&s.server, &s.product), s));
        }
        for e in input
            .instant_balances
            .iter()
            .filter(|e| window.contains(e.at_ms))
        {
            instant_keys.push((cell(&e.server, &e.product), e.at_ms));
        }
        for (key, s) in sample_keys {
            if let Some(c) = cells.get_mut(&key) {
                c.samples.push(s);
            }
        }
        for (key, at) in instant_keys {
            if let Some(c) = cells.get_mut(&key) {
                c.instants.push(at);
            }
        }
        for server in unknown_servers {
            notes.push(format!(
                "server {server} has no site given; read as its own site on UTC"
            ));
        }
        for c in cells.values_mut() {
            c.samples.sort_by(|a, b| {
                (a.at_ms, a.allocation, a.in_use, a.peak_in_use).cmp(&(
                    b.at_ms,
                    b.allocation,
                    b.in_use,
                    b.peak_in_use,
                ))
            });
            c.instants.sort_unstable();
        }
        let mut scheduled_runs: Vec<i64> = input
            .schedule
            .run_times_ms
            .iter()
            .copied()
            .chain(
                input
                    .runs
                    .iter()
                    .filter(|r| r.trigger == RunTrigger::Scheduled)
                    .map(|r| r.at_ms),
            )
            .filter(|t| window.contains(*t))
            .collect();
        scheduled_runs.sort_unstable();
        scheduled_runs.dedup();
        Self {
            input,
            window,
            schedule_offset,
            cells,
            scheduled_runs,
            notes,
        }
    }
}

/// Reads the history and recommends a schedule and per-cell settings (see the module rules).
pub fn advise(input: &AdvisorInput) -> Advice {
    let prepared = Prepared::new(input);
    let schedule = schedule::advise_schedule(&prepared);
    let interval = schedule.recommended.interval_minutes;
    let mut notes = prepared.notes.clone();
    let mut cells: Vec<CellRecommendation> = prepared
        .cells
        .values()
        .map(|history| {
            let current = input
                .cells
                .iter()
                .find(|c| c.server == history.server && c.product == history.product)
                .map(|c| CellSettings {
                    min_units: c.min_units,
                    buffer_units: c.buffer_units,
                });
            if current.is_none() {
                notes.push(format!(
                    "cell {}/{} has no current settings given; read as min 0, buffer 0",
                    history.server, history.product
                ));
            }
            cells::advise_cell(&prepared, history, current.unwrap_or_default(), interval)
        })
        .collect();
    cells::fit_the_pool(&prepared, &mut cells);
    Advice {
        window: prepared.window,
        generated_at_ms: input.now_ms,
        schedule,
        cells,
        notes,
    }
}

/// Clamps an advice to what autotune may apply on its own: buffers and mins to their maxima, the
/// interval into the operator's range. A clamped change that no longer moves the way the advisor
/// recommended (or no longer moves) becomes a keep, with the bound named in its evidence.
pub fn apply_bounds(mut advice: Advice, bounds: &AutotuneBounds) -> Advice {
    let window = advice.window;
    let held = |text: String| Evidence {
        rule: Rule::AutotuneBounds,
        window,
        text,
        figures: BTreeMap::new(),
    };
    for cell in &mut advice.cells {
        if cell.action == Action::Keep {
            continue;
        }
        let clamp = |current: u32, wanted: u32, max: u32| {
            let bounded = wanted.min(max);
            // Only move in the recommended direction; otherwise stay.
            if (wanted > current && bounded > current) || (wanted < current && bounded < current) {
                bounded
            } else {
                current
            }
        };
        let wanted = cell.recommended;
        cell.recommended = CellSettings {
            buffer_units: clamp(
                cell.current.buffer_units,
                wanted.buffer_units,
                bounds.max_buffer_units,
            ),
            min_units: clamp(
                cell.current.min_units,
                wanted.min_units,
                bounds.max_min_units,
            ),
        };
        if cell.recommended != wanted {
            cell.evidence.push(held(format!(
                "autotune bounds (max buffer {}, max min {}) hold buffer {} → {} and min {} → {}",
                bounds.max_buffer_units,
                bounds.max_min_units,
                wanted.buffer_units,
                cell.recommended.buffer_units,
                wanted.min_units,
                cell.recommended.min_units
            )));
        }
        if cell.recommended == cell.current {
            cell.action = Action::Keep;
        }
    }
    if advice.schedule.action == Action::Change {
        schedule::bound_schedule(&mut advice.schedule, bounds, window);
    }
    advice
}

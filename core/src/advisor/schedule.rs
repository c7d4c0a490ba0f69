//! Schedule rules 1–4 of the advisor (see the parent module) and the cron they produce.

use super::local::{self, DAY_MINUTES, DAY_MS, MINUTE_MS};
use super::{
    Action, AutotuneBounds, Effect, Evidence, Prepared, Rule, ScheduleRecommendation, ScheduleSpec,
    Window,
};
use crate::domain::RunTrigger;
use std::collections::{BTreeMap, BTreeSet};

/// Intervals a 5-field cron keeps evenly through the hour or the day.
pub(crate) const ROUND_INTERVALS: [u32; 13] =
    [5, 10, 15, 20, 30, 60, 120, 180, 240, 360, 480, 720, 1440];

/// Width of the slots peaks are found in, in minutes.
const SLOT_MINUTES: u32 = 15;

fn figures<const N: usize>(pairs: [(&str, f64); N]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The gap between scheduled runs now, and where that figure came from.
pub(crate) fn current_interval(p: &Prepared<'_>) -> (u32, &'static str) {
    if let Some(minutes) = p.input.schedule.interval_minutes.filter(|m| *m > 0) {
        return (minutes, "as given");
    }
    let gaps: Vec<u32> = p
        .scheduled_runs
        .windows(2)
        .map(|w| ((w[1] - w[0]) / MINUTE_MS).clamp(1, i64::from(u32::MAX)) as u32)
        .collect();
    match local::lower_median(&gaps) {
        Some(median) => (median, "median gap between scheduled runs"),
        None => (60, "unknown; assumed"),
    }
}

/// The longest round interval not above `minutes`, so a non-round schedule never gets sparser.
fn round_at_most(minutes: u32) -> u32 {
    ROUND_INTERVALS
        .iter()
        .rev()
        .copied()
        .find(|r| *r <= minutes)
        .unwrap_or(ROUND_INTERVALS[0])
}

/// A daily peak found at a site (rule 2).
struct Peak {
    site: String,
    offset: i32,
    /// Local minute of day the pressure starts.
    onset: u32,
    pattern_days: usize,
    observed_days: usize,
    covered_days: usize,
    covered: bool,
    /// Wanted run, minute of day on the schedule's clock.
    wanted: u32,
    /// Wanted run, minute of day on the site's clock.
    wanted_local: u32,
}

fn find_peaks(p: &Prepared<'_>, interval: u32) -> Vec<Peak> {
    let t = &p.input.tuning;
    let mut sites: BTreeMap<&str, (i32, Vec<&super::CellHistory<'_>>)> = BTreeMap::new();
    for c in p.cells.values() {
        sites
            .entry(c.site)
            .or_insert((c.offset, Vec::new()))
            .1
            .push(c);
    }
    let mut peaks = Vec::new();
    for (site, (offset, cells)) in sites {
        let mut observed = BTreeSet::new();
        let mut events = Vec::new();
        for c in &cells {
            events.extend(c.instants.iter().copied());
            for (i, s) in c.samples.iter().enumerate() {
                observed.insert(local::local_day(s.at_ms, offset));
                if s.denials == 0 && s.waiting == 0 && s.instant_requests == 0 {
                    continue;
                }
                let start = if i > 0 {
                    c.samples[i - 1].at_ms
                } else {
                    s.at_ms - i64::from(interval) * MINUTE_MS
                };
                // An instant balance in the interval pins the pressure more exactly.
                let from = c.instants.partition_point(|at| *at <= start);
                let pinned = c.instants.get(from).is_some_and(|at| *at <= s.at_ms);
                if !pinned {
                    events.push(start);
                }
            }
        }
        let mut slots_by_day: BTreeMap<i64, BTreeSet<u32>> = BTreeMap::new();
        for at in &events {
            slots_by_day
                .entry(local::local_day(*at, offset))
                .or_default()
                .insert(local::local_minute(*at, offset) / SLOT_MINUTES);
        }
        let mut days_per_slot = [0usize; (DAY_MINUTES / SLOT_MINUTES) as usize];
        for slots in slots_by_day.values() {
            for slot in slots {
                days_per_slot[*slot as usize] += 1;
            }
        }
        let (best, best_days) =
            days_per_slot
                .iter()
                .enumerate()
                .fold(
                    (0, 0),
                    |acc, (slot, days)| {
                        if *days > acc.1 { (slot, *days) } else { acc }
                    },
                );
        // A daily peak is concentrated: pressure all day long is a shortage, not a peak.
        let total: usize = days_per_slot.iter().sum();
        let around: usize = (best.saturating_sub(1)..=(best + 1).min(days_per_slot.len() - 1))
            .map(|slot| days_per_slot[slot])
            .sum();
        if around * 100 < t.peak_share_percent as usize * total {
            continue;
        }
        let observed_days = observed.len();
        let needed = (t.pattern_min_days as usize)
            .max((t.pattern_percent as usize * observed_days).div_ceil(100));
        if best_days == 0 || best_days < needed {
            continue;
        }
        let slot_start = best as u32 * SLOT_MINUTES;
        let lo = slot_start.saturating_sub(30);
        let hi = slot_start + SLOT_MINUTES;
        let mut earliest: BTreeMap<i64, u32> = BTreeMap::new();
        for at in &events {
            let minute = local::local_minute(*at, offset);
            if (lo..hi).contains(&minute) {
                let e = earliest
                    .entry(local::local_day(*at, offset))
                    .or_insert(minute);
                *e = (*e).min(minute);
            }
        }
        let pattern_days: Vec<i64> = slots_by_day
            .iter()
            .filter(|(_, slots)| slots.contains(&(best as u32)))
            .map(|(day, _)| *day)
            .collect();
        let onsets: Vec<u32> = pattern_days
            .iter()
            .filter_map(|d| earliest.get(d).copied())
            .collect();
        let onset = local::lower_median(&onsets).unwrap_or(slot_start);
        let covered_days = pattern_days
            .iter()
            .filter(|day| {
                let at = local::instant(**day, onset, offset);
                let from = at - i64::from(t.lead_max_minutes) * MINUTE_MS;
                let to = at - i64::from(t.lead_min_minutes) * MINUTE_MS;
                let i = p.scheduled_runs.partition_point(|r| *r < from);
                p.scheduled_runs.get(i).is_some_and(|r| *r <= to)
            })
            .count();
        let covered = covered_days * 100 >= t.covered_percent as usize * pattern_days.len();
        let wanted_local =
            (onset + DAY_MINUTES - t.lead_minutes % DAY_MINUTES) % DAY_MINUTES / 5 * 5;
        peaks.push(Peak {
            site: site.to_string(),
            offset,
            onset,
            pattern_days: pattern_days.len(),
            observed_days,
            covered_days,
            covered,
            wanted: local::convert_minute(wanted_local, offset, p.schedule_offset),
            wanted_local,
        });
    }
    peaks
}

/// Rule 1's reading of the instant balances.
struct Instants {
    count: usize,
    per_day: f64,
    phases: Vec<u32>,
    /// The interval rule 1 recommends and how many instant balances it would have met.
    better: Option<(u32, usize)>,
}

/// How many of the instant balances (by `phases`, minutes after the run before them) a run
/// every `r` minutes instead of every `interval` would avoid: a denser schedule turns every
/// minute into one of the first `r` after a run, so the instant balances of the later minutes
/// fall to the rate of the first `r` ones, not to zero. When runs do not hold instant balances
/// off — as many in the first minutes after a run as later, e.g. proactive pulls that follow
/// the clients, not the schedule — a denser schedule avoids none.
fn avoided_by(phases: &[u32], r: u32, interval: u32) -> usize {
    let early = phases.iter().filter(|ph| **ph < r).count();
    let late = phases.len() - early;
    // The later minutes at the early rate: early × (interval − r) / r, rounded up.
    let expected = (early as u64 * u64::from(interval.saturating_sub(r))).div_ceil(u64::from(r));
    late.saturating_sub(usize::try_from(expected).unwrap_or(usize::MAX))
}

/// Whether an instant balance at a site belongs to one of its daily peaks (rule 2 handles it).
fn in_peak(peaks: &[Peak], site: &str, at_ms: i64, interval: u32, lead_max: u32) -> bool {
    peaks.iter().filter(|peak| peak.site == site).any(|peak| {
        let minute = local::local_minute(at_ms, peak.offset);
        let after = (minute + DAY_MINUTES - peak.onset) % DAY_MINUTES;
        after < interval.max(60) || after >= DAY_MINUTES.saturating_sub(lead_max)
    })
}

fn read_instants(p: &Prepared<'_>, interval: u32, peaks: &[Peak]) -> Instants {
    let t = &p.input.tuning;
    let mut all: Vec<i64> = p
        .cells
        .values()
        .flat_map(|c| {
            c.instants
                .iter()
                .copied()
                .filter(|at| !in_peak(peaks, c.site, *at, interval, t.lead_max_minutes))
        })
        .collect();
    all.sort_unstable();
    let per_day = all.len() as f64 / p.window.days();
    let phases: Vec<u32> = all
        .iter()
        .filter_map(|at| {
            let i = p.scheduled_runs.partition_point(|r| r <= at);
            let prev = *p.scheduled_runs.get(i.checked_sub(1)?)?;
            Some(((at - prev) / MINUTE_MS).clamp(0, i64::from(u32::MAX)) as u32)
        })
        .collect();
    let better = if per_day >= t.instant_balances_per_day && !phases.is_empty() {
        ROUND_INTERVALS
            .iter()
            .rev()
            .copied()
            .filter(|r| *r < interval && *r >= t.min_interval_minutes)
            .find_map(|r| {
                let met = avoided_by(&phases, r, interval);
                (met * 100 >= t.avoidable_percent as usize * phases.len()).then_some((r, met))
            })
    } else {
        None
    };
    Instants {
        count: all.len(),
        per_day,
        phases,
        better,
    }
}

/// Rule 3's reading of the recent runs.
struct Quiet {
    runs: usize,
    /// The relaxed interval, when rule 3 fires.
    relaxed: Option<u32>,
}

/// Units a run moved: its recorded moves, else allocation changes in the samples it took.
fn moves_of(p: &Prepared<'_>, at_ms: i64, recorded: Option<u32>) -> Option<u32> {
    if recorded.is_some() {
        return recorded;
    }
    let mut seen = false;
    let mut changed = 0;
    for c in p.cells.values() {
        let i = c.samples.partition_point(|s| s.at_ms < at_ms);
        if let Some(s) = c.samples.get(i).filter(|s| s.at_ms == at_ms) {
            seen = true;
            if i > 0 && c.samples[i - 1].allocation != s.allocation {
                changed += 1;
            }
        }
    }
    seen.then_some(changed)
}

fn read_quiet(p: &Prepared<'_>, interval: u32) -> Option<Quiet> {
    let t = &p.input.tuning;
    let span = i64::from(t.quiet_days) * DAY_MS;
    if t.quiet_days == 0 || p.window.to_ms - p.window.from_ms < span {
        return None;
    }
    let from = p.window.to_ms - span;
    let recent = |at: i64| from <= at && at < p.window.to_ms;
    let mut runs: Vec<_> = p
        .input
        .runs
        .iter()
        .filter(|r| r.trigger == RunTrigger::Scheduled && recent(r.at_ms))
        .collect();
    runs.sort_by_key(|r| r.at_ms);
    let first = runs.first()?;
    if first.at_ms > from + 2 * i64::from(interval) * MINUTE_MS {
        return None;
    }
    if runs
        .iter()
        .any(|r| moves_of(p, r.at_ms, r.moves) != Some(0))
    {
        return None;
    }
    let pressure = p.cells.values().any(|c| {
        c.instants.iter().any(|at| recent(*at))
            || c.samples
                .iter()
                .any(|s| recent(s.at_ms) && (s.denials > 0 || s.waiting > 0))
    });
    if pressure {
        return None;
    }
    let ceiling = t.quiet_interval_ceiling_minutes;
    let longer: Vec<u32> = ROUND_INTERVALS
        .iter()
        .copied()
        .filter(|r| *r > interval && *r <= ceiling)
        .collect();
    let relaxed = longer
        .iter()
        .copied()
        .find(|r| *r >= interval.saturating_mul(2))
        .or(longer.last().copied());
    Some(Quiet {
        runs: runs.len(),
        relaxed,
    })
}

/// A cron expression with its run count.
pub(crate) struct Cron {
    pub(crate) expr: String,
    pub(crate) runs_per_day: u32,
}

fn list(values: &BTreeSet<u32>) -> String {
    values
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The 5-field cron for a round interval whose grid passes `grid_minute`, plus runs at the
/// further anchors (their minute, and at hourly or longer intervals their hour, join the lists).
pub(crate) fn build_cron(interval: u32, grid_minute: u32, anchors: &[u32]) -> Cron {
    let interval = round_at_most(interval);
    let extra = anchors.iter().skip(1).map(|a| a % DAY_MINUTES);
    if interval < 60 {
        let phase = grid_minute % 60 % interval;
        let grid: BTreeSet<u32> = (0..60 / interval).map(|k| phase + k * interval).collect();
        let mut minutes = grid.clone();
        minutes.extend(extra.map(|a| a % 60));
        let field = if minutes == grid && phase == 0 {
            format!("*/{interval}")
        } else {
            list(&minutes)
        };
        Cron {
            expr: format!("{field} * * * *"),
            runs_per_day: minutes.len() as u32 * 24,
        }
    } else {
        let step = interval / 60;
        let phase = (grid_minute % DAY_MINUTES) / 60 % step;
        let grid: BTreeSet<u32> = (0..24 / step).map(|k| phase + k * step).collect();
        let mut minutes = BTreeSet::from([grid_minute % 60]);
        let mut hours = grid.clone();
        for a in extra {
            minutes.insert(a % 60);
            hours.insert(a / 60);
        }
        let hour_field = if hours.len() == 24 {
            "*".to_string()
        } else if hours == grid && phase == 0 && step > 1 && step < 24 {
            format!("*/{step}")
        } else {
            list(&hours)
        };
        Cron {
            expr: format!("{} {hour_field} * * *", list(&minutes)),
            runs_per_day: (minutes.len() * hours.len()) as u32,
        }
    }
}

fn same_cron(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}

pub(crate) fn advise_schedule(p: &Prepared<'_>) -> ScheduleRecommendation {
    let t = &p.input.tuning;
    let window = p.window;
    let where_ = window.describe();
    let (interval, interval_source) = current_interval(p);
    let zone = &p.input.schedule.timezone;
    let current = ScheduleSpec {
        cron: p.input.schedule.cron.clone(),
        timezone: zone.clone(),
        interval_minutes: interval,
        runs_per_day: DAY_MINUTES / interval.clamp(1, DAY_MINUTES),
    };
    let peaks = find_peaks(p, interval);
    let instants = read_instants(p, interval, &peaks);
    let quiet = read_quiet(p, interval);
    let mut evidence = Vec::new();
    let mut effects = Vec::new();

    let mut new_interval = interval;
    if let Some((better, met)) = instants.better {
        new_interval = better;
        evidence.push(Evidence {
            rule: Rule::InstantBalancesBetweenRuns,
            window,
            text: format!(
                "{where_}: {} instant balances outside daily peaks ({:.1} a day, threshold {}); \
                 a run every {better} minutes would have avoided {met} of {}: those later than \
                 {better} minutes after the scheduled run before them, beyond the rate of the \
                 first {better} minutes (current interval {interval} minutes, {interval_source})",
                instants.count,
                instants.per_day,
                t.instant_balances_per_day,
                instants.phases.len()
            ),
            figures: figures([
                ("instant_balances", instants.count as f64),
                ("instant_balances_per_day", instants.per_day),
                ("met_by_denser_schedule", met as f64),
                ("current_interval_minutes", f64::from(interval)),
                ("recommended_interval_minutes", f64::from(better)),
            ]),
        });
        effects.push(Effect {
            text: format!(
                "about {:.1} fewer instant balances per day: a run every {better} minutes meets \
                 the rise before the servers run dry",
                met as f64 / window.days()
            ),
            figures: figures([("fewer_instant_balances_per_day", met as f64 / window.days())]),
        });
    } else if instants.per_day >= t.instant_balances_per_day {
        let median = local::lower_median(&instants.phases).unwrap_or(0);
        evidence.push(Evidence {
            rule: Rule::InstantBalancesBetweenRuns,
            window,
            text: format!(
                "{where_}: {} instant balances outside daily peaks ({:.1} a day) but runs do \
                 not hold them off: they come as often soon after a run as later (median \
                 {median} minutes after), so a denser schedule would not avoid them; the \
                 buffers must (see the cells)",
                instants.count, instants.per_day
            ),
            figures: figures([
                ("instant_balances", instants.count as f64),
                ("instant_balances_per_day", instants.per_day),
                ("median_minutes_after_run", f64::from(median)),
            ]),
        });
    } else if let Some(q) = &quiet
        && let Some(relaxed) = q.relaxed
    {
        new_interval = relaxed;
        let before = DAY_MINUTES / interval.clamp(1, DAY_MINUTES);
        let after = DAY_MINUTES / relaxed;
        evidence.push(Evidence {
            rule: Rule::QuietRuns,
            window,
            text: format!(
                "{where_}: the {} scheduled runs of the last {} days moved nothing, with no \
                 instant balance, denial or waiting client",
                q.runs, t.quiet_days
            ),
            figures: figures([
                ("quiet_runs", q.runs as f64),
                ("quiet_days", f64::from(t.quiet_days)),
                ("current_interval_minutes", f64::from(interval)),
                ("recommended_interval_minutes", f64::from(relaxed)),
            ]),
        });
        effects.push(Effect {
            text: format!(
                "about {} fewer scheduled runs per day ({before} → {after}); every run still \
                 reconciles and samples, at most {} minutes apart",
                before.saturating_sub(after),
                relaxed
            ),
            figures: figures([(
                "fewer_runs_per_day",
                f64::from(before.saturating_sub(after)),
            )]),
        });
    }

    let mut anchors: Vec<(usize, u32)> = Vec::new();
    for peak in &peaks {
        let local_zone = local::offset_label(peak.offset);
        let figs = figures([
            ("onset_local_minute", f64::from(peak.onset)),
            ("pattern_days", peak.pattern_days as f64),
            ("observed_days", peak.observed_days as f64),
            ("days_with_run_before", peak.covered_days as f64),
            ("wanted_run_minute", f64::from(peak.wanted)),
        ]);
        if peak.covered {
            evidence.push(Evidence {
                rule: Rule::DailyPeak,
                window,
                text: format!(
                    "{where_}: site {} has pressure from about {} {local_zone} on {} of {} \
                     days, and on {} of them a run came {}–{} minutes before: covered",
                    peak.site,
                    local::hhmm(peak.onset),
                    peak.pattern_days,
                    peak.observed_days,
                    peak.covered_days,
                    t.lead_min_minutes,
                    t.lead_max_minutes
                ),
                figures: figs,
            });
            anchors.push((1, peak.wanted));
        } else {
            evidence.push(Evidence {
                rule: Rule::DailyPeak,
                window,
                text: format!(
                    "{where_}: site {} has pressure from about {} {local_zone} on {} of {} \
                     days; a run came {}–{} minutes before it on only {} of them",
                    peak.site,
                    local::hhmm(peak.onset),
                    peak.pattern_days,
                    peak.observed_days,
                    t.lead_min_minutes,
                    t.lead_max_minutes,
                    peak.covered_days
                ),
                figures: figs,
            });
            effects.push(Effect {
                text: format!(
                    "a run at {} {zone} ({} local at site {}) applies the buffers before the {} \
                     ramp, so it is served locally instead of by instant balances",
                    local::hhmm(peak.wanted),
                    local::hhmm(peak.wanted_local),
                    peak.site,
                    local::hhmm(peak.onset)
                ),
                figures: figures([("lead_minutes", f64::from(t.lead_minutes))]),
            });
            anchors.push((0, peak.wanted));
        }
    }
    anchors.sort_unstable();
    let mut anchor_minutes: Vec<u32> = Vec::new();
    for (_, minute) in anchors {
        if !anchor_minutes.contains(&minute) {
            anchor_minutes.push(minute);
        }
    }
    let uncovered = peaks.iter().any(|peak| !peak.covered);
    let phase = p
        .scheduled_runs
        .first()
        .map_or(0, |at| local::local_minute(*at, p.schedule_offset));
    let grid_minute = anchor_minutes.first().copied().unwrap_or(phase);

    let keep = |mut evidence: Vec<Evidence>, why: String| {
        evidence.push(Evidence {
            rule: Rule::ScheduleFits,
            window,
            text: format!("{where_}: no change — the current schedule fits: {why}"),
            figures: figures([
                ("instant_balances", instants.count as f64),
                ("instant_balances_per_day", instants.per_day),
                ("current_interval_minutes", f64::from(interval)),
                ("daily_peaks", peaks.len() as f64),
            ]),
        });
        ScheduleRecommendation {
            action: Action::Keep,
            current: current.clone(),
            recommended: current.clone(),
            anchor_minutes: Vec::new(),
            grid_minute: phase,
            evidence,
            expected_effect: vec![Effect {
                text: "no change, so no churn".to_string(),
                figures: BTreeMap::new(),
            }],
        }
    };
    if new_interval == interval && !uncovered {
        let why = format!(
            "{} instant balances outside daily peaks ({:.1} a day, threshold {}), every daily \
             peak found ({}) is already preceded by a run, and {}",
            instants.count,
            instants.per_day,
            t.instant_balances_per_day,
            peaks.len(),
            match quiet.as_ref().map(|q| q.relaxed) {
                Some(None) => format!(
                    "runs are already {interval} minutes apart (the most rule 3 relaxes to is {})",
                    t.quiet_interval_ceiling_minutes
                ),
                Some(Some(_)) => "the last days were quiet, but the instant balances earlier in \
                                  the window argue against fewer runs"
                    .to_string(),
                None => format!(
                    "runs moved units, met pressure or the window is under {} days",
                    t.quiet_days
                ),
            }
        );
        return keep(evidence, why);
    }
    let cron = build_cron(new_interval, grid_minute, &anchor_minutes);
    let recommended = ScheduleSpec {
        cron: cron.expr,
        timezone: zone.clone(),
        interval_minutes: round_at_most(new_interval),
        runs_per_day: cron.runs_per_day,
    };
    if same_cron(&recommended.cron, &current.cron) {
        return keep(
            evidence,
            "its cron already is the one these rules build".to_string(),
        );
    }
    effects.push(Effect {
        text: if recommended.runs_per_day == current.runs_per_day {
            format!(
                "{} scheduled runs per day, as now: only their times move",
                recommended.runs_per_day
            )
        } else {
            format!(
                "{} scheduled runs per day instead of {}",
                recommended.runs_per_day, current.runs_per_day
            )
        },
        figures: figures([
            ("runs_per_day_before", f64::from(current.runs_per_day)),
            ("runs_per_day_after", f64::from(recommended.runs_per_day)),
        ]),
    });
    ScheduleRecommendation {
        action: Action::Change,
        current,
        recommended,
        anchor_minutes,
        grid_minute,
        evidence,
        expected_effect: effects,
    }
}

/// Holds a schedule change to the autotune bounds (see [`super::apply_bounds`]).
pub(crate) fn bound_schedule(
    rec: &mut ScheduleRecommendation,
    bounds: &AutotuneBounds,
    window: Window,
) {
    let current = rec.current.interval_minutes;
    let wanted = rec.recommended.interval_minutes;
    let (lo, hi) = (bounds.min_interval_minutes, bounds.max_interval_minutes);
    let bounded = ROUND_INTERVALS
        .iter()
        .copied()
        .filter(|r| (lo..=hi).contains(r))
        .min_by_key(|r| (r.abs_diff(wanted), u32::MAX - r));
    let hold = |rec: &mut ScheduleRecommendation, why: String| {
        rec.evidence.push(Evidence {
            rule: Rule::AutotuneBounds,
            window,
            text: why,
            figures: figures([
                ("min_interval_minutes", f64::from(lo)),
                ("max_interval_minutes", f64::from(hi)),
            ]),
        });
    };
    let same_direction = |b: u32| b.cmp(&current) == wanted.cmp(&current);
    match bounded {
        Some(b) if same_direction(b) => {
            if b != wanted {
                let cron = build_cron(b, rec.grid_minute, &rec.anchor_minutes);
                rec.recommended.cron = cron.expr;
                rec.recommended.interval_minutes = b;
                rec.recommended.runs_per_day = cron.runs_per_day;
                hold(
                    rec,
                    format!(
                        "autotune bounds ({lo}–{hi} minutes) hold the interval to {b} minutes \
                         instead of {wanted}; the effect will be smaller"
                    ),
                );
            }
            if same_cron(&rec.recommended.cron, &rec.current.cron) {
                rec.action = Action::Keep;
                rec.recommended = rec.current.clone();
            }
        }
        _ => {
            hold(
                rec,
                format!(
                    "autotune bounds ({lo}–{hi} minutes) do not allow moving the interval from \
                     {current} toward {wanted} minutes; the schedule is kept"
                ),
            );
            rec.action = Action::Keep;
            rec.recommended = rec.current.clone();
        }
    }
}

//! Cell rules 5 (buffer) and 6 (min) of the advisor (see the parent module).

use super::local::{self, MINUTE_MS};
use super::{
    Action, CellHistory, CellRecommendation, CellSettings, Effect, Evidence, Prepared, Rule,
};
use std::collections::BTreeMap;

/// "1 unit", "3 units".
fn units(n: u32) -> String {
    if n == 1 {
        "1 unit".to_string()
    } else {
        format!("{n} units")
    }
}

fn figures<const N: usize>(pairs: [(&str, f64); N]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Demand a sample shows: the peak carried plus the largest unmet signal (denials or waiting —
/// the highest, not the sum, as in [`crate::planner::Demand::units`], since one short client
/// often shows in both). Units granted by instant balances are already in the peak, so unlike
/// the planner's want they are not added again.
fn demand(s: &super::UsageSample) -> u64 {
    u64::from(s.peak_in_use.max(s.in_use)) + u64::from(s.denials.max(s.waiting))
}

/// The largest rise of demand within one interval after each sample, per local day.
fn daily_rises(h: &CellHistory<'_>, interval: u32) -> BTreeMap<i64, u32> {
    let mut days = BTreeMap::new();
    let horizon = i64::from(interval) * MINUTE_MS;
    for (i, s) in h.samples.iter().enumerate() {
        let later = &h.samples[i + 1..];
        let within = later
            .iter()
            .take_while(|l| l.at_ms <= s.at_ms + horizon)
            .count()
            .max(1)
            .min(later.len());
        let Some(peak) = later[..within].iter().map(|l| demand(l)).max() else {
            continue;
        };
        let rise = peak
            .saturating_sub(u64::from(s.in_use))
            .min(u64::from(u32::MAX)) as u32;
        let day = days.entry(local::local_day(s.at_ms, h.offset)).or_insert(0);
        *day = (*day).max(rise);
    }
    days
}

pub(crate) fn advise_cell(
    p: &Prepared<'_>,
    h: &CellHistory<'_>,
    current: CellSettings,
    interval: u32,
) -> CellRecommendation {
    let t = &p.input.tuning;
    let window = p.window;
    let where_ = window.describe();
    let mut rec = CellRecommendation {
        server: h.server.to_string(),
        product: h.product.to_string(),
        site: h.site.to_string(),
        action: Action::Keep,
        current,
        recommended: current,
        observed_peak: 0,
        evidence: Vec::new(),
        expected_effect: Vec::new(),
    };
    if h.samples.is_empty() {
        rec.evidence.push(Evidence {
            rule: Rule::NoData,
            window,
            text: format!("{where_}: no usage samples for this cell; nothing to judge"),
            figures: BTreeMap::new(),
        });
        rec.expected_effect.push(Effect {
            text: "no change".to_string(),
            figures: BTreeMap::new(),
        });
        return rec;
    }
    let peak = h
        .samples
        .iter()
        .map(|s| s.peak_in_use.max(s.in_use))
        .max()
        .unwrap_or(0);
    rec.observed_peak = peak;
    let cap = peak.saturating_mul(2).saturating_add(1);
    let sum = |f: fn(&super::UsageSample) -> u32| -> u64 {
        h.samples.iter().map(|s| u64::from(f(s))).sum()
    };
    let denials = sum(|s| s.denials);
    let waiting = sum(|s| s.waiting);
    let requests = sum(|s| s.instant_requests);
    let instants = h.instants.len() as u64;
    let pressured = denials + waiting + requests + instants > 0;
    let pressure_text = format!(
        "{denials} denials, {waiting} waiting, {requests} units asked by instant requests, \
         {instants} instant balances"
    );

    // Rule 5: buffer.
    let rises = daily_rises(h, interval);
    let daily: Vec<u32> = rises.values().copied().collect();
    let need = local::percentile(&daily, t.buffer_percentile)
        .unwrap_or(0)
        .min(cap);
    let covered = |buffer: u32| daily.iter().filter(|r| **r <= buffer).count();
    let b = current.buffer_units;
    let dead_band = t
        .buffer_dead_band_units
        .max(b.saturating_mul(t.buffer_dead_band_percent).div_ceil(100))
        .max(1);
    let buffer_figures = figures([
        ("days", daily.len() as f64),
        ("need_units", f64::from(need)),
        (
            "largest_daily_rise_units",
            f64::from(daily.iter().copied().max().unwrap_or(0)),
        ),
        ("observed_peak_units", f64::from(peak)),
        ("current_buffer_units", f64::from(b)),
        ("days_covered_by_current", covered(b) as f64),
        ("interval_minutes", f64::from(interval)),
        ("denials", denials as f64),
        ("instant_balances", instants as f64),
    ]);
    let rise_text = format!(
        "{where_}: over {} days the day's largest rise of demand within one {interval}-minute \
         interval was {need} units at the {}th percentile (observed peak {peak}); {pressure_text}; \
         buffer {b} covered {} of those days",
        daily.len(),
        t.buffer_percentile,
        covered(b)
    );
    let buffer = if pressured && need >= b.saturating_add(dead_band) {
        let newly_covered: Vec<i64> = rises
            .iter()
            .filter(|(_, r)| **r > b && **r <= need)
            .map(|(d, _)| *d)
            .collect();
        let avoided = h
            .instants
            .iter()
            .filter(|at| newly_covered.contains(&local::local_day(**at, h.offset)))
            .count() as f64
            / window.days();
        // A sample's denials happened in the interval that began at the sample before it.
        let fewer_denials = h
            .samples
            .windows(2)
            .filter(|w| newly_covered.contains(&local::local_day(w[0].at_ms, h.offset)))
            .map(|w| f64::from(w[1].denials))
            .sum::<f64>()
            / window.days();
        rec.expected_effect.push(Effect {
            text: format!(
                "buffer {b} → {need}: covers the p{} rise of in-use within one {interval}-minute \
                 interval on {} of {} days instead of {}; about {avoided:.1} fewer instant \
                 balances and {fewer_denials:.1} fewer denials per day at this server",
                t.buffer_percentile,
                covered(need),
                daily.len(),
                covered(b)
            ),
            figures: figures([
                ("days_covered_after", covered(need) as f64),
                ("fewer_instant_balances_per_day", avoided),
                ("fewer_denials_per_day", fewer_denials),
            ]),
        });
        need
    } else if !pressured
        && b > need
            .saturating_mul(2)
            .saturating_add(t.buffer_decrease_slack_units)
    {
        let lower = need.saturating_add(need.div_ceil(4)).min(cap);
        rec.expected_effect.push(Effect {
            text: format!(
                "buffer {b} → {lower}: about {} go back to the reserve for other servers; \
                 the p{} daily rise ({need}) still fits",
                units(b - lower),
                t.buffer_percentile
            ),
            figures: figures([("units_freed", f64::from(b - lower))]),
        });
        lower
    } else {
        rec.expected_effect.push(Effect {
            text: format!("buffer {b} kept: it fits (dead band {})", units(dead_band)),
            figures: BTreeMap::new(),
        });
        b
    };
    rec.evidence.push(Evidence {
        rule: Rule::Buffer,
        window,
        text: rise_text,
        figures: buffer_figures,
    });

    // Rule 6: min.
    let mut floors: BTreeMap<i64, u32> = BTreeMap::new();
    for s in &h.samples {
        let day = local::local_day(s.at_ms, h.offset);
        let minute = local::local_minute(s.at_ms, h.offset);
        let working = (t.working_start_minute..t.working_end_minute).contains(&minute)
            && (!t.working_weekdays_only || local::weekday(day) < 5);
        if working {
            let f = floors.entry(day).or_insert(s.in_use);
            *f = (*f).min(s.in_use);
        }
    }
    let daily_floors: Vec<u32> = floors.values().copied().collect();
    let m = current.min_units;
    let hours = format!(
        "{}–{}{}",
        local::hhmm(t.working_start_minute),
        local::hhmm(t.working_end_minute),
        if t.working_weekdays_only {
            " Mon–Fri"
        } else {
            ""
        }
    );
    let min = if daily_floors.len() < t.pattern_min_days as usize {
        rec.evidence.push(Evidence {
            rule: Rule::Min,
            window,
            text: format!(
                "{where_}: only {} working days ({hours} local) sampled, fewer than {}; min {m} \
                 kept",
                daily_floors.len(),
                t.pattern_min_days
            ),
            figures: figures([("working_days", daily_floors.len() as f64)]),
        });
        m
    } else {
        let floor = local::percentile(&daily_floors, t.min_floor_percentile).unwrap_or(0);
        let target = floor.saturating_mul(t.min_share_percent).div_ceil(100);
        rec.evidence.push(Evidence {
            rule: Rule::Min,
            window,
            text: format!(
                "{where_}: over {} working days ({hours} local) the lowest in-use was {floor} \
                 at the {}th percentile ({}); {pressure_text}; current min {m}",
                daily_floors.len(),
                t.min_floor_percentile,
                if floor > 0 {
                    "consistently above zero"
                } else {
                    "not consistently above zero"
                }
            ),
            figures: figures([
                ("working_days", daily_floors.len() as f64),
                ("working_floor_units", f64::from(floor)),
                ("target_min_units", f64::from(target)),
                ("current_min_units", f64::from(m)),
            ]),
        });
        if pressured && target >= m.saturating_add(t.min_dead_band_units.max(1)) {
            rec.expected_effect.push(Effect {
                text: format!(
                    "min {m} → {target}: the server keeps {} through the night, \
                     so the working-day floor ({floor}) is served locally, not reclaimed and \
                     asked back",
                    units(target)
                ),
                figures: figures([("units_kept", f64::from(target - m))]),
            });
            target
        } else if m > floor && m > target {
            rec.expected_effect.push(Effect {
                text: format!(
                    "min {m} → {target}: about {} the floor held idle go back to the \
                     reserve, where other sites can use them",
                    units(m - target)
                ),
                figures: figures([("units_freed", f64::from(m - target))]),
            });
            target
        } else {
            rec.expected_effect.push(Effect {
                text: format!("min {m} kept: it fits"),
                figures: BTreeMap::new(),
            });
            m
        }
    };
    rec.recommended = CellSettings {
        min_units: min,
        buffer_units: buffer,
    };
    if rec.recommended != current {
        rec.action = Action::Change;
    }
    rec
}

/// Rule 7: holds the raises of buffers and mins of a product to the room its pool had at its
/// busiest run, since a unit one cell is promised beyond that is a unit another cell is denied.
/// `recs` are in the order of `p.cells`.
pub(crate) fn fit_the_pool(p: &Prepared<'_>, recs: &mut [CellRecommendation]) {
    let window = p.window;
    let mut products: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, h) in p.cells.values().enumerate() {
        products.entry(h.product).or_default().push(i);
    }
    let histories: Vec<&CellHistory<'_>> = p.cells.values().collect();
    for (product, idx) in products {
        let cells: Vec<&CellHistory<'_>> = idx.iter().map(|&i| histories[i]).collect();
        let denials: u64 = cells
            .iter()
            .flat_map(|h| &h.samples)
            .map(|s| u64::from(s.denials))
            .sum();
        let instants: usize = cells.iter().map(|h| h.instants.len()).sum();
        let known = p.input.purchased.get(product).copied();
        let ran_dry = denials > 0 && instants > 0;
        if known.is_none() && !ran_dry {
            continue;
        }
        // Per run (samples share the run's time): units held, and what the cells needed then —
        // units in use plus the larger unmet signal (denials since the previous run, or clients
        // waiting), as rule 5 and the planner count them — summed over cells. Peaks since the
        // previous run are not summed: they fall at different instants.
        let mut runs: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        for s in cells.iter().flat_map(|h| &h.samples) {
            let run = runs.entry(s.at_ms).or_default();
            run.0 += u64::from(s.allocation);
            run.1 += u64::from(s.in_use) + u64::from(s.denials.max(s.waiting));
        }
        let pool = known.unwrap_or_else(|| runs.values().map(|r| r.0).max().unwrap_or(0));
        let busiest = runs.values().map(|r| r.1).max().unwrap_or(0);
        let room = pool.saturating_sub(busiest);
        let raise = |r: &CellRecommendation| {
            let b = r
                .recommended
                .buffer_units
                .saturating_sub(r.current.buffer_units);
            let m = r.recommended.min_units.saturating_sub(r.current.min_units);
            (u64::from(b), u64::from(m))
        };
        let asked: u64 = idx
            .iter()
            .map(|&i| {
                let (b, m) = raise(&recs[i]);
                b + m
            })
            .sum();
        if asked <= room {
            continue;
        }
        for &i in &idx {
            let rec = &mut recs[i];
            let (b, m) = raise(rec);
            if b + m == 0 {
                continue;
            }
            let share = |units: u64| {
                u32::try_from(u128::from(units) * u128::from(room) / u128::from(asked))
                    .unwrap_or(u32::MAX)
            };
            let wanted = rec.recommended;
            if b > 0 {
                rec.recommended.buffer_units = rec.current.buffer_units.saturating_add(share(b));
            }
            if m > 0 {
                rec.recommended.min_units = rec.current.min_units.saturating_add(share(m));
            }
            rec.evidence.push(Evidence {
                rule: Rule::PoolRoom,
                window,
                text: format!(
                    "{}: product {product} {}; its cells needed {busiest} (in use, and \
                     denied or waiting) at its busiest run, so the raises of all its cells ({}) get the {} of room, in \
                     proportion: buffer {} → {}, min {} → {}",
                    window.describe(),
                    match known {
                        Some(purchased) => format!("has {purchased} units purchased"),
                        None => format!(
                            "ran dry — {denials} denials although {instants} instant balances \
                             served it — and its cells held at most {} at one run",
                            units(u32::try_from(pool).unwrap_or(u32::MAX))
                        ),
                    },
                    units(u32::try_from(asked).unwrap_or(u32::MAX)),
                    units(u32::try_from(room).unwrap_or(u32::MAX)),
                    wanted.buffer_units,
                    rec.recommended.buffer_units,
                    wanted.min_units,
                    rec.recommended.min_units
                ),
                figures: figures([
                    ("pool_units", pool as f64),
                    ("purchased_known", f64::from(u8::from(known.is_some()))),
                    ("busiest_demand_units", busiest as f64),
                    ("room_units", room as f64),
                    ("asked_units", asked as f64),
                    ("product_denials", denials as f64),
                    ("product_instant_balances", instants as f64),
                ]),
            });
            if rec.recommended == rec.current {
                rec.action = Action::Keep;
                rec.expected_effect = vec![Effect {
                    text: format!(
                        "buffer {} and min {} kept: the pool had no room at its busiest run; \
                         more units would only move the denials to another server (buy more, \
                         or accept them)",
                        rec.current.buffer_units, rec.current.min_units
                    ),
                    figures: figures([("room_units", room as f64)]),
                }];
            } else {
                rec.expected_effect.push(Effect {
                    text: format!(
                        "held to the pool's room: buffer {} → {}, min {} → {}",
                        rec.current.buffer_units,
                        rec.recommended.buffer_units,
                        rec.current.min_units,
                        rec.recommended.min_units
                    ),
                    figures: figures([("room_units", room as f64)]),
                });
            }
        }
    }
}

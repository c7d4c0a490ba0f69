//! Property tests for the advisor (`allot_core::advisor`): on arbitrary small histories and
//! bounds, what autotune may apply stays inside the operator's bounds, buffers stay sensible,
//! and the advice is a function of its input.

use allot_core::advisor::{
    Action, Advice, AdvisorInput, AutotuneBounds, CellConfig, CurrentSchedule, InstantBalance,
    RunRecord, ServerSite, Tuning, UsageSample, Window, advise, apply_bounds,
};
use allot_core::domain::RunTrigger;
use proptest::prelude::*;
use std::collections::BTreeMap;

const MINUTE: i64 = 60_000;
const DAY: i64 = 1440 * MINUTE;
const START: i64 = 20_458 * DAY;
const SERVERS: [&str; 3] = ["a", "b", "c"];
const PRODUCTS: [&str; 2] = ["cad", "cae"];

fn sample() -> impl Strategy<Value = UsageSample> {
    let pressure = prop_oneof![4 => Just(0u32), 1 => 0u32..20];
    (
        0i64..(10 * 24 * 4),
        0usize..3,
        0usize..2,
        0u32..40,
        0u32..30,
        0u32..15,
        pressure.clone(),
        pressure.clone(),
        pressure,
    )
        .prop_map(
            |(quarter, s, p, allocation, in_use, rise, denials, waiting, instant_requests)| {
                UsageSample {
                    at_ms: START + quarter * 15 * MINUTE,
                    server: SERVERS[s].to_string(),
                    product: PRODUCTS[p].to_string(),
                    allocation,
                    in_use,
                    peak_in_use: in_use + rise,
                    denials,
                    waiting,
                    instant_requests,
                }
            },
        )
}

fn input() -> impl Strategy<Value = AdvisorInput> {
    let instants = prop::collection::vec((0i64..(10 * DAY / MINUTE), 0usize..3, 1u32..5), 0..60);
    let settings = prop::collection::vec((0u32..30, 0u32..200), 6);
    (
        prop::collection::vec(sample(), 0..300),
        instants,
        settings,
        prop::sample::select(vec![5u32, 15, 30, 45, 60, 120, 240, 1440]),
        prop::collection::vec(prop::option::of(0u32..3), 0..4),
        1i64..11,
        -720i32..840,
    )
        .prop_map(
            |(samples, instants, settings, interval, moves, days, offset)| {
                let runs_count = (days * DAY / (i64::from(interval) * MINUTE)) as usize;
                let run_times_ms: Vec<i64> = (0..runs_count)
                    .map(|i| START + i as i64 * i64::from(interval) * MINUTE)
                    .collect();
                AdvisorInput {
                    window: Window {
                        from_ms: START,
                        to_ms: START + days * DAY,
                    },
                    now_ms: START + days * DAY,
                    servers: SERVERS
                        .iter()
                        .enumerate()
                        .map(|(i, s)| ServerSite {
                            server: s.to_string(),
                            site: format!("site-{}", i % 2),
                            utc_offset_minutes: (i != 2).then_some(offset / 15 * 15),
                            timezone: (i == 2).then(|| "Europe/Paris".to_string()),
                        })
                        .collect(),
                    samples,
                    instant_balances: instants
                        .into_iter()
                        .map(|(minute, s, units)| InstantBalance {
                            at_ms: START + minute * MINUTE,
                            server: SERVERS[s].to_string(),
                            product: "cad".to_string(),
                            units,
                        })
                        .collect(),
                    runs: run_times_ms
                        .iter()
                        .enumerate()
                        .map(|(i, at)| RunRecord {
                            at_ms: *at,
                            trigger: RunTrigger::Scheduled,
                            moves: if moves.is_empty() {
                                Some(0)
                            } else {
                                moves[i % moves.len()]
                            },
                        })
                        .collect(),
                    schedule: CurrentSchedule {
                        cron: "0 * * * *".to_string(),
                        timezone: "UTC".to_string(),
                        utc_offset_minutes: None,
                        interval_minutes: (interval != 45).then_some(interval),
                        run_times_ms,
                    },
                    cells: settings
                        .into_iter()
                        .enumerate()
                        .map(|(i, (min_units, buffer_units))| CellConfig {
                            server: SERVERS[i % 3].to_string(),
                            product: PRODUCTS[i / 3].to_string(),
                            min_units,
                            buffer_units,
                        })
                        .collect(),
                    tuning: Tuning::default(),
                    // Half the cases know their purchases (rule 7 weighs raises against them).
                    purchased: if days % 2 == 0 {
                        PRODUCTS
                            .iter()
                            .map(|p| (p.to_string(), u64::from(offset.unsigned_abs() % 60)))
                            .collect()
                    } else {
                        Default::default()
                    },
                }
            },
        )
}

fn bounds() -> impl Strategy<Value = AutotuneBounds> {
    (0u32..50, 0u32..20, 1u32..300, 0u32..1500).prop_map(|(buffer, min, lo, span)| AutotuneBounds {
        max_buffer_units: buffer,
        max_min_units: min,
        min_interval_minutes: lo,
        max_interval_minutes: lo + span,
    })
}

/// Highest in use per cell in the window, recomputed from the input, not from the advice.
fn observed_peaks(input: &AdvisorInput) -> BTreeMap<(String, String), u32> {
    let mut peaks = BTreeMap::new();
    for s in &input.samples {
        if input.window.contains(s.at_ms) && s.at_ms < input.now_ms {
            let p = peaks
                .entry((s.server.clone(), s.product.clone()))
                .or_insert(0);
            *p = (*p).max(s.peak_in_use).max(s.in_use);
        }
    }
    peaks
}

/// A changed buffer never exceeds 2 × the observed peak + 1 (and, being a `u32`, is never
/// negative); a kept recommendation is the current value.
fn check_sane(input: &AdvisorInput, advice: &Advice) -> Result<(), TestCaseError> {
    let peaks = observed_peaks(input);
    for cell in &advice.cells {
        match cell.action {
            Action::Keep => prop_assert_eq!(cell.recommended, cell.current),
            Action::Change => {
                prop_assert_ne!(cell.recommended, cell.current);
                let peak = peaks
                    .get(&(cell.server.clone(), cell.product.clone()))
                    .copied()
                    .unwrap_or(0);
                prop_assert!(
                    cell.recommended.buffer_units == cell.current.buffer_units
                        || cell.recommended.buffer_units <= peak * 2 + 1,
                    "buffer {} with observed peak {}",
                    cell.recommended.buffer_units,
                    peak
                );
                prop_assert!(
                    cell.recommended.min_units == cell.current.min_units
                        || cell.recommended.min_units <= peak
                );
            }
        }
        prop_assert!(!cell.evidence.is_empty() && !cell.expected_effect.is_empty());
    }
    let schedule = &advice.schedule;
    if schedule.action == Action::Keep {
        prop_assert_eq!(&schedule.recommended, &schedule.current);
    } else {
        prop_assert_eq!(schedule.recommended.cron.split_whitespace().count(), 5);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bounded_advice_stays_within_bounds_and_sane(input in input(), bounds in bounds()) {
        let advice = advise(&input);
        check_sane(&input, &advice)?;
        let bounded = apply_bounds(advice.clone(), &bounds);
        check_sane(&input, &bounded)?;
        for (cell, unbounded) in bounded.cells.iter().zip(&advice.cells) {
            if cell.action == Action::Change {
                let (now, new, asked) = (cell.current, cell.recommended, unbounded.recommended);
                let buffers = (now.buffer_units, new.buffer_units, asked.buffer_units);
                let mins = (now.min_units, new.min_units, asked.min_units);
                for ((current, value, asked), max) in
                    [(buffers, bounds.max_buffer_units), (mins, bounds.max_min_units)]
                {
                    if value != current {
                        prop_assert!(value <= max, "{} above the bound {}", value, max);
                        // Never further than, nor opposite to, what the advisor asked.
                        prop_assert_eq!(value.cmp(&current), asked.cmp(&current));
                    }
                }
            } else {
                prop_assert_eq!(cell.recommended, cell.current);
            }
        }
        let schedule = &bounded.schedule;
        if schedule.action == Action::Change {
            let interval = schedule.recommended.interval_minutes;
            prop_assert!(
                (bounds.min_interval_minutes..=bounds.max_interval_minutes).contains(&interval),
                "interval {} outside {:?}", interval, bounds
            );
        }
    }

    #[test]
    fn advice_is_a_function_of_its_input(input in input()) {
        let first = serde_json::to_string(&advise(&input)).unwrap();
        let mut reordered = input.clone();
        reordered.samples.reverse();
        reordered.instant_balances.reverse();
        reordered.runs.reverse();
        reordered.cells.reverse();
        prop_assert_eq!(first, serde_json::to_string(&advise(&reordered)).unwrap());
    }
}

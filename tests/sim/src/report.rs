//! Running every policy over a workload, and turning the figures into Markdown tables and PNG
//! plots for docs/BENCHMARKS.md.

use crate::engine::{Policy, SimConfig, all_policies, run};
use crate::metrics::{Metrics, ratio};
use crate::workload::{DAY, HOUR, MINUTE, Workload};
use std::fmt::Write as _;
use std::path::Path;

/// Every policy's figures over one workload, in the order of [`all_policies`].
pub struct Results {
    /// The workload's name.
    pub workload: String,
    /// Its one-line description.
    pub description: String,
    /// Checkout attempts (the same for every policy).
    pub checkouts: u64,
    /// Units purchased, summed over products.
    pub purchased: u64,
    /// One entry per policy.
    pub runs: Vec<Metrics>,
    /// Whether the workload has a demand step / a partition / scarcity columns to show.
    pub has_step: bool,
    /// Whether the workload has a partition.
    pub has_partition: bool,
    /// The product of the allocation plots.
    pub plotted_name: String,
}

/// Runs `policies` over `w` on `threads` threads; results come back in the policies' order.
pub fn run_all(w: &Workload, policies: &[Policy], cfg: &SimConfig, threads: usize) -> Results {
    let mut runs: Vec<Option<Metrics>> = vec![None; policies.len()];
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let chunks: Vec<Vec<usize>> = (0..threads)
            .map(|t| (t..policies.len()).step_by(threads).collect())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                scope.spawn(move || {
                    idx.into_iter()
                        .map(|i| (i, run(w, &policies[i], cfg)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, m) in h.join().expect("a policy run panicked") {
                runs[i] = Some(m);
            }
        }
    });
    Results {
        workload: w.name.clone(),
        description: w.description.clone(),
        checkouts: w.arrivals.len() as u64,
        purchased: w.purchased.iter().sum(),
        runs: runs.into_iter().map(|m| m.expect("every run")).collect(),
        has_step: w.step.is_some(),
        plotted_name: w
            .products
            .get(Metrics::new("", w).plotted_product)
            .cloned()
            .unwrap_or_default(),
        has_partition: w
            .faults
            .iter()
            .any(|f| matches!(f, crate::workload::Fault::Partition { .. })),
    }
}

/// Whether a policy is one of allot's own (not a baseline).
pub fn is_allot(name: &str) -> bool {
    name.starts_with("allot")
}

impl Results {
    /// The oracle's figures.
    pub fn oracle(&self) -> &Metrics {
        self.runs
            .iter()
            .find(|m| m.policy == "oracle")
            .expect("the oracle runs")
    }

    /// A policy's figures by name.
    pub fn get(&self, name: &str) -> Option<&Metrics> {
        self.runs.iter().find(|m| m.policy == name)
    }

    /// Excess denials over the oracle, in percentage points.
    pub fn excess_pp(&self, m: &Metrics) -> f64 {
        (m.denial_rate() - self.oracle().denial_rate()) * 100.0
    }

    /// The baseline (not the oracle, not allot) with the fewest denials.
    pub fn best_baseline(&self) -> &Metrics {
        self.runs
            .iter()
            .filter(|m| m.policy != "oracle" && !is_allot(&m.policy))
            .min_by_key(|m| m.denials)
            .unwrap_or(self.oracle())
    }

    /// The Markdown table of this workload: one row per policy.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "**{}** — {}. {} checkouts, {} units purchased.\n",
            self.workload, self.description, self.checkouts, self.purchased
        );
        let mut head = "| policy | denied % | excess pp | false % (all / reach.) | unserved seat-h | waited % | p99 wait ms | units moved /h | tx /h | moved /checkout | ping-pong % | fairness gap %".to_string();
        if self.has_step {
            head += " | step → 95 %";
        }
        if self.has_partition {
            head += " | cut site denied %";
        }
        head += " | safety |";
        let cols = head.matches('|').count() - 1;
        let _ = writeln!(s, "{head}");
        let _ = writeln!(s, "|{}", "---|".repeat(cols));
        for m in &self.runs {
            let bold = if m.policy == "allot" { "**" } else { "" };
            let _ = write!(
                s,
                "| {bold}{}{bold} | {:.2} | {:+.2} | {:.2} / {:.2} | {:.0} | {:.3} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1}",
                m.policy,
                m.denial_rate() * 100.0,
                self.excess_pp(m),
                ratio(m.false_denials_all, m.checkouts) * 100.0,
                ratio(m.false_denials_reachable, m.checkouts) * 100.0,
                m.unserved_seat_hours,
                ratio(m.waited, m.checkouts) * 100.0,
                m.wait_p99_ms,
                m.units_moved as f64 / m.hours,
                m.transactions as f64 / m.hours,
                ratio(m.units_moved, m.checkouts),
                ratio(m.ping_pong_units, m.units_moved) * 100.0,
                m.fairness_gap() * 100.0,
            );
            if self.has_step {
                match (m.policy.as_str(), m.step_time) {
                    ("oracle", _) => s.push_str(" | 0"),
                    (_, Some(t)) => {
                        let _ = write!(s, " | {} min", t / MINUTE);
                    }
                    (_, None) => s.push_str(" | never"),
                }
            }
            if self.has_partition {
                let _ = write!(s, " | {:.2}", m.partition_denial_rate() * 100.0);
            }
            let _ = writeln!(s, " | {} |", m.violations.total());
        }
        s
    }

    /// One row of the summary table: the headline figures.
    pub fn summary_row(&self) -> String {
        let Some(allot) = self.get("allot") else {
            return String::new();
        };
        let best = self.best_baseline();
        format!(
            "| {} | {:.2} | {:+.2} | {:+.2} ({}) | {} |",
            self.workload,
            self.oracle().denial_rate() * 100.0,
            self.excess_pp(allot),
            self.excess_pp(best),
            best.policy,
            self.runs.iter().map(|m| m.violations.total()).sum::<u64>(),
        )
    }
}

/// The header of the targets table.
pub const TARGETS_HEAD: &str = "| workload | allot excess pp ≤ 0.1 (≤ 0.25 with faults) | ≤ best baseline | waited ≤ 1 % | moved /checkout ≤ 0.15 | ping-pong ≤ 5 % | cut site ≤ static split | sched-only no worse than SMS (24h / 1h / 15m) and static-prop | safety = 0 |\n|---|---|---|---|---|---|---|---|---|";

fn mark(ok: bool) -> &'static str {
    if ok { "✅" } else { "❌" }
}

impl Results {
    /// One row of the targets table: every target of issue 5, measured.
    pub fn targets_row(&self) -> String {
        let Some(allot) = self.get("allot") else {
            return String::new();
        };
        let best = self.best_baseline();
        let excess = self.excess_pp(allot);
        let bound = if self.has_partition || self.workload == "faults" {
            0.25
        } else {
            0.1
        };
        let headline = format!("{} {excess:+.2}", mark(excess <= bound));
        let waited = ratio(allot.waited, allot.checkouts) * 100.0;
        let moved = ratio(allot.units_moved, allot.checkouts);
        let pp = ratio(allot.ping_pong_units, allot.units_moved) * 100.0;
        let cut = if self.has_partition {
            let s = self
                .get("static-equal")
                .map_or(0.0, |m| m.partition_denial_rate());
            let a = allot.partition_denial_rate();
            format!("{} {:.1} % vs {:.1} %", mark(a <= s), a * 100.0, s * 100.0)
        } else {
            "–".into()
        };
        let split = self.get("static-prop").map_or(u64::MAX, |m| m.denials);
        let sched: Vec<String> = [("24h", "sms-24h"), ("1h", "sms-1h"), ("15m", "sms-15m")]
            .iter()
            .map(|(i, sms)| {
                let a = self
                    .get(&format!("allot-sched-{i}"))
                    .map_or(0, |m| m.denials);
                let b = self.get(sms).map_or(0, |m| m.denials);
                format!("{}{}", mark(a <= b), if a <= split { "" } else { "⁻" })
            })
            .collect();
        let safety: u64 = self.runs.iter().map(|m| m.violations.total()).sum();
        format!(
            "| {} | {headline} | {} | {} {waited:.1} % | {} {moved:.2} | {} {pp:.0} % | {cut} | {} | {} |",
            self.workload,
            mark(allot.denials <= best.denials),
            mark(waited <= 1.0),
            mark(moved <= 0.15),
            mark(pp <= 5.0),
            sched.join(" "),
            mark(safety == 0),
        )
    }
}

/// The header of the summary table.
pub const SUMMARY_HEAD: &str = "| workload | oracle denied % | allot excess pp | best baseline excess pp | safety violations (all runs) |\n|---|---|---|---|---|";

/// Registers a font for the plots' text; plots are skipped (with a note) when none is found.
pub fn load_font() -> bool {
    let candidates = [
        std::env::var("ALLOT_SIM_FONT").unwrap_or_default(),
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
    ];
    for path in candidates.iter().filter(|p| !p.is_empty()) {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    false
}

/// The policies drawn in the denial-rate plots (all would be unreadable).
const PLOTTED: [&str; 7] = [
    "oracle",
    "static-equal",
    "sms-15m",
    "instant-only",
    "doorman-fair",
    "sentinel",
    "allot",
];

/// Denial rate per hour of simulated time, one line per policy in `PLOTTED`.
pub fn plot_denials(r: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let hours = r.runs[0].hourly.len();
    let rate = |m: &Metrics| -> Vec<(f64, f64)> {
        m.hourly
            .iter()
            .enumerate()
            .map(|(h, &(a, d))| (h as f64 / 24.0, ratio(d, a) * 100.0))
            .collect()
    };
    let top = r
        .runs
        .iter()
        .filter(|m| PLOTTED.contains(&m.policy.as_str()))
        .flat_map(|m| rate(m).into_iter().map(|x| x.1))
        .fold(1.0f64, f64::max)
        .min(100.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: denied checkouts per hour (%)", r.workload),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..hours as f64 / 24.0, 0f64..top * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("day")
        .y_desc("denied %")
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, name) in PLOTTED.iter().enumerate() {
        let Some(m) = r.get(name) else { continue };
        let color = Palette99::pick(i).to_rgba();
        let width = if *name == "allot" || *name == "oracle" {
            2
        } else {
            1
        };
        chart
            .draw_series(LineSeries::new(rate(m), color.stroke_width(width)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Allocation (solid) and in use (thin) of product 0 per site over one day, for one policy.
pub fn plot_allocation(
    r: &Results,
    policy: &str,
    day: u64,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let Some(m) = r.get(policy) else {
        return Ok(());
    };
    let series: Vec<&(u64, Vec<u64>, Vec<u64>)> = m
        .alloc_series
        .iter()
        .filter(|x| x.0 >= day * DAY && x.0 <= (day + 1) * DAY)
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let sites = series[0].1.len();
    let top = series
        .iter()
        .flat_map(|x| x.1.iter().chain(x.2.iter()))
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let root = BitMapBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: {policy}, {} allocation (thick) and in use (thin) per site, day {}",
                r.workload,
                r.plotted_name,
                day + 1
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..24f64, 0f64..top as f64 * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("hour (UTC)")
        .y_desc("units")
        .label_style(("sans-serif", 13))
        .draw()?;
    for s in 0..sites {
        let color = Palette99::pick(s).to_rgba();
        let at = |t: u64| (t - day * DAY) as f64 / HOUR as f64;
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|x| (at(x.0), x.1[s] as f64)),
                color.stroke_width(2),
            ))?
            .label(format!("site {s}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(LineSeries::new(
            series.iter().map(|x| (at(x.0), x.2[s] as f64)),
            color.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// All policies, for callers that do not pick.
pub fn policies() -> Vec<Policy> {
    all_policies()
}

/// The header of the advice experiment's table (`--advise`).
pub const ADVICE_HEAD: &str = "| workload | configuration | denied % | excess pp | units moved /h | moves /h | instant requests /h | waited % | runs /day | advice applied | safety |\n|---|---|---|---|---|---|---|---|---|---|---|";

impl Results {
    /// Rows of the advice experiment's table: the oracle, then every un-tuned policy that has an
    /// advised twin (`NAME-advised`) followed by that twin, with what the advisor changed.
    pub fn advice_rows(&self) -> Vec<String> {
        let row = |m: &Metrics, config: &str, applied: String| {
            format!(
                "| {} | {config} | {:.2} | {:+.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {applied} | {} |",
                self.workload,
                m.denial_rate() * 100.0,
                self.excess_pp(m),
                m.units_moved as f64 / m.hours,
                m.moves as f64 / m.hours,
                m.instant_requests as f64 / m.hours,
                ratio(m.waited, m.checkouts) * 100.0,
                m.scheduled_runs as f64 / (m.hours / 24.0),
                m.violations.total(),
            )
        };
        let mut rows = vec![row(self.oracle(), "oracle", "–".into())];
        for m in &self.runs {
            let Some(advised) = self.get(&format!("{}-advised", m.policy)) else {
                continue;
            };
            rows.push(row(m, &m.policy, "–".into()));
            let applied = advised.advice.as_ref().map_or("none".into(), describe);
            rows.push(row(advised, &advised.policy, applied));
        }
        rows
    }
}

/// What an advice changed, in a table cell: the schedule and the sums of the cells' settings.
pub fn describe(advice: &allot_core::advisor::Advice) -> String {
    use allot_core::advisor::Action;
    let s = &advice.schedule;
    let schedule = if s.action == Action::Change {
        format!("`{}` → `{}`", s.current.cron, s.recommended.cron)
    } else {
        format!("`{}` kept", s.current.cron)
    };
    let changed: Vec<_> = advice
        .cells
        .iter()
        .filter(|c| c.action == Action::Change)
        .collect();
    let sum = |f: fn(&allot_core::advisor::CellSettings) -> u32, current: bool| -> u64 {
        changed
            .iter()
            .map(|c| u64::from(f(if current { &c.current } else { &c.recommended })))
            .sum()
    };
    format!(
        "{schedule}; {} of {} cells: Σ buffer {} → {}, Σ min {} → {}",
        changed.len(),
        advice.cells.len(),
        sum(|c| c.buffer_units, true),
        sum(|c| c.buffer_units, false),
        sum(|c| c.min_units, true),
        sum(|c| c.min_units, false),
    )
}

//! `allot-sim`: runs every policy over the workloads and prints the Markdown tables of
//! docs/BENCHMARKS.md; with `--img DIR`, also writes the PNG plots.
//!
//! ```text
//! cargo run --release -p allot-sim -- [--workload NAME]... [--traces DIR] [--img DIR]
//!     [--days N] [--products N] [--load F] [--seed N] [--threads N] [--policy NAME]...
//!     [--latency-ms N] [--hysteresis-percent N] [--hysteresis-min N] [--lookahead-min N]
//!     [--window-min N] [--watermark-percent N] [--watermark-min N] [--backoff-ms N]
//!     [--forecast-floor-percent N]
//!     [--extra-units-percent N] [--advise] [--train-days N] [--configured-only]
//! ```
//!
//! `--advise` runs the advice experiment instead: the first `--train-days` (7) days train the
//! real advisor, the rest (by default another week) is measured for allot un-tuned and advised;
//! `--configured-only` gives the planner only the configured min / buffer, as the balancer does.
#![forbid(unsafe_code)]

use allot_sim::engine::{SimConfig, advice_policies};
use allot_sim::report::{
    ADVICE_HEAD, SUMMARY_HEAD, TARGETS_HEAD, describe, load_font, plot_allocation, plot_denials,
    policies, run_all,
};
use allot_sim::workload::{DAY, MINUTE, SYNTHETIC, Scale, synthetic};
use allot_sim::{flexnet, workload::Workload};
use std::path::PathBuf;
use std::time::Instant;

const REPLAYS: [(&str, &str, usize); 3] = [
    ("replay-matlab", "matlab-upm-2022.log", 20),
    ("replay-ansys", "ansys-umich-2017.log", 20),
    ("replay-autodesk", "autodesk-2016.log", 20),
];

fn main() {
    let mut names: Vec<String> = Vec::new();
    let mut traces =
        PathBuf::from(std::env::var("ALLOT_TRACES").unwrap_or_else(|_| "../shared/traces".into()));
    let mut img: Option<PathBuf> = None;
    let mut scale = Scale::default();
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cfg = SimConfig::default();
    let mut only: Vec<String> = Vec::new();
    let mut extra_percent = 0u64;
    let mut advise = false;
    let mut train_days = 7u64;
    let mut days_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--workload" => names.push(val()),
            "--traces" => traces = val().into(),
            "--img" => img = Some(val().into()),
            "--days" => {
                scale.duration = parse::<u64>(&val()) * DAY;
                days_given = true;
            }
            "--advise" => advise = true,
            "--train-days" => train_days = parse(&val()),
            "--products" => scale.products = parse(&val()),
            "--load" => scale.load = parse(&val()),
            "--seed" => scale.seed = parse(&val()),
            "--threads" => threads = parse(&val()),
            "--policy" => only.push(val()),
            "--extra-units-percent" => extra_percent = parse(&val()),
            "--latency-ms" => cfg.latency = parse(&val()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if names.is_empty() {
        names = SYNTHETIC.iter().map(|s| s.to_string()).collect();
        names.extend(REPLAYS.iter().map(|r| r.0.to_string()));
    }
    let fonts = img.is_some() && load_font();
    if img.is_some() && !fonts {
        eprintln!("no font found (set ALLOT_SIM_FONT to a .ttf): plots skipped");
    }
    if advise && !days_given {
        // A training week, then a week measured.
        scale.duration = (train_days + 7) * DAY;
    }
    let mut policies = if advise {
        advice_policies()
    } else {
        policies()
    };
    if !only.is_empty() {
        policies.retain(|p| p.name == "oracle" || only.contains(&p.name));
    }
    let mut summary = vec![SUMMARY_HEAD.to_string()];
    let mut tables = Vec::new();
    let mut targets = vec![TARGETS_HEAD.to_string()];
    let mut advice_rows = vec![ADVICE_HEAD.to_string()];
    let mut advice_notes = Vec::new();
    for name in &names {
        let started = Instant::now();
        let Some(mut w) = build(name, scale, &traces) else {
            eprintln!("skipping {name}: unknown workload or trace not found");
            continue;
        };
        for units in &mut w.purchased {
            *units += (*units * extra_percent).div_ceil(100);
        }
        let mut cfg = cfg;
        if advise {
            // Replays are as long as their log: train on whole days of the first half.
            cfg.train = (train_days * DAY).min(w.duration / 2 / DAY * DAY);
            if cfg.train == 0 {
                eprintln!("skipping {name}: shorter than two days, nothing to train on");
                continue;
            }
        }
        let r = run_all(&w, &policies, &cfg, threads);
        if advise {
            advice_rows.extend(r.advice_rows());
            for m in r.runs.iter() {
                if let Some(a) = &m.advice {
                    let evidence: Vec<String> = a
                        .schedule
                        .evidence
                        .iter()
                        .map(|e| format!("  - {}", e.text))
                        .collect();
                    advice_notes.push(format!(
                        "- **{name}**, {} (trained {} days): {}\n{}",
                        m.policy,
                        cfg.train / DAY,
                        describe(a),
                        evidence.join("\n")
                    ));
                }
            }
        }
        eprintln!(
            "{name}: {} checkouts x {} policies in {:.1} s",
            w.arrivals.len(),
            policies.len(),
            started.elapsed().as_secs_f64()
        );
        if std::env::var("ALLOT_SIM_DEBUG").is_ok()
            && let (Some(o), Some(a)) = (r.get("oracle"), r.get("allot"))
        {
            // Waits in hours the oracle found the pool full vs hours it did not.
            let (mut tight, mut ample, mut tight_n, mut ample_n) = (0u64, 0u64, 0u64, 0u64);
            for (h, &(asked, denied)) in o.hourly.iter().enumerate() {
                let w = a.hourly_waited[h];
                if denied * 1000 > asked {
                    tight += w;
                    tight_n += asked;
                } else {
                    ample += w;
                    ample_n += asked;
                }
            }
            eprintln!(
                "allot waits in hours the oracle denies > 0.1 %: {tight} of {tight_n}; other hours: {ample} of {ample_n}"
            );
        }
        if std::env::var("ALLOT_SIM_DEBUG").is_ok() {
            for m in &r.runs {
                let p = |q: f64| allot_sim::metrics::percentile(&m.waits, q);
                eprintln!(
                    "{}: waits {} p50 {} p90 {} p95 {} instant requests {}",
                    m.policy,
                    m.waited,
                    p(0.5),
                    p(0.9),
                    p(0.95),
                    m.instant_requests
                );
            }
        }
        summary.push(r.summary_row());
        targets.push(r.targets_row());
        tables.push(r.table());
        if fonts && let Some(dir) = &img {
            let _ = std::fs::create_dir_all(dir);
            let plotted = [
                "follow-the-sun",
                "login-storm",
                "step",
                "scarcity",
                "partition",
                "replay-matlab",
            ];
            if plotted.contains(&name.as_str())
                && let Err(e) = plot_denials(&r, &dir.join(format!("sim-{name}-denials.png")))
            {
                eprintln!("plot failed: {e}");
            }
            if matches!(name.as_str(), "follow-the-sun" | "partition") {
                let day = 1;
                for policy in ["allot", "sms-15m"] {
                    let path = dir.join(format!("sim-{name}-allocation-{policy}.png"));
                    if let Err(e) = plot_allocation(&r, policy, day, &path) {
                        eprintln!("plot failed: {e}");
                    }
                }
            }
        }
    }
    if advise {
        println!("{}\n", advice_rows.join("\n"));
        println!("{}", advice_notes.join("\n"));
        return;
    }
    println!("{}\n", summary.join("\n"));
    println!("{}\n", targets.join("\n"));
    for t in tables {
        println!("{t}");
    }
}

fn build(name: &str, scale: Scale, traces: &std::path::Path) -> Option<Workload> {
    if let Some(&(_, file, products)) = REPLAYS.iter().find(|r| r.0 == name) {
        let text = std::fs::read_to_string(traces.join(file)).ok()?;
        let parsed = flexnet::parse(&text);
        return Some(flexnet::replay(name, &parsed, 5, products));
    }
    synthetic(name, scale)
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| usage(&format!("bad number {s}")))
}

fn usage(why: &str) -> ! {
    if !why.is_empty() {
        eprintln!("allot-sim: {why}");
    }
    eprintln!(
        "usage: allot-sim [--workload NAME]... [--traces DIR] [--img DIR] [--days N] [--products N] [--load F] [--seed N] [--threads N] [--advise [--train-days N] [--configured-only]]\n\
         workloads: {} replay-matlab replay-ansys replay-autodesk",
        SYNTHETIC.join(" ")
    );
    std::process::exit(if why.is_empty() { 0 } else { 2 })
}

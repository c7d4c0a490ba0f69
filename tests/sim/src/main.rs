//! `allot-sim`: runs every policy over the workloads and prints the Markdown tables of
//! docs/BENCHMARKS.md (`bench`, the default); with `--img DIR`, also writes the PNG plots.
//! `replay LOG...` replays an operator's own FlexNet logs through the shipped policy and the
//! baselines. `allot-sim --help` lists the flags and the workloads; see docs/simulator.md.
//!
//! ```text
//! cargo run --release -p allot-sim -- [bench] [--workload NAME]... [--traces DIR] [--img DIR]
//!     [--days N] [--products N] [--load F] [--seed N] [--threads N] [--policy NAME]...
//!     [--latency-ms N] [--extra-units-percent N] [--advise] [--train-days N]
//! cargo run --release -p allot-sim -- replay LOG... [--site-map FILE] [--purchased N|FEATURE=N]...
//!     [--feature NAME]... [--policy NAME]... [--latency-ms N] [--threads N] [--json]
//! ```
//!
//! `--advise` runs the advice experiment instead: the first `--train-days` (7) days train the
//! real advisor, the rest (by default another week) is measured for allot un-tuned and advised.
#![forbid(unsafe_code)]

use allot_sim::engine::{SimConfig, advice_policies};
use allot_sim::replay::{self, Options, Purchase, SiteMap};
use allot_sim::report::{
    ADVICE_HEAD, SUMMARY_HEAD, TARGETS_HEAD, describe, load_font, plot_allocation, plot_denials,
    policies, run_all,
};
use allot_sim::workload::{DAY, SYNTHETIC, Scale, synthetic};
use allot_sim::{flexnet, workload::Workload};
use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// The replay workloads of the tables: name, file in `--traces`, products kept.
const REPLAYS: [(&str, &str, usize); 3] = [
    ("replay-matlab", "matlab-upm-2022.log", 20),
    ("replay-ansys", "ansys-umich-2017.log", 20),
    ("replay-autodesk", "autodesk-2016.log", 20),
];

/// Every workload name `--workload` takes.
fn workload_names() -> Vec<&'static str> {
    SYNTHETIC
        .iter()
        .copied()
        .chain(REPLAYS.iter().map(|r| r.0))
        .collect()
}

/// Every policy name `--policy` takes: the tables' and the advice experiment's.
fn policy_names() -> Vec<&'static str> {
    let mut names: Vec<String> = policies().into_iter().map(|p| p.name).collect();
    for p in advice_policies() {
        if !names.contains(&p.name) {
            names.push(p.name);
        }
    }
    // Leaked once: clap's possible values borrow for the program's life.
    names
        .into_iter()
        .map(|n| &*Box::leak(n.into_boxed_str()))
        .collect()
}

fn workloads_help() -> String {
    format!(
        "Workloads (--workload; all of them when none is named):\n  synthetic: {}\n  replays of --traces: {}\n\n\
         `allot-sim replay LOG...` replays your own FlexNet logs instead; see `allot-sim replay --help`.",
        SYNTHETIC.join(", "),
        REPLAYS
            .iter()
            .map(|r| format!("{} ({})", r.0, r.1))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// allot's workload simulator: the shipped policy against the baselines and the one-pool
/// oracle, on synthetic workloads, on the FlexNet logs of the benchmarks, or on your own logs.
#[derive(Parser)]
#[command(
    name = "allot-sim",
    version,
    args_conflicts_with_subcommands = true,
    after_help = workloads_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: `bench`.
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Every policy over the workloads: the Markdown tables of docs/BENCHMARKS.md (the default).
    #[command(after_help = workloads_help())]
    Bench(BenchArgs),
    /// Replays FlexNet debug logs (several: one estate) through allot and the baselines.
    #[command(after_help = REPLAY_HELP)]
    Replay(ReplayArgs),
}

const REPLAY_HELP: &str = "\
Sites: by default each host-name stem is a site (`s068f-h0001` → s068f, `COMPUTER05` → COMPUTER).
A site map has one `PATTERN SITE` per line, `*` and `?` globs matched case-insensitively against
the host (or against user@host when the pattern holds `@`); the first match wins, `#` starts a
comment. A host that matches no pattern is an error: end the map with `* SITE` for the rest.

Units purchased per feature: --purchased, else the pool the logs show (when every log of the
feature has a DENIED \"Licensed number of users already reached\" or a QUEUED line: its peak in
use), else calibrated so one central pool denies about 1.5 %.

Exit status: 0 when the replay ran, 1 for a bad log or site map (the error names the file and
line), 2 for bad arguments.";

/// The tables' run (also the flags without a subcommand).
#[derive(Args, Clone)]
struct BenchArgs {
    /// A workload to run (repeatable; default: all).
    #[arg(long = "workload", value_name = "NAME", value_parser = PossibleValuesParser::new(workload_names()))]
    workloads: Vec<String>,
    /// Folder of the FlexNet logs of the replay-* workloads (skipped when absent).
    #[arg(
        long,
        value_name = "DIR",
        env = "ALLOT_TRACES",
        default_value = "../shared/traces"
    )]
    traces: PathBuf,
    /// Also write the PNG plots there (needs a TrueType font; ALLOT_SIM_FONT names one).
    #[arg(long, value_name = "DIR")]
    img: Option<PathBuf>,
    /// Length of the synthetic workloads, in days (default 7; `--advise`: training + 7).
    #[arg(long, value_name = "N")]
    days: Option<u64>,
    /// Products of the synthetic workloads.
    #[arg(long, value_name = "N", default_value_t = Scale::default().products)]
    products: usize,
    /// Multiplies every synthetic load (1.5: about a million checkouts a week).
    #[arg(long, value_name = "F", default_value_t = Scale::default().load)]
    load: f64,
    /// The synthetic workloads' seed.
    #[arg(long, value_name = "N", default_value_t = Scale::default().seed)]
    seed: u64,
    /// Policies run in parallel (default: the cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Run only this policy (repeatable; the oracle always runs).
    #[arg(long = "policy", value_name = "NAME", value_parser = PossibleValuesParser::new(policy_names()))]
    policies: Vec<String>,
    /// One-way latency of every message between a site and the balancer, ms.
    #[arg(long, value_name = "N")]
    latency_ms: Option<u64>,
    /// Buy N % more units than the calibration.
    #[arg(long, value_name = "N", default_value_t = 0)]
    extra_units_percent: u64,
    /// Run the advice experiment instead: train the advisor, then measure un-tuned vs advised.
    #[arg(long)]
    advise: bool,
    /// Days of training for --advise.
    #[arg(long, value_name = "N", default_value_t = 7)]
    train_days: u64,
}

/// `allot-sim replay`.
#[derive(Args)]
struct ReplayArgs {
    /// FlexNet (lmgrd) debug logs; several make one estate (merged in time order).
    #[arg(value_name = "LOG", required = true)]
    logs: Vec<PathBuf>,
    /// Host-name patterns to sites (`PATTERN SITE` lines); default: host-name stems.
    #[arg(long, value_name = "FILE")]
    site_map: Option<PathBuf>,
    /// Units purchased: N for every feature, or FEATURE=N (repeatable; overrides the logs).
    #[arg(long, value_name = "N|FEATURE=N")]
    purchased: Vec<Purchase>,
    /// Replay only this feature (repeatable; default: every feature of the logs).
    #[arg(long = "feature", value_name = "NAME")]
    features: Vec<String>,
    /// Run only this policy (repeatable; the oracle always runs).
    #[arg(long = "policy", value_name = "NAME", value_parser = PossibleValuesParser::new(policy_names()))]
    policies: Vec<String>,
    /// One-way latency of every message between a site and the balancer, ms.
    #[arg(long, value_name = "N")]
    latency_ms: Option<u64>,
    /// Policies run in parallel (default: the cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// A JSON array on stdout, one object per policy, instead of the table.
    #[arg(long)]
    json: bool,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => bench(cli.bench),
        Some(Command::Bench(args)) => bench(args),
        Some(Command::Replay(args)) => match replay_logs(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("allot-sim: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn replay_logs(args: ReplayArgs) -> Result<(), replay::Error> {
    let site_map = args.site_map.as_deref().map(SiteMap::read).transpose()?;
    let mut logs = Vec::new();
    for path in &args.logs {
        let log = replay::read_log(path)?;
        for w in log.warnings() {
            eprintln!("allot-sim: warning: {w}");
        }
        logs.push(log);
    }
    let opts = Options {
        site_map,
        features: args.features,
        purchased: args.purchased,
    };
    let estate = replay::estate(&logs, &opts)?;
    for w in &estate.warnings {
        eprintln!("allot-sim: warning: {w}");
    }
    let mut policies = policies();
    if !args.policies.is_empty() {
        policies.retain(|p| p.name == "oracle" || args.policies.contains(&p.name));
    }
    let mut cfg = SimConfig::default();
    if let Some(ms) = args.latency_ms {
        cfg.latency = ms;
    }
    let started = Instant::now();
    let r = run_all(
        &estate.workload,
        &policies,
        &cfg,
        args.threads.unwrap_or_else(default_threads),
    );
    eprintln!(
        "{} checkouts x {} policies in {:.1} s",
        estate.workload.arrivals.len(),
        policies.len(),
        started.elapsed().as_secs_f64()
    );
    let rows = replay::rows(&r);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        );
    } else {
        print!("{}", replay::table(&estate, &rows));
    }
    Ok(())
}

fn bench(args: BenchArgs) -> ExitCode {
    let mut names = args.workloads.clone();
    let mut scale = Scale {
        products: args.products,
        load: args.load,
        seed: args.seed,
        ..Scale::default()
    };
    if let Some(days) = args.days {
        scale.duration = days * DAY;
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    let mut cfg = SimConfig::default();
    if let Some(ms) = args.latency_ms {
        cfg.latency = ms;
    }
    let (advise, train_days, extra_percent) =
        (args.advise, args.train_days, args.extra_units_percent);
    if names.is_empty() {
        names = workload_names().into_iter().map(String::from).collect();
    }
    let img = args.img.clone();
    let fonts = img.is_some() && load_font();
    if img.is_some() && !fonts {
        eprintln!("no font found (set ALLOT_SIM_FONT to a .ttf): plots skipped");
    }
    if advise && args.days.is_none() {
        // A training week, then a week measured.
        scale.duration = (train_days + 7) * DAY;
    }
    let mut policies = if advise {
        advice_policies()
    } else {
        policies()
    };
    if !args.policies.is_empty() {
        policies.retain(|p| p.name == "oracle" || args.policies.contains(&p.name));
    }
    let mut summary = vec![SUMMARY_HEAD.to_string()];
    let mut tables = Vec::new();
    let mut targets = vec![TARGETS_HEAD.to_string()];
    let mut advice_rows = vec![ADVICE_HEAD.to_string()];
    let mut advice_notes = Vec::new();
    for name in &names {
        let started = Instant::now();
        let Some(mut w) = build(name, scale, &args.traces) else {
            eprintln!(
                "skipping {name}: trace not found in {}",
                args.traces.display()
            );
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
        if std::env::var("ALLOT_SIM_DEBUG").is_ok() {
            debug_waits(&r);
        }
        summary.push(r.summary_row());
        targets.push(r.targets_row());
        tables.push(r.table());
        if fonts && let Some(dir) = &img {
            plot(&r, name, dir);
        }
    }
    if advise {
        println!("{}\n", advice_rows.join("\n"));
        println!("{}", advice_notes.join("\n"));
        return ExitCode::SUCCESS;
    }
    println!("{}\n", summary.join("\n"));
    println!("{}\n", targets.join("\n"));
    for t in tables {
        println!("{t}");
    }
    ExitCode::SUCCESS
}

/// `ALLOT_SIM_DEBUG`: allot's waits in hours the oracle found the pool full vs the others, and
/// wait percentiles per policy.
fn debug_waits(r: &allot_sim::report::Results) {
    if let (Some(o), Some(a)) = (r.get("oracle"), r.get("allot")) {
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

/// The plots of docs/BENCHMARKS.md for the workloads that have them.
fn plot(r: &allot_sim::report::Results, name: &str, dir: &Path) {
    let _ = std::fs::create_dir_all(dir);
    let plotted = [
        "follow-the-sun",
        "login-storm",
        "step",
        "scarcity",
        "partition",
        "replay-matlab",
    ];
    if plotted.contains(&name)
        && let Err(e) = plot_denials(r, &dir.join(format!("sim-{name}-denials.png")))
    {
        eprintln!("plot failed: {e}");
    }
    if matches!(name, "follow-the-sun" | "partition") {
        let day = 1;
        for policy in ["allot", "sms-15m"] {
            let path = dir.join(format!("sim-{name}-allocation-{policy}.png"));
            if let Err(e) = plot_allocation(r, policy, day, &path) {
                eprintln!("plot failed: {e}");
            }
        }
    }
}

fn build(name: &str, scale: Scale, traces: &Path) -> Option<Workload> {
    if let Some(&(_, file, products)) = REPLAYS.iter().find(|r| r.0 == name) {
        let text = std::fs::read_to_string(traces.join(file)).ok()?;
        let parsed = flexnet::parse(&text);
        return Some(flexnet::replay(name, &parsed, 5, products));
    }
    synthetic(name, scale)
}

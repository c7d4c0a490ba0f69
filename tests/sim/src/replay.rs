//! `allot-sim replay`: an operator's own FlexNet debug logs replayed through the shipped policy
//! (`allot`) and the baselines, so the estate's own demand shows what allot would have done.
//!
//! Several logs make one estate: each is parsed on its own (a restart drops only that server's
//! licenses), and their checkouts are merged in time order. A feature is a product; a host's
//! site comes from a [`SiteMap`] (`PATTERN SITE` lines) or, without one, from its name's stem
//! ([`flexnet::host_stem`]). Units purchased per feature: `--purchased`, else the pool the logs
//! show (the peak in use of a server whose log says the pool was full), else the simulator's
//! calibration (the oracle denies about 1.5 %). See docs/simulator.md.

use crate::flexnet::{self, Checkout, Parsed};
use crate::metrics::{Metrics, ratio};
use crate::report::{Results, is_allot};
use crate::workload::{Arrival, DAY, ORACLE_TARGET, SECOND, Site, Workload, calibrate};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// What stops a replay: the file and the line (1-based) when they are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The file at fault (a log or the site map).
    pub file: Option<String>,
    /// The line at fault.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl Error {
    fn new(message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            message: message.into(),
        }
    }

    fn at(file: &str, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: Some(file.into()),
            line,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: {}", self.message),
            (Some(file), None) => write!(f, "{file}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

/// Whether `text` matches a glob `pattern` (`*` any run of characters, `?` one character),
/// ignoring case.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was, and how much of the text it has taken.
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// One line of a site map.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: String,
    site: String,
}

/// Host-name patterns to sites: one `PATTERN SITE` per line, first match wins, `#` starts a
/// comment, blank lines are ignored. A pattern is a glob (`*`, `?`, case-insensitive) matched
/// against the host name; one holding `@` is matched against `user@host`. Hosts that match no
/// pattern are an error: end the map with `* SITE` to send the rest somewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteMap {
    origin: String,
    rules: Vec<Rule>,
}

impl SiteMap {
    /// Parses a map; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(x, _)| x);
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [pattern, site] => rules.push(Rule {
                    pattern: pattern.to_string(),
                    site: site.to_string(),
                }),
                _ => {
                    return Err(Error::at(
                        origin,
                        Some(i + 1),
                        format!(
                            "expected `PATTERN SITE` (two words; site names have no spaces), found `{}`",
                            line.trim()
                        ),
                    ));
                }
            }
        }
        if rules.is_empty() {
            return Err(Error::at(
                origin,
                None,
                "no `PATTERN SITE` line in the site map",
            ));
        }
        Ok(Self {
            origin: origin.into(),
            rules,
        })
    }

    /// Reads and parses a map file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::at(&name, None, e.to_string()))?;
        Self::parse(&text, &name)
    }

    /// The site of a host (`user` for patterns holding `@`), by the first matching rule.
    pub fn site_of(&self, user: &str, host: &str) -> Option<&str> {
        let who = format!("{user}@{host}");
        self.rules
            .iter()
            .find(|r| {
                if r.pattern.contains('@') {
                    glob_match(&r.pattern, &who)
                } else {
                    glob_match(&r.pattern, host)
                }
            })
            .map(|r| r.site.as_str())
    }
}

/// The site of a host without a map: its name's stem ([`flexnet::host_stem`]); `no-host` for
/// checkouts logged without `@host`.
pub fn default_site(host: &str) -> String {
    match flexnet::host_stem(host) {
        "" => "no-host".into(),
        stem => stem.into(),
    }
}

/// One log, parsed and checked.
#[derive(Debug, Clone)]
pub struct Log {
    /// The path as given.
    pub path: String,
    /// What it holds.
    pub parsed: Parsed,
}

impl Log {
    /// What the operator should know although the log was read: a cut last line skipped,
    /// events before the first date skipped, lines read as Latin-1.
    pub fn warnings(&self) -> Vec<String> {
        let p = &self.parsed;
        let mut out = Vec::new();
        if let Some(n) = p.truncated_line {
            out.push(format!(
                "{}:{n}: the last line is cut mid-record (no newline at the end of the file): skipped",
                self.path
            ));
        }
        if let Some(n) = p.first_undated_line {
            out.push(format!(
                "{}:{n}: {} event line(s) before the first date line (TIMESTAMP, `started on`, Start-Date:): skipped",
                self.path, p.undated_events
            ));
        }
        if p.latin1_lines > 0 {
            out.push(format!(
                "{}: {} line(s) not UTF-8, read as Latin-1",
                self.path, p.latin1_lines
            ));
        }
        out
    }
}

/// Reads and checks one FlexNet debug log ([`flexnet::parse_checked`]); errors name the file
/// and, where one line is the cause, the line.
pub fn read_log(path: &Path) -> Result<Log, Error> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::at(&name, None, e.to_string()))?;
    let parsed = flexnet::parse_checked(&bytes).map_err(|e| Error::at(&name, e.line, e.message))?;
    Ok(Log { path: name, parsed })
}

/// A `--purchased` value: `N` (every feature) or `FEATURE=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    /// N units of every feature.
    All(u64),
    /// N units of one feature.
    Feature(String, u64),
}

impl std::str::FromStr for Purchase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let units = |n: &str| match n.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("`{n}` is not a number of units (1 or more)")),
        };
        match s.rsplit_once('=') {
            Some((feature, n)) if !feature.is_empty() => {
                Ok(Self::Feature(feature.to_string(), units(n)?))
            }
            _ => Ok(Self::All(units(s)?)),
        }
    }
}

/// Where a feature's units purchased come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `--purchased`.
    Given,
    /// The pool the logs show: every log holding the feature says its pool was full.
    Log,
    /// The calibration: the smallest pool where the oracle denies at most 1.5 %.
    Calibrated,
}

impl Source {
    /// For the human table.
    pub fn describe(self) -> &'static str {
        match self {
            Source::Given => "--purchased",
            Source::Log => "the log's pool",
            Source::Calibrated => "calibrated",
        }
    }
}

/// How to turn logs into an estate.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Sites by host pattern; `None`: by host-name stem.
    pub site_map: Option<SiteMap>,
    /// Only these features (all when empty).
    pub features: Vec<String>,
    /// Units purchased, overriding the logs and the calibration.
    pub purchased: Vec<Purchase>,
}

/// The estate the logs describe, as a workload every policy runs on.
#[derive(Debug, Clone)]
pub struct Estate {
    /// Arrivals, sites, products (features) and purchases.
    pub workload: Workload,
    /// The logs, in the order given.
    pub files: Vec<String>,
    /// Per product: where its purchase comes from.
    pub sources: Vec<Source>,
    /// Per product: checkouts replayed.
    pub product_checkouts: Vec<u64>,
    /// Per site: checkouts replayed.
    pub site_checkouts: Vec<u64>,
    /// The log clock (ms, local time read as UTC) of simulated time 0: the first day's midnight.
    pub start_ms: i64,
    /// What the operator should know about the estate (e.g. only one site).
    pub warnings: Vec<String>,
}

/// Peak units in use at once, over checkouts.
fn peak_in_use<'a>(checkouts: impl Iterator<Item = &'a Checkout>) -> u64 {
    let mut edges: Vec<(i64, i64)> = Vec::new();
    for c in checkouts {
        let units = i64::from(c.units.max(1));
        edges.push((c.start, units));
        edges.push((c.end.max(c.start + SECOND as i64), -units));
    }
    // A checkin before a checkout of the same second.
    edges.sort_unstable();
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak.max(0) as u64
}

/// The pool a feature's logs show, if every log holding the feature says its pool was full:
/// each log's pool is its peak in use, and pools count together while their logs overlap in
/// time (servers of one estate) but not across logs that follow each other (a rotated log).
fn logged_pool(logs: &[Log], feature: &str) -> Option<u64> {
    let mut edges: Vec<(i64, i64)> = Vec::new();
    for log in logs {
        let p = &log.parsed;
        let held = p.checkouts.iter().filter(|c| c.feature == feature);
        if held.clone().next().is_none() {
            continue;
        }
        if !p.pool_full.contains(feature) {
            return None;
        }
        let pool = peak_in_use(held) as i64;
        let (from, to) = p.span.unwrap_or((0, 0));
        edges.push((from, pool));
        edges.push((to.max(from + 1), -pool));
    }
    edges.sort_unstable();
    let (mut now, mut best) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        best = best.max(now);
    }
    (best > 0).then_some(best as u64)
}

/// Up to `n` items, then how many more.
fn some_of(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        let _ = write!(s, " … ({} more)", items.len() - n);
    }
    s
}

/// Builds the estate of several logs: features become products (busiest first), hosts become
/// sites, checkouts arrive and are held as logged.
pub fn estate(logs: &[Log], opts: &Options) -> Result<Estate, Error> {
    if logs.is_empty() {
        return Err(Error::new("no log given"));
    }
    let mut by_feature: BTreeMap<&str, u64> = BTreeMap::new();
    for c in logs.iter().flat_map(|l| &l.parsed.checkouts) {
        *by_feature.entry(&c.feature).or_default() += 1;
    }
    let all: Vec<String> = by_feature.keys().map(|f| f.to_string()).collect();
    let unknown = |f: &str| {
        let near = all.iter().find(|x| x.eq_ignore_ascii_case(f));
        let hint = near.map_or(String::new(), |x| format!("; did you mean `{x}`?"));
        Error::new(format!(
            "feature `{f}` is in none of the logs (features: {}){hint}",
            some_of(&all, 12)
        ))
    };
    for f in &opts.features {
        if !by_feature.contains_key(f.as_str()) {
            return Err(unknown(f));
        }
    }
    let mut features: Vec<(&str, u64)> = by_feature
        .into_iter()
        .filter(|(f, _)| opts.features.is_empty() || opts.features.iter().any(|x| x == f))
        .collect();
    features.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if features.len() > usize::from(u16::MAX) {
        return Err(Error::new(format!(
            "{} features: at most {} can be replayed (name some with --feature)",
            features.len(),
            u16::MAX
        )));
    }
    let product_of: HashMap<&str, u16> = features
        .iter()
        .enumerate()
        .map(|(i, f)| (f.0, i as u16))
        .collect();
    for p in &opts.purchased {
        if let Purchase::Feature(f, _) = p
            && !product_of.contains_key(f.as_str())
        {
            if all.contains(f) {
                return Err(Error::new(format!(
                    "--purchased {f}=…: feature `{f}` is not replayed (not named by --feature)"
                )));
            }
            return Err(unknown(f));
        }
    }

    // Sites.
    let mut checkouts: Vec<&Checkout> = logs
        .iter()
        .flat_map(|l| &l.parsed.checkouts)
        .filter(|c| product_of.contains_key(c.feature.as_str()))
        .collect();
    checkouts.sort_by(|a, b| {
        (a.start, &a.feature, &a.user, &a.host).cmp(&(b.start, &b.feature, &b.user, &b.host))
    });
    let mut site_names: Vec<String> = Vec::with_capacity(checkouts.len());
    let mut unmatched: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &checkouts {
        let site = match &opts.site_map {
            Some(map) => match map.site_of(&c.user, &c.host) {
                Some(s) => s.to_string(),
                None => {
                    *unmatched.entry(&c.host).or_default() += 1;
                    String::new()
                }
            },
            None => default_site(&c.host),
        };
        site_names.push(site);
    }
    if let (Some(map), false) = (&opts.site_map, unmatched.is_empty()) {
        let hosts: Vec<String> = unmatched
            .iter()
            .map(|(h, n)| {
                let h = if h.is_empty() { "(no host)" } else { h };
                let s = if *n == 1 { "" } else { "s" };
                format!("{h} ({n} checkout{s})")
            })
            .collect();
        return Err(Error::at(
            &map.origin,
            None,
            format!(
                "{} host(s) match no pattern: {}; add rules, or end the map with `* SITE` for the rest",
                hosts.len(),
                some_of(&hosts, 5)
            ),
        ));
    }
    let mut by_site: BTreeMap<&str, u64> = BTreeMap::new();
    for s in &site_names {
        *by_site.entry(s).or_default() += 1;
    }
    let mut sites: Vec<(&str, u64)> = by_site.into_iter().collect();
    sites.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if sites.len() > usize::from(u16::MAX) {
        return Err(Error::new(format!(
            "{} sites: at most {} (group hosts with --site-map)",
            sites.len(),
            u16::MAX
        )));
    }
    let site_of: HashMap<&str, u16> = sites
        .iter()
        .enumerate()
        .map(|(i, s)| (s.0, i as u16))
        .collect();

    // Arrivals, from the first day's midnight.
    let first = checkouts.first().map_or(0, |c| c.start);
    let start_ms = first - first.rem_euclid(DAY as i64);
    let arrivals: Vec<Arrival> = checkouts
        .iter()
        .zip(&site_names)
        .map(|(c, site)| Arrival {
            at: (c.start - start_ms) as u64,
            site: site_of[site.as_str()],
            product: product_of[c.feature.as_str()],
            units: c.units.max(1),
            hold: ((c.end - c.start) as u64).max(SECOND),
        })
        .collect();
    let mut arrivals = arrivals;
    arrivals.sort_by_key(|a| (a.at, a.site, a.product));
    let duration = arrivals.iter().map(|a| a.at + a.hold).max().unwrap_or(DAY);

    // Purchases.
    let given_all = opts.purchased.iter().rev().find_map(|p| match p {
        Purchase::All(n) => Some(*n),
        Purchase::Feature(..) => None,
    });
    let given = |f: &str| {
        opts.purchased
            .iter()
            .rev()
            .find_map(|p| match p {
                Purchase::Feature(x, n) if x == f => Some(*n),
                _ => None,
            })
            .or(given_all)
    };
    let mut calibrated: Option<Vec<u64>> = None;
    let mut purchased = Vec::with_capacity(features.len());
    let mut sources = Vec::with_capacity(features.len());
    for (i, (f, _)) in features.iter().enumerate() {
        let (units, source) = if let Some(n) = given(f) {
            (n, Source::Given)
        } else if let Some(n) = logged_pool(logs, f) {
            (n, Source::Log)
        } else {
            let c = calibrated
                .get_or_insert_with(|| calibrate(&arrivals, features.len(), ORACLE_TARGET));
            (c[i], Source::Calibrated)
        };
        purchased.push(units);
        sources.push(source);
    }

    let mut warnings = Vec::new();
    if sites.len() == 1 {
        warnings.push(format!(
            "every host is on one site ({}): one pool, nothing to balance; give --site-map to split the estate",
            sites[0].0
        ));
    }
    let files: Vec<String> = logs.iter().map(|l| l.path.clone()).collect();
    let products: Vec<String> = features.iter().map(|f| f.0.to_string()).collect();
    let workload = Workload {
        name: "replay".into(),
        description: format!(
            "replay of {} checkouts of {} features from {} FlexNet log(s) on {} sites",
            arrivals.len(),
            products.len(),
            files.len(),
            sites.len()
        ),
        sites: sites
            .iter()
            .map(|s| Site {
                name: s.0.to_string(),
                utc_offset_minutes: 0,
            })
            .collect(),
        products,
        purchased,
        duration,
        arrivals,
        faults: Vec::new(),
        step: None,
    };
    Ok(Estate {
        workload,
        files,
        sources,
        product_checkouts: features.iter().map(|f| f.1).collect(),
        site_checkouts: sites.iter().map(|s| s.1).collect(),
        start_ms,
        warnings,
    })
}

/// One policy's figures over the replay: a row of the table, an object of `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyRow {
    /// The policy (`oracle`, `allot`, a baseline).
    pub policy: String,
    /// Checkout attempts (the logged checkouts).
    pub checkouts: u64,
    /// Checkouts denied.
    pub denied: u64,
    /// denied / checkouts, in percent.
    pub denied_percent: f64,
    /// denied_percent − the oracle's, in percentage points.
    pub excess_pp: f64,
    /// Denied while enough free units sat elsewhere (other sites or the reserve), in percent of
    /// checkouts.
    pub false_denied_percent: f64,
    /// Units × hours of the denied checkouts.
    pub unserved_seat_hours: f64,
    /// Checkouts that waited on an instant balance, in percent of checkouts.
    pub waited_percent: f64,
    /// 99th percentile of those waits, ms.
    pub wait_p99_ms: u64,
    /// Units moved (each release and each grant counts).
    pub units_moved: u64,
    /// units_moved / checkouts.
    pub units_moved_per_checkout: f64,
    /// Units moved back within an hour of moving the other way, in percent of units moved.
    pub ping_pong_percent: f64,
    /// Messages between sites and the balancer.
    pub transactions: u64,
    /// Over-grants + negative reserves + conservation breaks (must be 0).
    pub safety_violations: u64,
}

/// Rounded to 6 decimals, so JSON shows no float noise.
fn r6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

impl PolicyRow {
    /// The row of one run; `oracle_rate` is the oracle's denial rate.
    pub fn new(m: &Metrics, oracle_rate: f64) -> Self {
        Self {
            policy: m.policy.clone(),
            checkouts: m.checkouts,
            denied: m.denials,
            denied_percent: r6(m.denial_rate() * 100.0),
            excess_pp: r6((m.denial_rate() - oracle_rate) * 100.0),
            false_denied_percent: r6(ratio(m.false_denials_all, m.checkouts) * 100.0),
            unserved_seat_hours: r6(m.unserved_seat_hours),
            waited_percent: r6(ratio(m.waited, m.checkouts) * 100.0),
            wait_p99_ms: m.wait_p99_ms,
            units_moved: m.units_moved,
            units_moved_per_checkout: r6(ratio(m.units_moved, m.checkouts)),
            ping_pong_percent: r6(ratio(m.ping_pong_units, m.units_moved) * 100.0),
            transactions: m.transactions,
            safety_violations: m.violations.total(),
        }
    }
}

/// Every policy's row, in the order of the runs (the oracle's excess is 0).
pub fn rows(r: &Results) -> Vec<PolicyRow> {
    let oracle = r.get("oracle").map_or(0.0, Metrics::denial_rate);
    r.runs.iter().map(|m| PolicyRow::new(m, oracle)).collect()
}

/// Dates of the log clock, for humans.
fn date(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |d| d.format("%Y-%m-%d").to_string())
}

/// The human report: the estate, then one row per policy, then the verdict.
pub fn table(e: &Estate, rows: &[PolicyRow]) -> String {
    let w = &e.workload;
    let mut s = String::new();
    let days = w.duration as f64 / DAY as f64;
    let _ = writeln!(
        s,
        "Replay of {}: {} checkouts of {} feature(s) on {} site(s), {} → {} ({days:.1} days).",
        some_of(&e.files, 4),
        w.arrivals.len(),
        w.products.len(),
        w.sites.len(),
        date(e.start_ms),
        date(e.start_ms + w.duration as i64),
    );
    let sites: Vec<String> = w
        .sites
        .iter()
        .zip(&e.site_checkouts)
        .map(|(site, n)| format!("{} {n}", site.name))
        .collect();
    let _ = writeln!(s, "Sites (checkouts): {}.", some_of(&sites, 10));
    let products: Vec<String> = w
        .products
        .iter()
        .zip(&w.purchased)
        .zip(&e.sources)
        .map(|((f, n), src)| format!("{f} {n} ({})", src.describe()))
        .collect();
    let _ = writeln!(s, "Units purchased: {}.\n", some_of(&products, 10));
    let head = [
        "policy",
        "denied %",
        "excess pp",
        "false %",
        "waited %",
        "p99 wait ms",
        "moved/checkout",
        "ping-pong %",
        "safety",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.policy.clone(),
                format!("{:.2}", r.denied_percent),
                format!("{:+.2}", r.excess_pp),
                format!("{:.2}", r.false_denied_percent),
                format!("{:.2}", r.waited_percent),
                r.wait_p99_ms.to_string(),
                format!("{:.3}", r.units_moved_per_checkout),
                format!("{:.1}", r.ping_pong_percent),
                r.safety_violations.to_string(),
            ]
        })
        .collect();
    let width: Vec<usize> = (0..head.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |s: &mut String, c: &[&str]| {
        let mut out = format!("{:<w$}", c[0], w = width[0]);
        for (i, x) in c.iter().enumerate().skip(1) {
            let _ = write!(out, "  {x:>w$}", w = width[i]);
        }
        let _ = writeln!(s, "{}", out.trim_end());
    };
    line(&mut s, &head);
    for c in &cells {
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        line(&mut s, &c);
    }
    let oracle = rows.iter().find(|r| r.policy == "oracle");
    let allot = rows.iter().find(|r| r.policy == "allot");
    let best = rows
        .iter()
        .filter(|r| r.policy != "oracle" && !is_allot(&r.policy))
        .min_by(|a, b| a.denied.cmp(&b.denied));
    if let (Some(o), Some(a)) = (oracle, allot) {
        let _ = write!(
            s,
            "\nallot denies {:.2} % of checkouts, {:+.2} pp over one central pool ({:.2} %)",
            a.denied_percent, a.excess_pp, o.denied_percent
        );
        if let Some(b) = best {
            let _ = write!(
                s,
                "; the best baseline, {}, {:+.2} pp",
                b.policy, b.excess_pp
            );
        }
        let _ = writeln!(
            s,
            ". It moves {:.3} units per checkout; {:.2} % of checkouts wait on an instant balance.",
            a.units_moved_per_checkout, a.waited_percent
        );
    }
    let unsafe_runs: u64 = rows.iter().map(|r| r.safety_violations).sum();
    if unsafe_runs > 0 {
        let _ = writeln!(s, "SAFETY VIOLATIONS: {unsafe_runs} (must be 0: a bug).");
    }
    s
}

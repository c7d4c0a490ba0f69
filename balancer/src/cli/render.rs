//! How the admin CLI shows answers to people: one table renderer ([`table`]) that every
//! listing goes through, each listing's columns as a [`Row`], and the few answers that read
//! better as lines than as a table (a schedule, the advisor's advice). `--json` bypasses all of
//! it ([`output`]).

use crate::store::ShardLeader;
use allot_core::wire::balancer::{
    AllocationView, AuditEntry, DoctorCell, Entitlement, ExplainedCell, HistoryPoint,
    HistorySeries, MoveView, Product, RunDecision, RunDetail, RunSummary, Schedule, Server,
};
use allot_core::wire::records::{RenewalRow, UsageRow};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

/// One line of a listing: its column titles and its cells, so every listing is drawn by the
/// same [`table`].
pub(super) trait Row {
    /// The column titles, in order.
    const HEADER: &'static [&'static str];
    /// This row's cells, in the order of [`Row::HEADER`].
    fn cells(&self) -> Vec<String>;
}

/// The one table renderer of the CLI: `rows` under their header, in one comfy-table style.
pub(super) fn table<'a, R: Row + 'a>(rows: impl IntoIterator<Item = &'a R>) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(R::HEADER.to_vec());
    for row in rows {
        table.add_row(row.cells());
    }
    table
}

impl Row for ShardLeader {
    const HEADER: &'static [&'static str] = &["shard", "epoch", "leader", "since"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.shard.to_string(),
            self.epoch.to_string(),
            Some(self.url.clone())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "-".into()),
            opt(&self.taken_at),
        ]
    }
}

/// An optional value, or `-`.
fn opt<T: ToString>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

/// Prints `value` as JSON or through `human`.
pub(super) fn output<T: Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

impl Row for Product {
    const HEADER: &'static [&'static str] = &[
        "product",
        "enforcement",
        "seat",
        "purchased",
        "allocated",
        "in transit",
        "reserve",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.policy.enforcement.to_string(),
            self.policy.seat.to_string(),
            self.purchased.to_string(),
            self.allocated.to_string(),
            self.in_transit.to_string(),
            self.reserve.to_string(),
        ]
    }
}

impl Row for AllocationView {
    const HEADER: &'static [&'static str] = &[
        "server",
        "site",
        "state",
        "allocation",
        "in use",
        "min",
        "buffer",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.server.clone(),
            self.site.clone(),
            self.state.to_string(),
            self.allocation.to_string(),
            opt(&self.in_use),
            self.min_units.to_string(),
            self.buffer_units.to_string(),
        ]
    }
}

/// When an entitlement stops counting, as an administrator reads it: never, the date with the
/// days left, or — expired — how many of its units are still in use.
fn expiry(e: &Entitlement, now: chrono::DateTime<chrono::Utc>) -> String {
    match e.expires_at {
        None => "never".into(),
        Some(at) if at > now => {
            let days = (at - now).num_days();
            format!("{} ({days} days left)", at.format("%Y-%m-%d"))
        }
        Some(at) => format!(
            "{} (expired; {} of {} units still in use)",
            at.format("%Y-%m-%d"),
            e.units.saturating_sub(e.retired_units),
            e.units
        ),
    }
}

impl Row for Entitlement {
    const HEADER: &'static [&'static str] = &[
        "id",
        "product",
        "units",
        "expires",
        "reference",
        "added",
        "by",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.product.clone(),
            self.units.to_string(),
            expiry(self, chrono::Utc::now()),
            opt(&self.reference),
            self.created_at.to_rfc3339(),
            self.created_by.clone(),
        ]
    }
}

impl Row for Server {
    const HEADER: &'static [&'static str] = &[
        "server",
        "site",
        "state",
        "url",
        "last seen",
        "old token until",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.site.clone(),
            self.state.to_string(),
            self.url.clone(),
            opt(&self.last_seen_at.map(|t| t.to_rfc3339())),
            opt(&self.previous_token_until.map(|t| t.to_rfc3339())),
        ]
    }
}

impl Row for allot_core::wire::agent::Holder {
    const HEADER: &'static [&'static str] = &[
        "server",
        "product",
        "user",
        "host",
        "groups",
        "units",
        "state",
        "since",
        "last heartbeat",
        "id",
    ];
    fn cells(&self) -> Vec<String> {
        let state = match self.state {
            allot_core::wire::agent::HolderState::Held if self.overdraft => "held (overdraft)",
            allot_core::wire::agent::HolderState::Held => "held",
            allot_core::wire::agent::HolderState::Waiting => "waiting",
            allot_core::wire::agent::HolderState::Borrowed => "borrowed",
            allot_core::wire::agent::HolderState::Lingering => "lingering",
        };
        let time = |t: &Option<chrono::DateTime<chrono::Utc>>| {
            opt(&t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        };
        vec![
            self.server.clone(),
            self.product.clone(),
            self.user.clone(),
            self.host.clone(),
            if self.groups.is_empty() {
                "-".into()
            } else {
                self.groups.join(",")
            },
            self.units.to_string(),
            state.into(),
            time(&self.granted_at.or(self.waiting_since).or(self.until)),
            time(&self.last_heartbeat),
            self.id.clone(),
        ]
    }
}

impl Row for AuditEntry {
    const HEADER: &'static [&'static str] = &["id", "at", "actor", "action", "target", "after"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.at.to_rfc3339(),
            self.actor.clone(),
            self.action.clone(),
            self.target.clone(),
            opt(&self.after.as_ref().map(|v| v.to_string())),
        ]
    }
}

impl Row for RunSummary {
    const HEADER: &'static [&'static str] = &[
        "run",
        "trigger",
        "status",
        "started",
        "ms",
        "servers",
        "unreachable",
        "moves",
        "units",
        "unserved false/true",
        "ping-pong",
    ];
    fn cells(&self) -> Vec<String> {
        let ms = self
            .finished_at
            .map(|f| (f - self.started_at).num_milliseconds().to_string())
            .unwrap_or_else(|| "-".into());
        vec![
            self.id.to_string(),
            self.trigger.to_string(),
            self.status.clone(),
            self.started_at.to_rfc3339(),
            ms,
            self.servers_queried.to_string(),
            self.servers_unreachable.to_string(),
            self.moves.to_string(),
            self.units_moved.to_string(),
            format!("{}/{}", self.unserved_false, self.unserved_true),
            self.ping_pong_units.to_string(),
        ]
    }
}

impl Row for MoveView {
    const HEADER: &'static [&'static str] = &[
        "move", "kind", "product", "server", "units", "state", "applied",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.kind.to_string(),
            self.product.clone(),
            self.server.clone(),
            self.units.to_string(),
            self.state.to_string(),
            opt(&self.applied_units),
        ]
    }
}

impl Row for DoctorCell {
    const HEADER: &'static [&'static str] = &[
        "server",
        "books",
        "books gen",
        "server",
        "server gen",
        "in use",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.server.clone(),
            self.store_allocation.to_string(),
            self.store_generation.to_string(),
            opt(&self.server_allocation),
            opt(&self.server_generation),
            opt(&self.in_use),
        ]
    }
}

impl Row for ExplainedCell {
    const HEADER: &'static [&'static str] = &[
        "server", "alloc", "in use", "waiting", "peak", "denials", "level", "forecast", "window",
        "min", "buffer", "need", "want", "fair", "target", "decision",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.server.clone(),
            self.allocation.to_string(),
            self.in_use.to_string(),
            self.waiting.to_string(),
            self.peak_in_use.to_string(),
            self.denials.to_string(),
            self.level.to_string(),
            self.forecast.to_string(),
            opt(&self.window_peak),
            self.min_units.to_string(),
            self.buffer_units.to_string(),
            self.need.to_string(),
            self.want.to_string(),
            self.fair_share.to_string(),
            self.target.to_string(),
            if self.held {
                format!("{} (held)", self.decision)
            } else {
                self.decision.clone()
            },
        ]
    }
}

/// One group of a usage report.
impl Row for UsageRow {
    const HEADER: &'static [&'static str] = &[
        "key",
        "checkouts",
        "hours",
        "peak",
        "denied (true)",
        "denied (false)",
        "denied (other)",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.key.clone(),
            self.checkouts.to_string(),
            format!("{:.1}", self.hours),
            self.peak_concurrent.to_string(),
            self.denials_true.to_string(),
            self.denials_false.to_string(),
            self.denials_other.to_string(),
        ]
    }
}

/// One product at renewal.
impl Row for RenewalRow {
    const HEADER: &'static [&'static str] = &[
        "product",
        "purchased",
        "peak",
        "p95",
        "mean",
        "h at cap",
        "denied (true / false)",
        "never used",
        "suggestion",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.product.clone(),
            self.purchased.to_string(),
            self.peak.to_string(),
            self.p95.to_string(),
            format!("{:.1}", self.average),
            format!("{:.1}", self.hours_at_cap),
            format!("{} / {}", self.denials_true, self.denials_false),
            self.never_used.to_string(),
            self.suggestion.clone(),
        ]
    }
}

/// A run's decision: the product, then the same columns as `explain`.
impl Row for RunDecision {
    const HEADER: &'static [&'static str] = &[
        "product", "server", "alloc", "in use", "waiting", "peak", "denials", "level", "forecast",
        "window", "min", "buffer", "need", "want", "fair", "target", "decision",
    ];
    fn cells(&self) -> Vec<String> {
        let mut cells = vec![self.product.clone()];
        cells.extend(self.cell.cells());
        cells
    }
}

/// A history series as sparklines: peak in use over allocation (on one scale), denials,
/// instant balances and units moved (each on its own), with the totals of ping-pong and of
/// units left unserved while free elsewhere (the balancer's own failures).
impl Row for HistorySeries {
    const HEADER: &'static [&'static str] = &[
        "product",
        "server",
        "site",
        "in use (peak) vs allocation",
        "denials",
        "instant",
        "moved (ping-pong)",
        "unserved true / false",
    ];
    fn cells(&self) -> Vec<String> {
        let peaks: Vec<u64> = self
            .points
            .iter()
            .map(|p| p.peak_in_use.max(p.in_use_max))
            .collect();
        let allocations: Vec<u64> = self.points.iter().map(|p| p.allocation_max).collect();
        let scale = peaks.iter().chain(&allocations).copied().max().unwrap_or(0);
        let denials: Vec<u64> = self.points.iter().map(|p| p.denials).collect();
        let instant: Vec<u64> = self.points.iter().map(|p| p.instant_requests).collect();
        let moved: Vec<u64> = self
            .points
            .iter()
            .map(|p| p.units_granted + p.units_released)
            .collect();
        let sum = |f: fn(&HistoryPoint) -> u64| self.points.iter().map(f).sum::<u64>();
        vec![
            self.product.clone(),
            self.server.clone(),
            self.site.clone(),
            format!(
                "{}  max {}\n{}  max {}",
                sparkline(&peaks, scale),
                peaks.iter().max().unwrap_or(&0),
                sparkline(&allocations, scale),
                allocations.iter().max().unwrap_or(&0)
            ),
            format!(
                "{} Σ{}",
                sparkline(&denials, 0),
                denials.iter().sum::<u64>()
            ),
            format!(
                "{} Σ{}",
                sparkline(&instant, 0),
                instant.iter().sum::<u64>()
            ),
            format!(
                "{} Σ{} ({})",
                sparkline(&moved, 0),
                moved.iter().sum::<u64>(),
                sum(|p| p.ping_pong_units)
            ),
            format!(
                "{} / {}",
                sum(|p| p.unserved_true),
                sum(|p| p.unserved_false)
            ),
        ]
    }
}

/// A run: its summary, its move log and its errors.
pub(super) fn print_run(detail: &RunDetail) {
    println!("{}", table(std::slice::from_ref(&detail.run)));
    println!("{}", table(&detail.move_log));
    if !detail.decisions.is_empty() {
        println!("why (every server not left steady):");
        println!("{}", table(&detail.decisions));
    }
    for e in &detail.run.errors {
        println!("! {e}");
    }
}

/// The schedule and its next runs.
pub(super) fn print_schedule(s: &Schedule) {
    println!("cron:     {}", s.cron);
    println!("timezone: {}", s.timezone);
    println!("next runs:");
    for run in &s.next_runs {
        println!("  {}", run.to_rfc3339());
    }
}

/// A unicode sparkline of `values`, scaled to `scale` (the series' own maximum when 0).
pub fn sparkline(values: &[u64], scale: u64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = if scale == 0 {
        values.iter().copied().max().unwrap_or(0)
    } else {
        scale
    };
    values
        .iter()
        .map(|&v| {
            if top == 0 {
                BARS[0]
            } else {
                let level = (v.min(top) * 7).div_ceil(top);
                BARS[usize::try_from(level).unwrap_or(7).min(7)]
            }
        })
        .collect()
}

/// Quotes a CSV field when it holds a comma, a quote or a line break.
pub(super) fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// The advisor's advice: the schedule's, then each cell's, with evidence and effect.
pub(super) fn print_advice(advice: &allot_core::advisor::Advice) {
    use allot_core::advisor::Action;
    let s = &advice.schedule;
    match s.action {
        Action::Keep => println!("schedule: keep {} ({})", s.current.cron, s.current.timezone),
        Action::Change => println!(
            "schedule: {} ({}) → {} ({}), {} runs a day",
            s.current.cron,
            s.current.timezone,
            s.recommended.cron,
            s.recommended.timezone,
            s.recommended.runs_per_day
        ),
    }
    for e in &s.evidence {
        println!("  evidence: {}", e.text);
    }
    for e in &s.expected_effect {
        println!("  expected: {}", e.text);
    }
    let changes: Vec<_> = advice
        .cells
        .iter()
        .filter(|c| c.action == Action::Change)
        .collect();
    if changes.is_empty() {
        println!("cells: no change");
    }
    for c in changes {
        println!(
            "{} / {}: min {} → {}, buffer {} → {}",
            c.server,
            c.product,
            c.current.min_units,
            c.recommended.min_units,
            c.current.buffer_units,
            c.recommended.buffer_units
        );
        for e in &c.evidence {
            println!("  evidence: {}", e.text);
        }
        for e in &c.expected_effect {
            println!("  expected: {}", e.text);
        }
    }
    for note in &advice.notes {
        println!("note: {note}");
    }
}

/// A product's options-file rules, one per line, as `product show` and `product set` print
/// them (nothing when every option is off).
pub fn print_options(options: &allot_core::domain::Options) {
    for l in &options.limits {
        println!("limit    {}:{} = {}", l.scope, l.name, l.max);
    }
    for r in &options.reservations {
        println!("reserve  {}:{} = {}", r.scope, r.name, r.units);
    }
    for p in &options.priorities {
        println!("priority {} = {}", p.group, p.priority);
    }
    let seconds = [
        ("linger", options.linger_seconds, " s"),
        ("borrow", options.max_borrow_hours, " h at most"),
        ("idle notify", options.idle_notify_seconds, " s"),
        ("idle revoke", options.idle_revoke_seconds, " s"),
    ];
    for (what, value, unit) in seconds {
        if value > 0 {
            println!("{what:<8} {value}{unit}");
        }
    }
    if options.linger_yields {
        println!("lingering units yield to waiting clients");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_says_days_left_or_what_is_still_in_use() {
        let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut e = Entitlement {
            id: 1,
            product: "cad".into(),
            units: 6,
            retired_units: 0,
            expires_at: None,
            reference: None,
            created_at: now,
            created_by: "admin".into(),
        };
        assert_eq!(expiry(&e, now), "never");
        e.expires_at = Some(now + chrono::Duration::days(29) + chrono::Duration::hours(1));
        assert!(
            expiry(&e, now).ends_with("(29 days left)"),
            "{}",
            expiry(&e, now)
        );
        e.expires_at = Some(now - chrono::Duration::hours(1));
        e.retired_units = 4;
        assert!(expiry(&e, now).ends_with("(expired; 2 of 6 units still in use)"));
    }

    #[test]
    fn sparklines_scale_to_the_series() {
        assert_eq!(super::sparkline(&[0, 4, 8], 0), "▁▅█");
        assert_eq!(super::sparkline(&[0, 0], 0), "▁▁");
        assert_eq!(super::sparkline(&[2], 8), "▃");
        assert_eq!(super::csv_field("a,b"), "\"a,b\"");
    }
}

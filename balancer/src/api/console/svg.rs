//! Charts as inline SVG, drawn on the server from the history: no chart library, no script,
//! nothing to load. Colours come from the stylesheet (classes), so dark mode applies.

use allot_core::wire::balancer::History;
use std::collections::BTreeMap;
use std::fmt::Write;

const WIDTH: f64 = 400.0;
const HEIGHT: f64 = 150.0;
const LEFT: f64 = 30.0;
const BOTTOM: f64 = 16.0;
/// The height of the tallest denials bar.
const DENIAL_BAR: f64 = 30.0;

/// One product's history summed over its servers: in use (peak), allocation (mean), the
/// reserve it leaves (`purchased` − allocation, with today's purchases) and denials, over
/// `buckets` steps of the window.
pub fn chart(history: &History, purchased: u64, buckets: u64) -> String {
    let from = history.from.timestamp_millis();
    let to = history.to.timestamp_millis().max(from + 1);
    let mut sums: BTreeMap<i64, (f64, f64, u64)> = BTreeMap::new();
    for series in &history.series {
        for p in &series.points {
            let slot = sums.entry(p.at.timestamp_millis()).or_default();
            slot.0 += p.peak_in_use as f64;
            slot.1 += p.allocation_mean;
            slot.2 += p.denials;
        }
    }
    let top = sums
        .values()
        .map(|(used, allocated, _)| used.max(*allocated))
        .fold(purchased as f64, f64::max)
        .max(1.0);
    let most_denials = sums.values().map(|s| s.2).max().unwrap_or(0).max(1) as f64;
    let x = |at: i64| LEFT + (at - from) as f64 / (to - from) as f64 * (WIDTH - LEFT - 4.0);
    let y = |v: f64| (HEIGHT - BOTTOM) - v / top * (HEIGHT - BOTTOM - 8.0);
    // Steps: each bucket's value holds across the bucket, so a lone sample still shows.
    let step_ms = i64::try_from(history.step_seconds)
        .unwrap_or(3600)
        .saturating_mul(1000)
        .max(1);
    let line = |pick: &dyn Fn(&(f64, f64, u64)) -> f64| {
        sums.iter()
            .map(|(at, s)| {
                let v = y(pick(s));
                let end = (*at + step_ms).min(to);
                format!("{:.1},{v:.1} {:.1},{v:.1}", x(*at), x(end))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-label=\"{} samples; peak in use {:.0}, top of scale {top:.0}\">",
        sums.len(),
        sums.values().map(|s| s.0).fold(0.0, f64::max)
    );
    let base = HEIGHT - BOTTOM;
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{base}\" x2=\"{WIDTH}\" y2=\"{base}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"8\" x2=\"{LEFT}\" y2=\"{base}\"/>\
         <text x=\"2\" y=\"14\">{top:.0}</text><text x=\"2\" y=\"{base}\">0</text>\
         <text x=\"{LEFT}\" y=\"{HEIGHT}\">{}</text>\
         <text x=\"{}\" y=\"{HEIGHT}\" text-anchor=\"end\">{}</text>",
        history.from.format("%m-%d %H:%M"),
        WIDTH - 4.0,
        history.to.format("%m-%d %H:%M"),
    );
    if sums.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no samples in this window</text>",
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
    }
    let bar = ((WIDTH - LEFT) / buckets.max(1) as f64 * 0.6).max(1.0);
    for (at, (_, _, denials)) in sums.iter().filter(|(_, s)| s.2 > 0) {
        let h = *denials as f64 / most_denials * DENIAL_BAR;
        let _ = write!(
            svg,
            "<rect class=\"denials\" x=\"{:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\"/>",
            x(*at),
            base - h
        );
    }
    let _ = write!(
        svg,
        "<polyline class=\"allocation\" points=\"{}\"/>\
         <polyline class=\"reserve\" points=\"{}\"/>\
         <polyline class=\"in-use\" points=\"{}\"/></svg>",
        line(&|s| s.1),
        line(&|s| (purchased as f64 - s.1).max(0.0)),
        line(&|s| s.0),
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_core::wire::balancer::{HistoryPoint, HistorySeries};
    use chrono::Utc;

    #[test]
    fn a_chart_draws_each_series_and_marks_an_empty_window() {
        let to = Utc::now();
        let from = to - chrono::Duration::hours(24);
        let mut history = History {
            from,
            to,
            step_seconds: 3600,
            series: vec![],
        };
        assert!(chart(&history, 10, 24).contains("no samples"));
        let point: HistoryPoint = serde_json::from_value(serde_json::json!({
            "at": from + chrono::Duration::hours(2), "samples": 1, "allocation_mean": 4.0,
            "allocation_max": 4, "in_use_mean": 2.0, "in_use_max": 3, "peak_in_use": 3,
            "checkouts": 5, "denials": 2, "overdrafts": 0, "staleouts": 0, "waiting_max": 0,
            "instant_requests": 0, "units_granted": 0, "units_released": 0,
            "ping_pong_units": 0, "unserved_true": 0, "unserved_false": 0
        }))
        .expect("a history point");
        history.series.push(HistorySeries {
            server: "paris".into(),
            site: "eu".into(),
            product: "cad".into(),
            points: vec![point],
        });
        let svg = chart(&history, 10, 24);
        for class in ["in-use", "allocation", "reserve", "denials"] {
            assert!(
                svg.contains(&format!("class=\"{class}\"")),
                "{class}: {svg}"
            );
        }
        assert!(!svg.contains("style="), "no inline style under the CSP");
    }
}

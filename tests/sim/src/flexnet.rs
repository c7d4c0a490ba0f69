//! Replay of real checkout logs: a parser for FlexNet (lmgrd) debug logs and the mapping of
//! their users' hosts to sites, so any site's real logs can drive the simulator.
//!
//! Event lines carry only `H:MM:SS`; the date comes from `TIMESTAMP m/d/yyyy` lines, the
//! `started on … (m/d/yyyy)` and `Start-Date: Www Mmm dd yyyy` lines, and midnight roll-over (a
//! time of day more than an hour earlier than the previous line's). `OUT:` and `IN:` may carry
//! `(N licenses)`; an `IN:` closes the oldest open checkout of the same feature, user and host. A
//! server (re)start drops every held license. `DENIED:` lines are logged twice per attempt and
//! clients retry, so denials are counted as episodes: one per (feature, user, host) per minute.

use crate::workload::{Arrival, DAY, ORACLE_TARGET, SECOND, Site, Workload, calibrate};
use chrono::NaiveDate;
use std::collections::{BTreeMap, HashMap};

/// One checkout reconstructed from a log: an `OUT:` paired with its `IN:` (or a restart, or
/// the end of the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The feature (product) name.
    pub feature: String,
    /// The user.
    pub user: String,
    /// The host the program ran on.
    pub host: String,
    /// Units taken (`(N licenses)`, else 1).
    pub units: u32,
    /// Checkout time, ms since the Unix epoch (the log's local time read as UTC).
    pub start: i64,
    /// Checkin time, same clock.
    pub end: i64,
}

/// What a log holds.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// Every checkout, by start time.
    pub checkouts: Vec<Checkout>,
    /// Denial episodes (not lines).
    pub denial_episodes: u64,
    /// Server starts seen (each drops every held license).
    pub restarts: u64,
    /// `IN:` lines with no open checkout to close.
    pub unmatched_in: u64,
}

fn parse_mdy(s: &str) -> Option<NaiveDate> {
    let mut it = s.split('/');
    let m = it.next()?.trim().parse().ok()?;
    let d = it.next()?.trim().parse().ok()?;
    let y = it.next()?.trim().parse().ok()?;
    NaiveDate::from_ymd_opt(y, m, d)
}

/// The date in `Start-Date: Thu Jun 09 2022 …` or `Date and Time: Thu Jun 09 2022 …`.
fn parse_long_date(s: &str) -> Option<NaiveDate> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let month = |m: &str| {
        [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|x| *x == m)
        .map(|i| i as u32 + 1)
    };
    words.windows(3).find_map(|w| {
        let m = month(w[0])?;
        let d = w[1].parse().ok()?;
        let y = w[2].parse().ok()?;
        NaiveDate::from_ymd_opt(y, m, d)
    })
}

/// `H:MM:SS (daemon) rest` → (seconds of day, daemon, rest).
fn split_line(line: &str) -> Option<(u32, &str, &str)> {
    let line = line.trim_start();
    let (time, rest) = line.split_once(' ')?;
    let mut t = time.split(':');
    let h: u32 = t.next()?.parse().ok()?;
    let m: u32 = t.next()?.parse().ok()?;
    let s: u32 = t.next()?.parse().ok()?;
    let rest = rest.strip_prefix('(')?;
    let (daemon, rest) = rest.split_once(") ")?;
    Some((h * 3600 + m * 60 + s, daemon, rest))
}

/// `"feature" user@host  (N licenses) (REASON)` → (feature, user, host, units).
fn parse_event(rest: &str) -> Option<(&str, &str, &str, u32)> {
    let rest = rest.trim_start().strip_prefix('"')?;
    let (feature, rest) = rest.split_once('"')?;
    let rest = rest.trim_start();
    let (who, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (user, host) = who.split_once('@').unwrap_or((who, ""));
    let units = tail
        .split('(')
        .filter_map(|x| {
            x.split_once(" licenses)")
                .or_else(|| x.split_once(" license)"))
        })
        .find_map(|(n, _)| n.trim().parse().ok())
        .unwrap_or(1);
    Some((feature, user, host, units))
}

/// Parses a FlexNet debug log; lines it does not understand are skipped.
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let mut date: Option<NaiveDate> = None;
    let mut last_tod = 0u32;
    let mut open: HashMap<(String, String, String), Vec<(i64, u32)>> = HashMap::new();
    let mut last_denied: HashMap<(String, String, String), i64> = HashMap::new();
    let mut last_start_line = None;
    let stamp = |date: NaiveDate, tod: u32| {
        date.and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis()
            + i64::from(tod) * 1000
    };
    for line in text.lines() {
        let Some((tod, daemon, rest)) = split_line(line) else {
            continue;
        };
        // Dates: explicit lines set it, otherwise a backwards jump is midnight.
        let explicit = if let Some(d) = rest.strip_prefix("TIMESTAMP ") {
            parse_mdy(d.trim())
        } else if rest.contains("Start-Date:") || rest.contains("Date and Time:") {
            parse_long_date(rest)
        } else if rest.contains("started on") {
            rest.rsplit_once('(')
                .and_then(|(_, d)| parse_mdy(d.trim_end_matches(')')))
        } else {
            None
        };
        if let Some(d) = explicit {
            date = Some(d);
        } else if let Some(d) = date
            && tod + 3600 < last_tod
        {
            date = d.succ_opt();
        }
        last_tod = tod;
        let Some(day) = date else { continue };
        let now = stamp(day, tod);
        if rest.contains("started on") && daemon == "lmgrd" {
            // One restart per lmgrd start line (the vendor daemon's "Server started" follows).
            if last_start_line != Some(now) {
                out.restarts += 1;
                last_start_line = Some(now);
            }
            for ((feature, user, host), held) in open.drain() {
                for (start, units) in held {
                    out.checkouts.push(Checkout {
                        feature: feature.clone(),
                        user: user.clone(),
                        host: host.clone(),
                        units,
                        start,
                        end: now.max(start),
                    });
                }
            }
        } else if let Some(ev) = rest.strip_prefix("OUT: ") {
            if let Some((f, u, h, n)) = parse_event(ev) {
                open.entry((f.into(), u.into(), h.into()))
                    .or_default()
                    .push((now, n));
            }
        } else if let Some(ev) = rest.strip_prefix("IN: ") {
            if let Some((f, u, h, n)) = parse_event(ev) {
                let key = (f.to_string(), u.to_string(), h.to_string());
                let held = open.get_mut(&key);
                match held {
                    Some(v) if !v.is_empty() => {
                        let i = v.iter().position(|x| x.1 == n).unwrap_or(0);
                        let (start, units) = v.remove(i);
                        out.checkouts.push(Checkout {
                            feature: key.0,
                            user: key.1,
                            host: key.2,
                            units,
                            start,
                            end: now.max(start),
                        });
                    }
                    _ => out.unmatched_in += 1,
                }
            }
        } else if let Some(ev) = rest.strip_prefix("DENIED: ")
            && let Some((f, u, h, _)) = parse_event(ev)
        {
            let key = (f.to_string(), u.to_string(), h.to_string());
            let prev = last_denied.insert(key, now);
            if prev.is_none_or(|t| now - t > 60_000) {
                out.denial_episodes += 1;
            }
        }
    }
    let end = out.checkouts.iter().map(|c| c.end).max().unwrap_or(0);
    for ((feature, user, host), held) in open {
        for (start, units) in held {
            out.checkouts.push(Checkout {
                feature: feature.clone(),
                user: user.clone(),
                host: host.clone(),
                units,
                start,
                end: end.max(start),
            });
        }
    }
    out.checkouts.sort_by(|a, b| {
        (a.start, &a.feature, &a.user, &a.host).cmp(&(b.start, &b.feature, &b.user, &b.host))
    });
    out
}

/// The coarse group a host belongs to: the `s<hash>` part of a pseudonymised `s<hash>-h<n>`, or
/// the host name without its trailing digits.
pub fn host_stem(host: &str) -> &str {
    if let Some((stem, rest)) = host.split_once('-')
        && stem.starts_with('s')
        && rest.starts_with('h')
    {
        return stem;
    }
    host.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// Builds a replay workload: features ranked by checkouts become products (the first
/// `max_products`), host groups become sites — the busiest `sites − 1` groups each get one and
/// the rest share the last; a log with fewer groups than sites spreads hosts by name instead.
/// Purchases are sized so the one-pool oracle denies about 1.5 %.
pub fn replay(name: &str, parsed: &Parsed, sites: usize, max_products: usize) -> Workload {
    let mut by_feature: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_stem: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &parsed.checkouts {
        *by_feature.entry(&c.feature).or_default() += 1;
        *by_stem.entry(host_stem(&c.host)).or_default() += 1;
    }
    let mut features: Vec<(&str, usize)> = by_feature.into_iter().collect();
    features.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    features.truncate(max_products);
    let product_of: HashMap<&str, u16> = features
        .iter()
        .enumerate()
        .map(|(i, f)| (f.0, i as u16))
        .collect();
    let mut stems: Vec<(&str, usize)> = by_stem.into_iter().collect();
    stems.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let by_host = stems.len() < sites;
    let site_of_stem: HashMap<&str, u16> = stems
        .iter()
        .enumerate()
        .map(|(i, s)| (s.0, i.min(sites - 1) as u16))
        .collect();
    let site_of = |host: &str| -> u16 {
        if by_host {
            let h = host.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            (h % sites as u64) as u16
        } else {
            site_of_stem[host_stem(host)]
        }
    };
    let t0 = parsed
        .checkouts
        .first()
        .map(|c| c.start - c.start.rem_euclid(DAY as i64))
        .unwrap_or(0);
    let mut arrivals: Vec<Arrival> = parsed
        .checkouts
        .iter()
        .filter_map(|c| {
            let product = *product_of.get(c.feature.as_str())?;
            Some(Arrival {
                at: (c.start - t0) as u64,
                site: site_of(&c.host),
                product,
                units: c.units.max(1),
                hold: ((c.end - c.start) as u64).max(SECOND),
            })
        })
        .collect();
    arrivals.sort_by_key(|a| (a.at, a.site, a.product));
    let duration = arrivals.iter().map(|a| a.at + a.hold).max().unwrap_or(DAY);
    let products: Vec<String> = features.iter().map(|f| f.0.to_string()).collect();
    let purchased = calibrate(&arrivals, products.len(), ORACLE_TARGET);
    Workload {
        name: name.into(),
        description: format!(
            "replay of {} checkouts of {} features from a real FlexNet log, {} host groups on {} sites",
            arrivals.len(),
            products.len(),
            stems.len(),
            sites
        ),
        sites: (0..sites)
            .map(|s| Site {
                name: format!("site-{s}"),
                utc_offset_minutes: 0,
            })
            .collect(),
        products,
        purchased,
        duration,
        arrivals,
        faults: Vec::new(),
        step: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXCERPT: &str = "\
 1:56:05 (lmgrd) FlexNet Licensing (v11.12.0.0 build 136775 x64_n6) started on SERVER01 (IBM PC) (3/30/2016)
 9:57:01 (adskflex) OUT: \"64300ACD_F\" USER04@COMPUTER05  
 9:57:01 (adskflex) OUT: \"aa_r_hpc\" u0001@scc73-h0001  (32 licenses) 
10:40:07 (adskflex) IN: \"64300ACD_F\" USER04@COMPUTER05  (INACTIVE)
23:59:00 (adskflex) OUT: \"64300ACD_F\" USER07@COMPUTER04  
 0:10:00 (adskflex) IN: \"64300ACD_F\" USER07@COMPUTER04  
 0:11:00 (adskflex) DENIED: \"64300ACD_F\" USER09@COMPUTER08  (Licensed number of users already reached. (-4,342))
 0:11:00 (adskflex) DENIED: \"64300ACD_F\" USER09@COMPUTER08  (Licensed number of users already reached. (-4,342))
 7:56:05 (lmgrd) TIMESTAMP 4/2/2016
 8:00:00 (adskflex) IN: \"nobody\" USER01@COMPUTER01  
 9:00:00 (lmgrd) FlexNet Licensing (v11.12.0.0 build 136775 x64_n6) started on SERVER01 (IBM PC) (4/2/2016)
";

    #[test]
    fn pairs_out_and_in_and_rolls_over_midnight() {
        let p = parse(EXCERPT);
        assert_eq!(p.checkouts.len(), 3);
        let first = &p.checkouts[0];
        assert_eq!(first.feature, "64300ACD_F");
        assert_eq!(first.end - first.start, (43 * 60 + 6) * 1000);
        let night = p.checkouts.iter().find(|c| c.user == "USER07").unwrap();
        assert_eq!(
            night.end - night.start,
            11 * 60 * 1000,
            "midnight roll-over"
        );
        assert_eq!(p.denial_episodes, 1, "two DENIED lines are one episode");
        assert_eq!(p.unmatched_in, 1);
        assert_eq!(p.restarts, 2);
    }

    #[test]
    fn restart_drops_held_licenses_and_reads_units() {
        let p = parse(EXCERPT);
        let hpc = p
            .checkouts
            .iter()
            .find(|c| c.feature == "aa_r_hpc")
            .unwrap();
        assert_eq!(hpc.units, 32);
        // Held from 3/30 09:57:01 until the restart on 4/2 09:00:00.
        let start = NaiveDate::from_ymd_opt(2016, 3, 30)
            .unwrap()
            .and_hms_opt(9, 57, 1)
            .unwrap();
        let end = NaiveDate::from_ymd_opt(2016, 4, 2)
            .unwrap()
            .and_hms_opt(9, 0, 0)
            .unwrap();
        assert_eq!(hpc.start, start.and_utc().timestamp_millis());
        assert_eq!(hpc.end, end.and_utc().timestamp_millis());
    }

    #[test]
    fn host_stems_group_pseudonymised_hosts() {
        assert_eq!(host_stem("s068f-h0001"), "s068f");
        assert_eq!(host_stem("COMPUTER05"), "COMPUTER");
        assert_eq!(host_stem("scc73-h0001"), "scc73");
    }
}

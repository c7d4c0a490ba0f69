//! Replay of real checkout logs: a parser for FlexNet (lmgrd) debug logs and the mapping of
//! their users' hosts to sites, so any site's real logs can drive the simulator.
//!
//! Event lines carry only `H:MM:SS`; the date comes from `TIMESTAMP m/d/yyyy` lines, the
//! `started on … (m/d/yyyy)` and `Start-Date: Www Mmm dd yyyy` lines, and midnight roll-over (a
//! time of day more than an hour earlier than the previous line's). `OUT:` and `IN:` may carry
//! `(N licenses)`; an `IN:` closes the oldest open checkout of the same feature, user and host. A
//! server (re)start drops every held license. `DENIED:` lines are logged twice per attempt and
//! clients retry, so denials are counted as episodes: one per (feature, user, host) per minute.
//!
//! [`parse`] is lenient (the benchmarks' replays); [`parse_checked`] reads a log from an
//! unknown source (`allot-sim replay`) and reports binary data, malformed records, a cut last
//! line and logs without checkouts, naming the line.

use crate::workload::{Arrival, DAY, ORACLE_TARGET, SECOND, Site, Workload, calibrate};
use chrono::NaiveDate;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// Features the log shows at their limit: a `DENIED:` saying the licensed number of users
    /// was reached (FlexNet error -4), or a `QUEUED:` client.
    pub pool_full: BTreeSet<String>,
    /// Lines of the `H:MM:SS (daemon) …` shape.
    pub record_lines: u64,
    /// Event lines (`OUT:`, `IN:`, `DENIED:`, `QUEUED:`) before the first date line: skipped.
    pub undated_events: u64,
    /// The first of them (1-based).
    pub first_undated_line: Option<usize>,
    /// Time of the first and the last dated line, ms (same clock as [`Checkout::start`]).
    pub span: Option<(i64, i64)>,
    /// [`parse_checked`]: the last line, skipped because the file ended in it without a
    /// newline and it is not a whole record (cut mid-write).
    pub truncated_line: Option<usize>,
    /// [`parse_checked`]: lines that were not UTF-8, read as Latin-1.
    pub latin1_lines: u64,
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

/// `"feature" user@host  (N licenses) (REASON)` → (feature, user, host, units). A user name may
/// hold spaces (`José Juan u0006@host`): the host is the word after the last `@` before the
/// first `(`, the user everything before that `@`.
fn parse_event(rest: &str) -> Option<(&str, &str, &str, u32)> {
    let rest = rest.trim_start().strip_prefix('"')?;
    let (feature, rest) = rest.split_once('"')?;
    let (who, tail) = rest.split_at(rest.find('(').unwrap_or(rest.len()));
    let who = who.trim();
    let (user, host) = match who.rsplit_once('@') {
        Some((user, host)) => (
            user.trim_end(),
            host.split_whitespace().next().unwrap_or(""),
        ),
        None => (who, ""),
    };
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

/// Why a log could not be read ([`parse_checked`]): the 1-based line when one line is the
/// cause, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The offending line (1-based), if one line is the cause.
    pub line: Option<usize>,
    /// What is wrong, for a human.
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ParseError {}

type Key = (String, String, String);

/// The parser's state between lines.
#[derive(Default)]
struct Parser {
    out: Parsed,
    date: Option<NaiveDate>,
    last_tod: u32,
    open: HashMap<Key, Vec<(i64, u32)>>,
    last_denied: HashMap<Key, i64>,
    last_start_line: Option<i64>,
}

fn stamp(date: NaiveDate, tod: u32) -> i64 {
    date.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis()
        + i64::from(tod) * 1000
}

/// What a `DENIED:` / `QUEUED:` reason says when the pool was full.
fn pool_full_reason(rest: &str) -> bool {
    rest.contains("users already reached") || rest.contains("(-4,")
}

impl Parser {
    /// Reads one line (`n` is 1-based). Lines that are not records (`H:MM:SS (daemon) …`) are
    /// skipped; a record line of an event (`OUT:`, `IN:`, `DENIED:`, `QUEUED:`) that does not
    /// parse is an error when `strict`, and skipped otherwise.
    fn line(&mut self, n: usize, line: &str, strict: bool) -> Result<(), ParseError> {
        let Some((tod, daemon, rest)) = split_line(line) else {
            return Ok(());
        };
        self.out.record_lines += 1;
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
            self.date = Some(d);
        } else if let Some(d) = self.date
            && tod + 3600 < self.last_tod
        {
            self.date = d.succ_opt();
        }
        self.last_tod = tod;
        let event = ["OUT:", "IN:", "DENIED:", "QUEUED:"]
            .into_iter()
            .find_map(|tag| Some((tag, rest.strip_prefix(tag)?)));
        let parsed_event = event.map(|(tag, ev)| (tag, parse_event(ev)));
        if let Some((tag, None)) = parsed_event {
            if strict {
                return Err(ParseError {
                    line: Some(n),
                    message: format!(
                        "malformed {tag} record (expected `{tag} \"feature\" user@host`): {}",
                        line.trim()
                    ),
                });
            }
            return Ok(());
        }
        let Some(day) = self.date else {
            if parsed_event.is_some() {
                self.out.undated_events += 1;
                self.out.first_undated_line.get_or_insert(n);
            }
            return Ok(());
        };
        let now = stamp(day, tod);
        let span = self.out.span.get_or_insert((now, now));
        span.0 = span.0.min(now);
        span.1 = span.1.max(now);
        let out = &mut self.out;
        match parsed_event {
            _ if rest.contains("started on") && daemon == "lmgrd" => {
                // One restart per lmgrd start line (the vendor daemon's "Server started" follows).
                if self.last_start_line != Some(now) {
                    out.restarts += 1;
                    self.last_start_line = Some(now);
                }
                for ((feature, user, host), held) in self.open.drain() {
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
            }
            Some(("OUT:", Some((f, u, h, units)))) => {
                self.open
                    .entry((f.into(), u.into(), h.into()))
                    .or_default()
                    .push((now, units));
            }
            Some(("IN:", Some((f, u, h, units)))) => {
                let key = (f.to_string(), u.to_string(), h.to_string());
                match self.open.get_mut(&key) {
                    Some(v) if !v.is_empty() => {
                        let i = v.iter().position(|x| x.1 == units).unwrap_or(0);
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
            Some(("DENIED:", Some((f, u, h, _)))) => {
                if pool_full_reason(rest) {
                    out.pool_full.insert(f.to_string());
                }
                let key = (f.to_string(), u.to_string(), h.to_string());
                let prev = self.last_denied.insert(key, now);
                if prev.is_none_or(|t| now - t > 60_000) {
                    out.denial_episodes += 1;
                }
            }
            Some(("QUEUED:", Some((f, _, _, _)))) => {
                // A client queued: no unit was free.
                out.pool_full.insert(f.to_string());
            }
            _ => {}
        }
        Ok(())
    }

    /// Closes what is still open at the end of the log (at the last checkin seen) and sorts.
    fn finish(self) -> Parsed {
        let mut out = self.out;
        let end = out.checkouts.iter().map(|c| c.end).max().unwrap_or(0);
        for ((feature, user, host), held) in self.open {
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
}

/// Parses a FlexNet debug log; lines it does not understand are skipped. See
/// [`parse_checked`] for a log from an unknown source.
pub fn parse(text: &str) -> Parsed {
    let mut p = Parser::default();
    for (i, line) in text.lines().enumerate() {
        let _ = p.line(i + 1, line, false);
    }
    p.finish()
}

/// One raw line as text: an error for binary data (NUL or another control byte but tab, CR and
/// form feed); bytes that are not UTF-8 are read as Latin-1 (Windows servers write local
/// time-zone and user names in their code page).
fn decode<'a>(n: usize, raw: &'a [u8], latin1: &mut u64) -> Result<Cow<'a, str>, ParseError> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let binary = |b: u8| (b < 0x20 && !matches!(b, b'\t' | b'\r' | 0x0c)) || b == 0x7f;
    if let Some(col) = raw.iter().position(|&b| binary(b)) {
        let nuls = raw.iter().filter(|&&b| b == 0).count();
        let hint = if nuls * 3 >= raw.len() {
            " (UTF-16 text? convert it first: iconv -f UTF-16 -t UTF-8)"
        } else {
            ""
        };
        return Err(ParseError {
            line: Some(n),
            message: format!(
                "binary data (byte 0x{:02x} at column {}): not a FlexNet debug log{hint}",
                raw[col],
                col + 1
            ),
        });
    }
    Ok(match std::str::from_utf8(raw) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            *latin1 += 1;
            Cow::Owned(raw.iter().map(|&b| char::from(b)).collect())
        }
    })
}

/// Whether a last line without its newline is a whole record: of the `H:MM:SS (daemon) …`
/// shape and, for an event, a `"feature" user@host` ending as lmgrd ends every event line
/// (with the blanks after the host or a closing parenthesis).
fn complete(line: &str) -> bool {
    let Some((_, _, rest)) = split_line(line) else {
        return false;
    };
    match ["OUT:", "IN:", "DENIED:", "QUEUED:"]
        .into_iter()
        .find_map(|tag| rest.strip_prefix(tag))
    {
        Some(ev) => {
            parse_event(ev).is_some_and(|(_, _, host, _)| !host.is_empty())
                && (ev.ends_with(char::is_whitespace) || ev.ends_with(')'))
        }
        None => true,
    }
}

/// Parses a FlexNet debug log from an unknown source, checking it: binary data (a NUL or
/// another control byte; gzip; UTF-16) and a malformed `OUT:` / `IN:` / `DENIED:` / `QUEUED:`
/// record are errors naming the line; a log with no FlexNet line, or no dated `OUT:` line, is
/// an error. A last line without its newline that is not a whole record was cut mid-write: it
/// is skipped, and [`Parsed::truncated_line`] names it. (A cut right after a whole word of a
/// host name cannot be told from a whole line: lmgrd ends every event line with blanks or a
/// parenthesis, which such a cut lacks, so a cut event is caught; a cut in other lines is
/// harmless.) Lines that are not UTF-8 are read as Latin-1
/// ([`Parsed::latin1_lines`]). Event lines before the first date line are skipped
/// ([`Parsed::undated_events`]).
pub fn parse_checked(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let whole = |message: &str| ParseError {
        line: None,
        message: message.into(),
    };
    if bytes.is_empty() {
        return Err(whole("empty file"));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(whole(
            "gzip-compressed data, not a text log: decompress it first (gunzip / zcat)",
        ));
    }
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(whole(
            "UTF-16 text: convert it first (iconv -f UTF-16 -t UTF-8)",
        ));
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // "a\nb\n" splits into a, b and an empty tail; a non-empty tail has no newline: it was cut.
    let cut = lines.pop().filter(|tail| !tail.is_empty());
    let mut p = Parser::default();
    let mut latin1 = 0;
    for (i, raw) in lines.iter().enumerate() {
        let line = decode(i + 1, raw, &mut latin1)?;
        p.line(i + 1, &line, true)?;
    }
    if let Some(raw) = cut {
        let n = lines.len() + 1;
        let line = decode(n, raw, &mut latin1)?;
        if complete(&line) {
            p.line(n, &line, true)?;
        } else if p.out.record_lines == 0 {
            return Err(ParseError {
                line: Some(n),
                message: "cut mid-record (no newline at the end of the file), and no complete \
                          FlexNet line before it"
                    .into(),
            });
        } else {
            p.out.truncated_line = Some(n);
        }
    }
    p.out.latin1_lines = latin1;
    if p.out.record_lines == 0 {
        return Err(whole(
            "no FlexNet debug-log line: not an lmgrd log (its lines look like \
             ` 9:57:01 (daemon) OUT: \"feature\" user@host`)",
        ));
    }
    let parsed = p.finish();
    if parsed.checkouts.is_empty() {
        return Err(match parsed.first_undated_line {
            Some(n) => ParseError {
                line: Some(n),
                message: "event before any date line (TIMESTAMP m/d/yyyy, `started on … \
                          (m/d/yyyy)` or Start-Date:), and no dated OUT: line in the log"
                    .into(),
            },
            None => whole("no checkouts: the log has no OUT: line"),
        });
    }
    Ok(parsed)
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

//! Local-time arithmetic and small statistics shared by the advisor's rules.
//!
//! The core has no time-zone database, so a place's clock is a fixed offset from UTC: either the
//! one the caller resolved (it has `chrono-tz`) or one read from a zone string that is itself a
//! fixed offset (`UTC`, `+02:00`, `UTC-5`). Anything else is read as UTC and said so.

/// Milliseconds in a minute.
pub(crate) const MINUTE_MS: i64 = 60_000;
/// Milliseconds in a day.
pub(crate) const DAY_MS: i64 = 86_400_000;
/// Minutes in a day.
pub(crate) const DAY_MINUTES: u32 = 1440;

/// A fixed UTC offset in minutes, and a note when the zone could not be resolved.
pub(crate) fn resolve_offset(offset: Option<i32>, zone: Option<&str>) -> (i32, Option<String>) {
    if let Some(minutes) = offset {
        return (minutes.clamp(-18 * 60, 18 * 60), None);
    }
    match zone.map(str::trim) {
        None | Some("") => (0, None),
        Some(text) => match parse_fixed_offset(text) {
            Some(minutes) => (minutes, None),
            None => (
                0,
                Some(format!(
                    "zone {text:?} has no UTC offset given and is not a fixed offset; read as UTC \
                     (pass utc_offset_minutes)"
                )),
            ),
        },
    }
}

/// `UTC`, `GMT`, `Z`, `Etc/UTC`, `+02:00`, `-0530`, `+2`, `UTC+2`, `UTC-05:30` → minutes east.
fn parse_fixed_offset(text: &str) -> Option<i32> {
    let upper = text.to_ascii_uppercase();
    let rest = ["ETC/UTC", "ETC/GMT", "UTC", "GMT", "Z"]
        .iter()
        .find_map(|prefix| upper.strip_prefix(prefix))
        .unwrap_or(&upper);
    if rest.is_empty() {
        return Some(0);
    }
    let (sign, digits) = match rest.as_bytes()[0] {
        b'+' => (1, &rest[1..]),
        b'-' => (-1, &rest[1..]),
        _ => return None,
    };
    if !digits.bytes().all(|b| b.is_ascii_digit() || b == b':') {
        return None;
    }
    let (hours, minutes) = match digits.split_once(':') {
        Some((h, m)) => (h, m),
        None if digits.len() == 4 => digits.split_at(2),
        None => (digits, "0"),
    };
    let hours: i32 = hours.parse().ok().filter(|h| *h <= 18)?;
    let minutes: i32 = minutes.parse().ok().filter(|m| *m < 60)?;
    Some(sign * (hours * 60 + minutes))
}

/// Days since 1970-01-01 on the local calendar of a place `offset` minutes east of UTC.
pub(crate) fn local_day(at_ms: i64, offset: i32) -> i64 {
    (at_ms + i64::from(offset) * MINUTE_MS).div_euclid(DAY_MS)
}

/// Minute of the local day (0..1440).
pub(crate) fn local_minute(at_ms: i64, offset: i32) -> u32 {
    ((at_ms + i64::from(offset) * MINUTE_MS).rem_euclid(DAY_MS) / MINUTE_MS) as u32
}

/// Monday = 0 … Sunday = 6 for a local day number (1970-01-01 was a Thursday).
pub(crate) fn weekday(day: i64) -> u32 {
    (day + 3).rem_euclid(7) as u32
}

/// The UTC instant of a local day's minute.
pub(crate) fn instant(day: i64, minute: u32, offset: i32) -> i64 {
    day * DAY_MS + i64::from(minute) * MINUTE_MS - i64::from(offset) * MINUTE_MS
}

/// A minute of day moved from one clock to another.
pub(crate) fn convert_minute(minute: u32, from_offset: i32, to_offset: i32) -> u32 {
    (i64::from(minute) - i64::from(from_offset) + i64::from(to_offset))
        .rem_euclid(i64::from(DAY_MINUTES)) as u32
}

/// `HH:MM` for a minute of day.
pub(crate) fn hhmm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// `UTC+01:00`-style label of an offset.
pub(crate) fn offset_label(offset: i32) -> String {
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    format!("UTC{sign}{:02}:{:02}", abs / 60, abs % 60)
}

/// Nearest-rank percentile of unsorted values (`p` in 0..=100); `None` when empty.
pub(crate) fn percentile(values: &[u32], p: u32) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (u64::from(p.min(100)) * sorted.len() as u64).div_ceil(100) as usize;
    Some(sorted[rank.max(1) - 1])
}

/// The lower median of unsorted values; `None` when empty.
pub(crate) fn lower_median(values: &[u32]) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    Some(sorted[(sorted.len() - 1) / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_offsets_parse_and_names_fall_back_to_utc() {
        assert_eq!(resolve_offset(None, Some("UTC")), (0, None));
        assert_eq!(resolve_offset(None, Some("+02:00")).0, 120);
        assert_eq!(resolve_offset(None, Some("UTC-05:30")).0, -330);
        assert_eq!(resolve_offset(None, Some("-0800")).0, -480);
        assert_eq!(resolve_offset(None, Some("GMT+1")).0, 60);
        assert_eq!(resolve_offset(Some(60), Some("Europe/Paris")), (60, None));
        assert_eq!(resolve_offset(None, Some("+a€")).0, 0);
        assert_eq!(resolve_offset(None, Some("UTC+25")).0, 0);
        let (minutes, note) = resolve_offset(None, Some("Europe/Paris"));
        assert_eq!(minutes, 0);
        assert!(note.unwrap().contains("Europe/Paris"));
    }

    #[test]
    fn local_calendar_arithmetic() {
        // 1970-01-05 was a Monday.
        assert_eq!(weekday(4), 0);
        let at = instant(10, 9 * 60, 60);
        assert_eq!(local_day(at, 60), 10);
        assert_eq!(local_minute(at, 60), 540);
        assert_eq!(local_minute(at, 0), 480);
        assert_eq!(convert_minute(30, 60, 0), 1410);
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 95), Some(5));
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 20), Some(1));
        assert_eq!(lower_median(&[4, 1, 3, 2]), Some(2));
    }
}

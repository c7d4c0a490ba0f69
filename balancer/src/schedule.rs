//! The balance schedule: a standard cron expression read in an IANA time zone.
//!
//! Parsed with `croner` (5 fields, or 6 with seconds first; `1-5` is Monday–Friday; DST gaps
//! and overlaps handled), so an operator's `0 7 * * 1-5` in `Europe/Paris` runs at 07:00 Paris
//! time on weekdays, summer and winter.

use allot_core::validate::Invalid;
use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Year};

/// A validated schedule, ready to compute run times.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    timezone: chrono_tz::Tz,
}

impl Schedule {
    /// Parses `expression` in `timezone` (UTC when absent); errors carry the parser's message.
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Self, Invalid> {
        if expression.len() > 256 {
            return Err(Invalid::new("cron", "must be at most 256 bytes"));
        }
        let cron = CronParser::builder()
            .year(Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| Invalid::new("cron", format!("{expression:?}: {e}")))?;
        let timezone = match timezone {
            None => chrono_tz::UTC,
            Some(name) => name.parse::<chrono_tz::Tz>().map_err(|_| {
                Invalid::new("timezone", format!("unknown IANA time zone {name:?}"))
            })?,
        };
        Ok(Self { cron, timezone })
    }

    /// The time zone's IANA name.
    pub fn timezone_name(&self) -> &'static str {
        self.timezone.name()
    }

    /// The next `count` run times strictly after `after`.
    pub fn next_runs(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        self.cron
            .iter_after(after.with_timezone(&self.timezone))
            .take(count)
            .map(|t| t.with_timezone(&Utc))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    #[test]
    fn weekdays_mean_monday_to_friday_in_the_given_zone() {
        let schedule = Schedule::parse("0 7 * * 1-5", Some("Europe/Paris")).unwrap();
        // Saturday 2026-11-21 12:00 UTC → next runs Monday..Friday 07:00 Paris (06:00 UTC).
        let runs = schedule.next_runs(Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(), 5);
        let days: Vec<_> = runs.iter().map(|t| t.weekday()).collect();
        assert_eq!(
            days,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        assert!(runs.iter().all(|t| t.hour() == 6 && t.minute() == 0));
    }

    #[test]
    fn a_run_inside_a_dst_gap_is_not_skipped() {
        // 02:30 does not exist in Paris on 2026-03-29; the run still happens that day.
        let schedule = Schedule::parse("30 2 * * *", Some("Europe/Paris")).unwrap();
        let runs = schedule.next_runs(Utc.with_ymd_and_hms(2026, 3, 28, 12, 0, 0).unwrap(), 2);
        assert_eq!(runs[0].day(), 29);
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_the_field() {
        assert_eq!(
            Schedule::parse("61 * * * *", None).unwrap_err().field,
            "cron"
        );
        assert_eq!(Schedule::parse("* * *", None).unwrap_err().field, "cron");
        assert_eq!(
            Schedule::parse("* * * * *", Some("Mars/Olympus"))
                .unwrap_err()
                .field,
            "timezone"
        );
        assert!(Schedule::parse("*/10 * * * * *", None).is_ok());
    }
}

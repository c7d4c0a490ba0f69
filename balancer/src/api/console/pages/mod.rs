//! The console's pages and changes. Reads go through the API's handlers (or the store and
//! engine functions behind them); every change calls the API handler that makes it, so the
//! console validates and audits exactly as the JSON API does.

mod checkouts;
mod entitlements;
mod estate;
mod operators;
mod product;
mod runs;
mod schedule;
mod servers;
mod usage;

pub(super) use checkouts::*;
pub(super) use entitlements::*;
pub(super) use estate::*;
pub(super) use operators::*;
pub(super) use product::*;
pub(super) use runs::*;
pub(super) use schedule::*;
pub(super) use servers::*;
pub(super) use usage::*;

use super::{ConsoleError, Visitor};
use crate::api::Admin;
use chrono::{DateTime, Utc};

/// The read-only [`Admin`] a page reads the API's handlers as.
fn reader(visitor: &Visitor) -> Admin {
    Admin {
        actor: visitor.session.operator.clone(),
    }
}

/// Parameters for an API handler's query, from the console's own (a wrong one is `400`).
fn params<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ConsoleError> {
    serde_json::from_value(value).map_err(|e| ConsoleError::BadRequest(e.to_string()))
}

/// Whole days from `now` until `at`, rounded up (0 on the day, negative once past).
fn days_left(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let seconds = (at - now).num_seconds();
    seconds.div_euclid(86_400) + i64::from(seconds.rem_euclid(86_400) > 0)
}

/// A whole number of a form field, or `400` naming it.
fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<T, ConsoleError> {
    text.trim().parse().map_err(|_| {
        ConsoleError::BadRequest(format!("{field}: expected a whole number, got {text:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_left_round_up_and_go_negative() {
        let now = Utc::now();
        assert_eq!(days_left(now + chrono::Duration::hours(1), now), 1);
        assert_eq!(days_left(now + chrono::Duration::days(3), now), 3);
        assert_eq!(days_left(now, now), 0);
        assert_eq!(days_left(now - chrono::Duration::hours(25), now), -1);
    }
}

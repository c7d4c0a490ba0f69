//! Usage and denial records (issue 15): what every ended checkout and every denial leaves
//! behind for chargeback, renewal and audit. Metering servers keep them durably until the
//! balancer acknowledges a batch (`POST /v1/records`); the balancer stores them idempotently by
//! record id and answers the reports (`GET /v1/usage`, `GET /v1/usage/renewal`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// The most records one batch may carry, to bound a request's size and its transaction.
pub const MAX_BATCH: usize = 1_000;

/// How a checkout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    /// The client checked it in.
    Checkin,
    /// It missed its heartbeats past the staleout.
    Staleout,
    /// An administrator forced it back.
    Revoke,
    /// Idle past the product's idle-revoke time.
    Idle,
    /// The metering server restarted and could not keep it.
    Restart,
}

/// One ended checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    /// Chosen by the metering server; a record sent twice is stored once.
    pub id: Uuid,
    /// The product.
    pub product: String,
    /// Who held it.
    pub user: String,
    /// Where.
    pub host: String,
    /// The user's groups, as the client declared them.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Units held.
    pub units: u32,
    /// When it was granted.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
    /// How it ended.
    pub ended_by: EndedBy,
}

/// One denied checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DenialRecord {
    /// Chosen by the metering server; a record sent twice is stored once.
    pub id: Uuid,
    /// The product.
    pub product: String,
    /// Who was denied.
    pub user: String,
    /// Where.
    pub host: String,
    /// The user's groups, as the client declared them.
    #[serde(default)]
    pub groups: Vec<String>,
    /// When.
    pub at: DateTime<Utc>,
    /// The denial's stable code (`license_unavailable`, `forbidden`, …).
    pub reason: String,
    /// As the balancer classified the shortage when it answered the server's instant balance:
    /// `true` when units were free elsewhere (a false denial), `false` when none were (a true
    /// denial); absent when no balance was asked (a policy denial, or balancing unreachable).
    #[serde(default)]
    pub free_elsewhere: Option<bool>,
}

/// `POST /v1/records`: a batch of a metering server's records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecordBatch {
    /// Ended checkouts.
    #[serde(default)]
    pub usage: Vec<UsageRecord>,
    /// Denials.
    #[serde(default)]
    pub denials: Vec<DenialRecord>,
}

/// The balancer's acknowledgement: every record of the batch is stored (now or before), so the
/// server may forget them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordAck {
    /// Records stored by this call.
    pub stored: u64,
    /// Records already stored by an earlier call (a resend).
    pub duplicates: u64,
}

/// What a usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// Per user.
    User,
    /// Per group the user declared (a checkout counts in each of its groups).
    Group,
    /// Per host.
    Host,
    /// Per metering server.
    Server,
    /// Per site.
    Site,
    /// Per product.
    Product,
}

crate::domain::wire_enum_text! {
    EndedBy { Checkin = "checkin", Staleout = "staleout", Revoke = "revoke", Idle = "idle", Restart = "restart" }
    GroupBy { User = "user", Group = "group", Host = "host", Server = "server", Site = "site", Product = "product" }
}

/// One group's usage over a report's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    /// The user, group, host, server, site or product.
    pub key: String,
    /// Checkouts that overlapped the window.
    pub checkouts: u64,
    /// Unit-hours used inside the window.
    pub hours: f64,
    /// The most units the group held at once.
    pub peak_concurrent: u64,
    /// Denials while nothing was free anywhere (only buying helps).
    pub denials_true: u64,
    /// Denials while units were free elsewhere (the balancer's failures).
    pub denials_false: u64,
    /// Denials by policy (ACL, limits) or without a balancer's answer.
    pub denials_other: u64,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageReport {
    /// Start of the window.
    pub since: DateTime<Utc>,
    /// End of the window.
    pub until: DateTime<Utc>,
    /// What the rows are grouped by.
    pub group_by: GroupBy,
    /// One row per group, most hours first.
    pub rows: Vec<UsageRow>,
}

/// One product at renewal: what was bought against what was used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewalRow {
    /// The product.
    pub product: String,
    /// Units purchased now.
    pub purchased: u64,
    /// The most units in use at once in the window.
    pub peak: u64,
    /// Units in use at the 95th percentile of the window's time.
    pub p95: u64,
    /// Mean units in use over the window.
    pub average: f64,
    /// Hours with every purchased unit in use.
    pub hours_at_cap: f64,
    /// True denials in the window.
    pub denials_true: u64,
    /// False denials in the window.
    pub denials_false: u64,
    /// Units never in use in the window (purchased − peak).
    pub never_used: u64,
    /// What the figures suggest at renewal.
    pub suggestion: String,
}

/// `GET /v1/usage/renewal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewalReport {
    /// Start of the window.
    pub since: DateTime<Utc>,
    /// End of the window.
    pub until: DateTime<Utc>,
    /// One row per product.
    pub products: Vec<RenewalRow>,
}

/// The most groups one record may name.
pub const MAX_GROUPS: usize = 64;

impl RecordBatch {
    /// Checks a batch at the edge: its size, every name, every count and every time order, so
    /// a bad batch changes nothing and says which record is wrong.
    pub fn validate(&self) -> Result<(), crate::validate::Invalid> {
        use crate::validate::{Invalid, name, path_name, units};
        let total = self.usage.len() + self.denials.len();
        if total > MAX_BATCH {
            return Err(Invalid::new(
                "usage",
                format!("a batch holds at most {MAX_BATCH} records, got {total}"),
            ));
        }
        let groups = |field: &str, groups: &[String]| {
            if groups.len() > MAX_GROUPS {
                return Err(Invalid::new(
                    field,
                    format!("at most {MAX_GROUPS} groups, got {}", groups.len()),
                ));
            }
            groups.iter().try_for_each(|g| name(field, g))
        };
        for (i, r) in self.usage.iter().enumerate() {
            let at = |f: &str| format!("usage[{i}].{f}");
            path_name(&at("product"), &r.product)?;
            name(&at("user"), &r.user)?;
            name(&at("host"), &r.host)?;
            groups(&at("groups"), &r.groups)?;
            units(&at("units"), r.units)?;
            if r.ended_at < r.started_at {
                return Err(Invalid::new(
                    at("ended_at"),
                    "must not be before started_at",
                ));
            }
        }
        for (i, r) in self.denials.iter().enumerate() {
            let at = |f: &str| format!("denials[{i}].{f}");
            path_name(&at("product"), &r.product)?;
            name(&at("user"), &r.user)?;
            name(&at("host"), &r.host)?;
            groups(&at("groups"), &r.groups)?;
            name(&at("reason"), &r.reason)?;
        }
        Ok(())
    }
}

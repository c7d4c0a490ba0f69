//! Rows as the SQL returns them, and their conversion into domain and wire types.
//!
//! Shared by both backends: `sqlx::FromRow` derives are generic over the row type, so only the
//! queries themselves are compiled per backend.

use super::{CellRecord, MoveRecord, PreviousToken, ServerRecord, StoreError, StoreResult};
use allot_core::domain::{Acl, Options, Policy};
use allot_core::wire::balancer::{
    AllocationView, AuditEntry, Entitlement, MoveView, Product, RunSummary, Server,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The columns of [`ProductRow`], with the allocated sum computed alongside (a macro so that
/// queries stay `&'static str`, which sqlx requires of SQL it cannot audit).
macro_rules! product_columns {
    () => {
        "p.name, p.publisher, p.version, p.enforcement, \
    p.seat, p.heartbeat_seconds, p.staleout_seconds, p.acl, p.options, p.purchased, p.reserve, \
    p.in_transit, p.created_at, CAST(COALESCE((SELECT SUM(a.units) FROM allocations a \
    WHERE a.product_id = p.id), 0) AS BIGINT) AS allocated"
    };
}
pub(super) use product_columns;

/// The current time as stored: Unix epoch milliseconds.
pub(super) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A stored time back as a UTC instant.
pub(super) fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A stored count back as a count; negative values are prevented by CHECK constraints.
pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn parse<T: std::str::FromStr<Err = String>>(value: &str) -> StoreResult<T> {
    value.parse().map_err(StoreError::Corrupt)
}

#[derive(sqlx::FromRow)]
pub(super) struct ProductRow {
    pub name: String,
    pub publisher: Option<String>,
    pub version: Option<String>,
    pub enforcement: String,
    pub seat: String,
    pub heartbeat_seconds: i64,
    pub staleout_seconds: i64,
    pub acl: String,
    pub options: String,
    pub purchased: i64,
    pub reserve: i64,
    pub in_transit: i64,
    pub allocated: i64,
    pub created_at: i64,
}

impl ProductRow {
    pub fn into_product(self) -> StoreResult<Product> {
        let acl: Acl = serde_json::from_str(&self.acl)
            .map_err(|e| StoreError::Corrupt(format!("acl of {}: {e}", self.name)))?;
        let options: Options = serde_json::from_str(&self.options)
            .map_err(|e| StoreError::Corrupt(format!("options of {}: {e}", self.name)))?;
        Ok(Product {
            policy: Policy {
                enforcement: parse(&self.enforcement)?,
                seat: parse(&self.seat)?,
                heartbeat_seconds: u32::try_from(self.heartbeat_seconds).unwrap_or(u32::MAX),
                staleout_seconds: u32::try_from(self.staleout_seconds).unwrap_or(u32::MAX),
                acl,
                options,
            },
            name: self.name,
            publisher: self.publisher,
            version: self.version,
            purchased: count(self.purchased),
            reserve: count(self.reserve),
            in_transit: count(self.in_transit),
            allocated: count(self.allocated),
            created_at: time(self.created_at),
        })
    }
}

/// The columns of [`EntitlementRow`].
macro_rules! entitlement_columns {
    () => {
        "e.id, p.name AS product, e.units, e.retired, e.expires_at, \
    e.reference, e.created_at, e.created_by"
    };
}
pub(super) use entitlement_columns;

#[derive(sqlx::FromRow)]
pub(super) struct EntitlementRow {
    pub id: i64,
    pub product: String,
    pub units: i64,
    pub retired: i64,
    pub expires_at: Option<i64>,
    pub reference: Option<String>,
    pub created_at: i64,
    pub created_by: String,
}

impl From<EntitlementRow> for Entitlement {
    fn from(row: EntitlementRow) -> Self {
        Entitlement {
            id: row.id,
            product: row.product,
            units: count(row.units),
            retired_units: count(row.retired),
            expires_at: row.expires_at.map(time),
            reference: row.reference,
            created_at: time(row.created_at),
            created_by: row.created_by,
        }
    }
}

/// The columns of [`ServerRow`].
macro_rules! server_columns {
    () => {
        "s.id, s.name, s.url, s.site, s.state, s.created_at, \
    s.last_seen_at, s.token_salt, s.needs_reset, s.previous_token_salt, s.previous_token_until"
    };
}
pub(super) use server_columns;

#[derive(sqlx::FromRow)]
pub(super) struct ServerRow {
    pub id: i64,
    pub name: String,
    pub url: String,
    pub site: String,
    pub state: String,
    pub created_at: i64,
    pub last_seen_at: Option<i64>,
    pub token_salt: String,
    pub needs_reset: i64,
    pub previous_token_salt: Option<String>,
    pub previous_token_until: Option<i64>,
}

impl ServerRow {
    pub fn into_record(self) -> StoreResult<ServerRecord> {
        Ok(ServerRecord {
            state: parse(&self.state)?,
            name: self.name,
            url: self.url,
            site: self.site,
            token_salt: self.token_salt,
            previous_token: match (self.previous_token_salt, self.previous_token_until) {
                (Some(salt), Some(until)) => Some(PreviousToken {
                    salt,
                    until: time(until),
                }),
                _ => None,
            },
            needs_reset: self.needs_reset != 0,
            last_seen_at: self.last_seen_at.map(time),
            created_at: time(self.created_at),
        })
    }

    pub fn into_server(self) -> StoreResult<Server> {
        self.into_record().map(Server::from)
    }
}

/// The columns of [`CellRow`]; `in_use` comes from the newest usage sample of the cell.
macro_rules! cell_columns {
    () => {
        "s.name AS server, s.site, s.state, a.units, \
    a.min_units, a.buffer_units, a.generation, (SELECT u.in_use FROM usage_samples u \
    WHERE u.server_id = a.server_id AND u.product_id = a.product_id \
    ORDER BY u.at DESC LIMIT 1) AS in_use"
    };
}
pub(super) use cell_columns;

#[derive(sqlx::FromRow)]
pub(super) struct CellRow {
    pub server: String,
    pub site: String,
    pub state: String,
    pub units: i64,
    pub min_units: i64,
    pub buffer_units: i64,
    pub generation: i64,
    pub in_use: Option<i64>,
}

impl CellRow {
    pub fn into_view(self) -> StoreResult<AllocationView> {
        Ok(AllocationView {
            state: parse(&self.state)?,
            server: self.server,
            site: self.site,
            allocation: count(self.units),
            in_use: self.in_use.map(count),
            min_units: count(self.min_units),
            buffer_units: count(self.buffer_units),
            generation: count(self.generation),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

impl From<AuditRow> for AuditEntry {
    fn from(row: AuditRow) -> Self {
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        AuditEntry {
            id: row.id,
            at: time(row.at),
            actor: row.actor,
            action: row.action,
            target: row.target,
            before: json(row.before),
            after: json(row.after),
        }
    }
}

/// The columns of [`MoveRow`].
macro_rules! move_columns {
    () => {
        "m.id, m.run_id, m.product_id, m.server_id, \
    p.name AS product, s.name AS server, m.kind, m.units, m.state, m.applied_units, m.epoch"
    };
}
pub(super) use move_columns;

#[derive(sqlx::FromRow)]
pub(super) struct MoveRow {
    pub id: String,
    pub run_id: Option<i64>,
    pub product_id: i64,
    pub server_id: i64,
    pub product: String,
    pub server: String,
    pub kind: String,
    pub units: i64,
    pub state: String,
    pub applied_units: Option<i64>,
    pub epoch: i64,
}

impl MoveRow {
    pub fn to_record(&self) -> StoreResult<MoveRecord> {
        Ok(MoveRecord {
            id: Uuid::parse_str(&self.id)
                .map_err(|e| StoreError::Corrupt(format!("move id {:?}: {e}", self.id)))?,
            run_id: self.run_id,
            product: self.product.clone(),
            server: self.server.clone(),
            kind: parse(&self.kind)?,
            units: count(self.units),
            state: parse(&self.state)?,
            applied_units: self.applied_units.map(count),
            epoch: self.epoch,
        })
    }
}

impl MoveRow {
    pub fn to_view(&self) -> StoreResult<MoveView> {
        let record = self.to_record()?;
        Ok(MoveView {
            id: record.id,
            product: record.product,
            server: record.server,
            kind: record.kind,
            units: record.units,
            state: record.state,
            applied_units: record.applied_units,
        })
    }
}

/// The columns of [`CellRecordRow`].
macro_rules! cell_record_columns {
    () => {
        "s.name AS server, p.name AS product, a.units, a.min_units, a.buffer_units, \
         a.generation"
    };
}
pub(super) use cell_record_columns;

#[derive(sqlx::FromRow)]
pub(super) struct CellRecordRow {
    pub server: String,
    pub product: String,
    pub units: i64,
    pub min_units: i64,
    pub buffer_units: i64,
    pub generation: i64,
}

impl From<CellRecordRow> for CellRecord {
    fn from(row: CellRecordRow) -> Self {
        CellRecord {
            server: row.server,
            product: row.product,
            units: count(row.units),
            min_units: count(row.min_units),
            buffer_units: count(row.buffer_units),
            generation: count(row.generation),
        }
    }
}

/// The columns of [`RunRow`].
macro_rules! run_columns {
    () => {
        "r.id, r.trigger, r.status, r.started_at, r.finished_at, r.servers_queried, \
         r.servers_unreachable, r.moves, r.units_moved, r.errors, r.unserved_true, \
         r.unserved_false, r.ping_pong_units"
    };
}
pub(super) use run_columns;

#[derive(sqlx::FromRow)]
pub(super) struct RunRow {
    pub id: i64,
    pub trigger: String,
    pub status: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub servers_queried: i64,
    pub servers_unreachable: i64,
    pub moves: i64,
    pub units_moved: i64,
    pub errors: Option<String>,
    pub unserved_true: i64,
    pub unserved_false: i64,
    pub ping_pong_units: i64,
}

impl RunRow {
    pub fn into_summary(self) -> StoreResult<RunSummary> {
        Ok(RunSummary {
            id: self.id,
            trigger: parse(&self.trigger)?,
            status: self.status,
            started_at: time(self.started_at),
            finished_at: self.finished_at.map(time),
            servers_queried: count(self.servers_queried),
            servers_unreachable: count(self.servers_unreachable),
            moves: count(self.moves),
            units_moved: count(self.units_moved),
            unserved_true: count(self.unserved_true),
            unserved_false: count(self.unserved_false),
            ping_pong_units: count(self.ping_pong_units),
            errors: self
                .errors
                .and_then(|e| serde_json::from_str(&e).ok())
                .unwrap_or_default(),
        })
    }
}

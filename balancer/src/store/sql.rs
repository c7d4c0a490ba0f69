//! The SQL implementation of [`Store`], written once in the dialect SQLite and PostgreSQL
//! share and compiled by each backend module with its own `Db`, `begin_write`, `connect_pool`
//! and `MIGRATOR` (see [`super`]).
//!
//! Every pool change is a conditional `UPDATE … WHERE reserve >= $n` (or `in_transit`, or
//! `units`) whose affected-row count decides: zero rows means the units are not there, the
//! transaction rolls back and the caller gets a conflict. The books never pass through a
//! state that breaks conservation at a commit.

use super::{
    BACKEND, Db, LOCK_EPOCH, LOCK_PRODUCT, MIGRATOR, begin_read, begin_write, connect_pool,
};
use crate::store::rows::{
    AuditRow, CellRecordRow, CellRow, EntitlementRow, MoveRow, ProductRow, RunRow, ServerRow,
    cell_columns, cell_record_columns, count, entitlement_columns, move_columns, now_ms,
    product_columns, run_columns, server_columns,
};
use crate::store::{
    AuditQuery, BooksCheck, CellRecord, HistoryBucket, HistoryQuery, InstantRecord, MoveRecord,
    NewMove, RunOutcome, RunsQuery, ScheduleSetting, ServerRecord, Store, StoreError, StoreResult,
    UsageSample,
};
use allot_core::domain::{MoveKind, MoveState, RunTrigger, ServerState};
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, CreateProduct, Entitlement, Product, ProductDetail,
    RegisterServer, RunDetail, RunSummary, Server, SetAllocation,
};
use async_trait::async_trait;
use serde::Serialize;
use sqlx::{Database, Pool};
use uuid::Uuid;

type Conn = <Db as Database>::Connection;

/// The balancer's books in one SQL database.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pool: Pool<Db>,
}

impl SqlStore {
    /// Connects and applies pending migrations, so a store is always at the code's schema.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let pool = connect_pool(url).await?;
        MIGRATOR.run(&pool).await?;
        // The key server tokens are derived from: made once, kept with the books.
        let key = hex::encode(rand::random::<[u8; 32]>());
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ('server.token.key', $1) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    /// The connection pool, for tests that inspect the database directly.
    pub fn pool(&self) -> &Pool<Db> {
        &self.pool
    }
}

/// Maps constraint violations to conflicts: a taken name or a refused CHECK is the caller's
/// problem, not a server fault.
fn conflict_on_constraint(err: sqlx::Error, what: &str) -> StoreError {
    if let sqlx::Error::Database(db) = &err
        && (db.is_unique_violation() || db.is_check_violation() || db.is_foreign_key_violation())
    {
        return StoreError::Conflict(format!("{what}: {}", db.message()));
    }
    StoreError::Database(err)
}

fn json<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

async fn audit(
    conn: &mut Conn,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<String>,
    after: Option<String>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target, before, after) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(now_ms())
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(before)
    .bind(after)
    .execute(conn)
    .await?;
    Ok(())
}

async fn product_id(conn: &mut Conn, name: &str) -> StoreResult<i64> {
    sqlx::query_scalar::<_, i64>("SELECT id FROM products WHERE name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::UnknownProduct(name.to_owned()))
}

/// Takes the product's row lock before any other row of the transaction, so every writer
/// locks in the same order (product, then allocations) and concurrent moves cannot deadlock.
async fn lock_product(conn: &mut Conn, product_id: i64) -> StoreResult<()> {
    sqlx::query(LOCK_PRODUCT)
        .bind(product_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Refuses the write of a leader whose epoch is not the current one (fencing). Reads the epoch
/// under a share lock, so a takeover (which bumps it) waits for this transaction to finish.
async fn check_epoch(conn: &mut Conn, epoch: i64) -> StoreResult<()> {
    let current: i64 = sqlx::query_scalar::<_, String>(LOCK_EPOCH)
        .fetch_one(conn)
        .await?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))?;
    if epoch != current {
        return Err(StoreError::Fenced { epoch, current });
    }
    Ok(())
}

async fn server_row(conn: &mut Conn, name: &str) -> StoreResult<ServerRow> {
    sqlx::query_as::<_, ServerRow>(concat!(
        "SELECT ",
        server_columns!(),
        " FROM servers s WHERE s.name = $1 AND s.removed_at IS NULL"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("server {name:?}")))
}

async fn product_by_id(conn: &mut Conn, id: i64) -> StoreResult<Product> {
    sqlx::query_as::<_, ProductRow>(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products p WHERE p.id = $1"
    ))
    .bind(id)
    .fetch_one(conn)
    .await?
    .into_product()
}

async fn cell(conn: &mut Conn, server_id: i64, product_id: i64) -> StoreResult<AllocationView> {
    sqlx::query_as::<_, CellRow>(concat!(
        "SELECT ",
        cell_columns!(),
        " FROM allocations a JOIN servers s ON s.id = a.server_id \
         WHERE a.server_id = $1 AND a.product_id = $2"
    ))
    .bind(server_id)
    .bind(product_id)
    .fetch_one(conn)
    .await?
    .into_view()
}

async fn move_row(conn: &mut Conn, id: Uuid) -> StoreResult<MoveRow> {
    sqlx::query_as::<_, MoveRow>(concat!(
        "SELECT ",
        move_columns!(),
        " FROM moves m JOIN products p ON p.id = m.product_id \
         JOIN servers s ON s.id = m.server_id WHERE m.id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("move {id}")))
}

async fn set_move_state(
    conn: &mut Conn,
    id: &str,
    state: MoveState,
    applied_units: Option<i64>,
    error: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE moves SET state = $1, applied_units = $2, error = $3, updated_at = $4 \
         WHERE id = $5 AND state = 'planned'",
    )
    .bind(state.as_str())
    .bind(applied_units)
    .bind(error)
    .bind(now_ms())
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A transfer inside a product's pool that needs the source column to hold the units.
#[derive(Clone, Copy)]
enum PoolShift {
    /// A grant is sent: its units leave the reserve and travel.
    ReserveToTransit,
    /// A grant is given up: its units come back.
    TransitToReserve,
}

/// Applies a [`PoolShift`], refusing with a conflict when the source column is short.
async fn shift_pool(
    conn: &mut Conn,
    product_id: i64,
    shift: PoolShift,
    units: i64,
) -> StoreResult<()> {
    let sql = match shift {
        PoolShift::ReserveToTransit => {
            "UPDATE products SET reserve = reserve - $1, in_transit = in_transit + $1 \
             WHERE id = $2 AND reserve >= $1"
        }
        PoolShift::TransitToReserve => {
            "UPDATE products SET in_transit = in_transit - $1, reserve = reserve + $1 \
             WHERE id = $2 AND in_transit >= $1"
        }
    };
    let moved = sqlx::query(sql)
        .bind(units)
        .bind(product_id)
        .execute(conn)
        .await?
        .rows_affected();
    if moved == 0 {
        let from = match shift {
            PoolShift::ReserveToTransit => "the reserve",
            PoolShift::TransitToReserve => "transit",
        };
        return Err(StoreError::Conflict(format!(
            "fewer than {units} units in {from}"
        )));
    }
    Ok(())
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    #[tracing::instrument(skip_all, fields(product = %def.name))]
    async fn create_product(&self, actor: &str, def: &CreateProduct) -> StoreResult<Product> {
        let mut tx = begin_write(&self.pool).await?;
        let policy = def.policy();
        let id = sqlx::query_scalar::<_, i64>(
            "INSERT INTO products (name, publisher, version, enforcement, seat, \
             heartbeat_seconds, staleout_seconds, acl, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .bind(&def.name)
        .bind(&def.publisher)
        .bind(&def.version)
        .bind(policy.enforcement.as_str())
        .bind(policy.seat.as_str())
        .bind(i64::from(policy.heartbeat_seconds))
        .bind(i64::from(policy.staleout_seconds))
        .bind(json(&policy.acl).unwrap_or_else(|| "{}".into()))
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_on_constraint(e, &format!("product {:?}", def.name)))?;
        let product = product_by_id(&mut tx, id).await?;
        audit(
            &mut tx,
            actor,
            "product.create",
            &def.name,
            None,
            json(&product),
        )
        .await?;
        tx.commit().await?;
        Ok(product)
    }

    async fn products(&self) -> StoreResult<Vec<Product>> {
        sqlx::query_as::<_, ProductRow>(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products p ORDER BY p.name"
        ))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ProductRow::into_product)
        .collect()
    }

    async fn product(&self, name: &str) -> StoreResult<ProductDetail> {
        // One snapshot for the product's sums and its cells, so they add up as at a commit.
        let mut conn = begin_read(&self.pool).await?;
        let id = product_id(&mut conn, name).await?;
        let product = product_by_id(&mut conn, id).await?;
        let servers = sqlx::query_as::<_, CellRow>(concat!(
            "SELECT ",
            cell_columns!(),
            " FROM allocations a JOIN servers s ON s.id = a.server_id \
             WHERE a.product_id = $1 AND s.removed_at IS NULL ORDER BY s.name"
        ))
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(CellRow::into_view)
        .collect::<StoreResult<_>>()?;
        conn.commit().await?;
        Ok(ProductDetail { product, servers })
    }

    #[tracing::instrument(skip_all, fields(product, units = req.units))]
    async fn add_entitlement(
        &self,
        actor: &str,
        product: &str,
        req: &AddEntitlement,
    ) -> StoreResult<Entitlement> {
        let mut tx = begin_write(&self.pool).await?;
        let pid = product_id(&mut tx, product).await?;
        let units = i64::from(req.units);
        let id = sqlx::query_scalar::<_, i64>(
            "INSERT INTO entitlements (product_id, units, expires_at, reference, created_at, \
             created_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(pid)
        .bind(units)
        .bind(req.expires_at.map(|t| t.timestamp_millis()))
        .bind(&req.reference)
        .bind(now_ms())
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE products SET purchased = purchased + $1, reserve = reserve + $1 WHERE id = $2",
        )
        .bind(units)
        .bind(pid)
        .execute(&mut *tx)
        .await?;
        let entitlement: Entitlement = sqlx::query_as::<_, EntitlementRow>(concat!(
            "SELECT ",
            entitlement_columns!(),
            " FROM entitlements e \
             JOIN products p ON p.id = e.product_id WHERE e.id = $1"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .into();
        audit(
            &mut tx,
            actor,
            "entitlement.add",
            product,
            None,
            json(&entitlement),
        )
        .await?;
        tx.commit().await?;
        Ok(entitlement)
    }

    async fn entitlements(&self, product: &str) -> StoreResult<Vec<Entitlement>> {
        let mut conn = self.pool.acquire().await?;
        let pid = product_id(&mut conn, product).await?;
        Ok(sqlx::query_as::<_, EntitlementRow>(concat!(
            "SELECT ",
            entitlement_columns!(),
            " FROM entitlements e \
             JOIN products p ON p.id = e.product_id \
             WHERE e.product_id = $1 AND e.removed_at IS NULL ORDER BY e.id"
        ))
        .bind(pid)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(Entitlement::from)
        .collect())
    }

    #[tracing::instrument(skip_all, fields(product, entitlement = id))]
    async fn remove_entitlement(
        &self,
        actor: &str,
        product: &str,
        id: i64,
    ) -> StoreResult<Entitlement> {
        let mut tx = begin_write(&self.pool).await?;
        let pid = product_id(&mut tx, product).await?;
        lock_product(&mut tx, pid).await?;
        let entitlement: Entitlement = sqlx::query_as::<_, EntitlementRow>(concat!(
            "SELECT ",
            entitlement_columns!(),
            " FROM entitlements e \
             JOIN products p ON p.id = e.product_id \
             WHERE e.id = $1 AND e.product_id = $2 AND e.removed_at IS NULL"
        ))
        .bind(id)
        .bind(pid)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("entitlement {id} of {product:?}")))?
        .into();
        let units = i64::try_from(entitlement.units).unwrap_or(i64::MAX);
        let removed = sqlx::query(
            "UPDATE products SET purchased = purchased - $1, reserve = reserve - $1 \
             WHERE id = $2 AND reserve >= $1",
        )
        .bind(units)
        .bind(pid)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if removed == 0 {
            let reserve: i64 = sqlx::query_scalar("SELECT reserve FROM products WHERE id = $1")
                .bind(pid)
                .fetch_one(&mut *tx)
                .await?;
            return Err(StoreError::Conflict(format!(
                "entitlement {id} holds {units} units but only {reserve} are free in the \
                 reserve of {product:?}; release units from servers first"
            )));
        }
        sqlx::query("UPDATE entitlements SET removed_at = $1, removed_by = $2 WHERE id = $3")
            .bind(now_ms())
            .bind(actor)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            actor,
            "entitlement.remove",
            product,
            json(&entitlement),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(entitlement)
    }

    #[tracing::instrument(skip_all, fields(server = %req.name))]
    async fn register_server(
        &self,
        actor: &str,
        req: &RegisterServer,
        token_salt: &str,
        token_hash: &str,
    ) -> StoreResult<Server> {
        let mut tx = begin_write(&self.pool).await?;
        sqlx::query(
            "INSERT INTO servers (name, url, site, token_hash, token_salt, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6)",
        )
        .bind(&req.name)
        .bind(&req.url)
        .bind(&req.site)
        .bind(token_hash)
        .bind(token_salt)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_constraint(e, &format!("server {:?}", req.name)))?;
        let server = server_row(&mut tx, &req.name).await?.into_server()?;
        audit(
            &mut tx,
            actor,
            "server.register",
            &req.name,
            None,
            json(&server),
        )
        .await?;
        tx.commit().await?;
        Ok(server)
    }

    async fn server_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<ServerRecord>> {
        sqlx::query_as::<_, ServerRow>(concat!(
            "SELECT ",
            server_columns!(),
            " FROM servers s \
             WHERE (s.token_hash = $1 OR s.previous_token_hash = $1) AND s.removed_at IS NULL"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?
        .map(ServerRow::into_record)
        .transpose()
    }

    #[tracing::instrument(skip_all, fields(server = name))]
    async fn rotate_server_token(
        &self,
        actor: &str,
        name: &str,
        token_salt: &str,
        token_hash: &str,
        previous_until: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreResult<ServerRecord> {
        let mut tx = begin_write(&self.pool).await?;
        let id = server_row(&mut tx, name).await?.id;
        let until = previous_until.map(|t| t.timestamp_millis());
        sqlx::query(
            "UPDATE servers SET \
             previous_token_hash = CASE WHEN $1 IS NULL THEN NULL ELSE token_hash END, \
             previous_token_salt = CASE WHEN $1 IS NULL THEN NULL ELSE token_salt END, \
             previous_token_until = $1, token_hash = $2, token_salt = $3 \
             WHERE id = $4",
        )
        .bind(until)
        .bind(token_hash)
        .bind(token_salt)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_constraint(e, &format!("server {name:?}")))?;
        let record = server_row(&mut tx, name).await?.into_record()?;
        audit(
            &mut tx,
            actor,
            "server.rotate_token",
            name,
            None,
            json(&serde_json::json!({ "previous_token_until": previous_until })),
        )
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    #[tracing::instrument(skip_all, fields(server = name))]
    async fn retire_previous_token(&self, name: &str, current_salt: &str) -> StoreResult<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let retired = sqlx::query(
            "UPDATE servers SET previous_token_hash = NULL, previous_token_salt = NULL, \
             previous_token_until = NULL \
             WHERE name = $1 AND token_salt = $2 AND removed_at IS NULL \
             AND previous_token_hash IS NOT NULL",
        )
        .bind(name)
        .bind(current_salt)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if retired {
            audit(
                &mut tx,
                "balancer",
                "server.retire_previous_token",
                name,
                None,
                None,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(retired)
    }

    #[tracing::instrument(skip_all, fields(server = name))]
    async fn drain_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        let mut tx = begin_write(&self.pool).await?;
        let before = server_row(&mut tx, name).await?.into_server()?;
        sqlx::query("UPDATE servers SET state = $1 WHERE name = $2 AND removed_at IS NULL")
            .bind(ServerState::Draining.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let after = server_row(&mut tx, name).await?.into_server()?;
        audit(
            &mut tx,
            actor,
            "server.drain",
            name,
            json(&before),
            json(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    #[tracing::instrument(skip_all, fields(server = name))]
    async fn remove_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        let mut tx = begin_write(&self.pool).await?;
        let row = server_row(&mut tx, name).await?;
        let id = row.id;
        let server = row.into_server()?;
        let (held, in_flight): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE((SELECT SUM(units) FROM allocations WHERE server_id = $1), 0) \
             AS BIGINT), (SELECT COUNT(*) FROM moves WHERE server_id = $1 AND state = 'planned')",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if held > 0 || in_flight > 0 {
            return Err(StoreError::Conflict(format!(
                "server {name:?} still holds {held} units and has {in_flight} moves in flight; \
                 drain it and let a balance run empty it first"
            )));
        }
        sqlx::query("DELETE FROM allocations WHERE server_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE servers SET removed_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, actor, "server.remove", name, json(&server), None).await?;
        tx.commit().await?;
        Ok(server)
    }

    #[tracing::instrument(skip_all, fields(server, product))]
    async fn set_allocation_limits(
        &self,
        actor: &str,
        server: &str,
        product: &str,
        req: &SetAllocation,
    ) -> StoreResult<AllocationView> {
        let mut tx = begin_write(&self.pool).await?;
        let pid = product_id(&mut tx, product).await?;
        let sid = server_row(&mut tx, server).await?.id;
        let before = cell(&mut tx, sid, pid).await.ok();
        sqlx::query(
            "INSERT INTO allocations (server_id, product_id, min_units, buffer_units) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (server_id, product_id) DO UPDATE \
             SET min_units = excluded.min_units, buffer_units = excluded.buffer_units",
        )
        .bind(sid)
        .bind(pid)
        .bind(i64::from(req.min_units))
        .bind(i64::from(req.buffer_units))
        .execute(&mut *tx)
        .await?;
        let after = cell(&mut tx, sid, pid).await?;
        let target = format!("{server}/{product}");
        audit(
            &mut tx,
            actor,
            "allocation.set",
            &target,
            before.as_ref().and_then(json),
            json(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    async fn schedule(&self) -> StoreResult<ScheduleSetting> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT key, value FROM settings WHERE key IN ('schedule.cron', 'schedule.timezone')",
        )
        .fetch_all(&self.pool)
        .await?;
        let get = |key: &str| {
            rows.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| StoreError::Corrupt(format!("setting {key} missing")))
        };
        Ok(ScheduleSetting {
            cron: get("schedule.cron")?,
            timezone: get("schedule.timezone")?,
        })
    }

    #[tracing::instrument(skip_all, fields(cron = %setting.cron, timezone = %setting.timezone))]
    async fn set_schedule(&self, actor: &str, setting: &ScheduleSetting) -> StoreResult<()> {
        let before = self.schedule().await?;
        let mut tx = begin_write(&self.pool).await?;
        for (key, value) in [
            ("schedule.cron", &setting.cron),
            ("schedule.timezone", &setting.timezone),
        ] {
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        audit(
            &mut tx,
            actor,
            "schedule.set",
            "schedule",
            json(&before),
            json(setting),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit(&self, query: AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        Ok(sqlx::query_as::<_, AuditRow>(
            "SELECT id, at, actor, action, target, before, after FROM audit_log \
             WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(query.before_id.unwrap_or(i64::MAX))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(AuditEntry::from)
        .collect())
    }

    #[tracing::instrument(skip_all, fields(move_id = %mv.id, kind = %mv.kind, product = %mv.product, server = %mv.server, units = mv.units))]
    async fn begin_move(&self, mv: &NewMove) -> StoreResult<MoveRecord> {
        let units = i64::try_from(mv.units)
            .ok()
            .filter(|u| *u > 0)
            .ok_or_else(|| StoreError::Conflict(format!("a move of {} units", mv.units)))?;
        let mut tx = begin_write(&self.pool).await?;
        let pid = product_id(&mut tx, &mv.product).await?;
        lock_product(&mut tx, pid).await?;
        check_epoch(&mut tx, mv.epoch).await?;
        let sid = server_row(&mut tx, &mv.server).await?.id;
        match mv.kind {
            MoveKind::Release => {
                let held: Option<i64> = sqlx::query_scalar(
                    "SELECT units FROM allocations WHERE server_id = $1 AND product_id = $2",
                )
                .bind(sid)
                .bind(pid)
                .fetch_optional(&mut *tx)
                .await?;
                if held.unwrap_or(0) < units {
                    return Err(StoreError::Conflict(format!(
                        "server {:?} holds {} units of {:?}, cannot release {units}",
                        mv.server,
                        held.unwrap_or(0),
                        mv.product
                    )));
                }
            }
            MoveKind::Grant => {
                shift_pool(&mut tx, pid, PoolShift::ReserveToTransit, units).await?;
                sqlx::query(
                    "INSERT INTO allocations (server_id, product_id) VALUES ($1, $2) \
                     ON CONFLICT (server_id, product_id) DO NOTHING",
                )
                .bind(sid)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
            }
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO moves (id, run_id, product_id, server_id, kind, units, state, epoch, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'planned', $7, $8, $8)",
        )
        .bind(mv.id.to_string())
        .bind(mv.run_id)
        .bind(pid)
        .bind(sid)
        .bind(mv.kind.as_str())
        .bind(units)
        .bind(mv.epoch)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_constraint(e, &format!("move {}", mv.id)))?;
        let record = move_row(&mut tx, mv.id).await?.to_record()?;
        tx.commit().await?;
        Ok(record)
    }

    #[tracing::instrument(skip_all, fields(move_id = %id, applied_units, generation))]
    async fn complete_move(
        &self,
        id: Uuid,
        applied_units: u64,
        generation: u64,
        epoch: i64,
    ) -> StoreResult<MoveRecord> {
        let mut tx = begin_write(&self.pool).await?;
        let row = move_row(&mut tx, id).await?;
        lock_product(&mut tx, row.product_id).await?;
        check_epoch(&mut tx, epoch).await?;
        // Read again under the lock: a concurrent completion may have just committed.
        let row = move_row(&mut tx, id).await?;
        let record = row.to_record()?;
        match record.state {
            MoveState::Applied => return Ok(record),
            MoveState::Abandoned => {
                return Err(StoreError::Conflict(format!("move {id} was abandoned")));
            }
            MoveState::Planned => {}
        }
        let applied = i64::try_from(applied_units).unwrap_or(i64::MAX);
        let generation = i64::try_from(generation).unwrap_or(i64::MAX);
        let refuse = |why: String| Err(StoreError::Conflict(format!("move {id}: {why}")));
        match record.kind {
            MoveKind::Release => {
                if applied > row.units {
                    return refuse(format!("released {applied} of {} asked", row.units));
                }
                let taken = sqlx::query(
                    "UPDATE allocations SET units = units - $1, generation = \
                     CASE WHEN generation > $2 THEN generation ELSE $2 END \
                     WHERE server_id = $3 AND product_id = $4 AND units >= $1",
                )
                .bind(applied)
                .bind(generation)
                .bind(row.server_id)
                .bind(row.product_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if taken == 0 {
                    return refuse(format!("the allocation holds fewer than {applied} units"));
                }
                sqlx::query("UPDATE products SET reserve = reserve + $1 WHERE id = $2")
                    .bind(applied)
                    .bind(row.product_id)
                    .execute(&mut *tx)
                    .await?;
            }
            MoveKind::Grant => {
                if applied != row.units {
                    return refuse(format!("granted {applied} of {} sent", row.units));
                }
                let landed = sqlx::query(
                    "UPDATE products SET in_transit = in_transit - $1 \
                     WHERE id = $2 AND in_transit >= $1",
                )
                .bind(applied)
                .bind(row.product_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if landed == 0 {
                    return refuse("its units are not in transit".into());
                }
                sqlx::query(
                    "UPDATE allocations SET units = units + $1, generation = \
                     CASE WHEN generation > $2 THEN generation ELSE $2 END \
                     WHERE server_id = $3 AND product_id = $4",
                )
                .bind(applied)
                .bind(generation)
                .bind(row.server_id)
                .bind(row.product_id)
                .execute(&mut *tx)
                .await?;
            }
        }
        set_move_state(&mut tx, &row.id, MoveState::Applied, Some(applied), None).await?;
        let record = move_row(&mut tx, id).await?.to_record()?;
        tx.commit().await?;
        Ok(record)
    }

    #[tracing::instrument(skip_all, fields(move_id = %id, reason))]
    async fn abandon_move(&self, id: Uuid, reason: &str, epoch: i64) -> StoreResult<MoveRecord> {
        let mut tx = begin_write(&self.pool).await?;
        let row = move_row(&mut tx, id).await?;
        lock_product(&mut tx, row.product_id).await?;
        check_epoch(&mut tx, epoch).await?;
        // Read again under the lock: a concurrent completion may have just committed.
        let row = move_row(&mut tx, id).await?;
        let record = row.to_record()?;
        match record.state {
            MoveState::Abandoned => return Ok(record),
            MoveState::Applied => {
                return Err(StoreError::Conflict(format!("move {id} was applied")));
            }
            MoveState::Planned => {}
        }
        if record.kind == MoveKind::Grant {
            shift_pool(
                &mut tx,
                row.product_id,
                PoolShift::TransitToReserve,
                row.units,
            )
            .await?;
        }
        set_move_state(&mut tx, &row.id, MoveState::Abandoned, None, Some(reason)).await?;
        let record = move_row(&mut tx, id).await?.to_record()?;
        tx.commit().await?;
        Ok(record)
    }

    async fn unfinished_moves(&self) -> StoreResult<Vec<MoveRecord>> {
        sqlx::query_as::<_, MoveRow>(concat!(
            "SELECT ",
            move_columns!(),
            " FROM moves m JOIN products p ON p.id = m.product_id \
             JOIN servers s ON s.id = m.server_id WHERE m.state = 'planned' \
             ORDER BY m.created_at, m.id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(MoveRow::to_record)
        .collect()
    }

    async fn books(&self) -> StoreResult<Vec<BooksCheck>> {
        Ok(sqlx::query_as::<_, BooksCheck>(
            "SELECT p.name AS product, p.purchased, p.reserve, p.in_transit, \
             CAST(COALESCE((SELECT SUM(a.units) FROM allocations a \
                 WHERE a.product_id = p.id), 0) AS BIGINT) AS allocated, \
             CAST(COALESCE((SELECT SUM(e.units) FROM entitlements e \
                 WHERE e.product_id = p.id AND e.removed_at IS NULL), 0) AS BIGINT) AS entitled, \
             CAST(COALESCE((SELECT SUM(m.units) FROM moves m WHERE m.product_id = p.id \
                 AND m.kind = 'grant' AND m.state = 'planned'), 0) AS BIGINT) AS planned_grants \
             FROM products p ORDER BY p.name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn token_key(&self) -> StoreResult<String> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = 'server.token.key'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn server_records(&self) -> StoreResult<Vec<ServerRecord>> {
        sqlx::query_as::<_, ServerRow>(concat!(
            "SELECT ",
            server_columns!(),
            " FROM servers s WHERE s.removed_at IS NULL ORDER BY s.name"
        ))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ServerRow::into_record)
        .collect()
    }

    async fn touch_server(&self, name: &str) -> StoreResult<()> {
        sqlx::query("UPDATE servers SET last_seen_at = $1 WHERE name = $2 AND removed_at IS NULL")
            .bind(now_ms())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(server = name))]
    async fn reclaim_lost_server(&self, name: &str, epoch: i64) -> StoreResult<Vec<(String, u64)>> {
        let mut tx = begin_write(&self.pool).await?;
        let server = server_row(&mut tx, name).await?;
        let before = server_row(&mut tx, name).await?.into_server()?;
        let held: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT a.product_id, p.name, a.units FROM allocations a \
             JOIN products p ON p.id = a.product_id WHERE a.server_id = $1 ORDER BY a.product_id",
        )
        .bind(server.id)
        .fetch_all(&mut *tx)
        .await?;
        let planned: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM moves WHERE server_id = $1 AND state = 'planned' ORDER BY id",
        )
        .bind(server.id)
        .fetch_all(&mut *tx)
        .await?;
        let mut product_ids: Vec<i64> = held.iter().map(|(pid, _, _)| *pid).collect();
        for id in &planned {
            let id = Uuid::parse_str(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            product_ids.push(move_row(&mut tx, id).await?.product_id);
        }
        product_ids.sort_unstable();
        product_ids.dedup();
        for pid in &product_ids {
            lock_product(&mut tx, *pid).await?;
        }
        check_epoch(&mut tx, epoch).await?;
        for id in planned {
            let uuid = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let row = move_row(&mut tx, uuid).await?;
            if row.kind == MoveKind::Grant.as_str() {
                shift_pool(
                    &mut tx,
                    row.product_id,
                    PoolShift::TransitToReserve,
                    row.units,
                )
                .await?;
            }
            set_move_state(
                &mut tx,
                &id,
                MoveState::Abandoned,
                None,
                Some("server lost"),
            )
            .await?;
        }
        let mut reclaimed = Vec::new();
        for (pid, product, units) in held {
            if units > 0 {
                sqlx::query("UPDATE products SET reserve = reserve + $1 WHERE id = $2")
                    .bind(units)
                    .bind(pid)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE allocations SET units = 0, generation = generation + 1 \
                     WHERE server_id = $1 AND product_id = $2",
                )
                .bind(server.id)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
                reclaimed.push((product, count(units)));
            }
        }
        sqlx::query("UPDATE servers SET state = $1, needs_reset = 1 WHERE id = $2")
            .bind(ServerState::Lost.as_str())
            .bind(server.id)
            .execute(&mut *tx)
            .await?;
        let after = server_row(&mut tx, name).await?.into_server()?;
        let detail = serde_json::json!({ "server": after, "reclaimed": reclaimed });
        audit(
            &mut tx,
            "balancer",
            "server.lost",
            name,
            json(&before),
            json(&detail),
        )
        .await?;
        tx.commit().await?;
        Ok(reclaimed)
    }

    async fn revive_server(&self, name: &str) -> StoreResult<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let revived = sqlx::query(
            "UPDATE servers SET state = 'active', last_seen_at = $1 \
             WHERE name = $2 AND removed_at IS NULL AND state = 'lost'",
        )
        .bind(now_ms())
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if revived {
            audit(&mut tx, "balancer", "server.revive", name, None, None).await?;
        }
        tx.commit().await?;
        Ok(revived)
    }

    async fn product_cells(&self, product: &str) -> StoreResult<Vec<CellRecord>> {
        Ok(sqlx::query_as::<_, CellRecordRow>(concat!(
            "SELECT ",
            cell_record_columns!(),
            " FROM allocations a JOIN servers s ON s.id = a.server_id \
              JOIN products p ON p.id = a.product_id \
              WHERE s.removed_at IS NULL AND p.name = $1 ORDER BY s.name"
        ))
        .bind(product)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(CellRecord::from)
        .collect())
    }

    async fn touch_servers(&self, names: &[String]) -> StoreResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = begin_write(&self.pool).await?;
        for name in names {
            sqlx::query(
                "UPDATE servers SET last_seen_at = $1 WHERE name = $2 AND removed_at IS NULL",
            )
            .bind(now)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn clear_reset(&self, name: &str) -> StoreResult<()> {
        sqlx::query("UPDATE servers SET needs_reset = 0 WHERE name = $1 AND removed_at IS NULL")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn cells(&self) -> StoreResult<Vec<CellRecord>> {
        Ok(sqlx::query_as::<_, CellRecordRow>(concat!(
            "SELECT ",
            cell_record_columns!(),
            " FROM allocations a JOIN servers s ON s.id = a.server_id \
              JOIN products p ON p.id = a.product_id \
              WHERE s.removed_at IS NULL ORDER BY p.name, s.name"
        ))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(CellRecord::from)
        .collect())
    }

    async fn begin_run(&self, trigger: RunTrigger, epoch: i64) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO balance_runs (trigger, status, epoch, started_at) \
             VALUES ($1, 'running', $2, $3) RETURNING id",
        )
        .bind(trigger.as_str())
        .bind(epoch)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn finish_run(&self, run_id: i64, outcome: &RunOutcome) -> StoreResult<()> {
        let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE balance_runs SET status = $1, finished_at = $2, servers_queried = $3, \
             servers_unreachable = $4, moves = $5, units_moved = $6, errors = $7, \
             unserved_true = $8, unserved_false = $9, ping_pong_units = $10 WHERE id = $11",
        )
        .bind(&outcome.status)
        .bind(now_ms())
        .bind(wide(outcome.servers_queried))
        .bind(wide(outcome.servers_unreachable))
        .bind(wide(outcome.moves))
        .bind(wide(outcome.units_moved))
        .bind(json(&outcome.errors))
        .bind(wide(outcome.unserved_true))
        .bind(wide(outcome.unserved_false))
        .bind(wide(outcome.ping_pong_units))
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One multi-row `INSERT` per chunk of samples instead of one statement per sample: a run
    /// over 200 servers × 50 products writes 10,000 samples, and every statement costs a
    /// network round trip (PostgreSQL) or a hop to the driver's thread (SQLite). Names are
    /// resolved to ids once, in the same transaction; a sample naming a removed server or an
    /// unknown product is skipped, as the per-row `INSERT … SELECT` did.
    async fn record_samples(
        &self,
        run_id: i64,
        at_ms: i64,
        samples: &[UsageSample],
    ) -> StoreResult<()> {
        /// Columns bound per row.
        const COLUMNS: usize = 13;
        /// Rows per statement: 6,500 parameters, far below both backends' limits (SQLite
        /// 32,766, PostgreSQL 65,535).
        const CHUNK: usize = 500;
        let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if samples.is_empty() {
            return Ok(());
        }
        let mut tx = begin_write(&self.pool).await?;
        let servers: std::collections::HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
            "SELECT name, id FROM servers WHERE removed_at IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let products: std::collections::HashMap<String, i64> =
            sqlx::query_as::<_, (String, i64)>("SELECT name, id FROM products")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let rows: Vec<(i64, i64, &UsageSample)> = samples
            .iter()
            .filter_map(|s| Some((*servers.get(&s.server)?, *products.get(&s.product)?, s)))
            .collect();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO usage_samples (run_id, server_id, product_id, at, allocation, \
                 in_use, peak_in_use, checkouts, denials, overdrafts, staleouts, waiting, \
                 instant_requests) VALUES ",
            );
            for row in 0..chunk.len() {
                sql.push_str(if row == 0 { "(" } else { ", (" });
                let params: Vec<String> = (1..=COLUMNS)
                    .map(|c| format!("${}", row * COLUMNS + c))
                    .collect();
                sql.push_str(&params.join(", "));
                sql.push(')');
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (server_id, product_id, s) in chunk {
                query = query
                    .bind(run_id)
                    .bind(*server_id)
                    .bind(*product_id)
                    .bind(at_ms)
                    .bind(wide(s.allocation))
                    .bind(wide(s.in_use))
                    .bind(wide(s.peak_in_use))
                    .bind(wide(s.checkouts))
                    .bind(wide(s.denials))
                    .bind(wide(s.overdrafts))
                    .bind(wide(s.staleouts))
                    .bind(wide(s.waiting))
                    .bind(wide(s.instant_requests));
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn runs(&self, q: &RunsQuery) -> StoreResult<Vec<RunSummary>> {
        sqlx::query_as::<_, RunRow>(concat!(
            "SELECT ",
            run_columns!(),
            " FROM balance_runs r WHERE r.id < $1 AND ($2 = '' OR r.trigger = $2) \
              AND r.started_at >= $3 ORDER BY r.id DESC LIMIT $4"
        ))
        .bind(q.before_id.unwrap_or(i64::MAX))
        .bind(q.trigger.map_or("", |t| t.as_str()))
        .bind(q.since_ms.unwrap_or(0))
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(RunRow::into_summary)
        .collect()
    }

    async fn run(&self, run_id: i64) -> StoreResult<RunDetail> {
        let run = sqlx::query_as::<_, RunRow>(concat!(
            "SELECT ",
            run_columns!(),
            " FROM balance_runs r WHERE r.id = $1"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?
        .into_summary()?;
        let move_log = sqlx::query_as::<_, MoveRow>(concat!(
            "SELECT ",
            move_columns!(),
            " FROM moves m JOIN products p ON p.id = m.product_id \
              JOIN servers s ON s.id = m.server_id WHERE m.run_id = $1 \
              ORDER BY m.created_at, m.id"
        ))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(MoveRow::to_view)
        .collect::<StoreResult<_>>()?;
        Ok(RunDetail { run, move_log })
    }

    async fn instant_request(&self, request_id: Uuid) -> StoreResult<Option<InstantRecord>> {
        let row: Option<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT s.name, p.name, i.units, i.granted FROM instant_requests i \
             JOIN servers s ON s.id = i.server_id JOIN products p ON p.id = i.product_id \
             WHERE i.id = $1",
        )
        .bind(request_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(server, product, units, granted)| InstantRecord {
            server,
            product,
            units: count(units),
            granted: count(granted),
        }))
    }

    async fn record_instant_request(
        &self,
        request_id: Uuid,
        record: &InstantRecord,
    ) -> StoreResult<()> {
        let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO instant_requests (id, server_id, product_id, units, granted, created_at) \
             SELECT $1, s.id, p.id, $2, $3, $4 FROM servers s, products p \
             WHERE s.name = $5 AND s.removed_at IS NULL AND p.name = $6 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(request_id.to_string())
        .bind(wide(record.units))
        .bind(wide(record.granted))
        .bind(now_ms())
        .bind(&record.server)
        .bind(&record.product)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn history(&self, q: &HistoryQuery) -> StoreResult<Vec<HistoryBucket>> {
        let filter = |v: &Option<String>| v.clone().unwrap_or_default();
        let raw = sqlx::query_as::<_, HistoryBucket>(
            "SELECT s.name AS server, s.site, p.name AS product, (u.at / $1) * $1 AS bucket, \
             COUNT(*) AS samples, CAST(SUM(u.allocation) AS BIGINT) AS allocation_sum, \
             MAX(u.allocation) AS allocation_max, CAST(SUM(u.in_use) AS BIGINT) AS in_use_sum, \
             MAX(u.in_use) AS in_use_max, MAX(u.peak_in_use) AS peak_in_use, \
             CAST(SUM(u.checkouts) AS BIGINT) AS checkouts, \
             CAST(SUM(u.denials) AS BIGINT) AS denials, \
             CAST(SUM(u.overdrafts) AS BIGINT) AS overdrafts, \
             CAST(SUM(u.staleouts) AS BIGINT) AS staleouts, \
             CAST(SUM(u.waiting) AS BIGINT) AS waiting_sum, MAX(u.waiting) AS waiting_max, \
             CAST(SUM(u.instant_requests) AS BIGINT) AS instant_requests \
             FROM usage_samples u JOIN servers s ON s.id = u.server_id \
             JOIN products p ON p.id = u.product_id \
             WHERE u.at >= $2 AND u.at < $3 AND ($4 = '' OR p.name = $4) \
             AND ($5 = '' OR s.name = $5) AND ($6 = '' OR s.site = $6) \
             GROUP BY 1, 2, 3, 4",
        )
        .bind(q.step_ms)
        .bind(q.from_ms.max(q.raw_from_ms))
        .bind(q.to_ms)
        .bind(filter(&q.product))
        .bind(filter(&q.server))
        .bind(filter(&q.site))
        .fetch_all(&self.pool)
        .await?;
        let hourly = sqlx::query_as::<_, HistoryBucket>(
            "SELECT s.name AS server, s.site, p.name AS product, (h.hour / $1) * $1 AS bucket, \
             CAST(SUM(h.samples) AS BIGINT) AS samples, \
             CAST(SUM(h.allocation_sum) AS BIGINT) AS allocation_sum, \
             MAX(h.allocation_max) AS allocation_max, \
             CAST(SUM(h.in_use_sum) AS BIGINT) AS in_use_sum, MAX(h.in_use_max) AS in_use_max, \
             MAX(h.peak_in_use) AS peak_in_use, CAST(SUM(h.checkouts) AS BIGINT) AS checkouts, \
             CAST(SUM(h.denials) AS BIGINT) AS denials, \
             CAST(SUM(h.overdrafts) AS BIGINT) AS overdrafts, \
             CAST(SUM(h.staleouts) AS BIGINT) AS staleouts, \
             CAST(SUM(h.waiting_sum) AS BIGINT) AS waiting_sum, \
             MAX(h.waiting_max) AS waiting_max, \
             CAST(SUM(h.instant_requests) AS BIGINT) AS instant_requests \
             FROM usage_hourly h JOIN servers s ON s.id = h.server_id \
             JOIN products p ON p.id = h.product_id \
             WHERE h.hour >= $2 AND h.hour < $3 AND ($4 = '' OR p.name = $4) \
             AND ($5 = '' OR s.name = $5) AND ($6 = '' OR s.site = $6) \
             GROUP BY 1, 2, 3, 4",
        )
        .bind(q.step_ms.max(3_600_000))
        .bind(q.from_ms - q.from_ms.rem_euclid(3_600_000))
        .bind(q.to_ms.min(q.raw_from_ms))
        .bind(filter(&q.product))
        .bind(filter(&q.server))
        .bind(filter(&q.site))
        .fetch_all(&self.pool)
        .await?;
        Ok(raw.into_iter().chain(hourly).collect())
    }

    async fn roll_up(&self, until_ms: i64) -> StoreResult<u64> {
        let until = until_ms - until_ms.rem_euclid(3_600_000);
        let mut tx = begin_write(&self.pool).await?;
        let from: i64 = sqlx::query_scalar::<_, String>(
            "SELECT value FROM settings WHERE key = 'history.rolled_up_to'",
        )
        .fetch_one(&mut *tx)
        .await?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("history.rolled_up_to: {e}")))?;
        if until <= from {
            return Ok(0);
        }
        let written = sqlx::query(
            "INSERT INTO usage_hourly (server_id, product_id, hour, samples, allocation_sum, \
             allocation_max, in_use_sum, in_use_max, peak_in_use, checkouts, denials, \
             overdrafts, staleouts, waiting_sum, waiting_max, instant_requests) \
             SELECT server_id, product_id, (at / 3600000) * 3600000, COUNT(*), \
             SUM(allocation), MAX(allocation), SUM(in_use), MAX(in_use), MAX(peak_in_use), \
             SUM(checkouts), SUM(denials), SUM(overdrafts), SUM(staleouts), SUM(waiting), \
             MAX(waiting), SUM(instant_requests) FROM usage_samples \
             WHERE at >= $1 AND at < $2 GROUP BY 1, 2, 3 \
             ON CONFLICT (server_id, product_id, hour) DO UPDATE SET \
             samples = excluded.samples, allocation_sum = excluded.allocation_sum, \
             allocation_max = excluded.allocation_max, in_use_sum = excluded.in_use_sum, \
             in_use_max = excluded.in_use_max, peak_in_use = excluded.peak_in_use, \
             checkouts = excluded.checkouts, denials = excluded.denials, \
             overdrafts = excluded.overdrafts, staleouts = excluded.staleouts, \
             waiting_sum = excluded.waiting_sum, waiting_max = excluded.waiting_max, \
             instant_requests = excluded.instant_requests",
        )
        .bind(from)
        .bind(until)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE settings SET value = $1 WHERE key = 'history.rolled_up_to'")
            .bind(until.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn prune_history(
        &self,
        raw_before_ms: i64,
        hourly_before_ms: i64,
    ) -> StoreResult<(u64, u64)> {
        let mut tx = begin_write(&self.pool).await?;
        let rolled: i64 = sqlx::query_scalar::<_, String>(
            "SELECT value FROM settings WHERE key = 'history.rolled_up_to'",
        )
        .fetch_one(&mut *tx)
        .await?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("history.rolled_up_to: {e}")))?;
        // Never delete a raw sample before its hour is rolled up.
        let raw = sqlx::query("DELETE FROM usage_samples WHERE at < $1")
            .bind(raw_before_ms.min(rolled))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let hourly = sqlx::query("DELETE FROM usage_hourly WHERE hour < $1")
            .bind(hourly_before_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok((raw, hourly))
    }

    async fn samples_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, UsageSample)>> {
        type Row = (
            i64,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT u.at, s.name, p.name, u.allocation, u.in_use, u.peak_in_use, u.checkouts, \
             u.denials, u.overdrafts, u.staleouts, u.waiting, u.instant_requests \
             FROM usage_samples u JOIN servers s ON s.id = u.server_id \
             JOIN products p ON p.id = u.product_id WHERE u.at >= $1 AND u.at < $2 \
             ORDER BY u.at, s.name, p.name",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.0,
                    UsageSample {
                        server: r.1,
                        product: r.2,
                        allocation: count(r.3),
                        in_use: count(r.4),
                        peak_in_use: count(r.5),
                        checkouts: count(r.6),
                        denials: count(r.7),
                        overdrafts: count(r.8),
                        staleouts: count(r.9),
                        waiting: count(r.10),
                        instant_requests: count(r.11),
                    },
                )
            })
            .collect())
    }

    async fn peak_samples(
        &self,
        ranges: &[(i64, i64)],
    ) -> StoreResult<Vec<(String, String, i64, u64)>> {
        let mut out = Vec::new();
        for &(from, to) in ranges {
            let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
                "SELECT s.name, p.name, u.at, u.peak_in_use FROM usage_samples u \
                 JOIN servers s ON s.id = u.server_id JOIN products p ON p.id = u.product_id \
                 WHERE u.at >= $1 AND u.at <= $2",
            )
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?;
            out.extend(
                rows.into_iter()
                    .map(|(server, product, at, peak)| (server, product, at, count(peak))),
            );
        }
        Ok(out)
    }

    async fn instant_grants_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, String, String, u64)>> {
        let rows: Vec<(i64, String, String, Option<i64>)> = sqlx::query_as(
            "SELECT m.created_at, s.name, p.name, m.applied_units FROM moves m \
             JOIN balance_runs r ON r.id = m.run_id JOIN servers s ON s.id = m.server_id \
             JOIN products p ON p.id = m.product_id WHERE r.trigger = 'instant' \
             AND m.kind = 'grant' AND m.state = 'applied' \
             AND m.created_at >= $1 AND m.created_at < $2 ORDER BY m.created_at",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(at, server, product, units)| (at, server, product, units.map_or(0, count)))
            .collect())
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_setting(&self, actor: &str, key: &str, value: &str) -> StoreResult<()> {
        let mut tx = begin_write(&self.pool).await?;
        let before: Option<String> =
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        let parse = |v: &str| {
            serde_json::from_str::<serde_json::Value>(v)
                .ok()
                .map(|v| v.to_string())
        };
        audit(
            &mut tx,
            actor,
            "setting.set",
            key,
            before.as_deref().and_then(parse),
            parse(value),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn take_leadership(&self, url: &str) -> StoreResult<i64> {
        let mut tx = begin_write(&self.pool).await?;
        let epoch: i64 = sqlx::query_scalar::<_, String>(
            "UPDATE settings SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) \
             WHERE key = 'leader.epoch' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))?;
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ('leader.url', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(url)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            "balancer",
            "leader.take",
            url,
            None,
            Some(serde_json::json!({ "epoch": epoch, "url": url }).to_string()),
        )
        .await?;
        tx.commit().await?;
        Ok(epoch)
    }

    async fn leader(&self) -> StoreResult<(i64, String)> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT key, value FROM settings WHERE key IN ('leader.epoch', 'leader.url')",
        )
        .fetch_all(&self.pool)
        .await?;
        let get = |key: &str| rows.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let epoch = get("leader.epoch")
            .unwrap_or_default()
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))?;
        Ok((epoch, get("leader.url").unwrap_or_default()))
    }
}

//! The SQL implementation of [`Store`], written once in the dialect SQLite and PostgreSQL
//! share and compiled by each backend module with its own `Db`, `begin_write`, `connect_pool`
//! and `MIGRATOR` (see [`super`]).
//!
//! Split by domain, one file per family of tables; the [`Store`] impl below only dispatches:
//! [`books`] (products, entitlements, cells), [`fleet`] (servers, tokens, limits, leases, lost
//! servers), [`moves`] (the move log), [`runs`] (runs and instant requests), [`history`]
//! (samples, roll-ups, retention) and [`settings`] (schedule, settings, leadership, audit).
//! The helpers here are the ones several families share.
//!
//! Every pool change is a conditional `UPDATE … WHERE reserve >= $n` (or `in_transit`, or
//! `units`) whose affected-row count decides: zero rows means the units are not there, the
//! transaction rolls back and the caller gets a conflict. The books never pass through a
//! state that breaks conservation at a commit.

mod books;
mod estate;
mod expiry;
mod fleet;
mod history;
mod moves;
mod operators;
mod records;
mod runs;
mod settings;

use super::{
    BACKEND, Db, LOCK_PRODUCT, LOCK_PRODUCTS_SUFFIX, LOCK_SHARDS, MIGRATOR, apply_to_allocations,
    begin_booking, begin_read, begin_write, book_instant_grant, connect_pool, insert_samples,
    log_run_with_grant, mark_applied,
};
use crate::store::rows::{
    AuditRow, CellRecordRow, CellRow, EntitlementRow, MoveRow, ProductRow, RunRow, ServerRow,
    cell_columns, cell_record_columns, count, entitlement_columns, move_columns, now_ms,
    product_columns, run_columns, server_columns,
};
use crate::store::{
    AuditQuery, BooksCheck, CellAccounting, CellRecord, HistoryBucket, HistoryQuery, InstantRecord,
    MoveRecord, NewMove, RunOutcome, RunsQuery, ScheduleSetting, ServerRecord, ShardLeader, Store,
    StoreError, StoreResult, UsageSample,
};
use crate::store::{InstantLog, InstantStart, RecordsQuery, UsageTotals};
use allot_core::domain::{MoveKind, MoveState, RunTrigger, ServerState};
use allot_core::shard::Fence;
use allot_core::usage::Interval;
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, CreateProduct, Entitlement, ExplainedCell, Product,
    ProductDetail, RegisterServer, RunDecision, RunDetail, RunSummary, Server, SetAllocation,
};
use allot_core::wire::records::{RecordAck, RecordBatch};
use async_trait::async_trait;
use serde::Serialize;
use sqlx::{Database, Pool};
use std::collections::{BTreeSet, HashMap};
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

/// The ids of live servers and of products by name, read once inside a bulk write's
/// transaction so its rows can name them without a lookup per row.
struct NameIds {
    servers: std::collections::HashMap<String, i64>,
    products: std::collections::HashMap<String, i64>,
}

impl NameIds {
    async fn read(conn: &mut Conn) -> StoreResult<Self> {
        let servers = sqlx::query_as::<_, (String, i64)>(
            "SELECT name, id FROM servers WHERE removed_at IS NULL",
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        let products = sqlx::query_as::<_, (String, i64)>("SELECT name, id FROM products")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        Ok(Self { servers, products })
    }

    /// Only the named servers and products (a batch of moves names a few of them; an instant
    /// balance's single move one of each): both kinds by one statement (a `UNION ALL`) per 500
    /// names, so an instant balance resolves its two names in one round trip, not two.
    async fn read_named(
        conn: &mut Conn,
        servers: &std::collections::BTreeSet<&str>,
        products: &std::collections::BTreeSet<&str>,
    ) -> StoreResult<Self> {
        // 0 names a server, 1 a product.
        let names: Vec<(i32, &str)> = servers
            .iter()
            .map(|n| (0, *n))
            .chain(products.iter().map(|n| (1, *n)))
            .collect();
        let mut found = Self {
            servers: std::collections::HashMap::with_capacity(servers.len()),
            products: std::collections::HashMap::with_capacity(products.len()),
        };
        for chunk in names.chunks(500) {
            let (of_servers, of_products) = chunk.iter().partition::<Vec<_>, _>(|(k, _)| *k == 0);
            let mut next = 0;
            let mut selects = Vec::with_capacity(2);
            if !of_servers.is_empty() {
                selects.push(format!(
                    "SELECT 0 AS kind, name, id FROM servers WHERE removed_at IS NULL AND name IN ({})",
                    sequential_params(&mut next, of_servers.len())
                ));
            }
            if !of_products.is_empty() {
                selects.push(format!(
                    "SELECT 1 AS kind, name, id FROM products WHERE name IN ({})",
                    sequential_params(&mut next, of_products.len())
                ));
            }
            let sql = selects.join(" UNION ALL ");
            let mut query = sqlx::query_as::<_, (i32, String, i64)>(sqlx::AssertSqlSafe(sql));
            for (_, name) in of_servers.iter().chain(&of_products) {
                query = query.bind(*name);
            }
            for (kind, name, id) in query.fetch_all(&mut *conn).await? {
                match kind {
                    0 => found.servers.insert(name, id),
                    _ => found.products.insert(name, id),
                };
            }
        }
        Ok(found)
    }

    /// (server id, product id), when both exist.
    fn cell(&self, server: &str, product: &str) -> Option<(i64, i64)> {
        Some((*self.servers.get(server)?, *self.products.get(product)?))
    }
}

/// The columns of `usage_samples` a [`SampleRow`] holds, in its order (after `run_id` and
/// `at`, which a run's samples share).
pub(super) const SAMPLE_COLUMNS: [&str; 16] = [
    "server_id",
    "product_id",
    "allocation",
    "in_use",
    "peak_in_use",
    "checkouts",
    "denials",
    "overdrafts",
    "staleouts",
    "waiting",
    "instant_requests",
    "units_granted",
    "units_released",
    "ping_pong_units",
    "unserved_true",
    "unserved_false",
];

/// One usage sample as its row's values, names resolved to ids: see [`SAMPLE_COLUMNS`].
pub(super) type SampleRow = [i64; SAMPLE_COLUMNS.len()];

/// An instant balance's grant to book with its run's closing and its request's record
/// ([`crate::store::Store::complete_instant_grant`]'s arguments).
pub(super) struct InstantBooking<'a> {
    pub(super) landed: crate::store::LandedMove,
    pub(super) fence: &'a Fence,
    pub(super) run_id: i64,
    pub(super) outcome: &'a RunOutcome,
    pub(super) request_id: Uuid,
    pub(super) answered: &'a InstantRecord,
}

/// What an instant balance reads of its product and request: the reserve, then the request's
/// record if it has one (its server, product, units asked and granted), else four `None`s.
pub(super) type InstantStartRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

/// One allocation's change as a booking makes it: its units by `delta` (a release's never
/// below zero, which the table's check refuses) and its generation raised to at least
/// `generation`, the one its server reported with the move.
#[derive(Debug, Clone, Copy)]
pub(super) struct CellChange {
    pub(super) server_id: i64,
    pub(super) product_id: i64,
    pub(super) delta: i64,
    pub(super) generation: i64,
}

/// Rows per multi-row statement: far below both backends' parameter limits.
const CHUNK: usize = 500;

/// Rows a large read decodes between two returns to the scheduler.
const ROWS_PER_TURN: usize = 2_000;

/// Collects the rows of a large read (every cell, a window of samples), handing the async
/// worker back every [`ROWS_PER_TURN`] rows: sqlx decodes rows that have already arrived
/// without returning to the scheduler, so 100,000 cells read by one `fetch_all` held a worker
/// for the whole of their decoding, and instant balances queued behind it waited (measured:
/// a stall of about 100 ms at the same point of every run of a 1,000 × 100 estate).
async fn collect_yielding<T>(
    rows: impl futures_util::Stream<Item = Result<T, sqlx::Error>>,
) -> Result<Vec<T>, sqlx::Error> {
    use futures_util::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await? {
        out.push(row);
        if out.len() % ROWS_PER_TURN == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(out)
}

/// `($1, …, $c), ($c+1, …), …` for a multi-row `INSERT` of `rows` rows of `columns` columns:
/// one statement per chunk instead of one per row (each statement is a round trip).
pub(super) fn values_placeholders(rows: usize, columns: usize) -> String {
    let mut next = 0;
    (0..rows)
        .map(|_| format!("({})", sequential_params(&mut next, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `count` parameters after the `next` already used, bound in the order they appear: `$n` on
/// PostgreSQL, anonymous `?` on SQLite. SQLite finds a numbered parameter's name by a linear
/// scan on every bind (sqlx asks it for each), which makes a statement of thousands of
/// numbered parameters quadratic; anonymous ones cost nothing to look up.
fn sequential_params(next: &mut usize, count: usize) -> String {
    (0..count)
        .map(|_| {
            *next += 1;
            if BACKEND == "sqlite" {
                "?".to_owned()
            } else {
                format!("${next}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn json<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

async fn write_audit(
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
/// Returns the product's name, which decides its shard.
async fn lock_product(conn: &mut Conn, product_id: i64) -> StoreResult<String> {
    Ok(sqlx::query_scalar(LOCK_PRODUCT)
        .bind(product_id)
        .fetch_one(conn)
        .await?)
}

/// Locks several products as [`lock_product`] does, in id order (the order every writer takes
/// them in, so two writers never wait on each other in a circle), by one statement per
/// [`CHUNK`] rather than one per product: a transaction booking a run's moves of a hundred
/// products holds their locks for a few round trips, not a hundred, and an instant balance
/// waiting on one of them waits that much less.
async fn lock_products(conn: &mut Conn, product_ids: &BTreeSet<i64>) -> StoreResult<()> {
    let ids: Vec<i64> = product_ids.iter().copied().collect();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT id FROM products WHERE id IN ({}) ORDER BY id{LOCK_PRODUCTS_SUFFIX}",
            sequential_params(&mut 0, chunk.len())
        );
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        let locked = query.fetch_all(&mut *conn).await?;
        if locked.len() != chunk.len() {
            return Err(StoreError::NotFound(format!(
                "{} of products {chunk:?}",
                chunk.len() - locked.len()
            )));
        }
    }
    Ok(())
}

/// The current epoch of every shard, indexed by shard, read under a share lock so a takeover
/// (which bumps one) or a new shard count waits for the transaction to finish.
async fn shard_epochs(conn: &mut Conn) -> StoreResult<Vec<i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(LOCK_SHARDS).fetch_all(conn).await?;
    if rows.is_empty() || rows.iter().enumerate().any(|(i, (s, _))| *s as usize != i) {
        return Err(StoreError::Corrupt(format!(
            "leader_shards must number its shards 0..n: {rows:?}"
        )));
    }
    Ok(rows.into_iter().map(|(_, epoch)| epoch).collect())
}

/// Refuses a write to `product` by a writer whose epoch is not the current one of the product's
/// shard (fencing).
fn check_epoch_of(shards: &[i64], product: &str, epoch: i64) -> StoreResult<()> {
    let count = u32::try_from(shards.len()).unwrap_or(u32::MAX);
    let current = shards[allot_core::shard::shard_of(product, count) as usize];
    if epoch != current {
        return Err(StoreError::Fenced { epoch, current });
    }
    Ok(())
}

/// Refuses the write unless `fence` leads the shard of every product in `products` at its
/// current epoch: a deposed leader, or one that still believes in an older shard count,
/// changes nothing.
async fn check_fence(conn: &mut Conn, fence: &Fence, products: &[String]) -> StoreResult<()> {
    let shards = shard_epochs(conn).await?;
    for product in products {
        check_epoch_of(&shards, product, fence.epoch_for(product).unwrap_or(-1))?;
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

    async fn create_product(&self, actor: &str, def: &CreateProduct) -> StoreResult<Product> {
        books::create_product(&self.pool, actor, def).await
    }

    async fn products(&self) -> StoreResult<Vec<Product>> {
        books::products(&self.pool).await
    }

    async fn product(&self, name: &str) -> StoreResult<ProductDetail> {
        books::product(&self.pool, name).await
    }

    async fn product_books(&self, name: &str) -> StoreResult<Product> {
        books::product_books(&self.pool, name).await
    }

    async fn reserve(&self, product: &str) -> StoreResult<u64> {
        books::reserve(&self.pool, product).await
    }

    async fn set_policy(
        &self,
        actor: &str,
        name: &str,
        policy: &allot_core::domain::Policy,
    ) -> StoreResult<Product> {
        books::set_policy(&self.pool, actor, name, policy).await
    }

    async fn add_entitlement(
        &self,
        actor: &str,
        product: &str,
        req: &AddEntitlement,
    ) -> StoreResult<Entitlement> {
        books::add_entitlement(&self.pool, actor, product, req).await
    }

    async fn dated_entitlements(&self) -> StoreResult<Vec<Entitlement>> {
        books::dated_entitlements(&self.pool).await
    }

    async fn entitlements(&self, product: &str) -> StoreResult<Vec<Entitlement>> {
        books::entitlements(&self.pool, product).await
    }

    async fn remove_entitlement(
        &self,
        actor: &str,
        product: &str,
        id: i64,
    ) -> StoreResult<Entitlement> {
        books::remove_entitlement(&self.pool, actor, product, id).await
    }

    async fn register_server(
        &self,
        actor: &str,
        req: &RegisterServer,
        token_salt: &str,
        token_hash: &str,
    ) -> StoreResult<Server> {
        fleet::register_server(&self.pool, actor, req, token_salt, token_hash).await
    }

    async fn server_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<ServerRecord>> {
        fleet::server_by_token_hash(&self.pool, token_hash).await
    }

    async fn rotate_server_token(
        &self,
        actor: &str,
        name: &str,
        token_salt: &str,
        token_hash: &str,
        previous_until: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreResult<ServerRecord> {
        fleet::rotate_server_token(
            &self.pool,
            actor,
            name,
            token_salt,
            token_hash,
            previous_until,
        )
        .await
    }

    async fn retire_previous_token(&self, name: &str, current_salt: &str) -> StoreResult<bool> {
        fleet::retire_previous_token(&self.pool, name, current_salt).await
    }

    async fn drain_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        fleet::drain_server(&self.pool, actor, name).await
    }

    async fn remove_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        fleet::remove_server(&self.pool, actor, name).await
    }

    async fn set_allocation_limits(
        &self,
        actor: &str,
        server: &str,
        product: &str,
        req: &SetAllocation,
    ) -> StoreResult<AllocationView> {
        fleet::set_allocation_limits(&self.pool, actor, server, product, req).await
    }

    async fn schedule(&self) -> StoreResult<ScheduleSetting> {
        settings::schedule(&self.pool).await
    }

    async fn set_schedule(&self, actor: &str, setting: &ScheduleSetting) -> StoreResult<()> {
        settings::set_schedule(&self.pool, actor, setting).await
    }

    async fn audit(&self, query: AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        settings::audit(&self.pool, query).await
    }

    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        settings::record_audit(&self.pool, actor, action, target, detail).await
    }

    async fn add_operator(
        &self,
        actor: &str,
        name: &str,
        role: crate::store::Role,
        password_hash: &str,
    ) -> StoreResult<crate::store::Operator> {
        operators::add_operator(&self.pool, actor, name, role, password_hash).await
    }

    async fn operators(&self) -> StoreResult<Vec<crate::store::Operator>> {
        operators::operators(&self.pool).await
    }

    async fn estate_totals(&self) -> StoreResult<Vec<crate::store::EstateTotal>> {
        estate::estate_totals(&self.pool).await
    }

    async fn operator_credentials(
        &self,
        name: &str,
    ) -> StoreResult<Option<(crate::store::Operator, String)>> {
        operators::operator_credentials(&self.pool, name).await
    }

    async fn remove_operator(
        &self,
        actor: &str,
        name: &str,
    ) -> StoreResult<crate::store::Operator> {
        operators::remove_operator(&self.pool, actor, name).await
    }

    async fn begin_moves(&self, moves: &[NewMove]) -> StoreResult<Vec<MoveRecord>> {
        moves::begin_moves(&self.pool, moves).await
    }

    async fn complete_moves(
        &self,
        landed: &[crate::store::LandedMove],
        fence: &Fence,
    ) -> StoreResult<Vec<MoveRecord>> {
        moves::complete_moves(&self.pool, landed, fence).await
    }

    async fn abandon_move(&self, id: Uuid, reason: &str, fence: &Fence) -> StoreResult<MoveRecord> {
        moves::abandon_move(&self.pool, id, reason, fence).await
    }

    async fn unfinished_moves(&self) -> StoreResult<Vec<MoveRecord>> {
        moves::unfinished_moves(&self.pool).await
    }

    async fn books(&self) -> StoreResult<Vec<BooksCheck>> {
        books::books(&self.pool).await
    }

    async fn token_key(&self) -> StoreResult<String> {
        settings::token_key(&self.pool).await
    }

    async fn server_records(&self) -> StoreResult<Vec<ServerRecord>> {
        fleet::server_records(&self.pool).await
    }

    async fn touch_server(&self, name: &str) -> StoreResult<()> {
        fleet::touch_server(&self.pool, name).await
    }

    async fn reclaim_lost_server(
        &self,
        name: &str,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>> {
        fleet::reclaim_lost_server(&self.pool, name, fence).await
    }

    async fn revive_server(&self, name: &str) -> StoreResult<bool> {
        fleet::revive_server(&self.pool, name).await
    }

    async fn product_cells(&self, product: &str) -> StoreResult<Vec<CellRecord>> {
        books::product_cells(&self.pool, product).await
    }

    async fn product_cells_of(
        &self,
        product: &str,
        servers: &[String],
    ) -> StoreResult<Vec<CellRecord>> {
        books::product_cells_of(&self.pool, product, servers).await
    }

    async fn cell(&self, server: &str, product: &str) -> StoreResult<Option<CellRecord>> {
        books::cell(&self.pool, server, product).await
    }

    async fn last_peaks(&self, product: &str) -> StoreResult<HashMap<String, u64>> {
        books::last_peaks(&self.pool, product).await
    }

    async fn touch_servers(&self, names: &[String]) -> StoreResult<()> {
        fleet::touch_servers(&self.pool, names).await
    }

    async fn clear_reset(&self, name: &str) -> StoreResult<()> {
        fleet::clear_reset(&self.pool, name).await
    }

    async fn cells(&self) -> StoreResult<Vec<CellRecord>> {
        books::cells(&self.pool).await
    }

    async fn products_and_cells(&self) -> StoreResult<(Vec<Product>, Vec<CellRecord>)> {
        books::products_and_cells(&self.pool).await
    }

    async fn begin_run(&self, trigger: RunTrigger, fence: &Fence) -> StoreResult<i64> {
        runs::begin_run(&self.pool, trigger, fence.newest_epoch()).await
    }

    async fn finish_run(&self, run_id: i64, outcome: &RunOutcome) -> StoreResult<()> {
        runs::finish_run(&self.pool, run_id, outcome).await
    }

    async fn begin_run_with_moves(
        &self,
        trigger: RunTrigger,
        fence: &Fence,
        moves: &[NewMove],
    ) -> StoreResult<(i64, Vec<MoveRecord>)> {
        runs::begin_run_with_moves(&self.pool, trigger, fence, moves).await
    }

    async fn log_instant_grant(
        &self,
        fence: &Fence,
        grant: &NewMove,
        request_id: Uuid,
        reserve_as_read: u64,
    ) -> StoreResult<InstantLog> {
        runs::log_instant_grant(&self.pool, fence, grant, request_id, reserve_as_read).await
    }

    async fn finish_instant_run(
        &self,
        run_id: i64,
        outcome: &RunOutcome,
        answered: Option<(Uuid, &InstantRecord)>,
    ) -> StoreResult<()> {
        runs::finish_instant_run(&self.pool, run_id, outcome, answered).await
    }

    async fn complete_instant_grant(
        &self,
        landed: crate::store::LandedMove,
        fence: &Fence,
        run_id: i64,
        outcome: &RunOutcome,
        answered: (Uuid, &InstantRecord),
    ) -> StoreResult<MoveRecord> {
        runs::complete_instant_grant(&self.pool, landed, fence, run_id, outcome, answered).await
    }

    async fn record_samples(
        &self,
        run_id: i64,
        at_ms: i64,
        samples: &[UsageSample],
    ) -> StoreResult<()> {
        history::record_samples(&self.pool, run_id, at_ms, samples).await
    }

    async fn record_decisions(
        &self,
        run_id: i64,
        at_ms: i64,
        decisions: &[RunDecision],
    ) -> StoreResult<()> {
        runs::record_decisions(&self.pool, run_id, at_ms, decisions).await
    }

    async fn expire_from_reserve(
        &self,
        now_ms: i64,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>> {
        expiry::expire_from_reserve(&self.pool, now_ms, fence).await
    }

    async fn store_records(
        &self,
        server: &str,
        batch: &RecordBatch,
    ) -> StoreResult<(RecordAck, u64)> {
        records::store_records(&self.pool, server, batch).await
    }

    async fn usage_totals(&self, query: &RecordsQuery) -> StoreResult<Vec<UsageTotals>> {
        records::usage_totals(&self.pool, query).await
    }

    async fn usage_intervals(
        &self,
        product: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<Interval>> {
        records::usage_intervals(&self.pool, product, since_ms, until_ms).await
    }

    async fn prune_records(&self, before_ms: i64) -> StoreResult<u64> {
        records::prune_records(&self.pool, before_ms).await
    }

    async fn runs(&self, q: &RunsQuery) -> StoreResult<Vec<RunSummary>> {
        runs::runs(&self.pool, q).await
    }

    async fn run(&self, run_id: i64) -> StoreResult<RunDetail> {
        runs::run(&self.pool, run_id).await
    }

    async fn instant_start(&self, request_id: Uuid, product: &str) -> StoreResult<InstantStart> {
        runs::instant_start(&self.pool, request_id, product).await
    }

    async fn history(&self, q: &HistoryQuery) -> StoreResult<Vec<HistoryBucket>> {
        history::history(&self.pool, q).await
    }

    async fn roll_up(&self, until_ms: i64) -> StoreResult<u64> {
        history::roll_up(&self.pool, until_ms).await
    }

    async fn prune_history(
        &self,
        raw_before_ms: i64,
        hourly_before_ms: i64,
    ) -> StoreResult<(u64, u64)> {
        history::prune_history(&self.pool, raw_before_ms, hourly_before_ms).await
    }

    async fn samples_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, UsageSample)>> {
        history::samples_between(&self.pool, from_ms, to_ms).await
    }

    async fn peak_samples(
        &self,
        ranges: &[(i64, i64)],
    ) -> StoreResult<Vec<(String, String, i64, u64)>> {
        history::peak_samples(&self.pool, ranges).await
    }

    async fn instant_grants_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, String, String, u64)>> {
        history::instant_grants_between(&self.pool, from_ms, to_ms).await
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        settings::setting(&self.pool, key).await
    }

    async fn set_setting(&self, actor: &str, key: &str, value: &str) -> StoreResult<()> {
        settings::set_setting(&self.pool, actor, key, value).await
    }

    async fn take_shard(&self, shard: u32, url: &str) -> StoreResult<i64> {
        settings::take_shard(&self.pool, shard, url).await
    }

    async fn shard_leaders(&self) -> StoreResult<Vec<ShardLeader>> {
        settings::shard_leaders(&self.pool).await
    }

    async fn set_shard_count(&self, actor: &str, count: u32) -> StoreResult<()> {
        settings::set_shard_count(&self.pool, actor, count).await
    }
}

//! The books on PostgreSQL: production, and the shared store of several balancers.
//!
//! Transactions run at READ COMMITTED: every change to a pool is a single conditional
//! `UPDATE … WHERE reserve >= $n`, which PostgreSQL re-checks on the locked row, so concurrent
//! writers serialise on the product's row without serialisation failures to retry.

use super::StoreResult;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// The sqlx database type the shared SQL is compiled for here.
type Db = sqlx::Postgres;

// The shared SQL, compiled once per backend on purpose (see the module docs of `store`).
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;
pub use sql::SqlStore;

const BACKEND: &str = "postgres";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/balancer-postgres");

/// Every statement planned for the tables as they are when it runs (`plan_cache_mode =
/// force_custom_plan`), not once per connection. PostgreSQL otherwise settles, after five
/// executions, on a generic plan made for the tables as they were then: a balancer started on
/// a new estate plans "find this move" while the move log is empty, as a scan of the whole
/// table, and still runs that scan when a first distribution has logged 90,000 moves (15–20 ms
/// a booking instead of 0.1 ms, measured with `auto_explain`). The statements here are small
/// key lookups, whose planning costs far less than one such scan.
async fn connect_pool(url: &str) -> StoreResult<Pool<Db>> {
    let options =
        PgConnectOptions::from_str(url)?.options([("plan_cache_mode", "force_custom_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

async fn begin_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin().await
}

/// A write that books moves a server has already applied: its commit does not wait for the
/// WAL's flush (`synchronous_commit = off` for this transaction alone, set in the same round
/// trip as its `BEGIN`). Losing it in a crash of PostgreSQL loses nothing of the books: the
/// moves stay logged `planned` by a commit that did wait, their units in transit, and the
/// balancer's restart resends them (a server answers a move it applied with what it applied)
/// and books them again. Every later commit that waits for its flush also makes this one
/// durable (the WAL is one sequence), so a grant funded by a booked release never outlives it.
async fn begin_booking(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off")
        .await
}

/// A read of several statements that must see one commit (a product and its cells): at READ
/// COMMITTED each statement would take its own snapshot, and a move committed between them
/// would show books that do not add up.
async fn begin_read(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
}

/// Row lock on the product, taken first by every transaction that changes its pool. `NO KEY`:
/// writers of the pool still wait for each other, but not for the share locks that inserts of
/// rows naming the product (moves, decisions) hold until they commit, which a plain `FOR
/// UPDATE` would wait for, so an instant balance would wait for a run's large inserts.
const LOCK_PRODUCT: &str = "SELECT name FROM products WHERE id = $1 FOR NO KEY UPDATE";

/// What follows `SELECT … FROM products WHERE id IN (…) ORDER BY id` to lock several products
/// at once, in id order, in one round trip (the same row lock as [`LOCK_PRODUCT`]).
const LOCK_PRODUCTS_SUFFIX: &str = " FOR NO KEY UPDATE";

/// Marks moves `applied` (id, units applied) by one `UPDATE … FROM UNNEST` whatever their
/// number: it runs under the locks of every product in a run's booking group, so each round
/// trip saved is one an instant balance waiting on those locks does not wait. The caller read
/// them `planned` under their products' locks, which every end of a move takes. No `state =
/// 'planned'` condition here: with it, PostgreSQL may pick the partial index of planned
/// moves (its statistics, taken between runs, say there are few) and, while a run has tens
/// of thousands planned, scan them all to find one (7 ms instead of 0.1 ms, measured).
async fn mark_applied(
    conn: &mut sqlx::PgConnection,
    applied: &[(&String, &i64)],
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let ids: Vec<&str> = applied.iter().map(|(id, _)| id.as_str()).collect();
    let units: Vec<i64> = applied.iter().map(|(_, units)| **units).collect();
    Ok(sqlx::query(
        "UPDATE moves SET state = 'applied', applied_units = landed.units, updated_at = $3 \
         FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS landed (id, units) \
         WHERE moves.id = landed.id",
    )
    .bind(ids)
    .bind(units)
    .bind(now_ms)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Books the allocations a group of landed moves changes by one `UPDATE … FROM UNNEST`,
/// whatever their number of servers: it runs under the locks of every product in a run's
/// booking group, which touches hundreds of servers, so one statement per server was as many
/// round trips an instant balance waited out. Returns the rows changed.
async fn apply_to_allocations(
    conn: &mut sqlx::PgConnection,
    cells: &[sql::CellChange],
) -> Result<u64, sqlx::Error> {
    if cells.is_empty() {
        return Ok(0);
    }
    let column = |field: fn(&sql::CellChange) -> i64| cells.iter().map(field).collect::<Vec<_>>();
    Ok(sqlx::query(
        "UPDATE allocations SET units = allocations.units + landed.delta, \
         generation = GREATEST(allocations.generation, landed.generation) \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[]) \
         AS landed (server_id, product_id, delta, generation) \
         WHERE allocations.server_id = landed.server_id \
         AND allocations.product_id = landed.product_id",
    )
    .bind(column(|c| c.server_id))
    .bind(column(|c| c.product_id))
    .bind(column(|c| c.delta))
    .bind(column(|c| c.generation))
    .execute(conn)
    .await?
    .rows_affected())
}

/// The shards' epochs under a share lock: a takeover's update (or a new shard count) waits for
/// this transaction, and every transaction after it sees the new epoch and is fenced.
const LOCK_SHARDS: &str = "SELECT shard, epoch FROM leader_shards ORDER BY shard FOR SHARE";

/// Opens an instant balance's run and logs its one grant from the reserve by a single
/// statement, committed on its own (durably): one round trip where the general transaction
/// takes nine (`BEGIN`, the run, the names, the product's lock, the shards' epochs, the pool,
/// the cell, the move, `COMMIT`), each a wake-up of two processes that, during a run, wait
/// for a busy core. The same checks, in the same locks: the product's shard row, at the
/// fence's epoch and shard count, under a share lock (a takeover waits for it), the pool's
/// conditional `UPDATE` (the product's row lock, the reserve re-checked on the locked row), a
/// live server. With `as_read` (the reserve the plan was made from, the request's id) it logs
/// only while the reserve is still that and the request has no record. The run and the move
/// are inserted only if the pool moved. Returns the run's id if it logged, and the product's
/// row as [`crate::store::Store::instant_start`] reads it (`None`: no such product); nothing logged, the
/// caller either plans again from that row or takes the general path, which says why.
async fn log_run_with_grant(
    pool: &Pool<Db>,
    trigger: &str,
    fence: &allot_core::shard::Fence,
    grant: &crate::store::NewMove,
    units: i64,
    now_ms: i64,
    as_read: Option<(i64, &str)>,
) -> Result<Option<(Option<i64>, sql::InstantStartRow)>, sqlx::Error> {
    type Row = (
        Option<i64>,
        i64,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let row: Option<Row> = sqlx::query_as(
        "WITH fence AS (SELECT shard FROM leader_shards WHERE shard = $9 AND epoch = $1 \
                        AND (SELECT COUNT(*) FROM leader_shards) = $10 FOR SHARE), \
         server AS (SELECT id FROM servers WHERE name = $2 AND removed_at IS NULL), \
         pool AS (UPDATE products SET reserve = reserve - $3, in_transit = in_transit + $3 \
                  WHERE name = $4 AND reserve >= $3 \
                  AND ($11::BIGINT IS NULL OR reserve = $11) \
                  AND ($12::TEXT IS NULL OR NOT EXISTS \
                       (SELECT 1 FROM instant_requests WHERE id = $12)) \
                  AND EXISTS (SELECT 1 FROM fence) AND EXISTS (SELECT 1 FROM server) \
                  RETURNING id), \
         run AS (INSERT INTO balance_runs (trigger, status, epoch, started_at) \
                 SELECT $5, 'running', $6, $7 FROM pool RETURNING id), \
         cell AS (INSERT INTO allocations (server_id, product_id) \
                  SELECT server.id, pool.id FROM server, pool \
                  ON CONFLICT (server_id, product_id) DO NOTHING), \
         logged AS (INSERT INTO moves (id, run_id, product_id, server_id, kind, units, state, \
                    epoch, created_at, updated_at) \
                    SELECT $8, run.id, pool.id, server.id, 'grant', $3, 'planned', $1, $7, $7 \
                    FROM run, pool, server) \
         SELECT (SELECT id FROM run), p.reserve, s.name, rp.name, i.units, i.granted \
         FROM products p \
         LEFT JOIN instant_requests i ON i.id = $12 \
         LEFT JOIN servers s ON s.id = i.server_id \
         LEFT JOIN products rp ON rp.id = i.product_id \
         WHERE p.name = $4",
    )
    .bind(grant.epoch)
    .bind(&grant.server)
    .bind(units)
    .bind(&grant.product)
    .bind(trigger)
    .bind(fence.newest_epoch())
    .bind(now_ms)
    .bind(grant.id.to_string())
    .bind(i64::from(fence.shard_of(&grant.product)))
    .bind(i64::from(fence.count()))
    .bind(as_read.map(|(reserve, _)| reserve))
    .bind(as_read.map(|(_, request)| request))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(run, reserve, server, product, asked, granted)| {
        (run, (reserve, server, product, asked, granted))
    }))
}

/// Books an instant balance's grant from the reserve that its server applied, closes its run
/// and records the request answered, by one statement in the caller's booking transaction:
/// two round trips under the product's row lock (this and the commit) where the general
/// booking takes nine, so the next request for the same product waits that much less. The
/// same checks under the same locks: the shard's row at the fence's epoch and shard count
/// under a share lock, the product's row locked before the move's (as every writer orders
/// them), the move still `planned` (written so that the partial index of planned moves cannot
/// serve it: see [`mark_applied`]), a grant of the units applied, its cell present; the pool,
/// the cell, the run and the request change only if the move did, and a broken constraint
/// aborts all of it. Returns the booked move's run, server and epoch, or `None` when it booked nothing
/// (the caller then books the general way, which says why, or finds a repeat).
async fn book_instant_grant(
    conn: &mut sqlx::PgConnection,
    booking: &sql::InstantBooking<'_>,
    now_ms: i64,
) -> Result<Option<(Option<i64>, String, i64)>, sqlx::Error> {
    let (landed, fence, outcome, answered) = (
        &booking.landed,
        booking.fence,
        booking.outcome,
        booking.answered,
    );
    let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    sqlx::query_as(
        "WITH fence AS (SELECT shard FROM leader_shards WHERE shard = $1 AND epoch = $2 \
                        AND (SELECT COUNT(*) FROM leader_shards) = $3 FOR SHARE), \
         lock AS (SELECT id FROM products WHERE name = $4 FOR NO KEY UPDATE), \
         mv AS (UPDATE moves SET state = 'applied', applied_units = $6, updated_at = $7 \
                WHERE id = $5 AND state || '' = 'planned' AND kind = 'grant' AND units = $6 \
                AND product_id = (SELECT id FROM lock) AND EXISTS (SELECT 1 FROM fence) \
                AND EXISTS (SELECT 1 FROM allocations a WHERE a.server_id = moves.server_id \
                            AND a.product_id = moves.product_id) \
                RETURNING product_id, server_id, run_id, epoch), \
         pool AS (UPDATE products SET in_transit = products.in_transit - $6 FROM mv \
                  WHERE products.id = mv.product_id), \
         cell AS (UPDATE allocations SET units = allocations.units + $6, \
                  generation = GREATEST(allocations.generation, $8) FROM mv \
                  WHERE allocations.server_id = mv.server_id \
                  AND allocations.product_id = mv.product_id), \
         run AS (UPDATE balance_runs SET status = $9, finished_at = $7, servers_queried = $10, \
                 servers_unreachable = $11, moves = $12, units_moved = $13, errors = $14, \
                 unserved_true = $15, unserved_false = $16, ping_pong_units = $17 \
                 WHERE id = $18 AND EXISTS (SELECT 1 FROM mv)), \
         request AS (INSERT INTO instant_requests \
                     (id, server_id, product_id, units, granted, created_at) \
                     SELECT $19, s.id, mv.product_id, $20, $21, $7 FROM mv, servers s \
                     WHERE s.name = $22 AND s.removed_at IS NULL \
                     ON CONFLICT (id) DO NOTHING) \
         SELECT mv.run_id, s.name, mv.epoch FROM mv JOIN servers s ON s.id = mv.server_id",
    )
    .bind(i64::from(fence.shard_of(&answered.product)))
    .bind(fence.epoch_for(&answered.product).unwrap_or(-1))
    .bind(i64::from(fence.count()))
    .bind(&answered.product)
    .bind(landed.id.to_string())
    .bind(wide(landed.applied_units))
    .bind(now_ms)
    .bind(wide(landed.generation))
    .bind(&outcome.status)
    .bind(wide(outcome.servers_queried))
    .bind(wide(outcome.servers_unreachable))
    .bind(wide(outcome.moves))
    .bind(wide(outcome.units_moved))
    .bind(serde_json::to_string(&outcome.errors).ok())
    .bind(wide(outcome.unserved_true))
    .bind(wide(outcome.unserved_false))
    .bind(wide(outcome.ping_pong_units))
    .bind(booking.run_id)
    .bind(booking.request_id.to_string())
    .bind(wide(answered.units))
    .bind(wide(answered.granted))
    .bind(&answered.server)
    .fetch_optional(conn)
    .await
}

/// A chunk of a run's usage samples (up to 10,000, `sql::history`'s `SAMPLES_AT_ONCE`) in one
/// `INSERT … SELECT FROM UNNEST` of one array per column: one statement of sixteen arrays costs
/// PostgreSQL far less to parse and plan than twenty statements of 500 rows each.
async fn insert_samples(
    conn: &mut sqlx::PgConnection,
    run_id: i64,
    at_ms: i64,
    rows: &[sql::SampleRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let columns = sql::SAMPLE_COLUMNS;
    let arrays: Vec<String> = (0..columns.len())
        .map(|i| format!("${}::BIGINT[]", i + 3))
        .collect();
    let statement = format!(
        "INSERT INTO usage_samples (run_id, at, {}) SELECT $1, $2, * FROM UNNEST({})",
        columns.join(", "),
        arrays.join(", ")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(run_id)
        .bind(at_ms);
    for i in 0..columns.len() {
        query = query.bind(rows.iter().map(|row| row[i]).collect::<Vec<i64>>());
    }
    query.execute(conn).await?;
    Ok(())
}

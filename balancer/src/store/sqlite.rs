//! The books on SQLite: the embedded default, one file under the data directory.
//!
//! SQLite has one writer at a time. Write transactions begin with `BEGIN IMMEDIATE`, taking the
//! write lock up front, so two transactions that read then write can never deadlock on the
//! upgrade from read to write lock; `busy_timeout` queues them instead of failing. WAL mode lets
//! reads proceed during a write; `synchronous = FULL` makes each commit durable before it is
//! acknowledged (the books are worth an fsync per change).

use super::StoreResult;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// The sqlx database type the shared SQL is compiled for here.
type Db = sqlx::Sqlite;

// The shared SQL, compiled once per backend on purpose (see the module docs of `store`).
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;
pub use sql::SqlStore;

const BACKEND: &str = "sqlite";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/balancer-sqlite");

async fn connect_pool(url: &str) -> StoreResult<Pool<Db>> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?;
    Ok(pool)
}

async fn begin_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// A write that books moves a server has already applied: on SQLite a write like any other
/// (`synchronous` is the connection's, not a transaction's; and the commit is in-process).
async fn begin_booking(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    begin_write(pool).await
}

/// A read of several statements that must see one commit: in WAL mode a deferred transaction
/// reads one snapshot, taken at its first read, and takes no write lock.
async fn begin_read(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin_with("BEGIN DEFERRED").await
}

/// `BEGIN IMMEDIATE` already holds the database's write lock: reading the row is enough.
const LOCK_PRODUCT: &str = "SELECT name FROM products WHERE id = $1";

/// `BEGIN IMMEDIATE` already holds the database's write lock: several products need nothing more.
const LOCK_PRODUCTS_SUFFIX: &str = "";

/// Marks moves `applied` (id, units applied) in statements of 500 moves, each a `CASE` of
/// anonymous parameters (none used twice: SQLite looks a numbered one up by a linear scan).
/// The caller read them `planned` under the write lock, as on PostgreSQL.
async fn mark_applied(
    conn: &mut sqlx::SqliteConnection,
    applied: &[(&String, &i64)],
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    const CHUNK: usize = 500;
    let mut changed = 0;
    for chunk in applied.chunks(CHUNK) {
        let arms = " WHEN ? THEN ?".repeat(chunk.len());
        let list = vec!["?"; chunk.len()].join(", ");
        let statement = format!(
            "UPDATE moves SET state = 'applied', applied_units = CASE id{arms} END, \
             updated_at = ? WHERE id IN ({list})"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement));
        for (id, units) in chunk {
            query = query.bind(id.as_str()).bind(**units);
        }
        query = query.bind(now_ms);
        for (id, _) in chunk {
            query = query.bind(id.as_str());
        }
        changed += query.execute(&mut *conn).await?.rows_affected();
    }
    Ok(changed)
}

/// Books the allocations a group of landed moves changes: per server, one statement of
/// `CASE`s by product for at most 250 of its cells (anonymous parameters, none used twice).
/// Returns the rows changed. (In-process and under the one write lock, a statement per
/// server costs no round trip another writer waits out.)
async fn apply_to_allocations(
    conn: &mut sqlx::SqliteConnection,
    cells: &[sql::CellChange],
) -> Result<u64, sqlx::Error> {
    const CELLS_PER_STATEMENT: usize = 250;
    let mut changed = 0;
    for server in cells.chunk_by(|a, b| a.server_id == b.server_id) {
        for chunk in server.chunks(CELLS_PER_STATEMENT) {
            let units = " WHEN ? THEN ?".repeat(chunk.len());
            let generations = " WHEN ? THEN CASE WHEN generation > ? THEN generation ELSE ? END"
                .repeat(chunk.len());
            let list = vec!["?"; chunk.len()].join(", ");
            let statement = format!(
                "UPDATE allocations SET units = units + CASE product_id{units} END, \
                 generation = CASE product_id{generations} END \
                 WHERE server_id = ? AND product_id IN ({list})"
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(statement));
            for c in chunk {
                query = query.bind(c.product_id).bind(c.delta);
            }
            for c in chunk {
                query = query
                    .bind(c.product_id)
                    .bind(c.generation)
                    .bind(c.generation);
            }
            query = query.bind(chunk[0].server_id);
            for c in chunk {
                query = query.bind(c.product_id);
            }
            changed += query.execute(&mut *conn).await?.rows_affected();
        }
    }
    Ok(changed)
}

/// The shards' epochs; `BEGIN IMMEDIATE` already serialises them with a takeover.
const LOCK_SHARDS: &str = "SELECT shard, epoch FROM leader_shards ORDER BY shard";

/// The one-statement log of an instant balance's grant is PostgreSQL's (see there): SQLite has
/// no data-modifying `WITH`, and its statements are calls inside this process, not round trips,
/// so the general transaction costs little more. Always `None`: take the general path.
async fn log_run_with_grant(
    _pool: &Pool<Db>,
    _trigger: &str,
    _fence: &allot_core::shard::Fence,
    _grant: &crate::store::NewMove,
    _units: i64,
    _now_ms: i64,
    _as_read: Option<(i64, &str)>,
) -> Result<Option<(Option<i64>, sql::InstantStartRow)>, sqlx::Error> {
    Ok(None)
}

/// The one-statement booking of an instant balance's grant is PostgreSQL's (see there), for
/// the reasons [`log_run_with_grant`] gives. Always `None`: book it the general way.
async fn book_instant_grant(
    _conn: &mut sqlx::SqliteConnection,
    _booking: &sql::InstantBooking<'_>,
    _now_ms: i64,
) -> Result<Option<(Option<i64>, String, i64)>, sqlx::Error> {
    Ok(None)
}

/// A run's usage samples in multi-row `INSERT`s of 500 rows (9,000 parameters, within
/// SQLite's 32,766), all in the caller's transaction.
async fn insert_samples(
    conn: &mut sqlx::SqliteConnection,
    run_id: i64,
    at_ms: i64,
    rows: &[sql::SampleRow],
) -> Result<(), sqlx::Error> {
    const CHUNK: usize = 500;
    let columns = sql::SAMPLE_COLUMNS;
    for chunk in rows.chunks(CHUNK) {
        let statement = format!(
            "INSERT INTO usage_samples (run_id, at, {}) VALUES {}",
            columns.join(", "),
            sql::values_placeholders(chunk.len(), columns.len() + 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement));
        for row in chunk {
            query = query.bind(run_id).bind(at_ms);
            for value in row {
                query = query.bind(*value);
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

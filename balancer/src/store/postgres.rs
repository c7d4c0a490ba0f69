//! The books on PostgreSQL: production, and the shared store of several balancers.
//!
//! Transactions run at READ COMMITTED: every change to a pool is a single conditional
//! `UPDATE … WHERE reserve >= $n`, which PostgreSQL re-checks on the locked row, so concurrent
//! writers serialise on the product's row without serialisation failures to retry.

use super::StoreResult;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Pool, Transaction};
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

async fn connect_pool(url: &str) -> StoreResult<Pool<Db>> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    Ok(pool)
}

async fn begin_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>, sqlx::Error> {
    pool.begin().await
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

/// The shards' epochs under a share lock: a takeover's update (or a new shard count) waits for
/// this transaction, and every transaction after it sees the new epoch and is fenced.
const LOCK_SHARDS: &str = "SELECT shard, epoch FROM leader_shards ORDER BY shard FOR SHARE";

/// A run's usage samples in one `INSERT … SELECT FROM UNNEST` of one array per column: a
/// run over 100,000 cells writes 100,000 samples, and one statement of sixteen arrays costs
/// PostgreSQL far less to parse and plan than two hundred statements of 500 rows each.
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

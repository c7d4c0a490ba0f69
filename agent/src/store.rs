//! The metering server's durable log: one SQLite file in WAL mode under the data directory.
//!
//! In-memory state (an `allot_core::checkout::Book`) is authoritative for reads and decisions;
//! this store is the log that makes it survive kill -9. At start [`Store::load`] rebuilds the
//! book; afterwards one writer task applies batches of [`Mutation`]s, each batch in one
//! transaction (group commit), and only then acknowledges them.
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL`, so every commit fsyncs the WAL before
//! it returns. That survives a power loss, not only a process crash (WAL with `NORMAL` would
//! survive kill -9 but could lose the last commits on power loss). Group commit pays the fsync
//! once per batch, so FULL costs little throughput under load.

use allot_core::checkout::{
    AppliedMove, Book, CheckoutRecord, Handle, Millis, REVOCATION_KEPT_MS, Revocation,
};
use allot_core::domain::{MoveKind, Policy};
use allot_core::wire::agent::{MoveResponse, UsageCounters};
use allot_core::wire::records::{DenialRecord, RecordBatch, UsageRecord};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Row};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The migrations of the metering server's store, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/agent-sqlite");

/// Why the store failed; logged, never returned to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("sqlite: {0}")]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row cannot be read back (corruption or a newer format).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// One change to the durable state, in the order it was applied in memory.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// A product defined or its policy, allocation or generation set locally.
    Product {
        /// The product.
        name: String,
        /// Its policy.
        policy: Policy,
        /// Its allocation at the time.
        allocation: u32,
        /// Its generation at the time.
        generation: u64,
    },
    /// A checkout granted.
    Checkout(CheckoutRecord),
    /// A checkout ended (checkin or staleout).
    Checkin {
        /// The ended checkout.
        handle: Handle,
        /// Its product, so the batch knows whose totals to write.
        product: Arc<str>,
        /// Its usage record, written in the same transaction (absent for a checkout its client
        /// never received).
        usage: Option<Box<UsageRecord>>,
    },
    /// A checkout denied: its record, for the balancer.
    Denial(Box<DenialRecord>),
    /// The balancer stored these records: they leave the outbox.
    Shipped(Vec<Uuid>),
    /// A release or grant applied.
    Move {
        /// The move and its answer.
        applied: AppliedMove,
        /// When it was applied.
        at: Millis,
    },
    /// A successful sync renewed the balancer lease.
    Lease(LeaseRecord),
    /// An operator revoked a checkout: its row goes, the revocation is remembered, its usage
    /// record waits for the balancer.
    Revoke(Revocation, Option<Box<UsageRecord>>),
}

impl Mutation {
    fn product(&self) -> Option<&str> {
        match self {
            Mutation::Product { name, .. } => Some(name),
            Mutation::Checkout(r) => Some(&r.product),
            Mutation::Checkin { product, .. } => Some(product),
            Mutation::Move { applied, .. } => Some(&applied.product),
            Mutation::Lease(_) | Mutation::Shipped(_) => None,
            Mutation::Denial(_) => None,
            Mutation::Revoke(r, _) => Some(&r.product),
        }
    }
}

/// The balancer lease as persisted: a restart within it keeps granting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    /// New checkouts are granted only before this instant (Unix ms).
    pub until: Millis,
    /// When the last successful sync was sent (Unix ms): the balancer has been unreachable
    /// since then when the lease runs out.
    pub synced_at: Millis,
}

/// The open SQLite file.
#[derive(Debug)]
pub struct Store {
    conn: SqliteConnection,
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u32_of(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

impl Store {
    /// Opens (creating if needed) `agent.db` in `data_dir` and applies the migrations.
    #[tracing::instrument(skip_all, fields(data_dir = %data_dir.display()))]
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("agent.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // Migrate through a short-lived pool: `Migrator::run` on a bare connection yields a
        // future that is not `Send` for every lifetime, which a spawned server needs.
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        pool.close().await;
        // The `Checkpointer` copies the WAL beside the writer; this connection's own automatic
        // checkpoint (4,096 pages, not SQLite's 1,000) only copies what is left since its last
        // pass, so that the WAL then starts over from its beginning.
        let conn = SqliteConnection::connect_with(
            &options
                .clone()
                .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_FRAMES.to_string()),
        )
        .await?;
        Ok(Store { conn })
    }

    /// Rebuilds the in-memory book from the log. Live checkouts restart their staleout clock at
    /// `now`, since clients could not heartbeat while the server was down.
    #[tracing::instrument(skip_all)]
    pub async fn load(&mut self, book: &mut Book, now: Millis) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "SELECT name, policy, allocation, generation, peak_in_use, checkouts, denials, \
             overdrafts, staleouts, instant_requests FROM products",
        )
        .fetch_all(&mut self.conn)
        .await?;
        for row in rows {
            let name: String = row.try_get("name")?;
            let policy: String = row.try_get("policy")?;
            let policy: Policy = serde_json::from_str(&policy)
                .map_err(|e| StoreError::Corrupt(format!("policy of {name}: {e}")))?;
            let totals = UsageCounters {
                peak_in_use: u32_of(row.try_get("peak_in_use")?, "peak_in_use")?,
                checkouts: u64_of(row.try_get("checkouts")?, "checkouts")?,
                denials: u64_of(row.try_get("denials")?, "denials")?,
                overdrafts: u64_of(row.try_get("overdrafts")?, "overdrafts")?,
                staleouts: u64_of(row.try_get("staleouts")?, "staleouts")?,
                instant_requests: u64_of(row.try_get("instant_requests")?, "instant_requests")?,
            };
            book.restore_product(
                &name,
                policy,
                u32_of(row.try_get("allocation")?, "allocation")?,
                u64_of(row.try_get("generation")?, "generation")?,
                totals,
            );
        }
        let rows = sqlx::query(
            "SELECT handle, product, user, host, groups, seat, units, overdraft, created_ms, \
             borrowed_until_ms FROM checkouts ORDER BY rowid",
        )
        .fetch_all(&mut self.conn)
        .await?;
        for row in rows {
            let handle: String = row.try_get("handle")?;
            let record = CheckoutRecord {
                handle: handle
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("handle {handle:?}")))?,
                product: row.try_get("product")?,
                user: row.try_get("user")?,
                host: row.try_get("host")?,
                groups: serde_json::from_str(&row.try_get::<String, _>("groups")?)
                    .map_err(|e| StoreError::Corrupt(format!("groups of {handle}: {e}")))?,
                seat: row.try_get("seat")?,
                units: u32_of(row.try_get("units")?, "units")?,
                overdraft: row.try_get::<i64, _>("overdraft")? != 0,
                created_at: u64_of(row.try_get("created_ms")?, "created_ms")?,
                borrowed_until: row
                    .try_get::<Option<i64>, _>("borrowed_until_ms")?
                    .map(|ms| u64_of(ms, "borrowed_until_ms"))
                    .transpose()?,
            };
            book.restore_checkout(&record, now);
        }
        // Revocations: the old are forgotten (the holder would have staled out since), the rest
        // still answer the holder `license_revoked`.
        let horizon = now.saturating_sub(REVOCATION_KEPT_MS);
        sqlx::query("DELETE FROM revocations WHERE revoked_ms < ?")
            .bind(i64_of(horizon))
            .execute(&mut self.conn)
            .await?;
        let rows = sqlx::query(
            "SELECT handle, product, revoked_ms, reason FROM revocations ORDER BY revoked_ms",
        )
        .fetch_all(&mut self.conn)
        .await?;
        for row in rows {
            let handle: String = row.try_get("handle")?;
            book.restore_revocation(Revocation {
                handle: handle
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("revoked handle {handle:?}")))?,
                product: row.try_get("product")?,
                at: u64_of(row.try_get("revoked_ms")?, "revoked_ms")?,
                reason: row.try_get("reason")?,
            });
        }
        let rows = sqlx::query(
            "SELECT move_id, kind, product, requested, units, allocation, generation FROM moves",
        )
        .fetch_all(&mut self.conn)
        .await?;
        for row in rows {
            let id: String = row.try_get("move_id")?;
            let kind: String = row.try_get("kind")?;
            book.restore_move(AppliedMove {
                kind: kind.parse::<MoveKind>().map_err(StoreError::Corrupt)?,
                product: row.try_get("product")?,
                requested: u32_of(row.try_get("requested")?, "requested")?,
                response: MoveResponse {
                    move_id: id
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("move id {id:?}")))?,
                    units: u32_of(row.try_get("units")?, "units")?,
                    allocation: u32_of(row.try_get("allocation")?, "allocation")?,
                    generation: u64_of(row.try_get("generation")?, "generation")?,
                },
            });
        }
        Ok(())
    }

    /// The persisted balancer lease, if a sync ever succeeded.
    #[tracing::instrument(skip_all)]
    pub async fn load_lease(&mut self) -> Result<Option<LeaseRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, value FROM settings WHERE key IN ('lease_until_ms', 'last_sync_ms')",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let (mut until, mut synced_at) = (None, None);
        for row in rows {
            let key: String = row.try_get("key")?;
            let value = u64_of(row.try_get("value")?, &key)?;
            match key.as_str() {
                "lease_until_ms" => until = Some(value),
                _ => synced_at = Some(value),
            }
        }
        Ok(until.map(|until| LeaseRecord {
            until,
            synced_at: synced_at.unwrap_or(0),
        }))
    }

    /// Writes one batch in one transaction, then the totals of the products it touched.
    /// Returns only once the commit is durable.
    #[tracing::instrument(skip_all, fields(mutations = batch.len()))]
    pub async fn write_batch(
        &mut self,
        batch: &[Mutation],
        totals: &[(String, UsageCounters)],
    ) -> Result<(), StoreError> {
        let mut tx = self.conn.begin().await?;
        // Checkouts and checkins go out as multi-row statements: the SQLite driver runs on its
        // own thread, so one statement per row would cost a thread round trip per row.
        let mut inserts: Vec<&CheckoutRecord> = Vec::new();
        let mut deletes: Vec<Handle> = Vec::new();
        for m in batch {
            match m {
                Mutation::Checkout(r) => inserts.push(r),
                Mutation::Checkin { handle, usage, .. } => {
                    deletes.push(*handle);
                    if let Some(usage) = usage {
                        outbox(&mut tx, usage.id, "usage", usage.ended_at, usage).await?;
                    }
                }
                Mutation::Denial(denial) => {
                    outbox(&mut tx, denial.id, "denial", denial.at, denial).await?;
                }
                Mutation::Shipped(ids) => {
                    for id in ids {
                        sqlx::query("DELETE FROM outbox WHERE id = ?")
                            .bind(id.to_string())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                Mutation::Product {
                    name,
                    policy,
                    allocation,
                    generation,
                } => {
                    flush_checkouts(&mut tx, &mut inserts, &mut deletes).await?;
                    let policy = serde_json::to_string(policy)
                        .map_err(|e| StoreError::Corrupt(format!("policy of {name}: {e}")))?;
                    sqlx::query(
                        "INSERT INTO products (name, policy, allocation, generation) \
                         VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET \
                         policy = excluded.policy, allocation = excluded.allocation, \
                         generation = excluded.generation",
                    )
                    .bind(name.as_str())
                    .bind(policy)
                    .bind(i64::from(*allocation))
                    .bind(i64_of(*generation))
                    .execute(&mut *tx)
                    .await?;
                }
                Mutation::Move { applied, at } => {
                    flush_checkouts(&mut tx, &mut inserts, &mut deletes).await?;
                    let r = &applied.response;
                    sqlx::query(
                        "INSERT INTO moves (move_id, kind, product, requested, units, \
                         allocation, generation, applied_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(r.move_id.to_string())
                    .bind(applied.kind.as_str())
                    .bind(applied.product.as_str())
                    .bind(i64::from(applied.requested))
                    .bind(i64::from(r.units))
                    .bind(i64::from(r.allocation))
                    .bind(i64_of(r.generation))
                    .bind(i64_of(*at))
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE products SET allocation = ?, generation = ? WHERE name = ?",
                    )
                    .bind(i64::from(r.allocation))
                    .bind(i64_of(r.generation))
                    .bind(applied.product.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
                Mutation::Revoke(r, usage) => {
                    // The checkout may have been inserted earlier in this batch.
                    flush_checkouts(&mut tx, &mut inserts, &mut deletes).await?;
                    if let Some(usage) = usage {
                        outbox(&mut tx, usage.id, "usage", usage.ended_at, usage).await?;
                    }
                    sqlx::query("DELETE FROM checkouts WHERE handle = ?")
                        .bind(r.handle.to_string())
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "INSERT INTO revocations (handle, product, revoked_ms, reason) \
                         VALUES (?, ?, ?, ?) ON CONFLICT (handle) DO NOTHING",
                    )
                    .bind(r.handle.to_string())
                    .bind(r.product.as_str())
                    .bind(i64_of(r.at))
                    .bind(r.reason.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
                Mutation::Lease(lease) => {
                    for (key, value) in [
                        ("lease_until_ms", lease.until),
                        ("last_sync_ms", lease.synced_at),
                    ] {
                        sqlx::query(
                            "INSERT INTO settings (key, value) VALUES (?, ?) \
                             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        )
                        .bind(key)
                        .bind(i64_of(value))
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
        }
        flush_checkouts(&mut tx, &mut inserts, &mut deletes).await?;
        for (name, t) in totals {
            sqlx::query(
                "UPDATE products SET peak_in_use = ?, checkouts = ?, denials = ?, \
                 overdrafts = ?, staleouts = ?, instant_requests = ? WHERE name = ?",
            )
            .bind(i64::from(t.peak_in_use))
            .bind(i64_of(t.checkouts))
            .bind(i64_of(t.denials))
            .bind(i64_of(t.overdrafts))
            .bind(i64_of(t.staleouts))
            .bind(i64_of(t.instant_requests))
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Checkpoints the WAL into the main file and closes the connection cleanly.
    #[tracing::instrument(skip_all)]
    pub async fn close(mut self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await?;
        Ok(())
    }
}

/// WAL frames (pages, 16 MiB) past which the writer's own connection checkpoints after a
/// commit, as SQLite does by default at 1,000. With the [`Checkpointer`] running, that pass
/// finds only the frames written since the checkpointer's last pass; once it has copied them
/// the next transaction restarts the WAL from its beginning (a passive pass from another
/// connection rarely finds the WAL wholly copied while commits keep coming, so it cannot).
const WRITER_CHECKPOINT_FRAMES: u32 = 4096;

/// Copies the WAL into the main database file on a connection (and so a SQLite thread) of its
/// own. Why: SQLite's automatic checkpoint runs inside the commit that crosses its threshold,
/// so every ~1,000 pages one group commit also copied them all and fsynced the main file while
/// every request of its batch waited. Here the commits append to the WAL and fsync it
/// (`synchronous=FULL`: a change is durable, and acknowledged, once its WAL frames are synced,
/// exactly as before) while the copying runs beside them, in `PASSIVE` passes that never block
/// the writer. See [`WRITER_CHECKPOINT_FRAMES`] for how the WAL still starts over.
pub struct Checkpointer {
    conn: SqliteConnection,
}

impl Checkpointer {
    /// Opens its own connection to `agent.db` (after [`Store::open`] created it).
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("agent.db"))
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        Ok(Checkpointer {
            conn: SqliteConnection::connect_with(&options).await?,
        })
    }

    /// One passive checkpoint pass; returns the WAL frames it left to copy.
    pub async fn pass(&mut self) -> Result<i64, StoreError> {
        let (_busy, log, copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut self.conn)
                .await?;
        Ok((log - copied).max(0))
    }

    /// Runs passes until `stop` is set: every 5 ms while the WAL had frames to copy, every
    /// 100 ms otherwise. A failed pass is logged and retried (the writer's own checkpoint
    /// bounds the WAL meanwhile).
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let pause = match self.pass().await {
                Ok(0) => Duration::from_millis(100),
                Ok(_) => Duration::from_millis(5),
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                    Duration::from_secs(1)
                }
            };
            if *stop.borrow() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
        }
        let _ = self.conn.close().await;
    }
}

/// Puts a record in the outbox, in the transaction of what it records.
async fn outbox<T: serde::Serialize>(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: Uuid,
    kind: &str,
    at: chrono::DateTime<chrono::Utc>,
    record: &T,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
    sqlx::query(
        "INSERT INTO outbox (id, kind, body, created_ms) VALUES (?, ?, ?, ?) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(kind)
    .bind(body)
    .bind(at.timestamp_millis())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A reader of the outbox on a connection of its own (WAL lets it read beside the writer):
/// the shipper takes the oldest records from it and, once the balancer has stored them, asks
/// the writer to delete them.
pub struct OutboxReader {
    conn: SqliteConnection,
}

impl OutboxReader {
    /// Opens `agent.db` in `data_dir` read-only (the writer has created and migrated it).
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("agent.db"))
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        Ok(Self {
            conn: SqliteConnection::connect_with(&options).await?,
        })
    }

    /// The oldest `limit` records: a batch to ship, and how many are waiting in all.
    pub async fn oldest(
        &mut self,
        limit: u32,
    ) -> Result<(RecordBatch, Vec<Uuid>, u64), StoreError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT id, kind, body FROM outbox ORDER BY seq LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&mut self.conn)
                .await?;
        let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&mut self.conn)
            .await?;
        let mut batch = RecordBatch::default();
        let mut ids = Vec::with_capacity(rows.len());
        for (id, kind, body) in rows {
            let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("record {id}: {e}"));
            match kind.as_str() {
                "usage" => batch
                    .usage
                    .push(serde_json::from_str(&body).map_err(corrupt)?),
                _ => batch
                    .denials
                    .push(serde_json::from_str(&body).map_err(corrupt)?),
            }
            ids.push(
                Uuid::parse_str(&id)
                    .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?,
            );
        }
        Ok((batch, ids, u64::try_from(waiting).unwrap_or(0)))
    }
}

/// Row counts of the multi-row statements: few distinct texts, so prepared statements are
/// reused from the driver's cache.
const CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

fn chunk_size(left: usize) -> usize {
    CHUNKS.into_iter().find(|c| *c <= left).unwrap_or(1)
}

/// Writes pending checkout inserts, then pending deletes (a checkin always follows its
/// checkout, so inserts go first), in multi-row statements.
async fn flush_checkouts(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    inserts: &mut Vec<&CheckoutRecord>,
    deletes: &mut Vec<Handle>,
) -> Result<(), StoreError> {
    let mut rest: &[&CheckoutRecord] = inserts;
    while !rest.is_empty() {
        let n = chunk_size(rest.len());
        let (chunk, tail) = rest.split_at(n);
        let mut sql = String::from(
            "INSERT INTO checkouts (handle, product, user, host, groups, seat, units, \
             overdraft, created_ms, borrowed_until_ms) VALUES ",
        );
        for i in 0..n {
            sql.push_str(if i == 0 {
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            });
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.handle.to_string())
                .bind(r.product.as_str())
                .bind(r.user.as_str())
                .bind(r.host.as_str())
                .bind(serde_json::to_string(&r.groups).unwrap_or_else(|_| "[]".to_owned()))
                .bind(r.seat.as_deref())
                .bind(i64::from(r.units))
                .bind(i64::from(r.overdraft))
                .bind(i64_of(r.created_at))
                .bind(r.borrowed_until.map(i64_of));
        }
        q.execute(&mut **tx).await?;
        rest = tail;
    }
    inserts.clear();
    let mut rest: &[Handle] = deletes;
    while !rest.is_empty() {
        let n = chunk_size(rest.len());
        let (chunk, tail) = rest.split_at(n);
        let mut sql = String::from("DELETE FROM checkouts WHERE handle IN (");
        for i in 0..n {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
        }
        sql.push(')');
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for h in chunk {
            q = q.bind(h.to_string());
        }
        q.execute(&mut **tx).await?;
        rest = tail;
    }
    deletes.clear();
    Ok(())
}

/// The products a batch touched, so only their totals are written.
pub fn touched(batch: &[Mutation]) -> Vec<&str> {
    let mut out: Vec<&str> = batch.iter().filter_map(Mutation::product).collect();
    out.sort_unstable();
    out.dedup();
    out
}

//! The metering server's durable log: one SQLite file in WAL mode under the data directory.
//!
//! In-memory state (an `allot_core::checkout::Book`) is authoritative for reads and decisions;
//! this store is the log that makes it survive kill -9. At start [`Store::load`] rebuilds the
//! book; afterwards the writer's thread, through [`StoreWriter`], applies batches of
//! [`Mutation`]s, each batch in one transaction (group commit), and only then acknowledges
//! them.
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
use std::collections::HashMap;
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
    /// SQLite refused an operation on the writer's connection.
    #[error("sqlite: {0}")]
    Write(#[from] rusqlite::Error),
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

/// The open SQLite file, and the row number of each live checkout in it.
///
/// Why the row numbers: a handle is a random secret, so an index on handles put every
/// checkout's insert and every checkin's delete on a random page of it (about one page written
/// per row of a group commit). The table is keyed by a row number this store assigns instead:
/// inserts append to its last page and a checkin marks the number kept here ended (see
/// `Sweep`). After a failed write the map may be ahead of the file; the server then refuses
/// further changes and a restart rebuilds it from the file.
#[derive(Debug)]
pub struct Store {
    conn: SqliteConnection,
    /// `agent.db`, for the writer's connection.
    path: PathBuf,
    rows: HashMap<Handle, i64>,
    next_row: i64,
    sweep: Sweep,
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
        let conn = SqliteConnection::connect_with(&options).await?;
        Ok(Store {
            conn,
            path: data_dir.join("agent.db"),
            rows: HashMap::new(),
            next_row: 1,
            sweep: Sweep::default(),
        })
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
        // Rows marked ended (migration 0008) are not live; those still in `checkouts` wait
        // for the sweep.
        let marks: Vec<(i64, i64)> = sqlx::query_as("SELECT seq, row FROM ended")
            .fetch_all(&mut self.conn)
            .await?;
        let ended: std::collections::HashSet<i64> = marks.iter().map(|&(_, row)| row).collect();
        let seqs = marks.iter().map(|&(seq, _)| seq);
        self.sweep = Sweep::restored(seqs.clone().min().zip(seqs.max()));
        // A new checkout must never get the number of a marked row: the mark would end it.
        self.next_row = marks.iter().map(|&(_, row)| row + 1).fold(1, i64::max);
        let rows = sqlx::query(
            "SELECT row, handle, product, user, host, groups, seat, units, overdraft, \
             created_ms, borrowed_until_ms FROM checkouts ORDER BY row",
        )
        .fetch_all(&mut self.conn)
        .await?;
        self.rows.clear();
        self.rows.reserve(rows.len());
        for row in rows {
            let number: i64 = row.try_get("row")?;
            self.next_row = self.next_row.max(number + 1);
            if ended.contains(&number) {
                self.sweep.unswept(number);
                continue;
            }
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
            self.rows.insert(record.handle, number);
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

    /// Hands the store to the group-commit writer: closes this connection and opens the
    /// writer's own, a synchronous one (see [`StoreWriter`]), with the live checkouts' row
    /// numbers [`Store::load`] read.
    pub async fn into_writer(self) -> Result<StoreWriter, StoreError> {
        let Store {
            conn,
            path,
            rows,
            next_row,
            sweep,
        } = self;
        conn.close().await?;
        let conn = tokio::task::spawn_blocking(move || StoreWriter::connect(&path))
            .await
            .map_err(|e| StoreError::Corrupt(format!("opening the writer's connection: {e}")))??;
        Ok(StoreWriter {
            conn,
            rows,
            next_row,
            sweep,
        })
    }
}

/// The store's write side: one SQLite connection the group-commit writer's own thread calls
/// synchronously. Why not sqlx here as everywhere else: sqlx's SQLite driver runs each
/// connection on a thread of its own, so every group commit was a hand-off from the writer to
/// that thread and back, and a batch's every statement another; each hand-off is a thread
/// wake-up inside the serial commit cycle every request waits on (docs/BENCHMARKS.md).
#[derive(Debug)]
pub struct StoreWriter {
    conn: rusqlite::Connection,
    rows: HashMap<Handle, i64>,
    next_row: i64,
    sweep: Sweep,
}

impl StoreWriter {
    /// Opens the writer's connection to `agent.db` at `path` (created and migrated by
    /// [`Store::open`]): WAL, `synchronous=FULL`, and the writer's own checkpoint threshold.
    fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The `Checkpointer` copies the WAL beside the writer; this connection's own automatic
        // checkpoint only copies what is left since its last pass, so that the WAL then starts
        // over from its beginning.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_FRAMES)?;
        Ok(conn)
    }

    /// Writes one batch in one transaction, then the totals of the products it touched.
    /// Returns only once the commit is durable.
    #[tracing::instrument(skip_all, fields(mutations = batch.len()))]
    pub fn write_batch(
        &mut self,
        batch: &[Mutation],
        totals: &[(String, UsageCounters)],
    ) -> Result<(), StoreError> {
        let StoreWriter {
            conn,
            rows,
            next_row,
            sweep,
        } = self;
        // Dropped without a commit (an error below), the transaction rolls back.
        let tx = conn.transaction()?;
        let mut marked = 0;
        for m in batch {
            match m {
                Mutation::Checkout(r) => {
                    let row = *next_row;
                    *next_row += 1;
                    rows.insert(r.handle, row);
                    insert_checkout(&tx, row, r)?;
                }
                Mutation::Checkin { handle, usage, .. } => {
                    if let Some(row) = rows.remove(handle) {
                        mark_ended(&tx, sweep, row)?;
                        marked += 1;
                    }
                    if let Some(usage) = usage {
                        put_record(&tx, usage.id, "usage", usage.ended_at, usage)?;
                    }
                }
                Mutation::Denial(denial) => {
                    put_record(&tx, denial.id, "denial", denial.at, denial)?;
                }
                Mutation::Shipped(ids) => {
                    let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE id = ?")?;
                    for id in ids {
                        delete.execute([id.to_string()])?;
                    }
                }
                Mutation::Product {
                    name,
                    policy,
                    allocation,
                    generation,
                } => {
                    let policy = serde_json::to_string(policy)
                        .map_err(|e| StoreError::Corrupt(format!("policy of {name}: {e}")))?;
                    tx.prepare_cached(
                        "INSERT INTO products (name, policy, allocation, generation) \
                         VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET \
                         policy = excluded.policy, allocation = excluded.allocation, \
                         generation = excluded.generation",
                    )?
                    .execute(rusqlite::params![
                        name,
                        policy,
                        allocation,
                        i64_of(*generation)
                    ])?;
                }
                Mutation::Move { applied, at } => {
                    let r = &applied.response;
                    tx.prepare_cached(
                        "INSERT INTO moves (move_id, kind, product, requested, units, \
                         allocation, generation, applied_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    )?
                    .execute(rusqlite::params![
                        r.move_id.to_string(),
                        applied.kind.as_str(),
                        applied.product,
                        applied.requested,
                        r.units,
                        r.allocation,
                        i64_of(r.generation),
                        i64_of(*at),
                    ])?;
                    tx.prepare_cached(
                        "UPDATE products SET allocation = ?, generation = ? WHERE name = ?",
                    )?
                    .execute(rusqlite::params![
                        r.allocation,
                        i64_of(r.generation),
                        applied.product
                    ])?;
                }
                Mutation::Revoke(r, usage) => {
                    if let Some(row) = rows.remove(&r.handle) {
                        mark_ended(&tx, sweep, row)?;
                        marked += 1;
                    }
                    if let Some(usage) = usage {
                        put_record(&tx, usage.id, "usage", usage.ended_at, usage)?;
                    }
                    tx.prepare_cached(
                        "INSERT INTO revocations (handle, product, revoked_ms, reason) \
                         VALUES (?, ?, ?, ?) ON CONFLICT (handle) DO NOTHING",
                    )?
                    .execute(rusqlite::params![
                        r.handle.to_string(),
                        r.product,
                        i64_of(r.at),
                        r.reason
                    ])?;
                }
                Mutation::Lease(lease) => {
                    let mut set = tx.prepare_cached(
                        "INSERT INTO settings (key, value) VALUES (?, ?) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    )?;
                    set.execute(rusqlite::params!["lease_until_ms", i64_of(lease.until)])?;
                    set.execute(rusqlite::params!["last_sync_ms", i64_of(lease.synced_at)])?;
                }
            }
        }
        let step = sweep.step(rows.len(), marked);
        if !step.rows.is_empty() {
            let mut delete = tx.prepare_cached("DELETE FROM checkouts WHERE row = ?")?;
            for row in &step.rows {
                delete.execute([row])?;
            }
        }
        if let Some((after, through)) = step.marks {
            tx.prepare_cached("DELETE FROM ended WHERE seq > ? AND seq <= ?")?
                .execute([after, through])?;
        }
        if !totals.is_empty() {
            let mut update = tx.prepare_cached(
                "UPDATE products SET peak_in_use = ?, checkouts = ?, denials = ?, \
                 overdrafts = ?, staleouts = ?, instant_requests = ? WHERE name = ?",
            )?;
            for (name, t) in totals {
                update.execute(rusqlite::params![
                    t.peak_in_use,
                    i64_of(t.checkouts),
                    i64_of(t.denials),
                    i64_of(t.overdrafts),
                    i64_of(t.staleouts),
                    i64_of(t.instant_requests),
                    name
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A passive checkpoint on the writer's own connection, for a moment when no request
    /// waits: it copies what the [`Checkpointer`] has not yet, and once the WAL is wholly
    /// copied the next transaction starts it over from its beginning.
    /// Returns the WAL's frames when it ran.
    pub fn checkpoint_while_idle(&mut self) -> Result<i64, StoreError> {
        let log = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))?;
        Ok(log)
    }

    /// Checkpoints the WAL into the main file and closes the connection cleanly.
    #[tracing::instrument(skip_all)]
    pub fn close(self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        self.conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}

/// WAL frames (pages, 64 MiB) past which the writer's own connection checkpoints after a
/// commit, as SQLite does by default at 1,000: a backstop for a writer that never finds a
/// moment without a request waiting (see [`Store::checkpoint_while_idle`], which normally
/// starts the WAL over). A checkpoint run by the writer runs inside a group commit, and every
/// request of it waits; at 4,096 pages that made the open-loop p99 about 21 ms in the agent
/// bench, against 9–14 ms with the idle checkpoint first (docs/BENCHMARKS.md).
const WRITER_CHECKPOINT_FRAMES: u32 = 16_384;

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

    /// Runs passes until `stop` is set: every 5 ms while the WAL had frames to copy; once it
    /// had none, 100 ms later at the soonest and then only after the writer's next commit
    /// (`commits`, which the writer notifies after each), so an idle server never wakes for
    /// it (a thousand idle servers polling ten times a second each took most of a core in the
    /// estate bench, whose servers share one machine). A failed pass is logged and retried
    /// (the writer's own checkpoint bounds the WAL meanwhile).
    pub async fn run(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        commits: std::sync::Arc<tokio::sync::Notify>,
    ) {
        loop {
            let (pause, copied_all) = match self.pass().await {
                Ok(0) => (Duration::from_millis(100), true),
                Ok(_) => (Duration::from_millis(5), false),
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                    (Duration::from_secs(1), false)
                }
            };
            if *stop.borrow() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
            // A commit made meanwhile left its permit: the wait ends at once.
            if copied_all {
                tokio::select! {
                    _ = commits.notified() => {}
                    _ = stop.changed() => break,
                }
            }
        }
        let _ = self.conn.close().await;
    }
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

/// Inserts a live checkout at its row number.
fn insert_checkout(
    tx: &rusqlite::Transaction<'_>,
    row: i64,
    r: &CheckoutRecord,
) -> Result<(), StoreError> {
    let groups = serde_json::to_string(&r.groups)
        .map_err(|e| StoreError::Corrupt(format!("groups of {}: {e}", r.handle)))?;
    tx.prepare_cached(
        "INSERT INTO checkouts (row, handle, product, user, host, groups, seat, units, \
         overdraft, created_ms, borrowed_until_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(rusqlite::params![
        row,
        r.handle.to_string(),
        r.product,
        r.user,
        r.host,
        groups,
        r.seat,
        r.units,
        r.overdraft,
        i64_of(r.created_at),
        r.borrowed_until.map(i64_of),
    ])?;
    Ok(())
}

/// Marks a checkout's row ended (migration 0008); the sweep deletes the row later.
fn mark_ended(
    tx: &rusqlite::Transaction<'_>,
    sweep: &mut Sweep,
    row: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO ended (seq, row) VALUES (?, ?)")?
        .execute([sweep.mark(row), row])?;
    Ok(())
}

/// Puts a usage or denial record in the outbox, in the transaction of what it records.
fn put_record<T: serde::Serialize>(
    tx: &rusqlite::Transaction<'_>,
    id: Uuid,
    kind: &'static str,
    at: chrono::DateTime<chrono::Utc>,
    record: &T,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
    tx.prepare_cached(
        "INSERT INTO outbox (id, kind, body, created_ms) VALUES (?, ?, ?, ?) \
         ON CONFLICT (id) DO NOTHING",
    )?
    .execute(rusqlite::params![
        id.to_string(),
        kind,
        body,
        at.timestamp_millis()
    ])?;
    Ok(())
}

/// Ended checkouts whose rows are still in `checkouts` (migration 0008), and when to delete
/// them and their marks. Why: checkouts end in no particular order, so deleting each at its
/// checkin wrote a page of its own per checkin; deleting them later, in row order, many at a
/// time, writes each page once for all the ended rows on it.
///
/// Rows are swept by generations: once enough rows are marked (a quarter of the live ones, at
/// least [`SWEEP_AT_LEAST`]), those rows become the generation under way, and every group
/// commit deletes the lowest of them, twice as many as it marked itself (plus
/// [`SWEEP_BASE`]), so a generation ends well before the next is due. Once a generation is
/// swept, its marks (all those assigned before it began) are deleted, [`MARKS_AT_ONCE`] a
/// commit. A crash between steps leaves a valid file: a marked row is not live whether it is
/// still there or not, and a mark whose row is gone is only deleted later.
#[derive(Debug, Default)]
struct Sweep {
    /// Rows marked since the generation under way began.
    next: Vec<i64>,
    /// The generation under way: its rows not yet deleted, lowest first.
    current: std::collections::VecDeque<i64>,
    /// The last mark the generation under way covers.
    through: Option<i64>,
    /// Every mark up to this one is deleted.
    marks_deleted: i64,
    /// Every mark up to this one may be deleted: its row is gone.
    marks_done: i64,
    /// The last mark's sequence number.
    last_seq: i64,
}

/// The fewest marked rows that start a generation.
const SWEEP_AT_LEAST: usize = 1_024;

/// Rows a group commit deletes beyond twice those it marked, so a generation also ends under
/// checkouts alone.
const SWEEP_BASE: usize = 64;

/// The most marks a group commit deletes (deleting a generation's marks at once held one
/// commit for milliseconds).
const MARKS_AT_ONCE: i64 = 2_048;

/// What one group commit deletes.
#[derive(Debug, Default, PartialEq, Eq)]
struct SweepStep {
    /// Rows to delete from `checkouts`, lowest first.
    rows: Vec<i64>,
    /// Marks to delete: those after the first number, up to the second.
    marks: Option<(i64, i64)>,
}

impl Sweep {
    /// The state at start, from the lowest and highest marks in the file.
    fn restored(marks: Option<(i64, i64)>) -> Self {
        let (first, last) = marks.unwrap_or((1, 0));
        Sweep {
            marks_deleted: first - 1,
            marks_done: first - 1,
            last_seq: last,
            ..Sweep::default()
        }
    }

    /// A marked row found still in `checkouts` at start.
    fn unswept(&mut self, row: i64) {
        self.next.push(row);
    }

    /// Marks `row` ended; returns the mark's sequence number.
    fn mark(&mut self, row: i64) -> i64 {
        self.last_seq += 1;
        self.next.push(row);
        self.last_seq
    }

    /// What a group commit that marked `marked` rows deletes, with `live` checkouts left.
    fn step(&mut self, live: usize, marked: usize) -> SweepStep {
        let mut step = SweepStep::default();
        if self.through.is_none() && self.next.len() >= SWEEP_AT_LEAST.max(live / 4) {
            let mut rows = std::mem::take(&mut self.next);
            rows.sort_unstable();
            self.current = rows.into();
            self.through = Some(self.last_seq);
        }
        if let Some(through) = self.through {
            let take = (2 * marked + SWEEP_BASE).min(self.current.len());
            step.rows = self.current.drain(..take).collect();
            if self.current.is_empty() {
                self.marks_done = through;
                self.through = None;
            }
        }
        if self.marks_deleted < self.marks_done {
            let upto = self.marks_done.min(self.marks_deleted + MARKS_AT_ONCE);
            step.marks = Some((self.marks_deleted, upto));
            self.marks_deleted = upto;
        }
        step
    }
}

/// The products a batch touched, so only their totals are written.
pub fn touched(batch: &[Mutation]) -> Vec<&str> {
    let mut out: Vec<&str> = batch.iter().filter_map(Mutation::product).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout(handle: u128) -> Mutation {
        Mutation::Checkout(CheckoutRecord {
            handle: Handle(handle),
            product: "cad".to_owned(),
            user: format!("user-{handle}"),
            host: "host".to_owned(),
            groups: vec!["eng".to_owned()],
            seat: None,
            units: 1,
            overdraft: false,
            created_at: 1_000,
            borrowed_until: None,
        })
    }

    /// The product `cad` defined with `allocation` units.
    fn product(allocation: u32) -> Mutation {
        Mutation::Product {
            name: "cad".to_owned(),
            policy: Policy::default(),
            allocation,
            generation: 1,
        }
    }

    fn checkin(handle: u128) -> Mutation {
        Mutation::Checkin {
            handle: Handle(handle),
            product: Arc::from("cad"),
            usage: None,
        }
    }

    /// Opens the store in `dir` and loads it: the live handles, sorted.
    async fn reopen(dir: &Path) -> (Store, Vec<u128>) {
        let mut store = Store::open(dir).await.unwrap();
        let mut book = Book::new(allot_core::checkout::Limits::default());
        store.load(&mut book, 2_000).await.unwrap();
        let mut live: Vec<u128> = store.rows.keys().map(|h| h.0).collect();
        live.sort_unstable();
        assert_eq!(book.live_checkouts(), live.len(), "book and rows agree");
        (store, live)
    }

    /// Opens the store in `dir`, loads it and hands it to a writer.
    async fn writer(dir: &Path) -> StoreWriter {
        reopen(dir).await.0.into_writer().await.unwrap()
    }

    /// Row numbers survive a restart: a checkin after it deletes the right row, and a checkout
    /// after it takes a fresh number (a reused one would fail the primary key).
    #[tokio::test]
    async fn checkins_find_their_rows_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = writer(dir.path()).await;
        // A checkout and its checkin in one batch, and one checkin of an earlier batch.
        let first = [product(10), checkout(1), checkout(2), checkout(3)];
        store.write_batch(&first, &[]).unwrap();
        // The common batch (client rows only), with the totals.
        let totals = UsageCounters {
            peak_in_use: 3,
            checkouts: 4,
            ..UsageCounters::default()
        };
        store
            .write_batch(
                &[checkout(4), checkin(4), checkin(2)],
                &[("cad".to_owned(), totals)],
            )
            .unwrap();
        store.close().unwrap();

        let (store, live) = reopen(dir.path()).await;
        assert_eq!(live, [1, 3]);
        let mut store = store.into_writer().await.unwrap();
        store
            .write_batch(&[checkin(1), checkout(5), checkout(6)], &[])
            .unwrap();
        store.close().unwrap();

        let (mut store, live) = reopen(dir.path()).await;
        assert_eq!(live, [3, 5, 6]);
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT row, user FROM checkouts WHERE row NOT IN (SELECT row FROM ended) \
                 ORDER BY row",
        )
        .fetch_all(&mut store.conn)
        .await
        .unwrap();
        let kept: (i64, i64) =
            sqlx::query_as("SELECT peak_in_use, checkouts FROM products WHERE name = 'cad'")
                .fetch_one(&mut store.conn)
                .await
                .unwrap();
        assert_eq!(kept, (3, 4), "the totals of the batch");
        let users: Vec<&str> = rows.iter().map(|(_, u)| u.as_str()).collect();
        assert_eq!(users, ["user-3", "user-5", "user-6"]);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "rows ascend");
    }

    /// A generation sweeps the rows marked before it began, lowest first, twice as many a
    /// commit as it marked (plus the base); then its marks go, a bounded number a commit, and
    /// only those made before it began.
    #[test]
    fn a_sweep_deletes_each_marked_row_once_and_then_its_marks() {
        // Marks 3 to 10 are in the file from before (their rows are gone or unswept).
        let mut sweep = Sweep::restored(Some((3, 10)));
        let n = 5_000;
        for row in (1..=n).rev() {
            sweep.mark(row);
        }
        // A quarter of 80,000 live rows is more than were marked: no generation yet.
        assert_eq!(sweep.step(80_000, 0), SweepStep::default());
        let first = sweep.step(100, 3);
        assert_eq!(first.rows, (1..=70).collect::<Vec<i64>>(), "lowest first");
        assert_eq!(
            first.marks, None,
            "no mark goes before its generation is swept"
        );
        // Marks made now belong to the next generation.
        let late = sweep.mark(9_999);
        let mut deleted = first.rows;
        let mut marks = Vec::new();
        for _ in 0..1_000 {
            let step = sweep.step(100, 10);
            deleted.extend(step.rows);
            marks.extend(step.marks);
        }
        assert_eq!(deleted, (1..=n).collect::<Vec<i64>>(), "each row once");
        let through = 10 + n;
        assert!(late > through);
        // The marks from 3 on, in bounded contiguous ranges, up to the generation's last.
        assert_eq!(marks.first().map(|m| m.0), Some(2));
        assert_eq!(marks.last().map(|m| m.1), Some(through));
        assert!(marks.windows(2).all(|w| w[0].1 == w[1].0));
        assert!(marks.iter().all(|(a, b)| b - a <= MARKS_AT_ONCE));
        assert_eq!(
            sweep.step(100, 0),
            SweepStep::default(),
            "one mark starts nothing"
        );
    }

    /// Checkins mark rows and the sweep deletes them: across restarts the live checkouts are
    /// exactly those never checked in, and the table and its marks do not keep the ended.
    #[tokio::test]
    async fn ended_checkouts_stay_ended_and_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = writer(dir.path()).await;
        store.write_batch(&[product(100_000)], &[]).unwrap();
        let mut live: Vec<u128> = Vec::new();
        let mut next = 1u128;
        for round in 0..6 {
            // 1,000 checkouts, then every other live one checked in.
            for _ in 0..20 {
                let batch: Vec<Mutation> = (0..50).map(|i| checkout(next + i)).collect();
                store.write_batch(&batch, &[]).unwrap();
                live.extend((0..50).map(|i| next + i));
                next += 50;
            }
            let (ending, kept): (Vec<u128>, Vec<u128>) =
                live.iter().partition(|h| (*h * 7_919) % 2 == round % 2);
            for batch in ending.chunks(40) {
                let batch: Vec<Mutation> = batch.iter().map(|&h| checkin(h)).collect();
                store.write_batch(&batch, &[]).unwrap();
            }
            live = kept;
            if round % 2 == 1 {
                store.close().unwrap();
                let (reopened, found) = reopen(dir.path()).await;
                let mut expected = live.clone();
                expected.sort_unstable();
                assert_eq!(found, expected, "round {round}: the live checkouts");
                store = reopened.into_writer().await.unwrap();
            }
        }
        store.close().unwrap();
        let (mut reopened, found) = reopen(dir.path()).await;
        live.sort_unstable();
        assert_eq!(found, live);
        let (rows, marks): (i64, i64) =
            sqlx::query_as("SELECT (SELECT COUNT(*) FROM checkouts), (SELECT COUNT(*) FROM ended)")
                .fetch_one(&mut reopened.conn)
                .await
                .unwrap();
        let ended = 6_000 - live.len() as i64;
        assert!(
            rows - (live.len() as i64) < ended / 2 && marks < ended / 2,
            "most of the {ended} ended rows and their marks were swept: {rows} rows for {} live, {marks} marks",
            live.len()
        );
    }

    /// A failed batch leaves nothing of itself: its transaction rolls back, so what the file
    /// holds is the batches before it.
    #[tokio::test]
    async fn a_failed_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = writer(dir.path()).await;
        store.write_batch(&[product(10), checkout(1)], &[]).unwrap();
        // The second grant of one move id fails its primary key after the batch's checkout
        // and first grant were written.
        let grant = Mutation::Move {
            applied: AppliedMove {
                kind: MoveKind::Grant,
                product: "cad".to_owned(),
                requested: 1,
                response: MoveResponse {
                    move_id: Uuid::nil(),
                    units: 1,
                    allocation: 11,
                    generation: 2,
                },
            },
            at: 1_500,
        };
        let failed = store.write_batch(&[checkout(2), grant.clone(), grant], &[]);
        assert!(matches!(failed, Err(StoreError::Write(_))), "{failed:?}");
        store.close().unwrap();
        let (_, live) = reopen(dir.path()).await;
        assert_eq!(live, [1], "the failed batch left nothing");
    }

    /// The checkpointer, once it has copied the whole WAL, waits for the writer's next commit
    /// (it no longer polls an idle server) and then copies it: the main database file alone
    /// holds that commit, without its WAL.
    #[tokio::test]
    async fn the_checkpointer_copies_each_commit_it_is_told_of() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = writer(dir.path()).await;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let commits = std::sync::Arc::new(tokio::sync::Notify::new());
        let checkpointer = Checkpointer::open(dir.path()).await.unwrap();
        let running = tokio::spawn(checkpointer.run(stopping, commits.clone()));
        // Past its first passes (the migrations' frames), it waits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.write_batch(&[product(7)], &[]).unwrap();
        let copy = tempfile::tempdir().unwrap();
        let main_file_holds = || {
            let alone = copy.path().join("alone.db");
            std::fs::copy(dir.path().join("agent.db"), &alone).unwrap();
            let conn = rusqlite::Connection::open(&alone).unwrap();
            conn.query_row(
                "SELECT count(*) FROM products WHERE name = 'cad'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .unwrap()
                == 1
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!main_file_holds(), "not told of the commit, it waits");
        commits.notify_one();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !main_file_holds() {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit was never copied into the main file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap();
        store.close().unwrap();
    }

    /// The writer's checkpoint between group commits lets the WAL start over: what follows it
    /// is written from the WAL's beginning, not appended after everything before.
    #[tokio::test]
    async fn an_idle_checkpoint_lets_the_wal_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = writer(dir.path()).await;
        store.write_batch(&[product(1_000)], &[]).unwrap();
        for handle in 1..=100 {
            store.write_batch(&[checkout(handle)], &[]).unwrap();
        }
        let grown = store.checkpoint_while_idle().unwrap();
        assert!(grown >= 100, "a commit appends at least a frame: {grown}");
        store.write_batch(&[checkin(1)], &[]).unwrap();
        let after = store.checkpoint_while_idle().unwrap();
        assert!(
            after < 10,
            "the WAL started over: {after} frames after {grown}"
        );
        store.close().unwrap();
        let (_, live) = reopen(dir.path()).await;
        assert_eq!(live, (2..=100).collect::<Vec<u128>>());
    }
}

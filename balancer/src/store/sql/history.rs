//! Usage history: the samples each run records, their hourly roll-ups, retention, and the
//! reads the demand signals, the metrics and the advisor make of them.

use super::{
    CellAccounting, Db, HistoryBucket, HistoryQuery, NameIds, Pool, SampleRow, StoreError,
    StoreResult, UsageSample, begin_write, count, insert_samples,
};

/// How many samples [`record_samples`] turns into rows and sends at once. Why not all: a
/// run over 1,000 servers × 100 products records 100,000 samples while it still holds its
/// statuses and both reads of the books, and all of their rows, one array per column and the
/// encoded statement at once were the balancer's peak of memory (423–478 MiB against 341–384
/// MiB a chunk at a time, BENCHMARKS.md "A 1,000-server estate"); on PostgreSQL ten statements
/// write them no slower than one did (SQLite sends 500 rows a statement either way). The
/// conformance test `a_runs_samples_beyond_one_statement_are_all_kept` writes more than one
/// chunk's worth: keep it so if this grows.
const SAMPLES_AT_ONCE: usize = 10_000;

/// One multi-row `INSERT` per chunk of samples instead of one statement per sample: a run
/// over 200 servers × 50 products writes 10,000 samples, and every statement costs a
/// network round trip (PostgreSQL) or a hop to the driver's thread (SQLite). Names are
/// resolved to ids once, in the same transaction; a sample naming a removed server or an
/// unknown product is skipped, as the per-row `INSERT … SELECT` did. The rows are built and
/// sent [`SAMPLES_AT_ONCE`] at a time, all in one transaction.
pub(super) async fn record_samples(
    pool: &Pool<Db>,
    run_id: i64,
    at_ms: i64,
    samples: &[UsageSample],
) -> StoreResult<()> {
    let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if samples.is_empty() {
        return Ok(());
    }
    let mut tx = begin_write(pool).await?;
    let ids = NameIds::read(&mut tx).await?;
    for chunk in samples.chunks(SAMPLES_AT_ONCE) {
        let rows: Vec<SampleRow> = chunk
            .iter()
            .filter_map(|s| {
                let (server, product) = ids.cell(&s.server, &s.product)?;
                Some([
                    server,
                    product,
                    wide(s.allocation),
                    wide(s.in_use),
                    wide(s.peak_in_use),
                    wide(s.checkouts),
                    wide(s.denials),
                    wide(s.overdrafts),
                    wide(s.staleouts),
                    wide(s.waiting),
                    wide(s.instant_requests),
                    wide(s.accounting.units_granted),
                    wide(s.accounting.units_released),
                    wide(s.accounting.ping_pong_units),
                    wide(s.accounting.unserved_true),
                    wide(s.accounting.unserved_false),
                ])
            })
            .collect();
        insert_samples(&mut tx, run_id, at_ms, &rows).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn history(pool: &Pool<Db>, q: &HistoryQuery) -> StoreResult<Vec<HistoryBucket>> {
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
         CAST(SUM(u.instant_requests) AS BIGINT) AS instant_requests, \
         CAST(SUM(u.units_granted) AS BIGINT) AS units_granted, \
         CAST(SUM(u.units_released) AS BIGINT) AS units_released, \
         CAST(SUM(u.ping_pong_units) AS BIGINT) AS ping_pong_units, \
         CAST(SUM(u.unserved_true) AS BIGINT) AS unserved_true, \
         CAST(SUM(u.unserved_false) AS BIGINT) AS unserved_false \
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
    .fetch_all(pool)
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
         CAST(SUM(h.instant_requests) AS BIGINT) AS instant_requests, \
         CAST(SUM(h.units_granted) AS BIGINT) AS units_granted, \
         CAST(SUM(h.units_released) AS BIGINT) AS units_released, \
         CAST(SUM(h.ping_pong_units) AS BIGINT) AS ping_pong_units, \
         CAST(SUM(h.unserved_true) AS BIGINT) AS unserved_true, \
         CAST(SUM(h.unserved_false) AS BIGINT) AS unserved_false \
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
    .fetch_all(pool)
    .await?;
    Ok(raw.into_iter().chain(hourly).collect())
}

/// How far the raw samples have been rolled up into hours (ms), read inside `tx`.
async fn rolled_up_to(tx: &mut sqlx::Transaction<'_, Db>) -> StoreResult<i64> {
    sqlx::query_scalar::<_, String>("SELECT value FROM settings WHERE key = 'history.rolled_up_to'")
        .fetch_one(&mut **tx)
        .await?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("history.rolled_up_to: {e}")))
}

pub(super) async fn roll_up(pool: &Pool<Db>, until_ms: i64) -> StoreResult<u64> {
    let until = until_ms - until_ms.rem_euclid(3_600_000);
    let mut tx = begin_write(pool).await?;
    let from: i64 = rolled_up_to(&mut tx).await?;
    if until <= from {
        return Ok(0);
    }
    let written = sqlx::query(
        "INSERT INTO usage_hourly (server_id, product_id, hour, samples, allocation_sum, \
         allocation_max, in_use_sum, in_use_max, peak_in_use, checkouts, denials, \
         overdrafts, staleouts, waiting_sum, waiting_max, instant_requests, units_granted, \
         units_released, ping_pong_units, unserved_true, unserved_false) \
         SELECT server_id, product_id, (at / 3600000) * 3600000, COUNT(*), \
         SUM(allocation), MAX(allocation), SUM(in_use), MAX(in_use), MAX(peak_in_use), \
         SUM(checkouts), SUM(denials), SUM(overdrafts), SUM(staleouts), SUM(waiting), \
         MAX(waiting), SUM(instant_requests), SUM(units_granted), SUM(units_released), \
         SUM(ping_pong_units), SUM(unserved_true), SUM(unserved_false) FROM usage_samples \
         WHERE at >= $1 AND at < $2 GROUP BY 1, 2, 3 \
         ON CONFLICT (server_id, product_id, hour) DO UPDATE SET \
         samples = excluded.samples, allocation_sum = excluded.allocation_sum, \
         allocation_max = excluded.allocation_max, in_use_sum = excluded.in_use_sum, \
         in_use_max = excluded.in_use_max, peak_in_use = excluded.peak_in_use, \
         checkouts = excluded.checkouts, denials = excluded.denials, \
         overdrafts = excluded.overdrafts, staleouts = excluded.staleouts, \
         waiting_sum = excluded.waiting_sum, waiting_max = excluded.waiting_max, \
         instant_requests = excluded.instant_requests, \
         units_granted = excluded.units_granted, units_released = excluded.units_released, \
         ping_pong_units = excluded.ping_pong_units, unserved_true = excluded.unserved_true, \
         unserved_false = excluded.unserved_false",
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

pub(super) async fn prune_history(
    pool: &Pool<Db>,
    raw_before_ms: i64,
    hourly_before_ms: i64,
) -> StoreResult<(u64, u64)> {
    let mut tx = begin_write(pool).await?;
    let rolled: i64 = rolled_up_to(&mut tx).await?;
    // Never delete a raw sample before its hour is rolled up.
    let raw = sqlx::query("DELETE FROM usage_samples WHERE at < $1")
        .bind(raw_before_ms.min(rolled))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // A run's decisions are kept as long as its raw samples.
    sqlx::query("DELETE FROM run_decisions WHERE at < $1")
        .bind(raw_before_ms)
        .execute(&mut *tx)
        .await?;
    let hourly = sqlx::query("DELETE FROM usage_hourly WHERE hour < $1")
        .bind(hourly_before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok((raw, hourly))
}

pub(super) async fn samples_between(
    pool: &Pool<Db>,
    from_ms: i64,
    to_ms: i64,
) -> StoreResult<Vec<(i64, UsageSample)>> {
    /// One sample as stored.
    #[derive(sqlx::FromRow)]
    struct Row {
        at: i64,
        server: String,
        product: String,
        allocation: i64,
        in_use: i64,
        peak_in_use: i64,
        checkouts: i64,
        denials: i64,
        overdrafts: i64,
        staleouts: i64,
        waiting: i64,
        instant_requests: i64,
        units_granted: i64,
        units_released: i64,
        ping_pong_units: i64,
        unserved_true: i64,
        unserved_false: i64,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT u.at, s.name AS server, p.name AS product, u.allocation, u.in_use, \
         u.peak_in_use, u.checkouts, u.denials, u.overdrafts, u.staleouts, u.waiting, \
         u.instant_requests, u.units_granted, u.units_released, u.ping_pong_units, \
         u.unserved_true, u.unserved_false \
         FROM usage_samples u JOIN servers s ON s.id = u.server_id \
         JOIN products p ON p.id = u.product_id WHERE u.at >= $1 AND u.at < $2 \
         ORDER BY u.at, s.name, p.name",
    )
    .bind(from_ms)
    .bind(to_ms)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.at,
                UsageSample {
                    server: r.server,
                    product: r.product,
                    allocation: count(r.allocation),
                    in_use: count(r.in_use),
                    peak_in_use: count(r.peak_in_use),
                    checkouts: count(r.checkouts),
                    denials: count(r.denials),
                    overdrafts: count(r.overdrafts),
                    staleouts: count(r.staleouts),
                    waiting: count(r.waiting),
                    instant_requests: count(r.instant_requests),
                    accounting: CellAccounting {
                        units_granted: count(r.units_granted),
                        units_released: count(r.units_released),
                        ping_pong_units: count(r.ping_pong_units),
                        unserved_true: count(r.unserved_true),
                        unserved_false: count(r.unserved_false),
                    },
                },
            )
        })
        .collect())
}

pub(super) async fn peak_samples(
    pool: &Pool<Db>,
    ranges: &[(i64, i64)],
) -> StoreResult<Vec<(String, String, i64, u64)>> {
    let mut out = Vec::new();
    for &(from, to) in ranges {
        let rows: Vec<(String, String, i64, i64)> = super::collect_yielding(
            sqlx::query_as(
                "SELECT s.name, p.name, u.at, u.peak_in_use FROM usage_samples u \
                 JOIN servers s ON s.id = u.server_id JOIN products p ON p.id = u.product_id \
                 WHERE u.at >= $1 AND u.at <= $2 AND u.peak_in_use > 0",
            )
            .bind(from)
            .bind(to)
            .fetch(pool),
        )
        .await?;
        out.extend(
            rows.into_iter()
                .map(|(server, product, at, peak)| (server, product, at, count(peak))),
        );
    }
    // Each cell's oldest sample of the recent past, as peak 0: if its peak was positive, it
    // is among the rows above already. One descent of `usage_samples_cell` per cell, so its
    // cost follows the number of cells, not the history the window holds (a GROUP BY over
    // the window read every sample of every run in it, and grew with each run).
    if let Some(&(from, to)) = ranges.first() {
        let oldest: Vec<(String, String, Option<i64>)> = super::collect_yielding(
            sqlx::query_as(
                "SELECT s.name, p.name, (SELECT MIN(u.at) FROM usage_samples u \
                 WHERE u.server_id = a.server_id AND u.product_id = a.product_id \
                 AND u.at >= $1 AND u.at <= $2) \
                 FROM allocations a JOIN servers s ON s.id = a.server_id \
                 JOIN products p ON p.id = a.product_id",
            )
            .bind(from)
            .bind(to)
            .fetch(pool),
        )
        .await?;
        out.extend(
            oldest
                .into_iter()
                .filter_map(|(server, product, at)| Some((server, product, at?, 0))),
        );
    }
    Ok(out)
}

pub(super) async fn instant_grants_between(
    pool: &Pool<Db>,
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
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(at, server, product, units)| (at, server, product, units.map_or(0, count)))
        .collect())
}

//! Balance runs and the answered instant-balance requests (idempotence by request id).

use super::{
    Db, InstantRecord, MoveRow, Pool, RunDetail, RunOutcome, RunRow, RunSummary, RunTrigger,
    RunsQuery, StoreError, StoreResult, Uuid, count, json, move_columns, now_ms, run_columns,
};

pub(super) async fn begin_run(
    pool: &Pool<Db>,
    trigger: RunTrigger,
    epoch: i64,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO balance_runs (trigger, status, epoch, started_at) \
         VALUES ($1, 'running', $2, $3) RETURNING id",
    )
    .bind(trigger.as_str())
    .bind(epoch)
    .bind(now_ms())
    .fetch_one(pool)
    .await?)
}

pub(super) async fn finish_run(
    pool: &Pool<Db>,
    run_id: i64,
    outcome: &RunOutcome,
) -> StoreResult<()> {
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
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn runs(pool: &Pool<Db>, q: &RunsQuery) -> StoreResult<Vec<RunSummary>> {
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
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(RunRow::into_summary)
    .collect()
}

pub(super) async fn run(pool: &Pool<Db>, run_id: i64) -> StoreResult<RunDetail> {
    let run = sqlx::query_as::<_, RunRow>(concat!(
        "SELECT ",
        run_columns!(),
        " FROM balance_runs r WHERE r.id = $1"
    ))
    .bind(run_id)
    .fetch_optional(pool)
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
    .fetch_all(pool)
    .await?
    .iter()
    .map(MoveRow::to_view)
    .collect::<StoreResult<_>>()?;
    Ok(RunDetail { run, move_log })
}

pub(super) async fn instant_request(
    pool: &Pool<Db>,
    request_id: Uuid,
) -> StoreResult<Option<InstantRecord>> {
    let row: Option<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT s.name, p.name, i.units, i.granted FROM instant_requests i \
         JOIN servers s ON s.id = i.server_id JOIN products p ON p.id = i.product_id \
         WHERE i.id = $1",
    )
    .bind(request_id.to_string())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(server, product, units, granted)| InstantRecord {
        server,
        product,
        units: count(units),
        granted: count(granted),
    }))
}

pub(super) async fn record_instant_request(
    pool: &Pool<Db>,
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
    .execute(pool)
    .await?;
    Ok(())
}

//! Balance runs and the answered instant-balance requests (idempotence by request id).

use crate::store::LandedMove;

use super::{
    CHUNK, Conn, Db, ExplainedCell, Fence, InstantLog, InstantRecord, InstantStart,
    InstantStartRow, MoveRecord, MoveRow, NameIds, NewMove, Pool, RunDecision, RunDetail,
    RunOutcome, RunRow, RunSummary, RunTrigger, RunsQuery, StoreError, StoreResult, Uuid,
    begin_booking, begin_write, book_instant_grant, count, json, lock_product, log_run_with_grant,
    move_columns, now_ms, product_id, run_columns, values_placeholders,
};
use allot_core::domain::{MoveKind, MoveState};

pub(super) async fn begin_run<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
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
    .fetch_one(conn)
    .await?)
}

/// Opens a run and logs its first moves, which become the run's, in one transaction. A single
/// grant (an instant balance served from the reserve, the common case) is logged by one
/// statement where the backend has one (`log_run_with_grant`); when that logs nothing, the
/// general transaction below runs and says why (or logs it, if the books changed between).
pub(super) async fn begin_run_with_moves(
    pool: &Pool<Db>,
    trigger: RunTrigger,
    fence: &Fence,
    moves: &[NewMove],
) -> StoreResult<(i64, Vec<MoveRecord>)> {
    if let [grant] = moves
        && let Some(units) = one_statement_units(grant)
        && let Some((run_id, record)) =
            grant_in_one_statement(pool, trigger, fence, grant, units, None)
                .await?
                .and_then(|(run_id, _)| run_id)
    {
        return Ok((run_id, vec![record]));
    }
    let mut tx = begin_write(pool).await?;
    let opened = open_run_in(&mut tx, trigger, fence, moves).await?;
    tx.commit().await?;
    Ok(opened)
}

/// [`crate::store::Store::log_instant_grant`]: by one statement where the backend has one (it
/// logs only while the books are as read, and otherwise returns them as they stand);
/// otherwise, or when that statement logs nothing for another reason (fenced, say), by the
/// general transaction, which checks the books as read under the product's lock first.
pub(super) async fn log_instant_grant(
    pool: &Pool<Db>,
    fence: &Fence,
    grant: &NewMove,
    request_id: Uuid,
    reserve_as_read: u64,
) -> StoreResult<InstantLog> {
    let as_read = i64::try_from(reserve_as_read).unwrap_or(i64::MAX);
    let request = request_id.to_string();
    if let Some(units) = one_statement_units(grant) {
        let attempt = grant_in_one_statement(
            pool,
            RunTrigger::Instant,
            fence,
            grant,
            units,
            Some((as_read, &request)),
        )
        .await?;
        match attempt {
            Some((Some((run_id, record)), _)) => return Ok(InstantLog::Logged(run_id, record)),
            Some((None, now)) if now.answered.is_some() || now.reserve != reserve_as_read => {
                return Ok(InstantLog::Moved(now));
            }
            // As read, and still not logged: the general way says why.
            _ => {}
        }
    }
    let mut tx = begin_write(pool).await?;
    let product = product_id(&mut tx, &grant.product).await?;
    lock_product(&mut tx, product).await?;
    let now = instant_start(&mut *tx, request_id, &grant.product).await?;
    if now.answered.is_some() || now.reserve != reserve_as_read {
        return Ok(InstantLog::Moved(now));
    }
    let (run_id, mut records) = open_run_in(
        &mut tx,
        RunTrigger::Instant,
        fence,
        std::slice::from_ref(grant),
    )
    .await?;
    tx.commit().await?;
    let record = records
        .pop()
        .ok_or_else(|| StoreError::Conflict(format!("move {}: not logged", grant.id)))?;
    Ok(InstantLog::Logged(run_id, record))
}

/// A grant's units if the one-statement log can take it (a positive count).
fn one_statement_units(grant: &NewMove) -> Option<i64> {
    (grant.kind == MoveKind::Grant)
        .then(|| i64::try_from(grant.units).ok())
        .flatten()
        .filter(|units| *units > 0)
}

/// What [`grant_in_one_statement`] returns: the run and its grant if logged, and the
/// product's reserve and the request's record as the statement found them.
type OneStatement = (Option<(i64, MoveRecord)>, InstantStart);

/// The backend's one-statement log of a run and its one grant (`log_run_with_grant`), or
/// `None` where it has none or the product does not exist. A constraint it broke (the move's
/// id logged already) is a conflict; any other database error (a deadlock PostgreSQL broke,
/// say) is `None` too: the general way decides.
async fn grant_in_one_statement(
    pool: &Pool<Db>,
    trigger: RunTrigger,
    fence: &Fence,
    grant: &NewMove,
    units: i64,
    as_read: Option<(i64, &str)>,
) -> StoreResult<Option<OneStatement>> {
    match log_run_with_grant(
        pool,
        trigger.as_str(),
        fence,
        grant,
        units,
        now_ms(),
        as_read,
    )
    .await
    {
        Ok(Some((run_id, row))) => {
            let logged = run_id.map(|run_id| {
                let record = super::moves::logged_record(&NewMove {
                    run_id: Some(run_id),
                    ..grant.clone()
                });
                (run_id, record)
            });
            Ok(Some((logged, instant_start_of(row))))
        }
        Ok(None) => Ok(None),
        Err(sqlx::Error::Database(db))
            if db.is_unique_violation()
                || db.is_check_violation()
                || db.is_foreign_key_violation() =>
        {
            Err(StoreError::Conflict(format!(
                "move {}: {}",
                grant.id,
                db.message()
            )))
        }
        Err(e) => {
            tracing::warn!(error = %e, "one-statement grant log failed; logging it the general way");
            Ok(None)
        }
    }
}

/// Opens a run at the fence's newest epoch and logs `moves` as its own, in the caller's
/// transaction.
async fn open_run_in(
    tx: &mut Conn,
    trigger: RunTrigger,
    fence: &Fence,
    moves: &[NewMove],
) -> StoreResult<(i64, Vec<MoveRecord>)> {
    let run_id = begin_run(&mut *tx, trigger, fence.newest_epoch()).await?;
    let moves: Vec<NewMove> = moves
        .iter()
        .map(|mv| NewMove {
            run_id: Some(run_id),
            ..mv.clone()
        })
        .collect();
    let records = if moves.is_empty() {
        Vec::new()
    } else {
        super::moves::begin_moves_in(tx, &moves).await?
    };
    Ok((run_id, records))
}

pub(super) async fn finish_run<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
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
    .execute(conn)
    .await?;
    Ok(())
}

/// Closes an instant balance's run and, when its outcome is settled, records the answered
/// request, in one transaction.
pub(super) async fn finish_instant_run(
    pool: &Pool<Db>,
    run_id: i64,
    outcome: &RunOutcome,
    answered: Option<(Uuid, &InstantRecord)>,
) -> StoreResult<()> {
    let mut tx = begin_write(pool).await?;
    finish_run(&mut *tx, run_id, outcome).await?;
    if let Some((request_id, record)) = answered {
        record_instant_request(&mut *tx, request_id, record).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Books an instant balance's grant from the reserve, closes its run and records the request
/// answered, in one transaction; returns the booked move (see
/// [`crate::store::Store::complete_instant_grant`]).
pub(super) async fn complete_instant_grant(
    pool: &Pool<Db>,
    landed: LandedMove,
    fence: &Fence,
    run_id: i64,
    outcome: &RunOutcome,
    (request_id, answered): (Uuid, &InstantRecord),
) -> StoreResult<MoveRecord> {
    // The grant is applied already: its booking's commit need not wait for the WAL flush.
    let mut tx = begin_booking(pool).await?;
    let booking = super::InstantBooking {
        landed,
        fence,
        run_id,
        outcome,
        request_id,
        answered,
    };
    // By one statement where the backend has one; what it does not book (a repeat, a
    // refusal), the general way books or refuses, and says why.
    match book_instant_grant(&mut tx, &booking, now_ms()).await {
        Ok(Some((run, server, epoch))) => {
            tx.commit().await?;
            return Ok(MoveRecord {
                id: landed.id,
                run_id: run,
                product: answered.product.clone(),
                server,
                kind: MoveKind::Grant,
                units: landed.applied_units,
                state: MoveState::Applied,
                applied_units: Some(landed.applied_units),
                epoch,
            });
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "one-statement booking failed; booking the general way");
            drop(tx);
            tx = begin_booking(pool).await?;
        }
    }
    let booked = super::moves::complete_moves_in(&mut tx, &[booking.landed], booking.fence)
        .await?
        .pop()
        .ok_or_else(|| StoreError::Corrupt("a booked move vanished".into()))?;
    finish_run(&mut *tx, booking.run_id, booking.outcome).await?;
    record_instant_request(&mut *tx, booking.request_id, booking.answered).await?;
    tx.commit().await?;
    Ok(booked)
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
    let decisions = sqlx::query_as::<_, DecisionRow>(
        "SELECT p.name AS product, s.name AS server, d.decision, d.allocation, d.in_use, \
         d.waiting, d.min_units, d.buffer_units, d.peak_in_use, d.denials, d.level, \
         d.forecast, d.window_peak, d.held, d.need, d.want, d.fair_share, d.target \
         FROM run_decisions d JOIN products p ON p.id = d.product_id \
         JOIN servers s ON s.id = d.server_id WHERE d.run_id = $1 ORDER BY p.name, s.name",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(DecisionRow::into_decision)
    .collect();
    Ok(RunDetail {
        run,
        move_log,
        decisions,
    })
}

/// One stored [`RunDecision`].
#[derive(sqlx::FromRow)]
struct DecisionRow {
    product: String,
    server: String,
    decision: String,
    allocation: i64,
    in_use: i64,
    waiting: i64,
    min_units: i64,
    buffer_units: i64,
    peak_in_use: i64,
    denials: i64,
    level: i64,
    forecast: i64,
    window_peak: Option<i64>,
    held: bool,
    need: i64,
    want: i64,
    fair_share: i64,
    target: i64,
}

impl DecisionRow {
    fn into_decision(self) -> RunDecision {
        RunDecision {
            product: self.product,
            cell: ExplainedCell {
                server: self.server,
                allocation: count(self.allocation),
                in_use: count(self.in_use),
                waiting: count(self.waiting),
                min_units: count(self.min_units),
                buffer_units: count(self.buffer_units),
                peak_in_use: count(self.peak_in_use),
                denials: count(self.denials),
                level: count(self.level),
                forecast: count(self.forecast),
                window_peak: self.window_peak.map(count),
                held: self.held,
                need: count(self.need),
                want: count(self.want),
                fair_share: count(self.fair_share),
                target: count(self.target),
                decision: self.decision,
            },
        }
    }
}

/// One multi-row `INSERT` per chunk, names resolved to ids in the same transaction; a
/// decision naming a removed server or product is skipped (it cannot be shown anyway).
pub(super) async fn record_decisions(
    pool: &Pool<Db>,
    run_id: i64,
    at_ms: i64,
    decisions: &[RunDecision],
) -> StoreResult<()> {
    /// Columns bound per row.
    const COLUMNS: usize = 20;
    let wide = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if decisions.is_empty() {
        return Ok(());
    }
    let mut tx = begin_write(pool).await?;
    let ids = NameIds::read(&mut tx).await?;
    let rows: Vec<(i64, i64, &RunDecision)> = decisions
        .iter()
        .filter_map(|d| {
            let (server, product) = ids.cell(&d.cell.server, &d.product)?;
            Some((server, product, d))
        })
        .collect();
    for chunk in rows.chunks(CHUNK) {
        let mut sql = String::from(
            "INSERT INTO run_decisions (run_id, product_id, server_id, at, decision, \
             allocation, in_use, waiting, min_units, buffer_units, peak_in_use, denials, \
             level, forecast, window_peak, held, need, want, fair_share, target) VALUES ",
        );
        sql.push_str(&values_placeholders(chunk.len(), COLUMNS));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (server_id, product_id, d) in chunk {
            let c = &d.cell;
            query = query
                .bind(run_id)
                .bind(*product_id)
                .bind(*server_id)
                .bind(at_ms)
                .bind(&c.decision)
                .bind(wide(c.allocation))
                .bind(wide(c.in_use))
                .bind(wide(c.waiting))
                .bind(wide(c.min_units))
                .bind(wide(c.buffer_units))
                .bind(wide(c.peak_in_use))
                .bind(wide(c.denials))
                .bind(wide(c.level))
                .bind(wide(c.forecast))
                .bind(c.window_peak.map(wide))
                .bind(c.held)
                .bind(wide(c.need))
                .bind(wide(c.want))
                .bind(wide(c.fair_share))
                .bind(wide(c.target));
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// [`crate::store::Store::instant_start`]: the product's row, and the request's record if any
/// (a left join on its id), by one statement.
pub(super) async fn instant_start<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
    request_id: Uuid,
    product: &str,
) -> StoreResult<InstantStart> {
    let row: Option<InstantStartRow> = sqlx::query_as(
        "SELECT p.reserve, s.name, rp.name, i.units, i.granted FROM products p \
         LEFT JOIN instant_requests i ON i.id = $1 \
         LEFT JOIN servers s ON s.id = i.server_id \
         LEFT JOIN products rp ON rp.id = i.product_id \
         WHERE p.name = $2",
    )
    .bind(request_id.to_string())
    .bind(product)
    .fetch_optional(conn)
    .await?;
    let row = row.ok_or_else(|| StoreError::UnknownProduct(product.to_owned()))?;
    Ok(instant_start_of(row))
}

/// The reserve and the request's outcome (if answered) in an [`InstantStartRow`].
fn instant_start_of((reserve, server, asked_for, units, granted): InstantStartRow) -> InstantStart {
    let answered = match (server, asked_for, units, granted) {
        (Some(server), Some(product), Some(units), Some(granted)) => Some(InstantRecord {
            server,
            product,
            units: count(units),
            granted: count(granted),
        }),
        _ => None,
    };
    InstantStart {
        answered,
        reserve: count(reserve),
    }
}

async fn record_instant_request<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
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
    .execute(conn)
    .await?;
    Ok(())
}

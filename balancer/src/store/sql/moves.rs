//! The move log: a move logged `planned` before it is sent, then booked `applied` or
//! `abandoned`, each under its product's lock and the writer's epoch check.

use crate::store::LandedMove;

use super::{
    Conn, Db, MoveKind, MoveRecord, MoveRow, MoveState, NewMove, Pool, PoolShift, StoreError,
    StoreResult, Uuid, begin_write, check_epoch, conflict_on_constraint, lock_product,
    move_columns, move_row, now_ms, product_id, server_row, set_move_state, shift_pool,
};

/// Logs moves `planned` in one transaction: their products locked first, in id order (so two
/// batches, or a batch and a single move, never wait on each other in a circle), the epoch
/// checked once per move's epoch, then each move as [`begin_move_in`] books it. Any refusal
/// logs none of them.
#[tracing::instrument(skip_all, fields(moves = moves.len()))]
pub(super) async fn begin_moves(
    pool: &Pool<Db>,
    moves: &[NewMove],
) -> StoreResult<Vec<MoveRecord>> {
    let mut tx = begin_write(pool).await?;
    let mut pids = Vec::new();
    for mv in moves {
        pids.push(product_id(&mut tx, &mv.product).await?);
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        lock_product(&mut tx, pid).await?;
    }
    let mut records = Vec::with_capacity(moves.len());
    for mv in moves {
        records.push(begin_move_in(&mut tx, mv).await?);
    }
    tx.commit().await?;
    Ok(records)
}

/// Logs one move `planned` inside the caller's transaction: its product locked, the epoch
/// checked, a release's units checked against the allocation, a grant's units taken from the
/// reserve into transit.
async fn begin_move_in(tx: &mut Conn, mv: &NewMove) -> StoreResult<MoveRecord> {
    let units = i64::try_from(mv.units)
        .ok()
        .filter(|u| *u > 0)
        .ok_or_else(|| StoreError::Conflict(format!("a move of {} units", mv.units)))?;
    let pid = product_id(&mut *tx, &mv.product).await?;
    lock_product(&mut *tx, pid).await?;
    check_epoch(&mut *tx, mv.epoch).await?;
    let sid = server_row(&mut *tx, &mv.server).await?.id;
    match mv.kind {
        MoveKind::Release | MoveKind::Retire => {
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
            shift_pool(&mut *tx, pid, PoolShift::ReserveToTransit, units).await?;
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
    move_row(&mut *tx, mv.id).await?.to_record()
}

/// Books moves `applied` in one transaction, their products locked first in id order; any
/// refusal books none of them (the caller then books them one by one, so one bad answer
/// does not hold back the rest).
#[tracing::instrument(skip_all, fields(moves = landed.len()))]
pub(super) async fn complete_moves(
    pool: &Pool<Db>,
    landed: &[LandedMove],
    epoch: i64,
) -> StoreResult<Vec<MoveRecord>> {
    let mut tx = begin_write(pool).await?;
    let mut pids = Vec::new();
    for l in landed {
        pids.push(move_row(&mut tx, l.id).await?.product_id);
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        lock_product(&mut tx, pid).await?;
    }
    let mut records = Vec::with_capacity(landed.len());
    for l in landed {
        records.push(complete_move_in(&mut tx, *l, epoch).await?);
    }
    tx.commit().await?;
    Ok(records)
}

/// Books one move `applied` inside the caller's transaction: a release's units to the
/// reserve (a retirement's out of the estate), a grant's from transit to the allocation.
async fn complete_move_in(
    tx: &mut Conn,
    landed: LandedMove,
    epoch: i64,
) -> StoreResult<MoveRecord> {
    let LandedMove {
        id,
        applied_units,
        generation,
    } = landed;
    let (row, record) = match planned_move(&mut *tx, id, epoch, MoveState::Applied).await? {
        Prelude::Planned(row, record) => (row, record),
        Prelude::Repeated(record) => return Ok(record),
    };
    let applied = i64::try_from(applied_units).unwrap_or(i64::MAX);
    let generation = i64::try_from(generation).unwrap_or(i64::MAX);
    let refuse = |why: String| Err(StoreError::Conflict(format!("move {id}: {why}")));
    match record.kind {
        kind @ (MoveKind::Release | MoveKind::Retire) => {
            if applied > row.units {
                return refuse(format!("{kind}d {applied} of {} asked", row.units));
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
            // A retirement leaves the estate (what no expired entitlement is owed goes to the
            // reserve, so the books always balance); a release goes to the reserve.
            let retired = if kind == MoveKind::Retire {
                super::expiry::retire(&mut *tx, row.product_id, applied).await?
            } else {
                0
            };
            sqlx::query("UPDATE products SET reserve = reserve + $1 WHERE id = $2")
                .bind(applied - retired)
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
    set_move_state(&mut *tx, &row.id, MoveState::Applied, Some(applied), None).await?;
    move_row(&mut *tx, id).await?.to_record()
}

#[tracing::instrument(skip_all, fields(move_id = %id, reason))]
pub(super) async fn abandon_move(
    pool: &Pool<Db>,
    id: Uuid,
    reason: &str,
    epoch: i64,
) -> StoreResult<MoveRecord> {
    let mut tx = begin_write(pool).await?;
    let (row, record) = match planned_move(&mut tx, id, epoch, MoveState::Abandoned).await? {
        Prelude::Planned(row, record) => (row, record),
        Prelude::Repeated(record) => return Ok(record),
    };
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

pub(super) async fn unfinished_moves(pool: &Pool<Db>) -> StoreResult<Vec<MoveRecord>> {
    sqlx::query_as::<_, MoveRow>(concat!(
        "SELECT ",
        move_columns!(),
        " FROM moves m JOIN products p ON p.id = m.product_id \
         JOIN servers s ON s.id = m.server_id WHERE m.state = 'planned' \
         ORDER BY m.created_at, m.id"
    ))
    .fetch_all(pool)
    .await?
    .iter()
    .map(MoveRow::to_record)
    .collect()
}

/// Where a move stands once its product is locked and the writer's epoch checked.
enum Prelude {
    /// Still planned: the caller books its end.
    Planned(MoveRow, MoveRecord),
    /// Already ended the way the caller asks: a repeat, answered with the record as it is.
    Repeated(MoveRecord),
}

/// The prelude of every end of a move (`complete_move`, `abandon_move`): reads the move, takes
/// its product's lock, refuses a deposed leader's epoch, then reads the move again under the
/// lock (a concurrent end may have just committed). A move already ended as `ending` is a
/// repeat; ended the other way, a conflict.
async fn planned_move(
    conn: &mut Conn,
    id: Uuid,
    epoch: i64,
    ending: MoveState,
) -> StoreResult<Prelude> {
    let row = move_row(conn, id).await?;
    lock_product(conn, row.product_id).await?;
    check_epoch(conn, epoch).await?;
    let row = move_row(conn, id).await?;
    let record = row.to_record()?;
    match record.state {
        MoveState::Planned => Ok(Prelude::Planned(row, record)),
        state if state == ending => Ok(Prelude::Repeated(record)),
        MoveState::Applied => Err(StoreError::Conflict(format!("move {id} was applied"))),
        MoveState::Abandoned => Err(StoreError::Conflict(format!("move {id} was abandoned"))),
    }
}

//! The move log: a move logged `planned` before it is sent, then booked `applied` or
//! `abandoned`, each under its product's lock and the writer's epoch check.

use crate::store::LandedMove;

use super::{
    CHUNK, CellChange, Conn, Db, Fence, LOCK_PRODUCTS_SUFFIX, MoveKind, MoveRecord, MoveRow,
    MoveState, NameIds, NewMove, Pool, PoolShift, StoreError, StoreResult, Uuid,
    apply_to_allocations, begin_booking, begin_write, check_epoch_of, check_fence,
    conflict_on_constraint, count, lock_product, lock_products, mark_applied, move_columns,
    move_row, now_ms, sequential_params, set_move_state, shard_epochs, shift_pool,
    values_placeholders,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Logs moves `planned` in one transaction, in a fixed number of statements whatever their
/// number: names resolved once, their products locked in id order (so two batches, or a batch
/// and a single move, never wait on each other in a circle), the epoch checked, each release
/// checked against its allocation, each product's grants taken from the reserve into transit
/// together, then the moves inserted by multi-row statements. Any refusal logs none of them.
#[tracing::instrument(skip_all, fields(moves = moves.len()))]
pub(super) async fn begin_moves(
    pool: &Pool<Db>,
    moves: &[NewMove],
) -> StoreResult<Vec<MoveRecord>> {
    let mut tx = begin_write(pool).await?;
    let records = begin_moves_in(&mut tx, moves).await?;
    tx.commit().await?;
    Ok(records)
}

/// [`begin_moves`] inside the caller's write transaction, which commits them (or, on a
/// refusal, drops them with whatever else it wrote).
pub(super) async fn begin_moves_in(
    tx: &mut Conn,
    moves: &[NewMove],
) -> StoreResult<Vec<MoveRecord>> {
    let servers: BTreeSet<&str> = moves.iter().map(|m| m.server.as_str()).collect();
    let products: BTreeSet<&str> = moves.iter().map(|m| m.product.as_str()).collect();
    let ids = NameIds::read_named(tx, &servers, &products).await?;
    let mut resolved = Vec::with_capacity(moves.len());
    for mv in moves {
        let units = i64::try_from(mv.units)
            .ok()
            .filter(|u| *u > 0)
            .ok_or_else(|| StoreError::Conflict(format!("a move of {} units", mv.units)))?;
        let pid = *ids
            .products
            .get(&mv.product)
            .ok_or_else(|| StoreError::UnknownProduct(mv.product.clone()))?;
        let sid = *ids
            .servers
            .get(&mv.server)
            .ok_or_else(|| StoreError::NotFound(format!("server {:?}", mv.server)))?;
        resolved.push((mv, pid, sid, units));
    }
    let pids: BTreeSet<i64> = resolved.iter().map(|r| r.1).collect();
    lock_products(tx, &pids).await?;
    // Each move carries the epoch of its product's shard.
    let shards = shard_epochs(tx).await?;
    for mv in moves {
        check_epoch_of(&shards, &mv.product, mv.epoch)?;
    }
    // Releases and retirements: each within what its server holds.
    let mut held: HashMap<i64, HashMap<i64, i64>> = HashMap::new();
    for (mv, pid, sid, units) in &resolved {
        if mv.kind == MoveKind::Grant {
            continue;
        }
        if !held.contains_key(pid) {
            let cells: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
                "SELECT server_id, units FROM allocations WHERE product_id = $1",
            )
            .bind(*pid)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            held.insert(*pid, cells);
        }
        let has = held[pid].get(sid).copied().unwrap_or(0);
        if has < *units {
            return Err(StoreError::Conflict(format!(
                "server {:?} holds {has} units of {:?}, cannot release {units}",
                mv.server, mv.product
            )));
        }
    }
    // Grants: each product's from its reserve into transit at once, and their cells made.
    let mut granted: BTreeMap<i64, i64> = BTreeMap::new();
    let mut grant_cells = BTreeSet::new();
    for (mv, pid, sid, units) in &resolved {
        if mv.kind == MoveKind::Grant {
            *granted.entry(*pid).or_default() += units;
            grant_cells.insert((*sid, *pid));
        }
    }
    for (pid, units) in granted {
        shift_pool(tx, pid, PoolShift::ReserveToTransit, units).await?;
    }
    let grant_cells: Vec<(i64, i64)> = grant_cells.into_iter().collect();
    for chunk in grant_cells.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO allocations (server_id, product_id) VALUES {} \
             ON CONFLICT (server_id, product_id) DO NOTHING",
            values_placeholders(chunk.len(), 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (sid, pid) in chunk {
            query = query.bind(*sid).bind(*pid);
        }
        query.execute(&mut *tx).await?;
    }
    let now = now_ms();
    for chunk in resolved.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO moves (id, run_id, product_id, server_id, kind, units, state, epoch, \
             created_at, updated_at) VALUES {}",
            values_placeholders(chunk.len(), 10)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (mv, pid, sid, units) in chunk {
            query = query
                .bind(mv.id.to_string())
                .bind(mv.run_id)
                .bind(*pid)
                .bind(*sid)
                .bind(mv.kind.as_str())
                .bind(*units)
                .bind("planned")
                .bind(mv.epoch)
                .bind(now)
                .bind(now);
        }
        query
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_on_constraint(e, &format!("moves {}…", chunk[0].0.id)))?;
    }
    // The records are what was just inserted: no read back (a round trip under the locks).
    Ok(moves.iter().map(logged_record).collect())
}

/// The record of a move just logged `planned`, as it was inserted.
pub(super) fn logged_record(mv: &NewMove) -> MoveRecord {
    MoveRecord {
        id: mv.id,
        run_id: mv.run_id,
        product: mv.product.clone(),
        server: mv.server.clone(),
        kind: mv.kind,
        units: mv.units,
        state: MoveState::Planned,
        applied_units: None,
        epoch: mv.epoch,
    }
}

/// Moves read by one statement: a run's booking group (a batch of 500, or a few smaller ones)
/// in one round trip, within both backends' parameter limits (the parameters are sequential,
/// none used twice).
const MOVES_PER_READ: usize = 2_000;

/// The move log's rows of `ids`, by id, read by one statement per [`MOVES_PER_READ`]; a
/// missing one is `NotFound`.
/// Locks the products of the moves `ids` (at most [`MOVES_PER_READ`]) in id order, as
/// [`lock_products`] does, by one statement that also finds them.
async fn lock_products_of_moves(conn: &mut Conn, ids: &[Uuid]) -> StoreResult<()> {
    let sql = format!(
        "SELECT id FROM products WHERE id IN (SELECT product_id FROM moves WHERE id IN ({})) \
         ORDER BY id{LOCK_PRODUCTS_SUFFIX}",
        sequential_params(&mut 0, ids.len())
    );
    let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
    for id in ids {
        query = query.bind(id.to_string());
    }
    query.fetch_all(&mut *conn).await?;
    Ok(())
}

async fn move_rows(conn: &mut Conn, ids: &[Uuid]) -> StoreResult<HashMap<String, MoveRow>> {
    let mut rows = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MOVES_PER_READ) {
        let params = sequential_params(&mut 0, chunk.len());
        let sql = format!(
            concat!(
                "SELECT ",
                move_columns!(),
                " FROM moves m JOIN products p ON p.id = m.product_id \
                 JOIN servers s ON s.id = m.server_id WHERE m.id IN ({})"
            ),
            params
        );
        let mut query = sqlx::query_as::<_, MoveRow>(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(&mut *conn).await? {
            rows.insert(row.id.clone(), row);
        }
    }
    if let Some(missing) = ids.iter().find(|id| !rows.contains_key(&id.to_string())) {
        return Err(StoreError::NotFound(format!("move {missing}")));
    }
    Ok(rows)
}

/// Books moves `applied` in one transaction, in a fixed number of statements whatever the
/// number of moves, servers and products (a run's group touches every product, and holds
/// their locks until it commits, so an instant balance may wait on it): the moves read, their
/// products locked in id order by one statement, the epoch checked, the moves read again under
/// the locks (a concurrent end may have just committed), then the products' pools changed by
/// one statement, the allocations by one (on SQLite, in-process, one per server), and the
/// moves marked by one. A move already applied is a repeat and changes nothing. Any refusal
/// books none of them (the caller then books them one by one, so one bad answer does not hold
/// back the rest). A batch holding a retirement is booked move by move (retirements also
/// settle expired entitlements, and they are rare).
#[tracing::instrument(skip_all, fields(moves = landed.len()))]
pub(super) async fn complete_moves(
    pool: &Pool<Db>,
    landed: &[LandedMove],
    fence: &Fence,
) -> StoreResult<Vec<MoveRecord>> {
    // The moves are applied already: their booking's commit need not wait for the WAL flush.
    let mut tx = begin_booking(pool).await?;
    let records = complete_moves_in(&mut tx, landed, fence).await?;
    tx.commit().await?;
    Ok(records)
}

/// [`complete_moves`] inside the caller's write transaction, which commits the booking (or,
/// on a refusal, drops it with whatever else it wrote).
pub(super) async fn complete_moves_in(
    tx: &mut Conn,
    landed: &[LandedMove],
    fence: &Fence,
) -> StoreResult<Vec<MoveRecord>> {
    let ids: Vec<Uuid> = landed.iter().map(|l| l.id).collect();
    if ids.len() <= MOVES_PER_READ {
        // Their products locked by one statement that finds them (an instant balance's
        // booking, or a batch of up to a read's worth): one round trip, not two.
        lock_products_of_moves(tx, &ids).await?;
    } else {
        let before = move_rows(tx, &ids).await?;
        let pids: BTreeSet<i64> = before.values().map(|r| r.product_id).collect();
        lock_products(tx, &pids).await?;
    }
    // A move's product never changes, so the rows read under the locks name the same ones.
    let rows = move_rows(tx, &ids).await?;
    let products: BTreeSet<String> = rows.values().map(|r| r.product.clone()).collect();
    let products: Vec<String> = products.into_iter().collect();
    check_fence(tx, fence, &products).await?;
    if rows.values().any(|r| r.kind == MoveKind::Retire.as_str()) {
        let mut records = Vec::with_capacity(landed.len());
        for l in landed {
            records.push(complete_move_in(tx, *l, fence).await?);
        }
        return Ok(records);
    }
    // What each planned move changes; repeats change nothing.
    let mut transit_out: BTreeMap<i64, i64> = BTreeMap::new();
    let mut reserve_in: BTreeMap<i64, i64> = BTreeMap::new();
    // Per server, per product: the allocation's change and the generation it reaches.
    let mut cells: BTreeMap<i64, BTreeMap<i64, (i64, i64)>> = BTreeMap::new();
    let mut applied_now: BTreeMap<String, i64> = BTreeMap::new();
    for l in landed {
        let row = &rows[&l.id.to_string()];
        let record = row.to_record()?;
        let refuse = |why: String| Err(StoreError::Conflict(format!("move {}: {why}", l.id)));
        match record.state {
            MoveState::Planned if !applied_now.contains_key(&row.id) => {}
            MoveState::Planned | MoveState::Applied => continue,
            MoveState::Abandoned => return refuse("it was abandoned".into()),
        }
        let applied = i64::try_from(l.applied_units).unwrap_or(i64::MAX);
        let generation = i64::try_from(l.generation).unwrap_or(i64::MAX);
        let cell = cells
            .entry(row.server_id)
            .or_default()
            .entry(row.product_id)
            .or_insert((0, 0));
        cell.1 = cell.1.max(generation);
        match record.kind {
            MoveKind::Grant => {
                if applied != row.units {
                    return refuse(format!("granted {applied} of {} sent", row.units));
                }
                *transit_out.entry(row.product_id).or_default() += applied;
                cell.0 += applied;
            }
            kind => {
                if applied > row.units {
                    return refuse(format!("{kind}d {applied} of {} asked", row.units));
                }
                *reserve_in.entry(row.product_id).or_default() += applied;
                cell.0 -= applied;
            }
        }
        applied_now.insert(row.id.clone(), applied);
    }
    shift_landed(tx, &transit_out, &reserve_in).await?;
    let changes: Vec<CellChange> = cells
        .iter()
        .flat_map(|(sid, by_product)| {
            by_product
                .iter()
                .map(|(pid, (delta, generation))| CellChange {
                    server_id: *sid,
                    product_id: *pid,
                    delta: *delta,
                    generation: *generation,
                })
        })
        .collect();
    let changed = apply_to_allocations(tx, &changes)
        .await
        .map_err(|e| conflict_on_constraint(e, "allocations of the landed moves"))?;
    if changed != changes.len() as u64 {
        return Err(StoreError::Conflict(format!(
            "{changed} of {} allocations to book exist",
            changes.len()
        )));
    }
    let now = now_ms();
    let applied: Vec<(&String, &i64)> = applied_now.iter().collect();
    let marked = mark_applied(tx, &applied, now).await?;
    if marked != applied.len() as u64 {
        // The moves were read planned under the products' locks, which every end of a move
        // takes: another writer cannot have ended one since.
        return Err(StoreError::Conflict(format!(
            "{marked} of {} moves marked applied",
            applied.len()
        )));
    }
    // The records as booked: the rows read under the locks, with what this booking applied
    // (no read back, a round trip per chunk under the locks).
    ids.iter()
        .map(|id| {
            let row = &rows[&id.to_string()];
            let mut record = row.to_record()?;
            if let Some(applied) = applied_now.get(&row.id) {
                record.state = MoveState::Applied;
                record.applied_units = Some(count(*applied));
            }
            Ok(record)
        })
        .collect()
}

/// Books landed moves' units in their products' pools by one statement per chunk of products,
/// not two per product: each grant's units leave transit (refused as a conflict unless they
/// are all there), each release's join the reserve.
async fn shift_landed(
    tx: &mut Conn,
    transit_out: &BTreeMap<i64, i64>,
    reserve_in: &BTreeMap<i64, i64>,
) -> StoreResult<()> {
    let pids: Vec<i64> = transit_out
        .keys()
        .chain(reserve_in.keys())
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let out = |pid: &i64| transit_out.get(pid).copied().unwrap_or(0);
    let back = |pid: &i64| reserve_in.get(pid).copied().unwrap_or(0);
    // Seven parameters per product, none used twice (SQLite's are anonymous).
    for chunk in pids.chunks(CHUNK / 7) {
        let mut next = 0;
        let leaving = case_by_id(&mut next, chunk.len());
        let joining = case_by_id(&mut next, chunk.len());
        let list = sequential_params(&mut next, chunk.len());
        let needed = case_by_id(&mut next, chunk.len());
        let sql = format!(
            "UPDATE products SET in_transit = in_transit - {leaving}, reserve = reserve + {joining} \
             WHERE id IN ({list}) AND in_transit >= {needed}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for pid in chunk {
            query = query.bind(*pid).bind(out(pid));
        }
        for pid in chunk {
            query = query.bind(*pid).bind(back(pid));
        }
        for pid in chunk {
            query = query.bind(*pid);
        }
        for pid in chunk {
            query = query.bind(*pid).bind(out(pid));
        }
        let shifted = query.execute(&mut *tx).await?.rows_affected();
        if shifted != chunk.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "moves of products {chunk:?}: their units are not all in transit"
            )));
        }
    }
    Ok(())
}

/// `CASE id WHEN ? THEN ? … END` of `arms` arms, its parameters after the `next` already used
/// (bound as id, value per arm).
fn case_by_id(next: &mut usize, arms: usize) -> String {
    let arms: String = (0..arms)
        .map(|_| {
            let id = sequential_params(next, 1);
            format!(" WHEN {id} THEN {}", sequential_params(next, 1))
        })
        .collect();
    format!("CASE id{arms} END")
}

/// Books one move `applied` inside the caller's transaction: a release's units to the
/// reserve (a retirement's out of the estate), a grant's from transit to the allocation.
async fn complete_move_in(
    tx: &mut Conn,
    landed: LandedMove,
    fence: &Fence,
) -> StoreResult<MoveRecord> {
    let LandedMove {
        id,
        applied_units,
        generation,
    } = landed;
    let (row, record) = match planned_move(&mut *tx, id, fence, MoveState::Applied).await? {
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
    fence: &Fence,
) -> StoreResult<MoveRecord> {
    let mut tx = begin_write(pool).await?;
    let (row, record) = match planned_move(&mut tx, id, fence, MoveState::Abandoned).await? {
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
    fence: &Fence,
    ending: MoveState,
) -> StoreResult<Prelude> {
    let row = move_row(conn, id).await?;
    let product = lock_product(conn, row.product_id).await?;
    check_fence(conn, fence, &[product]).await?;
    let row = move_row(conn, id).await?;
    let record = row.to_record()?;
    match record.state {
        MoveState::Planned => Ok(Prelude::Planned(row, record)),
        state if state == ending => Ok(Prelude::Repeated(record)),
        MoveState::Applied => Err(StoreError::Conflict(format!("move {id} was applied"))),
        MoveState::Abandoned => Err(StoreError::Conflict(format!("move {id} was abandoned"))),
    }
}

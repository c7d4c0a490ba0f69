//! Metering servers: registration, tokens and their rotation, drain and removal, the
//! per-(server, product) floors and buffers, leases (touch) and the reclaim of a lost server.

use super::{
    AllocationView, CHUNK, Db, Fence, MoveKind, MoveState, Pool, PoolShift, RegisterServer, Server,
    ServerRecord, ServerRow, ServerState, SetAllocation, StoreError, StoreResult, Uuid,
    begin_write, cell, check_fence, conflict_on_constraint, count, json, lock_product, move_row,
    now_ms, product_id, sequential_params, server_columns, server_row, set_move_state, shift_pool,
    write_audit,
};

#[tracing::instrument(skip_all, fields(server = %req.name))]
pub(super) async fn register_server(
    pool: &Pool<Db>,
    actor: &str,
    req: &RegisterServer,
    token_salt: &str,
    token_hash: &str,
) -> StoreResult<Server> {
    let mut tx = begin_write(pool).await?;
    sqlx::query(
        "INSERT INTO servers (name, url, site, token_hash, token_salt, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', $6)",
    )
    .bind(&req.name)
    .bind(&req.url)
    .bind(&req.site)
    .bind(token_hash)
    .bind(token_salt)
    .bind(now_ms())
    .execute(&mut *tx)
    .await
    .map_err(|e| conflict_on_constraint(e, &format!("server {:?}", req.name)))?;
    let server = server_row(&mut tx, &req.name).await?.into_server()?;
    write_audit(
        &mut tx,
        actor,
        "server.register",
        &req.name,
        None,
        json(&server),
    )
    .await?;
    tx.commit().await?;
    Ok(server)
}

pub(super) async fn server_by_token_hash(
    pool: &Pool<Db>,
    token_hash: &str,
) -> StoreResult<Option<ServerRecord>> {
    sqlx::query_as::<_, ServerRow>(concat!(
        "SELECT ",
        server_columns!(),
        " FROM servers s \
         WHERE (s.token_hash = $1 OR s.previous_token_hash = $1) AND s.removed_at IS NULL"
    ))
    .bind(token_hash)
    .fetch_optional(pool)
    .await?
    .map(ServerRow::into_record)
    .transpose()
}

#[tracing::instrument(skip_all, fields(server = name))]
pub(super) async fn rotate_server_token(
    pool: &Pool<Db>,
    actor: &str,
    name: &str,
    token_salt: &str,
    token_hash: &str,
    previous_until: Option<chrono::DateTime<chrono::Utc>>,
) -> StoreResult<ServerRecord> {
    let mut tx = begin_write(pool).await?;
    let id = server_row(&mut tx, name).await?.id;
    let until = previous_until.map(|t| t.timestamp_millis());
    sqlx::query(
        "UPDATE servers SET \
         previous_token_hash = CASE WHEN $1 IS NULL THEN NULL ELSE token_hash END, \
         previous_token_salt = CASE WHEN $1 IS NULL THEN NULL ELSE token_salt END, \
         previous_token_until = $1, token_hash = $2, token_salt = $3 \
         WHERE id = $4",
    )
    .bind(until)
    .bind(token_hash)
    .bind(token_salt)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(|e| conflict_on_constraint(e, &format!("server {name:?}")))?;
    let record = server_row(&mut tx, name).await?.into_record()?;
    write_audit(
        &mut tx,
        actor,
        "server.rotate_token",
        name,
        None,
        json(&serde_json::json!({ "previous_token_until": previous_until })),
    )
    .await?;
    tx.commit().await?;
    Ok(record)
}

#[tracing::instrument(skip_all, fields(server = name))]
pub(super) async fn retire_previous_token(
    pool: &Pool<Db>,
    name: &str,
    current_salt: &str,
) -> StoreResult<bool> {
    let mut tx = begin_write(pool).await?;
    let retired = sqlx::query(
        "UPDATE servers SET previous_token_hash = NULL, previous_token_salt = NULL, \
         previous_token_until = NULL \
         WHERE name = $1 AND token_salt = $2 AND removed_at IS NULL \
         AND previous_token_hash IS NOT NULL",
    )
    .bind(name)
    .bind(current_salt)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if retired {
        write_audit(
            &mut tx,
            "balancer",
            "server.retire_previous_token",
            name,
            None,
            None,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(retired)
}

#[tracing::instrument(skip_all, fields(server = name))]
pub(super) async fn drain_server(pool: &Pool<Db>, actor: &str, name: &str) -> StoreResult<Server> {
    let mut tx = begin_write(pool).await?;
    let before = server_row(&mut tx, name).await?.into_server()?;
    sqlx::query("UPDATE servers SET state = $1 WHERE name = $2 AND removed_at IS NULL")
        .bind(ServerState::Draining.as_str())
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let after = server_row(&mut tx, name).await?.into_server()?;
    write_audit(
        &mut tx,
        actor,
        "server.drain",
        name,
        json(&before),
        json(&after),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

#[tracing::instrument(skip_all, fields(server = name))]
pub(super) async fn remove_server(pool: &Pool<Db>, actor: &str, name: &str) -> StoreResult<Server> {
    let mut tx = begin_write(pool).await?;
    let row = server_row(&mut tx, name).await?;
    let id = row.id;
    let server = row.into_server()?;
    let (held, in_flight): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE((SELECT SUM(units) FROM allocations WHERE server_id = $1), 0) \
         AS BIGINT), (SELECT COUNT(*) FROM moves WHERE server_id = $1 AND state = 'planned')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if held > 0 || in_flight > 0 {
        return Err(StoreError::Conflict(format!(
            "server {name:?} still holds {held} units and has {in_flight} moves in flight; \
             drain it and let a balance run empty it first"
        )));
    }
    sqlx::query("DELETE FROM allocations WHERE server_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE servers SET removed_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    write_audit(&mut tx, actor, "server.remove", name, json(&server), None).await?;
    tx.commit().await?;
    Ok(server)
}

#[tracing::instrument(skip_all, fields(server, product))]
pub(super) async fn set_allocation_limits(
    pool: &Pool<Db>,
    actor: &str,
    server: &str,
    product: &str,
    req: &SetAllocation,
) -> StoreResult<AllocationView> {
    let mut tx = begin_write(pool).await?;
    let pid = product_id(&mut tx, product).await?;
    let sid = server_row(&mut tx, server).await?.id;
    let before = cell(&mut tx, sid, pid).await.ok();
    sqlx::query(
        "INSERT INTO allocations (server_id, product_id, min_units, buffer_units) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (server_id, product_id) DO UPDATE \
         SET min_units = excluded.min_units, buffer_units = excluded.buffer_units",
    )
    .bind(sid)
    .bind(pid)
    .bind(i64::from(req.min_units))
    .bind(i64::from(req.buffer_units))
    .execute(&mut *tx)
    .await?;
    let after = cell(&mut tx, sid, pid).await?;
    let target = format!("{server}/{product}");
    write_audit(
        &mut tx,
        actor,
        "allocation.set",
        &target,
        before.as_ref().and_then(json),
        json(&after),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

pub(super) async fn server_records(pool: &Pool<Db>) -> StoreResult<Vec<ServerRecord>> {
    sqlx::query_as::<_, ServerRow>(concat!(
        "SELECT ",
        server_columns!(),
        " FROM servers s WHERE s.removed_at IS NULL ORDER BY s.name"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(ServerRow::into_record)
    .collect()
}

pub(super) async fn touch_server(pool: &Pool<Db>, name: &str) -> StoreResult<()> {
    sqlx::query("UPDATE servers SET last_seen_at = $1 WHERE name = $2 AND removed_at IS NULL")
        .bind(now_ms())
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

#[tracing::instrument(skip_all, fields(server = name))]
pub(super) async fn reclaim_lost_server(
    pool: &Pool<Db>,
    name: &str,
    fence: &Fence,
) -> StoreResult<Vec<(String, u64)>> {
    let mut tx = begin_write(pool).await?;
    let server = server_row(&mut tx, name).await?;
    let before = server_row(&mut tx, name).await?.into_server()?;
    let held: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT a.product_id, p.name, a.units FROM allocations a \
         JOIN products p ON p.id = a.product_id WHERE a.server_id = $1 ORDER BY a.product_id",
    )
    .bind(server.id)
    .fetch_all(&mut *tx)
    .await?;
    // Only the products of the shards this leader leads: other shards' leaders reclaim theirs.
    let held: Vec<(i64, String, i64)> = held
        .into_iter()
        .filter(|(_, product, _)| fence.leads(product))
        .collect();
    let planned: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM moves WHERE server_id = $1 AND state = 'planned' ORDER BY id",
    )
    .bind(server.id)
    .fetch_all(&mut *tx)
    .await?;
    let mut product_ids: Vec<i64> = held.iter().map(|(pid, _, _)| *pid).collect();
    let mut mine = Vec::with_capacity(planned.len());
    for id in planned {
        let uuid = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let row = move_row(&mut tx, uuid).await?;
        if fence.leads(&row.product) {
            product_ids.push(row.product_id);
            mine.push(id);
        }
    }
    // Already lost, and nothing of this leader's shards left on it: nothing to write.
    if before.state == ServerState::Lost && mine.is_empty() && held.iter().all(|h| h.2 == 0) {
        return Ok(Vec::new());
    }
    product_ids.sort_unstable();
    product_ids.dedup();
    let mut products = Vec::with_capacity(product_ids.len());
    for pid in &product_ids {
        products.push(lock_product(&mut tx, *pid).await?);
    }
    check_fence(&mut tx, fence, &products).await?;
    for id in mine {
        let uuid = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let row = move_row(&mut tx, uuid).await?;
        if row.kind == MoveKind::Grant.as_str() {
            shift_pool(
                &mut tx,
                row.product_id,
                PoolShift::TransitToReserve,
                row.units,
            )
            .await?;
        }
        set_move_state(
            &mut tx,
            &id,
            MoveState::Abandoned,
            None,
            Some("server lost"),
        )
        .await?;
    }
    let mut reclaimed = Vec::new();
    for (pid, product, units) in held {
        if units > 0 {
            sqlx::query("UPDATE products SET reserve = reserve + $1 WHERE id = $2")
                .bind(units)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE allocations SET units = 0, generation = generation + 1 \
                 WHERE server_id = $1 AND product_id = $2",
            )
            .bind(server.id)
            .bind(pid)
            .execute(&mut *tx)
            .await?;
            reclaimed.push((product, count(units)));
        }
    }
    sqlx::query("UPDATE servers SET state = $1, needs_reset = 1 WHERE id = $2")
        .bind(ServerState::Lost.as_str())
        .bind(server.id)
        .execute(&mut *tx)
        .await?;
    let after = server_row(&mut tx, name).await?.into_server()?;
    let detail = serde_json::json!({ "server": after, "reclaimed": reclaimed });
    write_audit(
        &mut tx,
        "balancer",
        "server.lost",
        name,
        json(&before),
        json(&detail),
    )
    .await?;
    tx.commit().await?;
    Ok(reclaimed)
}

pub(super) async fn revive_server(pool: &Pool<Db>, name: &str) -> StoreResult<bool> {
    let mut tx = begin_write(pool).await?;
    let revived = sqlx::query(
        "UPDATE servers SET state = 'active', last_seen_at = $1 \
         WHERE name = $2 AND removed_at IS NULL AND state = 'lost'",
    )
    .bind(now_ms())
    .bind(name)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if revived {
        write_audit(&mut tx, "balancer", "server.revive", name, None, None).await?;
    }
    tx.commit().await?;
    Ok(revived)
}

pub(super) async fn touch_servers(pool: &Pool<Db>, names: &[String]) -> StoreResult<()> {
    if names.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut tx = begin_write(pool).await?;
    // A few statements for the whole estate, not one round trip per server.
    for chunk in names.chunks(CHUNK) {
        let mut next = 0;
        let now_param = sequential_params(&mut next, 1);
        let sql = format!(
            "UPDATE servers SET last_seen_at = {now_param} WHERE removed_at IS NULL AND name IN ({})",
            sequential_params(&mut next, chunk.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for name in chunk {
            query = query.bind(name);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn clear_reset(pool: &Pool<Db>, name: &str) -> StoreResult<()> {
    sqlx::query("UPDATE servers SET needs_reset = 0 WHERE name = $1 AND removed_at IS NULL")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

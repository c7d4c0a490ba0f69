//! Settings: the schedule, named settings, the token key, the shards' leaders and epochs,
//! and the audit log.

use super::{
    AuditEntry, AuditQuery, AuditRow, Conn, Db, Pool, ScheduleSetting, ShardLeader, StoreError,
    StoreResult, begin_write, json, now_ms, write_audit,
};
use allot_core::shard::MAX_SHARDS;

pub(super) async fn schedule(pool: &Pool<Db>) -> StoreResult<ScheduleSetting> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, value FROM settings WHERE key IN ('schedule.cron', 'schedule.timezone')",
    )
    .fetch_all(pool)
    .await?;
    let get = |key: &str| {
        rows.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| StoreError::Corrupt(format!("setting {key} missing")))
    };
    Ok(ScheduleSetting {
        cron: get("schedule.cron")?,
        timezone: get("schedule.timezone")?,
    })
}

#[tracing::instrument(skip_all, fields(cron = %setting.cron, timezone = %setting.timezone))]
pub(super) async fn set_schedule(
    pool: &Pool<Db>,
    actor: &str,
    setting: &ScheduleSetting,
) -> StoreResult<()> {
    let before = schedule(pool).await?;
    let mut tx = begin_write(pool).await?;
    for (key, value) in [
        ("schedule.cron", &setting.cron),
        ("schedule.timezone", &setting.timezone),
    ] {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    }
    write_audit(
        &mut tx,
        actor,
        "schedule.set",
        "schedule",
        json(&before),
        json(setting),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn record_audit(
    pool: &Pool<Db>,
    actor: &str,
    action: &str,
    target: &str,
    detail: &serde_json::Value,
) -> StoreResult<()> {
    let mut tx = begin_write(pool).await?;
    write_audit(
        &mut tx,
        actor,
        action,
        target,
        None,
        Some(detail.to_string()),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn audit(pool: &Pool<Db>, query: AuditQuery) -> StoreResult<Vec<AuditEntry>> {
    Ok(sqlx::query_as::<_, AuditRow>(
        "SELECT id, at, actor, action, target, before, after FROM audit_log \
         WHERE id < $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(query.before_id.unwrap_or(i64::MAX))
    .bind(i64::from(query.limit))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(AuditEntry::from)
    .collect())
}

pub(super) async fn token_key(pool: &Pool<Db>) -> StoreResult<String> {
    Ok(
        sqlx::query_scalar("SELECT value FROM settings WHERE key = 'server.token.key'")
            .fetch_one(pool)
            .await?,
    )
}

pub(super) async fn setting(pool: &Pool<Db>, key: &str) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?,
    )
}

pub(super) async fn set_setting(
    pool: &Pool<Db>,
    actor: &str,
    key: &str,
    value: &str,
) -> StoreResult<()> {
    let mut tx = begin_write(pool).await?;
    let before: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(&mut *tx)
    .await?;
    let parse = |v: &str| {
        serde_json::from_str::<serde_json::Value>(v)
            .ok()
            .map(|v| v.to_string())
    };
    write_audit(
        &mut tx,
        actor,
        "setting.set",
        key,
        before.as_deref().and_then(parse),
        parse(value),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Draws the next epoch from the one counter every shard's epochs come from.
async fn next_epoch(conn: &mut Conn) -> StoreResult<i64> {
    sqlx::query_scalar::<_, String>(
        "UPDATE settings SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) \
         WHERE key = 'leader.epoch' RETURNING value",
    )
    .fetch_one(conn)
    .await?
    .parse()
    .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))
}

pub(super) async fn take_shard(pool: &Pool<Db>, shard: u32, url: &str) -> StoreResult<i64> {
    let mut tx = begin_write(pool).await?;
    let epoch = next_epoch(&mut tx).await?;
    let taken = sqlx::query(
        "UPDATE leader_shards SET epoch = $1, leader_url = $2, taken_at = $3 WHERE shard = $4",
    )
    .bind(epoch)
    .bind(url)
    .bind(now_ms())
    .bind(i64::from(shard))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if taken == 0 {
        return Err(StoreError::NotFound(format!("shard {shard}")));
    }
    let interrupted = close_interrupted_runs(&mut tx).await?;
    if interrupted > 0 {
        tracing::warn!(
            shard,
            epoch,
            runs = interrupted,
            "closed runs whose leader stopped before finishing them"
        );
    }
    write_audit(
        &mut tx,
        "balancer",
        "leader.take",
        url,
        None,
        Some(serde_json::json!({ "shard": shard, "epoch": epoch, "url": url }).to_string()),
    )
    .await?;
    tx.commit().await?;
    Ok(epoch)
}

/// Closes, as `failed`, the runs left `running` by a leadership that has ended (a crash, a
/// lost lock, a new shard count): no shard holds their epoch any more, so no balancer will
/// finish them. Epochs are unique to one leadership of one shard, and a run carries the newest
/// epoch its leader held, so a live leader's run is closed only once that leadership is over
/// (and should that leader still finish it, its own outcome replaces this one). The moves such
/// a run logged stay in its move log; the next leader resumes the unfinished ones.
async fn close_interrupted_runs(conn: &mut Conn) -> StoreResult<u64> {
    Ok(sqlx::query(
        "UPDATE balance_runs SET status = 'failed', finished_at = $1, errors = $2 \
         WHERE status = 'running' AND epoch NOT IN (SELECT epoch FROM leader_shards)",
    )
    .bind(now_ms())
    .bind(json(&[INTERRUPTED_RUN]))
    .execute(conn)
    .await?
    .rows_affected())
}

/// The error an interrupted run is closed with.
const INTERRUPTED_RUN: &str = "interrupted: the balancer running it stopped or lost \
     its shard's leadership before finishing it; the next leader resumed its unfinished moves";

pub(super) async fn shard_leaders(pool: &Pool<Db>) -> StoreResult<Vec<ShardLeader>> {
    let rows: Vec<(i32, i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT shard, epoch, leader_url, taken_at FROM leader_shards ORDER BY shard",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(shard, epoch, url, taken_at)| ShardLeader {
            shard: u32::try_from(shard).unwrap_or_default(),
            epoch,
            url,
            taken_at: taken_at.and_then(chrono::DateTime::from_timestamp_millis),
        })
        .collect())
}

pub(super) async fn set_shard_count(pool: &Pool<Db>, actor: &str, count: u32) -> StoreResult<()> {
    if !(1..=MAX_SHARDS).contains(&count) {
        return Err(StoreError::Conflict(format!(
            "the shard count must be 1 to {MAX_SHARDS}, not {count}"
        )));
    }
    let mut tx = begin_write(pool).await?;
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leader_shards")
        .fetch_one(&mut *tx)
        .await?;
    // Deleting waits for every write holding a shard's row under its share lock; the writes
    // after this commit find new epochs that no balancer holds, and are fenced.
    sqlx::query("DELETE FROM leader_shards")
        .execute(&mut *tx)
        .await?;
    for shard in 0..count {
        let epoch = next_epoch(&mut tx).await?;
        sqlx::query("INSERT INTO leader_shards (shard, epoch, leader_url) VALUES ($1, $2, '')")
            .bind(i64::from(shard))
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
    }
    write_audit(
        &mut tx,
        actor,
        "shards.set",
        "shards",
        Some(serde_json::json!({ "count": before }).to_string()),
        Some(serde_json::json!({ "count": count }).to_string()),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

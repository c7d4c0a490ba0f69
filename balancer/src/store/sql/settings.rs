//! Settings: the schedule, named settings, the token key, the leader epoch and URL, and
//! the audit log.

use super::{
    AuditEntry, AuditQuery, AuditRow, Db, Pool, ScheduleSetting, StoreError, StoreResult,
    begin_write, json, write_audit,
};

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

pub(super) async fn take_leadership(pool: &Pool<Db>, url: &str) -> StoreResult<i64> {
    let mut tx = begin_write(pool).await?;
    let epoch: i64 = sqlx::query_scalar::<_, String>(
        "UPDATE settings SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) \
         WHERE key = 'leader.epoch' RETURNING value",
    )
    .fetch_one(&mut *tx)
    .await?
    .parse()
    .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))?;
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ('leader.url', $1) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(url)
    .execute(&mut *tx)
    .await?;
    write_audit(
        &mut tx,
        "balancer",
        "leader.take",
        url,
        None,
        Some(serde_json::json!({ "epoch": epoch, "url": url }).to_string()),
    )
    .await?;
    tx.commit().await?;
    Ok(epoch)
}

pub(super) async fn leader(pool: &Pool<Db>) -> StoreResult<(i64, String)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, value FROM settings WHERE key IN ('leader.epoch', 'leader.url')",
    )
    .fetch_all(pool)
    .await?;
    let get = |key: &str| rows.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let epoch = get("leader.epoch")
        .unwrap_or_default()
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("leader.epoch: {e}")))?;
    Ok((epoch, get("leader.url").unwrap_or_default()))
}

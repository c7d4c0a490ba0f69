//! Operators: their names, roles and password hashes (checked by the `operators` module, never
//! here), each change audited in its own transaction.

use super::{Db, StoreError, StoreResult, begin_write, conflict_on_constraint, json, write_audit};
use crate::store::rows::{now_ms, time};
use crate::store::{Operator, Role};
use sqlx::Pool;

type Row = (String, String, String, i64, String);

fn operator(row: &Row) -> StoreResult<Operator> {
    let (name, role, _, created_at, created_by) = row;
    Ok(Operator {
        name: name.clone(),
        role: Role::parse(role)
            .ok_or_else(|| StoreError::Corrupt(format!("operator {name}: role {role:?}")))?,
        created_at: time(*created_at),
        created_by: created_by.clone(),
    })
}

#[tracing::instrument(skip_all, fields(operator = %name, role = role.as_str()))]
pub(super) async fn add_operator(
    pool: &Pool<Db>,
    actor: &str,
    name: &str,
    role: Role,
    password_hash: &str,
) -> StoreResult<Operator> {
    let mut tx = begin_write(pool).await?;
    let row: Row = sqlx::query_as(
        "INSERT INTO operators (name, role, password_hash, created_at, created_by) \
         VALUES ($1, $2, $3, $4, $5) \
         RETURNING name, role, password_hash, created_at, created_by",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(password_hash)
    .bind(now_ms())
    .bind(actor)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| conflict_on_constraint(e, &format!("operator {name}")))?;
    let added = operator(&row)?;
    write_audit(&mut tx, actor, "operator.add", name, None, json(&added)).await?;
    tx.commit().await?;
    Ok(added)
}

pub(super) async fn operators(pool: &Pool<Db>) -> StoreResult<Vec<Operator>> {
    sqlx::query_as::<_, Row>(
        "SELECT name, role, password_hash, created_at, created_by FROM operators ORDER BY name",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(operator)
    .collect()
}

pub(super) async fn operator_credentials(
    pool: &Pool<Db>,
    name: &str,
) -> StoreResult<Option<(Operator, String)>> {
    sqlx::query_as::<_, Row>(
        "SELECT name, role, password_hash, created_at, created_by FROM operators WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?
    .map(|row| Ok((operator(&row)?, row.2.clone())))
    .transpose()
}

#[tracing::instrument(skip_all, fields(operator = %name))]
pub(super) async fn remove_operator(
    pool: &Pool<Db>,
    actor: &str,
    name: &str,
) -> StoreResult<Operator> {
    let mut tx = begin_write(pool).await?;
    let row: Row = sqlx::query_as(
        "DELETE FROM operators WHERE name = $1 \
         RETURNING name, role, password_hash, created_at, created_by",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("operator {name}")))?;
    let removed = operator(&row)?;
    write_audit(
        &mut tx,
        actor,
        "operator.remove",
        name,
        json(&removed),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(removed)
}

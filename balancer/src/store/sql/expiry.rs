//! Expired entitlements leave `purchased` (issue 15): from the reserve at once, from servers by
//! `retire` moves (see `balance::expiry`). Every step keeps `purchased = reserve + in transit +
//! allocated` and `purchased = Σ live entitlements − Σ retired` at each commit.

use super::{
    Conn, Db, Fence, Pool, StoreResult, begin_write, check_fence, lock_product, now_ms, write_audit,
};

/// Who retires an expired entitlement, in the audit log.
const ACTOR: &str = "expiry";

/// Attributes `units` leaving the estate to the product's expired entitlements, soonest
/// expired first: `purchased` drops by what they were owed, and an entitlement all of whose
/// units are out is removed and audited. Returns the units attributed (never more than owed;
/// the caller keeps the rest in the estate). The product must be locked.
pub(super) async fn retire(conn: &mut Conn, product_id: i64, units: i64) -> StoreResult<i64> {
    let now = now_ms();
    let owed: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, units, retired FROM entitlements WHERE product_id = $1 \
         AND removed_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $2 \
         AND retired < units ORDER BY expires_at, id",
    )
    .bind(product_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut left = units;
    for (id, total, retired) in owed {
        if left == 0 {
            break;
        }
        let take = left.min(total - retired);
        left -= take;
        let done = retired + take == total;
        sqlx::query(
            "UPDATE entitlements SET retired = retired + $1, \
             removed_at = CASE WHEN $2 THEN $3 ELSE removed_at END, \
             removed_by = CASE WHEN $2 THEN $4 ELSE removed_by END WHERE id = $5",
        )
        .bind(take)
        .bind(done)
        .bind(now)
        .bind(ACTOR)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        if done {
            let name: String = sqlx::query_scalar("SELECT name FROM products WHERE id = $1")
                .bind(product_id)
                .fetch_one(&mut *conn)
                .await?;
            let what = serde_json::json!({ "entitlement": id, "units": total });
            write_audit(
                conn,
                ACTOR,
                "entitlement.expire",
                &name,
                Some(what.to_string()),
                None,
            )
            .await?;
        }
    }
    let attributed = units - left;
    if attributed > 0 {
        sqlx::query("UPDATE products SET purchased = purchased - $1 WHERE id = $2")
            .bind(attributed)
            .bind(product_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(attributed)
}

/// For every product with expired entitlements still owed units: retires what the reserve
/// holds, and returns (product, units still to retire from servers), net of retire moves
/// already logged and not yet finished.
pub(super) async fn expire_from_reserve(
    pool: &Pool<Db>,
    now_ms: i64,
    fence: &Fence,
) -> StoreResult<Vec<(String, u64)>> {
    let products: Vec<(i64, String)> = sqlx::query_as(
        "SELECT DISTINCT p.id, p.name FROM entitlements e JOIN products p ON p.id = e.product_id \
         WHERE e.removed_at IS NULL AND e.expires_at IS NOT NULL AND e.expires_at <= $1 \
         ORDER BY p.name",
    )
    .bind(now_ms)
    .fetch_all(pool)
    .await?;
    let mut outstanding = Vec::new();
    // Only the products of the shards this leader leads: other shards' leaders expire theirs.
    for (pid, name) in products.into_iter().filter(|(_, name)| fence.leads(name)) {
        let mut tx = begin_write(pool).await?;
        lock_product(&mut tx, pid).await?;
        check_fence(&mut tx, fence, std::slice::from_ref(&name)).await?;
        let (owed, planned, reserve): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
             CAST(COALESCE((SELECT SUM(units - retired) FROM entitlements WHERE product_id = $1 \
                 AND removed_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $2), 0) \
                 AS BIGINT), \
             CAST(COALESCE((SELECT SUM(units) FROM moves WHERE product_id = $1 \
                 AND kind = 'retire' AND state = 'planned'), 0) AS BIGINT), \
             reserve FROM products WHERE id = $1",
        )
        .bind(pid)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        let due = (owed - planned).max(0);
        let from_reserve = due.min(reserve);
        if from_reserve > 0 {
            let retired = retire(&mut tx, pid, from_reserve).await?;
            sqlx::query("UPDATE products SET reserve = reserve - $1 WHERE id = $2")
                .bind(retired)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let left = due - from_reserve;
        if left > 0 {
            outstanding.push((name, u64::try_from(left).unwrap_or(0)));
        }
    }
    Ok(outstanding)
}

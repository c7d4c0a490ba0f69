//! Usage and denial records (issue 15): stored once by record id, pruned by retention, and
//! read by the usage and renewal reports. A report's grouping is one of a fixed set of column
//! expressions, never text from the request.

use super::{Conn, Db, Pool, StoreResult, begin_write, count, values_placeholders};
use crate::store::{RecordsQuery, UsageTotals};
use allot_core::usage::Interval;
use allot_core::wire::records::{GroupBy, RecordAck, RecordBatch};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Stores a server's batch in one transaction; records already stored count as duplicates,
/// records naming a product the balancer does not know are dropped (and counted).
pub(super) async fn store_records(
    pool: &Pool<Db>,
    server: &str,
    batch: &RecordBatch,
) -> StoreResult<(RecordAck, u64)> {
    let mut tx = begin_write(pool).await?;
    let server_id: i64 = sqlx::query_scalar("SELECT id FROM servers WHERE name = $1")
        .bind(server)
        .fetch_one(&mut *tx)
        .await?;
    let products: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT name, id FROM products")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut ack = RecordAck::default();
    let mut dropped = 0u64;
    let mut groups: Vec<(String, &str)> = Vec::new();
    // Each record kind: its rows with their product id, the INSERT's head and column count,
    // and how one row binds.
    let known = |product: &str| products.get(product).copied();
    let usage: Vec<_> = batch
        .usage
        .iter()
        .filter_map(|r| known(&r.product).map(|pid| (pid, r)))
        .collect();
    let denials: Vec<_> = batch
        .denials
        .iter()
        .filter_map(|r| known(&r.product).map(|pid| (pid, r)))
        .collect();
    dropped += (batch.usage.len() - usage.len() + batch.denials.len() - denials.len()) as u64;
    for chunk in usage.chunks(500) {
        let fresh = insert_new(
            &mut tx,
            "usage_records (id, server_id, product_id, user_name, host, units, started_at, \
             ended_at, ended_by)",
            9,
            chunk,
            |q, (pid, r)| {
                q.bind(r.id.to_string())
                    .bind(server_id)
                    .bind(*pid)
                    .bind(&r.user)
                    .bind(&r.host)
                    .bind(i64::from(r.units))
                    .bind(r.started_at.timestamp_millis())
                    .bind(r.ended_at.timestamp_millis())
                    .bind(r.ended_by.as_str())
            },
        )
        .await?;
        ack.stored += fresh.len() as u64;
        ack.duplicates += (chunk.len() - fresh.len()) as u64;
        for (_, r) in chunk {
            let id = r.id.to_string();
            if fresh.contains(&id) {
                groups.extend(r.groups.iter().map(|g| (id.clone(), g.as_str())));
            }
        }
    }
    for chunk in denials.chunks(500) {
        let fresh = insert_new(
            &mut tx,
            "denial_records (id, server_id, product_id, user_name, host, at, reason, \
             free_elsewhere)",
            8,
            chunk,
            |q, (pid, r)| {
                q.bind(r.id.to_string())
                    .bind(server_id)
                    .bind(*pid)
                    .bind(&r.user)
                    .bind(&r.host)
                    .bind(r.at.timestamp_millis())
                    .bind(&r.reason)
                    .bind(r.free_elsewhere)
            },
        )
        .await?;
        ack.stored += fresh.len() as u64;
        ack.duplicates += (chunk.len() - fresh.len()) as u64;
        for (_, r) in chunk {
            let id = r.id.to_string();
            if fresh.contains(&id) {
                groups.extend(r.groups.iter().map(|g| (id.clone(), g.as_str())));
            }
        }
    }
    groups.sort_unstable();
    groups.dedup();
    for chunk in groups.chunks(1_000) {
        let mut sql = String::from("INSERT INTO record_groups (record_id, group_name) VALUES ");
        sql.push_str(&values_placeholders(chunk.len(), 2));
        sql.push_str(" ON CONFLICT DO NOTHING");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, group) in chunk {
            query = query.bind(id).bind(*group);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok((ack, dropped))
}

/// A statement binding one row's parameters.
type Insert<'q> = sqlx::query::QueryScalar<'q, Db, String, <Db as sqlx::Database>::Arguments>;

/// Inserts `rows` into `into` (`table (columns)`) in one statement, skipping ids already
/// stored; returns the ids stored now.
async fn insert_new<'q, R>(
    conn: &mut Conn,
    into: &str,
    columns: usize,
    rows: &'q [R],
    bind: impl Fn(Insert<'q>, &'q R) -> Insert<'q>,
) -> StoreResult<HashSet<String>> {
    let sql = format!(
        "INSERT INTO {into} VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id",
        values_placeholders(rows.len(), columns)
    );
    let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
    for row in rows {
        query = bind(query, row);
    }
    Ok(query.fetch_all(&mut *conn).await?.into_iter().collect())
}

/// The key column and the join a grouping needs: a fixed set, never request text.
fn grouping(by: GroupBy) -> (&'static str, &'static str) {
    match by {
        GroupBy::User => ("r.user_name", ""),
        GroupBy::Host => ("r.host", ""),
        GroupBy::Server => ("s.name", ""),
        GroupBy::Site => ("s.site", ""),
        GroupBy::Product => ("p.name", ""),
        GroupBy::Group => ("g.group_name", "JOIN record_groups g ON g.record_id = r.id"),
    }
}

/// Per group: checkouts overlapping the window, unit-milliseconds inside it, the peak held at
/// once inside it (a running sum over the clipped start and end events, ends first at equal
/// times), and denials by class.
pub(super) async fn usage_totals(
    pool: &Pool<Db>,
    q: &RecordsQuery,
) -> StoreResult<Vec<UsageTotals>> {
    let (key, join) = grouping(q.group_by);
    let product = q.product.clone().unwrap_or_default();
    let usage_sql = format!(
        "WITH base AS ( \
           SELECT {key} AS key, r.units, \
             CASE WHEN r.started_at > $1 THEN r.started_at ELSE $1 END AS started_at, \
             CASE WHEN r.ended_at < $2 THEN r.ended_at ELSE $2 END AS ended_at \
           FROM usage_records r \
           JOIN servers s ON s.id = r.server_id JOIN products p ON p.id = r.product_id {join} \
           WHERE r.ended_at > $1 AND r.started_at < $2 AND ($3 = '' OR p.name = $3)), \
         ev AS ( \
           SELECT key, started_at AS t, units AS d FROM base \
           UNION ALL SELECT key, ended_at AS t, -units AS d FROM base), \
         lvl AS ( \
           SELECT key, CAST(SUM(d) OVER (PARTITION BY key ORDER BY t, d \
             ROWS UNBOUNDED PRECEDING) AS BIGINT) AS level FROM ev), \
         peaks AS (SELECT key, MAX(level) AS peak FROM lvl GROUP BY key) \
         SELECT b.key, CAST(COUNT(*) AS BIGINT), \
           CAST(SUM(b.units * (b.ended_at - b.started_at)) AS BIGINT), \
           MAX(pk.peak) \
         FROM base b JOIN peaks pk ON pk.key = b.key GROUP BY b.key"
    );
    let usage: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(usage_sql))
        .bind(q.since_ms)
        .bind(q.until_ms)
        .bind(&product)
        .fetch_all(pool)
        .await?;
    let denial_sql = format!(
        "SELECT {key} AS key, \
           CAST(SUM(CASE WHEN r.free_elsewhere = FALSE THEN 1 ELSE 0 END) AS BIGINT), \
           CAST(SUM(CASE WHEN r.free_elsewhere = TRUE THEN 1 ELSE 0 END) AS BIGINT), \
           CAST(SUM(CASE WHEN r.free_elsewhere IS NULL THEN 1 ELSE 0 END) AS BIGINT) \
         FROM denial_records r JOIN servers s ON s.id = r.server_id \
         JOIN products p ON p.id = r.product_id {join} \
         WHERE r.at >= $1 AND r.at < $2 AND ($3 = '' OR p.name = $3) GROUP BY 1"
    );
    let denials: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(denial_sql))
        .bind(q.since_ms)
        .bind(q.until_ms)
        .bind(&product)
        .fetch_all(pool)
        .await?;
    let mut rows: BTreeMap<String, UsageTotals> = BTreeMap::new();
    for (key, checkouts, unit_ms, peak) in usage {
        let row = rows.entry(key.clone()).or_insert_with(|| UsageTotals {
            key,
            ..UsageTotals::default()
        });
        row.checkouts = count(checkouts);
        row.unit_ms = count(unit_ms);
        row.peak = count(peak);
    }
    for (key, truly, falsely, other) in denials {
        let row = rows.entry(key.clone()).or_insert_with(|| UsageTotals {
            key,
            ..UsageTotals::default()
        });
        row.denials_true = count(truly);
        row.denials_false = count(falsely);
        row.denials_other = count(other);
    }
    Ok(rows.into_values().collect())
}

/// One product's checkouts overlapping `[since_ms, until_ms)`, for its concurrency profile.
pub(super) async fn usage_intervals(
    pool: &Pool<Db>,
    product: &str,
    since_ms: i64,
    until_ms: i64,
) -> StoreResult<Vec<Interval>> {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT r.started_at, r.ended_at, r.units FROM usage_records r \
         JOIN products p ON p.id = r.product_id \
         WHERE p.name = $1 AND r.ended_at > $2 AND r.started_at < $3",
    )
    .bind(product)
    .bind(since_ms)
    .bind(until_ms)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(start, end, units)| Interval {
            start,
            end,
            units: count(units),
        })
        .collect())
}

/// Deletes records that ended (usage) or happened (denials) before `before_ms`, with their
/// groups; returns how many records went.
pub(super) async fn prune_records(pool: &Pool<Db>, before_ms: i64) -> StoreResult<u64> {
    let mut tx = begin_write(pool).await?;
    sqlx::query(
        "DELETE FROM record_groups WHERE record_id IN \
         (SELECT id FROM usage_records WHERE ended_at < $1 \
          UNION ALL SELECT id FROM denial_records WHERE at < $1)",
    )
    .bind(before_ms)
    .execute(&mut *tx)
    .await?;
    let usage = sqlx::query("DELETE FROM usage_records WHERE ended_at < $1")
        .bind(before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let denials = sqlx::query("DELETE FROM denial_records WHERE at < $1")
        .bind(before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(usage + denials)
}

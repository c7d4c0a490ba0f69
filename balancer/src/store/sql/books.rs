//! Products, their purchases (entitlements) and the books each product keeps: purchased,
//! reserve, in transit and the per-server cells.

use super::{
    AddEntitlement, BooksCheck, CHUNK, CellRecord, CellRecordRow, CellRow, CreateProduct, Db,
    Entitlement, EntitlementRow, Pool, Product, ProductDetail, ProductRow, StoreError, StoreResult,
    begin_read, begin_write, cell_columns, cell_record_columns, conflict_on_constraint, count,
    entitlement_columns, json, lock_product, now_ms, product_by_id, product_columns, product_id,
    sequential_params, write_audit,
};
use std::collections::HashMap;

#[tracing::instrument(skip_all, fields(product = %def.name))]
pub(super) async fn create_product(
    pool: &Pool<Db>,
    actor: &str,
    def: &CreateProduct,
) -> StoreResult<Product> {
    let mut tx = begin_write(pool).await?;
    let policy = def.policy();
    let id = sqlx::query_scalar::<_, i64>(
        "INSERT INTO products (name, publisher, version, enforcement, seat, \
         heartbeat_seconds, staleout_seconds, acl, options, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(&def.name)
    .bind(&def.publisher)
    .bind(&def.version)
    .bind(policy.enforcement.as_str())
    .bind(policy.seat.as_str())
    .bind(i64::from(policy.heartbeat_seconds))
    .bind(i64::from(policy.staleout_seconds))
    .bind(json(&policy.acl).unwrap_or_else(|| "{}".into()))
    .bind(json(&policy.options).unwrap_or_else(|| "{}".into()))
    .bind(now_ms())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| conflict_on_constraint(e, &format!("product {:?}", def.name)))?;
    let product = product_by_id(&mut tx, id).await?;
    write_audit(
        &mut tx,
        actor,
        "product.create",
        &def.name,
        None,
        json(&product),
    )
    .await?;
    tx.commit().await?;
    Ok(product)
}

#[tracing::instrument(skip_all, fields(product = %name))]
pub(super) async fn set_policy(
    pool: &Pool<Db>,
    actor: &str,
    name: &str,
    policy: &allot_core::domain::Policy,
) -> StoreResult<Product> {
    let mut tx = begin_write(pool).await?;
    let id = product_id(&mut tx, name).await?;
    let before = product_by_id(&mut tx, id).await?;
    sqlx::query(
        "UPDATE products SET enforcement = $2, seat = $3, heartbeat_seconds = $4, \
         staleout_seconds = $5, acl = $6, options = $7 WHERE id = $1",
    )
    .bind(id)
    .bind(policy.enforcement.as_str())
    .bind(policy.seat.as_str())
    .bind(i64::from(policy.heartbeat_seconds))
    .bind(i64::from(policy.staleout_seconds))
    .bind(json(&policy.acl).unwrap_or_else(|| "{}".into()))
    .bind(json(&policy.options).unwrap_or_else(|| "{}".into()))
    .execute(&mut *tx)
    .await?;
    let product = product_by_id(&mut tx, id).await?;
    write_audit(
        &mut tx,
        actor,
        "product.policy",
        name,
        json(&before.policy),
        json(&product.policy),
    )
    .await?;
    tx.commit().await?;
    Ok(product)
}

pub(super) async fn products<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
) -> StoreResult<Vec<Product>> {
    sqlx::query_as::<_, ProductRow>(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products p ORDER BY p.name"
    ))
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(ProductRow::into_product)
    .collect()
}

pub(super) async fn product(pool: &Pool<Db>, name: &str) -> StoreResult<ProductDetail> {
    // One snapshot for the product's sums and its cells, so they add up as at a commit.
    let mut conn = begin_read(pool).await?;
    let id = product_id(&mut conn, name).await?;
    let product = product_by_id(&mut conn, id).await?;
    let servers = sqlx::query_as::<_, CellRow>(concat!(
        "SELECT ",
        cell_columns!(),
        " FROM allocations a JOIN servers s ON s.id = a.server_id \
         WHERE a.product_id = $1 AND s.removed_at IS NULL ORDER BY s.name"
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(CellRow::into_view)
    .collect::<StoreResult<_>>()?;
    conn.commit().await?;
    Ok(ProductDetail { product, servers })
}

pub(super) async fn product_books(pool: &Pool<Db>, name: &str) -> StoreResult<Product> {
    let mut conn = begin_read(pool).await?;
    let id = product_id(&mut conn, name).await?;
    let product = product_by_id(&mut conn, id).await?;
    conn.commit().await?;
    Ok(product)
}

/// [`crate::store::Store::reserve`]: one row, no sum over the cells.
pub(super) async fn reserve(pool: &Pool<Db>, product: &str) -> StoreResult<u64> {
    sqlx::query_scalar::<_, i64>("SELECT reserve FROM products WHERE name = $1")
        .bind(product)
        .fetch_optional(pool)
        .await?
        .map(count)
        .ok_or_else(|| StoreError::UnknownProduct(product.to_owned()))
}

#[tracing::instrument(skip_all, fields(product, units = req.units))]
pub(super) async fn add_entitlement(
    pool: &Pool<Db>,
    actor: &str,
    product: &str,
    req: &AddEntitlement,
) -> StoreResult<Entitlement> {
    let mut tx = begin_write(pool).await?;
    let pid = product_id(&mut tx, product).await?;
    let units = i64::from(req.units);
    let id = sqlx::query_scalar::<_, i64>(
        "INSERT INTO entitlements (product_id, units, expires_at, reference, created_at, \
         created_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(pid)
    .bind(units)
    .bind(req.expires_at.map(|t| t.timestamp_millis()))
    .bind(&req.reference)
    .bind(now_ms())
    .bind(actor)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE products SET purchased = purchased + $1, reserve = reserve + $1 WHERE id = $2",
    )
    .bind(units)
    .bind(pid)
    .execute(&mut *tx)
    .await?;
    let entitlement: Entitlement = sqlx::query_as::<_, EntitlementRow>(concat!(
        "SELECT ",
        entitlement_columns!(),
        " FROM entitlements e \
         JOIN products p ON p.id = e.product_id WHERE e.id = $1"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?
    .into();
    write_audit(
        &mut tx,
        actor,
        "entitlement.add",
        product,
        None,
        json(&entitlement),
    )
    .await?;
    tx.commit().await?;
    Ok(entitlement)
}

pub(super) async fn dated_entitlements(pool: &Pool<Db>) -> StoreResult<Vec<Entitlement>> {
    Ok(sqlx::query_as::<_, EntitlementRow>(concat!(
        "SELECT ",
        entitlement_columns!(),
        " FROM entitlements e \
         JOIN products p ON p.id = e.product_id \
         WHERE e.removed_at IS NULL AND e.expires_at IS NOT NULL ORDER BY e.expires_at, e.id"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(Entitlement::from)
    .collect())
}

pub(super) async fn entitlements(pool: &Pool<Db>, product: &str) -> StoreResult<Vec<Entitlement>> {
    let mut conn = pool.acquire().await?;
    let pid = product_id(&mut conn, product).await?;
    Ok(sqlx::query_as::<_, EntitlementRow>(concat!(
        "SELECT ",
        entitlement_columns!(),
        " FROM entitlements e \
         JOIN products p ON p.id = e.product_id \
         WHERE e.product_id = $1 AND e.removed_at IS NULL ORDER BY e.id"
    ))
    .bind(pid)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(Entitlement::from)
    .collect())
}

#[tracing::instrument(skip_all, fields(product, entitlement = id))]
pub(super) async fn remove_entitlement(
    pool: &Pool<Db>,
    actor: &str,
    product: &str,
    id: i64,
) -> StoreResult<Entitlement> {
    let mut tx = begin_write(pool).await?;
    let pid = product_id(&mut tx, product).await?;
    lock_product(&mut tx, pid).await?;
    let entitlement: Entitlement = sqlx::query_as::<_, EntitlementRow>(concat!(
        "SELECT ",
        entitlement_columns!(),
        " FROM entitlements e \
         JOIN products p ON p.id = e.product_id \
         WHERE e.id = $1 AND e.product_id = $2 AND e.removed_at IS NULL"
    ))
    .bind(id)
    .bind(pid)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("entitlement {id} of {product:?}")))?
    .into();
    let units = i64::try_from(entitlement.units).unwrap_or(i64::MAX);
    let removed = sqlx::query(
        "UPDATE products SET purchased = purchased - $1, reserve = reserve - $1 \
         WHERE id = $2 AND reserve >= $1",
    )
    .bind(units)
    .bind(pid)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if removed == 0 {
        let reserve: i64 = sqlx::query_scalar("SELECT reserve FROM products WHERE id = $1")
            .bind(pid)
            .fetch_one(&mut *tx)
            .await?;
        return Err(StoreError::Conflict(format!(
            "entitlement {id} holds {units} units but only {reserve} are free in the \
             reserve of {product:?}; release units from servers first"
        )));
    }
    sqlx::query("UPDATE entitlements SET removed_at = $1, removed_by = $2 WHERE id = $3")
        .bind(now_ms())
        .bind(actor)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    write_audit(
        &mut tx,
        actor,
        "entitlement.remove",
        product,
        json(&entitlement),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(entitlement)
}

pub(super) async fn books(pool: &Pool<Db>) -> StoreResult<Vec<BooksCheck>> {
    Ok(sqlx::query_as::<_, BooksCheck>(
        "SELECT p.name AS product, p.purchased, p.reserve, p.in_transit, \
         CAST(COALESCE((SELECT SUM(a.units) FROM allocations a \
             WHERE a.product_id = p.id), 0) AS BIGINT) AS allocated, \
         CAST(COALESCE((SELECT SUM(e.units - e.retired) FROM entitlements e \
             WHERE e.product_id = p.id AND e.removed_at IS NULL), 0) AS BIGINT) AS entitled, \
         CAST(COALESCE((SELECT SUM(m.units) FROM moves m WHERE m.product_id = p.id \
             AND m.kind = 'grant' AND m.state = 'planned'), 0) AS BIGINT) AS planned_grants \
         FROM products p ORDER BY p.name",
    )
    .fetch_all(pool)
    .await?)
}

pub(super) async fn product_cells(pool: &Pool<Db>, product: &str) -> StoreResult<Vec<CellRecord>> {
    Ok(sqlx::query_as::<_, CellRecordRow>(concat!(
        "SELECT ",
        cell_record_columns!(),
        " FROM allocations a JOIN servers s ON s.id = a.server_id \
          JOIN products p ON p.id = a.product_id \
          WHERE s.removed_at IS NULL AND p.name = $1 ORDER BY s.name"
    ))
    .bind(product)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(CellRecord::from)
    .collect())
}

/// The cells of `product` held by `servers` (some of its cells, read again), by one
/// statement per [`CHUNK`] servers.
pub(super) async fn product_cells_of(
    pool: &Pool<Db>,
    product: &str,
    servers: &[String],
) -> StoreResult<Vec<CellRecord>> {
    let mut cells = Vec::with_capacity(servers.len());
    for chunk in servers.chunks(CHUNK) {
        let mut next = 0;
        let product_param = sequential_params(&mut next, 1);
        let sql = format!(
            concat!(
                "SELECT ",
                cell_record_columns!(),
                " FROM allocations a JOIN servers s ON s.id = a.server_id \
                  JOIN products p ON p.id = a.product_id \
                  WHERE s.removed_at IS NULL AND p.name = {} AND s.name IN ({}) ORDER BY s.name"
            ),
            product_param,
            sequential_params(&mut next, chunk.len())
        );
        let mut query = sqlx::query_as::<_, CellRecordRow>(sqlx::AssertSqlSafe(sql)).bind(product);
        for server in chunk {
            query = query.bind(server.as_str());
        }
        cells.extend(
            query
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(CellRecord::from),
        );
    }
    Ok(cells)
}

pub(super) async fn cell<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
    server: &str,
    product: &str,
) -> StoreResult<Option<CellRecord>> {
    Ok(sqlx::query_as::<_, CellRecordRow>(concat!(
        "SELECT ",
        cell_record_columns!(),
        " FROM allocations a JOIN servers s ON s.id = a.server_id \
          JOIN products p ON p.id = a.product_id \
          WHERE s.removed_at IS NULL AND s.name = $1 AND p.name = $2"
    ))
    .bind(server)
    .bind(product)
    .fetch_optional(conn)
    .await?
    .map(CellRecord::from))
}

pub(super) async fn last_peaks(
    pool: &Pool<Db>,
    product: &str,
) -> StoreResult<HashMap<String, u64>> {
    let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT s.name, (SELECT u.peak_in_use FROM usage_samples u \
         WHERE u.server_id = a.server_id AND u.product_id = a.product_id \
         ORDER BY u.at DESC LIMIT 1) \
         FROM allocations a JOIN servers s ON s.id = a.server_id \
         JOIN products p ON p.id = a.product_id \
         WHERE s.removed_at IS NULL AND p.name = $1",
    )
    .bind(product)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(server, peak)| Some((server, count(peak?))))
        .collect())
}

/// [`crate::store::Store::products_and_cells`]: both read in one snapshot.
pub(super) async fn products_and_cells(
    pool: &Pool<Db>,
) -> StoreResult<(Vec<Product>, Vec<CellRecord>)> {
    let mut conn = begin_read(pool).await?;
    let products = products(&mut *conn).await?;
    let cells = cells(&mut *conn).await?;
    conn.commit().await?;
    Ok((products, cells))
}

pub(super) async fn cells<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
) -> StoreResult<Vec<CellRecord>> {
    Ok(super::collect_yielding(
        sqlx::query_as::<_, CellRecordRow>(concat!(
            "SELECT ",
            cell_record_columns!(),
            " FROM allocations a JOIN servers s ON s.id = a.server_id \
              JOIN products p ON p.id = a.product_id \
              WHERE s.removed_at IS NULL ORDER BY p.name, s.name"
        ))
        .fetch(conn),
    )
    .await?
    .into_iter()
    .map(CellRecord::from)
    .collect())
}

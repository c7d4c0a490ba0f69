//! The whole estate's cells in one statement, for the console's estate page (one query
//! instead of one per product: the page is polled every few seconds by every open console).

use super::{Db, StoreResult};
use crate::store::rows::{CellRow, cell_columns};
use allot_core::wire::balancer::AllocationView;
use sqlx::Pool;

#[derive(sqlx::FromRow)]
struct EstateRow {
    product: String,
    #[sqlx(flatten)]
    cell: CellRow,
}

pub(super) async fn all_cells(pool: &Pool<Db>) -> StoreResult<Vec<(String, AllocationView)>> {
    sqlx::query_as::<_, EstateRow>(concat!(
        "SELECT p.name AS product, ",
        cell_columns!(),
        " FROM allocations a JOIN servers s ON s.id = a.server_id \
         JOIN products p ON p.id = a.product_id \
         WHERE s.removed_at IS NULL ORDER BY p.name, s.name"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| Ok((row.product, row.cell.into_view()?)))
    .collect()
}

//! Applying a plan to a snapshot: the check that every move fits (releases only free units, grants
//! only what the reserve holds at that point), used by tests and the workload simulator.

use super::*;

/// updated, everything else (in use, demand, in transit) unchanged. Used by tests and by the
/// workload simulator; fails if a move does not fit the snapshot (a release of units that are
/// not free, a grant the reserve cannot cover at that point, an unknown product or server).
pub fn apply(snapshot: &Snapshot, plan: &Plan) -> Result<Snapshot, PlanError> {
    let mut after = snapshot.clone();
    let mut order: Vec<usize> = (0..after.products.len()).collect();
    order.sort_unstable_by_key(|&i| after.products[i].product);
    for product_plan in &plan.products {
        let at = order
            .binary_search_by_key(&product_plan.product, |&i| after.products[i].product)
            .map_err(|_| PlanError::UnknownProduct {
                product: product_plan.product,
            })?;
        let i = order[at];
        after.products[i] = apply_product(&after.products[i], product_plan)?;
    }
    Ok(after)
}

/// [`apply`] for one product.
pub fn apply_product(
    snapshot: &ProductSnapshot,
    plan: &ProductPlan,
) -> Result<ProductSnapshot, PlanError> {
    let mut after = snapshot.clone();
    let product = after.product;
    let mut order: Vec<usize> = (0..after.cells.len()).collect();
    order.sort_unstable_by_key(|&i| after.cells[i].server);
    for m in &plan.moves {
        let server = m.server();
        let at = order
            .binary_search_by_key(&server, |&i| after.cells[i].server)
            .map_err(|_| PlanError::UnknownCell { product, server })?;
        let cell = &mut after.cells[order[at]];
        match *m {
            Move::Release { units, .. } => {
                let free = cell.allocation.saturating_sub(cell.in_use);
                if units > free {
                    return Err(PlanError::ReleaseExceedsFree {
                        product,
                        server,
                        units,
                        free,
                    });
                }
                cell.allocation -= units;
                after.reserve += units;
            }
            Move::Grant { units, .. } => {
                if units > after.reserve {
                    return Err(PlanError::GrantExceedsReserve {
                        product,
                        server,
                        units,
                        reserve: after.reserve,
                    });
                }
                after.reserve -= units;
                cell.allocation += units;
            }
        }
    }
    Ok(after)
}

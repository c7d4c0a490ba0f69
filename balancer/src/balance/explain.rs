//! Explaining a decision: the plan a run would make for one product now, with the demand
//! signals and the rule behind every server's target. Reads the servers' statuses without
//! resetting their counters and moves nothing.

use super::snapshot::{BuiltSnapshot, RunView, build_snapshot, read_signals};
use super::{BalanceError, Engine, Observation};
use allot_core::planner::{self, CellPlan, ProductPlan, ProductSnapshot, Scarcity};
use allot_core::wire::balancer::{ExplainedCell, Explanation};
use chrono::Utc;

impl Engine {
    /// What a run would decide for `product` now, and why; `server` keeps one server's line.
    pub async fn explain(
        &self,
        product: &str,
        server: Option<&str>,
    ) -> Result<Explanation, BalanceError> {
        let books = self.store.product_books(product).await?;
        let Observation {
            servers,
            statuses,
            unreachable,
            ..
        } = self.observe(true).await?;
        let servers: Vec<_> = servers.into_iter().filter(|s| !s.needs_reset).collect();
        let signals = read_signals(
            &*self.store,
            Utc::now().timestamp_millis(),
            &self.config.signals,
        )
        .await?;
        let cells = self.store.product_cells(product).await?;
        let view = RunView {
            statuses: &statuses,
            servers: &servers,
            signals: &signals,
            memory: &self.memory,
            hold: self.config.hold,
        };
        let mut out = Explanation {
            product: books.name.clone(),
            purchased: books.purchased,
            reserve: books.reserve,
            in_transit: books.in_transit,
            scarcity: "ample".into(),
            reserve_after: books.reserve,
            servers: Vec::new(),
            unreachable: unreachable.into_keys().collect(),
            note: None,
        };
        let Some(BuiltSnapshot {
            snapshot,
            server_names,
        }) = build_snapshot(&books, &cells, &view)
        else {
            out.note = Some(
                "moves of this product are in flight: the next run plans once they land".into(),
            );
            return Ok(out);
        };
        let plan = planner::plan_product(&snapshot, &self.config.planner)
            .map_err(|e| BalanceError::Plan(format!("{product}: {e}")))?;
        out.scarcity = match plan.scarcity {
            Scarcity::Ample => "ample",
            Scarcity::Wants => "wants",
            Scarcity::Needs => "needs",
            Scarcity::Mins => "mins",
            Scarcity::InUse => "in_use",
        }
        .into();
        out.reserve_after = plan.reserve;
        out.servers = explained_cells(&snapshot, &plan, &server_names)
            .into_iter()
            .filter(|c| server.is_none_or(|s| s == c.server))
            .collect();
        Ok(out)
    }
}

/// Every cell of a product's plan as an operator reads it: the snapshot's signals beside the
/// plan's need, want, share, target and the rule that decided. The one place both `explain`
/// and each run's recorded decisions are made from.
pub(super) fn explained_cells(
    snapshot: &ProductSnapshot,
    plan: &ProductPlan,
    server_names: &[String],
) -> Vec<ExplainedCell> {
    plan.cells
        .iter()
        .map(|cp| explained_cell(snapshot, cp, server_names))
        .collect()
}

/// One cell of a product's plan as an operator reads it (see [`explained_cells`]).
pub(super) fn explained_cell(
    snapshot: &ProductSnapshot,
    cp: &CellPlan,
    server_names: &[String],
) -> ExplainedCell {
    // Built snapshots number their cells by position; any other is searched.
    let c = snapshot
        .cells
        .get(cp.server as usize)
        .filter(|c| c.server == cp.server)
        .or_else(|| snapshot.cells.iter().find(|c| c.server == cp.server))
        .expect("the plan's cells are the snapshot's");
    let s = c.demand.signals;
    ExplainedCell {
        server: server_names[cp.server as usize].clone(),
        allocation: c.allocation,
        in_use: c.in_use,
        waiting: c.demand.waiting,
        min_units: c.min_units,
        buffer_units: c.buffer_units,
        peak_in_use: c.demand.peak_in_use,
        denials: c.demand.denials,
        level: s.level,
        forecast: s.forecast,
        window_peak: (s.window_peak != u64::MAX).then_some(s.window_peak),
        held: c.recently_granted,
        need: cp.need,
        want: cp.want,
        fair_share: cp.fair_share,
        target: cp.target,
        decision: cp.decision.as_str().into(),
    }
}

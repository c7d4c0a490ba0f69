//! Scheduled and manual runs (DESIGN.md flow 2): read every server, plan each product with the
//! core's planner, execute the moves.
//!
//! In two phases over the whole estate: each product is planned, first from the run's own read
//! of the books without its lock (most products, with nothing to move, are done then), and a
//! product with moves has its releases logged under its lock (one transaction per product),
//! planned again first if its books changed since the read (only what changed is read
//! again); every server's releases are sent in one batch
//! with the locks released; then each product's grants are logged under its lock again (capped
//! at what the reserve then holds, since an instant balance may have drawn on it meanwhile) and
//! every server's grants are sent in one batch. Releases always precede the grants they fund,
//! so the allocations servers have applied never sum above purchased. A product that fails is
//! recorded in the run's errors and the run goes on with the next.

use super::batch::Booker;
use super::explain::explained_cell;
use super::phases::Phases;
use super::snapshot::{BuiltSnapshot, ChangesSeen, RunView, build_snapshot, read_signals};
use super::{BalanceError, Engine, Observation, adopted, cpu_bound, reconcile, usage_samples};
use crate::store::{CellRecord, MoveRecord, NewMove, RunOutcome, ServerRecord};
use allot_core::domain::{MoveKind, RunTrigger};
use allot_core::planner::{self, Move, ProductPlan, ProductSnapshot};
use allot_core::wire::balancer::{Product, RunDecision, RunDetail};
use chrono::Utc;
use futures_util::{StreamExt, stream};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Products a run plans (and logs grants for) at once: enough to overlap one product's store
/// round trips with another's planning on a small machine, few enough that an estate of
/// hundreds of products holds only a handful of product locks, and pool connections, at a time.
const PRODUCTS_AT_ONCE: usize = 4;

/// What one product's part of a run moved.
#[derive(Debug, Default)]
struct Moved {
    moves: u64,
    units: u64,
    errors: Vec<String>,
}

impl Engine {
    /// A scheduled or manual balance over every product, or one.
    #[tracing::instrument(skip(self))]
    pub async fn run(
        &self,
        trigger: RunTrigger,
        only: Option<&str>,
    ) -> Result<RunDetail, BalanceError> {
        let _one_run_at_a_time = self.run_lock.lock().await;
        let fence = self.fence()?;
        if let Some(name) = only {
            self.store.product(name).await?;
            if !fence.leads(name) {
                return Err(BalanceError::NotLeader);
            }
        }
        self.reclaim_lost().await?;
        // Expired entitlements leave `purchased` before anything is planned; a failure is
        // retried by the expiry task and never stops the run.
        if let Err(e) = self.expire_locked().await {
            tracing::warn!(error = %e, "expiry enforcement failed before the run; retrying later");
        }
        let run_id = self.store.begin_run(trigger, &fence).await?;
        let tally = crate::metrics::RunTally::start(self.metrics.clone(), trigger);
        let started = std::time::Instant::now();
        let mut phases = Phases::start();
        let mut errors = self.resume_unfinished().await?;
        phases.lap("resume");

        let Observation {
            servers,
            cells_before,
            statuses,
            unreachable,
        } = self.observe(false).await?;
        for (name, reason) in &unreachable {
            errors.push(format!("{name} unreachable: {reason}"));
        }
        phases.lap("observe");
        let answered: Vec<String> = statuses.keys().cloned().collect();
        self.store.touch_servers(&answered).await?;
        // The moves in flight read before the books' second read: a move booked between the
        // two reads would otherwise be in neither, and its server's cell look wrong.
        let in_flight = self.store.unfinished_moves().await?;
        // Each product's count of changes before the read: a product whose count has not moved
        // when the run holds its lock is still as read (see `plan_product`).
        let changes_seen = self.memory.lock().expect("engine memory").changes();
        // The products with their cells in one snapshot: each product is planned from them
        // first (`plan_first`).
        let (listed, cells) = self.store.products_and_cells().await?;
        let mut servers = servers;
        for server in servers.iter_mut().filter(|s| s.needs_reset) {
            if adopted(&server.name, &cells, &statuses) {
                self.store.clear_reset(&server.name).await?;
                server.needs_reset = false;
                tracing::info!(server = %server.name, "server adopted the books after its reset");
            }
        }
        // A server that has not yet adopted the books after a reset gets no moves: its units
        // are set aside like an unreachable server's.
        let servers: Vec<ServerRecord> = servers.into_iter().filter(|s| !s.needs_reset).collect();
        let now_ms = Utc::now().timestamp_millis();
        // Made off the async worker and without holding the engine's memory, which every
        // instant balance takes: a sample per cell, a hundred thousand on a large estate.
        let mut accountings = self
            .memory
            .lock()
            .expect("engine memory")
            .take_accountings();
        let samples = cpu_bound(|| usage_samples(&statuses, &mut accountings));
        self.memory
            .lock()
            .expect("engine memory")
            .restore_accountings(accountings);
        let m = &self.metrics;
        for s in &samples {
            let product = s.product.as_str();
            m.checkouts
                .with_label_values(&[product])
                .inc_by(s.checkouts);
            // Every product's accounting series exist from its first run, at 0.
            for kind in ["true", "false"] {
                m.unserved_units.with_label_values(&[product, kind]);
            }
            m.ping_pong_units.with_label_values(&[product]);
        }
        self.store.record_samples(run_id, now_ms, &samples).await?;
        // What a phase no longer needs is freed before the next, so that a large estate's run
        // does not hold its samples, both reads of the books, its statuses and signals while
        // it sends its moves.
        drop(samples);
        phases.lap("samples");
        let discrepancies = cpu_bound(|| reconcile(&cells_before, &cells, &in_flight, &statuses));
        drop(cells_before);
        self.metrics
            .discrepancies
            .inc_by(discrepancies.len() as u64);
        for d in &discrepancies {
            tracing::warn!(discrepancy = %d, run_id, "reconciliation");
        }
        errors.extend(discrepancies);
        phases.lap("reconcile");

        let signals = read_signals(&*self.store, now_ms, &self.config.signals).await?;
        self.memory
            .lock()
            .expect("engine memory")
            .forget_older_than(self.config.hold);
        let view = RunView {
            statuses: &statuses,
            servers: &servers,
            signals: &signals,
            memory: &self.memory,
            hold: self.config.hold,
        };
        phases.lap("signals");
        let products: Vec<Product> = listed
            .into_iter()
            .filter(|p| only.is_none_or(|o| o == p.name))
            // Other shards' products are their leaders' to balance.
            .filter(|p| fence.leads(&p.name))
            .collect();
        let by_name: BTreeMap<&str, &ServerRecord> =
            servers.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut moved = Moved::default();
        // Every product planned and its releases logged, then every server's releases sent in
        // one batch, then every product's grants logged (capped at its reserve as it then
        // stands) and every server's grants sent in one batch: releases precede the grants they
        // fund across the whole run, and a server gets two requests, not one per move.
        let mut planned = Vec::new();
        let mut releases = Vec::new();
        let mut decisions = Vec::new();
        let mut planning = Phases::start();
        // Each product's cells as the run read them (sorted by product): what it is planned
        // from first, without its lock.
        let seen: HashMap<&str, &[CellRecord]> = cells
            .chunk_by(|a, b| a.product == b.product)
            .map(|of_one| (of_one[0].product.as_str(), of_one))
            .collect();
        // Every product's first plan, from the run's own read and without its lock, in one
        // step off the async worker: a product with nothing to move (most, in most runs) is
        // done then.
        let firsts: Vec<FirstPlan> = cpu_bound(|| {
            products
                .iter()
                .map(|product| {
                    let seen = seen.get(product.name.as_str()).copied().unwrap_or_default();
                    self.plan_first(product, seen, &view)
                })
                .collect()
        });
        planning.lap("unlocked");
        allot_http::fault::pause("run_planned_unlocked").await;
        let mut to_lock = Vec::new();
        for (i, first) in firsts.into_iter().enumerate() {
            match first {
                FirstPlan::Quiet(p, mut why) => {
                    decisions.append(&mut why);
                    planned.push(p);
                }
                FirstPlan::Moves(built, plan) => to_lock.push((i, Some((built, plan)))),
                FirstPlan::Unplanned => to_lock.push((i, None)),
            }
        }
        // The products with moves, a few at once under their locks, so one product's store
        // round trips overlap another's planning; in the products' order, so the run's moves
        // are the same either way. (By index: a stream of closures over borrowed items trips
        // the compiler's `Send` inference for the spawned run, rust-lang/rust#102211.)
        let mut plans = stream::iter(to_lock)
            .map(|(i, first)| {
                let product = &products[i];
                let epoch = fence.epoch_for(&product.name).unwrap_or(-1);
                let (view, changes_seen, seen) = (&view, &changes_seen, &seen);
                async move {
                    let mut parts = Phases::start();
                    let first = first.map(|(built, plan)| AsRead {
                        built,
                        plan,
                        cells: seen.get(product.name.as_str()).copied().unwrap_or_default(),
                        changes_seen,
                    });
                    let planned = self
                        .plan_product(run_id, epoch, &product.name, view, first, &mut parts)
                        .await;
                    (product, planned, parts)
                }
            })
            .buffered(PRODUCTS_AT_ONCE);
        while let Some((product, result, parts)) = plans.next().await {
            planning.absorb(&parts);
            match result {
                Ok(Some((mut p, mut why))) => {
                    releases.append(&mut p.releases);
                    decisions.append(&mut why);
                    planned.push(p);
                }
                Ok(None) => {}
                Err(e) => not_balanced(&mut errors, &product.name, &e, run_id),
            }
        }
        drop(plans);
        drop(seen);
        drop((cells, signals, statuses));
        phases.lap("plan");
        // Why the run did what it did, kept with the run in one write; its loss loses no
        // unit, only the explanation, so a failure to record it is logged, not fatal.
        if let Err(e) = self
            .store
            .record_decisions(run_id, Utc::now().timestamp_millis(), &decisions)
            .await
        {
            tracing::warn!(run_id, error = %e, "run decisions not recorded");
        }
        drop(decisions);
        let grants_follow = planned
            .iter()
            .any(|p| p.plan.moves.iter().any(|m| m.kind() == MoveKind::Grant));
        let released_first = !releases.is_empty() && grants_follow;
        phases.lap("decisions");
        self.send_batched(releases, &by_name, &mut moved).await;
        phases.lap("release");
        if released_first {
            allot_http::fault::point("between_release_and_grant");
        }
        let mut grants = Vec::new();
        let mut logging = stream::iter(0..planned.len())
            .map(|i| {
                let p = &planned[i];
                let epoch = fence.epoch_for(&p.name).unwrap_or(-1);
                async move { (p, self.log_grants(run_id, epoch, p).await) }
            })
            .buffered(PRODUCTS_AT_ONCE);
        while let Some((p, result)) = logging.next().await {
            match result {
                Ok(mut logged) => grants.append(&mut logged),
                Err(e) => not_balanced(&mut errors, &p.name, &e, run_id),
            }
        }
        drop(logging);
        phases.lap("log_grants");
        self.send_batched(grants, &by_name, &mut moved).await;
        phases.lap("grant");
        let (moves, units_moved) = (moved.moves, moved.units);
        errors.extend(moved.errors);

        let ping_pong = self
            .memory
            .lock()
            .expect("engine memory")
            .take_ping_pong(run_id);
        let outcome = RunOutcome {
            status: if errors.is_empty() { "ok" } else { "partial" }.into(),
            servers_queried: answered.len() as u64,
            servers_unreachable: unreachable.len() as u64,
            moves,
            units_moved,
            ping_pong_units: ping_pong,
            errors,
            ..RunOutcome::default()
        };
        self.store.finish_run(run_id, &outcome).await?;
        tally.finish(&outcome.status, &answered, unreachable.keys());
        tracing::info!(
            run_id,
            trigger = %trigger,
            servers = outcome.servers_queried,
            unreachable = outcome.servers_unreachable,
            moves = outcome.moves,
            units = outcome.units_moved,
            elapsed_ms = started.elapsed().as_millis() as u64,
            phases = %phases,
            planning = %planning,
            "balance run finished"
        );
        Ok(self.store.run(run_id).await?)
    }

    /// A product's first plan, from `seen`, its cells as the run read them, and `product`,
    /// its books as the run listed them, without its lock: when it has nothing to move, the
    /// product planned with the decisions worth recording; when it has moves, the plan, for
    /// [`Self::plan_product`] to log under its lock (or to make again from a fresh read if its
    /// books changed meanwhile). Unplanned when it has units in transit or the planner fails on
    /// these books: the locked path reads them afresh and reports what is still wrong then. A
    /// change that lands after a first plan found nothing to move waits for the next run, as
    /// one landing after the run's read would.
    fn plan_first(&self, product: &Product, seen: &[CellRecord], view: &RunView<'_>) -> FirstPlan {
        let Some(built) = build_snapshot(product, seen, view) else {
            return FirstPlan::Unplanned;
        };
        let Ok(plan) = planner::plan_product(&built.snapshot, &self.config.planner) else {
            return FirstPlan::Unplanned;
        };
        if !plan.moves.is_empty() {
            return FirstPlan::Moves(built, plan);
        }
        let BuiltSnapshot {
            snapshot,
            server_names,
        } = built;
        let decisions = self.decisions_to_record(&product.name, &snapshot, &plan, &server_names);
        let planned = Planned {
            name: product.name.clone(),
            plan,
            server_names,
            releases: Vec::new(),
        };
        FirstPlan::Quiet(planned, decisions)
    }

    /// Plans a product with moves under its lock and logs its releases in one transaction;
    /// returns it with the decisions worth recording (those that changed). The plan is the
    /// run's `first` one while no change to the product's books has been committed since the
    /// run's read (its count of changes is where the run found it: the books are as read).
    /// Otherwise (an instant balance moved units, a booking landed) it is made again from the
    /// product's pool and the cells that changed read afresh, the others as the run read them;
    /// and from a whole fresh read for a product the first plan could not plan. `None`: units
    /// of it are in transit (a move not yet booked), so it waits for the next run. Where its
    /// time went is lapped in `parts` (the run logs the sums).
    async fn plan_product(
        &self,
        run_id: i64,
        epoch: i64,
        name: &str,
        view: &RunView<'_>,
        first: Option<AsRead<'_>>,
        parts: &mut Phases,
    ) -> Result<Option<(Planned, Vec<RunDecision>)>, BalanceError> {
        let lock = self.product_lock(name);
        let _serialised = lock.lock().await;
        parts.lap("lock");
        let plan_afresh = |product: &Product,
                           cells: &[CellRecord]|
         -> Result<Option<(BuiltSnapshot, ProductPlan)>, BalanceError> {
            let Some(built) = build_snapshot(product, cells, view) else {
                return Ok(None);
            };
            let plan = planner::plan_product(&built.snapshot, &self.config.planner)
                .map_err(|e| BalanceError::Plan(format!("{name}: {e}")))?;
            Ok(Some((built, plan)))
        };
        let changed = first.as_ref().map(|first| {
            self.memory
                .lock()
                .expect("engine memory")
                .changed_since(name, first.changes_seen)
        });
        let planned = match (first, changed) {
            (Some(first), Some(None)) => {
                parts.lap("as_read");
                Some((first.built, first.plan))
            }
            // Changed since the run's read: the pool and the cells that changed read again,
            // the others as the run read them (nothing else has changed them since).
            (Some(first), Some(Some(servers))) => {
                let product = self.store.product_books(name).await?;
                let cells = if servers.is_empty() {
                    first.cells.to_vec()
                } else {
                    let fresh = self.store.product_cells_of(name, &servers).await?;
                    patched(first.cells, &servers, fresh)
                };
                parts.lap("read_changes");
                let planned = plan_afresh(&product, &cells)?;
                parts.lap("plan");
                planned
            }
            _ => {
                let product = self.store.product_books(name).await?;
                let cells = self.store.product_cells(name).await?;
                parts.lap("read");
                let planned = plan_afresh(&product, &cells)?;
                parts.lap("plan");
                planned
            }
        };
        let Some((
            BuiltSnapshot {
                snapshot,
                server_names,
            },
            plan,
        )) = planned
        else {
            return Ok(None);
        };
        let releases = self
            .log_moves(
                run_id,
                epoch,
                name,
                &plan,
                &server_names,
                MoveKind::Release,
                None,
            )
            .await?;
        parts.lap("log_releases");
        let decisions = self.decisions_to_record(name, &snapshot, &plan, &server_names);
        parts.lap("explain");
        let planned = Planned {
            name: name.to_owned(),
            plan,
            server_names,
            releases,
        };
        Ok(Some((planned, decisions)))
    }

    /// Why the plan did what it did, for each of the product's cells whose decision changed
    /// since the last run that recorded one.
    fn decisions_to_record(
        &self,
        name: &str,
        snapshot: &ProductSnapshot,
        plan: &ProductPlan,
        server_names: &[String],
    ) -> Vec<RunDecision> {
        let mut memory = self.memory.lock().expect("engine memory");
        plan.cells
            .iter()
            .filter(|cp| memory.decided(&server_names[cp.server as usize], name, cp))
            .map(|cp| RunDecision {
                product: name.to_owned(),
                cell: explained_cell(snapshot, cp, server_names),
            })
            .collect()
    }

    /// Logs a planned product's grants under its lock, capped at the reserve as it stands
    /// now that the run's releases have landed (an instant balance may have drawn on it).
    async fn log_grants(
        &self,
        run_id: i64,
        epoch: i64,
        p: &Planned,
    ) -> Result<Vec<(String, MoveRecord)>, BalanceError> {
        if !p.plan.moves.iter().any(|m| m.kind() == MoveKind::Grant) {
            return Ok(Vec::new());
        }
        let lock = self.product_lock(&p.name);
        let _serialised = lock.lock().await;
        let reserve = self.available_reserve(&p.name).await?;
        self.log_moves(
            run_id,
            epoch,
            &p.name,
            &p.plan,
            &p.server_names,
            MoveKind::Grant,
            Some(reserve),
        )
        .await
    }

    /// Logs the plan's moves of one kind (grants capped, in order, at `reserve`) in one
    /// transaction; returns them with their servers. A move the store refuses to log fails
    /// the product, and none of its moves of that kind is logged.
    #[allow(clippy::too_many_arguments)]
    async fn log_moves(
        &self,
        run_id: i64,
        epoch: i64,
        product: &str,
        plan: &ProductPlan,
        server_names: &[String],
        kind: MoveKind,
        mut reserve: Option<u64>,
    ) -> Result<Vec<(String, MoveRecord)>, BalanceError> {
        let mut new = Vec::new();
        for m in plan.moves.iter().filter(|m| m.kind() == kind) {
            let mut units = m.units();
            if let (Move::Grant { .. }, Some(left)) = (m, reserve.as_mut()) {
                units = units.min(*left);
                *left -= units;
            }
            if units == 0 {
                continue;
            }
            new.push(NewMove {
                id: Uuid::now_v7(),
                run_id: Some(run_id),
                product: product.to_owned(),
                server: server_names[m.server() as usize].clone(),
                kind,
                units,
                epoch,
            });
        }
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let logged = self.store.begin_moves(&new).await?;
        Ok(logged.into_iter().map(|r| (r.server.clone(), r)).collect())
    }

    /// Sends logged moves, one batch per server (servers concurrently, bounded like status
    /// reads), and adds what they moved to `moved`.
    async fn send_batched(
        &self,
        logged: Vec<(String, MoveRecord)>,
        by_name: &BTreeMap<&str, &ServerRecord>,
        moved: &mut Moved,
    ) {
        let mut per_server: BTreeMap<String, Vec<MoveRecord>> = BTreeMap::new();
        for (server, record) in logged {
            per_server.entry(server).or_default().push(record);
        }
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let booker = Booker::start(self);
        let mut tasks = tokio::task::JoinSet::new();
        for (name, moves) in per_server {
            let Some(&server) = by_name.get(name.as_str()) else {
                continue;
            };
            let server = server.clone();
            let engine = self.clone();
            let semaphore = semaphore.clone();
            let booker = booker.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                engine.execute_batched(&server, moves, &booker).await
            });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(results) => {
                    for result in results {
                        match result {
                            Ok(done) => {
                                moved.moves += 1;
                                moved.units += done.applied_units.unwrap_or(0);
                            }
                            Err(e) => moved.errors.push(e.to_string()),
                        }
                    }
                }
                Err(e) => moved.errors.push(format!("a move task failed: {e}")),
            }
        }
    }
}

/// One product planned by a run, its releases logged; its grants wait for the releases.
struct Planned {
    name: String,
    plan: ProductPlan,
    server_names: Vec<String>,
    /// Its logged releases, until the run gathers them into the servers' batches.
    releases: Vec<(String, MoveRecord)>,
}

/// A product with moves as the run first planned it, for [`Engine::plan_product`].
struct AsRead<'a> {
    built: BuiltSnapshot,
    plan: ProductPlan,
    /// Its cells as the run read them.
    cells: &'a [CellRecord],
    /// Every product's count of changes just before that read.
    changes_seen: &'a ChangesSeen,
}

/// `cells` with those of `servers` replaced by `fresh` (a cell missing from `fresh` is gone:
/// its server was removed), in their places; a new cell at the end.
fn patched(cells: &[CellRecord], servers: &[String], fresh: Vec<CellRecord>) -> Vec<CellRecord> {
    let mut fresh: HashMap<String, CellRecord> =
        fresh.into_iter().map(|c| (c.server.clone(), c)).collect();
    let mut out: Vec<CellRecord> = cells
        .iter()
        .filter_map(|c| {
            if servers.contains(&c.server) {
                fresh.remove(&c.server)
            } else {
                Some(c.clone())
            }
        })
        .collect();
    let mut new: Vec<CellRecord> = fresh.into_values().collect();
    new.sort_by(|a, b| a.server.cmp(&b.server));
    out.extend(new);
    out
}

/// A product's first plan in a run, from the run's own read (see [`Engine::plan_first`]).
enum FirstPlan {
    /// Nothing to move: planned, with the decisions worth recording.
    Quiet(Planned, Vec<RunDecision>),
    /// Moves to make, planned from the run's read.
    Moves(BuiltSnapshot, ProductPlan),
    /// Not planned from the run's read (units in transit, or the planner refused the books).
    Unplanned,
}

/// Records that a product was not balanced this run; the run goes on with the others.
fn not_balanced(errors: &mut Vec<String>, product: &str, e: &BalanceError, run_id: i64) {
    tracing::error!(%product, error = %e, run_id,
        "product not balanced this run; the run goes on");
    errors.push(format!("{product}: not balanced: {e}"));
}

#[cfg(test)]
mod tests {
    use super::patched;
    use crate::store::CellRecord;

    fn cell(server: &str, units: u64) -> CellRecord {
        CellRecord {
            server: server.into(),
            product: "cad".into(),
            units,
            min_units: 0,
            buffer_units: 0,
            generation: 0,
        }
    }

    #[test]
    fn changed_cells_replace_the_runs_read_in_place_and_the_rest_stays() {
        let read = [cell("lyon", 1), cell("oslo", 2), cell("paris", 3)];
        let changed = ["oslo", "paris", "tokyo"].map(String::from);
        // Oslo's cell grew; Paris's server was removed meanwhile; Tokyo got its first units.
        let fresh = vec![cell("tokyo", 4), cell("oslo", 5)];
        assert_eq!(
            patched(&read, &changed, fresh),
            [cell("lyon", 1), cell("oslo", 5), cell("tokyo", 4)]
        );
        assert_eq!(patched(&read, &[], Vec::new()), read);
    }
}

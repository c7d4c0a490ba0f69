//! Instant balances (DESIGN.md flow 3): a metering server asks for units now.
//!
//! The shell reads the books and what the last run saw — and, when the reserve cannot cover
//! the clients waiting, the donors' statuses, read outside the lock — calls the core's
//! [`allot_core::instant::plan_instant`], and executes: under the product's lock it logs the
//! grant from the reserve and the releases; outside the lock it sends them; once releases are
//! confirmed, it logs (under the lock again) and sends a grant of the reclaimed units. The
//! same request id twice grants once. A request the reserve covers (most) commits twice: its
//! run with the grant logged, then — once the server has applied the grant and the request is
//! answered — the grant booked with the run closed and the request recorded
//! (`Store::complete_instant_grant`). A retry that arrives while its first attempt
//! is still being answered waits for it ([`InFlight`]), then is answered from its record.

use super::phases::Phases;
use super::snapshot::instant_cells;
use super::{BalanceError, Engine, adopted};
use crate::store::{
    InstantLog, InstantRecord, LandedMove, MoveRecord, NewMove, RunOutcome, ServerRecord,
};
use allot_core::domain::{MoveKind, RunTrigger, ServerState};
use allot_core::instant::{InstantAsk, plan_instant};
use allot_core::wire::agent::MoveResponse;
use allot_core::wire::balancer::{InstantBalanceRequest, InstantBalanceResponse};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;
use tracing::Instrument;
use uuid::Uuid;

/// The instant requests being answered, by request id, each with the turn its attempts take.
pub(super) type InFlight = Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>;

/// One attempt's turn at answering a request id: attempts of the same request (a server's
/// retries) answer one after another, so a retry sees what the attempt before it booked. The
/// id leaves the map with the last attempt.
struct RequestTurn {
    in_flight: InFlight,
    id: Uuid,
    turn: Arc<tokio::sync::Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl RequestTurn {
    /// Waits for the attempts of `id` before this one to finish.
    async fn take(in_flight: &InFlight, id: Uuid) -> Self {
        let turn = in_flight
            .lock()
            .expect("requests in flight")
            .entry(id)
            .or_default()
            .clone();
        let held = Some(turn.clone().lock_owned().await);
        Self {
            in_flight: in_flight.clone(),
            id,
            turn,
            held,
        }
    }
}

impl Drop for RequestTurn {
    fn drop(&mut self) {
        self.held.take();
        if let Ok(mut in_flight) = self.in_flight.lock() {
            // The map's handle and this one: no other attempt holds or awaits the turn.
            if Arc::strong_count(&self.turn) == 2 {
                in_flight.remove(&self.id);
            }
        }
    }
}

/// The grants from the reserve that instant balances are sending or booking, by move id.
pub(super) type GrantsInHand = Arc<Mutex<HashSet<Uuid>>>;

/// An instant balance's hold on its grant from the reserve, from its send until its booking
/// ends: a run that resumes unfinished moves meanwhile leaves the grant to it, rather than
/// sending and booking it a second time (which would count its units twice in the cell's
/// accounting and the metrics). Released on drop; a crash releases it with the process, and
/// the next leader resumes the grant.
struct GrantInHand {
    in_hand: GrantsInHand,
    id: Uuid,
}

impl GrantInHand {
    fn take(in_hand: &GrantsInHand, id: Uuid) -> Self {
        if let Ok(mut ids) = in_hand.lock() {
            ids.insert(id);
        }
        Self {
            in_hand: in_hand.clone(),
            id,
        }
    }
}

impl Drop for GrantInHand {
    fn drop(&mut self) {
        if let Ok(mut ids) = self.in_hand.lock() {
            ids.remove(&self.id);
        }
    }
}

impl Engine {
    /// Serves a server that asked for units (DESIGN.md flow 3; the engine's `instant` module
    /// documents how).
    #[tracing::instrument(skip_all, fields(server = %server.name, product = %req.product, units = req.units, urgent = req.urgent(), request_id = %req.request_id))]
    pub async fn instant(
        &self,
        server: &ServerRecord,
        req: &InstantBalanceRequest,
    ) -> Result<InstantBalanceResponse, BalanceError> {
        let answer = |granted: u64, allocation: u64| InstantBalanceResponse {
            request_id: req.request_id,
            product: req.product.clone(),
            granted,
            allocation,
            free_elsewhere: None,
        };
        // A retry of a request already answered grants nothing more: it waits for an attempt
        // still being answered, then finds the record under the product's lock (a read before
        // it too would cost every request a round trip for a rare retry), by the statement that
        // logs a grant from the reserve as last seen (it logs nothing for an answered request)
        // or by the one that reads the reserve.
        let started = std::time::Instant::now();
        let mut phases = Phases::start();
        let turn = RequestTurn::take(&self.requests_in_flight, req.request_id).await;
        let lock = self.product_lock(&req.product);
        let mut serialised = lock.lock().await;
        phases.lap("lock");
        let wanted = u64::from(req.units);
        let urgent = u64::from(req.urgent());
        let mut ask = InstantAsk {
            asker: u32::MAX,
            urgent,
            topup: wanted - urgent,
        };
        let mut errors = Vec::new();
        let (plan, run_id, first_grant, (snapshot, names, servers), tally, epoch) =
            match self.grant_as_last_seen(server, req, &ask).await? {
                // Most requests: the reserve covers them, and it was as last seen.
                Some(FromReserve {
                    plan,
                    run_id,
                    grant,
                    epoch,
                }) => {
                    phases.lap("plan_and_log");
                    let tally = crate::metrics::InstantTally::since(self.metrics.clone(), started);
                    (plan, run_id, Some(grant), Default::default(), tally, epoch)
                }
                None => {
                    let start = self
                        .store
                        .instant_start(req.request_id, &req.product)
                        .await?;
                    self.saw_reserve(&req.product, start.reserve);
                    phases.lap("request");
                    if let Some(done) = start.answered {
                        return Ok(answer(
                            done.granted,
                            self.allocation_of(&server.name, &req.product).await?,
                        ));
                    }
                    if server.state == ServerState::Draining {
                        tracing::info!("server is draining; nothing granted");
                        return Ok(answer(
                            0,
                            self.allocation_of(&server.name, &req.product).await?,
                        ));
                    }
                    if server.needs_reset {
                        let (statuses, _) = self.statuses(std::slice::from_ref(server), true).await;
                        if adopted(
                            &server.name,
                            &self.store.product_cells(&req.product).await?,
                            &statuses,
                        ) {
                            self.store.clear_reset(&server.name).await?;
                        } else {
                            tracing::warn!(
                                "server has not adopted the books after its reset; nothing granted"
                            );
                            return Ok(answer(
                                0,
                                self.allocation_of(&server.name, &req.product).await?,
                            ));
                        }
                    }
                    let tally = crate::metrics::InstantTally::since(self.metrics.clone(), started);
                    let epoch = self.epoch_for(&req.product)?;

                    // Plan and log under the lock. The other servers' cells matter only when the
                    // reserve cannot cover the clients waiting (`InstantAsk::needs_donors`): most
                    // requests are served from the reserve alone and read nothing else.
                    let mut reserve = self.less_earmarked(&req.product, start.reserve);
                    phases.lap("reserve");
                    let donors = ask.needs_donors(reserve);
                    let (snapshot, names, servers) = if donors {
                        // What the last run saw of the donors may be a quarter of an hour old, so
                        // read the statuses of those holding units now, outside the lock.
                        let cells = self.store.product_cells(&req.product).await?;
                        let all = self.servers_by_name().await?;
                        let donors: Vec<ServerRecord> = cells
                            .iter()
                            .filter(|c| c.server != server.name && c.units > c.min_units)
                            .filter_map(|c| all.get(&c.server))
                            .filter(|s| s.state != ServerState::Lost && !s.needs_reset)
                            .cloned()
                            .collect();
                        drop(serialised);
                        let fresh = self.donor_statuses(donors).await;
                        serialised = lock.lock().await;
                        reserve = self.available_reserve(&req.product).await?;
                        let (snapshot, names, servers) =
                            self.instant_donors(server, &req.product, &fresh).await?;
                        ask.asker = names
                            .iter()
                            .position(|n| *n == server.name)
                            .map_or(u32::MAX, |i| i as u32);
                        (snapshot, names, servers)
                    } else {
                        Default::default()
                    };
                    let plan = plan_instant(reserve, &snapshot, &ask, &self.config.planner);
                    // The run's record and the grant from the reserve in one commit.
                    let from_reserve = (plan.from_reserve > 0)
                        .then(|| reserve_grant(req, epoch, &server.name, plan.from_reserve));
                    let (run_id, mut logged) = self
                        .store
                        .begin_run_with_moves(
                            RunTrigger::Instant,
                            &self.write_fence(),
                            from_reserve.as_slice(),
                        )
                        .await?;
                    let first_grant: Option<MoveRecord> = logged.pop();
                    if first_grant.is_some() {
                        self.books_changed(&req.product, None);
                        if !donors {
                            self.saw_reserve(
                                &req.product,
                                start.reserve.saturating_sub(plan.from_reserve),
                            );
                        }
                    }
                    phases.lap("plan_and_log");
                    (
                        plan,
                        run_id,
                        first_grant,
                        (snapshot, names, servers),
                        tally,
                        epoch,
                    )
                }
            };
        let asker = ask.asker;
        let log = |target: &str, kind: MoveKind, units: u64| {
            instant_move(req, epoch, Some(run_id), target, kind, units)
        };
        let mut releases: Vec<(ServerRecord, MoveRecord)> = Vec::new();
        for &(donor, units) in &plan.releases {
            let name = &names[donor as usize];
            match self
                .store
                .begin_move(&log(name, MoveKind::Release, units))
                .await
            {
                Ok(record) => releases.push((servers[name].clone(), record)),
                Err(e) => errors.push(format!("release of {units} from {name} not logged: {e}")),
            }
        }
        if !releases.is_empty() {
            self.books_changed(&req.product, None);
        }
        let _earmark = Earmark::new(self, &req.product, plan.reclaimed());
        drop(serialised);

        // Send outside the lock: the grant from the reserve and the releases at once.
        let mut granted = 0u64;
        let mut moves = 0u64;
        let mut units_moved = 0u64;
        let grant_now = async {
            match &first_grant {
                Some(mv) => Some(self.execute(server, mv).await),
                None => None,
            }
        };
        let releasing = execute_all(self, &releases);
        // The reserve alone covers the request (most do): once the server has applied its
        // grant the units are the server's and the request is answered; the grant is booked,
        // the run closed and the request recorded in one commit after the answer, by a task
        // that keeps the request's turn (a retry waits for the booking, then reads its record).
        let reserve_only =
            plan.releases.is_empty() && errors.is_empty() && plan.from_reserve >= urgent;
        let (first, released) = match &first_grant {
            Some(mv) if reserve_only => match (
                GrantInHand::take(&self.instant_grants, mv.id),
                self.deliver(server, mv).await,
            ) {
                (in_hand, Ok(applied)) => {
                    phases.lap("send");
                    let (granted, allocation) =
                        (u64::from(applied.units), u64::from(applied.allocation));
                    tally.finish(wanted, granted);
                    tracing::info!(granted, reclaimed = 0, run_id, phases = %phases, "instant balance answered");
                    let (engine, server, mv) = (self.clone(), server.clone(), mv.clone());
                    let asked = InstantRecord {
                        server: server.name.clone(),
                        product: req.product.clone(),
                        units: wanted,
                        granted,
                    };
                    let request_id = req.request_id;
                    self.bookings.spawn(
                        async move {
                            let (_turn, _in_hand) = (turn, in_hand);
                            engine
                                .book_instant_grant(
                                    &server,
                                    &mv,
                                    run_id,
                                    &applied,
                                    (request_id, asked),
                                )
                                .await;
                        }
                        .instrument(tracing::Span::current()),
                    );
                    return Ok(answer(granted, allocation));
                }
                (_, Err(failure)) => (Some(Err(failure)), Vec::new()),
            },
            _ => tokio::join!(grant_now, releasing),
        };
        phases.lap("send_and_book");
        if let Some(result) = first {
            match result {
                Ok(done) => {
                    granted += done.applied_units.unwrap_or(0);
                    moves += 1;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let mut reclaimed = 0u64;
        for result in released {
            match result {
                Ok(done) => {
                    reclaimed += done.applied_units.unwrap_or(0);
                    moves += 1;
                    units_moved += done.applied_units.unwrap_or(0);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        // The reclaimed units reach the asker once their releases are confirmed.
        if reclaimed > 0 {
            let second = {
                let _serialised = lock.lock().await;
                let reserve = self.store.reserve(&req.product).await?;
                let units = reclaimed.min(reserve);
                if units > 0 {
                    let grant = self
                        .store
                        .begin_move(&log(&server.name, MoveKind::Grant, units))
                        .await?;
                    self.books_changed(&req.product, None);
                    Some(grant)
                } else {
                    None
                }
            };
            if let Some(mv) = second {
                match self.execute(server, &mv).await {
                    Ok(done) => {
                        granted += done.applied_units.unwrap_or(0);
                        moves += 1;
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        units_moved += granted;
        // Accounting: urgent units left unserved are true shortfalls when nothing was free
        // anywhere the balancer could see, false ones when units were and the plan left them
        // (the reserve after the grants, or free units above a donor's need it did not ask for).
        // A request the reserve covered read no cells: only the reserve counts as free then (it
        // is unserved only if its grant failed, and an abandoned grant's units are back there).
        let unserved = urgent.saturating_sub(granted);
        let mut unserved_false = 0;
        if unserved > 0 {
            let reserve_now = self.store.reserve(&req.product).await?;
            let free_elsewhere: u64 = snapshot
                .iter()
                .filter(|c| c.server != asker)
                .map(|c| {
                    c.allocation
                        .saturating_sub(c.in_use.saturating_add(c.demand.waiting))
                })
                .sum::<u64>()
                // Units the plan asked for and a donor could not give (used meanwhile) were
                // not free when the release arrived: only units the plan left are counted.
                .saturating_sub(plan.reclaimed())
                + reserve_now;
            let falsely = unserved.min(free_elsewhere);
            unserved_false = falsely;
            let metric = &self.metrics.unserved_units;
            metric
                .with_label_values(&[req.product.as_str(), "false"])
                .inc_by(falsely);
            metric
                .with_label_values(&[req.product.as_str(), "true"])
                .inc_by(unserved - falsely);
            if falsely > 0 {
                tracing::warn!(
                    unserved,
                    falsely,
                    free_elsewhere,
                    "waiting clients left unserved while units were free elsewhere"
                );
            }
        }
        // Only a settled outcome is remembered: a grant still in flight is finished by the next
        // run, and a retry of this request may then find the units already there.
        let settled = errors.is_empty();
        let answered = InstantRecord {
            server: server.name.clone(),
            product: req.product.clone(),
            units: wanted,
            granted,
        };
        let ping_pong = {
            let mut memory = self.memory.lock().expect("engine memory");
            memory.unserved(
                &server.name,
                &req.product,
                unserved - unserved_false,
                unserved_false,
            );
            memory.take_ping_pong(run_id)
        };
        self.store
            .finish_instant_run(
                run_id,
                &RunOutcome {
                    status: if settled { "ok" } else { "partial" }.into(),
                    servers_queried: 0,
                    servers_unreachable: 0,
                    moves,
                    units_moved,
                    unserved_true: unserved - unserved_false,
                    unserved_false,
                    ping_pong_units: ping_pong,
                    errors,
                },
                settled.then_some((req.request_id, &answered)),
            )
            .await?;
        phases.lap("finish");
        let allocation = self.allocation_of(&server.name, &req.product).await?;
        phases.lap("answer");
        tally.finish(wanted, granted);
        tracing::info!(granted, reclaimed, run_id, phases = %phases, "instant balance answered");
        Ok(InstantBalanceResponse {
            free_elsewhere: (unserved > 0).then_some(unserved_false > 0),
            ..answer(granted, allocation)
        })
    }
}

/// A move of an instant balance, logged with a fresh id.
fn instant_move(
    req: &InstantBalanceRequest,
    epoch: i64,
    run_id: Option<i64>,
    target: &str,
    kind: MoveKind,
    units: u64,
) -> NewMove {
    NewMove {
        id: Uuid::now_v7(),
        run_id,
        product: req.product.clone(),
        server: target.to_owned(),
        kind,
        units,
        epoch,
    }
}

/// An instant balance's grant from the reserve to its asker, opening its run.
fn reserve_grant(req: &InstantBalanceRequest, epoch: i64, asker: &str, units: u64) -> NewMove {
    instant_move(req, epoch, None, asker, MoveKind::Grant, units)
}

/// How many times an instant balance plans from the reserve as last seen and finds it moved
/// before it reads the books the general way: each miss returns the reserve as it stands, so
/// a second try fails only if it moved again within one round trip.
const AS_SEEN_TRIES: usize = 3;

/// An instant balance the reserve covered, planned from the reserve as last seen and logged.
struct FromReserve {
    plan: allot_core::instant::InstantPlan,
    run_id: i64,
    grant: MoveRecord,
    epoch: i64,
}

impl Engine {
    /// Serves a request the reserve covers by one round trip, under the product's lock: planned
    /// from the reserve this balancer last saw of the product, and logged only while that is
    /// still the reserve and the request has no record
    /// ([`crate::store::Store::log_instant_grant`]); when the reserve moved, planned again from
    /// what that call found. `None`: the request goes the general way, which reads the books
    /// (nothing seen yet, a draining or resetting server, the clients waiting need other
    /// servers' units, the request was answered, or the reserve kept moving).
    async fn grant_as_last_seen(
        &self,
        server: &ServerRecord,
        req: &InstantBalanceRequest,
        ask: &InstantAsk,
    ) -> Result<Option<FromReserve>, BalanceError> {
        if server.state != ServerState::Active || server.needs_reset {
            return Ok(None);
        }
        let Ok(epoch) = self.epoch_for(&req.product) else {
            return Ok(None);
        };
        let seen = self
            .memory
            .lock()
            .expect("engine memory")
            .reserve_seen(&req.product);
        let Some(mut reserve) = seen else {
            return Ok(None);
        };
        for _ in 0..AS_SEEN_TRIES {
            let available = self.less_earmarked(&req.product, reserve);
            if ask.needs_donors(available) {
                return Ok(None);
            }
            let plan = plan_instant(available, &[], ask, &self.config.planner);
            if !plan.releases.is_empty() || plan.from_reserve == 0 {
                return Ok(None);
            }
            let grant = reserve_grant(req, epoch, &server.name, plan.from_reserve);
            match self
                .store
                .log_instant_grant(&self.write_fence(), &grant, req.request_id, reserve)
                .await?
            {
                InstantLog::Logged(run_id, grant) => {
                    self.books_changed(&req.product, None);
                    self.saw_reserve(&req.product, reserve.saturating_sub(plan.from_reserve));
                    return Ok(Some(FromReserve {
                        plan,
                        run_id,
                        grant,
                        epoch,
                    }));
                }
                InstantLog::Moved(now) => {
                    self.saw_reserve(&req.product, now.reserve);
                    if now.answered.is_some() {
                        return Ok(None);
                    }
                    reserve = now.reserve;
                }
            }
        }
        Ok(None)
    }

    /// Notes the product's reserve as an instant balance just read or left it.
    fn saw_reserve(&self, product: &str, reserve: u64) {
        self.memory
            .lock()
            .expect("engine memory")
            .saw_reserve(product, reserve);
    }
}

impl Engine {
    /// Books an instant balance's grant from the reserve that its server has applied, closes
    /// its run and records the request answered, in one commit
    /// ([`crate::store::Store::complete_instant_grant`]). Runs after the answer: a failure is
    /// logged and the run closed `partial`; the grant stays logged `planned`, and the next run
    /// re-sends it (the server answers with what it applied) and books it.
    async fn book_instant_grant(
        &self,
        server: &ServerRecord,
        mv: &MoveRecord,
        run_id: i64,
        applied: &MoveResponse,
        (request_id, answered): (Uuid, InstantRecord),
    ) {
        allot_http::fault::point("instant_answered");
        let granted = answered.granted;
        let ping_pong = self.memory.lock().expect("engine memory").returning(
            &server.name,
            &mv.product,
            granted,
        );
        let outcome = RunOutcome {
            status: "ok".into(),
            servers_queried: 0,
            servers_unreachable: 0,
            moves: 1,
            units_moved: granted,
            unserved_true: 0,
            unserved_false: 0,
            ping_pong_units: ping_pong,
            errors: Vec::new(),
        };
        let landed = LandedMove {
            id: mv.id,
            applied_units: granted,
            generation: applied.generation,
        };
        let changing = self.changing(&mv.product, Some(&server.name));
        let booked = self
            .store
            .complete_instant_grant(
                landed,
                &self.write_fence(),
                run_id,
                &outcome,
                (request_id, &answered),
            )
            .await;
        drop(changing);
        match booked {
            Ok(booked) => {
                self.remember(&booked);
                tracing::info!(move_id = %mv.id, applied = applied.units, generation = applied.generation, "move applied");
            }
            Err(e) => {
                let failure = super::not_booked(mv, server, &e).to_string();
                tracing::warn!(move_id = %mv.id, error = %e,
                    "instant grant applied but not booked; the next run books it");
                let outcome = RunOutcome {
                    status: "partial".into(),
                    errors: vec![failure],
                    ..outcome
                };
                if let Err(e) = self.store.finish_instant_run(run_id, &outcome, None).await {
                    tracing::warn!(run_id, error = %e, "instant balance's run not closed");
                }
            }
        }
        // Counted in the run's record, closed above either way (after `remember`, which notes
        // a ping-pong grant against its run).
        self.memory
            .lock()
            .expect("engine memory")
            .take_ping_pong(run_id);
    }
}

/// What [`Engine::instant_donors`] reads: the cells as snapshots, their servers' names by
/// compact id, and the servers by name.
type InstantDonors = (
    Vec<allot_core::planner::CellSnapshot>,
    Vec<String>,
    std::collections::BTreeMap<String, ServerRecord>,
);

/// Units being reclaimed for one request's waiting clients, earmarked from logging the
/// releases until the grant that carries them on is logged (or the request gives up), so no
/// other request or run takes them from the reserve in between.
struct Earmark<'a> {
    engine: &'a Engine,
    product: &'a str,
    units: u64,
}

impl<'a> Earmark<'a> {
    fn new(engine: &'a Engine, product: &'a str, units: u64) -> Self {
        engine
            .memory
            .lock()
            .expect("engine memory")
            .earmark(product, i128::from(units));
        Self {
            engine,
            product,
            units,
        }
    }
}

impl Drop for Earmark<'_> {
    fn drop(&mut self) {
        if let Ok(mut memory) = self.engine.memory.lock() {
            memory.earmark(self.product, -i128::from(self.units));
        }
    }
}

impl Engine {
    /// The donors an instant balance may reclaim from, read under the product's lock: the
    /// product's cells as planner snapshots (with `fresh` statuses where read), the names
    /// behind their ids, and the servers by name.
    async fn instant_donors(
        &self,
        asker: &ServerRecord,
        product: &str,
        fresh: &super::StatusMap,
    ) -> Result<InstantDonors, BalanceError> {
        let cells = self.store.product_cells(product).await?;
        // A server with a move of this product still unconfirmed is in an unknown state (most
        // likely unreachable): asking it again would only log another release that cannot be
        // confirmed either, and spend the hold bound waiting on it.
        let unconfirmed: Vec<String> = self
            .store
            .unfinished_moves()
            .await?
            .into_iter()
            .filter(|m| m.product == product)
            .map(|m| m.server)
            .collect();
        let mut servers = self.servers_by_name().await?;
        servers.retain(|name, s| {
            s.state != ServerState::Lost && !s.needs_reset && !unconfirmed.contains(name)
        });
        servers.insert(asker.name.clone(), asker.clone());
        let unseen = self
            .memory
            .lock()
            .expect("engine memory")
            .unseen_any(product, &cells);
        let last_peaks = if unseen {
            self.store.last_peaks(product).await?
        } else {
            Default::default()
        };
        let (snapshot, names) = {
            let memory = self.memory.lock().expect("engine memory");
            instant_cells(
                product,
                &cells,
                &servers,
                &memory,
                &last_peaks,
                self.config.hold,
                fresh,
            )
        };
        Ok((snapshot, names, servers))
    }

    /// What the books say `server` holds of `product`: the allocation an answer reports.
    async fn allocation_of(&self, server: &str, product: &str) -> Result<u64, BalanceError> {
        Ok(self
            .store
            .cell(server, product)
            .await?
            .map_or(0, |c| c.units))
    }

    /// The product's reserve less the units earmarked for instant balances under way.
    pub(super) async fn available_reserve(&self, product: &str) -> Result<u64, BalanceError> {
        let reserve = self.store.reserve(product).await?;
        Ok(self.less_earmarked(product, reserve))
    }

    /// `reserve`, the product's as just read, less the units earmarked for instant balances
    /// under way.
    fn less_earmarked(&self, product: &str, reserve: u64) -> u64 {
        let earmarked = self
            .memory
            .lock()
            .expect("engine memory")
            .earmarked(product);
        reserve.saturating_sub(earmarked)
    }

    /// The statuses of `donors` that answer within [`super::EngineConfig::donor_read_timeout`]
    /// (a server that does not is simply judged by what the last run saw).
    async fn donor_statuses(&self, donors: Vec<ServerRecord>) -> super::StatusMap {
        let deadline = self.config.donor_read_timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for server in donors {
            let agents = self.agents.clone();
            tasks.spawn(async move {
                let answer = tokio::time::timeout(deadline, agents.status(&server, true)).await;
                (server.name, answer)
            });
        }
        let mut out = super::StatusMap::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((name, Ok(Ok(status)))) = joined {
                out.insert(name, status);
            }
        }
        out
    }
}

/// Executes releases concurrently, in the order given.
async fn execute_all(
    engine: &Engine,
    releases: &[(ServerRecord, MoveRecord)],
) -> Vec<Result<MoveRecord, super::MoveFailure>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (server, mv)) in releases.iter().enumerate() {
        let engine = engine.clone();
        let (server, mv) = (server.clone(), mv.clone());
        tasks.spawn(async move { (i, engine.execute(&server, &mv).await) });
    }
    let mut out: Vec<Option<Result<MoveRecord, super::MoveFailure>>> =
        (0..releases.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, result)) = joined {
            out[i] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(super::MoveFailure::Unconfirmed(
                    "a release task failed".into(),
                ))
            })
        })
        .collect()
}

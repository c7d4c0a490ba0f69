//! The balancing engine: scheduled, manual and instant balance runs, the move protocol,
//! reconciliation, lost servers and the doctor.
//!
//! The engine is a shell around the pure planner: it reads the books and every server's
//! status, builds a [`Snapshot`](allot_core::planner::Snapshot), calls
//! [`planner::plan`](allot_core::planner::plan), and executes the moves through
//! [`Engine::execute`] — the one function that carries a move from the move log to a server and
//! back into the books:
//!
//! 1. the move is logged `planned` (a grant's units leave the reserve into transit) **before**
//!    it is sent;
//! 2. the server applies it, idempotently by move id, and answers with what it applied;
//! 3. the answer is booked (released units enter the reserve, granted units become the
//!    allocation). An unanswered move stays `planned` and is re-sent, never re-planned, by the
//!    next run or at start-up.
//!
//! Releases run before grants, so the units a run grants were free in the reserve when it
//! granted them: the allocations servers have applied never sum above purchased.

mod agent_client;
mod batch;
pub mod expiry;
mod explain;
mod holders;
mod instant;
mod phases;
mod run;
pub mod scheduler;
mod snapshot;

pub use agent_client::{AgentClient, CallError};
pub use holders::{HoldersError, HoldersQuery};

use crate::auth::ServerTokens;
use crate::metrics::Metrics;
use crate::store::{
    CellAccounting, CellRecord, Fence, MoveRecord, RunOutcome, ServerRecord, Store, StoreError,
    UsageSample,
};
use allot_core::ErrorCode;
use allot_core::demand::SignalConfig;
use allot_core::domain::{MoveKind, RunTrigger, ServerState};
use allot_core::planner::PlannerConfig;
use allot_core::wire::agent::{AgentStatus, MoveRequest, MoveResponse, ProductStatus};
use allot_core::wire::balancer::{DoctorCell, DoctorProduct, DoctorReport, MoveView};
use chrono::Utc;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// Whether a refusal came from the metering server's move handler itself, after it looked the
/// move id up in its log: only then is it proof that the move was not applied. An
/// authentication or parsing refusal happens before that lookup — after a token rotation, a
/// re-send of a move the server applied earlier can be answered 401 — and abandoning the move
/// then would free units the server still holds.
/// A move the server applied whose booking failed: it stays planned and is re-sent, answered
/// from the server's move log.
fn not_booked(mv: &MoveRecord, server: &ServerRecord, e: &crate::store::StoreError) -> MoveFailure {
    MoveFailure::NotBooked(format!(
        "move {} applied by {} but not booked: {e}",
        mv.id, server.name
    ))
}

/// A move whose send got no answer the move log stands behind: it stays planned, re-sent.
fn unconfirmed(mv: &MoveRecord, server: &ServerRecord, e: &CallError) -> MoveFailure {
    tracing::warn!(move_id = %mv.id, server = %server.name, error = %e,
        "move not confirmed; it stays planned and will be resent");
    MoveFailure::Unconfirmed(format!("{} {} to {}: {e}", mv.kind, mv.id, server.name))
}

fn refused_by_the_move_log(status: u16, code: &str) -> bool {
    (status == 404 && code == ErrorCode::UnknownProduct.as_str())
        || (status == 409 && code == ErrorCode::Conflict.as_str())
        // A route the server does not have (a retire move sent to a server older than retire
        // moves) was certainly not applied.
        || (status == 404 && code == ErrorCode::NotFound.as_str())
}

/// Why a move did not finish. Only an unconfirmed move leaves the server's state unknown, so
/// only it stops the re-sending of that server's later moves.
#[derive(Debug, thiserror::Error)]
pub enum MoveFailure {
    /// The server refused the move, so it did not apply it; the move is abandoned.
    #[error("{0}")]
    Refused(String),
    /// No answer (unreachable, timed out, a 5xx): the move stays planned and is re-sent.
    #[error("{0}")]
    Unconfirmed(String),
    /// The store failed to book the server's answer; the move is re-sent and answered from the
    /// server's log.
    #[error("{0}")]
    NotBooked(String),
}

/// How the engine talks to servers and decides who is lost.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Timeout of each call to a metering server.
    pub call_timeout: Duration,
    /// Most calls to metering servers in flight at once.
    pub concurrency: usize,
    /// A server unheard of for this long is declared lost and its units reclaimed.
    pub lease: Duration,
    /// Servers stop granting this much before the balancer's lease ends, so clock skew never
    /// lets a server grant units the balancer already reclaimed.
    pub lease_margin: Duration,
    /// The dead band and other planner settings.
    pub planner: PlannerConfig,
    /// How the demand signals read the history.
    pub signals: SignalConfig,
    /// How long an instant balance waits for a donor's status before judging it by what the
    /// last run saw: well inside the metering servers' hold bound.
    pub donor_read_timeout: Duration,
    /// Units granted to a server are not taken back by a run for this long, unless a real
    /// shortage elsewhere needs them, and an instant balance never reclaims from it meanwhile.
    pub hold: Duration,
    /// CA certificates, beside the system's, trusted when calling servers over HTTPS.
    pub trust: allot_http::tls::Trust,
    /// A run sends each server its moves in one request per phase (`true`, the default), or
    /// one request per move (`false`: what a server older than batches gets anyway; kept so
    /// the benchmark measures batching against the path it replaced, in the same run).
    pub batch_moves: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            concurrency: 32,
            lease: Duration::from_secs(24 * 3600),
            lease_margin: Duration::from_secs(300),
            planner: PlannerConfig::default(),
            signals: SignalConfig::default(),
            donor_read_timeout: Duration::from_millis(200),
            hold: Duration::from_millis(allot_core::planner::DEFAULT_HOLD_MS),
            trust: allot_http::tls::Trust::default(),
            batch_moves: true,
        }
    }
}

impl EngineConfig {
    /// The lease a metering server applies to itself: the balancer's lease minus the margin.
    pub fn server_lease(&self) -> Duration {
        self.lease
            .saturating_sub(self.lease_margin)
            .max(Duration::from_secs(1))
    }
}

/// Why a balancing call failed.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// The books refused (unknown product, conflict) or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The planner refused the snapshot (a bug: the store keeps the books balanced).
    #[error("planner: {0}")]
    Plan(String),
    /// This balancer does not lead: balances run on the leader only.
    #[error("this balancer is not the leader")]
    NotLeader,
}

/// Runs balances. Cheap to clone; clones share locks.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn Store>,
    agents: AgentClient,
    config: Arc<EngineConfig>,
    /// One balance at a time per product: instant requests for a product are serialised with
    /// each other and with runs; different products proceed in parallel.
    product_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The instant requests being answered, by request id: a retry that arrives while its
    /// first attempt is still sending waits for that attempt and is answered from its record,
    /// rather than granting again (the record is written only when the grant is booked).
    requests_in_flight: instant::InFlight,
    /// One scheduled/manual/reclaim run at a time.
    run_lock: Arc<tokio::sync::Mutex<()>>,
    /// The shards this balancer leads, with their epochs; none while it follows.
    leadership: watch::Receiver<Fence>,
    /// What the last run saw of each cell, and when cells were last granted units.
    memory: Arc<Mutex<snapshot::Memory>>,
    /// Where runs, moves and instant balances are counted: this balancer's own metrics.
    metrics: Arc<Metrics>,
    /// The grants from the reserve that instant balances are sending or booking: a run's
    /// resume of unfinished moves leaves them to their requests.
    instant_grants: instant::GrantsInHand,
    /// The bookings of instant grants already answered (the server holds the units once it has
    /// applied them; the books follow without it waiting), so a shutdown can wait for them.
    bookings: tokio_util::task::TaskTracker,
}

/// A change to a product's books under way outside its lock (see [`Engine::changing`]).
struct Changing {
    memory: Arc<Mutex<snapshot::Memory>>,
    product: String,
    server: Option<String>,
}

impl Drop for Changing {
    fn drop(&mut self) {
        if let Ok(mut memory) = self.memory.lock() {
            memory.change_done(&self.product, self.server.as_deref());
        }
    }
}

/// A server's answer to a status read in a run.
type StatusMap = BTreeMap<String, AgentStatus>;

/// What a run or the doctor reads of the fleet before judging it.
struct Observation {
    /// Servers not lost.
    servers: Vec<ServerRecord>,
    /// The books' cells read just before the statuses (see [`reconcile`]).
    cells_before: Vec<CellRecord>,
    /// The statuses of the servers that answered.
    statuses: StatusMap,
    /// The servers that did not, with the reason.
    unreachable: BTreeMap<String, String>,
}

impl Engine {
    /// The only writer of an unsharded store that never saw a takeover (epoch 0), counting
    /// into metrics of its own: embedded uses, benchmarks and tests. A service uses
    /// [`Engine::with_leadership`].
    pub fn new(store: Arc<dyn Store>, tokens: ServerTokens, config: EngineConfig) -> Self {
        let (leading, leadership) = watch::channel(Fence::alone());
        // The engine keeps a receiver; a closed channel keeps its last value.
        drop(leading);
        Self::with_leadership(store, tokens, config, leadership, Arc::default())
    }

    /// An engine that balances the products of the shards `leadership` leads, and writes with
    /// their epochs; it counts what it does in `metrics`.
    pub fn with_leadership(
        store: Arc<dyn Store>,
        tokens: ServerTokens,
        config: EngineConfig,
        leadership: watch::Receiver<Fence>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            agents: AgentClient::new(tokens, config.call_timeout, &config.trust),
            store,
            config: Arc::new(config),
            product_locks: Arc::default(),
            requests_in_flight: Arc::default(),
            run_lock: Arc::default(),
            leadership,
            memory: Arc::default(),
            instant_grants: Arc::default(),
            bookings: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits for the bookings of instant grants already answered: a graceful shutdown's step
    /// before the store closes. A booking cut short (a crash) loses nothing: its grant stays
    /// logged `planned`, and the next run re-sends it (the server answers with what it
    /// applied) and books it.
    pub async fn settle(&self) {
        self.bookings.close();
        self.bookings.wait().await;
    }

    /// The shards this balancer leads, or [`BalanceError::NotLeader`] when it leads none.
    pub fn fence(&self) -> Result<Fence, BalanceError> {
        Some(self.write_fence())
            .filter(Fence::leads_any)
            .ok_or(BalanceError::NotLeader)
    }

    /// The epoch to write `product` with, or [`BalanceError::NotLeader`] when another balancer
    /// leads its shard.
    pub fn epoch_for(&self, product: &str) -> Result<i64, BalanceError> {
        self.leadership
            .borrow()
            .epoch_for(product)
            .ok_or(BalanceError::NotLeader)
    }

    /// The fence to write with, as it stands; a follower's leads nothing, so the store fences
    /// whatever it attempts.
    fn write_fence(&self) -> Fence {
        self.leadership.borrow().clone()
    }

    /// The metrics the engine counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether `product` is known to exist without asking the store: its lock is made only
    /// for products read from the store or found there, and products are never deleted.
    pub fn knows_product(&self, product: &str) -> bool {
        self.product_locks
            .lock()
            .expect("product locks")
            .contains_key(product)
    }

    fn product_lock(&self, product: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.product_locks.lock().expect("product locks");
        locks.entry(product.to_owned()).or_default().clone()
    }

    /// Carries one logged move to its server and books the answer. Returns the booked record,
    /// or why the move could not finish (it is then abandoned, or still planned).
    #[tracing::instrument(skip_all, fields(move_id = %mv.id, kind = %mv.kind, product = %mv.product, server = %server.name, units = mv.units))]
    pub async fn execute(
        &self,
        server: &ServerRecord,
        mv: &MoveRecord,
    ) -> Result<MoveRecord, MoveFailure> {
        let answer = self.deliver(server, mv).await?;
        let _changing = self.changing(&mv.product, Some(&server.name));
        let booked = self
            .store
            .complete_move(
                mv.id,
                u64::from(answer.units),
                answer.generation,
                &self.write_fence(),
            )
            .await
            .map_err(|e| not_booked(mv, server, &e))?;
        self.remember(&booked);
        tracing::info!(
            applied = answer.units,
            generation = answer.generation,
            "move applied"
        );
        Ok(booked)
    }

    /// Carries one logged move to its server: the server's answer, which the caller books,
    /// or why there is none to book (a refused move is abandoned here, an unanswered one
    /// stays planned).
    async fn deliver(
        &self,
        server: &ServerRecord,
        mv: &MoveRecord,
    ) -> Result<MoveResponse, MoveFailure> {
        let request = MoveRequest {
            move_id: mv.id,
            product: mv.product.clone(),
            units: u32::try_from(mv.units).unwrap_or(u32::MAX),
        };
        match self.agents.send_move(server, mv.kind, &request).await {
            Ok(answer) => {
                allot_http::fault::point("after_move_sent");
                if mv.kind == MoveKind::Retire {
                    allot_http::fault::point("after_retire_sent");
                }
                Ok(answer)
            }
            Err(CallError::Refused {
                status,
                code,
                message,
            }) if refused_by_the_move_log(status, &code) => {
                Err(self.abandon_refused(server, mv, &code, &message).await)
            }
            // Anything else — unreachable, a 5xx, or a refusal made before the move log was
            // read (a token the server no longer or not yet accepts, a body it cannot parse) —
            // says nothing of whether an earlier send was applied: the move stays planned.
            Err(e) => Err(unconfirmed(mv, server, &e)),
        }
    }

    /// Counts a committed change to `product`'s books made outside a run's planning (to its
    /// pool, and to `server`'s cell if named), so a run that read them before reads what
    /// changed again (see [`snapshot::Memory::changed`]). The API calls it after an
    /// operator's change to a product's purchases or a cell's limits.
    pub fn books_changed(&self, product: &str, server: Option<&str>) {
        self.memory
            .lock()
            .expect("engine memory")
            .changed(product, server);
    }

    /// A change to `product`'s books about to be made outside its lock (a booking, an
    /// abandon), counted as under way until the returned guard is dropped, then as done.
    fn changing(&self, product: &str, server: Option<&str>) -> Changing {
        self.memory
            .lock()
            .expect("engine memory")
            .changing(product, server);
        Changing {
            memory: self.memory.clone(),
            product: product.to_owned(),
            server: server.map(str::to_owned),
        }
    }

    /// Notes a booked move in the metrics and the engine's memory (what was granted and
    /// released where, for the ping-pong count and the hold).
    fn remember(&self, booked: &MoveRecord) {
        self.metrics.moved(booked);
        let applied = booked.applied_units.unwrap_or(0);
        if applied == 0 {
            return;
        }
        let mut memory = self.memory.lock().expect("engine memory");
        memory.changed(&booked.product, Some(&booked.server));
        if booked.kind == MoveKind::Grant {
            let back = memory.granted(&booked.server, &booked.product, applied);
            if let Some(run_id) = booked.run_id {
                memory.ping_pong_in_run(run_id, back);
            }
            self.metrics
                .ping_pong_units
                .with_label_values(&[booked.product.as_str()])
                .inc_by(back);
        } else if booked.kind == MoveKind::Release {
            memory.released(&booked.server, &booked.product, applied);
        }
    }

    /// Abandons a move its server refused after consulting its move log (a move it had applied
    /// is answered from that log, never refused), so the server did not apply it: a grant's
    /// units go back to the reserve, a release simply did not happen.
    async fn abandon_refused(
        &self,
        server: &ServerRecord,
        mv: &MoveRecord,
        code: &str,
        message: &str,
    ) -> MoveFailure {
        let reason = format!("{code}: {message}");
        // An abandoned grant's units go back to the pool.
        let _changing = self.changing(&mv.product, None);
        if let Err(e) = self
            .store
            .abandon_move(mv.id, &reason, &self.write_fence())
            .await
        {
            return MoveFailure::NotBooked(e.to_string());
        }
        tracing::warn!(move_id = %mv.id, server = %server.name, %reason,
            "move refused by the server; abandoned");
        MoveFailure::Refused(format!(
            "{} {} refused by {}: {reason}",
            mv.kind, mv.id, server.name
        ))
    }

    /// Re-sends every unfinished move (start-up, and the start of every run). Moves of a
    /// server that is lost or removed were abandoned when it was reclaimed.
    ///
    /// One queue per server, in log order, the servers' queues concurrently (bounded like
    /// status reads): a dead server delays only its own queue, and its queue stops at the first
    /// move it does not confirm, since every later one would wait out the same call timeout.
    /// Order across servers does not matter: an unfinished grant's units were taken from the
    /// reserve when it was logged, and a release's units reach the reserve only once confirmed.
    pub async fn resume_unfinished(&self) -> Result<Vec<String>, BalanceError> {
        let servers = self.servers_by_name().await?;
        let mut errors = Vec::new();
        let mut queues: BTreeMap<String, Vec<MoveRecord>> = BTreeMap::new();
        let fence = self.write_fence();
        let in_hand = self
            .instant_grants
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default();
        for mv in self.store.unfinished_moves().await? {
            // Other shards' moves are their leaders' to resume; a grant an instant balance is
            // sending or booking is its request's.
            if !fence.leads(&mv.product) || in_hand.contains(&mv.id) {
                continue;
            }
            if servers.contains_key(&mv.server) {
                queues.entry(mv.server.clone()).or_default().push(mv);
            } else {
                errors.push(format!(
                    "move {} names an unknown server {}",
                    mv.id, mv.server
                ));
            }
        }
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (name, queue) in queues {
            let server = servers[&name].clone();
            let engine = self.clone();
            let semaphore = semaphore.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                engine.resume_queue(&server, queue).await
            });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(failed) => errors.extend(failed),
                Err(e) => errors.push(format!("resuming a server's moves failed: {e}")),
            }
        }
        Ok(errors)
    }

    /// Re-sends one server's unfinished moves in order, stopping at the first that is not
    /// confirmed or not booked (the latter also when this balancer lost its leadership: the
    /// store fences it) and before any send once leadership is gone; returns what failed.
    async fn resume_queue(&self, server: &ServerRecord, queue: Vec<MoveRecord>) -> Vec<String> {
        let mut errors = Vec::new();
        let mut moves = queue.into_iter();
        while let Some(mv) = moves.next() {
            if !self.write_fence().leads(&mv.product) {
                errors.push(format!(
                    "{} unfinished moves to {} not re-sent: this balancer no longer leads",
                    moves.len() + 1,
                    server.name
                ));
                break;
            }
            let Err(failure) = self.execute(server, &mv).await else {
                continue;
            };
            let stop = matches!(
                failure,
                MoveFailure::Unconfirmed(_) | MoveFailure::NotBooked(_)
            );
            errors.push(failure.to_string());
            if stop && moves.len() > 0 {
                errors.push(format!(
                    "{} more unfinished moves to {} not re-sent this run: the one before was not confirmed or not booked",
                    moves.len(),
                    server.name
                ));
                break;
            }
        }
        errors
    }

    async fn servers_by_name(&self) -> Result<BTreeMap<String, ServerRecord>, BalanceError> {
        Ok(self
            .store
            .server_records()
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect())
    }

    /// Reads the status of every given server concurrently (bounded, with timeouts).
    async fn statuses(
        &self,
        servers: &[ServerRecord],
        peek: bool,
    ) -> (StatusMap, BTreeMap<String, String>) {
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for server in servers.iter().cloned() {
            let agents = self.agents.clone();
            let semaphore = semaphore.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let answer = agents.status(&server, peek).await;
                (server.name, answer)
            });
        }
        let (mut ok, mut failed) = (StatusMap::new(), BTreeMap::new());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((name, Ok(status))) => {
                    ok.insert(name, status);
                }
                Ok((name, Err(e))) => {
                    tracing::warn!(server = %name, error = %e, "server unreachable; skipped");
                    failed.insert(name, e.to_string());
                }
                Err(e) => tracing::error!(error = %e, "status task failed"),
            }
        }
        (ok, failed)
    }

    /// Reads the fleet: the servers not lost, the books' cells just before, and every such
    /// server's status. `peek` leaves the servers' since-last counters alone.
    async fn observe(&self, peek: bool) -> Result<Observation, BalanceError> {
        let servers: Vec<ServerRecord> = self
            .store
            .server_records()
            .await?
            .into_iter()
            .filter(|s| s.state != ServerState::Lost)
            .collect();
        let cells_before = self.store.cells().await?;
        let (statuses, unreachable) = self.statuses(&servers, peek).await;
        Ok(Observation {
            servers,
            cells_before,
            statuses,
            unreachable,
        })
    }

    /// Declares lost every server unheard of for longer than the lease and returns its units
    /// to the reserve, recorded as a `reclaim` run. Returns the servers reclaimed.
    pub async fn reclaim_lost(&self) -> Result<Vec<String>, BalanceError> {
        let fence = self.fence()?;
        let lease = chrono::Duration::from_std(self.config.lease).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        // A server another shard's leader declared lost may still hold this leader's products:
        // while the estate is sharded, lost servers are reclaimed again (a no-op once empty).
        let silent: Vec<ServerRecord> = self
            .store
            .server_records()
            .await?
            .into_iter()
            .filter(|s| s.state != ServerState::Lost || !fence.leads_all())
            .filter(|s| now - s.last_seen_at.unwrap_or(s.created_at) > lease)
            .collect();
        if silent.is_empty() {
            return Ok(Vec::new());
        }
        let mut reclaims = Vec::new();
        for server in silent {
            let reclaimed = self.store.reclaim_lost_server(&server.name, &fence).await?;
            if server.state != ServerState::Lost || !reclaimed.is_empty() {
                reclaims.push((server, reclaimed));
            }
        }
        if reclaims.is_empty() {
            return Ok(Vec::new());
        }
        let run_id = self.store.begin_run(RunTrigger::Reclaim, &fence).await?;
        let mut outcome = RunOutcome {
            status: "ok".into(),
            ..RunOutcome::default()
        };
        let mut names = Vec::new();
        for (server, reclaimed) in reclaims {
            let units: u64 = reclaimed.iter().map(|(_, u)| u).sum();
            tracing::warn!(server = %server.name, units, ?reclaimed, run_id, "server lost; its units returned to the reserve");
            outcome.units_moved += units;
            outcome.moves += reclaimed.len() as u64;
            outcome
                .errors
                .push(format!("{} lost: reclaimed {units} units", server.name));
            names.push(server.name);
        }
        self.store.finish_run(run_id, &outcome).await?;
        Ok(names)
    }

    /// Compares the books with every reachable server's view, without moving anything and
    /// without resetting the servers' counters.
    pub async fn doctor(&self) -> Result<DoctorReport, BalanceError> {
        let Observation {
            cells_before,
            statuses,
            unreachable,
            ..
        } = self.observe(true).await?;
        // The moves in flight read before the books' second read: a move booked between the
        // two reads would otherwise be in neither, and its server's cell look wrong.
        let in_flight = self.store.unfinished_moves().await?;
        let cells = self.store.cells().await?;
        let mut discrepancies =
            cpu_bound(|| reconcile(&cells_before, &cells, &in_flight, &statuses));
        for check in self.store.books().await? {
            discrepancies.extend(check.errors());
        }
        let mut products = Vec::new();
        for product in self.store.products().await? {
            let servers = cells
                .iter()
                .filter(|c| c.product == product.name)
                .map(|c| {
                    let seen = reported(&statuses, &c.server, &c.product);
                    DoctorCell {
                        server: c.server.clone(),
                        store_allocation: c.units,
                        store_generation: c.generation,
                        server_allocation: seen.map(|s| u64::from(s.allocation)),
                        server_generation: seen.map(|s| s.generation),
                        in_use: seen.map(|s| u64::from(s.in_use)),
                    }
                })
                .collect();
            products.push(DoctorProduct {
                product: product.name,
                purchased: product.purchased,
                reserve: product.reserve,
                in_transit: product.in_transit,
                allocated: product.allocated,
                servers,
            });
        }
        let unfinished_moves: Vec<MoveView> = self
            .store
            .unfinished_moves()
            .await?
            .into_iter()
            .map(|m| MoveView {
                id: m.id,
                product: m.product,
                server: m.server,
                kind: m.kind,
                units: m.units,
                state: m.state,
                applied_units: m.applied_units,
            })
            .collect();
        Ok(DoctorReport {
            ok: discrepancies.is_empty() && unreachable.is_empty() && unfinished_moves.is_empty(),
            products,
            discrepancies,
            unreachable: unreachable.into_keys().collect(),
            unfinished_moves,
        })
    }
}

/// What `server` reported of `product`.
fn reported<'a>(statuses: &'a StatusMap, server: &str, product: &str) -> Option<&'a ProductStatus> {
    product_status(statuses.get(server)?, product)
}

/// What a status says of `product`. Its products are sorted by name as read
/// ([`AgentClient::status`]): a run looks up every cell, 100,000 on a 1,000 × 100 estate.
fn product_status<'a>(status: &'a AgentStatus, product: &str) -> Option<&'a ProductStatus> {
    let products = &status.products;
    debug_assert!(products.is_sorted_by(|a, b| a.product <= b.product));
    products
        .binary_search_by(|p| p.product.as_str().cmp(product))
        .ok()
        .map(|i| &products[i])
}

/// Whether `server` reported exactly the books' allocations (after a reset, it adopted them).
fn adopted(server: &str, cells: &[CellRecord], statuses: &StatusMap) -> bool {
    let Some(status) = statuses.get(server) else {
        return false;
    };
    let books = |product: &str| {
        cells
            .iter()
            .find(|c| c.server == server && c.product == product)
            .map_or(0, |c| c.units)
    };
    status
        .products
        .iter()
        .all(|p| u64::from(p.allocation) == books(&p.product))
        && cells
            .iter()
            .filter(|c| c.server == server && c.units > 0)
            .all(|c| product_status(status, &c.product).is_some())
}

/// Every way a reachable server's applied allocation disagrees with the books. `before` and
/// `after` are the books read just before and just after the statuses: a cell whose books
/// changed in between (an instant balance landed meanwhile), or with a move in flight, proves
/// nothing and is skipped.
fn reconcile(
    before: &[CellRecord],
    after: &[CellRecord],
    in_flight: &[MoveRecord],
    statuses: &StatusMap,
) -> Vec<String> {
    // Keyed lookups: an estate has 100,000 cells and more, so a scan per cell is quadratic.
    let in_flight: HashSet<(&str, &str)> = in_flight
        .iter()
        .map(|m| (m.server.as_str(), m.product.as_str()))
        .collect();
    let before: HashMap<(&str, &str), (u64, u64)> = before
        .iter()
        .map(|b| {
            (
                (b.server.as_str(), b.product.as_str()),
                (b.units, b.generation),
            )
        })
        .collect();
    let mut found = Vec::new();
    for cell in after {
        let Some(status) = statuses.get(&cell.server) else {
            continue;
        };
        let key = (cell.server.as_str(), cell.product.as_str());
        // A move in flight may be applied at the server and not yet booked: not a discrepancy.
        if in_flight.contains(&key) {
            continue;
        }
        if before.get(&key) != Some(&(cell.units, cell.generation)) {
            continue;
        }
        let seen = product_status(status, &cell.product);
        let (allocation, generation) =
            seen.map_or((0, 0), |p| (u64::from(p.allocation), p.generation));
        if allocation != cell.units {
            found.push(format!(
                "{}/{}: server applied {allocation} units (generation {generation}), books say {} (generation {})",
                cell.server, cell.product, cell.units, cell.generation
            ));
        }
    }
    found
}

/// One usage sample per (server, product) the statuses report, each carrying the balancer's
/// accounting of the cell since its previous sample (taken out of `accountings`, so counted
/// once; what no sample takes stays there).
fn usage_samples(
    statuses: &StatusMap,
    accountings: &mut snapshot::CellMap<CellAccounting>,
) -> Vec<UsageSample> {
    statuses
        .iter()
        .flat_map(|(server, status)| status.products.iter().map(move |p| (server, p)))
        .map(|(server, p)| UsageSample {
            server: server.clone(),
            product: p.product.clone(),
            allocation: u64::from(p.allocation),
            in_use: u64::from(p.in_use),
            peak_in_use: u64::from(p.since_last.peak_in_use),
            checkouts: p.since_last.checkouts,
            denials: p.since_last.denials,
            overdrafts: p.since_last.overdrafts,
            staleouts: p.since_last.staleouts,
            waiting: u64::from(p.waiting),
            instant_requests: p.since_last.instant_requests,
            accounting: accountings.remove(server, &p.product).unwrap_or_default(),
        })
        .collect()
}

/// Runs a CPU-bound step of a run or the doctor (every product's first plan, the
/// reconciliation of every cell) off the async worker it is called on: on a multi-threaded
/// runtime the worker's other tasks move to a fresh worker first
/// ([`tokio::task::block_in_place`]), so instant balances and every other request keep being
/// served while a large estate's run computes. Why: planned in line, a run of 1,000 servers ×
/// 100 products held one of two workers for hundreds of milliseconds at a time, and each of an
/// instant balance's round trips waited for a worker behind it. On a current-thread runtime
/// (tests) it runs in line. Not for a task driven by a `LocalSet`, where `block_in_place`
/// panics (nothing here runs one).
fn cpu_bound<R>(step: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(step),
        _ => step(),
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_bound;
    use std::sync::mpsc;
    use std::time::Duration;

    /// While a step runs on the one worker of a runtime, another task still runs: the step
    /// waits for that task's message, so without the hand-off it would wait in vain.
    #[test]
    fn a_cpu_bound_step_leaves_the_workers_to_other_tasks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let answered = runtime.block_on(async {
            let (tx, rx) = mpsc::channel();
            let step = tokio::spawn(async move {
                cpu_bound(move || rx.recv_timeout(Duration::from_secs(20)).is_ok())
            });
            // Queued behind the step on the one worker: it runs only if the step hands the
            // worker over.
            tokio::spawn(async move {
                let _ = tx.send(());
            })
            .await
            .unwrap();
            step.await.unwrap()
        });
        assert!(
            answered,
            "the other task never ran while the step held the worker"
        );
    }

    /// A current-thread runtime (tests, tools) has no worker to hand over: the step runs in line.
    #[tokio::test]
    async fn a_cpu_bound_step_runs_in_line_on_a_current_thread_runtime() {
        assert_eq!(cpu_bound(|| 7), 7);
    }
}

//! Moves carried in batches: a run sends each server one request per phase (its releases,
//! then its grants) instead of one request per move, and books the server's answers in one
//! transaction. Each move keeps everything a single move has: its own id (so a batch resent
//! after a lost answer applies nothing twice), its own outcome (applied and booked, refused
//! and abandoned, or unconfirmed and left planned to be re-sent), and the same fault points.
//!
//! A server too old to know batches answers the route `not_found`; its moves then go one by
//! one, as before batches.
//!
//! The servers of a run are sent to concurrently, and their answers are booked together: a
//! [`Booker`] gathers whatever answers have arrived while it was booking the previous group
//! and books them in one transaction. One booking per server would make every server's
//! transaction lock the same product rows (every server holds every product), so they would
//! queue behind each other's commits.

use super::{Engine, MoveFailure, not_booked, unconfirmed};
use crate::balance::agent_client::CallError;
use crate::store::{LandedMove, MoveRecord, ServerRecord};
use allot_core::error::ErrorCode;
use allot_core::wire::agent::{BatchMove, MAX_BATCH_MOVES, MoveBatch, MoveResponse};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// What became of one move of a batch.
pub(super) type MoveResult = Result<MoveRecord, MoveFailure>;

impl Engine {
    /// Carries `moves` (all to `server`) in batches of at most [`MAX_BATCH_MOVES`], in order;
    /// returns one result per move. A batch with no answer leaves its moves and every later
    /// batch's planned (they would wait out the same timeout), to be re-sent by the next run.
    pub(super) async fn execute_batched(
        &self,
        server: &ServerRecord,
        moves: Vec<MoveRecord>,
        booker: &Booker,
    ) -> Vec<MoveResult> {
        let mut results = Vec::with_capacity(moves.len());
        let mut batched = self.config.batch_moves;
        let size = if batched { MAX_BATCH_MOVES } else { 1 };
        let mut chunks = moves.chunks(size);
        while let Some(chunk) = chunks.next() {
            if batched {
                match self.execute_batch(server, chunk, booker).await {
                    Ok(done) => results.extend(done),
                    Err(BatchUnsupported) => {
                        batched = false;
                        for mv in chunk {
                            results.push(self.execute(server, mv).await);
                        }
                    }
                }
            } else {
                for mv in chunk {
                    results.push(self.execute(server, mv).await);
                }
            }
            if results
                .iter()
                .any(|r| matches!(r, Err(MoveFailure::Unconfirmed(_))))
            {
                for mv in chunks.by_ref().flatten() {
                    results.push(Err(MoveFailure::Unconfirmed(format!(
                        "{} {} to {}: not sent; an earlier move to this server was not confirmed",
                        mv.kind, mv.id, server.name
                    ))));
                }
            }
        }
        results
    }

    /// Sends one batch and books every outcome.
    #[tracing::instrument(skip_all, fields(server = %server.name, moves = moves.len()))]
    async fn execute_batch(
        &self,
        server: &ServerRecord,
        moves: &[MoveRecord],
        booker: &Booker,
    ) -> Result<Vec<MoveResult>, BatchUnsupported> {
        let batch = MoveBatch {
            moves: moves
                .iter()
                .map(|mv| BatchMove {
                    kind: mv.kind,
                    move_id: mv.id,
                    product: mv.product.clone(),
                    units: u32::try_from(mv.units).unwrap_or(u32::MAX),
                })
                .collect(),
        };
        let answer = match self.agents.send_batch(server, &batch).await {
            Ok(answer) => answer,
            Err(CallError::Refused { status, code, .. })
                if status == 404 && code == ErrorCode::NotFound.as_str() =>
            {
                return Err(BatchUnsupported);
            }
            Err(e) => {
                return Ok(moves
                    .iter()
                    .map(|mv| Err(unconfirmed(mv, server, &e)))
                    .collect());
            }
        };
        allot_http::fault::point("after_move_sent");
        let mut outcomes: HashMap<uuid::Uuid, _> = answer
            .outcomes
            .into_iter()
            .map(|o| (o.move_id, o))
            .collect();
        let mut results: Vec<Option<MoveResult>> = moves.iter().map(|_| None).collect();
        let mut landed = Vec::new();
        for (i, mv) in moves.iter().enumerate() {
            match outcomes.remove(&mv.id) {
                Some(o) => match (o.applied, o.refused) {
                    (Some(applied), _) => landed.push((i, applied)),
                    // Refusals the book made (the move certainly not applied), as a single
                    // move's `404 unknown_product` or `409 conflict` are.
                    (None, Some(r))
                        if matches!(r.code, ErrorCode::UnknownProduct | ErrorCode::Conflict) =>
                    {
                        let failure = self
                            .abandon_refused(server, mv, r.code.as_str(), &r.message)
                            .await;
                        results[i] = Some(Err(failure));
                    }
                    (None, refused) => {
                        let why = refused.map_or("no outcome".to_owned(), |r| r.message);
                        results[i] =
                            Some(Err(unconfirmed(mv, server, &CallError::Unreachable(why))));
                    }
                },
                None => {
                    let e = CallError::Unreachable("the batch answer left it out".into());
                    results[i] = Some(Err(unconfirmed(mv, server, &e)));
                }
            }
        }
        for (i, booked) in booker.book(server, moves, landed).await {
            results[i] = Some(booked);
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every move has an outcome"))
            .collect())
    }

    /// Books the applied moves of several batches in one transaction; if the store refuses
    /// any of them, books each batch on its own.
    async fn book_group(&self, group: Vec<Landing>) {
        if group.len() > 1 {
            let all: Vec<LandedMove> = group.iter().flat_map(Landing::landed_moves).collect();
            match self.store.complete_moves(&all, &self.write_fence()).await {
                Ok(booked) => {
                    let mut booked = booked.into_iter();
                    for landing in group {
                        let results = landing
                            .landed
                            .iter()
                            .zip(booked.by_ref())
                            .map(|((i, _), record)| {
                                self.remember(&record);
                                (*i, Ok(record))
                            })
                            .collect();
                        let _ = landing.reply.send(results);
                    }
                    return;
                }
                Err(e) => tracing::warn!(error = %e, batches = group.len(),
                    "a group of batches not booked together; booking each batch alone"),
            }
        }
        for landing in group {
            let results = self.book_landed(&landing).await;
            let _ = landing.reply.send(results);
        }
    }

    /// Books the applied moves of one batch in one transaction; if the store refuses any of
    /// them, books each on its own so one bad answer holds back none of the others.
    async fn book_landed(&self, landing: &Landing) -> Vec<(usize, MoveResult)> {
        let Landing {
            server,
            moves,
            landed,
            ..
        } = landing;
        let all: Vec<LandedMove> = landing.landed_moves().collect();
        let fence = self.write_fence();
        let booked = match self.store.complete_moves(&all, &fence).await {
            Ok(booked) => booked.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(server = %server.name, error = %e,
                    "a batch's moves not booked together; booking them one by one");
                let mut one_by_one = Vec::with_capacity(all.len());
                for (l, (i, _)) in all.iter().zip(landed) {
                    one_by_one.push(
                        self.store
                            .complete_move(l.id, l.applied_units, l.generation, &fence)
                            .await
                            .map_err(|e| not_booked(&moves[*i], server, &e)),
                    );
                }
                one_by_one
            }
        };
        landed
            .iter()
            .zip(booked)
            .map(|((i, _), booked)| {
                if let Ok(record) = &booked {
                    self.remember(record);
                }
                (*i, booked)
            })
            .collect()
    }
}

/// The server does not know `POST /v1/allocations/batch` (older than batches).
struct BatchUnsupported;

/// A group takes landed batches until it holds this many moves (about one full batch's
/// worth). A group locks every product it touches until it commits, and an instant balance of
/// any of them waits for it: with groups of four batches' worth, instant balances during a
/// 1,000-server distribution took 162-201 ms at the p99, with groups of one 100-117 ms, for a
/// distribution about a third longer (docs/BENCHMARKS.md, session 20).
const MAX_GROUP_MOVES: usize = MAX_BATCH_MOVES;

/// One batch's applied moves, waiting for the booker.
struct Landing {
    server: ServerRecord,
    moves: Vec<MoveRecord>,
    /// (index in `moves`, the server's answer) of each applied move.
    landed: Vec<(usize, MoveResponse)>,
    reply: oneshot::Sender<Vec<(usize, MoveResult)>>,
}

impl Landing {
    fn landed_moves(&self) -> impl Iterator<Item = LandedMove> + '_ {
        self.landed.iter().map(|(i, a)| LandedMove {
            id: self.moves[*i].id,
            applied_units: u64::from(a.units),
            generation: a.generation,
        })
    }
}

/// Books the answers of a run's concurrent batches: a task that takes every landing queued
/// while it booked the last group and books them together, so the run's transactions do not
/// queue on the same product rows. Dropping every handle ends the task.
#[derive(Clone)]
pub(super) struct Booker {
    landings: mpsc::UnboundedSender<Landing>,
}

impl Booker {
    /// Starts the booking task of `engine`.
    pub(super) fn start(engine: &Engine) -> Self {
        let (landings, mut queue) = mpsc::unbounded_channel::<Landing>();
        let engine = engine.clone();
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut count = first.landed.len();
                let mut group = vec![first];
                while count < MAX_GROUP_MOVES {
                    let Ok(next) = queue.try_recv() else { break };
                    count += next.landed.len();
                    group.push(next);
                }
                engine.book_group(group).await;
            }
        });
        Self { landings }
    }

    /// Books `landed` (moves of one batch to `server`) with whatever else is waiting; one
    /// result per applied move, by its index in `moves`.
    async fn book(
        &self,
        server: &ServerRecord,
        moves: &[MoveRecord],
        landed: Vec<(usize, MoveResponse)>,
    ) -> Vec<(usize, MoveResult)> {
        if landed.is_empty() {
            return Vec::new();
        }
        let (reply, booked) = oneshot::channel();
        let indices: Vec<usize> = landed.iter().map(|(i, _)| *i).collect();
        let landing = Landing {
            server: server.clone(),
            moves: moves.to_vec(),
            landed,
            reply,
        };
        if self.landings.send(landing).is_ok()
            && let Ok(results) = booked.await
        {
            return results;
        }
        // The booking task is gone (the run is being torn down): the moves stay planned and
        // are re-sent, idempotently, by the next run.
        indices
            .into_iter()
            .map(|i| {
                let e = CallError::Unreachable("not booked: the run's booker stopped".into());
                (i, Err(unconfirmed(&moves[i], server, &e)))
            })
            .collect()
    }
}

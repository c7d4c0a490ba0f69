//! The group-commit writer: one thread owns the SQLite [`StoreWriter`]; handlers send it their
//! mutations (in decision order, under the book's lock) and await its acknowledgement, so no
//! answer ever precedes its durability while one transaction serves every pending request.
//!
//! A thread, not a task: it calls SQLite synchronously, so a group commit costs one wake-up
//! (of this thread, by the first request) and the acknowledgements, with no hand-off to a
//! driver's thread and back inside the commit cycle every request waits on.

use super::App;
use crate::error::ApiError;
use crate::store::{self, Mutation, StoreWriter};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{Notify, mpsc, oneshot};

/// What the writer receives. `Write` is by far the most common message, so it is not
/// boxed to keep the other variants small.
#[allow(clippy::large_enum_variant)]
pub(super) enum WriterMsg {
    /// Persist, then acknowledge (if anyone waits).
    Write(Mutation, Option<oneshot::Sender<bool>>),
    /// Acknowledge once everything sent before is durable.
    Barrier(oneshot::Sender<bool>),
    /// Flush, write the totals, close the store and say so.
    Close(oneshot::Sender<()>),
}

/// Group commits after which the writer, finding no request waiting, checkpoints the WAL
/// itself (see [`StoreWriter::checkpoint_while_idle`]).
const IDLE_CHECKPOINT_EVERY: u32 = 64;

/// Awaits a writer acknowledgement.
pub(super) async fn durable(rx: oneshot::Receiver<bool>) -> Result<(), ApiError> {
    match rx.await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::Internal("store write failed".to_owned())),
        Err(_) => Err(ApiError::Unavailable("the server is stopping".to_owned())),
    }
}

/// The most messages one group commit takes.
const MAX_BATCH: usize = 4096;

/// Starts the group-commit writer on a thread of its own; it ends once every sender is gone
/// or after a [`WriterMsg::Close`]. `commits` is notified after every commit that wrote
/// something (the checkpointer waits on it once it has copied the whole WAL).
pub(super) fn spawn(
    store: StoreWriter,
    rx: mpsc::UnboundedReceiver<WriterMsg>,
    app: App,
    commits: Arc<Notify>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("allot-writer".to_owned())
        .spawn(move || writer_loop(store, rx, app, &commits))
}

/// The group-commit writer: takes every pending mutation, commits them in one transaction,
/// then acknowledges each. On a failed commit it poisons the server (memory is ahead of the
/// log) and answers every waiter with failure.
fn writer_loop(
    mut store: StoreWriter,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    app: App,
    commits: &Notify,
) {
    let mut msgs = Vec::with_capacity(1024);
    let mut batch: Vec<Mutation> = Vec::with_capacity(1024);
    let mut acks: Vec<oneshot::Sender<bool>> = Vec::with_capacity(1024);
    let mut commits_since_checkpoint = 0u32;
    loop {
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        msgs.push(first);
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let mut close = None;
        for m in msgs.drain(..) {
            match m {
                WriterMsg::Write(m, ack) => {
                    batch.push(m);
                    acks.extend(ack);
                }
                WriterMsg::Barrier(ack) => acks.push(ack),
                WriterMsg::Close(done) => close = Some(done),
            }
        }
        let totals = {
            let inner = app.lock();
            if close.is_some() {
                inner.book.totals()
            } else {
                let touched = store::touched(&batch);
                inner
                    .book
                    .totals()
                    .into_iter()
                    .filter(|(n, _)| touched.contains(&n.as_str()))
                    .collect()
            }
        };
        let ok = if app.poisoned.load(Ordering::Relaxed) {
            false
        } else if batch.is_empty() && totals.is_empty() {
            true
        } else {
            match store.write_batch(&batch, &totals) {
                Ok(()) => {
                    commits.notify_one();
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, mutations = batch.len(), "store write failed; refusing further changes");
                    app.poisoned.store(true, Ordering::Relaxed);
                    false
                }
            }
        };
        batch.clear();
        for a in acks.drain(..) {
            let _ = a.send(ok);
        }
        commits_since_checkpoint += 1;
        if commits_since_checkpoint >= IDLE_CHECKPOINT_EVERY && rx.is_empty() && close.is_none() {
            commits_since_checkpoint = 0;
            if let Err(e) = store.checkpoint_while_idle() {
                tracing::warn!(error = %e, "WAL checkpoint between group commits failed");
            }
        }
        if let Some(done) = close {
            if let Err(e) = store.close() {
                tracing::error!(error = %e, "closing the store failed");
            }
            let _ = done.send(());
            return;
        }
    }
}

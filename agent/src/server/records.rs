//! Usage and denial records (issue 15): made here when a checkout ends or is denied, written
//! to the outbox in the same transaction as what they record, and shipped to the balancer in
//! batches by [`ship_task`]; a batch leaves the outbox only once the balancer has stored it, and
//! the balancer stores a record id once, so a crash on either side loses and duplicates none.

use super::{App, FAILURE_LOG_EVERY, Shared, Throttle};
use crate::store::{Mutation, OutboxReader};
use allot_core::checkout::{Ended, Millis};
use allot_core::wire::records::{DenialRecord, EndedBy, MAX_BATCH, UsageRecord};
use chrono::{DateTime, Utc};
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// How often the shipper looks at the outbox when the last batch emptied it.
const SHIP_EVERY: Duration = Duration::from_secs(5);

fn at(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

/// The usage record of a checkout that ended at `now`; none on a standalone server, which
/// has no balancer to ship records to.
pub(super) fn usage(
    app: &Shared,
    ended: &Ended,
    ended_by: EndedBy,
    now: Millis,
) -> Option<Box<UsageRecord>> {
    app.balancer.as_ref()?;
    Some(Box::new(UsageRecord {
        id: Uuid::now_v7(),
        product: ended.product.to_string(),
        user: ended.user.clone(),
        host: ended.host.clone(),
        groups: ended.groups.clone(),
        units: ended.units,
        started_at: at(ended.started_at),
        ended_at: at(now.max(ended.started_at)),
        ended_by,
    }))
}

/// The record of a checkout denied at `now` with the stable code `reason`; none on a
/// standalone server.
pub(super) fn denial(
    app: &Shared,
    product: &str,
    user: &str,
    host: &str,
    groups: &[String],
    reason: &str,
    now: Millis,
) -> Option<Box<DenialRecord>> {
    app.balancer.as_ref()?;
    Some(Box::new(DenialRecord {
        id: Uuid::now_v7(),
        product: product.to_owned(),
        user: user.to_owned(),
        host: host.to_owned(),
        groups: groups.to_vec(),
        at: at(now),
        reason: reason.to_owned(),
        free_elsewhere: None,
    }))
}

/// Ships the outbox to the balancer until the server stops: the oldest records first, in
/// batches of at most [`MAX_BATCH`], at once while more wait, every [`SHIP_EVERY`] otherwise.
pub(super) async fn ship_task(app: App, data_dir: PathBuf) {
    let Some(balancing) = app.balancer.as_ref() else {
        return;
    };
    let mut stopping = app.stopping.subscribe();
    let mut failures = Throttle::default();
    let mut reader: Option<OutboxReader> = None;
    loop {
        let mut more = false;
        if reader.is_none() {
            match OutboxReader::open(&data_dir).await {
                Ok(r) => reader = Some(r),
                Err(e) => tracing::error!(error = %e, "records: cannot open the outbox"),
            }
        }
        if let Some(r) = reader.as_mut() {
            match r.oldest(MAX_BATCH as u32).await {
                Ok((batch, ids, waiting)) if !ids.is_empty() => {
                    app.metrics.records_waiting(waiting);
                    match balancing.link.records(&batch).await {
                        Ok(ack) => {
                            tracing::debug!(
                                stored = ack.stored,
                                duplicates = ack.duplicates,
                                "records shipped"
                            );
                            let shipped = ids.len() as u64;
                            let done = {
                                let mut inner = app.lock();
                                app.log(&mut inner, Mutation::Shipped(ids))
                            };
                            if super::writer::durable(done).await.is_ok() {
                                app.metrics.records_shipped(shipped);
                                app.metrics.records_waiting(waiting.saturating_sub(shipped));
                                more = waiting > shipped;
                            }
                        }
                        Err(e) => {
                            if let Some(held) = failures.ready(FAILURE_LOG_EVERY) {
                                tracing::warn!(error = %e, waiting, held_back = held,
                                    "records: the balancer did not store a batch; they wait in the outbox");
                            }
                        }
                    }
                }
                Ok(_) => app.metrics.records_waiting(0),
                Err(e) => {
                    tracing::error!(error = %e, "records: cannot read the outbox");
                    reader = None;
                }
            }
        }
        if !more {
            tokio::select! {
                () = tokio::time::sleep(SHIP_EVERY) => {}
                _ = stopping.changed() => return,
            }
        } else if *stopping.borrow() {
            return;
        }
    }
}

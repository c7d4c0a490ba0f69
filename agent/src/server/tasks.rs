//! The timer task: sleeps until the next deadline (a staleout, or a trigger re-evaluation that
//! time alone makes due), then stales out what is due and evaluates the due triggers. The
//! deadlines come from the pure book (`Book::next_deadline`) and the trigger
//! (`trigger::next_check_at`); a handler with an earlier one wakes the task through `arm`.

use super::pull::pull;
use super::{App, new_handle};
use crate::clock::now_ms;
use crate::store::Mutation;
use allot_core::checkout::Millis;
use allot_core::wire::records::EndedBy;
use std::sync::Arc;
use std::time::Duration;

/// The longest the timer task sleeps without looking at its deadlines again.
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(3600);

/// Sleeps until the next deadline — a staleout, or a trigger re-evaluation that time alone
/// makes due — or until woken by an earlier one; then stales out what is due, hands the freed
/// units to waiters and evaluates the due triggers.
pub(super) async fn timer_task(app: App) {
    let mut stopping = app.stopping.subscribe();
    loop {
        let next = {
            let mut inner = app.lock();
            let now = now_ms();
            let mut due: Vec<String> = inner
                .pulls
                .iter()
                .filter(|(_, t)| t.recheck_at.is_some_and(|at| at <= now))
                .map(|(p, _)| p.clone())
                .collect();
            due.sort_unstable();
            for product in due {
                pull(&app, &mut inner, &product, now);
            }
            let (staled, served) = inner.book.expire(now, &mut new_handle);
            let mut touched: Vec<Arc<str>> = Vec::new();
            for ended in staled {
                let product = ended.product.clone();
                app.metrics.staleout(&product);
                tracing::info!(%product, "checkout staled out");
                touched.push(product.clone());
                // A unit kept for a callback and never claimed was no one's usage.
                let usage = if inner.callbacks.kept_unclaimed(ended.handle) {
                    None
                } else {
                    super::records::usage(&app, &ended, EndedBy::Staleout, now)
                };
                app.log_quiet(
                    &mut inner,
                    Mutation::Checkin {
                        handle: ended.handle,
                        product,
                        usage,
                    },
                );
            }
            app.dispatch(&mut inner, served, now);
            // Callbacks whose wait ran out, or that were not polled in time, leave the queue.
            for (product, waiter) in inner.callbacks.run_out(now) {
                if let Some(left) =
                    inner
                        .book
                        .cancel_wait(&product, waiter, true, now, &mut new_handle)
                {
                    app.dispatch(&mut inner, left.served, now);
                    touched.push(product.as_str().into());
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for product in touched {
                pull(&app, &mut inner, &product, now);
            }
            let recheck = inner
                .pulls
                .values()
                .filter_map(|t| t.recheck_at)
                .chain(inner.callbacks.next_deadline())
                .min();
            let next = match (inner.book.next_deadline(), recheck) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            inner.armed = next.unwrap_or(Millis::MAX);
            next
        };
        // At most an hour: a far deadline is simply looked at again.
        let wait = next.map_or(MAX_TIMER_SLEEP, |d| {
            Duration::from_millis(d.saturating_sub(now_ms())).min(MAX_TIMER_SLEEP)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = app.timer_wake.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

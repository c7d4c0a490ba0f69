//! The usage history: raw samples (one per (server, product) per run), hourly roll-ups kept
//! far longer, the retention task that rolls up and prunes, and time-series queries that read
//! each instant from exactly one of the two.

use crate::store::{HistoryBucket, HistoryQuery, Store, StoreError};
use allot_core::wire::balancer::{History, HistoryPoint, HistorySeries};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const HOUR_MS: i64 = 3_600_000;

/// How long history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw samples (default 30 days).
    pub raw: Duration,
    /// Hourly roll-ups (default 400 days).
    pub hourly: Duration,
    /// Usage and denial records (default 400 days).
    pub records: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            raw: Duration::from_secs(30 * 86_400),
            hourly: Duration::from_secs(400 * 86_400),
            records: Duration::from_secs(400 * 86_400),
        }
    }
}

impl Retention {
    /// The first instant read from raw samples at `now`: the start of the first whole hour
    /// whose raw samples are all still kept. Earlier instants are read from roll-ups.
    pub fn raw_from_ms(&self, now_ms: i64) -> i64 {
        let oldest = now_ms - ms(self.raw);
        oldest + (HOUR_MS - oldest.rem_euclid(HOUR_MS)) % HOUR_MS
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Rolls complete hours up and deletes what retention no longer keeps. Returns (roll-up rows
/// written, raw samples deleted, roll-ups deleted, usage and denial records deleted).
pub async fn maintain(
    store: &dyn Store,
    now_ms: i64,
    retention: &Retention,
) -> Result<(u64, u64, u64, u64), StoreError> {
    let rolled = store.roll_up(now_ms).await?;
    let (raw, hourly) = store
        .prune_history(now_ms - ms(retention.raw), now_ms - ms(retention.hourly))
        .await?;
    let records = store.prune_records(now_ms - ms(retention.records)).await?;
    Ok((rolled, raw, hourly, records))
}

/// Runs [`maintain`] at start and every ten minutes until `shutdown` turns true.
pub async fn retention_task(
    store: Arc<dyn Store>,
    retention: Retention,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match maintain(&*store, Utc::now().timestamp_millis(), &retention).await {
            Ok((rolled, raw, hourly, records)) if rolled + raw + hourly + records > 0 => {
                tracing::info!(
                    rolled,
                    raw_deleted = raw,
                    hourly_deleted = hourly,
                    records_deleted = records,
                    "history maintained"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "history maintenance failed; retrying later"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What a history query asks for, validated by the caller.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this product.
    pub product: Option<String>,
    /// Only this server.
    pub server: Option<String>,
    /// Only servers of this site.
    pub site: Option<String>,
}

/// The time series of the window `[from, to)` in buckets of `step`.
pub async fn query(
    store: &dyn Store,
    filter: Filter,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
    now: DateTime<Utc>,
    retention: &Retention,
) -> Result<History, StoreError> {
    let step_ms = ms(step).max(1);
    let buckets = store
        .history(&HistoryQuery {
            product: filter.product,
            server: filter.server,
            site: filter.site,
            from_ms: from.timestamp_millis(),
            to_ms: to.timestamp_millis(),
            step_ms,
            raw_from_ms: retention.raw_from_ms(now.timestamp_millis()),
        })
        .await?;
    Ok(History {
        from,
        to,
        step_seconds: u64::try_from(step_ms / 1000).unwrap_or(0),
        series: into_series(buckets, step_ms),
    })
}

/// Groups buckets into series and merges buckets that fall in the same step (a raw bucket
/// and a roll-up bucket of the same hour never overlap, but a step wider than an hour may hold
/// both kinds).
fn into_series(buckets: Vec<HistoryBucket>, step_ms: i64) -> Vec<HistorySeries> {
    let mut merged: BTreeMap<(String, String, String), BTreeMap<i64, HistoryBucket>> =
        BTreeMap::new();
    for b in buckets {
        let at = b.bucket - b.bucket.rem_euclid(step_ms.max(1));
        let slot = merged
            .entry((b.product.clone(), b.server.clone(), b.site.clone()))
            .or_default()
            .entry(at)
            .or_insert_with(|| HistoryBucket {
                bucket: at,
                ..HistoryBucket::default()
            });
        slot.samples += b.samples;
        slot.allocation_sum += b.allocation_sum;
        slot.allocation_max = slot.allocation_max.max(b.allocation_max);
        slot.in_use_sum += b.in_use_sum;
        slot.in_use_max = slot.in_use_max.max(b.in_use_max);
        slot.peak_in_use = slot.peak_in_use.max(b.peak_in_use);
        slot.checkouts += b.checkouts;
        slot.denials += b.denials;
        slot.overdrafts += b.overdrafts;
        slot.staleouts += b.staleouts;
        slot.waiting_sum += b.waiting_sum;
        slot.waiting_max = slot.waiting_max.max(b.waiting_max);
        slot.instant_requests += b.instant_requests;
        slot.units_granted += b.units_granted;
        slot.units_released += b.units_released;
        slot.ping_pong_units += b.ping_pong_units;
        slot.unserved_true += b.unserved_true;
        slot.unserved_false += b.unserved_false;
    }
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    merged
        .into_iter()
        .map(|((product, server, site), points)| HistorySeries {
            server,
            site,
            product,
            points: points
                .into_values()
                .map(|b| {
                    let n = b.samples.max(1) as f64;
                    HistoryPoint {
                        at: DateTime::from_timestamp_millis(b.bucket).unwrap_or_default(),
                        samples: count(b.samples),
                        allocation_mean: b.allocation_sum as f64 / n,
                        allocation_max: count(b.allocation_max),
                        in_use_mean: b.in_use_sum as f64 / n,
                        in_use_max: count(b.in_use_max),
                        peak_in_use: count(b.peak_in_use),
                        checkouts: count(b.checkouts),
                        denials: count(b.denials),
                        overdrafts: count(b.overdrafts),
                        staleouts: count(b.staleouts),
                        waiting_max: count(b.waiting_max),
                        instant_requests: count(b.instant_requests),
                        units_granted: count(b.units_granted),
                        units_released: count(b.units_released),
                        ping_pong_units: count(b.ping_pong_units),
                        unserved_true: count(b.unserved_true),
                        unserved_false: count(b.unserved_false),
                    }
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_reads_start_at_the_first_whole_kept_hour() {
        let r = Retention {
            raw: Duration::from_secs(3600),
            hourly: Duration::from_secs(86_400),
            records: Duration::from_secs(86_400),
        };
        let now = 10 * HOUR_MS + 15 * 60_000;
        assert_eq!(r.raw_from_ms(now), 10 * HOUR_MS);
        assert_eq!(r.raw_from_ms(10 * HOUR_MS), 9 * HOUR_MS);
    }

    #[test]
    fn merging_keeps_peaks_sums_and_counts() {
        let b = |bucket, samples, in_use_max, denials: i64| HistoryBucket {
            server: "s".into(),
            site: "x".into(),
            product: "p".into(),
            bucket,
            samples,
            in_use_sum: in_use_max * samples,
            in_use_max,
            peak_in_use: in_use_max + 1,
            denials,
            units_granted: denials * 2,
            ping_pong_units: denials,
            unserved_false: samples,
            ..HistoryBucket::default()
        };
        let series = into_series(vec![b(0, 2, 5, 1), b(HOUR_MS, 4, 9, 2)], 2 * HOUR_MS);
        assert_eq!(series.len(), 1);
        let p = &series[0].points[0];
        assert_eq!(
            (p.samples, p.in_use_max, p.peak_in_use, p.denials),
            (6, 9, 10, 3)
        );
        assert_eq!(
            (p.units_granted, p.ping_pong_units, p.unserved_false),
            (6, 3, 6)
        );
        assert!((p.in_use_mean - (10.0 + 36.0) / 6.0).abs() < 1e-9);
    }
}

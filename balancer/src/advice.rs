//! The schedule advisor's shell: gathers the history the pure advisor
//! (`allot_core::advisor`) reads, applies its recommendations (audited), and runs the opt-in
//! autotune task that applies them within operator-set bounds.

use crate::schedule::Schedule;
use crate::store::{RunsQuery, ScheduleSetting, Store, StoreError};
use allot_core::advisor::{
    self, Action, Advice, AdvisorInput, AutotuneBounds, CellConfig, CurrentSchedule,
    InstantBalance, RunRecord, ServerSite, UsageSample, Window,
};
use allot_core::wire::balancer::SetAllocation;
use chrono::{DateTime, Offset, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The longest window the advisor reads (its raw samples are kept 30 days by default).
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);

/// Where autotune is kept in the settings table.
const AUTOTUNE_KEY: &str = "autotune";

/// The opt-in autotune setting: whether the balancer applies the advice itself, and within
/// which bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autotune {
    /// Off unless an operator turns it on.
    pub enabled: bool,
    /// What autotune may set at most (and the interval range it may choose).
    #[serde(deserialize_with = "allot_core::wire::object_only")]
    pub bounds: AutotuneBounds,
    /// How far back each autotune pass reads, in days.
    #[serde(default = "default_window_days")]
    pub window_days: u32,
}

fn default_window_days() -> u32 {
    7
}

impl Default for Autotune {
    fn default() -> Self {
        Self {
            enabled: false,
            bounds: AutotuneBounds {
                max_buffer_units: 50,
                max_min_units: 10,
                min_interval_minutes: 5,
                max_interval_minutes: 240,
            },
            window_days: default_window_days(),
        }
    }
}

/// What [`apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Applied {
    /// The new schedule, when it changed.
    pub schedule: Option<String>,
    /// `server/product` cells whose min or buffer changed.
    pub cells: Vec<String>,
}

fn u32_of(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Reads the history of the window `[now - since, now)` and asks the advisor.
pub async fn advise(
    store: &dyn Store,
    since: Duration,
    now: DateTime<Utc>,
) -> Result<Advice, StoreError> {
    let since = since.min(MAX_WINDOW);
    let window = Window {
        from_ms: now.timestamp_millis() - i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        to_ms: now.timestamp_millis(),
    };
    let servers = store
        .server_records()
        .await?
        .into_iter()
        .map(|s| ServerSite {
            server: s.name,
            site: s.site,
            utc_offset_minutes: None,
            timezone: None,
        })
        .collect();
    let samples = store
        .samples_between(window.from_ms, window.to_ms)
        .await?
        .into_iter()
        .map(|(at_ms, s)| UsageSample {
            at_ms,
            server: s.server,
            product: s.product,
            allocation: u32_of(s.allocation),
            in_use: u32_of(s.in_use),
            peak_in_use: u32_of(s.peak_in_use),
            denials: u32_of(s.denials),
            waiting: u32_of(s.waiting),
            instant_requests: u32_of(s.instant_requests),
        })
        .collect();
    let instant_balances = store
        .instant_grants_between(window.from_ms, window.to_ms)
        .await?
        .into_iter()
        .map(|(at_ms, server, product, units)| InstantBalance {
            at_ms,
            server,
            product,
            units: u32_of(units),
        })
        .collect();
    let runs = store
        .runs(&RunsQuery {
            limit: 100_000,
            before_id: None,
            trigger: None,
            since_ms: Some(window.from_ms),
        })
        .await?
        .into_iter()
        .map(|r| RunRecord {
            at_ms: r.started_at.timestamp_millis(),
            trigger: r.trigger,
            moves: Some(u32_of(r.moves)),
        })
        .collect();
    let purchased = store
        .products()
        .await?
        .into_iter()
        .map(|p| (p.name, p.purchased))
        .collect();
    let setting = store.schedule().await?;
    let schedule = current_schedule(&setting, &window, now);
    let cells = store
        .cells()
        .await?
        .into_iter()
        .map(|c| CellConfig {
            server: c.server,
            product: c.product,
            min_units: u32_of(c.min_units),
            buffer_units: u32_of(c.buffer_units),
        })
        .collect();
    Ok(advisor::advise(&AdvisorInput {
        window,
        now_ms: now.timestamp_millis(),
        servers,
        samples,
        instant_balances,
        runs,
        schedule,
        cells,
        tuning: Default::default(),
        purchased,
    }))
}

/// The schedule as the advisor needs it: its run times over the window (computed with croner,
/// which the pure core does not have) and the zone's offset now.
fn current_schedule(
    setting: &ScheduleSetting,
    window: &Window,
    now: DateTime<Utc>,
) -> CurrentSchedule {
    let parsed = Schedule::parse(&setting.cron, Some(&setting.timezone)).ok();
    let start = DateTime::from_timestamp_millis(window.from_ms).unwrap_or(now);
    let run_times_ms = parsed
        .as_ref()
        .map(|s| {
            s.next_runs(start, 20_000)
                .into_iter()
                .map(|t| t.timestamp_millis())
                .take_while(|t| *t < window.to_ms)
                .collect()
        })
        .unwrap_or_default();
    let utc_offset_minutes = setting.timezone.parse::<chrono_tz::Tz>().ok().map(|tz| {
        tz.offset_from_utc_datetime(&now.naive_utc())
            .fix()
            .local_minus_utc()
            / 60
    });
    CurrentSchedule {
        cron: setting.cron.clone(),
        timezone: setting.timezone.clone(),
        utc_offset_minutes,
        interval_minutes: None,
        run_times_ms,
    }
}

/// Applies every `Change` of `advice` as `actor` (audited by the store), and wakes the scheduler
/// when the schedule changed.
pub async fn apply(
    store: &dyn Store,
    engine: &crate::balance::Engine,
    advice: &Advice,
    actor: &str,
    schedule_changed: &Notify,
) -> Result<Applied, StoreError> {
    let mut applied = Applied::default();
    let s = &advice.schedule;
    if s.action == Action::Change
        && Schedule::parse(&s.recommended.cron, Some(&s.recommended.timezone)).is_ok()
    {
        store
            .set_schedule(
                actor,
                &ScheduleSetting {
                    cron: s.recommended.cron.clone(),
                    timezone: s.recommended.timezone.clone(),
                },
            )
            .await?;
        schedule_changed.notify_one();
        applied.schedule = Some(s.recommended.cron.clone());
    }
    for cell in advice.cells.iter().filter(|c| c.action == Action::Change) {
        let limits = SetAllocation {
            min_units: cell.recommended.min_units,
            buffer_units: cell.recommended.buffer_units,
        };
        match store
            .set_allocation_limits(actor, &cell.server, &cell.product, &limits)
            .await
        {
            Ok(_) => {
                engine.books_changed(&cell.product, Some(&cell.server));
                applied
                    .cells
                    .push(format!("{}/{}", cell.server, cell.product));
            }
            // The server or product went away since the advice was made: skip it.
            Err(StoreError::NotFound(_) | StoreError::UnknownProduct(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(applied)
}

/// The stored autotune setting (off by default).
pub async fn autotune(store: &dyn Store) -> Result<Autotune, StoreError> {
    Ok(store
        .setting(AUTOTUNE_KEY)
        .await?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default())
}

/// Stores the autotune setting.
pub async fn set_autotune(
    store: &dyn Store,
    actor: &str,
    value: &Autotune,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.set_setting(actor, AUTOTUNE_KEY, &json).await
}

/// When autotune is on, applies the bounded advice every `every` until `shutdown`.
pub async fn autotune_task(
    store: Arc<dyn Store>,
    engine: crate::balance::Engine,
    schedule_changed: Arc<Notify>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let result = async {
            let setting = autotune(&*store).await?;
            if !setting.enabled {
                return Ok(None);
            }
            let window = Duration::from_secs(u64::from(setting.window_days.max(1)) * 86_400);
            let advice = advise(&*store, window, Utc::now()).await?;
            let bounded = advisor::apply_bounds(advice, &setting.bounds);
            apply(&*store, &engine, &bounded, "autotune", &schedule_changed)
                .await
                .map(Some)
        }
        .await;
        match result {
            Ok(Some(applied)) if applied.schedule.is_some() || !applied.cells.is_empty() => {
                tracing::info!(?applied, "autotune applied the advice");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "autotune failed; retrying next time"),
        }
    }
}

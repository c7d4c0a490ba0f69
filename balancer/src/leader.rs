//! Leadership: which balancer of several sharing one PostgreSQL runs the balances.
//!
//! The leader holds a PostgreSQL advisory lock on a connection of its own. PostgreSQL releases
//! the lock the moment that session ends — the process died, the network dropped, the server
//! restarted — and a follower polling for it takes over, bumping the leader epoch in the store.
//! Every move and allocation write carries the epoch and the store refuses older ones, so a
//! paused ex-leader that wakes up cannot touch the books. On SQLite there is one balancer: it
//! leads from the start.

use crate::store::{Store, StoreError};
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The advisory lock key of the balancer's leadership ("allot" in ASCII).
const LEADER_LOCK: i64 = 0x616c6c6f74;
/// How often a follower tries for the lock and a leader checks its lock session is alive.
const POLL: Duration = Duration::from_secs(2);

/// Why a leadership session ended (it is retried after a pause either way).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lock's own PostgreSQL session failed: connect, lock or keep-alive.
    #[error(transparent)]
    Session(#[from] sqlx::Error),
    /// The store refused or failed to bump the leader epoch.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LeaderError {
    /// A stable, machine-readable name of the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Session(_) => "session",
            Self::Store(_) => "store",
        }
    }
}

/// Leads at once (SQLite, or tests): bumps the epoch and never lets go.
pub async fn lead_alone(
    store: &dyn Store,
    url: &str,
) -> Result<watch::Receiver<Option<i64>>, StoreError> {
    let epoch = store.take_leadership(url).await?;
    tracing::info!(epoch, "leading (single balancer)");
    // A watch receiver keeps the last value after its sender is gone: the value never changes.
    let (_, leadership) = watch::channel(Some(epoch));
    Ok(leadership)
}

/// Competes for leadership through PostgreSQL's advisory lock until `shutdown`; the receiver
/// holds the epoch while this balancer leads, `None` while it follows. `on_lead` runs each time
/// leadership is won (resume unfinished moves). Returns once the first try for the lock is
/// decided (at most ten seconds), so a sole balancer serves as the leader from its first request.
pub async fn compete(
    store: Arc<dyn Store>,
    database_url: String,
    url: String,
    mut shutdown: watch::Receiver<bool>,
    on_lead: impl Fn(i64) + Send + Sync + 'static,
) -> watch::Receiver<Option<i64>> {
    let (leading, leadership) = watch::channel(None);
    let (tried, first_try) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tried = Some(tried);
        loop {
            let attempt = hold_lock(
                &*store,
                &database_url,
                &url,
                &leading,
                &on_lead,
                &mut shutdown,
                &mut tried,
            );
            match attempt.await {
                Ok(()) => return,
                Err(e) => {
                    if let Some(tried) = tried.take() {
                        let _ = tried.send(());
                    }
                    if leading.send_replace(None).is_some() {
                        tracing::error!(error = %e, code = e.code(), "leadership lost");
                    } else {
                        tracing::debug!(error = %e, code = e.code(), "leadership not available");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(10), first_try).await;
    leadership
}

/// One session: connect, try the lock until won, lead until the session fails. `Ok` only on
/// shutdown.
async fn hold_lock(
    store: &dyn Store,
    database_url: &str,
    url: &str,
    leading: &watch::Sender<Option<i64>>,
    on_lead: &(impl Fn(i64) + Send + Sync),
    shutdown: &mut watch::Receiver<bool>,
    tried: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), LeaderError> {
    let mut conn = PgConnection::connect(database_url).await?;
    loop {
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if won {
            break;
        }
        if let Some(tried) = tried.take() {
            let _ = tried.send(());
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    let epoch = store.take_leadership(url).await?;
    tracing::info!(epoch, %url, "this balancer now leads");
    leading.send_replace(Some(epoch));
    on_lead(epoch);
    if let Some(tried) = tried.take() {
        let _ = tried.send(());
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => {
                let _ = conn.close().await;
                leading.send_replace(None);
                return Ok(());
            }
        }
        // The lock lives as long as this session: if the session is gone, so is the lock.
        sqlx::query("SELECT 1").execute(&mut conn).await?;
    }
}

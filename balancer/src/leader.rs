//! Leadership: which balancer of several sharing one PostgreSQL balances which products.
//!
//! Products are hashed into shards (`allot-balancer shards --count N`; one shard by default).
//! Each shard's leader holds a PostgreSQL advisory lock of that shard on a connection of its
//! own. PostgreSQL releases the locks the moment that session ends — the process died, the
//! network dropped, the server restarted — and another balancer polling for them takes over,
//! bumping the shard's epoch in the store. Every move and allocation write carries the epoch of
//! its product's shard and the store refuses older ones, so a paused ex-leader that wakes up
//! cannot touch the books. A balancer competes at once for the shards it prefers
//! (`--lead-shards`, all when unset) and for any other only after it has been without a leader
//! for a grace period, so failover is per shard. On SQLite there is one balancer: it leads
//! every shard from the start.

use crate::store::{Fence, Store, StoreError};
use sqlx::{Connection, PgConnection};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The advisory lock key of shard 0's leadership ("allot" in ASCII); shard `s` locks
/// `LEADER_LOCK + s` (shard 0's key is the one unsharded balancers always held).
const LEADER_LOCK: i64 = 0x616c6c6f74;
/// How often a balancer tries for the locks and checks its lock session is alive.
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

/// How a balancer competes for the shards' leadership.
#[derive(Debug, Clone)]
pub struct Candidacy {
    /// Where other balancers send clients of the shards this one leads.
    pub url: String,
    /// The shards competed for at once; `None`: every shard.
    pub preferred: Option<BTreeSet<u32>>,
    /// How long any other shard must be without a leader before this balancer takes it over.
    pub grace: Duration,
}

/// Leads at once (SQLite, or tests): takes every shard and never lets go.
pub async fn lead_alone(
    store: &dyn Store,
    url: &str,
) -> Result<watch::Receiver<Fence>, StoreError> {
    let count = u32::try_from(store.shard_leaders().await?.len()).unwrap_or(u32::MAX);
    let mut epochs = BTreeMap::new();
    for shard in 0..count {
        epochs.insert(shard, store.take_shard(shard, url).await?);
    }
    tracing::info!(?epochs, "leading every shard (single balancer)");
    // A watch receiver keeps the last value after its sender is gone: the value never changes.
    let (_, leadership) = watch::channel(Fence::new(count, epochs));
    Ok(leadership)
}

/// Competes for the shards' leadership through PostgreSQL's advisory locks until `shutdown`;
/// the receiver holds the [`Fence`] of the shards this balancer leads (none while it follows).
/// `on_lead` runs each time shards are won (resume their unfinished moves). Returns once the
/// first try for the locks is decided (at most ten seconds), so a sole balancer serves as the
/// leader from its first request.
pub async fn compete(
    store: Arc<dyn Store>,
    database_url: String,
    candidacy: Candidacy,
    mut shutdown: watch::Receiver<bool>,
    on_lead: impl Fn(Fence) + Send + Sync + 'static,
) -> watch::Receiver<Fence> {
    let (leading, leadership) = watch::channel(Fence::none());
    let (tried, first_try) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tried = Some(tried);
        loop {
            let attempt = hold_locks(
                &*store,
                &database_url,
                &candidacy,
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
                    if leading.send_replace(Fence::none()).leads_any() {
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

/// One session: connect, then every [`POLL`] take the shards wanted and free, until the session
/// fails. `Ok` only on shutdown.
async fn hold_locks(
    store: &dyn Store,
    database_url: &str,
    candidacy: &Candidacy,
    leading: &watch::Sender<Fence>,
    on_lead: &(impl Fn(Fence) + Send + Sync),
    shutdown: &mut watch::Receiver<bool>,
    tried: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), LeaderError> {
    let mut conn = PgConnection::connect(database_url).await?;
    let mut count = 0u32;
    let mut held: BTreeMap<u32, i64> = BTreeMap::new();
    // When this balancer first saw each shard it does not prefer without a leader.
    let mut leaderless_since: HashMap<u32, Instant> = HashMap::new();
    loop {
        let shards = store.shard_leaders().await?;
        let now_count = u32::try_from(shards.len()).unwrap_or(u32::MAX);
        // A shard whose epoch moved on was taken from this balancer (a new shard count): its
        // lock, and every other, is let go and the shards are competed for anew.
        let deposed = held
            .iter()
            .any(|(s, e)| shards.get(*s as usize).is_none_or(|l| l.epoch != *e));
        if now_count != count || deposed {
            if !held.is_empty() {
                sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut conn)
                    .await?;
                held.clear();
                leading.send_replace(Fence::none());
                tracing::warn!(
                    count = now_count,
                    "the shards changed; competing for them anew"
                );
            }
            count = now_count;
            leaderless_since.clear();
        }
        let others: BTreeSet<u32> = sqlx::query_scalar::<_, i64>(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 1 AND classid::bigint = $1 AND pid <> pg_backend_pid()",
        )
        .bind(LEADER_LOCK >> 32)
        .fetch_all(&mut conn)
        .await?
        .into_iter()
        .filter_map(|low| u32::try_from(low - (LEADER_LOCK & 0xffff_ffff)).ok())
        .collect();
        let mut won = Vec::new();
        let free: Vec<u32> = (0..count).filter(|s| !held.contains_key(s)).collect();
        for shard in free {
            let preferred = candidacy
                .preferred
                .as_ref()
                .is_none_or(|p| p.contains(&shard));
            if !preferred {
                if others.contains(&shard) {
                    leaderless_since.remove(&shard);
                    continue;
                }
                let since = *leaderless_since.entry(shard).or_insert_with(Instant::now);
                if since.elapsed() < candidacy.grace {
                    continue;
                }
            }
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK + i64::from(shard))
                .fetch_one(&mut conn)
                .await?;
            if locked {
                let epoch = store.take_shard(shard, &candidacy.url).await?;
                tracing::info!(shard, epoch, url = %candidacy.url, preferred, "this balancer now leads a shard");
                held.insert(shard, epoch);
                won.push(shard);
            }
        }
        if !won.is_empty() {
            let fence = Fence::new(count, held.clone());
            leading.send_replace(fence.clone());
            on_lead(fence);
        }
        if let Some(tried) = tried.take() {
            let _ = tried.send(());
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => {
                let _ = conn.close().await;
                leading.send_replace(Fence::none());
                return Ok(());
            }
        }
    }
}

//! Harness for the tests that cross crates: real processes on loopback ports talked to over
//! HTTP ([`process`], [`balancer`]), and a fresh PostgreSQL database per test ([`pg`]), with
//! [`on_both_backends!`] running one test body against SQLite and against PostgreSQL. The
//! fault-injection tests add a switchable network link ([`proxy`]), a PostgreSQL cluster of
//! their own to crash ([`pg_cluster`]) and the clients' ledger of what they held ([`ledger`]).
#![forbid(unsafe_code)]

pub mod agent;
pub mod balancer;
pub mod fleet;
pub mod ledger;
pub mod pg;
pub mod pg_cluster;
pub mod process;
pub mod prometheus;
pub mod proxy;

use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it holds, and fails the test naming `what` if it still does
/// not after `within`: tests wait for a condition, never for a guessed time.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The database a test runs against: SQLite (a file in the data directory) or a fresh
/// PostgreSQL database dropped when the value is dropped.
pub struct Backend {
    /// `None` for SQLite; the test database's URL for PostgreSQL.
    pub database_url: Option<String>,
    /// A data directory of the test's own.
    pub data_dir: tempfile::TempDir,
    _db: Option<pg::TestDatabase>,
}

impl Backend {
    /// SQLite in a fresh data directory.
    pub fn sqlite() -> Self {
        Self {
            database_url: None,
            data_dir: tempfile::tempdir().expect("a temporary data directory"),
            _db: None,
        }
    }

    /// A fresh PostgreSQL database, or `None` when PostgreSQL is absent and not required.
    pub async fn postgres(test: &str) -> Option<Self> {
        let db = pg::TestDatabase::create(test).await?;
        Some(Self {
            database_url: Some(db.url().to_owned()),
            data_dir: tempfile::tempdir().expect("a temporary data directory"),
            _db: Some(db),
        })
    }

    /// The `postgres` database of a throwaway cluster the test owns (and may restart).
    pub fn on_cluster(cluster: &pg_cluster::PgCluster) -> Self {
        Self {
            database_url: Some(cluster.url()),
            data_dir: tempfile::tempdir().expect("a temporary data directory"),
            _db: None,
        }
    }
}

/// Declares each `async fn case(backend: Backend)` of the calling file as two tests,
/// `sqlite::case` and `postgres::case`.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case($crate::Backend::sqlite()).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(backend) = $crate::Backend::postgres(stringify!($case)).await else {
                        return;
                    };
                    super::$case(backend).await;
                }
            )+
        }
    };
}

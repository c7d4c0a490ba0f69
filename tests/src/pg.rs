//! A fresh PostgreSQL database per test, as crates.io's test harness does it.
//!
//! The server is found at `ALLOT_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `scripts/test` points it at a throwaway
//! cluster when no server runs). Without a reachable server the PostgreSQL half of a test is
//! skipped with a loud message — except under `CI=true`, where a missing PostgreSQL fails.

use sqlx::{Connection, Executor, PgConnection};

/// The maintenance database the harness connects to to create and drop test databases.
pub fn admin_url() -> String {
    std::env::var("ALLOT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Whether a missing PostgreSQL must fail the run rather than skip.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ALLOT_TEST_REQUIRE_PG").is_ok_and(|v| v == "1")
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database, or returns `None` (after saying so on stderr) when no
    /// PostgreSQL is reachable and none is required.
    pub async fn create(test: &str) -> Option<Self> {
        let admin = admin_url();
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) if !required() => {
                eprintln!(
                    "\n*** SKIPPED the PostgreSQL half of {test}: no PostgreSQL at {admin} ({e}).\n\
                     *** Run `bash scripts/test` to start a throwaway cluster, or set \
                     ALLOT_TEST_PG_URL. With CI=true this is a failure.\n"
                );
                return None;
            }
            Err(e) => panic!("PostgreSQL is required (CI=true) but {admin} is unreachable: {e}"),
        };
        let name = format!("allot_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create the test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("ALLOT_TEST_PG_URL {admin:?} has no database path"),
        };
        Some(Self { name, url })
    }

    /// The URL of the test database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; a runtime of its own on a plain thread avoids
        // blocking it and works whether or not the test's runtime is still alive.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin_url()).await?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

//! Upgrades: migrations are forward-only and a database made by the first released schema is
//! brought to the current one by the real migrator with its data intact, on both balancer
//! backends and on the metering server's SQLite; released migration files are never edited;
//! and the API is versioned so that old and new clients and servers interoperate.
//!
//! "The first released schema" is each store's first migration file. The databases here are
//! made by sqlx's migrator from a folder holding only that file, so they carry the same
//! `_sqlx_migrations` rows (and checksums) an installation of that release carries: if a
//! released file were edited, the current binary would refuse to start on them.

use allot_tests::agent::TestAgent;
use allot_tests::balancer::Balancer;
use allot_tests::{Backend, on_both_backends};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, SqliteConnection};
use std::path::{Path, PathBuf};

fn migrations(store: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(store)
}

/// A folder holding only the first (released) migration of `store`.
fn first_release(store: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(migrations(store))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let first = &files[0];
    std::fs::copy(first, dir.path().join(first.file_name().unwrap())).unwrap();
    dir
}

/// Applies the first released migration to the database at `url` with sqlx's migrator, then
/// runs `sql` on it (the data that release wrote).
async fn first_release_with(store: &str, url: &str, sql: String) {
    let folder = first_release(store);
    let migrator = sqlx::migrate::Migrator::new(folder.path()).await.unwrap();
    if url.starts_with("postgres") {
        let mut conn = PgConnection::connect(url).await.unwrap();
        migrator.run(&mut conn).await.unwrap();
        conn.execute(AssertSqlSafe(sql)).await.unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        migrator.run(&mut conn).await.unwrap();
        conn.execute(AssertSqlSafe(sql)).await.unwrap();
        conn.close().await.unwrap();
    }
}

/// Books as the first release wrote them: a product with a purchase, a server holding part of
/// it, a finished run with its move, two later runs' usage samples (at `recent_ms`, kept raw,
/// and at `old_ms`, past raw retention: the upgraded balancer rolls it up into the hourly
/// history the first release did not have) and an audit entry. Plain SQL both
/// dialects read the same way; times are Unix milliseconds.
fn first_release_books(recent_ms: i64, old_ms: i64) -> String {
    format!(
        "
INSERT INTO products (name, publisher, version, enforcement, seat, heartbeat_seconds,
    staleout_seconds, acl, purchased, reserve, in_transit, created_at)
VALUES ('cad', 'Acme', '2024', 'soft_stop', 'per_user_host', 30, 120,
    '{{\"allow_users\":[\"ann\"]}}', 10, 6, 0, 1700000000000);
INSERT INTO entitlements (product_id, units, expires_at, reference, created_at, created_by)
VALUES ((SELECT id FROM products WHERE name = 'cad'), 10, NULL, 'PO-1', 1700000000000, 'admin');
INSERT INTO servers (name, url, site, token_hash, state, created_at, last_seen_at)
VALUES ('s1', 'http://127.0.0.1:1', 'hq', 'aa', 'active', 1700000000000, 1700000500000);
INSERT INTO allocations (server_id, product_id, units, min_units, buffer_units, generation)
VALUES ((SELECT id FROM servers WHERE name = 's1'), (SELECT id FROM products WHERE name = 'cad'),
    4, 1, 2, 1);
INSERT INTO balance_runs (trigger, status, epoch, started_at, finished_at, servers_queried,
    servers_unreachable, moves, units_moved, errors)
VALUES ('manual', 'ok', 1, 1700000100000, 1700000101000, 1, 0, 1, 4, '[]');
INSERT INTO moves (id, run_id, product_id, server_id, kind, units, state, applied_units, epoch,
    created_at, updated_at, error)
VALUES ('0190a0b0-0000-7000-8000-0000000000aa', (SELECT max(id) FROM balance_runs),
    (SELECT id FROM products WHERE name = 'cad'), (SELECT id FROM servers WHERE name = 's1'),
    'grant', 4, 'applied', 4, 1, 1700000100000, 1700000101000, NULL);
INSERT INTO balance_runs (trigger, status, epoch, started_at, finished_at, servers_queried,
    servers_unreachable, moves, units_moved, errors)
VALUES ('scheduled', 'ok', 1, {recent}, {recent}, 1, 0, 0, 0, NULL);
INSERT INTO usage_samples (run_id, server_id, product_id, at, allocation, in_use, peak_in_use,
    checkouts, denials, overdrafts, staleouts, waiting, instant_requests)
VALUES ((SELECT max(id) FROM balance_runs), (SELECT id FROM servers WHERE name = 's1'),
    (SELECT id FROM products WHERE name = 'cad'), {recent}, 4, 3, 4, 9, 1, 0, 0, 0, 0);
INSERT INTO balance_runs (trigger, status, epoch, started_at, finished_at, servers_queried,
    servers_unreachable, moves, units_moved, errors)
VALUES ('scheduled', 'ok', 1, {old}, {old}, 1, 0, 0, 0, NULL);
INSERT INTO usage_samples (run_id, server_id, product_id, at, allocation, in_use, peak_in_use,
    checkouts, denials, overdrafts, staleouts, waiting, instant_requests)
VALUES ((SELECT max(id) FROM balance_runs), (SELECT id FROM servers WHERE name = 's1'),
    (SELECT id FROM products WHERE name = 'cad'), {old}, 4, 2, 2, 5, 0, 0, 0, 0, 0);
INSERT INTO audit_log (at, actor, action, target, before, after)
VALUES (1700000000000, 'admin', 'product.create', 'cad', NULL, '{{\"name\":\"cad\"}}');
UPDATE settings SET value = '0 * * * *' WHERE key = 'schedule.cron';
UPDATE settings SET value = '1' WHERE key = 'leader.epoch';
",
        recent = recent_ms,
        old = old_ms
    )
}

on_both_backends!(a_first_release_database_upgrades_with_its_books_intact);

async fn a_first_release_database_upgrades_with_its_books_intact(backend: Backend) {
    let (store, url) = match &backend.database_url {
        Some(url) => ("balancer-postgres", url.clone()),
        None => {
            let path = backend.data_dir.path().join("allot.db");
            (
                "balancer-sqlite",
                format!("sqlite://{}?mode=rwc", path.display()),
            )
        }
    };
    let now = chrono::Utc::now();
    let recent = now - chrono::Duration::hours(3);
    let old = now - chrono::Duration::days(40);
    let books = first_release_books(recent.timestamp_millis(), old.timestamp_millis());
    first_release_with(store, &url, books).await;

    // The current binary applies the rest with its embedded migrator and starts.
    let mut balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    let cad = api.get("/v1/products/cad").await;
    assert_eq!(
        (&cad["publisher"], &cad["version"], &cad["policy"]["seat"]),
        (&json!("Acme"), &json!("2024"), &json!("per_user_host"))
    );
    assert_eq!(cad["policy"]["acl"]["allow_users"], json!(["ann"]));
    assert_eq!(
        (
            &cad["purchased"],
            &cad["reserve"],
            &cad["in_transit"],
            &cad["allocated"]
        ),
        (&json!(10), &json!(6), &json!(0), &json!(4))
    );
    let cell = &cad["servers"][0];
    assert_eq!(
        (
            &cell["server"],
            &cell["allocation"],
            &cell["min_units"],
            &cell["buffer_units"]
        ),
        (&json!("s1"), &json!(4), &json!(1), &json!(2))
    );
    let entitlements = api.get("/v1/products/cad/entitlements").await;
    assert_eq!(entitlements["items"][0]["reference"], "PO-1");
    let servers = api.get("/v1/servers").await;
    assert_eq!(servers["items"][0]["site"], "hq");
    let runs = api.get("/v1/runs?trigger=manual").await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 1, "{runs}");
    let run = api
        .get(&format!("/v1/runs/{}", runs["items"][0]["id"]))
        .await;
    assert_eq!(
        run["move_log"][0]["id"],
        "0190a0b0-0000-7000-8000-0000000000aa"
    );
    assert_eq!(api.get("/v1/schedule").await["cron"], "0 * * * *");
    let audit = api.get("/v1/audit").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "product.create" && e["target"] == "cad"),
        "{audit}"
    );
    // History written by the first release is read by the current code.
    let history = api.get("/v1/history?since=1d&step=1h").await;
    assert_eq!(
        history["series"][0]["points"][0]["in_use_max"], 3,
        "{history}"
    );
    let around_old = format!(
        "/v1/history?from={}&to={}&step=1h",
        (old - chrono::Duration::hours(2)).format("%Y-%m-%dT%H:%M:%SZ"),
        (old + chrono::Duration::hours(2)).format("%Y-%m-%dT%H:%M:%SZ"),
    );
    // The retention task rolls up at start, in the background.
    let rolled_up = allot_tests::agent::poll_until(std::time::Duration::from_secs(10), || async {
        api.get(&around_old).await["series"][0]["points"][0]["in_use_max"] == 2
    })
    .await;
    assert!(rolled_up, "{}", api.get(&around_old).await);

    // The current code works on the upgraded books: a purchase, a new product, a run.
    api.post("/v1/products/cad/entitlements", json!({"units": 2}))
        .await;
    api.post("/v1/products", json!({"name": "new"})).await;
    let run = api.post("/v1/balance", json!({})).await;
    assert_ne!(run["status"], "failed", "{run}");
    let cad = api.get("/v1/products/cad").await;
    let total = |p: &Value, k: &str| p[k].as_u64().unwrap();
    assert_eq!(total(&cad, "purchased"), 12);
    assert_eq!(
        total(&cad, "reserve") + total(&cad, "in_transit") + total(&cad, "allocated"),
        12,
        "conservation after the upgrade: {cad}"
    );

    // Migrated once, it starts again (the applied migrations' checksums still match).
    balancer.kill9_and_restart().await;
    assert_eq!(
        balancer.api().get("/v1/products/cad").await["purchased"],
        12
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_release_agent_store_upgrades_with_its_checkouts_intact() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("agent.db").display()
    );
    let handle = "0123456789abcdef0123456789abcdef";
    let sql = format!(
        "INSERT INTO products (name, policy, allocation, generation, checkouts)
         VALUES ('cad', '{{\"enforcement\":\"hard_stop\",\"seat\":\"concurrent\",\
         \"heartbeat_seconds\":60,\"staleout_seconds\":86400}}', 5, 2, 7);
         INSERT INTO checkouts (handle, product, user, host, seat, units, overdraft, created_ms)
         VALUES ('{handle}', 'cad', 'ann', 'h1', NULL, 2, 0, {now});
         INSERT INTO moves (move_id, kind, product, requested, units, allocation, generation,
             applied_ms)
         VALUES ('0190a0b0-0000-7000-8000-0000000000bb', 'grant', 'cad', 5, 5, 5, 2, {now});",
        now = chrono::Utc::now().timestamp_millis()
    );
    first_release_with("agent-sqlite", &url, sql).await;

    let agent = TestAgent::start_in(dir, |_| {}).await;
    let (status, products) = agent.get("/v1/products").await;
    assert_eq!(status, 200);
    let cad = &products["products"][0];
    assert_eq!(
        (&cad["allocated"], &cad["in_use"], &cad["free"]),
        (&json!(5), &json!(2), &json!(3)),
        "{products}"
    );
    let (_, report) = agent.get_auth("/v1/status?peek=true").await;
    assert_eq!(report["products"][0]["generation"], 2);
    assert_eq!(report["products"][0]["totals"]["checkouts"], 7);
    // The checkout made under the first release lives on: it heartbeats and checks in.
    assert_eq!(agent.heartbeat(handle).await.0, 200);
    // The move applied under the first release is still idempotent.
    let (status, repeat) = agent
        .post_auth(
            "/v1/allocations/grant",
            &json!({"move_id": "0190a0b0-0000-7000-8000-0000000000bb", "product": "cad", "units": 5}),
        )
        .await;
    assert_eq!(
        (status, &repeat["allocation"]),
        (200, &json!(5)),
        "{repeat}"
    );
    assert_eq!(agent.checkin(handle).await.0, 200);
    assert_eq!(agent.checkout("cad", "bob", "h2").await.0, 200);
    let dir = agent.stop().await;
    // Migrated once, it starts again.
    let agent = TestAgent::start_in(dir, |_| {}).await;
    assert_eq!(agent.view("cad").await["in_use"], 1);
    agent.stop().await;
}

/// `migrations/SHA256SUMS` lists every migration file with its SHA-256, in `sha256sum`'s
/// format. A listed file is released: its text may never change (sqlx would refuse every
/// database it was applied to). New migrations are new files, appended to the list.
#[test]
fn released_migrations_are_never_edited() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let list =
        std::fs::read_to_string(root.join("migrations/SHA256SUMS")).expect("migrations/SHA256SUMS");
    let listed: std::collections::BTreeMap<&str, &str> = list
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (sum, path) = l.split_once("  ").expect("`<sha256>  <path>` lines");
            (path, sum)
        })
        .collect();
    for (path, sum) in &listed {
        let text = std::fs::read(root.join(path)).unwrap_or_else(|_| {
            panic!("{path} is listed as released but is gone: never delete a released migration")
        });
        assert_eq!(
            hex(&Sha256::digest(&text)),
            *sum,
            "{path} was edited after its release: restore it and put the change in a new migration"
        );
    }
    for store in ["balancer-postgres", "balancer-sqlite", "agent-sqlite"] {
        for entry in std::fs::read_dir(migrations(store)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let path = format!("migrations/{store}/{name}");
            assert!(
                listed.contains_key(path.as_str()),
                "{path} is not in migrations/SHA256SUMS: once it is final, append its line \
                 (`sha256sum {path} >> migrations/SHA256SUMS`)"
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Version interop.

/// Adds an unknown field to every JSON object in `value`, at every depth. In an ACL the new
/// field is an empty rule list: a rule a server cannot enforce is refused, never ignored (see
/// `an_acl_rule_a_server_cannot_enforce_is_refused_not_dropped`).
fn with_unknown_fields(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                if key == "acl" {
                    if let Value::Object(acl) = field {
                        acl.insert("allow_sites".to_owned(), json!([]));
                    }
                } else {
                    with_unknown_fields(field);
                }
            }
            map.insert("added_in_a_later_version".to_owned(), json!({"x": [1]}));
        }
        Value::Array(items) => items.iter_mut().for_each(with_unknown_fields),
        _ => {}
    }
}

/// Serialises `value`, adds unknown fields at the top level, and reads it back as `T`: the
/// tolerant-reader rule of `/v1` (fields are added within a version, never removed).
fn tolerates<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut json = serde_json::to_value(value).unwrap();
    json.as_object_mut()
        .expect("a response is an object")
        .insert("added_in_a_later_version".to_owned(), json!({"x": [1]}));
    let back: T = serde_json::from_value(json).unwrap_or_else(|e| {
        panic!(
            "{} refuses an unknown field: {e}",
            std::any::type_name::<T>()
        )
    });
    assert_eq!(&back, value);
}

/// Every response body type of both APIs reads an answer that carries fields it does not know,
/// so a newer server never breaks an older client (or balancer, or metering server).
#[test]
fn response_types_ignore_unknown_fields() {
    use allot_core::domain::*;
    use allot_core::error::ErrorBody;
    use allot_core::wire::Health;
    use allot_core::wire::agent::*;
    use allot_core::wire::balancer::*;
    let t = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
    let policy = Policy::default();
    let product = Product {
        name: "cad".into(),
        publisher: None,
        version: None,
        policy: policy.clone(),
        purchased: 1,
        reserve: 1,
        in_transit: 0,
        allocated: 0,
        created_at: t,
    };
    let cell = AllocationView {
        server: "s".into(),
        site: "hq".into(),
        state: ServerState::Active,
        allocation: 1,
        in_use: Some(0),
        min_units: 0,
        buffer_units: 0,
        generation: 1,
    };
    let server = Server {
        name: "s".into(),
        url: "http://x".into(),
        site: "hq".into(),
        state: ServerState::Active,
        created_at: t,
        last_seen_at: None,
        previous_token_until: Some(t),
    };
    let mv = MoveView {
        id: uuid::Uuid::nil(),
        product: "cad".into(),
        server: "s".into(),
        kind: MoveKind::Grant,
        units: 1,
        state: MoveState::Applied,
        applied_units: Some(1),
    };
    let run = RunSummary {
        id: 1,
        trigger: RunTrigger::Manual,
        status: "ok".into(),
        started_at: t,
        finished_at: Some(t),
        servers_queried: 1,
        servers_unreachable: 0,
        moves: 1,
        units_moved: 1,
        unserved_true: 0,
        unserved_false: 0,
        ping_pong_units: 0,
        errors: vec![],
    };
    let explained = ExplainedCell {
        server: "s".into(),
        allocation: 2,
        in_use: 1,
        waiting: 0,
        min_units: 0,
        buffer_units: 1,
        peak_in_use: 1,
        denials: 0,
        level: 1,
        forecast: 1,
        window_peak: Some(1),
        held: false,
        need: 1,
        want: 2,
        fair_share: 2,
        target: 2,
        decision: "steady".into(),
    };
    let counters = UsageCounters::default();
    tolerates(&Health {
        status: "ok".into(),
        leader: true,
        version: "9.9.9".into(),
        shards: vec![0],
    });
    tolerates(&ErrorBody::new(allot_core::ErrorCode::Conflict, "no"));
    tolerates(&product);
    tolerates(&ProductDetail {
        product: product.clone(),
        servers: vec![cell.clone()],
    });
    tolerates(&cell);
    tolerates(&List {
        items: vec![product.clone()],
    });
    tolerates(&Entitlement {
        id: 1,
        product: "cad".into(),
        units: 1,
        retired_units: 0,
        expires_at: None,
        reference: None,
        created_at: t,
        created_by: "admin".into(),
    });
    tolerates(&server);
    tolerates(&RegisteredServer {
        server: server.clone(),
        token: "t".into(),
    });
    tolerates(&RotatedToken {
        server: server.clone(),
        token: "t".into(),
    });
    tolerates(&Schedule {
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        next_runs: vec![t],
    });
    tolerates(&AuditEntry {
        id: 1,
        at: t,
        actor: "admin".into(),
        action: "a".into(),
        target: "b".into(),
        before: None,
        after: Some(json!({"k": 1})),
    });
    tolerates(&mv);
    tolerates(&run);
    tolerates(&RunDetail {
        run: run.clone(),
        move_log: vec![mv.clone()],
        decisions: vec![RunDecision {
            product: "cad".into(),
            cell: explained.clone(),
        }],
    });
    tolerates(&DoctorReport {
        ok: true,
        products: vec![DoctorProduct {
            product: "cad".into(),
            purchased: 1,
            reserve: 1,
            in_transit: 0,
            allocated: 0,
            servers: vec![DoctorCell {
                server: "s".into(),
                store_allocation: 0,
                store_generation: 0,
                server_allocation: None,
                server_generation: None,
                in_use: None,
            }],
        }],
        discrepancies: vec![],
        unreachable: vec![],
        unfinished_moves: vec![mv.clone()],
    });
    tolerates(&SyncResponse {
        server: "s".into(),
        lease_seconds: 60,
        products: vec![SyncProduct {
            name: "cad".into(),
            policy: policy.clone(),
        }],
        allocations: vec![SyncAllocation {
            product: "cad".into(),
            units: 1,
            generation: 1,
        }],
        reset: false,
    });
    tolerates(&InstantBalanceResponse {
        request_id: uuid::Uuid::nil(),
        product: "cad".into(),
        granted: 1,
        allocation: 1,
        free_elsewhere: Some(false),
    });
    tolerates(&History {
        from: t,
        to: t,
        step_seconds: 3600,
        series: vec![],
    });
    tolerates(&CheckoutResponse {
        handle: "h".into(),
        units: 1,
        heartbeat_seconds: 60,
        overdraft: false,
    });
    tolerates(&HandleResponse {
        handle: "h".into(),
        staleout_in_seconds: 1,
        notice: Some("idle".into()),
        idle_revoke_in_seconds: Some(5),
    });
    tolerates(&AgentProducts {
        products: vec![AgentProduct {
            product: "cad".into(),
            allocated: 1,
            in_use: 0,
            free: 1,
            waiting: 0,
            policy: policy.clone(),
        }],
    });
    tolerates(&AgentStatus {
        server: "s".into(),
        products: vec![ProductStatus {
            product: "cad".into(),
            allocation: 1,
            generation: 1,
            in_use: 0,
            reserved: 1,
            waiting: 0,
            since_last: counters.clone(),
            totals: counters,
        }],
    });
    tolerates(&MoveResponse {
        move_id: uuid::Uuid::nil(),
        units: 1,
        allocation: 1,
        generation: 1,
    });
    tolerates(&policy);
}

/// A newer balancer's ACL rule an older metering server does not know fails its sync rather
/// than being dropped: dropping it would grant checkouts the policy denies.
#[test]
fn an_acl_rule_a_server_cannot_enforce_is_refused_not_dropped() {
    let answer = json!({
        "server": "s1", "lease_seconds": 60, "allocations": [], "reset": false,
        "products": [{"name": "cad", "policy": {"enforcement": "hard_stop", "seat": "concurrent",
            "heartbeat_seconds": 60, "staleout_seconds": 300,
            "acl": {"allow_users": ["ann"], "deny_sites": ["contractors"]}}}]
    });
    let error = serde_json::from_value::<allot_core::wire::balancer::SyncResponse>(answer)
        .expect_err("an unenforceable rule is refused");
    assert!(error.to_string().contains("acl.deny_sites"), "{error}");
}

/// The same for the product's options: a newer balancer's option this server does not know is
/// ignored while it is off and refused when it is on, never silently dropped.
#[test]
fn an_option_a_server_cannot_enforce_is_refused_unless_it_is_off() {
    let answer = |options: serde_json::Value| {
        json!({
            "server": "s1", "lease_seconds": 60, "allocations": [], "reset": false,
            "products": [{"name": "cad", "policy": {"enforcement": "hard_stop",
                "seat": "concurrent", "heartbeat_seconds": 60, "staleout_seconds": 300,
                "options": options}}]
        })
    };
    let read = serde_json::from_value::<allot_core::wire::balancer::SyncResponse>(answer(
        json!({"linger_seconds": 30, "max_per_site": 0, "quotas": [], "audit_only": false}),
    ))
    .expect("options that are off are ignored");
    assert_eq!(read.products[0].policy.options.linger_seconds, 30);
    let error = serde_json::from_value::<allot_core::wire::balancer::SyncResponse>(answer(
        json!({"linger_seconds": 30, "max_per_site": 2}),
    ))
    .expect_err("an option this server cannot enforce is refused");
    assert!(
        error.to_string().contains("options.max_per_site"),
        "{error}"
    );
}

/// Unknown fields anywhere in a real answer — not only at the top — are ignored by the typed
/// clients, read from a live balancer and metering server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_with_unknown_fields_anywhere_still_parse() {
    let backend = Backend::sqlite();
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    api.post(
        "/v1/products",
        json!({"name": "cad", "acl": {"allow_users": ["ann"]}}),
    )
    .await;
    api.post("/v1/products/cad/entitlements", json!({"units": 3}))
        .await;
    let mut detail = api.get("/v1/products/cad").await;
    with_unknown_fields(&mut detail);
    let _: allot_core::wire::balancer::ProductDetail =
        serde_json::from_value(detail).expect("a ProductDetail with unknown fields");
    let mut health = api.get("/healthz").await;
    with_unknown_fields(&mut health);
    let _: allot_core::wire::Health = serde_json::from_value(health).unwrap();
    let (status, _) = api.send(Method::GET, "/v2/products", None).await;
    assert_eq!(status, 404, "the API is versioned: /v2 is not /v1");
    // A metering server of another version syncs: the version it states is for the log only.
    let registered = api
        .post(
            "/v1/servers",
            json!({"name": "s1", "url": "http://127.0.0.1:1", "site": "hq"}),
        )
        .await;
    let server = api.with_token(registered["token"].as_str());
    for version in ["0.0.1", "99.0.0-from-the-future"] {
        let (status, answer) = server
            .send(Method::POST, "/v1/sync", Some(json!({"version": version})))
            .await;
        assert_eq!(status, 200, "{version}: {answer}");
        let _: allot_core::wire::balancer::SyncResponse =
            serde_json::from_value(answer).expect("a SyncResponse");
    }
}

/// Request types still refuse unknown fields at the edge, so a field added by a newer client is
/// an error an operator sees, never a setting silently ignored.
#[test]
fn request_types_refuse_unknown_fields() {
    use allot_core::wire::agent::*;
    use allot_core::wire::balancer::*;
    fn refuses<T: serde::de::DeserializeOwned>(valid: Value) {
        let mut json = valid.clone();
        serde_json::from_value::<T>(json.clone()).expect("the valid form parses");
        json.as_object_mut()
            .unwrap()
            .insert("added_in_a_later_version".to_owned(), json!(1));
        assert!(
            serde_json::from_value::<T>(json).is_err(),
            "{} accepted an unknown field",
            std::any::type_name::<T>()
        );
    }
    refuses::<CreateProduct>(json!({"name": "cad"}));
    refuses::<AddEntitlement>(json!({"units": 1}));
    refuses::<RegisterServer>(json!({"name": "s", "url": "http://x", "site": "hq"}));
    refuses::<SetAllocation>(json!({"min_units": 0, "buffer_units": 0}));
    refuses::<SetSchedule>(json!({"cron": "* * * * *"}));
    refuses::<BalanceRequest>(json!({}));
    refuses::<SyncRequest>(json!({"version": "1"}));
    refuses::<InstantBalanceRequest>(
        json!({"request_id": uuid::Uuid::nil(), "product": "cad", "units": 1}),
    );
    refuses::<CheckoutRequest>(json!({"product": "cad", "user": "u", "host": "h"}));
    refuses::<HandleRequest>(json!({"handle": "h"}));
    refuses::<MoveRequest>(json!({"move_id": uuid::Uuid::nil(), "product": "cad", "units": 1}));
    refuses::<ProductDefinition>(json!({}));
    refuses::<allot_core::domain::Acl>(json!({}));
}

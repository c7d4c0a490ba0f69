//! The store conformance suite: every case runs against SQLite and against PostgreSQL (a fresh
//! database per test), so both backends keep exactly the same behaviour.

use allot_balancer::store::{
    self, AuditQuery, CellAccounting, EstateTotal, Fence, HistoryBucket, HistoryQuery, InstantLog,
    InstantRecord, InstantStart, LandedMove, MoveRecord, NewMove, RunOutcome, RunsQuery,
    ScheduleSetting, Store, StoreError, UsageSample,
};
use allot_core::domain::{MoveKind, MoveState, RunTrigger, ServerState};
use allot_core::shard::shard_of;
use allot_core::wire::balancer::{
    AddEntitlement, CreateProduct, ExplainedCell, RegisterServer, RunDecision, RunSummary,
    SetAllocation,
};
use allot_tests::{Backend, on_both_backends};
use std::sync::Arc;
use uuid::Uuid;

/// Opens (or reopens, to check what survives a restart) the backend's store.
async fn open(backend: &Backend) -> Arc<dyn Store> {
    store::open(backend.database_url.as_deref(), backend.data_dir.path())
        .await
        .expect("open the store")
}

on_both_backends!(
    products_are_created_listed_and_shown,
    duplicate_names_are_conflicts,
    unknown_product_is_reported_by_name,
    entitlements_grow_purchased_and_reserve,
    entitlement_removal_needs_free_units,
    servers_register_drain_and_remove,
    a_rotated_token_keeps_its_predecessor_for_the_grace,
    allocation_limits_create_the_cell_and_are_audited,
    an_act_outside_the_books_is_audited_with_its_detail,
    schedule_has_a_default_and_can_be_replaced,
    grant_travels_through_transit,
    release_returns_only_confirmed_units,
    moves_are_idempotent_and_final,
    moves_that_would_break_the_books_change_nothing,
    batched_moves_are_logged_and_booked_all_or_none,
    a_booking_across_products_books_each_pool,
    a_booking_across_servers_books_each_cell_and_its_generation,
    an_instant_runs_record_and_grant_commit_together,
    an_instant_grant_is_logged_only_while_the_books_are_as_read,
    an_instant_grant_is_booked_with_its_run_and_request_or_not_at_all,
    a_runs_decisions_are_kept_field_for_field,
    some_cells_of_a_product_are_read_again_by_server,
    estate_totals_sum_each_cells_newest_sample_per_site,
    demand_signals_read_positive_peaks_and_each_cells_oldest_sample,
    a_runs_samples_beyond_one_statement_are_all_kept,
    books_survive_a_reopen,
    concurrent_mutations_keep_conservation,
    history_rolls_up_without_losing_the_peak,
    a_deposed_leader_is_fenced,
    each_shard_fences_its_own_products,
);

fn product(name: &str) -> CreateProduct {
    serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
}

fn entitlement(units: u32) -> AddEntitlement {
    AddEntitlement {
        units,
        expires_at: None,
        reference: Some("PO-1".into()),
    }
}

fn server(name: &str) -> RegisterServer {
    RegisterServer {
        name: name.into(),
        url: format!("http://{name}.example:7401"),
        site: "hq".into(),
    }
}

fn new_move(kind: MoveKind, product: &str, server: &str, units: u64) -> NewMove {
    NewMove {
        id: Uuid::new_v4(),
        run_id: None,
        product: product.into(),
        server: server.into(),
        kind,
        units,
        epoch: 0,
    }
}

async fn assert_balanced(store: &dyn Store) {
    for check in store.books().await.unwrap() {
        assert!(
            check.errors().is_empty(),
            "books out of balance: {:?}",
            check.errors()
        );
    }
}

/// A store with product `cad` holding `purchased` units and server `s1` registered.
async fn stocked(backend: &Backend, purchased: u32) -> Arc<dyn Store> {
    let store = open(backend).await;
    store
        .create_product("admin", &product("cad"))
        .await
        .unwrap();
    store
        .add_entitlement("admin", "cad", &entitlement(purchased))
        .await
        .unwrap();
    store
        .register_server("admin", &server("s1"), "salt", "hash-s1")
        .await
        .unwrap();
    store
}

/// Grants `units` of `cad` to `server` and confirms it, as a finished balance would.
async fn grant(store: &dyn Store, server: &str, units: u64) {
    let mv = new_move(MoveKind::Grant, "cad", server, units);
    store.begin_move(&mv).await.unwrap();
    store
        .complete_move(mv.id, units, 1, &Fence::alone())
        .await
        .unwrap();
}

async fn products_are_created_listed_and_shown(backend: Backend) {
    let store = open(&backend).await;
    let mut def = product("matlab");
    def.publisher = Some("MathWorks".into());
    def.staleout_seconds = 900;
    let created = store.create_product("admin", &def).await.unwrap();
    assert_eq!(created.name, "matlab");
    assert_eq!(created.policy.staleout_seconds, 900);
    assert_eq!(
        (created.purchased, created.reserve, created.allocated),
        (0, 0, 0)
    );
    store
        .create_product("admin", &product("ansys"))
        .await
        .unwrap();
    let names: Vec<_> = store
        .products()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["ansys", "matlab"]);
    let detail = store.product("matlab").await.unwrap();
    assert_eq!(detail.product.publisher.as_deref(), Some("MathWorks"));
    assert!(detail.servers.is_empty());
}

async fn duplicate_names_are_conflicts(backend: Backend) {
    let store = open(&backend).await;
    store
        .create_product("admin", &product("cad"))
        .await
        .unwrap();
    let err = store
        .create_product("admin", &product("cad"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    store
        .register_server("admin", &server("s1"), "salt", "h1")
        .await
        .unwrap();
    let err = store
        .register_server("admin", &server("s1"), "salt", "h2")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.products().await.unwrap().len(), 1);
    assert_eq!(store.servers().await.unwrap().len(), 1);
}

async fn unknown_product_is_reported_by_name(backend: Backend) {
    let store = open(&backend).await;
    let err = store
        .add_entitlement("admin", "nope", &entitlement(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownProduct(n) if n == "nope"),
        "{err:?}"
    );
    assert!(matches!(
        store.product("nope").await,
        Err(StoreError::UnknownProduct(_))
    ));
    assert!(matches!(
        store.product_books("nope").await,
        Err(StoreError::UnknownProduct(_))
    ));
    assert!(matches!(
        store.entitlements("nope").await,
        Err(StoreError::UnknownProduct(_))
    ));
}

async fn entitlements_grow_purchased_and_reserve(backend: Backend) {
    let store = open(&backend).await;
    store
        .create_product("admin", &product("cad"))
        .await
        .unwrap();
    let first = store
        .add_entitlement("alice", "cad", &entitlement(10))
        .await
        .unwrap();
    store
        .add_entitlement("alice", "cad", &entitlement(5))
        .await
        .unwrap();
    assert_eq!(first.units, 10);
    assert_eq!(first.created_by, "alice");
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.purchased, p.reserve, p.in_transit), (15, 15, 0));
    assert_eq!(store.entitlements("cad").await.unwrap().len(), 2);
    let audit = store
        .audit(AuditQuery {
            limit: 10,
            before_id: None,
        })
        .await
        .unwrap();
    assert_eq!(audit[0].action, "entitlement.add");
    assert_eq!(audit[0].actor, "alice");
    assert_eq!(audit[0].after.as_ref().unwrap()["units"], 5);
    assert_balanced(&*store).await;
}

async fn entitlement_removal_needs_free_units(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let extra = store
        .add_entitlement("admin", "cad", &entitlement(4))
        .await
        .unwrap();
    grant(&*store, "s1", 12).await;
    // Reserve is 2: the 4-unit entitlement cannot go.
    let err = store
        .remove_entitlement("admin", "cad", extra.id)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.purchased, p.reserve, p.allocated), (14, 2, 12));
    // The books alone, as runs and instant balances reread them, are the same books.
    assert_eq!(store.product_books("cad").await.unwrap(), p);
    assert_eq!(store.entitlements("cad").await.unwrap().len(), 2);
    // Release 2 units: the reserve covers it now.
    let mv = new_move(MoveKind::Release, "cad", "s1", 2);
    store.begin_move(&mv).await.unwrap();
    store
        .complete_move(mv.id, 2, 2, &Fence::alone())
        .await
        .unwrap();
    let removed = store
        .remove_entitlement("admin", "cad", extra.id)
        .await
        .unwrap();
    assert_eq!(removed.units, 4);
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.purchased, p.reserve, p.allocated), (10, 0, 10));
    assert!(matches!(
        store.remove_entitlement("admin", "cad", extra.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_balanced(&*store).await;
}

async fn servers_register_drain_and_remove(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let found = store
        .server_by_token_hash("hash-s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.name, "s1");
    assert_eq!(found.state, ServerState::Active);
    assert!(store.server_by_token_hash("other").await.unwrap().is_none());
    grant(&*store, "s1", 3).await;
    let drained = store.drain_server("admin", "s1").await.unwrap();
    assert_eq!(drained.state, ServerState::Draining);
    let err = store.remove_server("admin", "s1").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let mv = new_move(MoveKind::Release, "cad", "s1", 3);
    store.begin_move(&mv).await.unwrap();
    store
        .complete_move(mv.id, 3, 2, &Fence::alone())
        .await
        .unwrap();
    store.remove_server("admin", "s1").await.unwrap();
    assert!(store.servers().await.unwrap().is_empty());
    assert!(
        store
            .server_by_token_hash("hash-s1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.drain_server("admin", "s1").await,
        Err(StoreError::NotFound(_))
    ));
    // The name is free again (the old row stays for the move log's history).
    store
        .register_server("admin", &server("s1"), "salt", "hash-s1-new")
        .await
        .unwrap();
    assert_balanced(&*store).await;
}

async fn a_rotated_token_keeps_its_predecessor_for_the_grace(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let rotated = store
        .rotate_server_token("alice", "s1", "salt-2", "hash-s1-2", Some(until))
        .await
        .unwrap();
    assert_eq!(rotated.token_salt, "salt-2");
    let previous = rotated
        .previous_token
        .clone()
        .expect("the old token is kept");
    assert_eq!(previous.salt, "salt");
    assert_eq!(previous.until.timestamp_millis(), until.timestamp_millis());
    // Both digests find the server during the grace; the caller checks the grace's end.
    for hash in ["hash-s1", "hash-s1-2"] {
        let found = store.server_by_token_hash(hash).await.unwrap().unwrap();
        assert_eq!(found, rotated, "{hash}");
    }
    let audit = store
        .audit(AuditQuery {
            limit: 1,
            before_id: None,
        })
        .await
        .unwrap();
    assert_eq!(audit[0].action, "server.rotate_token");
    assert_eq!(audit[0].actor, "alice");
    assert_eq!(audit[0].target, "s1");
    assert!(audit[0].after.as_ref().unwrap()["previous_token_until"].is_string());

    // The server presents its new token: the old one is retired, once.
    // A call authenticated with the old token just before the rotation retires nothing.
    assert!(!store.retire_previous_token("s1", "salt").await.unwrap());
    assert!(store.retire_previous_token("s1", "salt-2").await.unwrap());
    assert!(!store.retire_previous_token("s1", "salt-2").await.unwrap());
    assert!(
        store
            .server_by_token_hash("hash-s1")
            .await
            .unwrap()
            .is_none()
    );
    let current = store
        .server_by_token_hash("hash-s1-2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.previous_token, None);

    // Two rotations in a row keep only the latest predecessor; no grace drops it at once.
    store
        .rotate_server_token("alice", "s1", "salt-3", "hash-s1-3", Some(until))
        .await
        .unwrap();
    store
        .rotate_server_token("alice", "s1", "salt-4", "hash-s1-4", Some(until))
        .await
        .unwrap();
    assert!(
        store
            .server_by_token_hash("hash-s1-2")
            .await
            .unwrap()
            .is_none()
    );
    let found = store
        .server_by_token_hash("hash-s1-3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.previous_token.unwrap().salt, "salt-3");
    let revoked = store
        .rotate_server_token("alice", "s1", "salt-5", "hash-s1-5", None)
        .await
        .unwrap();
    assert_eq!(revoked.previous_token, None);
    assert!(
        store
            .server_by_token_hash("hash-s1-4")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store
            .rotate_server_token("alice", "nobody", "s", "h", None)
            .await,
        Err(StoreError::NotFound(_))
    ));
    // Survives a reopen.
    store.close().await;
    let store = open(&backend).await;
    let found = store
        .server_by_token_hash("hash-s1-5")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.token_salt, "salt-5");
    assert_balanced(&*store).await;
}

async fn an_act_outside_the_books_is_audited_with_its_detail(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let detail = serde_json::json!({"server": "s1", "user": "ann", "reason": "licence audit"});
    store
        .record_audit("admin", "checkout.revoke", "co_0123", &detail)
        .await
        .unwrap();
    let audit = store
        .audit(AuditQuery {
            limit: 1,
            before_id: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (
            audit[0].actor.as_str(),
            audit[0].action.as_str(),
            audit[0].target.as_str()
        ),
        ("admin", "checkout.revoke", "co_0123")
    );
    assert!(audit[0].before.is_none());
    assert_eq!(audit[0].after.as_ref(), Some(&detail));
    assert_balanced(&*store).await;
}

async fn allocation_limits_create_the_cell_and_are_audited(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let limits = SetAllocation {
        min_units: 2,
        buffer_units: 3,
    };
    let view = store
        .set_allocation_limits("bob", "s1", "cad", &limits)
        .await
        .unwrap();
    assert_eq!(
        (view.allocation, view.min_units, view.buffer_units),
        (0, 2, 3)
    );
    let again = SetAllocation {
        min_units: 4,
        buffer_units: 1,
    };
    store
        .set_allocation_limits("bob", "s1", "cad", &again)
        .await
        .unwrap();
    let detail = store.product("cad").await.unwrap();
    assert_eq!(detail.servers.len(), 1);
    assert_eq!(detail.servers[0].min_units, 4);
    assert_eq!(detail.servers[0].site, "hq");
    let audit = store
        .audit(AuditQuery {
            limit: 1,
            before_id: None,
        })
        .await
        .unwrap();
    assert_eq!(audit[0].action, "allocation.set");
    assert_eq!(audit[0].target, "s1/cad");
    assert_eq!(audit[0].before.as_ref().unwrap()["min_units"], 2);
    assert_eq!(audit[0].after.as_ref().unwrap()["min_units"], 4);
    let older = store
        .audit(AuditQuery {
            limit: 100,
            before_id: Some(audit[0].id),
        })
        .await
        .unwrap();
    assert!(older.iter().all(|e| e.id < audit[0].id));
    assert!(matches!(
        store
            .set_allocation_limits("bob", "ghost", "cad", &limits)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn schedule_has_a_default_and_can_be_replaced(backend: Backend) {
    let store = open(&backend).await;
    let default = store.schedule().await.unwrap();
    assert_eq!(default.cron, "*/15 * * * *");
    assert_eq!(default.timezone, "UTC");
    let new = ScheduleSetting {
        cron: "0 6-18 * * 1-5".into(),
        timezone: "Europe/Paris".into(),
    };
    store.set_schedule("admin", &new).await.unwrap();
    assert_eq!(store.schedule().await.unwrap(), new);
    let audit = store
        .audit(AuditQuery {
            limit: 1,
            before_id: None,
        })
        .await
        .unwrap();
    assert_eq!(audit[0].action, "schedule.set");
}

async fn grant_travels_through_transit(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let mv = new_move(MoveKind::Grant, "cad", "s1", 4);
    let planned = store.begin_move(&mv).await.unwrap();
    assert_eq!(planned.state, MoveState::Planned);
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (6, 4, 0));
    assert_eq!(store.unfinished_moves().await.unwrap(), vec![planned]);
    assert_balanced(&*store).await;
    let applied = store
        .complete_move(mv.id, 4, 7, &Fence::alone())
        .await
        .unwrap();
    assert_eq!(applied.state, MoveState::Applied);
    let detail = store.product("cad").await.unwrap();
    assert_eq!((detail.product.reserve, detail.product.in_transit), (6, 0));
    assert_eq!(detail.servers[0].allocation, 4);
    assert_eq!(detail.servers[0].generation, 7);
    assert!(store.unfinished_moves().await.unwrap().is_empty());
    // Abandoning a planned grant puts its units back.
    let mv = new_move(MoveKind::Grant, "cad", "s1", 5);
    store.begin_move(&mv).await.unwrap();
    let abandoned = store
        .abandon_move(mv.id, "server never saw it", &Fence::alone())
        .await
        .unwrap();
    assert_eq!(abandoned.state, MoveState::Abandoned);
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (6, 0, 4));
    assert_balanced(&*store).await;
}

async fn release_returns_only_confirmed_units(backend: Backend) {
    let store = stocked(&backend, 10).await;
    grant(&*store, "s1", 8).await;
    let mv = new_move(MoveKind::Release, "cad", "s1", 5);
    store.begin_move(&mv).await.unwrap();
    // Logged but unconfirmed: nothing moves yet.
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.allocated), (2, 8));
    // The server had only 3 free units.
    let done = store
        .complete_move(mv.id, 3, 9, &Fence::alone())
        .await
        .unwrap();
    assert_eq!(done.applied_units, Some(3));
    let detail = store.product("cad").await.unwrap();
    assert_eq!(
        (detail.product.reserve, detail.servers[0].allocation),
        (5, 5)
    );
    // A release that claims more than asked is refused.
    let mv = new_move(MoveKind::Release, "cad", "s1", 1);
    store.begin_move(&mv).await.unwrap();
    assert!(matches!(
        store.complete_move(mv.id, 2, 10, &Fence::alone()).await,
        Err(StoreError::Conflict(_))
    ));
    assert_balanced(&*store).await;
}

async fn moves_are_idempotent_and_final(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let mv = new_move(MoveKind::Grant, "cad", "s1", 4);
    store.begin_move(&mv).await.unwrap();
    let first = store
        .complete_move(mv.id, 4, 1, &Fence::alone())
        .await
        .unwrap();
    let second = store
        .complete_move(mv.id, 4, 1, &Fence::alone())
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(store.product("cad").await.unwrap().servers[0].allocation, 4);
    assert!(matches!(
        store.abandon_move(mv.id, "late", &Fence::alone()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.begin_move(&mv).await,
        Err(StoreError::Conflict(_))
    ));
    let dropped = new_move(MoveKind::Grant, "cad", "s1", 1);
    store.begin_move(&dropped).await.unwrap();
    store
        .abandon_move(dropped.id, "x", &Fence::alone())
        .await
        .unwrap();
    store
        .abandon_move(dropped.id, "x", &Fence::alone())
        .await
        .unwrap();
    assert!(matches!(
        store.complete_move(dropped.id, 1, 2, &Fence::alone()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .complete_move(Uuid::new_v4(), 1, 1, &Fence::alone())
            .await,
        Err(StoreError::NotFound(_))
    ));
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (6, 0, 4));
    assert_balanced(&*store).await;
}

async fn moves_that_would_break_the_books_change_nothing(backend: Backend) {
    let store = stocked(&backend, 5).await;
    let before = store.books().await.unwrap();
    let too_big = new_move(MoveKind::Grant, "cad", "s1", 6);
    assert!(matches!(
        store.begin_move(&too_big).await,
        Err(StoreError::Conflict(_))
    ));
    let unheld = new_move(MoveKind::Release, "cad", "s1", 1);
    assert!(matches!(
        store.begin_move(&unheld).await,
        Err(StoreError::Conflict(_))
    ));
    let ghost = new_move(MoveKind::Grant, "cad", "ghost", 1);
    assert!(matches!(
        store.begin_move(&ghost).await,
        Err(StoreError::NotFound(_))
    ));
    let zero = new_move(MoveKind::Grant, "cad", "s1", 0);
    assert!(matches!(
        store.begin_move(&zero).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.books().await.unwrap(), before);
    assert!(store.unfinished_moves().await.unwrap().is_empty());
}

/// A run reads again only the cells that changed since its read: by server, the same records
/// as the whole product's read, none for a server without a cell or unknown.
async fn some_cells_of_a_product_are_read_again_by_server(backend: Backend) {
    let store = stocked(&backend, 10).await;
    for name in ["s2", "s3"] {
        store
            .register_server("admin", &server(name), "salt", &format!("hash-{name}"))
            .await
            .unwrap();
    }
    grant(&*store, "s1", 2).await;
    grant(&*store, "s3", 3).await;
    let all = store.product_cells("cad").await.unwrap();
    let wanted: Vec<String> = ["s3", "s1", "s2", "ghost"].map(String::from).to_vec();
    let some = store.product_cells_of("cad", &wanted).await.unwrap();
    let expected: Vec<_> = all
        .iter()
        .filter(|c| c.server == "s1" || c.server == "s3")
        .cloned()
        .collect();
    assert_eq!(some, expected);
    assert!(
        store
            .product_cells_of("cad", &["s2".to_owned()])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .product_cells_of("nope", &wanted)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The instant balances' runs, newest first.
async fn instant_runs(store: &dyn Store) -> Vec<RunSummary> {
    store
        .runs(&RunsQuery {
            limit: 10,
            before_id: None,
            trigger: Some(RunTrigger::Instant),
            since_ms: None,
        })
        .await
        .unwrap()
}

/// A move that must be refused, and how.
type Refusal = (NewMove, fn(&StoreError) -> bool);

/// The refusals every way of logging an instant balance's single grant shares: a server or a
/// product that does not exist, and a grant of nothing.
fn single_grant_refusals() -> Vec<Refusal> {
    vec![
        (new_move(MoveKind::Grant, "cad", "ghost", 1), |e| {
            matches!(e, StoreError::NotFound(_))
        }),
        (new_move(MoveKind::Grant, "nope", "s1", 1), |e| {
            matches!(e, StoreError::UnknownProduct(_))
        }),
        (new_move(MoveKind::Grant, "cad", "s1", 0), |e| {
            matches!(e, StoreError::Conflict(_))
        }),
    ]
}

/// Books an instant balance's grant of `units` of `cad` to `s1` as its server applied it, and
/// closes its run with request `request` answered in full; returns the request's record.
async fn answer_instant(
    store: &dyn Store,
    run_id: i64,
    grant: Uuid,
    units: u64,
    request: Uuid,
) -> InstantRecord {
    store
        .complete_move(grant, units, 1, &Fence::alone())
        .await
        .unwrap();
    let answered = InstantRecord {
        server: "s1".into(),
        product: "cad".into(),
        units,
        granted: units,
    };
    let outcome = RunOutcome {
        status: "ok".into(),
        moves: 1,
        units_moved: units,
        ..RunOutcome::default()
    };
    store
        .finish_instant_run(run_id, &outcome, Some((request, &answered)))
        .await
        .unwrap();
    answered
}

/// An instant balance's run opened with a grant of `units` of `cad` to `s1` from the reserve:
/// the run's id, the grant and what was logged.
async fn instant_run_with_grant(store: &dyn Store, units: u64) -> (i64, NewMove, Vec<MoveRecord>) {
    let grant = new_move(MoveKind::Grant, "cad", "s1", units);
    let (run_id, logged) = store
        .begin_run_with_moves(
            RunTrigger::Instant,
            &Fence::alone(),
            std::slice::from_ref(&grant),
        )
        .await
        .unwrap();
    (run_id, grant, logged)
}

/// An instant balance planned from the reserve as last seen logs its run and grant only while
/// the reserve is still that and its request has no record; otherwise nothing is logged and
/// the books are returned as they stand. Refusals (a ghost server, an unknown product, zero
/// units) are refused as by `begin_run_with_moves`, and leave no run.
async fn an_instant_grant_is_logged_only_while_the_books_are_as_read(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let before = store.books().await.unwrap();
    let request = Uuid::new_v4();
    let grant = new_move(MoveKind::Grant, "cad", "s1", 3);
    // A reserve other than the one read (10): nothing logged, the reserve as it stands.
    for stale in [9, 11, 0] {
        let moved = store
            .log_instant_grant(&Fence::alone(), &grant, request, stale)
            .await
            .unwrap();
        assert_eq!(
            moved,
            InstantLog::Moved(InstantStart {
                answered: None,
                reserve: 10
            }),
            "as read {stale}"
        );
    }
    let beyond_the_reserve: Refusal = (new_move(MoveKind::Grant, "cad", "s1", 11), |e| {
        matches!(e, StoreError::Conflict(_))
    });
    for (refused, is_expected) in single_grant_refusals()
        .into_iter()
        .chain([beyond_the_reserve])
    {
        let result = store
            .log_instant_grant(&Fence::alone(), &refused, request, 10)
            .await;
        assert!(
            result.as_ref().is_err_and(is_expected),
            "{refused:?}: {result:?}"
        );
    }
    assert!(instant_runs(&*store).await.is_empty());
    assert_eq!(store.books().await.unwrap(), before);

    // As read: the run and the grant, in transit.
    let InstantLog::Logged(run_id, logged) = store
        .log_instant_grant(&Fence::alone(), &grant, request, 10)
        .await
        .unwrap()
    else {
        panic!("the books were as read");
    };
    assert_eq!(
        (logged.id, logged.run_id, logged.units),
        (grant.id, Some(run_id), 3)
    );
    assert_eq!(logged.state, MoveState::Planned);
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit), (7, 3));
    let opened = instant_runs(&*store).await;
    assert_eq!((opened.len(), opened[0].id), (1, run_id));
    assert_eq!(opened[0].status, "running");
    assert_balanced(&*store).await;
    // The same move again is a conflict, and logs nothing more.
    assert!(matches!(
        store
            .log_instant_grant(&Fence::alone(), &grant, Uuid::new_v4(), 7)
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Once the request is answered, it is not logged again, even as read.
    let answered = answer_instant(&*store, run_id, grant.id, 3, request).await;
    let again = new_move(MoveKind::Grant, "cad", "s1", 2);
    assert_eq!(
        store
            .log_instant_grant(&Fence::alone(), &again, request, 7)
            .await
            .unwrap(),
        InstantLog::Moved(InstantStart {
            answered: Some(answered),
            reserve: 7
        })
    );
    assert_eq!(instant_runs(&*store).await.len(), 1);
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit), (7, 0));
    assert_balanced(&*store).await;
}

/// An instant balance's run opens with its grant from the reserve in one transaction (a
/// refused grant leaves no run behind), and closes with the answered request in another.
async fn an_instant_runs_record_and_grant_commit_together(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let before = store.books().await.unwrap();
    assert!(matches!(
        store
            .begin_run_with_moves(
                RunTrigger::Instant,
                &Fence::alone(),
                &[new_move(MoveKind::Grant, "cad", "s1", 11)],
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    // Refused like any move, a single grant (logged by one statement on PostgreSQL) leaves
    // neither a run nor a change behind.
    for (refused, is_expected) in single_grant_refusals() {
        let result = store
            .begin_run_with_moves(
                RunTrigger::Instant,
                &Fence::alone(),
                std::slice::from_ref(&refused),
            )
            .await;
        assert!(
            result.as_ref().is_err_and(is_expected),
            "{refused:?}: {result:?}"
        );
    }
    assert!(instant_runs(&*store).await.is_empty());
    assert_eq!(store.books().await.unwrap(), before);

    let (run_id, grant, logged) = instant_run_with_grant(&*store, 4).await;
    // The same move id again is a conflict, and logs nothing more.
    let logged_again = store
        .begin_run_with_moves(
            RunTrigger::Instant,
            &Fence::alone(),
            std::slice::from_ref(&grant),
        )
        .await;
    assert!(
        matches!(logged_again, Err(StoreError::Conflict(_))),
        "{logged_again:?}"
    );
    assert_eq!(instant_runs(&*store).await.len(), 1);
    assert_eq!(logged.len(), 1);
    assert_eq!((logged[0].id, logged[0].run_id), (grant.id, Some(run_id)));
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit), (6, 4));
    let opened = instant_runs(&*store).await;
    assert_eq!((opened.len(), opened[0].id), (1, run_id));
    assert_eq!(opened[0].status, "running");
    assert_balanced(&*store).await;

    let request = Uuid::new_v4();
    let answered = answer_instant(&*store, run_id, grant.id, 4, request).await;
    assert_eq!(
        store.instant_start(request, "cad").await.unwrap().answered,
        Some(answered.clone())
    );
    // An instant balance's first read: the record and the reserve by one statement; a request
    // never answered has none; an unknown product is refused.
    let p = store.product("cad").await.unwrap().product;
    let start = store.instant_start(request, "cad").await.unwrap();
    assert_eq!((start.answered, start.reserve), (Some(answered), p.reserve));
    let fresh = store.instant_start(Uuid::new_v4(), "cad").await.unwrap();
    assert_eq!((fresh.answered, fresh.reserve), (None, p.reserve));
    assert!(matches!(
        store.instant_start(request, "nope").await,
        Err(StoreError::UnknownProduct(n)) if n == "nope"
    ));
    let closed = &instant_runs(&*store).await[0];
    assert_eq!(
        (closed.status.as_str(), closed.moves, closed.units_moved),
        ("ok", 1, 4)
    );
    assert!(closed.finished_at.is_some());

    // An unsettled outcome closes the run alone (a retry of its request is served anew).
    let (unsettled, none) = store
        .begin_run_with_moves(RunTrigger::Instant, &Fence::alone(), &[])
        .await
        .unwrap();
    assert!(none.is_empty());
    store
        .finish_instant_run(
            unsettled,
            &RunOutcome {
                status: "partial".into(),
                moves: 1,
                units_moved: 4,
                ..RunOutcome::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(instant_runs(&*store).await[0].status, "partial");
}

/// An instant balance the reserve covers books its grant, closes its run and records its
/// request in one commit, the allocation then as booked; a refused booking (the server
/// applied fewer units than sent) writes none of the three.
async fn an_instant_grant_is_booked_with_its_run_and_request_or_not_at_all(backend: Backend) {
    let store = stocked(&backend, 10).await;
    grant(&*store, "s1", 2).await;
    let outcome = RunOutcome {
        status: "ok".into(),
        moves: 1,
        units_moved: 3,
        ping_pong_units: 1,
        ..RunOutcome::default()
    };
    let answered = InstantRecord {
        server: "s1".into(),
        product: "cad".into(),
        units: 3,
        granted: 3,
    };
    let landed = |id: Uuid, applied_units: u64| LandedMove {
        id,
        applied_units,
        generation: 2,
    };

    // Refused: two of three units applied is not a grant the books can take.
    let (refused_run, refused, _) = instant_run_with_grant(&*store, 3).await;
    let before = store.books().await.unwrap();
    let request = Uuid::new_v4();
    assert!(matches!(
        store
            .complete_instant_grant(
                landed(refused.id, 2),
                &Fence::alone(),
                refused_run,
                &outcome,
                (request, &answered),
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.books().await.unwrap(), before);
    assert_eq!(
        store.instant_start(request, "cad").await.unwrap().answered,
        None
    );
    assert_eq!(store.run(refused_run).await.unwrap().run.status, "running");
    assert_eq!(
        store.unfinished_moves().await.unwrap()[0].state,
        MoveState::Planned
    );
    store
        .abandon_move(refused.id, "test", &Fence::alone())
        .await
        .unwrap();

    // Booked: the allocation is the books' 2 and the 3 granted. Under a fence whose epoch is
    // not the shard's, nothing is booked (one statement on PostgreSQL, fenced alike).
    let (run_id, grant, _) = instant_run_with_grant(&*store, 3).await;
    let before = store.books().await.unwrap();
    assert!(matches!(
        store
            .complete_instant_grant(
                landed(grant.id, 3),
                &Fence::new(1, [(0, 7)].into()),
                run_id,
                &outcome,
                (request, &answered),
            )
            .await,
        Err(StoreError::Fenced {
            epoch: 7,
            current: 0
        })
    ));
    assert_eq!(store.books().await.unwrap(), before);
    assert_eq!(store.run(run_id).await.unwrap().run.status, "running");
    let booked = store
        .complete_instant_grant(
            landed(grant.id, 3),
            &Fence::alone(),
            run_id,
            &outcome,
            (request, &answered),
        )
        .await
        .unwrap();
    let expected = MoveRecord {
        id: grant.id,
        run_id: Some(run_id),
        product: "cad".into(),
        server: "s1".into(),
        kind: MoveKind::Grant,
        units: 3,
        state: MoveState::Applied,
        applied_units: Some(3),
        epoch: 0,
    };
    assert_eq!(booked, expected);
    let cells = store.product_cells("cad").await.unwrap();
    let s1 = cells.iter().find(|c| c.server == "s1").unwrap();
    assert_eq!((s1.units, s1.generation), (5, 2));
    // A repeat books nothing more and answers the same.
    let booked_books = store.books().await.unwrap();
    let again = store
        .complete_instant_grant(
            landed(grant.id, 3),
            &Fence::alone(),
            run_id,
            &outcome,
            (request, &answered),
        )
        .await
        .unwrap();
    assert_eq!(again, expected);
    assert_eq!(store.books().await.unwrap(), booked_books);
    assert_eq!(
        store.instant_start(request, "cad").await.unwrap().answered,
        Some(answered)
    );
    let run = store.run(run_id).await.unwrap().run;
    assert_eq!(
        (
            run.status.as_str(),
            run.moves,
            run.units_moved,
            run.ping_pong_units
        ),
        ("ok", 1, 3, 1)
    );
    assert!(run.finished_at.is_some());
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit), (5, 0));
    assert!(store.unfinished_moves().await.unwrap().is_empty());
    assert_balanced(&*store).await;
}

/// A run's decisions come back as recorded, every field (a window peak or none, held or not),
/// whichever way the backend writes them (PostgreSQL one array per column, SQLite rows).
async fn a_runs_decisions_are_kept_field_for_field(backend: Backend) {
    let store = stocked(&backend, 10).await;
    store
        .register_server("admin", &server("s2"), "salt", "hash-s2")
        .await
        .unwrap();
    let run_id = store
        .begin_run(RunTrigger::Manual, &Fence::alone())
        .await
        .unwrap();
    let decision = |server: &str, n: u64, window_peak: Option<u64>, held: bool| RunDecision {
        product: "cad".into(),
        cell: ExplainedCell {
            server: server.into(),
            allocation: n,
            in_use: n + 1,
            waiting: n + 2,
            min_units: n + 3,
            buffer_units: n + 4,
            peak_in_use: n + 5,
            denials: n + 6,
            level: n + 7,
            forecast: n + 8,
            window_peak,
            held,
            need: n + 9,
            want: n + 10,
            fair_share: n + 11,
            target: n + 12,
            decision: format!("rule-{n}"),
        },
    };
    let recorded = vec![
        decision("s1", 10, Some(99), true),
        decision("s2", 20, None, false),
    ];
    store
        .record_decisions(run_id, 1_000, &recorded)
        .await
        .unwrap();
    let mut read = store.run(run_id).await.unwrap().decisions;
    read.sort_by(|a, b| a.cell.server.cmp(&b.cell.server));
    assert_eq!(read, recorded);
}

async fn batched_moves_are_logged_and_booked_all_or_none(backend: Backend) {
    let store = stocked(&backend, 10).await;
    store
        .register_server("admin", &server("s2"), "salt", "hash-s2")
        .await
        .unwrap();
    // One bad move (more than the reserve holds) refuses the whole batch: nothing logged.
    let before = store.books().await.unwrap();
    let batch = [
        new_move(MoveKind::Grant, "cad", "s1", 4),
        new_move(MoveKind::Grant, "cad", "s2", 7),
    ];
    assert!(matches!(
        store.begin_moves(&batch).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.books().await.unwrap(), before);
    assert!(store.unfinished_moves().await.unwrap().is_empty());

    // A good batch: both logged, the reserve in transit.
    let batch = [
        new_move(MoveKind::Grant, "cad", "s1", 4),
        new_move(MoveKind::Grant, "cad", "s2", 5),
    ];
    let logged = store.begin_moves(&batch).await.unwrap();
    assert_eq!(logged.len(), 2);
    assert!(logged.iter().all(|m| m.state == MoveState::Planned));
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (1, 9, 0));
    assert_balanced(&*store).await;

    // Booking with one unknown move refuses the whole booking; then the good ones book.
    let landed = |mv: &NewMove| LandedMove {
        id: mv.id,
        applied_units: mv.units,
        generation: 1,
    };
    let with_ghost = [
        landed(&batch[0]),
        LandedMove {
            id: Uuid::new_v4(),
            applied_units: 1,
            generation: 1,
        },
    ];
    assert!(
        store
            .complete_moves(&with_ghost, &Fence::alone())
            .await
            .is_err()
    );
    assert_eq!(store.unfinished_moves().await.unwrap().len(), 2);
    let both = [landed(&batch[0]), landed(&batch[1])];
    let booked = store.complete_moves(&both, &Fence::alone()).await.unwrap();
    assert!(booked.iter().all(|m| m.state == MoveState::Applied));
    assert_eq!(
        booked.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![batch[0].id, batch[1].id],
        "one record per move, in order"
    );
    // Booked again (an answer resent): the same records, nothing counted twice.
    assert_eq!(
        store.complete_moves(&both, &Fence::alone()).await.unwrap(),
        booked
    );
    assert!(store.unfinished_moves().await.unwrap().is_empty());
    let p = store.product("cad").await.unwrap().product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (1, 0, 9));
    assert_balanced(&*store).await;
}

/// A run's booking group spans products, grants and releases: each product's pool is booked
/// with its own moves (one statement for all of them), and `reserve` reads what the books say.
async fn a_booking_across_products_books_each_pool(backend: Backend) {
    let store = stocked(&backend, 10).await;
    store
        .create_product("admin", &product("cae"))
        .await
        .unwrap();
    store
        .add_entitlement("admin", "cae", &entitlement(6))
        .await
        .unwrap();
    grant(&*store, "s1", 5).await;
    assert_eq!(store.reserve("cad").await.unwrap(), 5);
    assert!(matches!(
        store.reserve("nope").await,
        Err(StoreError::UnknownProduct(_))
    ));
    let batch = [
        new_move(MoveKind::Release, "cad", "s1", 3),
        new_move(MoveKind::Grant, "cad", "s1", 1),
        new_move(MoveKind::Grant, "cae", "s1", 4),
    ];
    store.begin_moves(&batch).await.unwrap();
    assert_eq!(store.reserve("cad").await.unwrap(), 4);
    assert_eq!(store.reserve("cae").await.unwrap(), 2);
    // The release gives back 2 of the 3 asked (a client held one); the grants land whole.
    let landed = [(&batch[0], 2), (&batch[1], 1), (&batch[2], 4)].map(|(mv, units)| LandedMove {
        id: mv.id,
        applied_units: units,
        generation: 3,
    });
    let booked = store
        .complete_moves(&landed, &Fence::alone())
        .await
        .unwrap();
    assert_eq!(
        booked.iter().map(|m| m.applied_units).collect::<Vec<_>>(),
        vec![Some(2), Some(1), Some(4)]
    );
    let cad = store.product("cad").await.unwrap();
    assert_eq!(
        (
            cad.product.reserve,
            cad.product.in_transit,
            cad.product.allocated
        ),
        (6, 0, 4)
    );
    let cae = store.product("cae").await.unwrap();
    assert_eq!(
        (
            cae.product.reserve,
            cae.product.in_transit,
            cae.product.allocated
        ),
        (2, 0, 4)
    );
    assert_eq!(store.reserve("cad").await.unwrap(), cad.product.reserve);
    assert!(store.unfinished_moves().await.unwrap().is_empty());
    assert_balanced(&*store).await;
}

/// A run's booking group spans servers too (all of their cells changed by one statement on
/// PostgreSQL): each cell gets its own change, and its generation rises to the one its server
/// reported but never falls.
async fn a_booking_across_servers_books_each_cell_and_its_generation(backend: Backend) {
    let store = stocked(&backend, 12).await;
    for name in ["s2", "s3"] {
        store
            .register_server("admin", &server(name), "salt", &format!("hash-{name}"))
            .await
            .unwrap();
    }
    grant(&*store, "s1", 5).await;
    let batch = [
        new_move(MoveKind::Release, "cad", "s1", 3),
        new_move(MoveKind::Grant, "cad", "s2", 2),
        new_move(MoveKind::Grant, "cad", "s3", 4),
        new_move(MoveKind::Grant, "cad", "s2", 1),
    ];
    store.begin_moves(&batch).await.unwrap();
    // s1 answers with a generation older than its cell's (1): the cell keeps 1.
    let landed = [
        (&batch[0], 0),
        (&batch[1], 6),
        (&batch[2], 2),
        (&batch[3], 6),
    ]
    .map(|(mv, generation)| LandedMove {
        id: mv.id,
        applied_units: mv.units,
        generation,
    });
    let booked = store
        .complete_moves(&landed, &Fence::alone())
        .await
        .unwrap();
    assert!(booked.iter().all(|m| m.state == MoveState::Applied));
    let detail = store.product("cad").await.unwrap();
    let cells: Vec<(&str, u64, u64)> = detail
        .servers
        .iter()
        .map(|c| (c.server.as_str(), c.allocation, c.generation))
        .collect();
    assert_eq!(cells, vec![("s1", 2, 1), ("s2", 3, 6), ("s3", 4, 2)]);
    let p = detail.product;
    assert_eq!((p.reserve, p.in_transit, p.allocated), (3, 0, 9));
    assert_balanced(&*store).await;
}

async fn estate_totals_sum_each_cells_newest_sample_per_site(backend: Backend) {
    let store = stocked(&backend, 10).await;
    for (name, site) in [("s2", "hq"), ("s3", "lab")] {
        let mut req = server(name);
        req.site = site.into();
        store
            .register_server("admin", &req, "salt", &format!("hash-{name}"))
            .await
            .unwrap();
    }
    grant(&*store, "s1", 2).await;
    grant(&*store, "s2", 3).await;
    grant(&*store, "s3", 4).await;
    let at = |server: &str, in_use: u64| UsageSample {
        server: server.into(),
        product: "cad".into(),
        in_use,
        ..UsageSample::default()
    };
    let run = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    // An older run saw every cell; the newest saw only s1 and s3 (s2 did not answer it), so
    // s2's in-use is its older sample, and s1's and s3's are the newest.
    store
        .record_samples(run, 1_000, &[at("s1", 9), at("s2", 2), at("s3", 9)])
        .await
        .unwrap();
    let newer = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    store
        .record_samples(newer, 2_000, &[at("s1", 1), at("s3", 4)])
        .await
        .unwrap();
    let totals = store.estate_totals().await.unwrap();
    let total = |site: &str, allocation: u64, in_use: u64| EstateTotal {
        product: "cad".into(),
        site: site.into(),
        allocation,
        in_use,
    };
    assert_eq!(totals, vec![total("hq", 5, 3), total("lab", 4, 4)]);
}

async fn demand_signals_read_positive_peaks_and_each_cells_oldest_sample(backend: Backend) {
    let store = stocked(&backend, 10).await;
    store
        .register_server("admin", &server("s2"), "salt", "hash-s2")
        .await
        .unwrap();
    grant(&*store, "s1", 2).await;
    grant(&*store, "s2", 3).await;
    let at = |server: &str, peak: u64| UsageSample {
        server: server.into(),
        product: "cad".into(),
        peak_in_use: peak,
        ..UsageSample::default()
    };
    // Four runs: s1 idle until the last, s2 busy in the second; the first is before the
    // recent past.
    for (time, samples) in [
        (1_000, vec![at("s1", 5), at("s2", 0)]),
        (2_000, vec![at("s1", 0), at("s2", 3)]),
        (3_000, vec![at("s1", 0), at("s2", 0)]),
        (4_000, vec![at("s1", 2)]),
    ] {
        let run = store
            .begin_run(RunTrigger::Scheduled, &Fence::alone())
            .await
            .unwrap();
        store.record_samples(run, time, &samples).await.unwrap();
    }
    let mut read = store
        .peak_samples(&[(1_500, 4_000), (500, 1_000)])
        .await
        .unwrap();
    read.sort();
    let row = |server: &str, at: i64, peak: u64| (server.to_owned(), "cad".to_owned(), at, peak);
    assert_eq!(
        read,
        vec![
            // The second range's positive peak, then the recent past: s1's oldest sample
            // there (idle, so peak 0) and its positive one; s2's positive one, which is also
            // its oldest (listed once as the peak, once as the oldest).
            row("s1", 1_000, 5),
            row("s1", 2_000, 0),
            row("s1", 4_000, 2),
            row("s2", 2_000, 0),
            row("s2", 2_000, 3),
        ]
    );
}

/// A run records its samples a chunk at a time (10,000 samples, `SAMPLES_AT_ONCE` in the
/// store's `history`; keep this test above it if it grows): 101 servers ×
/// 100 products, 10,100 samples, are all kept, each with its own values.
async fn a_runs_samples_beyond_one_statement_are_all_kept(backend: Backend) {
    let store = open(&backend).await;
    let (servers, products) = (101u64, 100u64);
    for p in 0..products {
        store
            .create_product("admin", &product(&format!("p{p:03}")))
            .await
            .unwrap();
    }
    for s in 0..servers {
        let name = format!("s{s:03}");
        store
            .register_server("admin", &server(&name), "salt", &format!("hash-{name}"))
            .await
            .unwrap();
    }
    let samples: Vec<UsageSample> = (0..servers)
        .flat_map(|s| {
            (0..products).map(move |p| UsageSample {
                server: format!("s{s:03}"),
                product: format!("p{p:03}"),
                in_use: s * products + p,
                ..UsageSample::default()
            })
        })
        .collect();
    let run = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    store.record_samples(run, 5_000, &samples).await.unwrap();
    let kept = store.samples_between(5_000, 5_001).await.unwrap();
    assert_eq!(kept.len(), samples.len());
    // Read back ordered by server and product, as written.
    for ((at, read), written) in kept.iter().zip(&samples) {
        assert_eq!(*at, 5_000);
        assert_eq!(read, written);
    }
}

async fn books_survive_a_reopen(backend: Backend) {
    let store = stocked(&backend, 10).await;
    grant(&*store, "s1", 3).await;
    let planned = new_move(MoveKind::Grant, "cad", "s1", 2);
    store.begin_move(&planned).await.unwrap();
    let books = store.books().await.unwrap();
    drop(store);
    let store = open(&backend).await;
    assert_eq!(store.books().await.unwrap(), books);
    assert_eq!(store.unfinished_moves().await.unwrap()[0].id, planned.id);
    store
        .complete_move(planned.id, 2, 2, &Fence::alone())
        .await
        .unwrap();
    assert_eq!(store.product("cad").await.unwrap().servers[0].allocation, 5);
    assert_balanced(&*store).await;
}

/// Eight writers race random mutations; after every one of them the books must balance.
async fn concurrent_mutations_keep_conservation(backend: Backend) {
    let store = open(&backend).await;
    store
        .create_product("admin", &product("cad"))
        .await
        .unwrap();
    store
        .create_product("admin", &product("fea"))
        .await
        .unwrap();
    for s in ["s1", "s2", "s3"] {
        store
            .register_server("admin", &server(s), "salt", &format!("hash-{s}"))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for seed in 1..=8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut applied = 0;
            for _ in 0..25 {
                let product = ["cad", "fea"][next(2) as usize];
                let server = ["s1", "s2", "s3"][next(3) as usize];
                let units = 1 + next(5);
                let outcome = match next(5) {
                    0 => store
                        .add_entitlement("hammer", product, &entitlement(units as u32))
                        .await
                        .map(drop),
                    1 => match store.entitlements(product).await.unwrap().first() {
                        Some(e) => store
                            .remove_entitlement("hammer", product, e.id)
                            .await
                            .map(drop),
                        None => Ok(()),
                    },
                    2 | 3 => {
                        let mv = new_move(MoveKind::Grant, product, server, units);
                        match store.begin_move(&mv).await {
                            Ok(_) if next(4) == 0 => store
                                .abandon_move(mv.id, "test", &Fence::alone())
                                .await
                                .map(drop),
                            Ok(_) => store
                                .complete_move(mv.id, units, 1, &Fence::alone())
                                .await
                                .map(drop),
                            Err(e) => Err(e),
                        }
                    }
                    _ => {
                        let mv = new_move(MoveKind::Release, product, server, units);
                        match store.begin_move(&mv).await {
                            // A racing release may have taken the units first: the store
                            // refuses the second one, which is then given up.
                            Ok(_) => {
                                match store
                                    .complete_move(mv.id, next(units + 1), 1, &Fence::alone())
                                    .await
                                {
                                    Err(StoreError::Conflict(_)) => store
                                        .abandon_move(mv.id, "raced", &Fence::alone())
                                        .await
                                        .map(drop),
                                    other => other.map(drop),
                                }
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                match outcome {
                    Ok(()) => applied += 1,
                    Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => {}
                    Err(e) => panic!("unexpected store error: {e:?}"),
                }
                for check in store.books().await.unwrap() {
                    assert!(check.errors().is_empty(), "{:?}", check.errors());
                }
            }
            applied
        }));
    }
    let mut applied = 0;
    for task in tasks {
        applied += task.await.unwrap();
    }
    assert!(
        applied > 50,
        "the hammer barely mutated anything ({applied})"
    );
    assert!(store.unfinished_moves().await.unwrap().is_empty());
    assert_balanced(&*store).await;
}

const HOUR: i64 = 3_600_000;

fn sample(in_use: u64, peak: u64, denials: u64) -> UsageSample {
    UsageSample {
        server: "s1".into(),
        product: "cad".into(),
        allocation: 10,
        in_use,
        peak_in_use: peak,
        denials,
        // The balancer's own accounting, distinct per field so a swapped column shows.
        accounting: CellAccounting {
            units_granted: in_use + 1,
            units_released: denials,
            ping_pong_units: 1,
            unserved_true: peak,
            unserved_false: 2 * denials,
        },
        ..UsageSample::default()
    }
}

/// The accounting columns of a bucket, in `CellAccounting`'s order.
fn accounting_of(b: &HistoryBucket) -> [i64; 5] {
    [
        b.units_granted,
        b.units_released,
        b.ping_pong_units,
        b.unserved_true,
        b.unserved_false,
    ]
}

async fn buckets(store: &dyn Store, from: i64, to: i64, raw_from: i64) -> Vec<HistoryBucket> {
    let mut got = store
        .history(&HistoryQuery {
            from_ms: from,
            to_ms: to,
            step_ms: HOUR,
            raw_from_ms: raw_from,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    got.sort_by_key(|b| b.bucket);
    got
}

async fn history_rolls_up_without_losing_the_peak(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let run = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    let h = 1_000 * HOUR;
    store
        .record_samples(run, h + 600_000, &[sample(3, 7, 2)])
        .await
        .unwrap();
    // A run records one sample per cell.
    assert!(
        store
            .record_samples(run, h + 1_800_000, &[sample(5, 4, 1)])
            .await
            .is_err()
    );
    let run2 = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    store
        .record_samples(run2, h + 1_800_000, &[sample(5, 4, 1)])
        .await
        .unwrap();
    let run3 = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    store
        .record_samples(run3, h + HOUR + 300_000, &[sample(1, 2, 0)])
        .await
        .unwrap();
    // Raw reads first.
    let raw = buckets(&*store, h, h + 2 * HOUR, 0).await;
    assert_eq!(raw.len(), 2);
    assert_eq!(
        (raw[0].samples, raw[0].peak_in_use, raw[0].denials),
        (2, 7, 3)
    );
    assert_eq!(
        accounting_of(&raw[0]),
        [4 + 6, 3, 2, 7 + 4, 6],
        "per-cell accounting is summed per bucket"
    );
    let read_back = store.samples_between(h, h + HOUR).await.unwrap();
    assert_eq!(
        read_back
            .iter()
            .map(|(_, s)| s.accounting)
            .collect::<Vec<_>>(),
        vec![sample(3, 7, 2).accounting, sample(5, 4, 1).accounting],
        "raw samples keep their accounting"
    );
    // Roll up both hours, delete the raw samples: the same figures come from the roll-ups.
    assert_eq!(store.roll_up(h + 2 * HOUR + 1).await.unwrap(), 2);
    assert_eq!(
        store.roll_up(h + 2 * HOUR + 1).await.unwrap(),
        0,
        "rolled up once"
    );
    let (raw_deleted, _) = store.prune_history(h + 2 * HOUR, 0).await.unwrap();
    assert_eq!(raw_deleted, 3);
    let rolled = buckets(&*store, h, h + 2 * HOUR, h + 2 * HOUR).await;
    assert_eq!(rolled.len(), 2);
    assert_eq!(
        (
            rolled[0].samples,
            rolled[0].peak_in_use,
            rolled[0].in_use_max,
            rolled[0].in_use_sum
        ),
        (2, 7, 5, 8),
        "a roll-up keeps the peak, the max, the sum and the count"
    );
    assert_eq!(rolled[0].denials, 3);
    assert_eq!(
        accounting_of(&rolled[0]),
        accounting_of(&raw[0]),
        "a roll-up keeps the accounting"
    );
    assert_eq!(rolled[1].peak_in_use, 2);
    // A raw sample of an hour not yet rolled up is never pruned.
    let run4 = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    store
        .record_samples(run4, h + 3 * HOUR, &[sample(9, 9, 0)])
        .await
        .unwrap();
    let (raw_deleted, _) = store.prune_history(h + 10 * HOUR, 0).await.unwrap();
    assert_eq!(raw_deleted, 0);
    // History survives a restart; roll-ups older than their retention go.
    drop(store);
    let store = open(&backend).await;
    assert_eq!(
        buckets(&*store, h, h + 2 * HOUR, h + 2 * HOUR).await,
        rolled
    );
    let (_, hourly_deleted) = store.prune_history(0, h + HOUR).await.unwrap();
    assert_eq!(hourly_deleted, 1);
    assert_eq!(
        buckets(&*store, h, h + 2 * HOUR, h + 2 * HOUR).await.len(),
        1
    );
}

async fn a_deposed_leader_is_fenced(backend: Backend) {
    let store = stocked(&backend, 10).await;
    let old = new_move(MoveKind::Grant, "cad", "s1", 2);
    store.begin_move(&old).await.unwrap();
    let unfinished = store
        .begin_run(RunTrigger::Scheduled, &Fence::alone())
        .await
        .unwrap();
    // A new leader takes over: every write of epoch 0 is refused from now on, and the run the
    // old leader left open is closed as interrupted.
    let epoch = store.take_shard(0, "http://new-leader:7400").await.unwrap();
    assert_eq!(epoch, 1);
    let closed = store.run(unfinished).await.unwrap().run;
    assert_eq!(closed.status, "failed");
    assert!(closed.finished_at.is_some());
    assert!(closed.errors[0].starts_with("interrupted"), "{closed:?}");
    let leaders = store.shard_leaders().await.unwrap();
    assert_eq!(leaders.len(), 1, "one shard until told otherwise");
    assert_eq!(
        (leaders[0].epoch, leaders[0].url.as_str()),
        (1, "http://new-leader:7400")
    );
    assert!(matches!(
        store.take_shard(1, "http://nowhere").await,
        Err(StoreError::NotFound(_))
    ));
    let before = store.books().await.unwrap();
    let stale = new_move(MoveKind::Grant, "cad", "s1", 1);
    assert!(matches!(
        store.begin_move(&stale).await,
        Err(StoreError::Fenced {
            epoch: 0,
            current: 1
        })
    ));
    // An instant balance's single grant (one statement on PostgreSQL) is fenced alike and
    // leaves no run behind.
    let every_run = RunsQuery {
        limit: 100,
        before_id: None,
        trigger: None,
        since_ms: None,
    };
    let runs_before = store.runs(&every_run).await.unwrap().len();
    assert!(matches!(
        store
            .begin_run_with_moves(
                RunTrigger::Instant,
                &Fence::alone(),
                std::slice::from_ref(&stale)
            )
            .await,
        Err(StoreError::Fenced {
            epoch: 0,
            current: 1
        })
    ));
    let reserve = store.product("cad").await.unwrap().product.reserve;
    assert!(matches!(
        store
            .log_instant_grant(&Fence::alone(), &stale, Uuid::new_v4(), reserve)
            .await,
        Err(StoreError::Fenced {
            epoch: 0,
            current: 1
        })
    ));
    assert_eq!(store.runs(&every_run).await.unwrap().len(), runs_before);
    assert!(matches!(
        store.complete_move(old.id, 2, 1, &Fence::alone()).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        store.abandon_move(old.id, "x", &Fence::alone()).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        store.reclaim_lost_server("s1", &Fence::alone()).await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(
        store.books().await.unwrap(),
        before,
        "fenced writes change nothing"
    );
    // The new leader resumes the old leader's move.
    let fence = Fence::new(1, [(0, epoch)].into());
    store.complete_move(old.id, 2, 1, &fence).await.unwrap();
    assert_balanced(&*store).await;
}

/// With the products sharded, each shard's leader writes its own products only, reclaims only
/// their units from a lost server, and a new shard count fences every leader.
async fn each_shard_fences_its_own_products(backend: Backend) {
    let store = stocked(&backend, 10).await;
    store.set_shard_count("admin", 2).await.unwrap();
    let leaders = store.shard_leaders().await.unwrap();
    assert_eq!(leaders.len(), 2);
    assert!(leaders.iter().all(|l| l.url.is_empty()), "{leaders:?}");
    let mine = shard_of("cad", 2);
    let other = (0..)
        .map(|i| format!("p{i}"))
        .find(|p| shard_of(p, 2) != mine)
        .unwrap();
    store
        .create_product("admin", &product(&other))
        .await
        .unwrap();
    store
        .add_entitlement("admin", &other, &entitlement(10))
        .await
        .unwrap();
    // The writer of before the count changed is fenced.
    assert!(matches!(
        store
            .begin_move(&new_move(MoveKind::Grant, "cad", "s1", 1))
            .await,
        Err(StoreError::Fenced { .. })
    ));
    let a = store.take_shard(mine, "http://a").await.unwrap();
    let b = store.take_shard(1 - mine, "http://b").await.unwrap();
    assert_ne!(a, b, "an epoch names one leadership of one shard");
    let fence_a = Fence::new(2, [(mine, a)].into());
    let fence_b = Fence::new(2, [(1 - mine, b)].into());
    let with = |epoch, product: &str, units| NewMove {
        epoch,
        ..new_move(MoveKind::Grant, product, "s1", units)
    };
    // Each leader logs and books its own product's moves, and only those.
    let cad = with(a, "cad", 2);
    store.begin_move(&cad).await.unwrap();
    store.complete_move(cad.id, 2, 1, &fence_a).await.unwrap();
    assert!(matches!(
        store.begin_move(&with(a, &other, 1)).await,
        Err(StoreError::Fenced { .. })
    ));
    // An instant balance's single grant (one statement on PostgreSQL) is fenced to its
    // product's shard alike: another shard's current epoch does not let it through.
    assert!(matches!(
        store
            .begin_run_with_moves(RunTrigger::Instant, &fence_b, &[with(b, "cad", 1)])
            .await,
        Err(StoreError::Fenced { .. })
    ));
    let reserve = store.product("cad").await.unwrap().product.reserve;
    assert!(matches!(
        store
            .log_instant_grant(&fence_b, &with(b, "cad", 1), Uuid::new_v4(), reserve)
            .await,
        Err(StoreError::Fenced { .. })
    ));
    let (_, logged) = store
        .begin_run_with_moves(RunTrigger::Instant, &fence_a, &[with(a, "cad", 1)])
        .await
        .unwrap();
    store
        .complete_move(logged[0].id, 1, 2, &fence_a)
        .await
        .unwrap();
    let theirs = with(b, &other, 1);
    store.begin_move(&theirs).await.unwrap();
    assert!(matches!(
        store.complete_move(theirs.id, 1, 1, &fence_a).await,
        Err(StoreError::Fenced { .. })
    ));
    store
        .complete_move(theirs.id, 1, 1, &fence_b)
        .await
        .unwrap();
    // A lost server: each leader reclaims its own shard's units, once.
    assert_eq!(
        store.reclaim_lost_server("s1", &fence_a).await.unwrap(),
        vec![("cad".to_owned(), 3)]
    );
    assert_eq!(
        store.reclaim_lost_server("s1", &fence_a).await.unwrap(),
        vec![]
    );
    assert_eq!(
        store.reclaim_lost_server("s1", &fence_b).await.unwrap(),
        vec![(other.clone(), 1)]
    );
    // A new count fences both leaders: a move planned before it cannot be ended with them.
    let planned = with(b, &other, 1);
    store.begin_move(&planned).await.unwrap();
    store.set_shard_count("admin", 3).await.unwrap();
    for fence in [&fence_a, &fence_b] {
        assert!(matches!(
            store.abandon_move(planned.id, "x", fence).await,
            Err(StoreError::Fenced { .. })
        ));
    }
    let shard = shard_of(&other, 3);
    let epoch = store.take_shard(shard, "http://c").await.unwrap();
    store
        .abandon_move(planned.id, "x", &Fence::new(3, [(shard, epoch)].into()))
        .await
        .unwrap();
    assert_balanced(&*store).await;
}

/// The differences the two balancer migration folders may have, line for line: (PostgreSQL,
/// SQLite). Anything else is a schema drift between the backends.
const DIALECT_DIFFERENCES: &[(&str, &str)] = &[
    // Each file says which backend it is for.
    (
        "-- The balancer's books on PostgreSQL (production). Kept in step with balancer-sqlite:",
        "-- The balancer's books on SQLite (the embedded default). Kept in step with \
         balancer-postgres:",
    ),
    // Surrogate keys: an identity column on PostgreSQL, SQLite's rowid alias.
    (
        "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "INTEGER PRIMARY KEY AUTOINCREMENT",
    ),
];

/// The first line where `postgres` and `sqlite` (one migration's two texts) differ by more than
/// [`DIALECT_DIFFERENCES`]: its number and both texts.
fn drift(postgres: &str, sqlite: &str) -> Option<(usize, String, String)> {
    let (pg, lite): (Vec<&str>, Vec<&str>) = (postgres.lines().collect(), sqlite.lines().collect());
    for index in 0..pg.len().max(lite.len()) {
        let (p, s) = (
            pg.get(index).copied().unwrap_or("<end of file>"),
            lite.get(index).copied().unwrap_or("<end of file>"),
        );
        let translated = DIALECT_DIFFERENCES
            .iter()
            .fold(p.to_owned(), |line, (from, to)| line.replace(from, to));
        if translated != s {
            return Some((index + 1, p.to_owned(), s.to_owned()));
        }
    }
    None
}

/// The `.sql` files of a migration folder, by name.
fn migrations(folder: &str) -> std::collections::BTreeMap<String, String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(folder);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "sql"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            (name, text)
        })
        .collect()
}

#[test]
fn migrations_differ_between_backends_only_by_dialect() {
    let postgres = migrations("balancer-postgres");
    let sqlite = migrations("balancer-sqlite");
    assert!(!postgres.is_empty(), "no PostgreSQL migrations found");
    assert_eq!(
        postgres.keys().collect::<Vec<_>>(),
        sqlite.keys().collect::<Vec<_>>(),
        "both backends have the same migration files"
    );
    for (name, pg) in &postgres {
        if let Some((line, p, s)) = drift(pg, &sqlite[name]) {
            panic!(
                "{name} line {line}: the backends differ beyond the known dialect differences\n  \
                 balancer-postgres: {p}\n  balancer-sqlite:   {s}"
            );
        }
    }
}

#[test]
fn a_schema_drift_between_backends_is_reported_with_its_line() {
    let pg = "CREATE TABLE t (\n    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    \
              units BIGINT NOT NULL\n);";
    let lite = "CREATE TABLE t (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    \
                units BIGINT NOT NULL\n);";
    assert_eq!(drift(pg, lite), None);
    let drifted = lite.replace("units BIGINT NOT NULL", "units INTEGER");
    assert_eq!(
        drift(pg, &drifted),
        Some((
            3,
            "    units BIGINT NOT NULL".to_owned(),
            "    units INTEGER".to_owned()
        ))
    );
    assert_eq!(drift(pg, &format!("{lite}\n-- more")).map(|d| d.0), Some(5));
}

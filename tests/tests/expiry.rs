//! Expiry enforced (issue 15, item 5), end to end: a real `allot-balancer` and real
//! `allot-agent` processes on loopback, on SQLite and on PostgreSQL. An expired entitlement
//! leaves `purchased` — from the reserve first, then from servers' free units, then from units
//! in use, which stay with their clients while no new checkout goes beyond the new total — with
//! the books balanced and the doctor content at every step, and the act audited.

use allot_tests::fleet::Fleet;
use allot_tests::{Backend, on_both_backends};
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(
    an_expired_entitlement_leaves_purchased_without_taking_a_unit_in_use,
    a_permanent_entitlement_never_expires_and_the_reserve_pays_first,
    kill9_after_a_retire_is_applied_retires_it_once,
);

/// Adds an entitlement of `units` to `product` expiring in an hour; returns its id.
async fn expiring(fleet: &Fleet, product: &str, units: u32) -> i64 {
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let e = fleet
        .api()
        .post(
            &format!("/v1/products/{product}/entitlements"),
            json!({"units": units, "expires_at": at, "reference": "PO-1"}),
        )
        .await;
    e["id"].as_i64().unwrap()
}

/// Moves an entitlement's expiry into the past behind the balancer's back (the clock of a
/// stored row, not of the test).
async fn expire_now(fleet: &Fleet, id: i64) {
    let past = chrono::Utc::now().timestamp_millis() - 1_000;
    fleet
        .execute_sql(&format!(
            "UPDATE entitlements SET expires_at = {past} WHERE id = {id}"
        ))
        .await;
}

async fn books(fleet: &Fleet, product: &str) -> Value {
    fleet.api().get(&format!("/v1/products/{product}")).await
}

async fn an_expired_entitlement_leaves_purchased_without_taking_a_unit_in_use(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 2).await;
    let contract = expiring(&fleet, "cad", 6).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 4, 0).await;
    fleet.limits("tokyo", "cad", 4, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 4);
    assert_eq!(fleet.allocation("tokyo", "cad").await, 4);
    let paris = fleet.checkout_n(0, "cad", 4).await;
    assert_eq!(paris.len(), 4);
    let tokyo = fleet.checkout_n(1, "cad", 1).await;
    assert_eq!(tokyo.len(), 1);

    // The 6-unit contract ends. The reserve is empty: Tokyo's 3 free units go first, then 3
    // of Paris's units in use — which stay with their clients.
    expire_now(&fleet, contract).await;
    fleet.balance().await;
    let detail = books(&fleet, "cad").await;
    let runs = fleet.api().get("/v1/runs?limit=5").await;
    assert_eq!(detail["purchased"], 2, "{detail:#}\n{runs:#}");
    assert_eq!(detail["reserve"], 0, "{detail:#}");
    assert_eq!(fleet.allocation("tokyo", "cad").await, 1, "{detail:#}");
    assert_eq!(fleet.allocation("paris", "cad").await, 1, "{detail:#}");
    fleet.assert_doctor_ok().await;
    fleet.assert_no_over_grant("cad", 2).await;
    let runs = fleet.api().get("/v1/runs?trigger=reclaim").await;
    let reclaim = fleet
        .api()
        .get(&format!("/v1/runs/{}", runs["items"][0]["id"]))
        .await;
    let mut retired: Vec<(String, u64)> = reclaim["move_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["kind"], "retire", "{reclaim:#}");
            (
                m["server"].as_str().unwrap().to_owned(),
                m["applied_units"].as_u64().unwrap(),
            )
        })
        .collect();
    retired.sort();
    assert_eq!(
        retired,
        [("paris".to_owned(), 3), ("tokyo".to_owned(), 3)],
        "{reclaim:#}"
    );
    let entitlements = fleet.api().get("/v1/products/cad/entitlements").await;
    let live: Vec<i64> = entitlements["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(!live.contains(&contract), "{entitlements:#}");
    let audit = fleet.api().get("/v1/audit?limit=50").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "entitlement.expire"
                && a["actor"] == "expiry"
                && a["target"] == "cad"),
        "{audit:#}"
    );

    // Paris holds 4 in use on 1 unit: nothing new is granted there, by the server or by an
    // instant balance, until enough are checked in.
    let (status, body) = fleet.meters[0].checkout("cad", "late").await;
    assert_eq!(status, 409, "{body}");
    for handle in &paris[..3] {
        fleet.meters[0].checkin(handle).await;
    }
    let (status, body) = fleet.meters[0].checkout("cad", "later").await;
    assert_eq!(status, 409, "Paris is full at its one unit: {body}");
    fleet.meters[0].checkin(&paris[3]).await;
    let (status, body) = fleet.meters[0].checkout("cad", "last").await;
    assert_eq!(status, 200, "{body}");
    fleet.assert_no_over_grant("cad", 2).await;
    fleet.assert_doctor_ok().await;
}

async fn a_permanent_entitlement_never_expires_and_the_reserve_pays_first(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 3).await;
    let contract = expiring(&fleet, "cad", 2).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 3, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    let listed = fleet.api().get("/v1/products/cad/entitlements").await;
    let permanent = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] != contract)
        .unwrap()
        .clone();
    assert!(permanent["expires_at"].is_null(), "{listed:#}");

    // The contract's 2 units are in the reserve: the expiry task (no run needed) takes them
    // from there and moves nothing.
    expire_now(&fleet, contract).await;
    allot_tests::eventually(
        "the expiry task retires the reserve",
        Duration::from_secs(20),
        || async { books(&fleet, "cad").await["purchased"] == 3 },
    )
    .await;
    let detail = books(&fleet, "cad").await;
    assert_eq!(detail["reserve"], 0, "{detail:#}");
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    let runs = fleet.api().get("/v1/runs?trigger=reclaim").await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 0, "{runs:#}");
    fleet.assert_doctor_ok().await;
}

async fn kill9_after_a_retire_is_applied_retires_it_once(backend: Backend) {
    let mut fleet = Fleet::start(
        backend,
        &[],
        &[("ALLOT_FAULT_CRASH_AT", "after_retire_sent")],
    )
    .await;
    fleet.product("cad", 1).await;
    let contract = expiring(&fleet, "cad", 3).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 4, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 4);
    let held = fleet.checkout_n(0, "cad", 2).await;
    assert_eq!(held.len(), 2);

    // The contract ends; the retire move reaches Paris, which applies it durably, and the
    // balancer dies before booking it.
    expire_now(&fleet, contract).await;
    fleet
        .balancer
        .restart_after_exit(Duration::from_secs(20))
        .await;
    // The restarted leader resends the move; Paris answers from its move log: retired once.
    allot_tests::eventually("the retire is booked", Duration::from_secs(30), || async {
        books(&fleet, "cad").await["purchased"] == 1
    })
    .await;
    let detail = books(&fleet, "cad").await;
    assert_eq!(
        (detail["reserve"].as_u64(), detail["in_transit"].as_u64()),
        (Some(0), Some(0)),
        "{detail:#}"
    );
    assert_eq!(fleet.allocation("paris", "cad").await, 1, "{detail:#}");
    assert_eq!(fleet.meters[0].product("cad").await["in_use"], 2);
    fleet.assert_no_over_grant("cad", 1).await;
    fleet.assert_doctor_ok().await;
}

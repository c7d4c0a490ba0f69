//! Balancing end to end: a real `allot-balancer` and real `allot-agent` processes on loopback,
//! on SQLite and on PostgreSQL, driven over HTTP and killed at awkward moments. After every
//! scenario the doctor must find the books and every server in agreement.

use allot_tests::fleet::Fleet;
use allot_tests::proxy::{Link, Mode};
use allot_tests::{Backend, on_both_backends};
use serde_json::Value;
use std::time::{Duration, Instant};

on_both_backends!(
    demand_shifting_between_servers_is_followed,
    instant_balance_turns_a_denial_into_a_grant,
    instant_balance_reclaims_from_an_idle_server,
    kill9_between_release_and_grant_loses_nothing,
    kill9_of_a_server_before_it_confirms_a_grant_loses_nothing,
    kill9_after_an_instant_answer_before_its_booking_loses_nothing,
    a_dead_server_stops_its_own_resends_at_the_first_unconfirmed_move,
    a_resend_refused_for_its_token_leaves_the_move_in_transit,
    a_silent_server_is_reclaimed_once_and_rejoins,
    a_drained_server_empties_as_its_checkouts_end,
    the_same_instant_request_twice_grants_once,
    a_retry_while_the_first_attempt_is_sending_grants_once,
    a_run_leaves_an_instant_grant_in_flight_to_its_request,
    a_plan_is_explained_server_by_server_and_nothing_moves,
    one_product_that_cannot_be_planned_does_not_stop_the_run,
    a_change_after_a_runs_read_is_planned_from,
);

fn moves_of(run: &Value) -> Vec<(String, String, u64)> {
    run["move_log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "applied")
        .map(|m| {
            (
                m["kind"].as_str().unwrap().to_owned(),
                m["server"].as_str().unwrap().to_owned(),
                m["applied_units"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn demand_shifting_between_servers_is_followed(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    // The scenario asserts every checkout is served by instant balances; the default 500 ms
    // hold bound is a latency promise measured in benchmarks, not something this test checks,
    // and a loaded CI machine once took longer (CI run of session 6).
    fleet.meter_env("ALLOT_INSTANT_WAIT_MS", "10000");
    fleet.product("cad", 20).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 0, 2).await;
    fleet.limits("tokyo", "cad", 0, 2).await;
    let first = fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 2);
    assert_eq!(fleet.allocation("tokyo", "cad").await, 2);
    // The run's detail says why: each server's buffer was granted ahead of demand.
    let decisions = first["decisions"].as_array().expect("decisions");
    for server in ["paris", "tokyo"] {
        let d = decisions
            .iter()
            .find(|d| d["server"] == server && d["product"] == "cad")
            .unwrap_or_else(|| panic!("no decision for {server}: {first:#}"));
        assert_eq!(
            (
                d["decision"].as_str(),
                d["target"].as_u64(),
                d["want"].as_u64()
            ),
            (Some("grant_ahead"), Some(2), Some(2)),
            "{first:#}"
        );
    }

    // Paris's morning: 8 users. Instant balances serve them; the run then sizes Paris for its
    // load plus buffer and leaves Tokyo its buffer.
    let paris = fleet.checkout_n(0, "cad", 8).await;
    assert_eq!(paris.len(), 8, "every Paris checkout is served");
    // A run skips a product while one of Paris's own top-ups is still in transit. Paris wants
    // its load plus buffer (10); whether its top-ups stopped at 9 or 10 depends on timing, and
    // one unit is within the dead band, so the run leaves it at 9 or more — never fewer than
    // its load plus the trigger's one-unit watermark.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = fleet.balance().await;
        if fleet.allocation("paris", "cad").await >= 9 {
            break;
        }
        if Instant::now() > deadline {
            let explain = fleet.api().get("/v1/products/cad/explain").await;
            let detail = fleet.api().get("/v1/products/cad").await;
            panic!("no run sized Paris: last run {run:#}\nexplain {explain:#}\nbooks {detail:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fleet.allocation("tokyo", "cad").await, 2);
    fleet.assert_no_over_grant("cad", 20).await;

    // Paris goes home, Tokyo wakes up: the units follow as Tokyo's users need them (instant
    // balances reclaim from Paris what the reserve lacks); runs take nothing back from Paris
    // that nobody needs, and a second run moves nothing at all (no churn).
    for handle in &paris {
        fleet.meters[0].checkin(handle).await;
    }
    let tokyo = fleet.checkout_n(1, "cad", 12).await;
    assert_eq!(tokyo.len(), 12, "every Tokyo checkout is served");
    fleet.balance().await;
    let run = fleet.balance().await;
    assert!(fleet.allocation("tokyo", "cad").await >= 12);
    assert_eq!(run["status"], "ok", "{run:#}");
    assert_eq!(
        moves_of(&run),
        [],
        "a second run with the same demand moves nothing"
    );
    fleet.assert_no_over_grant("cad", 20).await;
    fleet.assert_doctor_ok().await;
}

async fn instant_balance_turns_a_denial_into_a_grant(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 3).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    // Nothing allocated yet: without instant balancing this checkout would be denied.
    let started = Instant::now();
    let (status, body) = fleet.meters[0].checkout("cad", "alice").await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    allot_tests::eventually("the grant is booked", Duration::from_secs(10), || async {
        fleet.allocation("paris", "cad").await >= 1
    })
    .await;
    // Exhaust the purchase: the fourth checkout is denied, after the hold bound, not hung.
    let more = fleet.checkout_n(0, "cad", 3).await;
    assert_eq!(more.len(), 2);
    let (status, body) = fleet.meters[0].checkout("cad", "late").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "license_unavailable");
    fleet.assert_no_over_grant("cad", 3).await;
    let runs = fleet.api().get("/v1/runs?limit=100").await;
    assert!(
        runs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["trigger"] == "instant"),
        "instant balances are recorded as runs"
    );
    // The late client could not be served and nothing was free anywhere: a true shortfall,
    // in its run's record and in /metrics; no false one.
    let instant: Vec<&Value> = runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["trigger"] == "instant")
        .collect();
    assert!(
        instant
            .iter()
            .any(|r| r["unserved_true"].as_u64() >= Some(1)),
        "{runs:#}"
    );
    assert!(instant.iter().all(|r| r["unserved_false"] == 0), "{runs:#}");
    let metrics = reqwest::get(format!("{}/metrics", fleet.balancer.url()))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("allot_unserved_units_total{")
                && l.contains("kind=\"true\"")
                && l.contains("product=\"cad\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The next run's sample carries Paris's accounting into the history: the units granted
    // to it and the true shortfall, per cell.
    fleet.balance().await;
    let history = fleet
        .api()
        .get("/v1/history?since=1h&product=cad&server=paris")
        .await;
    let total = |field: &str| -> u64 {
        history["series"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["points"].as_array().unwrap())
            .map(|p| p[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(total("units_granted"), 3, "{history:#}");
    assert_eq!(total("units_released"), 0, "{history:#}");
    assert!(total("unserved_true") >= 1, "{history:#}");
    assert_eq!(total("unserved_false"), 0, "{history:#}");
    fleet.assert_doctor_ok().await;
}

async fn instant_balance_reclaims_from_an_idle_server(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 4).await;
    fleet.add_meter("idle").await;
    fleet.add_meter("busy").await;
    fleet.wait_synced("cad").await;
    fleet.limits("idle", "cad", 0, 4).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("idle", "cad").await, 4);
    // The reserve is empty; the busy server's checkout reclaims a free unit from the idle one.
    let (status, body) = fleet.meters[1].checkout("cad", "bob").await;
    assert_eq!(status, 200, "{body}");
    // The busy server pulls its deficit plus a little headroom (the trigger policy); the idle
    // one gives up free units only, and the books keep every unit.
    allot_tests::eventually(
        "the reclaim and the grant are booked",
        Duration::from_secs(10),
        || async {
            let busy = fleet.allocation("busy", "cad").await;
            let idle = fleet.allocation("idle", "cad").await;
            busy >= 1 && busy + idle == 4
        },
    )
    .await;
    fleet.assert_no_over_grant("cad", 4).await;
    fleet.assert_doctor_ok().await;
}

async fn kill9_between_release_and_grant_loses_nothing(backend: Backend) {
    let mut fleet = Fleet::start(
        backend,
        &[],
        &[("ALLOT_FAULT_CRASH_AT", "between_release_and_grant")],
    )
    .await;
    fleet.product("cad", 6).await;
    fleet.add_meter("from").await;
    fleet.add_meter("to").await;
    fleet.wait_synced("cad").await;
    fleet.limits("from", "cad", 0, 6).await;
    // Allocations move without releases first: no crash on the way in.
    let run = fleet.balance().await;
    assert_eq!(moves_of(&run), [("grant".into(), "from".into(), 6)]);
    let held = fleet.checkout_n(0, "cad", 2).await;
    assert_eq!(held.len(), 2);
    // Now the run must release from `from` and grant to `to` (its min, a need the run serves
    // at once): the balancer dies in between.
    fleet.limits("from", "cad", 0, 0).await;
    fleet.limits("to", "cad", 4, 0).await;
    let (status, _) = fleet
        .api()
        .try_raw(reqwest::Method::POST, "/v1/balance", Some(b"{}".to_vec()))
        .await
        .map(|(s, b)| (s.as_u16(), b))
        .unwrap_or((0, Value::Null));
    assert_ne!(status, 200, "the balancer should have crashed mid-run");
    fleet
        .balancer
        .restart_after_exit(Duration::from_secs(10))
        .await;
    fleet.assert_no_over_grant("cad", 6).await;
    // The release was booked before the crash; nothing is in transit, nothing lost.
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(detail["purchased"], 6);
    assert_eq!(detail["in_transit"], 0);
    fleet.assert_doctor_ok().await;
    // The next run finishes the job (sharing the reserve with what `from` pulled back for its
    // own headroom meanwhile); the live checkouts were never touched.
    fleet.balance().await;
    assert!(fleet.allocation("to", "cad").await >= 2);
    assert!(fleet.allocation("from", "cad").await >= 2);
    assert_eq!(fleet.meters[0].product("cad").await["in_use"], 2);
    fleet.assert_no_over_grant("cad", 6).await;
    fleet.assert_doctor_ok().await;
}

/// A fleet whose only server, *paris*, crashed after durably applying the first grant of a run
/// that gives it `buffer` units of each of `products` (5 purchased each), before answering it:
/// that grant and every later one of the run stay in transit.
async fn a_grant_applied_but_unanswered(backend: Backend, products: &[&str], buffer: u32) -> Fleet {
    let mut fleet = Fleet::start(backend, &["--call-timeout-ms", "2000"], &[]).await;
    for product in products {
        fleet.product(product, 5).await;
    }
    fleet.add_meter("paris").await;
    for product in products {
        fleet.wait_synced(product).await;
    }
    fleet.meters[0].kill9();
    fleet.meters[0]
        .start(&[("ALLOT_FAULT_CRASH_AT", "agent_grant_applied")])
        .await;
    for product in products {
        fleet.limits("paris", product, 0, buffer).await;
    }
    let run = fleet.balance().await;
    assert_eq!(run["status"], "partial", "{run:#}");
    assert!(fleet.meters[0].wait_exit(Duration::from_secs(10)));
    fleet
}

async fn kill9_of_a_server_before_it_confirms_a_grant_loses_nothing(backend: Backend) {
    // The server dies after applying the grant durably, before answering it.
    let mut fleet = a_grant_applied_but_unanswered(backend, &["cad"], 3).await;
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(
        detail["in_transit"], 3,
        "the unconfirmed grant stays in transit"
    );
    assert_eq!(detail["reserve"], 2);
    // The server comes back; the next run resends the same move, which it answers from its log.
    fleet.meters[0].start(&[]).await;
    fleet.balance().await;
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(detail["in_transit"], 0);
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    assert_eq!(
        fleet.meters[0].product("cad").await["allocated"],
        3,
        "applied exactly once"
    );
    fleet.assert_no_over_grant("cad", 5).await;
    fleet.assert_doctor_ok().await;
}

/// The balancer dies once a server has applied an instant balance's grant from the reserve and
/// the answer is on its way, before booking the grant (the booking follows the answer): the
/// grant stays logged in transit until the restarted balancer resends it (the server answers
/// from its log) and books it. The units are granted once and nothing is lost.
async fn kill9_after_an_instant_answer_before_its_booking_loses_nothing(backend: Backend) {
    let mut fleet = Fleet::start(
        backend,
        &[],
        &[("ALLOT_FAULT_CRASH_AT", "instant_answered")],
    )
    .await;
    fleet.product("cad", 10).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    let as_paris =
        allot_tests::balancer::Api::new(fleet.balancer.url(), Some(&fleet.meters[0].token));
    let request = serde_json::json!({
        "request_id": "5f0c3a0e-6a43-4c55-8d0e-2b6f4c8e7a01",
        "product": "cad",
        "units": 2,
    });
    // The answer may or may not leave before the process aborts.
    let _ = as_paris
        .try_raw(
            reqwest::Method::POST,
            "/v1/instant-balance",
            Some(request.to_string().into_bytes()),
        )
        .await;
    fleet
        .balancer
        .restart_after_exit(Duration::from_secs(10))
        .await;
    assert_eq!(
        fleet.meters[0].product("cad").await["allocated"],
        2,
        "the server applied the grant once"
    );
    // The restarted leader resumes the unfinished move before anything else.
    allot_tests::eventually("the grant is booked", Duration::from_secs(10), || async {
        fleet.api().get("/v1/products/cad").await["in_transit"] == 0
    })
    .await;
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(
        (detail["purchased"].as_u64(), detail["reserve"].as_u64()),
        (Some(10), Some(8))
    );
    assert_eq!(fleet.allocation("paris", "cad").await, 2);
    assert_eq!(fleet.meters[0].product("cad").await["allocated"], 2);
    // The request's run, which the crashed leader never closed, is closed by the new leader
    // as interrupted: nothing is left `running` forever in the history.
    let runs = fleet.api().get("/v1/runs?limit=100").await;
    let runs = runs["items"].as_array().unwrap();
    assert!(runs.iter().all(|r| r["status"] != "running"), "{runs:#?}");
    let instant = runs
        .iter()
        .find(|r| r["trigger"] == "instant")
        .expect("the request's run is recorded");
    assert_eq!(instant["status"], "failed", "{instant:#}");
    assert!(
        instant["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("interrupted")),
        "{instant:#}"
    );
    assert!(instant["finished_at"].is_string(), "{instant:#}");
    fleet.assert_no_over_grant("cad", 10).await;
    fleet.assert_doctor_ok().await;
}

/// A dead server's unfinished moves are re-sent in order up to the first it does not confirm:
/// the rest would each wait out the same call timeout, stalling every run behind it. None is
/// lost: once the server is back, every one is applied exactly once.
async fn a_dead_server_stops_its_own_resends_at_the_first_unconfirmed_move(backend: Backend) {
    // The server dies after applying its first grant durably, before answering it; the run's
    // later grants to it find it gone. All three stay in transit.
    let products = ["cad", "cam", "sim"];
    let mut fleet = a_grant_applied_but_unanswered(backend, &products, 2).await;
    let mut in_transit = 0;
    for product in products {
        in_transit += fleet.api().get(&format!("/v1/products/{product}")).await["in_transit"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(in_transit, 6, "three unconfirmed grants of 2");

    // With the server still down, the next run sends the first and holds back the other two.
    let run = fleet.balance().await;
    let errors: Vec<&str> = run["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("2 more unfinished moves to paris not re-sent")),
        "{run:#}"
    );

    // Back up: every held-back move is re-sent and applied exactly once.
    fleet.meters[0].start(&[]).await;
    fleet.balance().await;
    for product in products {
        let detail = fleet.api().get(&format!("/v1/products/{product}")).await;
        assert_eq!(detail["in_transit"], 0, "{product}: {detail:#}");
        assert_eq!(fleet.allocation("paris", product).await, 2, "{product}");
        assert_eq!(
            fleet.meters[0].product(product).await["allocated"],
            2,
            "{product}: applied exactly once"
        );
        fleet.assert_no_over_grant(product, 5).await;
    }
    fleet.assert_doctor_ok().await;
}

/// A re-sent move refused for its credentials proves nothing about the first send: after a
/// rotation that refuses the old token at once, the server (still on the old token) answers the
/// balancer's re-send 401 although it applied the grant. The grant must stay in transit —
/// abandoning it would return units the server holds to the reserve — and be applied exactly
/// once when the server comes back with its new token.
async fn a_resend_refused_for_its_token_leaves_the_move_in_transit(backend: Backend) {
    let mut fleet = a_grant_applied_but_unanswered(backend, &["cad"], 3).await;

    let rotated = fleet
        .api()
        .post(
            "/v1/servers/paris/rotate-token",
            serde_json::json!({"grace_seconds": 0}),
        )
        .await;
    let new_token = rotated["token"].as_str().unwrap().to_owned();
    // Back on its old token: the re-sent grant is refused 401 before its move log is read.
    fleet.meters[0].start(&[]).await;
    let run = fleet.balance().await;
    assert!(
        run["errors"].to_string().contains("401"),
        "the re-send was refused for its token: {run:#}"
    );
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(detail["in_transit"], 3, "still in transit: {detail:#}");
    assert_eq!(
        detail["reserve"], 2,
        "no unit the server holds went back: {detail:#}"
    );

    // With its new token, the re-send is answered from the server's move log.
    fleet.meters[0].kill9();
    fleet.meters[0].token = new_token;
    fleet.meters[0].start(&[]).await;
    fleet.balance().await;
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(detail["in_transit"], 0, "{detail:#}");
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    assert_eq!(
        fleet.meters[0].product("cad").await["allocated"],
        3,
        "applied exactly once"
    );
    fleet.assert_no_over_grant("cad", 5).await;
    fleet.assert_doctor_ok().await;
}

async fn a_silent_server_is_reclaimed_once_and_rejoins(backend: Backend) {
    let mut fleet = Fleet::start(
        backend,
        &["--lease-seconds", "4", "--lease-margin-seconds", "2"],
        &[],
    )
    .await;
    fleet.product("cad", 5).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    fleet.limits("tokyo", "cad", 0, 3).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("tokyo", "cad").await, 3);
    // Tokyo goes silent for longer than the lease.
    fleet.meters[1].kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.balance().await;
    let servers = fleet.api().get("/v1/servers").await;
    let tokyo = servers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tokyo")
        .unwrap()
        .clone();
    assert_eq!(tokyo["state"], "lost");
    assert_eq!(fleet.allocation("tokyo", "cad").await, 0);
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(
        detail["reserve"], 5,
        "Tokyo's units are back in the reserve"
    );
    // Paris can use them now.
    assert_eq!(fleet.checkout_n(0, "cad", 5).await.len(), 5);
    // Tokyo returns: it adopts the books (nothing), so no unit is counted twice.
    fleet.meters[1].start(&[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.meters[1].product("cad").await["allocated"] != 0 {
        assert!(Instant::now() < deadline, "tokyo never adopted the books");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Until a status read shows the adoption, every sync repeats the reset: a lost answer
    // cannot leave Tokyo holding the reclaimed units.
    let sync = allot_tests::balancer::Api::new(fleet.balancer.url(), Some(&fleet.meters[1].token));
    let again = sync
        .post("/v1/sync", serde_json::json!({"version": "test"}))
        .await;
    assert_eq!(again["reset"], true);
    fleet.balance().await;
    let settled = sync
        .post("/v1/sync", serde_json::json!({"version": "test"}))
        .await;
    assert_eq!(settled["reset"], false, "the run saw Tokyo adopt the books");
    let (status, body) = fleet.meters[1].checkout("cad", "late").await;
    assert_eq!(status, 409, "all 5 units are in use in Paris: {body}");
    fleet.assert_no_over_grant("cad", 5).await;
    fleet.assert_doctor_ok().await;
}

async fn a_drained_server_empties_as_its_checkouts_end(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 6).await;
    fleet.add_meter("old").await;
    fleet.wait_synced("cad").await;
    fleet.limits("old", "cad", 2, 4).await;
    fleet.balance().await;
    assert!(fleet.allocation("old", "cad").await >= 4);
    let held = fleet.checkout_n(0, "cad", 2).await;
    assert_eq!(held.len(), 2);
    let (status, _) = fleet
        .api()
        .send(reqwest::Method::POST, "/v1/servers/old/drain", None)
        .await;
    assert_eq!(status.as_u16(), 200);
    // Draining ignores the min: the free units go back, the two in use stay.
    fleet.balance().await;
    assert_eq!(fleet.allocation("old", "cad").await, 2);
    let (status, _) = fleet
        .api()
        .send(reqwest::Method::DELETE, "/v1/servers/old", None)
        .await;
    assert_eq!(
        status.as_u16(),
        409,
        "a server holding units cannot be removed"
    );
    for handle in &held {
        fleet.meters[0].checkin(handle).await;
    }
    fleet.balance().await;
    assert_eq!(fleet.allocation("old", "cad").await, 0);
    fleet.assert_doctor_ok().await;
    let (status, body) = fleet
        .api()
        .send(reqwest::Method::DELETE, "/v1/servers/old", None)
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let detail = fleet.api().get("/v1/products/cad").await;
    assert_eq!(detail["reserve"], 6);
}

async fn the_same_instant_request_twice_grants_once(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 10).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    // The server's own token, as the metering server would send it.
    let as_paris =
        allot_tests::balancer::Api::new(fleet.balancer.url(), Some(&fleet.meters[0].token));
    let request = serde_json::json!({
        "request_id": "7d4c2d1e-0c1f-4a51-9a3e-5b8e6c0f9a10",
        "product": "cad",
        "units": 2,
    });
    let first = as_paris.post("/v1/instant-balance", request.clone()).await;
    let again = as_paris.post("/v1/instant-balance", request).await;
    assert_eq!(first["granted"], 2, "{first}");
    assert_eq!(
        again["granted"], 2,
        "a repeat is answered from the first outcome: {again}"
    );
    assert_eq!(fleet.allocation("paris", "cad").await, 2, "granted once");
    assert_eq!(fleet.meters[0].product("cad").await["allocated"], 2);
    // Another server's token cannot ask for units on Paris's behalf: it is always the caller
    // that receives them, and an unknown token gets nothing.
    let stranger = allot_tests::balancer::Api::new(fleet.balancer.url(), Some("allot_not-a-token"));
    let (status, _) = stranger
        .send(
            reqwest::Method::POST,
            "/v1/instant-balance",
            Some(serde_json::json!({"request_id": "7d4c2d1e-0c1f-4a51-9a3e-5b8e6c0f9a11", "product": "cad", "units": 1})),
        )
        .await;
    assert_eq!(status.as_u16(), 401);
    assert_eq!(fleet.allocation("paris", "cad").await, 2);
    fleet.assert_doctor_ok().await;
}

/// A metering server whose instant request timed out on its side sends it again; if the first
/// attempt is still sending its grant, the retry waits for it and is answered from its record.
async fn a_retry_while_the_first_attempt_is_sending_grants_once(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 10).await;
    // The balancer reaches Paris through a link that can be slowed.
    let link = Link::new();
    let port = allot_tests::process::free_port();
    let to_paris = link.proxy(port).await;
    let balancer_url = fleet.balancer.url().to_owned();
    fleet
        .add_meter_at("paris", port, &to_paris.url(), &balancer_url)
        .await;
    fleet.wait_synced("cad").await;
    let as_paris =
        allot_tests::balancer::Api::new(fleet.balancer.url(), Some(&fleet.meters[0].token));
    let request = serde_json::json!({
        "request_id": "0b7e4c57-3f0e-4d43-9d7a-1f1bd2a9c001",
        "product": "cad",
        "units": 2,
    });
    // The grant takes over a second to reach Paris and come back: the retry, 200 ms after the
    // first attempt, arrives while that attempt is sending it.
    link.set(Mode::Delay(Duration::from_millis(600)));
    let first = as_paris.post("/v1/instant-balance", request.clone());
    let retry = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        as_paris.post("/v1/instant-balance", request.clone()).await
    };
    let (first, retry) = tokio::join!(first, retry);
    link.set(Mode::Pass);
    assert_eq!(first["granted"], 2, "{first}");
    assert_eq!(
        retry["granted"], 2,
        "answered from the first attempt: {retry}"
    );
    assert_eq!(retry["allocation"], 2, "{retry}");
    assert_eq!(fleet.allocation("paris", "cad").await, 2, "granted once");
    assert_eq!(fleet.meters[0].product("cad").await["allocated"], 2);
    fleet.assert_doctor_ok().await;
}

/// A run that starts while an instant balance is still sending its grant (and then booking it)
/// leaves that grant to the request: it is sent and booked once, so the server's history counts
/// its units once.
async fn a_run_leaves_an_instant_grant_in_flight_to_its_request(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 10).await;
    let link = Link::new();
    let port = allot_tests::process::free_port();
    let to_paris = link.proxy(port).await;
    let balancer_url = fleet.balancer.url().to_owned();
    fleet
        .add_meter_at("paris", port, &to_paris.url(), &balancer_url)
        .await;
    fleet.wait_synced("cad").await;
    let as_paris =
        allot_tests::balancer::Api::new(fleet.balancer.url(), Some(&fleet.meters[0].token));
    let request = serde_json::json!({
        "request_id": "3c1f6f0a-8d5e-4b7a-9c2d-7e4f1a6b5c02",
        "product": "cad",
        "units": 2,
    });
    // The grant takes over a second to reach Paris and come back; a run starts 200 ms in, and
    // resumes the moves still logged `planned` first.
    link.set(Mode::Delay(Duration::from_millis(600)));
    let asked = as_paris.post("/v1/instant-balance", request);
    let run = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fleet.balance().await
    };
    let (answer, _) = tokio::join!(asked, run);
    link.set(Mode::Pass);
    assert_eq!(answer["granted"], 2, "{answer}");
    allot_tests::eventually("the grant is booked", Duration::from_secs(10), || async {
        fleet.api().get("/v1/products/cad").await["in_transit"] == 0
    })
    .await;
    assert_eq!(fleet.meters[0].product("cad").await["allocated"], 2);
    // The next run's sample carries what balancing did to Paris since the last one.
    fleet.balance().await;
    let history = fleet
        .api()
        .get("/v1/history?since=1h&product=cad&server=paris")
        .await;
    let granted: u64 = history["series"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["points"].as_array().unwrap())
        .map(|p| p["units_granted"].as_u64().unwrap())
        .sum();
    assert_eq!(granted, 2, "granted once, counted once: {history:#}");
    fleet.assert_doctor_ok().await;
}

async fn a_plan_is_explained_server_by_server_and_nothing_moves(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 20).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    fleet.balance().await;
    let held = fleet.checkout_n(0, "cad", 3).await;
    assert_eq!(held.len(), 3, "instant balances serve Paris");
    let runs_before = fleet.api().get("/v1/runs").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["trigger"] != "instant")
        .count();

    // Paris's own top-up may still be in flight; explain then (rightly) declines to plan.
    allot_tests::eventually("no grant in flight", Duration::from_secs(10), || async {
        fleet.api().get("/v1/products/cad").await["in_transit"] == 0
    })
    .await;
    let e = fleet.api().get("/v1/products/cad/explain").await;
    assert_eq!(e["product"], "cad");
    assert_eq!(e["purchased"], 20);
    let servers = e["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2, "{e}");
    let known = [
        "steady",
        "grant_needed",
        "grant_ahead",
        "dead_band",
        "deferred",
        "hold",
        "kept_excess",
        "release_idle",
        "release_for_shortage",
        "drain",
        "surplus",
    ];
    let mut targets = 0;
    for c in servers {
        assert!(known.contains(&c["decision"].as_str().unwrap()), "{c}");
        assert!(
            c["target"].as_u64().unwrap() >= c["in_use"].as_u64().unwrap(),
            "{c}"
        );
        targets += c["target"].as_u64().unwrap();
    }
    let paris = servers
        .iter()
        .find(|c| c["server"] == "paris")
        .expect("paris");
    assert_eq!(paris["in_use"], 3, "{paris}");
    assert_eq!(paris["need"], 3, "{paris}");
    assert_eq!(paris["held"], true, "Paris was just granted units: {paris}");
    assert!(paris["want"].as_u64().unwrap() >= 3, "{paris}");
    // Conservation of the explained plan.
    assert_eq!(
        targets + e["reserve_after"].as_u64().unwrap() + e["in_transit"].as_u64().unwrap(),
        20,
        "{e}"
    );

    // One server's line only; an unknown product is refused.
    let one = fleet
        .api()
        .get("/v1/products/cad/explain?server=tokyo")
        .await;
    assert_eq!(one["servers"].as_array().unwrap().len(), 1);
    assert_eq!(one["servers"][0]["server"], "tokyo");
    let (status, body) = fleet
        .api()
        .send(reqwest::Method::GET, "/v1/products/nope/explain", None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_product");

    // Explaining moved nothing: no run was started by it (Paris's own top-ups may land
    // meanwhile, as instant runs).
    let runs = |list: &Value| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["trigger"] != "instant")
            .count()
    };
    assert_eq!(runs(&fleet.api().get("/v1/runs").await), runs_before);
}

/// Issue 13, item 7: a product whose books cannot be planned is recorded in the run's errors
/// and the run goes on with the next product (it used to abort the whole run).
async fn one_product_that_cannot_be_planned_does_not_stop_the_run(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("bad", 10).await;
    fleet.product("cad", 10).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.wait_synced("bad").await;
    fleet.limits("paris", "bad", 2, 0).await;
    fleet.limits("paris", "cad", 2, 0).await;
    // Break the books of "bad" (planned first, by name) behind the balancer's back: purchased
    // no longer equals reserve + in transit + allocations, so the planner refuses it.
    let sql = "UPDATE products SET purchased = purchased + 1 WHERE name = 'bad'";
    fleet.execute_sql(sql).await;

    let run = fleet.balance().await;
    assert_eq!(run["status"], "partial", "{run}");
    let errors: Vec<&str> = run["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("bad: not balanced")),
        "{run}"
    );
    assert!(errors.iter().all(|e| !e.starts_with("cad")), "{run}");
    // The product after it was balanced: its min reached Paris; the broken one moved nothing.
    assert_eq!(fleet.allocation("paris", "cad").await, 2, "{run}");
    assert_eq!(fleet.allocation("paris", "bad").await, 0, "{run}");
}

/// A run plans every product from one read, then takes each product with moves under its lock
/// to log them. A change committed in between (here an operator's, to a cell's buffer) must
/// be planned from, not the read: the run reads what changed again. Stopped between its read
/// and its locked step (`ALLOT_FAULT_PAUSE_AT=run_planned_unlocked`), a run that read Tokyo's
/// buffer of 4 (a grant ahead of demand) must grant nothing once the buffer is back to 0.
async fn a_change_after_a_runs_read_is_planned_from(backend: Backend) {
    let gate = tempfile::tempdir().expect("a directory for the pause's files");
    let dir = gate.path().display().to_string();
    let fleet = {
        let mut fleet = Fleet::start(
            backend,
            &[],
            &[
                ("ALLOT_FAULT_PAUSE_AT", "run_planned_unlocked"),
                ("ALLOT_FAULT_PAUSE_DIR", &dir),
            ],
        )
        .await;
        fleet.product("cad", 10).await;
        fleet.add_meter("paris").await;
        fleet.add_meter("tokyo").await;
        fleet.wait_synced("cad").await;
        fleet
    };
    fleet.limits("tokyo", "cad", 0, 4).await;
    let (run, ()) = tokio::join!(fleet.balance(), async {
        // Once the run has read the books and planned from them, and before it logs.
        allot_tests::eventually(
            "the run stopped after its read",
            Duration::from_secs(30),
            || async { gate.path().join("run_planned_unlocked.reached").exists() },
        )
        .await;
        fleet.limits("tokyo", "cad", 0, 0).await;
        std::fs::write(gate.path().join("run_planned_unlocked.go"), b"").expect("let the run go");
    });
    assert_eq!(run["status"], "ok", "{run:#}");
    assert_eq!(
        moves_of(&run),
        [],
        "the run planned from the buffer it read, not the one set since: {run:#}"
    );
    assert_eq!(fleet.allocation("tokyo", "cad").await, 0);

    // The same run without the change grants Tokyo its buffer: the scenario has a move to undo.
    fleet.limits("tokyo", "cad", 0, 4).await;
    let run = fleet.balance().await;
    assert_eq!(
        moves_of(&run),
        [("grant".to_owned(), "tokyo".to_owned(), 4)],
        "{run:#}"
    );
    assert_eq!(fleet.allocation("tokyo", "cad").await, 4);
    fleet.assert_no_over_grant("cad", 10).await;
    fleet.assert_doctor_ok().await;
}

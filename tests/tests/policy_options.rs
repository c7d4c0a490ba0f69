//! The policy options of issue 16 end to end: a real `allot-balancer` and real `allot-agent`
//! processes on loopback, on SQLite and on PostgreSQL, driven over HTTP and the CLIs.
//!
//! Options are set on the balancer (`POST /v1/products`, `PUT /v1/products/{p}/policy`,
//! `product set`), validated strictly (a bad value changes nothing), pushed to the metering
//! servers by their sync, and enforced there: limits (`limit_reached`, naming the rule),
//! reservations (kept for their holders and never reclaimed by a run), linger (the seat held
//! after a checkin, reused by its user, listed as lingering), borrowing (no heartbeats, listed
//! as borrowed, never revoked nor reclaimed, surviving kill -9 of both processes), idle reclaim
//! (a notice, then a revoke recorded as `idle`; `allot-agent run` reports its command idle)
//! and queue priorities with user callbacks (a webhook on the allow-list, or a long-poll; the
//! unit kept for the claim, and freed for the next when it is not claimed in time).

use allot_tests::balancer::Api;
use allot_tests::fleet::Fleet;
use allot_tests::process::binary;
use allot_tests::{Backend, eventually, on_both_backends};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(
    options_are_validated_stored_audited_and_reach_the_metering_servers,
    limits_and_reservations_are_enforced_and_reserved_units_are_never_reclaimed,
    a_lingering_seat_is_reused_by_its_user_and_listed,
    a_borrow_outlives_restarts_and_is_never_revoked_nor_reclaimed,
    idle_checkouts_are_warned_then_revoked_and_run_reports_idleness,
    a_higher_priority_group_is_served_first,
    callbacks_keep_a_unit_for_the_first_in_line_and_call_it_back,
);

/// A fleet with `paris`, product `cad` (heartbeats every second) with `units` purchased, all
/// of them held by paris.
async fn estate(backend: Backend, units: u32) -> Fleet {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet
        .api()
        .post(
            "/v1/products",
            json!({"name": "cad", "heartbeat_seconds": 1, "staleout_seconds": 120}),
        )
        .await;
    fleet
        .api()
        .post("/v1/products/cad/entitlements", json!({"units": units}))
        .await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", units, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, u64::from(units));
    fleet
}

/// Replaces cad's options and waits until paris applies them.
async fn set_options(fleet: &Fleet, options: Value) {
    fleet
        .api()
        .put(
            "/v1/products/cad/policy",
            json!({"heartbeat_seconds": 1, "staleout_seconds": 120, "options": options}),
        )
        .await;
    let want = options.clone();
    let meter = &fleet.meters[0];
    eventually("paris applies the options", Duration::from_secs(20), || {
        let want = want.clone();
        async move { meter.product("cad").await["policy"]["options"] == want }
    })
    .await;
}

fn agent(fleet: &Fleet) -> Api {
    Api::new(&fleet.meters[0].url(), None)
}

async fn checkout(fleet: &Fleet, user: &str, groups: &[&str], units: u32) -> (StatusCode, Value) {
    agent(fleet)
        .send(
            Method::POST,
            "/v1/checkout",
            Some(
                json!({"product": "cad", "user": user, "host": format!("{user}-ws"),
                "groups": groups, "units": units}),
            ),
        )
        .await
}

async fn handle_of(fleet: &Fleet, user: &str, groups: &[&str], units: u32) -> String {
    let (status, body) = checkout(fleet, user, groups, units).await;
    assert_eq!(status, StatusCode::OK, "checkout of {user}: {body}");
    body["handle"].as_str().unwrap().to_owned()
}

async fn in_use(fleet: &Fleet) -> u64 {
    fleet.meters[0].product("cad").await["in_use"]
        .as_u64()
        .unwrap()
}

/// The estate's holders of cad as (user, state).
async fn holders(fleet: &Fleet) -> Vec<(String, String)> {
    let page = fleet.api().get("/v1/checkouts?product=cad").await;
    let mut rows: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["user"].as_str().unwrap().to_owned(),
                h["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    rows.sort();
    rows
}

async fn options_are_validated_stored_audited_and_reach_the_metering_servers(backend: Backend) {
    let fleet = estate(backend, 2).await;
    let api = fleet.api();
    let options = json!({
        "limits": [{"scope": "group", "name": "interns", "max": 1}],
        "reservations": [{"scope": "user", "name": "ann", "units": 1}],
        "linger_seconds": 30, "linger_yields": true, "max_borrow_hours": 72,
        "idle_notify_seconds": 600, "idle_revoke_seconds": 1800,
        "priorities": [{"group": "design", "priority": 10}]
    });
    // On create, too.
    let created = api
        .post("/v1/products", json!({"name": "sim", "options": options}))
        .await;
    assert_eq!(created["policy"]["options"], options);
    set_options(&fleet, options.clone()).await;
    let stored = api.get("/v1/products/cad").await;
    assert_eq!(stored["policy"]["options"], options);
    let audit = api.get("/v1/audit?limit=5").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "product.policy" && e["target"] == "cad"),
        "the change is audited: {audit}"
    );
    // Every bad value is refused with a stable code and changes nothing.
    let bad = [
        json!({"limits": [{"scope": "user", "name": "ann", "max": -1}]}),
        json!({"limits": [{"scope": "site", "name": "ann", "max": 1}]}),
        json!({"limits": [{"scope": "user", "name": "ann", "max": 1},
                          {"scope": "user", "name": "ann", "max": 2}]}),
        json!({"reservations": [{"scope": "user", "name": "ann", "units": 0}]}),
        json!({"reservations": [{"scope": "host", "name": "h", "units": 2000000}]}),
        json!({"linger_seconds": 99999999}),
        json!({"max_borrow_hours": 100000}),
        json!({"idle_notify_seconds": 600, "idle_revoke_seconds": 60}),
        json!({"priorities": [{"group": "x", "priority": 5000}]}),
        json!({"limits": [{"scope": "user", "name": "", "max": 1}]}),
        json!({"callbacks": true}),
    ];
    for options in bad {
        let (status, body) = api
            .send(
                Method::PUT,
                "/v1/products/cad/policy",
                Some(json!({"options": options})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{options}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        let (status, _) = api
            .send(
                Method::POST,
                "/v1/products",
                Some(json!({"name": "other", "options": options})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{options}");
    }
    assert_eq!(
        api.get("/v1/products/cad").await["policy"]["options"],
        options,
        "nothing changed"
    );
    let (status, _) = api
        .send(
            Method::PUT,
            "/v1/products/nope/policy",
            Some(json!({"options": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The CLI's `product set` changes only what it is given, and `product show` prints it.
    let out = std::process::Command::new(binary("allot-balancer"))
        .args([
            "product",
            "set",
            "cad",
            "--url",
            fleet.balancer.url(),
            "--admin-token",
            allot_tests::balancer::ADMIN_TOKEN,
            "--limit",
            "user:bob=3",
            "--linger-seconds",
            "0",
            "--no-reservations",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("limit    user:bob = 3"), "{shown}");
    assert!(shown.contains("borrow   72 h at most"), "{shown}");
    let now = api.get("/v1/products/cad").await["policy"]["options"].clone();
    assert_eq!(
        now["limits"],
        json!([{"scope": "user", "name": "bob", "max": 3}])
    );
    assert_eq!(now["reservations"], Value::Null);
    assert_eq!(now["linger_seconds"], Value::Null);
    assert_eq!(now["max_borrow_hours"], 72);
}

async fn limits_and_reservations_are_enforced_and_reserved_units_are_never_reclaimed(
    backend: Backend,
) {
    let fleet = estate(backend, 5).await;
    set_options(
        &fleet,
        json!({
            "limits": [{"scope": "user", "name": "ann", "max": 1}],
            "reservations": [{"scope": "group", "name": "design", "units": 2}]
        }),
    )
    .await;
    handle_of(&fleet, "ann", &[], 1).await;
    let (status, body) = checkout(&fleet, "ann", &[], 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "limit_reached");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("user \"ann\""),
        "the rule is named: {message}"
    );
    // 5 units, 2 kept for design: ann's 1 and bob's 2 fill the rest.
    handle_of(&fleet, "bob", &[], 2).await;
    let (status, body) = checkout(&fleet, "carl", &[], 1).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "design's units are not carl's: {body}"
    );
    assert_eq!(body["error"]["code"], "license_unavailable");
    let status = fleet.api().get("/v1/doctor").await;
    assert_eq!(status["ok"], true, "{status}");
    // A run that would reclaim free units leaves the reserved ones.
    fleet.limits("paris", "cad", 0, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 5);
    let dana = handle_of(&fleet, "dana", &["design"], 2).await;
    assert_eq!(in_use(&fleet).await, 5);
    // Once design holds its units, nothing is reserved: a run may now reclaim what frees.
    agent(&fleet)
        .post("/v1/checkin", json!({"handle": dana}))
        .await;
    fleet.balance().await;
    assert_eq!(
        fleet.allocation("paris", "cad").await,
        5,
        "freed units that are design's again stay"
    );
    fleet.assert_doctor_ok().await;
}

async fn a_lingering_seat_is_reused_by_its_user_and_listed(backend: Backend) {
    let fleet = estate(backend, 1).await;
    set_options(&fleet, json!({"linger_seconds": 60})).await;
    let first = handle_of(&fleet, "ann", &[], 1).await;
    agent(&fleet)
        .post("/v1/checkin", json!({"handle": first}))
        .await;
    assert_eq!(in_use(&fleet).await, 1, "the seat lingers");
    assert_eq!(holders(&fleet).await, [("ann".into(), "lingering".into())]);
    let (status, _) = checkout(&fleet, "bob", &[], 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "the lingering unit is ann's");
    // A run never takes a lingering unit back.
    fleet.limits("paris", "cad", 0, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 1);
    let again = handle_of(&fleet, "ann", &[], 1).await;
    assert_eq!(in_use(&fleet).await, 1, "the relaunch reuses the seat");
    assert_eq!(holders(&fleet).await, [("ann".into(), "held".into())]);
    // With yielding on, a waiting client takes a lingering unit at once.
    set_options(&fleet, json!({"linger_seconds": 60, "linger_yields": true})).await;
    agent(&fleet)
        .post("/v1/checkin", json!({"handle": again}))
        .await;
    handle_of(&fleet, "bob", &[], 1).await;
    assert_eq!(holders(&fleet).await, [("bob".into(), "held".into())]);
}

async fn a_borrow_outlives_restarts_and_is_never_revoked_nor_reclaimed(backend: Backend) {
    let mut fleet = estate(backend, 2).await;
    let url = fleet.meters[0].url();
    let borrow = |hours: &str| {
        std::process::Command::new(binary("allot-agent"))
            .args([
                "borrow",
                "--url",
                &url,
                "--product",
                "cad",
                "--user",
                "ann",
                "--host",
                "ann-laptop",
                "--hours",
                hours,
                "--json",
            ])
            .output()
            .unwrap()
    };
    let refused = borrow("8");
    assert!(!refused.status.success(), "borrowing is off by default");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may not be borrowed"),
        "{refused:?}"
    );
    set_options(&fleet, json!({"max_borrow_hours": 8})).await;
    assert!(
        !borrow("9").status.success(),
        "longer than the policy allows"
    );
    let out = borrow("8");
    assert!(out.status.success(), "{out:?}");
    let borrowed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let handle = borrowed["handle"].as_str().unwrap().to_owned();
    let id = borrowed["id"].as_str().unwrap().to_owned();
    assert_eq!(holders(&fleet).await, [("ann".into(), "borrowed".into())]);
    let (status, body) = fleet
        .api()
        .send(
            Method::POST,
            &format!("/v1/checkouts/{id}/revoke"),
            Some(json!({"reason": "audit"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a borrow is not revoked: {body}"
    );
    // kill -9 both processes: the borrow is still held, with no heartbeat ever sent.
    fleet.meters[0].kill9();
    fleet.balancer.kill9_and_restart().await;
    fleet.meters[0].restart().await;
    fleet.wait_synced("cad").await;
    assert_eq!(holders(&fleet).await, [("ann".into(), "borrowed".into())]);
    // Runs that may reclaim whatever is free leave the borrowed unit in use at paris.
    fleet.limits("paris", "cad", 0, 0).await;
    for _ in 0..3 {
        fleet.balance().await;
        assert!(fleet.allocation("paris", "cad").await >= 1);
        assert_eq!(in_use(&fleet).await, 1);
    }
    // A checkout that is not a borrow cannot be "returned"; the borrow can.
    let held = {
        fleet.limits("paris", "cad", 2, 0).await;
        fleet.balance().await;
        handle_of(&fleet, "bob", &[], 1).await
    };
    let (status, _) = agent(&fleet)
        .send(Method::POST, &format!("/v1/borrow/{held}/return"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let out = std::process::Command::new(binary("allot-agent"))
        .args(["return", "--url", &url, &handle])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(holders(&fleet).await, [("bob".into(), "held".into())]);
    fleet.assert_doctor_ok().await;
}

async fn idle_checkouts_are_warned_then_revoked_and_run_reports_idleness(backend: Backend) {
    let fleet = estate(backend, 2).await;
    set_options(
        &fleet,
        json!({"idle_notify_seconds": 2, "idle_revoke_seconds": 4}),
    )
    .await;
    let handle = handle_of(&fleet, "ann", &[], 1).await;
    let beat = |idle: u32| {
        let handle = handle.clone();
        let api = agent(&fleet);
        async move {
            api.send(
                Method::POST,
                "/v1/heartbeat",
                Some(json!({"handle": handle, "idle_seconds": idle})),
            )
            .await
        }
    };
    let (status, body) = beat(1).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("notice").is_none(), "{body}");
    let (status, body) = beat(3).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["idle_revoke_in_seconds"], 1, "{body}");
    assert!(body["notice"].as_str().unwrap().contains("idle"), "{body}");
    let (status, body) = beat(4).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["error"]["code"], "license_revoked");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("idle"),
        "{body}"
    );
    assert_eq!(in_use(&fleet).await, 0);
    // `allot-agent run` measures its command's CPU: a sleeping command is idle, is revoked,
    // and the wrapper stops it and exits 77.
    let run = tokio::process::Command::new(binary("allot-agent"))
        .args([
            "run",
            "--url",
            &fleet.meters[0].url(),
            "--product",
            "cad",
            "--user",
            "bob",
            "--",
            "sleep",
            "60",
        ])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("the idle command is stopped well before it ends")
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("idle for"),
        "{out:?}"
    );
}

async fn a_higher_priority_group_is_served_first(backend: Backend) {
    let fleet = estate(backend, 1).await;
    set_options(
        &fleet,
        json!({"priorities": [{"group": "design", "priority": 10}]}),
    )
    .await;
    let held = handle_of(&fleet, "ann", &[], 1).await;
    let wait = |user: &'static str, groups: Vec<&'static str>| {
        let api = agent(&fleet);
        tokio::spawn(async move {
            api.send(
                Method::POST,
                "/v1/checkout",
                Some(
                    json!({"product": "cad", "user": user, "host": "h", "groups": groups,
                    "wait_seconds": 30}),
                ),
            )
            .await
        })
    };
    let plain = wait("bob", vec![]);
    eventually("bob waits", Duration::from_secs(10), || async {
        holders(&fleet)
            .await
            .contains(&("bob".into(), "waiting".into()))
    })
    .await;
    let urgent = wait("carl", vec!["design"]);
    eventually("carl waits", Duration::from_secs(10), || async {
        holders(&fleet)
            .await
            .contains(&("carl".into(), "waiting".into()))
    })
    .await;
    agent(&fleet)
        .post("/v1/checkin", json!({"handle": held}))
        .await;
    let (status, carl) = urgent.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "carl, of the priority group, first: {carl}"
    );
    assert!(!plain.is_finished(), "bob still waits");
    agent(&fleet)
        .post("/v1/checkin", json!({"handle": carl["handle"]}))
        .await;
    let (status, _) = plain.await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// A webhook receiver on loopback: every JSON body posted to `/hook` arrives on the channel.
async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

async fn callbacks_keep_a_unit_for_the_first_in_line_and_call_it_back(backend: Backend) {
    let mut fleet = estate(backend, 1).await;
    let (hook, mut calls) = webhook_receiver().await;
    let api = agent(&fleet);
    let register = |body: Value| {
        let api = api.clone();
        async move { api.send(Method::POST, "/v1/callbacks", Some(body)).await }
    };
    // Off the allow-list (none is configured yet): refused, nothing queued.
    let (status, body) = register(json!({"product": "cad", "user": "x", "host": "h",
        "webhook": hook}))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow-list")
    );
    fleet.meters[0].kill9();
    fleet.meters[0]
        .start(&[("ALLOT_CALLBACK_HOSTS", "127.0.0.1")])
        .await;
    fleet.wait_synced("cad").await;
    set_options(
        &fleet,
        json!({"priorities": [{"group": "design", "priority": 10}]}),
    )
    .await;
    let api = agent(&fleet);
    let ann = handle_of(&fleet, "ann", &[], 1).await;
    // Bob long-polls; Carl, of the priority group, leaves a webhook and goes first.
    let (status, bob) = register(json!({"product": "cad", "user": "bob", "host": "h",
        "hold_seconds": 1}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{bob}");
    assert_eq!(
        (bob["state"].as_str(), bob["position"].as_u64()),
        (Some("waiting"), Some(0))
    );
    let (status, carl) = register(json!({"product": "cad", "user": "carl", "host": "h",
        "groups": ["design"], "webhook": hook, "hold_seconds": 30}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{carl}");
    assert_eq!(carl["position"], 0, "priority first: {carl}");
    let bob_id = bob["id"].as_str().unwrap().to_owned();
    let carl_id = carl["id"].as_str().unwrap().to_owned();
    let bob_now = api.get(&format!("/v1/callbacks/{bob_id}")).await;
    assert_eq!(bob_now["position"], 1);
    let (status, _) = api
        .send(
            Method::POST,
            &format!("/v1/callbacks/{carl_id}/claim"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing kept yet");
    // Ann checks in: the unit is kept for Carl and his webhook is called.
    api.post("/v1/checkin", json!({"handle": ann})).await;
    let called = tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("the webhook is called")
        .unwrap();
    assert_eq!(
        (called["id"].as_str(), called["state"].as_str()),
        (Some(carl_id.as_str()), Some("ready"))
    );
    assert_eq!(in_use(&fleet).await, 1, "the unit is kept, not free");
    let (status, body) = checkout(&fleet, "dan", &[], 1).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a kept unit is not free: {body}"
    );
    let (status, claimed) = api
        .send(
            Method::POST,
            &format!("/v1/callbacks/{carl_id}/claim"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    let carl_handle = claimed["handle"].as_str().unwrap().to_owned();
    let (status, _) = api
        .send(
            Method::POST,
            "/v1/heartbeat",
            Some(json!({"handle": carl_handle})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        holders(&fleet).await,
        [
            ("bob".into(), "waiting".into()),
            ("carl".into(), "held".into())
        ]
    );
    // Carl checks in: Bob's long-poll wakes; he does not claim within his 1 s hold, so the
    // unit frees again.
    let poll = {
        let api = api.clone();
        let id = bob_id.clone();
        tokio::spawn(async move {
            api.get(&format!("/v1/callbacks/{id}?wait_seconds=20"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.post("/v1/checkin", json!({"handle": carl_handle}))
        .await;
    let woke = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long-poll answers when the unit is kept")
        .unwrap();
    assert_eq!(woke["state"], "ready", "{woke}");
    eventually(
        "the unclaimed hold ends",
        Duration::from_secs(10),
        || async { in_use(&fleet).await == 0 },
    )
    .await;
    let over = api.get(&format!("/v1/callbacks/{bob_id}")).await;
    assert_eq!(over["state"], "ended", "{over}");
    let (status, _) = api
        .send(Method::POST, &format!("/v1/callbacks/{bob_id}/claim"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Bad ids and values change nothing.
    for (method, path) in [
        (Method::GET, "/v1/callbacks/nope".to_owned()),
        (Method::POST, "/v1/callbacks/cb_1/claim".to_owned()),
        (
            Method::GET,
            format!("/v1/callbacks/{bob_id}?wait_seconds=99"),
        ),
    ] {
        let (status, _) = api.send(method, &path, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
    }
    let (status, _) = api
        .send(Method::GET, &format!("/v1/callbacks/cb_{:032x}", 7), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for bad in [
        json!({"product": "cad", "user": "x", "host": "h", "hold_seconds": 0}),
        json!({"product": "cad", "user": "x", "host": "h", "hold_seconds": 601}),
        json!({"product": "cad", "user": "x", "host": "h", "wait_seconds": 90000}),
        json!({"product": "cad", "user": "x", "host": "h", "webhook": "http://evil.example.com/x"}),
        json!({"product": "cad", "user": "x", "host": "h", "webhook": "ftp://127.0.0.1/x"}),
    ] {
        let (status, body) = register(bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // A free unit is kept at once; a cancel gives it back.
    let (status, eve) = register(json!({"product": "cad", "user": "eve", "host": "h"})).await;
    assert_eq!(
        (status, eve["state"].as_str()),
        (StatusCode::CREATED, Some("ready"))
    );
    assert_eq!(in_use(&fleet).await, 1);
    let (status, cancelled) = api
        .send(
            Method::DELETE,
            &format!("/v1/callbacks/{}", eve["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (status, cancelled["state"].as_str()),
        (StatusCode::OK, Some("ended"))
    );
    assert_eq!(in_use(&fleet).await, 0);
}

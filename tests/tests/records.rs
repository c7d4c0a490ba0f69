//! Usage and denial records and the reports built on them (issue 15, items 3 and 4), over real
//! HTTP against a real `allot-balancer` on SQLite and on PostgreSQL: a metering server's batches
//! are stored once by record id, however often they are resent; reports group, clip and count
//! as an administrator expects; bad input is refused and changes nothing.

use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use allot_tests::fleet::Fleet;
use allot_tests::process::binary;
use allot_tests::{Backend, on_both_backends};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(
    records_are_stored_once_and_reported_by_every_grouping,
    bad_batches_and_bad_report_queries_change_nothing,
    metering_servers_ship_every_record_once_across_kill_9_of_both_sides,
);

const T0: &str = "2026-11-02T08:00:00Z";

/// `T0` plus `minutes`, RFC 3339.
fn at(minutes: i64) -> String {
    let t0 = chrono::DateTime::parse_from_rfc3339(T0).unwrap();
    (t0 + chrono::Duration::minutes(minutes)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn usage(id: u32, user: &str, groups: &[&str], units: u32, from: i64, to: i64) -> Value {
    json!({"id": format!("0190a0b0-0000-7000-8000-{id:012}"), "product": "cad", "user": user,
        "host": format!("{user}-pc"), "groups": groups, "units": units,
        "started_at": at(from), "ended_at": at(to), "ended_by": "checkin"})
}

fn denial(id: u32, user: &str, minute: i64, free_elsewhere: Option<bool>) -> Value {
    json!({"id": format!("0190a0b0-0000-7000-9000-{id:012}"), "product": "cad", "user": user,
        "host": format!("{user}-pc"), "groups": ["eng"], "at": at(minute),
        "reason": "license_unavailable", "free_elsewhere": free_elsewhere})
}

/// A balancer with product `cad` (4 units) and server `paris`; answers the admin client and
/// paris's own.
async fn estate(backend: &Backend) -> (Balancer, Api, Api) {
    let balancer = Balancer::start(backend).await;
    let api = balancer.api();
    api.post("/v1/products", json!({"name": "cad"})).await;
    api.post("/v1/products/cad/entitlements", json!({"units": 4}))
        .await;
    let registered = api
        .post(
            "/v1/servers",
            json!({"name": "paris", "url": "http://127.0.0.1:1", "site": "eu"}),
        )
        .await;
    let paris = api.with_token(registered["token"].as_str());
    (balancer, api, paris)
}

fn rows(report: &Value) -> Vec<(String, u64, f64, u64, u64, u64)> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["checkouts"].as_u64().unwrap(),
                r["hours"].as_f64().unwrap(),
                r["peak_concurrent"].as_u64().unwrap(),
                r["denials_true"].as_u64().unwrap(),
                r["denials_false"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn records_are_stored_once_and_reported_by_every_grouping(backend: Backend) {
    let (balancer, api, paris) = estate(&backend).await;
    // Ann holds 2 units 08:00–10:00 and 1 unit 09:00–11:00 (3 at once 09:00–10:00); Bob holds 1
    // unit 09:30–10:30. Ann is denied once with nothing free, Bob once while units were free.
    let batch = json!({
        "usage": [
            usage(1, "ann", &["eng", "cad-users"], 2, 0, 120),
            usage(2, "ann", &["eng"], 1, 60, 180),
            usage(3, "bob", &["ops"], 1, 90, 150),
        ],
        "denials": [denial(1, "ann", 100, Some(false)), denial(2, "bob", 100, Some(true))],
    });
    let ack = paris.post("/v1/records", batch.clone()).await;
    assert_eq!(
        (ack["stored"].as_u64(), ack["duplicates"].as_u64()),
        (Some(5), Some(0))
    );
    // The server did not hear the answer and resends: stored once.
    let ack = paris.post("/v1/records", batch).await;
    assert_eq!(
        (ack["stored"].as_u64(), ack["duplicates"].as_u64()),
        (Some(0), Some(5))
    );

    let window = format!("since={}&until={}", at(-60), at(24 * 60));
    let by_user = api.get(&format!("/v1/usage?{window}&group_by=user")).await;
    assert_eq!(
        rows(&by_user),
        [
            ("ann".to_owned(), 2, 6.0, 3, 1, 0),
            ("bob".to_owned(), 1, 1.0, 1, 0, 1),
        ],
        "{by_user:#}"
    );
    let by_group = api.get(&format!("/v1/usage?{window}&group_by=group")).await;
    let groups: Vec<(String, u64, f64, u64)> = rows(&by_group)
        .into_iter()
        .map(|(k, c, h, p, _, _)| (k, c, h, p))
        .collect();
    assert_eq!(
        groups,
        [
            ("eng".to_owned(), 2, 6.0, 3),
            ("cad-users".to_owned(), 1, 4.0, 2),
            ("ops".to_owned(), 1, 1.0, 1),
        ],
        "{by_group:#}"
    );
    let by_site = api.get(&format!("/v1/usage?{window}&group_by=site")).await;
    assert_eq!(
        rows(&by_site),
        [("eu".to_owned(), 3, 7.0, 4, 1, 1)],
        "{by_site:#}"
    );
    // A window that cuts the day at 09:30 clips the hours and keeps what overlapped (Bob's
    // checkout starts as it ends).
    let clipped = api
        .get(&format!(
            "/v1/usage?since={}&until={}&group_by=product",
            at(0),
            at(90)
        ))
        .await;
    assert_eq!(
        rows(&clipped),
        [("cad".to_owned(), 2, 3.5, 3, 0, 0)],
        "{clipped:#}"
    );

    // The renewal report: 4 purchased, at most 4 held, the cap reached for 30 minutes.
    let renewal = api
        .get(&format!(
            "/v1/usage/renewal?since={}&until={}",
            at(0),
            at(240)
        ))
        .await;
    let cad = &renewal["products"][0];
    assert_eq!(
        (
            cad["product"].as_str(),
            cad["purchased"].as_u64(),
            cad["peak"].as_u64(),
            cad["never_used"].as_u64(),
            cad["denials_true"].as_u64()
        ),
        (Some("cad"), Some(4), Some(4), Some(0), Some(1)),
        "{renewal:#}"
    );
    assert!(
        (cad["hours_at_cap"].as_f64().unwrap() - 0.5).abs() < 1e-9,
        "{renewal:#}"
    );
    assert!(
        cad["suggestion"].as_str().unwrap().starts_with("buy"),
        "{renewal:#}"
    );

    // The same through the CLI: CSV for a spreadsheet, a table for a person.
    let cli = |args: Vec<String>| {
        let url = balancer.url().to_owned();
        async move {
            let out = tokio::process::Command::new(binary("allot-balancer"))
                .args(args)
                .args(["--url", &url, "--admin-token", ADMIN_TOKEN])
                .output()
                .await
                .expect("allot-balancer runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let csv = cli(vec![
        "usage".into(),
        "--by".into(),
        "group".into(),
        "--since".into(),
        at(-60),
        "--until".into(),
        at(24 * 60),
        "--csv".into(),
    ])
    .await;
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "group,checkouts,hours,peak_concurrent,denials_true,denials_false,denials_other",
            "eng,2,6.000,3,1,1,0",
            "cad-users,1,4.000,2,0,0,0",
            "ops,1,1.000,1,0,0,0",
        ],
        "{csv}"
    );
    let table = cli(vec![
        "renewal".into(),
        "--since".into(),
        at(0),
        "--product".into(),
        "cad".into(),
    ])
    .await;
    assert!(table.contains("cad") && table.contains("buy"), "{table}");
}

async fn bad_batches_and_bad_report_queries_change_nothing(backend: Backend) {
    let (_balancer, api, paris) = estate(&backend).await;
    let before = api.get("/v1/usage?since=3650d&group_by=product").await;
    let good = usage(1, "ann", &[], 1, 0, 60);
    let mut backwards = good.clone();
    backwards["ended_at"] = json!(at(-1));
    let mut nameless = good.clone();
    nameless["user"] = json!("");
    let too_many: Vec<Value> = (0..1_001).map(|i| usage(i, "ann", &[], 1, 0, 1)).collect();
    for (body, why) in [
        (
            json!({"usage": [good.clone(), backwards]}),
            "ended before it started",
        ),
        (json!({"usage": [good.clone(), nameless]}), "empty user"),
        (json!({"usage": too_many}), "over the batch bound"),
        (
            json!({"usage": [good.clone()], "extra": 1}),
            "unknown field",
        ),
    ] {
        let (status, answer) = paris.send(Method::POST, "/v1/records", Some(body)).await;
        assert_eq!(status, 400, "{why}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{why}: {answer}");
    }
    // Only a metering server ships records; an admin token is not a server's.
    let (status, _) = api
        .send(Method::POST, "/v1/records", Some(json!({"usage": [good]})))
        .await;
    assert_eq!(status, 401);
    for query in [
        "group_by=nobody",
        "since=yesterday",
        "since=2026-11-02T08:00:00Z&until=2026-11-01T08:00:00Z",
        "since=2020-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",
        "product=a%2Fb",
    ] {
        let (status, answer) = api
            .send(Method::GET, &format!("/v1/usage?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{query}: {answer}");
    }
    let (status, _) = paris.send(Method::GET, "/v1/usage", None).await;
    assert_eq!(status, 401, "reports are for administrators");
    assert_eq!(
        api.get("/v1/usage?since=3650d&group_by=product").await["rows"],
        before["rows"]
    );
}

/// The usage report per user over the last day, as (user, checkouts, denials of any class),
/// by user.
async fn shipped(fleet: &Fleet) -> Vec<(String, u64, u64)> {
    let report = fleet.api().get("/v1/usage?since=1d&group_by=user").await;
    let mut rows: Vec<(String, u64, u64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let denials = ["denials_true", "denials_false", "denials_other"]
                .iter()
                .map(|k| r[k].as_u64().unwrap())
                .sum();
            (
                r["key"].as_str().unwrap().to_owned(),
                r["checkouts"].as_u64().unwrap(),
                denials,
            )
        })
        .collect();
    rows.sort();
    rows
}

async fn metering_servers_ship_every_record_once_across_kill_9_of_both_sides(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 1).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 1, 0).await;
    fleet.balance().await;
    // Ann checks out and in; Bob is denied while she holds the only unit.
    let (status, ann) = fleet.meters[0].checkout("cad", "ann").await;
    assert_eq!(status, 200, "{ann}");
    let (status, bob) = fleet.meters[0].checkout("cad", "bob").await;
    assert_eq!(status, 409, "{bob}");
    fleet.meters[0]
        .checkin(ann["handle"].as_str().unwrap())
        .await;
    // The checkin was acknowledged, so its record is durable: kill -9 before it could ship.
    fleet.meters[0].kill9();
    fleet.meters[0].restart().await;
    allot_tests::eventually(
        "the records reach the balancer",
        Duration::from_secs(30),
        || async { shipped(&fleet).await == [("ann".to_owned(), 1, 0), ("bob".to_owned(), 0, 1)] },
    )
    .await;

    // The balancer dies with records on their way: they wait in the outbox and arrive once.
    fleet.balancer.kill9();
    let (status, carol) = fleet.meters[0].checkout("cad", "carol").await;
    assert_eq!(status, 200, "the lease outlives the balancer: {carol}");
    fleet.meters[0]
        .checkin(carol["handle"].as_str().unwrap())
        .await;
    fleet.balancer.restart().await;
    allot_tests::eventually(
        "carol's record arrives",
        Duration::from_secs(30),
        || async { shipped(&fleet).await.len() == 3 },
    )
    .await;
    // Well after every resend could have happened, each record is counted once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        shipped(&fleet).await,
        [
            ("ann".to_owned(), 1, 0),
            ("bob".to_owned(), 0, 1),
            ("carol".to_owned(), 1, 0),
        ]
    );
    // Bob was denied with nothing free anywhere: a true denial, as the balancer classified the
    // shortfall when it answered the server.
    let bob = fleet.api().get("/v1/usage?since=1d&group_by=user").await;
    let bob = bob["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "bob")
        .cloned()
        .unwrap();
    assert_eq!(
        (bob["denials_true"].as_u64(), bob["denials_false"].as_u64()),
        (Some(1), Some(0)),
        "{bob:#}"
    );
    let metrics = reqwest::get(format!("{}/metrics", fleet.meters[0].url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "allot_agent_records_waiting 0"),
        "{metrics}"
    );
}

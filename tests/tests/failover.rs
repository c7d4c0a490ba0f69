//! High availability: two balancers on one PostgreSQL. The one holding the advisory lock leads;
//! the other answers changes with `not_leader` and the leader's URL, and takes over within a
//! bounded time when the leader is killed, with nothing done before the failover lost.

use allot_core::shard::shard_of;
use allot_tests::Backend;
use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use allot_tests::fleet::Fleet;
use allot_tests::process::binary;
use serde_json::json;
use std::time::{Duration, Instant};

async fn leads(api: &Api) -> bool {
    api.get("/healthz").await["leader"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_takes_over_when_the_leader_dies_and_nothing_is_lost() {
    let Some(backend) = Backend::postgres("failover").await else {
        return;
    };
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    let leader = fleet.api();
    assert!(leads(&leader).await);
    let standby = Balancer::start(&fleet.backend).await;
    let follower = standby.api();
    assert!(!leads(&follower).await, "one leader at a time");

    // The follower serves reads and sends changes to the leader.
    assert_eq!(follower.get("/v1/products").await["items"], json!([]));
    let (status, body) = follower
        .send(
            reqwest::Method::POST,
            "/v1/products",
            Some(json!({"name": "cad"})),
        )
        .await;
    assert_eq!(status.as_u16(), 421, "{body}");
    assert_eq!(body["error"]["code"], "not_leader");
    assert_eq!(body["error"]["leader_url"], fleet.balancer.url());

    // Work done on the leader: books, a server, a balance.
    fleet.balancer_urls = vec![fleet.balancer.url().to_owned(), standby.url().to_owned()];
    fleet.product("cad", 10).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 0, 3).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    let held = fleet.meters[0].checkout("cad", "alice").await;
    assert_eq!(held.0, 200);

    // The leader dies; the follower takes over within the bound.
    fleet.balancer.kill9();
    let died = Instant::now();
    while !leads(&follower).await {
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "no takeover within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = died.elapsed();
    eprintln!("takeover after {} ms", takeover.as_millis());

    // Nothing done before the failover is lost, and the new leader balances.
    let detail = follower.get("/v1/products/cad").await;
    assert_eq!(detail["purchased"], 10);
    assert_eq!(detail["servers"][0]["allocation"], 3);
    let run = follower.post("/v1/balance", json!({})).await;
    assert_ne!(run["status"], "failed", "{run:#}");
    // The metering server follows the new leader: an instant balance through it works.
    let more: Vec<_> = {
        let mut granted = Vec::new();
        for i in 0..5 {
            let (status, _) = fleet.meters[0].checkout("cad", &format!("bob{i}")).await;
            granted.push(status);
        }
        granted
    };
    assert!(
        more.iter().all(|s| *s == 200),
        "checkouts after the failover: {more:?}"
    );
    // The servers' proactive pulls may still be in flight for a moment: wait for quiet books.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = follower.get("/v1/doctor").await;
        if report["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "doctor never agreed: {report:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let audit = Api::new(standby.url(), Some(ADMIN_TOKEN))
        .get("/v1/audit?limit=100")
        .await;
    let takes = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "leader.take")
        .count();
    assert_eq!(takes, 2, "two leaderships, two epochs");
}

/// Sharding: two balancers on one PostgreSQL, each leading one of two shards. Each balances
/// only its own shard's products and sends requests for the other's to its leader (`421` with
/// the URL). When one crashes between a server applying its grant and booking it, the other
/// takes its shard over after the grace period and finishes the move: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_shard_fails_over_on_its_own_and_nothing_is_lost() {
    let Some(backend) = Backend::postgres("shards").await else {
        return;
    };
    // The estate is sharded two ways with the admin CLI, straight on the database.
    let database_url = backend.database_url.clone().unwrap();
    let sharded = std::process::Command::new(binary("allot-balancer"))
        .args(["shards", "--count", "2", "--database-url", &database_url])
        .args(["--data-dir", &backend.data_dir.path().display().to_string()])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&sharded.stdout);
    assert!(sharded.status.success(), "{sharded:?}");
    assert!(
        listing.contains("shard") && listing.contains('1'),
        "{listing}"
    );

    // The second balancer starts first: each is within the other's grace period.
    let grace = ["--shard-grace-seconds", "6"];
    let mut second = Balancer::start_with(
        &backend,
        &[&["--lead-shards", "1"][..], &grace].concat(),
        &[("ALLOT_FAULT_CRASH_AT", "after_move_sent")],
    )
    .await;
    let mut fleet = Fleet::start(
        backend,
        &[&["--lead-shards", "0"][..], &grace].concat(),
        &[],
    )
    .await;
    let first = fleet.api();
    let other = second.api();
    wait_for_shards(&first, &[0], Duration::from_secs(10)).await;
    wait_for_shards(&other, &[1], Duration::from_secs(10)).await;

    let named = |shard: u32| {
        (0..)
            .map(|i| format!("tool{i}"))
            .find(|p| shard_of(p, 2) == shard)
            .unwrap()
    };
    let (mine, theirs) = (named(0), named(1));
    fleet.balancer_urls = vec![fleet.balancer.url().to_owned(), second.url().to_owned()];
    fleet.product(&mine, 10).await;
    fleet.product(&theirs, 10).await;
    fleet.add_meter("paris").await;
    fleet.wait_synced(&mine).await;
    fleet.wait_synced(&theirs).await;
    fleet.limits("paris", &mine, 0, 3).await;
    fleet.limits("paris", &theirs, 0, 3).await;

    // Each leader balances its own shard's products only, and sends the caller to the leader
    // of the other's.
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", &mine).await, 3);
    assert_eq!(fleet.allocation("paris", &theirs).await, 0);
    let as_server = Api::new(fleet.balancer.url(), Some(&fleet.meters[0].token));
    let instant = async |product: &str| {
        let ask = json!({"request_id": uuid::Uuid::new_v4(), "product": product, "units": 1});
        as_server
            .send(reqwest::Method::POST, "/v1/instant-balance", Some(ask))
            .await
    };
    let (status, body) = instant(&theirs).await;
    assert_eq!(status.as_u16(), 421, "{body}");
    assert_eq!(body["error"]["code"], "not_leader");
    assert_eq!(body["error"]["leader_url"], second.url());
    let (status, body) = first
        .send(
            reqwest::Method::POST,
            "/v1/balance",
            Some(json!({"product": theirs})),
        )
        .await;
    assert_eq!(status.as_u16(), 421, "{body}");
    assert_eq!(body["error"]["leader_url"], second.url());

    // The second balancer's run grants to paris; paris applies it and the balancer dies before
    // booking it. The first takes the shard over after the grace period, not before, keeps its
    // own meanwhile, and finishes the move from the move log.
    let crashed = reqwest::Client::new()
        .post(format!("{}/v1/balance", second.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await;
    assert!(
        crashed.is_err() || !crashed.unwrap().status().is_success(),
        "the run should have died with its balancer"
    );
    assert!(second.wait_exit(Duration::from_secs(10)), "no crash");
    let died = Instant::now();
    wait_for_shards(&first, &[0, 1], Duration::from_secs(20)).await;
    let takeover = died.elapsed();
    eprintln!("shard 1 taken over after {} ms", takeover.as_millis());
    assert!(
        takeover >= Duration::from_secs(4),
        "before the grace period: {takeover:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.allocation("paris", &theirs).await != 3 {
        assert!(
            Instant::now() < deadline,
            "the crashed run's grant was not finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nothing of the dead leader's books is lost, and the survivor serves both shards.
    let (status, body) = instant(&theirs).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let mut served = Vec::new();
    for i in 0..5 {
        served.push(
            fleet.meters[0]
                .checkout(&theirs, &format!("bob{i}"))
                .await
                .0,
        );
        served.push(fleet.meters[0].checkout(&mine, &format!("ann{i}")).await.0);
    }
    assert!(served.iter().all(|s| *s == 200), "checkouts: {served:?}");
    fleet.assert_doctor_ok().await;
    let audit = first.get("/v1/audit?limit=200").await;
    let takes: Vec<_> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "leader.take")
        .collect();
    assert_eq!(takes.len(), 3, "shard 0 once, shard 1 twice: {takes:#?}");
}

/// Waits until `api` leads exactly `shards`.
async fn wait_for_shards(api: &Api, shards: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let health = api.get("/healthz").await;
        if health["shards"] == json!(shards) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never led shards {shards:?}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

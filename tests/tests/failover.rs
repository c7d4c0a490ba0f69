//! High availability: two balancers on one PostgreSQL. The one holding the advisory lock leads;
//! the other answers changes with `not_leader` and the leader's URL, and takes over within a
//! bounded time when the leader is killed, with nothing done before the failover lost.

use allot_tests::Backend;
use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use allot_tests::fleet::Fleet;
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

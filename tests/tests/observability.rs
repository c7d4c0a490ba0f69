//! Observability against the real thing: a real balancer and metering servers under some load,
//! scraped by a real Prometheus configured from `dashboards/prometheus.yml`, and every PromQL
//! expression of every dashboard and alert rule evaluated through Prometheus's HTTP API. A
//! dashboard with a typo shows an empty panel exactly when someone needs it; this test is
//! where that typo fails instead.
//!
//! Needs `prometheus` and `promtool` on PATH (Debian's `prometheus` package; `.ci/run`
//! installs it). Without them the test fails under `CI=true` and skips loudly otherwise.

use allot_tests::fleet::Fleet;
use allot_tests::prometheus::{
    self, DashboardQuery, Prometheus, dashboard_queries, metric_names, substitute,
};
use allot_tests::{Backend, balancer::Api};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Puts the fleet under load that touches every family: checkouts, checkins, heartbeats,
/// instant balances granted and short, denials, and two manual runs (the second records
/// usage samples with units in use).
async fn load(fleet: &Fleet) {
    let paris = &fleet.meters[0];
    fleet.limits("paris", "cad", 0, 1).await;
    fleet.limits("tokyo", "cad", 0, 1).await;
    fleet.balance().await;
    let mut handles = Vec::new();
    for i in 0..4 {
        let (status, body) = paris.checkout("cad", &format!("user{i}")).await;
        assert_eq!(status, 200, "checkout of cad: {body}");
        handles.push(body["handle"].as_str().expect("a handle").to_owned());
    }
    let mut denied = 0;
    for i in 0..3 {
        let (status, _) = fleet.meters[1].checkout("sim", &format!("user{i}")).await;
        if status != 200 {
            denied += 1;
        }
    }
    assert!(denied > 0, "sim has 2 units: the third checkout is denied");
    let client = Api::new(&paris.url(), None);
    client
        .post("/v1/heartbeat", json!({"handle": handles[0]}))
        .await;
    paris.checkin(&handles[1]).await;
    fleet.balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_and_alert_query_is_valid_against_real_processes() {
    let started = Instant::now();
    let Some(tools) = prometheus::tools("observability") else {
        return;
    };
    let dashboards = repo().join("dashboards");
    let rules_file = dashboards.join("alerts.yml");
    prometheus::promtool(
        &tools,
        &["check", "rules", &rules_file.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let mut fleet = Fleet::start(Backend::sqlite(), &[], &[]).await;
    fleet.product("cad", 6).await;
    // A dated purchase, so the expiry gauges and alerts have a series to read.
    let renewal = chrono::Utc::now() + chrono::Duration::days(10);
    fleet
        .api()
        .post(
            "/v1/products/cad/entitlements",
            serde_json::json!({"units": 2, "expires_at": renewal}),
        )
        .await;
    fleet.product("sim", 2).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    fleet.wait_synced("sim").await;
    load(&fleet).await;

    // The example configuration, pointed at this fleet.
    let host = |url: &str| url.trim_start_matches("http://").to_owned();
    let targets = BTreeMap::from([
        ("allot-balancer", vec![host(fleet.balancer.url())]),
        (
            "allot-agent",
            fleet.meters.iter().map(|m| host(&m.url())).collect(),
        ),
    ]);
    let example = std::fs::read_to_string(dashboards.join("prometheus.yml"))
        .expect("dashboards/prometheus.yml");
    let config = prometheus::rewrite_scrape_config(&example, &targets, "1s", &dashboards)
        .unwrap_or_else(|e| panic!("dashboards/prometheus.yml: {e}"));
    let dir = tempfile::tempdir().expect("a config directory");
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, &config).expect("write the config");
    prometheus::promtool(
        &tools,
        &["check", "config", &config_file.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}\n{config}"));

    let prom = Prometheus::start(&tools, &config_file).await;
    prom.wait_scraped(3, 4, Duration::from_secs(30)).await;
    let exported = prom.metric_names().await;
    let mut failures = Vec::new();

    // Grafana's variables as the test's fleet gives them values.
    let values = BTreeMap::from([
        ("server", "paris".to_owned()),
        ("instance", host(&fleet.meters[0].url())),
        ("product", "cad".to_owned()),
        ("datasource", "allot-prometheus".to_owned()),
        ("__rate_interval", "1m".to_owned()),
        ("__interval", "5s".to_owned()),
        ("__range", "1h".to_owned()),
    ]);
    let mut queries: Vec<(DashboardQuery, bool)> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dashboards)
        .expect("dashboards/")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "four dashboards expected: {files:?}");
    for file in &files {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(file).expect("read a dashboard"))
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", file.display()));
        let found = dashboard_queries(&dashboard);
        assert!(!found.is_empty(), "{}: no queries", file.display());
        // Every panel query must show data on this fleet; variable queries only be valid.
        queries.extend(found.into_iter().map(|q| {
            let needs_data = !q.variable;
            (q, needs_data)
        }));
    }

    // The alert rules, as Prometheus itself loaded them through the example configuration.
    let rules = prom.get("/api/v1/rules").await.expect("rules");
    let loaded: Vec<&Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let in_file = std::fs::read_to_string(&rules_file)
        .expect("alerts.yml")
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(
        loaded.len(),
        in_file,
        "Prometheus loaded {} rules, alerts.yml has {in_file}",
        loaded.len()
    );
    for rule in &loaded {
        queries.push((
            DashboardQuery {
                location: format!("alerts.yml / {}", rule["name"].as_str().unwrap_or("?")),
                expr: rule["query"].as_str().unwrap_or_default().to_owned(),
                variable: false,
            },
            false,
        ));
    }

    for (q, needs_data) in &queries {
        let expr = match substitute(&q.expr, &values) {
            Ok(expr) => expr,
            Err(e) => {
                failures.push(format!("{}: {e}", q.location));
                continue;
            }
        };
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                failures.push(format!(
                    "{}: reads {name}, which no process exports",
                    q.location
                ));
            }
        }
        match prom.query(&expr).await {
            Ok(result) if result.is_empty() && *needs_data => {
                failures.push(format!("{}: no data for {expr}", q.location));
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: invalid: {e}\n    {expr}", q.location)),
        }
    }

    // Every rule evaluates without error inside Prometheus too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rules = prom.get("/api/v1/rules").await.expect("rules");
        let all: Vec<Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = all
            .iter()
            .all(|r| r["health"] != "unknown" && r["lastEvaluation"] != "0001-01-01T00:00:00Z");
        if evaluated || Instant::now() > deadline {
            for r in all.iter().filter(|r| r["health"] != "ok") {
                failures.push(format!(
                    "alerts.yml / {}: health {} {}",
                    r["name"], r["health"], r["lastError"]
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // docs/OPERATIONS.md explains every exported metric and every alert.
    let operations = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).unwrap_or_default();
    let families: BTreeSet<&str> = exported
        .iter()
        .filter(|n| n.starts_with("allot_"))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|base| exported.contains(&format!("{base}_bucket")))
                .unwrap_or(n)
        })
        .collect();
    for family in &families {
        if !operations.contains(&format!("`{family}`")) {
            failures.push(format!("docs/OPERATIONS.md does not document `{family}`"));
        }
    }
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap_or("?");
        if !operations.contains(name) {
            failures.push(format!("docs/OPERATIONS.md does not explain alert {name}"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} queries or checks failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    eprintln!(
        "observability: {} queries over {} dashboards and {} alert rules, {} metric families \
         checked in {:.1?}",
        queries.len(),
        files.len(),
        loaded.len(),
        families.len(),
        started.elapsed()
    );
}

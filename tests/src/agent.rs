//! Harness for the metering-server tests: a real `allot-agent` server in-process on
//! `127.0.0.1:0`, with its own data directory, talked to over real HTTP.

use allot_agent::server::{ServerConfig, run};
use serde_json::{Value, json};
use std::future::Future;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The server token every test agent is started with.
pub const TOKEN: &str = "test-server-token";

/// A running metering server.
pub struct TestAgent {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// A plain HTTP client (keep-alive pool).
    pub http: reqwest::Client,
    /// The data directory, kept for restarts.
    pub dir: TempDir,
    /// The server token it was started with (presented on the balancer-facing calls).
    pub token: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), allot_agent::server::ServeError>>>,
}

/// A status code and a JSON body.
pub type Reply = (u16, Value);

impl TestAgent {
    /// Starts a server on a fresh data directory.
    pub async fn start() -> TestAgent {
        Self::start_in(TempDir::new().expect("temp dir"), |_| {}).await
    }

    /// Starts a server on `dir`, letting the test adjust the configuration.
    pub async fn start_in(dir: TempDir, adjust: impl FnOnce(&mut ServerConfig)) -> TestAgent {
        Self::start_on(bind().await, dir, adjust).await
    }

    /// Starts a server on an already bound `listener` (so its URL can be registered with a
    /// balancer first), with the test token unless `adjust` sets another.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        dir: TempDir,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestAgent {
        let mut config = ServerConfig::new(dir.path());
        config.token = Some(TOKEN.to_owned());
        config.name = "test-agent".to_owned();
        adjust(&mut config);
        let token = config.token.clone().unwrap_or_default();
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, config, async move {
            let _ = rx.await;
        }));
        let agent = TestAgent {
            url,
            http: reqwest::Client::new(),
            dir,
            token,
            shutdown: Some(tx),
            task: Some(task),
        };
        let started = poll_until(Duration::from_secs(10), || async {
            agent.get("/healthz").await.0 == 200
        })
        .await;
        assert!(started, "agent did not start");
        agent
    }

    /// Stops the server gracefully and returns its data directory for a restart.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
        std::mem::replace(&mut self.dir, TempDir::new().expect("temp dir"))
    }

    async fn reply(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// GET without credentials.
    pub async fn get(&self, path: &str) -> Reply {
        match self.http.get(format!("{}{}", self.url, path)).send().await {
            Ok(r) => Self::reply(r).await,
            Err(_) => (0, Value::Null),
        }
    }

    /// GET with the server token.
    pub async fn get_auth(&self, path: &str) -> Reply {
        let r = self
            .http
            .get(format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("request");
        Self::reply(r).await
    }

    /// POST a JSON body without credentials (the client API).
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        let r = self
            .http
            .post(format!("{}{}", self.url, path))
            .json(body)
            .send()
            .await
            .expect("request");
        Self::reply(r).await
    }

    /// POST a JSON body with the server token (the balancer API).
    pub async fn post_auth(&self, path: &str, body: &Value) -> Reply {
        let r = self
            .http
            .post(format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("request");
        Self::reply(r).await
    }

    /// Defines a product with the given policy JSON (fields of `ProductDefinition`).
    pub async fn define(&self, product: &str, policy: Value) {
        let r = self
            .http
            .put(format!("{}/v1/products/{product}", self.url))
            .bearer_auth(&self.token)
            .json(&policy)
            .send()
            .await
            .expect("request");
        let (status, body) = Self::reply(r).await;
        assert_eq!(status, 200, "define {product}: {body}");
    }

    /// Grants units to a product under a fresh move id.
    pub async fn grant(&self, product: &str, units: u32) -> Value {
        let (status, body) = self
            .post_auth(
                "/v1/allocations/grant",
                &json!({"move_id": uuid::Uuid::new_v4(), "product": product, "units": units}),
            )
            .await;
        assert_eq!(status, 200, "grant: {body}");
        body
    }

    /// Defines a product with `policy` and grants it `units`.
    pub async fn product(&self, product: &str, policy: Value, units: u32) {
        self.define(product, policy).await;
        if units > 0 {
            self.grant(product, units).await;
        }
    }

    /// A checkout of one unit by `user` on `host`.
    pub async fn checkout(&self, product: &str, user: &str, host: &str) -> Reply {
        self.post(
            "/v1/checkout",
            &json!({"product": product, "user": user, "host": host}),
        )
        .await
    }

    /// Checks a handle in.
    pub async fn checkin(&self, handle: &str) -> Reply {
        self.post("/v1/checkin", &json!({"handle": handle})).await
    }

    /// Heartbeats a handle.
    pub async fn heartbeat(&self, handle: &str) -> Reply {
        self.post("/v1/heartbeat", &json!({"handle": handle})).await
    }

    /// One product's client view (`GET /v1/products`).
    pub async fn view(&self, product: &str) -> Value {
        let (status, body) = self.get("/v1/products").await;
        assert_eq!(status, 200);
        body["products"]
            .as_array()
            .expect("products")
            .iter()
            .find(|p| p["product"] == product)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The whole client view, for before/after comparisons.
    pub async fn snapshot(&self) -> Value {
        self.get("/v1/products").await.1
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics");
        r.text().await.expect("metrics text")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A loopback listener on a free port, for [`TestAgent::start_on`].
pub async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

/// Polls `check` until it holds or `limit` passes; never sleeps longer than 10 ms at a time.
pub async fn poll_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hard-stop, concurrent-seat policy with the given staleout (heartbeat 1 s).
pub fn hard_stop(staleout_seconds: u32) -> Value {
    json!({"enforcement": "hard_stop", "seat": "concurrent", "heartbeat_seconds": 1,
        "staleout_seconds": staleout_seconds})
}

//! A real `allot-balancer serve` process and a small JSON client for its API.

use crate::Backend;
use crate::process::{Running, binary, free_port};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// The admin token the test balancers are started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A running balancer on a loopback port, restartable on the same books.
pub struct Balancer {
    process: Running,
    port: u16,
    console_port: u16,
    args: Vec<String>,
}

impl Balancer {
    /// Starts a balancer on `backend` with the test admin token.
    pub async fn start(backend: &Backend) -> Self {
        Self::start_with(backend, &[], &[]).await
    }

    /// Starts a balancer with extra `serve` flags and environment (e.g. a crash point).
    /// Its two ports are picked at random among free ones, and a parallel test may bind one
    /// first (the balancer then exits at start-up): it is started again on two others, up to
    /// three times.
    pub async fn start_with(backend: &Backend, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = free_port();
            let console_port = free_port();
            let mut args = vec![
                "serve".to_owned(),
                "--listen".to_owned(),
                format!("127.0.0.1:{port}"),
                "--console-listen".to_owned(),
                format!("127.0.0.1:{console_port}"),
                "--data-dir".to_owned(),
                backend.data_dir.path().display().to_string(),
                "--admin-token".to_owned(),
                ADMIN_TOKEN.to_owned(),
            ];
            if let Some(url) = &backend.database_url {
                args.extend(["--database-url".to_owned(), url.clone()]);
            }
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            match Self::try_spawn(&args, port, env).await {
                Ok(process) => {
                    return Self {
                        process,
                        port,
                        console_port,
                        args,
                    };
                }
                Err(status) if attempts < 3 => {
                    eprintln!(
                        "balancer on ports {port}/{console_port} exited at start-up ({status}); trying two others"
                    );
                }
                Err(status) => panic!(
                    "the balancer exited before it became healthy, {attempts} times: {status}"
                ),
            }
        }
    }

    async fn try_spawn(
        args: &[String],
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<Running, std::process::ExitStatus> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut envs = vec![("RUST_LOG", "warn")];
        envs.extend_from_slice(env);
        Running::try_start_at(
            &binary("allot-balancer"),
            &args,
            &envs,
            format!("http://127.0.0.1:{port}"),
            &reqwest::Client::new(),
        )
        .await
    }

    /// Starts the balancer again on its own ports (a restart keeps the URL servers know).
    async fn spawn(args: &[String], port: u16, env: &[(&str, &str)]) -> Running {
        Self::try_spawn(args, port, env)
            .await
            .unwrap_or_else(|status| {
                panic!("the balancer on port {port} exited before it became healthy: {status}")
            })
    }

    /// The balancer's base URL.
    pub fn url(&self) -> &str {
        &self.process.url
    }

    /// The operator's console's base URL.
    pub fn console_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.console_port)
    }

    /// An API client with the admin token.
    pub fn api(&self) -> Api {
        Api::new(self.url(), Some(ADMIN_TOKEN))
    }

    /// SIGKILL, then start again on the same port and books.
    pub async fn kill9_and_restart(&mut self) {
        self.process.kill9();
        self.process = Self::spawn(&self.args, self.port, &[]).await;
    }

    /// Waits (at most `limit`) for the process to exit by itself, e.g. at a crash point, then
    /// starts it again on the same port and books, without the crash point.
    pub async fn restart_after_exit(&mut self, limit: Duration) {
        assert!(
            self.wait_exit(limit),
            "the balancer did not stop at its crash point"
        );
        self.process = Self::spawn(&self.args, self.port, &[]).await;
    }

    /// Waits (at most `limit`) for the process to exit by itself, e.g. at a crash point, and
    /// leaves it dead; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        self.process.wait_exit(limit)
    }

    /// SIGKILL, leaving it dead.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts it again (after [`Balancer::kill9`]) on the same port, flags and books.
    pub async fn restart(&mut self) {
        self.process = Self::spawn(&self.args, self.port, &[]).await;
    }

    /// SIGTERM; returns whether the process exited cleanly.
    pub fn terminate(&mut self) -> bool {
        self.process.terminate()
    }
}

/// A JSON client that returns status and body, so tests can assert on errors as well.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    /// A client of `base`, presenting `token` when given.
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.map(str::to_owned),
        }
    }

    /// A client of `base` that sends its requests through `http` (e.g. one trusting a test CA).
    pub fn with_http(http: reqwest::Client, base: &str, token: Option<&str>) -> Self {
        Self {
            http,
            base: base.to_owned(),
            token: token.map(str::to_owned),
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// Sends a request with an optional raw body; answers status and JSON (Null if empty), or
    /// the transport error (connection refused or reset, as when the server is killed).
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON answer {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Ok((status, value))
    }

    /// [`Api::try_raw`] for a server that must be up.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        self.try_raw(method, path, body)
            .await
            .expect("the request reaches the server")
    }

    /// Sends `body` as JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.raw(method, path, body.map(|b| serde_json::to_vec(&b).unwrap()))
            .await
    }

    /// GET that must succeed.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.send(Method::GET, path, None).await;
        assert!(status.is_success(), "GET {path}: {status} {body}");
        body
    }

    /// POST that must succeed.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.send(Method::POST, path, Some(body)).await;
        assert!(status.is_success(), "POST {path}: {status} {answer}");
        answer
    }

    /// PUT that must succeed.
    pub async fn put(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.send(Method::PUT, path, Some(body)).await;
        assert!(status.is_success(), "PUT {path}: {status} {answer}");
        answer
    }
}

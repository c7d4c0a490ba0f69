//! The operator's web console: server-rendered HTML on its own port (`--console-listen`),
//! assets compiled into the binary, one small script file, no inline script (CSP
//! `default-src 'self'`).
//!
//! It is another face of the admin API, not a second implementation of it: every page reads
//! through the API's own handlers or the store and engine functions they call, and every
//! change goes through the same handler the JSON API uses (same validation, same audit), with
//! the operator's name as the actor. It lives under `api` for that reason: the handlers are
//! visible to it and to nothing else.
//!
//! Security: operators log in (`crate::operators`, throttled) and get a session
//! ([`session`]): an `HttpOnly; SameSite=Strict` cookie, `Secure` under TLS. Every change is a
//! POST carrying the session's CSRF token, checked here before anything else; viewers see no
//! forms and their forged POSTs are refused. No token or checkout handle is ever rendered
//! (checkouts are named by their public id; a server token is offered once as a download).

mod pages;
pub mod session;
mod svg;

use super::{Admin, AppState};
use crate::operators::{LoginError, Role};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use minijinja::Environment;
use session::{Session, Sessions};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;

/// Everything the console's handlers share: the API's state and the console's own.
#[derive(Clone)]
pub struct Console {
    /// The API's state: the store, the engine, the operators' authenticator.
    app: AppState,
    /// Live sessions.
    sessions: Arc<Sessions>,
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
    /// The pages' templates, compiled once.
    templates: Arc<Environment<'static>>,
}

/// Each template, compiled into the binary.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("assets/base.html")),
    ("login.html", include_str!("assets/login.html")),
    ("error.html", include_str!("assets/error.html")),
    ("estate.html", include_str!("assets/estate.html")),
    ("estate_live.html", include_str!("assets/estate_live.html")),
    ("product.html", include_str!("assets/product.html")),
    ("checkouts.html", include_str!("assets/checkouts.html")),
    ("usage.html", include_str!("assets/usage.html")),
    ("runs.html", include_str!("assets/runs.html")),
    ("run.html", include_str!("assets/run.html")),
    ("audit.html", include_str!("assets/audit.html")),
    ("schedule.html", include_str!("assets/schedule.html")),
    (
        "entitlements.html",
        include_str!("assets/entitlements.html"),
    ),
    ("servers.html", include_str!("assets/servers.html")),
    ("operators.html", include_str!("assets/operators.html")),
];

/// The stylesheet and the script, compiled into the binary.
const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The Content-Security-Policy of every answer: nothing from elsewhere, no inline script or
/// style, no framing, forms post only here.
const CSP: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                   form-action 'self'; base-uri 'none'; object-src 'none'";

/// The largest form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;

impl Console {
    /// The console over the API's `app` state; `secure` when it is served over TLS.
    pub fn new(app: AppState, secure: bool) -> Self {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("console template {name}: {e}"));
        }
        env.add_filter("when", when);
        Self {
            app,
            sessions: Arc::default(),
            secure,
            templates: Arc::new(env),
        }
    }

    /// Renders template `name` with `context`.
    fn render(&self, name: &str, context: minijinja::Value) -> Result<String, ConsoleError> {
        self.templates
            .get_template(name)
            .and_then(|t| t.render(context))
            .map_err(|e| {
                tracing::error!(template = name, error = %e, "console template failed");
                ConsoleError::Internal
            })
    }

    /// Renders a page of the console for `visitor`, with the header's context.
    fn page(
        &self,
        visitor: &Visitor,
        name: &str,
        key: &str,
        title: &str,
        context: minijinja::Value,
    ) -> Result<Response, ConsoleError> {
        let flash = self.sessions.take_flash(&visitor.id);
        let common = minijinja::context! {
            title => title,
            page => key,
            nav => NAV.iter().map(|(k, label, href)| minijinja::context! {
                key => k, label => label, href => href,
            }).collect::<Vec<_>>(),
            operator => &visitor.session.operator,
            role => visitor.session.role.as_str(),
            csrf => &visitor.session.csrf,
            can_change => visitor.session.is_admin(),
            leading => self.app.leadership.borrow().leads_any(),
            flash => flash,
        };
        let html = self.render(name, minijinja::context! { ..common, ..context })?;
        Ok(Html(html).into_response())
    }

    /// The check before any change: the form's CSRF token, the operator's role and this
    /// balancer's leadership, in that order; the [`Admin`] the API's handlers act as.
    fn change(&self, visitor: &Visitor, csrf: &str) -> Result<Admin, ConsoleError> {
        if !visitor.session.csrf_matches(csrf) {
            return Err(ConsoleError::Forbidden(
                "the form's CSRF token is missing or wrong: reload the page and try again".into(),
            ));
        }
        if !visitor.session.is_admin() {
            return Err(ConsoleError::Forbidden(format!(
                "operator {} is a viewer: viewers change nothing",
                visitor.session.operator
            )));
        }
        if !self.app.leadership.borrow().leads_any() {
            return Err(ConsoleError::Api(super::ApiError::new(
                allot_core::ErrorCode::NotLeader,
                "this balancer follows: make changes on the leader's console",
            )));
        }
        Ok(Admin {
            actor: visitor.session.operator.clone(),
        })
    }

    /// After a change: a message for the next page, and a redirect to it (post/redirect/get).
    fn done(&self, visitor: &Visitor, to: &str, text: String) -> Response {
        self.sessions.flash(&visitor.id, "ok", text);
        Redirect::to(to).into_response()
    }
}

/// The pages in the navigation bar: key, label, address.
const NAV: &[(&str, &str, &str)] = &[
    ("estate", "Estate", "/"),
    ("checkouts", "Checkouts", "/checkouts"),
    ("usage", "Usage", "/usage"),
    ("runs", "Runs", "/runs"),
    ("audit", "Audit", "/audit"),
    ("schedule", "Schedule", "/schedule"),
    ("entitlements", "Entitlements", "/entitlements"),
    ("servers", "Servers", "/servers"),
    ("operators", "Operators", "/operators"),
];

/// A time as `YYYY-MM-DD HH:MM` (UTC), or a dash when absent.
fn when(value: minijinja::Value) -> String {
    match value.as_str() {
        Some(text) if text.len() >= 16 => text[..16].replace('T', " "),
        Some(text) => text.to_owned(),
        None => "—".to_owned(),
    }
}

/// A logged-in operator and their session's cookie value.
pub struct Visitor {
    /// The cookie value (the session's key; never rendered).
    id: String,
    /// The session.
    session: Session,
}

impl FromRequestParts<Console> for Visitor {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Console,
    ) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| session::cookie(v, session::COOKIE))
            .map(str::to_owned);
        let page = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        let login = || ConsoleError::LoginNeeded { page };
        let id = id.ok_or_else(login)?;
        let mut session = console
            .sessions
            .get(&id, Instant::now())
            .ok_or_else(login)?;
        // The operator as stored now: a removed operator's sessions end here.
        if session.operator != Admin::ROOT {
            match console
                .app
                .store
                .operator_credentials(&session.operator)
                .await
            {
                Ok(Some((operator, _))) => {
                    if operator.role != session.role {
                        console.sessions.set_role(&id, operator.role);
                        session.role = operator.role;
                    }
                }
                Ok(None) => {
                    console.sessions.end(&id);
                    return Err(login());
                }
                Err(e) => return Err(ConsoleError::Api(e.into())),
            }
        }
        Ok(Visitor { id, session })
    }
}

/// Why a console request failed; each answers with an HTML page, the right status and a
/// stable code (`data-code`).
#[derive(Debug)]
pub enum ConsoleError {
    /// No live session: pages go to the login form, other requests get `401`.
    LoginNeeded {
        /// The browser asked for a page (`Accept: text/html`).
        page: bool,
    },
    /// A bad form or query: `400 bad_request`.
    BadRequest(String),
    /// No CSRF token, or a viewer's change: `403 forbidden`.
    Forbidden(String),
    /// No such page.
    NotFound,
    /// An API handler refused: its code and status.
    Api(super::ApiError),
    /// A template failed (a bug): `500 internal`.
    Internal,
}

impl From<super::ApiError> for ConsoleError {
    fn from(e: super::ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<crate::store::StoreError> for ConsoleError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Api(e.into())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::LoginNeeded { page: true } => return Redirect::to("/login").into_response(),
            Self::LoginNeeded { page: false } => (
                StatusCode::UNAUTHORIZED,
                "unauthorized".to_owned(),
                "log in first".to_owned(),
            ),
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request".to_owned(), m),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden".to_owned(), m),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found".to_owned(),
                "no such page".to_owned(),
            ),
            Self::Api(e) => (
                StatusCode::from_u16(e.code().http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                e.code().as_str().to_owned(),
                e.message().to_owned(),
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal".to_owned(),
                "the page could not be rendered; see the balancer's log".to_owned(),
            ),
        };
        let body = ERROR_PAGE
            .get_template("error.html")
            .and_then(|t| {
                t.render(minijinja::context! {
                    status => status.as_u16(), code => code, message => message,
                })
            })
            .unwrap_or_else(|_| format!("{status}: {message}"));
        (status, Html(body)).into_response()
    }
}

/// The error page's template, apart from the console's state (errors happen before it).
static ERROR_PAGE: std::sync::LazyLock<Environment<'static>> = std::sync::LazyLock::new(|| {
    let mut env = Environment::new();
    env.add_template("error.html", include_str!("assets/error.html"))
        .expect("the error template compiles");
    env
});

/// A urlencoded form whose rejections answer `400 bad_request`.
pub struct ConsoleForm<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequest<S> for ConsoleForm<T> {
    type Rejection = ConsoleError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ConsoleError> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(value)) => Ok(Self(value)),
            Err(e) => Err(ConsoleError::BadRequest(format!(
                "bad form: {}",
                e.body_text()
            ))),
        }
    }
}

/// The console's routes.
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(pages::estate))
        .route("/estate/live", get(pages::estate_live))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/products/{product}", get(pages::product))
        .route("/products/{product}/limits", post(pages::set_limits))
        .route("/checkouts", get(pages::checkouts))
        .route("/checkouts/{id}/revoke", post(pages::revoke))
        .route("/usage", get(pages::usage))
        .route("/usage.csv", get(pages::usage_csv))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/audit", get(pages::audit))
        .route("/schedule", get(pages::schedule).post(pages::set_schedule))
        .route("/schedule/apply", post(pages::apply_advice))
        .route(
            "/entitlements",
            get(pages::entitlements).post(pages::add_entitlement),
        )
        .route(
            "/entitlements/{product}/{id}/remove",
            post(pages::remove_entitlement),
        )
        .route("/servers", get(pages::servers).post(pages::register_server))
        .route("/servers/{server}/drain", post(pages::drain_server))
        .route("/servers/{server}/rotate-token", post(pages::rotate_token))
        .route(
            "/operators",
            get(pages::operators).post(pages::add_operator),
        )
        .route("/operators/{name}/remove", post(pages::remove_operator))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .fallback(|| async { ConsoleError::NotFound })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// Headers on every answer: the CSP, no sniffing, no referrer, no framing, and no caching of
/// pages (they hold the CSRF token and the books).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        JS,
    )
        .into_response()
}

async fn login_page(State(console): State<Console>) -> Result<Response, ConsoleError> {
    Ok(Html(console.render("login.html", minijinja::context! {})?).into_response())
}

/// The login form.
#[derive(serde::Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
}

/// Logs an operator in (or `admin` with the admin token), throttled per name and address.
async fn login(
    State(console): State<Console>,
    PeerIp(addr): PeerIp,
    ConsoleForm(form): ConsoleForm<LoginForm>,
) -> Result<Response, ConsoleError> {
    let result = if form.name == Admin::ROOT {
        root_login(&console, &form.password, addr)
    } else {
        console
            .app
            .operators
            .login(&form.name, &form.password, addr)
            .await
            .map(|o| (o.name, o.role))
    };
    match result {
        Ok((name, role)) => {
            let id = console.sessions.start(&name, role, Instant::now());
            tracing::info!(operator = %name, role = role.as_str(), "console login");
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&session::set_cookie(Some(&id), console.secure))
                    .expect("a cookie of hex digits is a valid header"),
            );
            Ok(response)
        }
        Err(LoginError::Store(e)) => Err(ConsoleError::Api(e.into())),
        Err(e) => {
            tracing::info!(operator = %form.name, error = %e, "console login refused");
            let html =
                console.render("login.html", minijinja::context! { error => e.to_string() })?;
            Ok((StatusCode::UNAUTHORIZED, Html(html)).into_response())
        }
    }
}

/// The address a request came from, if known (for the login throttle).
pub struct PeerIp(Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(super::peer_ip(parts)))
    }
}

/// `admin` logs in with the admin token (the root credential), under the same throttle.
fn root_login(
    console: &Console,
    token: &str,
    addr: Option<std::net::IpAddr>,
) -> Result<(String, Role), LoginError> {
    let throttle = console.app.operators.throttle();
    if let Some(wait) = throttle.wait(Admin::ROOT, addr, Instant::now()) {
        return Err(LoginError::Throttled(wait));
    }
    if console.app.admin.verify(token) {
        throttle.succeeded(Admin::ROOT);
        Ok((Admin::ROOT.to_owned(), Role::Admin))
    } else {
        throttle.failed(Admin::ROOT, addr, Instant::now());
        Err(LoginError::Wrong)
    }
}

/// The logout form: only the CSRF token.
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Ends the session (a CSRF-checked POST, so no page can log an operator out).
async fn logout(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    if !visitor.session.csrf_matches(&form.csrf) {
        return Err(ConsoleError::Forbidden(
            "the form's CSRF token is missing or wrong".into(),
        ));
    }
    console.sessions.end(&visitor.id);
    tracing::info!(operator = %visitor.session.operator, "console logout");
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::set_cookie(None, console.secure))
            .expect("a constant cookie is a valid header"),
    );
    Ok(response)
}

/// Serves the console on `listener` (over TLS when `tls` is given) until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    tls: Option<allot_http::tls::ServerTls>,
    console: Console,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(console).into_make_service_with_connect_info::<super::Peer>();
    match tls {
        Some(tls) => {
            axum::serve(tls.listener(listener)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

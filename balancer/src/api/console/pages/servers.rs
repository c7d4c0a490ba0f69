//! The console's servers page.

use crate::api::console::{Console, ConsoleError, ConsoleForm, CsrfForm, Visitor};
use crate::api::{ApiJson, ApiPath, servers};
use allot_core::wire::balancer::{RegisterServer, RotateToken};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A server unheard of for longer than this is shown as silent.
const SILENT_AFTER: chrono::Duration = chrono::Duration::minutes(15);

#[derive(Serialize)]
struct ServerRow {
    #[serde(flatten)]
    server: allot_core::wire::balancer::Server,
    health: String,
    lease_ends: DateTime<Utc>,
}

/// The metering servers: state, health, lease; drain, rotate a token, register.
pub(in crate::api::console) async fn servers(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let lease = chrono::Duration::from_std(console.app.engine.config().lease).unwrap_or_default();
    let now = Utc::now();
    let rows: Vec<ServerRow> = console
        .app
        .store
        .servers()
        .await?
        .into_iter()
        .map(|server| {
            let heard = server.last_seen_at.unwrap_or(server.created_at);
            let health = match server.last_seen_at {
                None => "never heard from".to_owned(),
                Some(at) if now - at > SILENT_AFTER => {
                    format!("silent for {} min", (now - at).num_minutes())
                }
                Some(_) => "ok".to_owned(),
            };
            ServerRow {
                lease_ends: heard + lease,
                health,
                server,
            }
        })
        .collect();
    console.page(
        &visitor,
        "servers.html",
        "servers",
        "Servers",
        minijinja::context! { servers => rows },
    )
}

/// The new server's token, offered once as a file to save: never rendered into a page.
fn token_download(server: &str, token: &str) -> Response {
    let name: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"allot-server-{name}.token\""),
            ),
        ],
        format!("{token}\n"),
    )
        .into_response()
}

/// The register form.
#[derive(Deserialize)]
pub(in crate::api::console) struct RegisterForm {
    #[serde(default)]
    csrf: String,
    name: String,
    url: String,
    site: String,
}

/// Registers a server (the API's `POST /v1/servers`); its token comes back as a download.
pub(in crate::api::console) async fn register_server(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<RegisterForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let registered = servers::register(
        State(console.app.clone()),
        admin,
        ApiJson(RegisterServer {
            name: form.name,
            url: form.url,
            site: form.site,
        }),
    )
    .await?
    .1
    .0;
    Ok(token_download(&registered.server.name, &registered.token))
}

/// Drains a server (the API's `POST /v1/servers/{server}/drain`).
pub(in crate::api::console) async fn drain_server(
    State(console): State<Console>,
    visitor: Visitor,
    Path(server): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let drained = servers::drain(State(console.app.clone()), admin, ApiPath(server))
        .await?
        .0;
    Ok(console.done(
        &visitor,
        "/servers",
        format!("{} is draining", drained.name),
    ))
}

/// Rotates a server's token with the default grace; the new token comes back as a download.
pub(in crate::api::console) async fn rotate_token(
    State(console): State<Console>,
    visitor: Visitor,
    Path(server): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let rotated = servers::rotate_token(
        State(console.app.clone()),
        admin,
        ApiPath(server),
        ApiJson(RotateToken {
            grace_seconds: None,
        }),
    )
    .await?
    .0;
    Ok(token_download(&rotated.server.name, &rotated.token))
}

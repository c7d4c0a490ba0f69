//! The console's operators page.

use crate::api::console::{Console, ConsoleError, ConsoleForm, CsrfForm, Visitor};
use crate::api::{ApiPath, operators as api_operators};
use crate::operators::{AddOperator, Role};
use allot_core::validate;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;

/// Every operator; admins add and remove them.
pub(in crate::api::console) async fn operators(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let operators = console.app.store.operators().await?;
    console.page(
        &visitor,
        "operators.html",
        "operators",
        "Operators",
        minijinja::context! { operators => operators },
    )
}

/// The add-an-operator form.
#[derive(Deserialize)]
pub(in crate::api::console) struct OperatorForm {
    #[serde(default)]
    csrf: String,
    name: String,
    role: String,
    password: String,
}

/// Adds an operator (the API's `POST /v1/operators`).
pub(in crate::api::console) async fn add_operator(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<OperatorForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let role = Role::parse(&form.role)
        .ok_or_else(|| ConsoleError::BadRequest("role: admin or viewer".into()))?;
    let added = api_operators::add_operator(
        &console.app,
        admin.actor(),
        &AddOperator {
            name: form.name,
            role,
            password: form.password,
        },
    )
    .await?;
    Ok(console.done(
        &visitor,
        "/operators",
        format!("operator {} added as {}", added.name, added.role.as_str()),
    ))
}

/// Removes an operator (the API's `DELETE /v1/operators/{name}`); their sessions end.
pub(in crate::api::console) async fn remove_operator(
    State(console): State<Console>,
    visitor: Visitor,
    Path(name): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    validate::path_name("name", &name).map_err(|e| ConsoleError::BadRequest(e.to_string()))?;
    let removed = api_operators::remove(State(console.app.clone()), admin, ApiPath(name))
        .await?
        .0;
    Ok(console.done(
        &visitor,
        "/operators",
        format!("operator {} removed", removed.name),
    ))
}

//! `allot-balancer operator …`: operators are managed through the API like everything else
//! (`/v1/operators`), so the CLI never touches the database and every change is audited under
//! whoever made it (the admin token, or an admin operator with `--operator`).

use super::ClientArgs;
use super::client::{AdminClient, segment};
use super::render::{Row, output, table};
use crate::operators::{AddOperator, Operator, Role};
use allot_core::wire::balancer::List;
use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;

/// `allot-balancer operator …`.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Add an operator who logs in to the console (or calls the API with HTTP Basic) under
    /// their own name. The password comes from stdin (`--password-stdin`) or from
    /// `ALLOT_NEW_OPERATOR_PASSWORD`, never from a flag (flags show in `ps`).
    Add {
        /// Their login name (1–64 of `A-Z a-z 0-9 . _ -`).
        name: String,
        /// `admin` changes things; `viewer` only reads.
        #[arg(long, value_enum)]
        role: Role,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the operators.
    List {
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an operator: their password and console sessions stop working at once.
    Remove {
        /// Their login name.
        name: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl Row for Operator {
    const HEADER: &'static [&'static str] = &["operator", "role", "added", "added by"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.role.as_str().to_owned(),
            self.created_at.format("%Y-%m-%d %H:%M").to_string(),
            self.created_by.clone(),
        ]
    }
}

/// The new operator's password: stdin's first line, or the environment.
fn new_password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("read the password from stdin")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    match std::env::var("ALLOT_NEW_OPERATOR_PASSWORD") {
        Ok(password) => Ok(password),
        Err(_) => bail!(
            "no password: pass --password-stdin (and pipe it in) or set ALLOT_NEW_OPERATOR_PASSWORD"
        ),
    }
}

impl OperatorCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                name,
                role,
                password_stdin,
                client,
            } => {
                let req = AddOperator {
                    name,
                    role,
                    password: new_password(password_stdin)?,
                };
                let added: Operator = AdminClient::new(&client)?
                    .call(Method::POST, "/v1/operators", Some(&req))
                    .await?;
                output(client.json, &added, |o| {
                    println!("{}", table(std::slice::from_ref(o)));
                })
            }
            Self::List { client } => {
                let list: List<Operator> = AdminClient::new(&client)?.get("/v1/operators").await?;
                output(client.json, &list, |l| println!("{}", table(&l.items)))
            }
            Self::Remove { name, client } => {
                let removed: Operator = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::DELETE,
                        &format!("/v1/operators/{}", segment(&name)),
                        None,
                    )
                    .await?;
                output(client.json, &removed, |o| {
                    println!("removed operator {} ({})", o.name, o.role.as_str());
                })
            }
        }
    }
}

//! The admin CLI's HTTP client of the balancer's API: the admin token from the flag, the
//! environment or a local balancer's data directory, and errors that name the API's code.

use super::ClientArgs;
use crate::auth::admin_token_path;
use allot_core::error::ErrorBody;
use anyhow::{Context, bail};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A typed admin client of the balancer's API.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    credential: Credential,
}

/// What the CLI presents: the admin token, or an operator's name and password.
enum Credential {
    Token(String),
    Operator { name: String, password: String },
}

impl AdminClient {
    /// A client for `args.url` with the admin token from the flag, the environment or the
    /// local balancer's data directory.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let credential = match (&args.operator, &args.admin_token) {
            (Some(name), _) => Credential::Operator {
                name: name.clone(),
                password: std::env::var("ALLOT_OPERATOR_PASSWORD").context(
                    "--operator needs the operator's password in ALLOT_OPERATOR_PASSWORD",
                )?,
            },
            (None, Some(token)) => Credential::Token(token.clone()),
            (None, None) => {
                let path = admin_token_path(&args.data_dir);
                let token = std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no admin token: pass --admin-token or ALLOT_ADMIN_TOKEN (could not \
                             read {})",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned();
                Credential::Token(token)
            }
        };
        Ok(Self {
            http: args
                .ca
                .load()
                .context("load --ca-file")?
                .client_builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            base: args.url.trim_end_matches('/').to_owned(),
            credential,
        })
    }

    /// Calls the API; a non-2xx answer becomes an error naming its code and message.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = match &self.credential {
            Credential::Token(token) => self.http.request(method, &url).bearer_auth(token),
            Credential::Operator { name, password } => self
                .http
                .request(method, &url)
                .basic_auth(name, Some(password)),
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("could not reach the balancer at {url}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => bail!("{} ({status}): {}", body.error.code, body.error.message),
                Err(_) => bail!("{status}: {}", String::from_utf8_lossy(&bytes)),
            }
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {url}"))
    }

    /// `GET path`.
    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }
}

/// Percent-encodes one path segment (names may hold spaces and other characters).
pub(crate) fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(super::segment("CAD Suite/2"), "CAD%20Suite%2F2");
        assert_eq!(super::segment("matlab-r2026a"), "matlab-r2026a");
    }
}

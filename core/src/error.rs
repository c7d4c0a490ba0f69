//! Stable error codes shared by every API of allot.
//!
//! A client branches on `code`, never on the message, so a code is defined once here and never
//! renamed. Each code carries the HTTP status it is served with.

use serde::{Deserialize, Serialize};

/// The stable, machine-readable reason a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range.
    BadRequest,
    /// No credentials, or credentials that match nobody.
    Unauthorized,
    /// Valid credentials that may not do this (an ACL, another server's allocation).
    Forbidden,
    /// The addressed resource does not exist.
    NotFound,
    /// The named product is not defined.
    UnknownProduct,
    /// No unit could be granted (hard stop, wait timed out).
    LicenseUnavailable,
    /// A limit of the product's options (FlexNet MAX) caps this user, group or host at this
    /// server; the message names the rule. Waiting would not help until the holder checks in.
    LimitReached,
    /// A checkout handle that is unknown or has staled out.
    BadHandle,
    /// The entitlement or lease behind the request has expired.
    LicenseExpired,
    /// An administrator force-released this checkout (`POST /v1/checkouts/{id}/revoke`): its
    /// units went to another client, so the holder must stop using the product; the message
    /// says when and why. Distinct from `bad_handle` so a client can tell an operator's act
    /// from its own missed heartbeats.
    LicenseRevoked,
    /// The request contradicts the current state (units in use, duplicate name, negative reserve).
    Conflict,
    /// This balancer is a follower; mutations go to the leader.
    NotLeader,
    /// A dependency is down or a configured limit is reached; retry later.
    Unavailable,
    /// A bug or an unexpected failure; details are in the server's log, never in the answer.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::UnknownProduct => "unknown_product",
            Self::LicenseUnavailable => "license_unavailable",
            Self::LimitReached => "limit_reached",
            Self::BadHandle => "bad_handle",
            Self::LicenseExpired => "license_expired",
            Self::LicenseRevoked => "license_revoked",
            Self::Conflict => "conflict",
            Self::NotLeader => "not_leader",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status this code is served with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound | Self::UnknownProduct | Self::BadHandle => 404,
            Self::LicenseUnavailable | Self::LimitReached | Self::Conflict => 409,
            Self::LicenseExpired | Self::LicenseRevoked => 410,
            Self::NotLeader => 421,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error answer: `{"error": {"code": "…", "message": "…"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error itself, nested so that success and error bodies never share a top-level key.
    pub error: ErrorDetail,
}

/// The code and the human explanation of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable reason, for programs.
    pub code: ErrorCode,
    /// Explanation, for people; may change between versions.
    pub message: String,
    /// Where a follower answers `not_leader`, the URL of the current leader, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_url: Option<String>,
}

impl ErrorBody {
    /// An error body with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                leader_url: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_name_matches_serde_name() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::UnknownProduct,
            ErrorCode::LicenseUnavailable,
            ErrorCode::LimitReached,
            ErrorCode::BadHandle,
            ErrorCode::LicenseExpired,
            ErrorCode::LicenseRevoked,
            ErrorCode::Conflict,
            ErrorCode::NotLeader,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!((400..600).contains(&code.http_status()));
        }
    }
}

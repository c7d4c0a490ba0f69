//! What allot's two HTTP servers — the balancer and the metering server — share, so each of
//! these concepts has one home and both servers behave alike:
//!
//! - [`tls`] — optional TLS: PEM loading, the rustls listener that keeps each server's
//!   `run(listener, shutdown)` shape, reqwest clients that trust a custom CA.
//! - [`json`] — the JSON body extractor with its content-type, size and JSON-object checks;
//!   each server wraps it with its own error type and stable codes.
//! - [`refusals`] — the middleware that counts and logs every request refused for its
//!   credentials (401, 403), with each server's own counter.
//! - [`fault`] — the crash points of the fault-injection tests.
//!
//! It must never hold a server's state or decide anything about licenses: only the HTTP
//! plumbing both servers would otherwise each write.
#![forbid(unsafe_code)]

pub mod fault;
pub mod json;
pub mod refusals;
pub mod tls;

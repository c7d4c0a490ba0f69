//! Harness for the tests that cross crates: real processes on loopback ports talked to over
//! HTTP, and a fresh PostgreSQL database per test for the store conformance suite.
#![forbid(unsafe_code)]

pub mod pg;
pub mod process;

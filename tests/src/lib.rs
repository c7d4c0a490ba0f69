//! Harness for the end-to-end tests: start real processes on loopback ports and talk HTTP.
#![forbid(unsafe_code)]

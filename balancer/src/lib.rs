//! allot's central balancer.
#![forbid(unsafe_code)]

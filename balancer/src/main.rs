//! `allot-balancer`.
fn main() {}

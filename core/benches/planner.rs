//! Placeholder replaced by the planner benchmark.
fn main() {}

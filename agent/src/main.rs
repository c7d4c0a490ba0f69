//! `allot-agent`: the metering server binary.
fn main() {}

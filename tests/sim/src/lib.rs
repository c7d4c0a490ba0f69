//! allot's workload simulator: a deterministic, seeded discrete-event simulation of an estate
//! of metering servers and one balancer, run with the real planner and the real agent-side
//! trigger policy from `allot-core`, side by side with the baselines and the one-pool oracle
//! on the same arrivals. See docs/simulator.md.
//!
//! - `engine` — the discrete-event engine: `engine::site` (metering servers), `engine::events`
//!   (what each message does where it lands), `engine::balancer` (runs, instant balances).
//! - `workload` — the synthetic workloads; `flexnet` — FlexNet log parsing into workloads.
//! - `metrics` — what a run measures; `report` — the tables and plots of docs/BENCHMARKS.md.
//! - `advice` — the advice experiment (the real advisor over the recorded history).
//! - `replay` — `allot-sim replay LOG...`; `rng` — seeded randomness.
#![forbid(unsafe_code)]

pub mod advice;
pub mod engine;
pub mod flexnet;
pub mod metrics;
pub mod replay;
pub mod report;
pub mod rng;
pub mod workload;

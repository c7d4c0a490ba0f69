//! allot's workload simulator: a deterministic, seeded discrete-event simulation of an estate
//! of metering servers and one balancer, run with the real planner and the real agent-side
//! trigger policy from `allot-core`, side by side with the baselines and the one-pool oracle
//! on the same arrivals. See docs/simulator.md.
//!
//! Every module: `advice` (the advice experiment), `engine` (the discrete-event engine),
//! `flexnet` (FlexNet log parsing), `metrics` (what a run measures), `replay` (`allot-sim
//! replay`), `report` (tables and plots), `rng` (seeded randomness), `workload` (synthetic
//! workloads).
#![forbid(unsafe_code)]

pub mod advice;
pub mod engine;
pub mod flexnet;
pub mod metrics;
pub mod replay;
pub mod report;
pub mod rng;
pub mod workload;

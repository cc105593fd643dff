//! `greyhound-loadtest`: load generation and capacity planning for Greyhound.
//!
//! ```text
//!  run ──► client (one thread per connection/socket) ──► real server ──► report
//!   │        └ workload: which triplet next, written as native line / policy block
//!  ceiling ─► null responder (same transport, constant answer) ┐ same client code,
//!          └► real server (if --target)                       ┘ both reports + ratio
//!  plan ──► Engine in-process on a ManualClock, days of simulated mail ──► report + SVG
//! ```
//!
//! The binary is a thin shell over these modules; the tests drive them directly too.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod answer;
pub mod bare;
pub mod chart;
pub mod client;
pub mod cpu;
pub mod naive;
pub mod null;
pub mod outstanding;
pub mod plan;
pub mod report;
pub mod rng;
pub mod workload;

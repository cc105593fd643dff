//! `greyhound-loadtest`: load generation and capacity planning for Greyhound.
//!
//! ```text
//!  run ──► client (a few threads, each driving many connections/sockets through epoll)
//!   │        └ workload: which triplet next, written through greyhound::proto's client half
//!   │        └ bare: the minimal client (fixed bytes, replies counted), the reference
//!  ceiling ─► minimal client ─► null responder ┐
//!          └► client ─────────► null responder │ same settings, one run; each side's CPU
//!          └► client ─────────► naive server   │ (cpu), ratios, saturation warnings
//!          └► client ─────────► target         ┘
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

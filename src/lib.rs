//! Greyhound: a greylisting engine for mail providers.
//!
//! An MTA or edge filter asks, for every SMTP recipient, "defer or pass?". The answer comes
//! from an in-memory table of triplets (client network, sender, recipient), kept as keyed
//! 128-bit hashes in a lock-sharded table whose records a timer wheel expires.
//!
//! ```text
//!   request ─► engine::Engine::prepare ─► exemptions (auth, client, name, sender, recipient)
//!                     │                         └──► PASS exempt:<list> / auth
//!                     ▼
//!              normalise (client /24 or /64, sender VERP/SRS/BATV…, recipient lower-case)
//!                     │
//!                     ▼
//!              keyed SipHash-1-3-128 ─► Key ─► shard (top 8 bits) ─► open-addressing table
//!                                                                   │        + timer wheel
//!                     ┌─────────────────────────────────────────────┘
//!                     ▼
//!              whitelisted? PASS known │ client auto-whitelisted? PASS awl │ greylist rules
//! ```
//!
//! [`engine`] holds all of it and needs no runtime: the server ([`server`]) drives it on the
//! system clock, the capacity planner (`greyhound-loadtest plan`) on a simulated one. On a
//! cluster of MX hosts, [`cluster`] carries each node's changes to the others through Redis
//! Streams, beside the request path, and merges theirs into the engine.

// `unsafe` is denied everywhere but `snapshot::mmap`, which maps snapshot files read-only and
// the SPF cache's zeroed memory as atomic words, and `engine::prefetch`, which issues cache
// prefetch hints; each explains why that is sound.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod import;
pub mod net;
pub mod proto;
pub mod server;
pub mod snapshot;
pub mod spf;

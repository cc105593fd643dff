//! Multi-node replication through Redis Streams (docs/OPERATIONS.md, "Running a cluster").
//!
//! Every node keeps the whole table and answers only from it; this module carries each node's
//! changes to the others. The engine stays runtime-free: it hands changes over through
//! per-shard outboxes ([`crate::engine::Engine::take_changes`]) and merges what peers send
//! ([`crate::engine::Engine::merge_triplets`]); everything that talks to Redis lives here.

pub mod id;
pub mod wire;

pub use id::StreamId;

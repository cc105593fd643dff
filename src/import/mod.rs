//! Importers (`greyhound admin import --from postgrey|sqlgrey|greylistd|postfix-log FILE`,
//! DESIGN §13): each reads a peer program's data, streaming with bounded memory, and yields
//! [`Item`]s that the admin client sends to the running server in batches, where they are
//! normalised, keyed and merged like any record (and so replicated to a cluster).
//!
//! The types here are the contract between the readers (one module per source) and the admin
//! protocol.

use std::net::IpAddr;

/// One thing to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A triplet and its times.
    Triplet(TripletItem),
    /// A client's auto-whitelist count.
    Client(ClientItem),
}

/// A triplet as the peer stored it, before Greyhound's normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TripletItem {
    /// The client: an address, or the network address a peer stored (postgrey's
    /// `192.0.2.0`, and old versions' three octets `192.0.2` read as `192.0.2.0`); Greyhound
    /// masks it to its own prefix.
    pub client: IpAddr,
    /// Envelope sender, bare (`""` for the null sender).
    pub sender: String,
    /// Envelope recipient, bare.
    pub recipient: String,
    /// Unix seconds of the first attempt the peer saw.
    pub first_seen: u64,
    /// Unix seconds of the last attempt the peer saw.
    pub last_seen: u64,
    /// Whether the peer had let it pass (whitelisted from `last_seen`, keeping its age).
    pub passed: bool,
}

/// A client's auto-whitelist standing as the peer stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientItem {
    /// The client address or network.
    pub client: IpAddr,
    /// Counted passes.
    pub count: u32,
    /// Unix seconds of the last counted pass.
    pub last_seen: u64,
}

/// Why an input record was not imported, for the summary ("skipped by reason").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    /// A line or record the reader does not understand.
    Unparsable,
    /// postgrey `--privacy`: the key is a hash, the triplet cannot be recovered.
    Hashed,
    /// The client is not an address or network (e.g. a host name).
    BadClient,
    /// A record with no Greyhound equivalent (e.g. sqlgrey's any-recipient `from_awl`
    /// entries, `domain_awl`).
    NoEquivalent,
    /// Older than any record Greyhound would keep.
    Expired,
    /// A mail log line that is not part of a delivered message.
    NotDelivered,
}

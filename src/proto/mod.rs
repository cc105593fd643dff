//! Wire protocols, sans-IO: bytes in, values out. The server's connection loops and the load
//! generator share these codecs.
//!
//! - [`native`]: Greyhound's line protocol (`CHECK`/`PEEK`/`PING`), TCP and UDP.
//! - [`policy`]: Postfix's SMTPD policy delegation protocol.

pub mod native;
pub mod policy;

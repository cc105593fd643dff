//! Socket utilities shared by the server and the load generator (`greyhound-loadtest`), which
//! must drive a transport as cheaply as the server answers it.
//!
//! - [`udp_batch`]: `SO_REUSEPORT` UDP sockets moving many datagrams per `recvmmsg` /
//!   `sendmmsg` call.

pub mod udp_batch;

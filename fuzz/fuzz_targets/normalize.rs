//! The triplet normaliser (`src/engine/normalize.rs`) and the key it feeds.
//!
//! The input is `<prefix byte><prefix byte><16 address bytes>` then a sender and a recipient
//! separated by a newline. Invariants:
//! - normalising twice equals normalising once (sender, recipient, client network);
//! - the output is bounded: a sender never grows, a recipient keeps its length, and both
//!   stay valid UTF-8;
//! - the engine keys a request and its normalised form alike, so the table holds one record
//!   for both.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use greyhound::engine::{
    ClientNet, Engine, EngineConfig, HashSecret, ManualClock, Normalizer, Policy, Query,
};
use libfuzzer_sys::fuzz_target;

fn ip_of(net: ClientNet) -> IpAddr {
    match net {
        ClientNet::V4(a) => IpAddr::V4(a),
        ClientNet::V6(a) => IpAddr::V6(a),
    }
}

fn engine(ipv4_prefix: u8, ipv6_prefix: u8) -> Engine {
    Engine::new(
        EngineConfig {
            policy: Policy::default(),
            normalizer: Normalizer::new(ipv4_prefix, ipv6_prefix).expect("valid prefixes"),
            secret: HashSecret(*b"fuzz-normalise01"),
        },
        Arc::new(ManualClock::new(1_000_000)),
    )
}

/// One engine with the default prefixes, built once: keying a request changes nothing.
fn default_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| engine(24, 64))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let (v4, v6) = (data[0] % 33, data[1] % 129);
    let n = Normalizer::new(v4, v6).expect("in range");
    let addr: [u8; 16] = data[2..18].try_into().unwrap();
    let ip = if addr[0] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(addr[1], addr[2], addr[3], addr[4]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    };
    let text = String::from_utf8_lossy(&data[18..]);
    let (sender, recipient) = text.split_once('\n').unwrap_or((&text, ""));

    // The client network: masking a masked address changes nothing.
    let net = n.client(ip);
    assert_eq!(n.client(ip_of(net)), net, "{ip} → {net:?}");

    // The sender: bounded, UTF-8, and a fixed point after one pass.
    let mut once = Vec::new();
    n.sender(sender, &mut once);
    assert!(once.len() <= sender.len(), "{sender:?} grew to {once:?}");
    let once_text = std::str::from_utf8(&once)
        .unwrap_or_else(|_| panic!("{sender:?} normalised to bytes that are not UTF-8"));
    let mut twice = b"kept".to_vec();
    n.sender(once_text, &mut twice);
    assert_eq!(
        &twice[..4],
        b"kept",
        "the buffer is appended to, not cleared"
    );
    assert_eq!(
        std::str::from_utf8(&twice[4..]).ok(),
        Some(once_text),
        "normalising {sender:?} twice differs from once"
    );

    // The recipient: only lower-cased.
    let mut rcpt = Vec::new();
    n.recipient(recipient, &mut rcpt);
    assert_eq!(rcpt, recipient.to_ascii_lowercase().into_bytes());
    let mut rcpt_twice = Vec::new();
    n.recipient(std::str::from_utf8(&rcpt).unwrap(), &mut rcpt_twice);
    assert_eq!(rcpt_twice, rcpt);

    // The engine keys the request and its normalised form alike.
    let e = default_engine();
    let en = e.normalizer();
    let mut s1 = Vec::new();
    en.sender(sender, &mut s1);
    let Ok(s1) = String::from_utf8(s1) else {
        panic!("{sender:?} normalised to bytes that are not UTF-8");
    };
    let mut r1 = Vec::new();
    en.recipient(recipient, &mut r1);
    let r1 = String::from_utf8(r1).unwrap();
    let raw = e.prepare(&Query::new(ip, sender, recipient));
    let normalised = e.prepare(&Query::new(ip_of(en.client(ip)), &s1, &r1));
    match (raw, normalised) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{sender:?} / {recipient:?} keyed apart"),
        (a, b) => assert_eq!(a.err(), b.err(), "decided apart"),
    }
});

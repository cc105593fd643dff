//! UDP replies are matched to requests by ID; datagrams the responder drops are counted as
//! timeouts after the timeout, exactly, and never waited on forever.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use greyhound_loadtest::client::{self, Proto, RunConfig};
use greyhound_loadtest::null::{NullOptions, NullResponder};

#[test]
fn dropped_datagrams_are_counted_lost_and_the_rest_matched() {
    let null = NullResponder::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        NullOptions {
            udp_drop_every: Some(7),
        },
    )
    .unwrap();
    let per = 4u64;
    let requests = 8_000u64;
    let cfg = RunConfig {
        connections: 2,
        pipeline: 8,
        per_datagram: per as usize,
        duration: Some(Duration::from_secs(60)),
        requests: Some(requests),
        timeout: Duration::from_millis(200),
        ..RunConfig::new(null.native, Proto::NativeUdp)
    };
    let r = client::run(&cfg).unwrap();
    let dropped = null.dropped();
    assert!(dropped > 0, "the responder dropped nothing");
    // Every request of a dropped datagram times out; everything else is answered PASS.
    assert_eq!(r.requests_sent, requests);
    assert_eq!(r.answers.timeouts, dropped * per, "{r:#?}");
    assert_eq!(r.decisions + r.answers.timeouts, requests, "{r:#?}");
    assert_eq!(r.answers.unmatched, 0);
    assert_eq!(r.answers.pass.get("known"), Some(&r.decisions));
    // Lost requests are not throughput.
    assert!(r.decisions_per_sec * r.elapsed_secs <= (requests - dropped * per) as f64 + 1.0);
}

#[test]
fn a_silent_server_ends_the_run_by_timeouts() {
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cfg = RunConfig {
        connections: 1,
        pipeline: 4,
        per_datagram: 2,
        duration: Some(Duration::from_secs(30)),
        requests: Some(16),
        timeout: Duration::from_millis(100),
        ..RunConfig::new(silent.local_addr().unwrap(), Proto::NativeUdp)
    };
    let r = client::run(&cfg).unwrap();
    assert_eq!(r.requests_sent, 16);
    assert_eq!(r.decisions, 0);
    assert_eq!(r.answers.timeouts, 16);
    assert_eq!(r.decisions_per_sec, 0.0);
}

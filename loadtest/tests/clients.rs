//! The full client and the minimal client against the in-process responders, on every
//! transport: every request is answered and counted once, whatever the threads and windows.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use greyhound_loadtest::client::{self, Proto, RunConfig};
use greyhound_loadtest::naive::NaiveServer;
use greyhound_loadtest::null::{NullOptions, NullResponder};

const REQUESTS: u64 = 3_000;

fn cfg(target: SocketAddr, proto: Proto, threads: usize, minimal: bool) -> RunConfig {
    RunConfig {
        connections: 5,
        pipeline: 8,
        per_datagram: if proto == Proto::NativeUdp { 3 } else { 1 },
        duration: Some(Duration::from_secs(60)),
        requests: Some(REQUESTS),
        threads,
        minimal,
        ..RunConfig::new(target, proto)
    }
}

#[test]
fn both_clients_count_every_answer_of_the_null_responder() {
    let null =
        NullResponder::start(IpAddr::V4(Ipv4Addr::LOCALHOST), NullOptions::default()).unwrap();
    for proto in [Proto::NativeTcp, Proto::NativeUdp, Proto::Policy] {
        let target = if proto == Proto::Policy {
            null.policy
        } else {
            null.native
        };
        // One thread for all five connections, and more threads than fit (clamped to five).
        for threads in [1, 8] {
            for minimal in [false, true] {
                let r = client::run(&cfg(target, proto, threads, minimal)).unwrap();
                let what = format!("{proto:?} threads {threads} minimal {minimal}");
                assert_eq!(r.threads, threads.min(5), "{what}");
                assert_eq!(r.requests_sent, REQUESTS, "{what}: {r:#?}");
                assert_eq!(r.decisions, REQUESTS, "{what}: {r:#?}");
                assert_eq!(r.answers.timeouts + r.answers.unmatched, 0, "{what}");
                assert_eq!(r.client, if minimal { "minimal" } else { "full" });
                // Only the full client reads replies and measures latency.
                let reason = match (minimal, proto) {
                    (true, _) => "other",
                    (false, Proto::Policy) => "dunno",
                    (false, _) => "known",
                };
                assert_eq!(r.answers.pass.get(reason), Some(&REQUESTS), "{what}");
                assert_eq!(r.latency_us.count, if minimal { 0 } else { REQUESTS });
                assert!(r.cpu.client_cores >= 0.0 && r.cpu.client_threads == r.threads);
            }
        }
    }
}

#[test]
fn the_naive_server_greylists_raw_triplets() {
    let naive =
        NaiveServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), Duration::from_secs(300)).unwrap();
    for (proto, target) in [
        (Proto::NativeTcp, naive.native),
        (Proto::NativeUdp, naive.native),
        (Proto::Policy, naive.policy),
    ] {
        let r = client::run(&cfg(target, proto, 1, false)).unwrap();
        // Nothing is old enough to pass in a 300 s delay: every decision is a DEFER.
        assert_eq!(
            r.decisions,
            REQUESTS - r.answers.timeouts,
            "{proto:?}: {r:#?}"
        );
        assert_eq!(r.answers.defer, r.decisions, "{proto:?}");
        assert!(r.answers.pass.is_empty(), "{proto:?}");
    }
}

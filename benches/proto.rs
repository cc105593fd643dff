//! The wire codecs, per request: parsing and encoding of each request and reply kind of the
//! native line protocol and of the Postfix policy protocol, without sockets or the engine.
//!
//! Native requests are parsed the way a TCP read is: a buffer of [`PIPELINE`] pipelined lines,
//! taken line by line with `native::parse`; replies are encoded the same number at a time into
//! one send buffer. A policy request is one realistic block (the 31 attributes Postfix 3.7
//! sends at the RCPT stage, with TLS); its actions are built as the server builds them.
//!
//! `cargo bench --bench proto` (all, ~50 s), or e.g. `cargo bench --bench proto -- policy`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use greyhound::proto::native::{self, ErrorKind, Frame, Reply, MAX_LINE};
use greyhound::proto::policy::{self, Block, BlockLimits, TemplateVars, DEFAULT_GREYLIST_TEXT};
use std::hint::black_box;
use std::time::Duration;

/// Requests per native buffer (the load generator's deepest pipeline).
const PIPELINE: usize = 128;

/// `PIPELINE` request lines of one kind, with IDs and distinct, realistically shaped triplets.
fn native_requests(kind: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..PIPELINE {
        let line = match kind {
            "CHECK" | "PEEK" => format!(
                "{} {kind} 198.51.{}.{} <bounces+{}-{i}=example.net@sender{i}.example.org> \
                 <user{i}@isp{}.example>\n",
                1_000_000 + i,
                i % 200,
                i % 250 + 1,
                i * 7919,
                i % 50
            ),
            "CHECK+options" => format!(
                "{} CHECK 2001:db8:{i:x}::25 <John.Smith{i}@Example{i}.net> <user{i}@isp.example> \
                 helo=mail{i}.example.net name=mail{i}.example.net\n",
                1_000_000 + i
            ),
            "PING" => format!("{} PING\n", 1_000_000 + i),
            _ => unreachable!("no such request kind: {kind}"),
        };
        buf.extend_from_slice(line.as_bytes());
    }
    buf
}

/// Parses every line of `buf` as a TCP read would; returns how many parsed (all of them).
fn parse_all(mut buf: &[u8]) -> usize {
    let mut ok = 0;
    loop {
        match native::parse(buf, MAX_LINE) {
            Frame::Line { consumed, parsed } => {
                ok += usize::from(black_box(parsed).is_ok());
                buf = &buf[consumed..];
            }
            Frame::Incomplete | Frame::TooLong { .. } => return ok,
        }
    }
}

fn native_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("native/parse");
    g.throughput(Throughput::Elements(PIPELINE as u64));
    for kind in ["CHECK", "CHECK+options", "PEEK", "PING"] {
        let buf = native_requests(kind);
        assert_eq!(parse_all(&buf), PIPELINE, "every {kind} line parses");
        g.bench_function(BenchmarkId::from_parameter(kind), |b| {
            b.iter(|| parse_all(black_box(&buf)))
        });
    }
    g.finish();
}

fn native_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("native/encode");
    g.throughput(Throughput::Elements(PIPELINE as u64));
    let ids: Vec<String> = (0..PIPELINE).map(|i| (1_000_000 + i).to_string()).collect();
    let mut out = Vec::with_capacity(PIPELINE * 128);
    let mut text = Vec::with_capacity(256);
    // DEFER carries the expanded greylist text, as the server sends it: expansion included.
    g.bench_function("DEFER", |b| {
        b.iter(|| {
            out.clear();
            for (i, id) in ids.iter().enumerate() {
                text.clear();
                let vars = TemplateVars {
                    sender: "bounces+7919-1=example.net@sender1.example.org",
                    recipient: "user1@isp1.example",
                    client: "198.51.100.7",
                    helo: "mail.sender1.example.org",
                    seconds: 300 - i as u32,
                    protocol: "",
                };
                policy::expand_template(DEFAULT_GREYLIST_TEXT, &vars, &mut text);
                let text = std::str::from_utf8(&text).expect("expansion is UTF-8");
                let reply = Reply::Defer {
                    seconds: vars.seconds,
                    text,
                };
                native::encode(Some(id), &reply, &mut out);
            }
            black_box(out.len())
        })
    });
    let replies = [
        ("PASS", Reply::Pass { reason: "known" }),
        ("PONG", Reply::Pong),
        (
            "ERR",
            Reply::Err {
                kind: ErrorKind::BadAddress,
            },
        ),
    ];
    for (name, reply) in replies {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                for id in &ids {
                    native::encode(Some(id), black_box(&reply), &mut out);
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// A block as Postfix 3.7 sends it at the RCPT stage over STARTTLS (the attribute list of
/// Postfix's `SMTPD_POLICY_README`; values as a typical inbound MX sees them).
const POSTFIX_BLOCK: &str = "request=smtpd_access_policy\n\
    protocol_state=RCPT\n\
    protocol_name=ESMTP\n\
    helo_name=mail-ej1-f53.google.com\n\
    queue_id=\n\
    sender=bounces+1234567-abcd=example.net@mail.sender.example.org\n\
    recipient=john.smith@example.net\n\
    recipient_count=0\n\
    client_address=209.85.218.53\n\
    client_name=mail-ej1-f53.google.com\n\
    reverse_client_name=mail-ej1-f53.google.com\n\
    instance=3f5a.6751c2d8.9b0e1.0\n\
    sasl_method=\n\
    sasl_username=\n\
    sasl_sender=\n\
    size=48213\n\
    ccert_subject=\n\
    ccert_issuer=\n\
    ccert_fingerprint=\n\
    ccert_pubkey_fingerprint=\n\
    encryption_protocol=TLSv1.3\n\
    encryption_cipher=TLS_AES_256_GCM_SHA384\n\
    encryption_keysize=256\n\
    etrn_domain=\n\
    stress=\n\
    client_port=52814\n\
    policy_context=\n\
    server_address=192.0.2.25\n\
    server_port=25\n\
    compatibility_level=3.6\n\
    mail_version=3.7.11\n\
    \n";

fn policy_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy/parse");
    g.throughput(Throughput::Elements(1));
    let limits = BlockLimits::default();
    let block = POSTFIX_BLOCK.as_bytes();
    assert_eq!(POSTFIX_BLOCK.lines().filter(|l| !l.is_empty()).count(), 31);
    match policy::parse(block, &limits) {
        Ok(Block::Complete { consumed, request }) => {
            assert_eq!(consumed, block.len());
            assert_eq!(request.recipient, "john.smith@example.net");
        }
        other => panic!("the bench block does not parse: {other:?}"),
    }
    g.bench_function("RCPT block, 31 attributes", |b| {
        b.iter(|| policy::parse(black_box(block), &limits))
    });
    g.finish();
}

fn policy_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy/encode");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    let mut text = Vec::with_capacity(512);
    let mut action = Vec::with_capacity(512);
    // As the server answers a greylisted triplet: the template expanded, then
    // `action=DEFER_IF_PERMIT <text>`.
    g.bench_function("DEFER_IF_PERMIT text", |b| {
        b.iter(|| {
            out.clear();
            text.clear();
            let vars = TemplateVars {
                sender: "bounces+1234567-abcd=example.net@mail.sender.example.org",
                recipient: "john.smith@example.net",
                client: "209.85.218.53",
                helo: "mail-ej1-f53.google.com",
                seconds: black_box(287),
                protocol: "ESMTP",
            };
            policy::expand_template(DEFAULT_GREYLIST_TEXT, &vars, &mut text);
            action.clear();
            action.extend_from_slice(b"DEFER_IF_PERMIT ");
            action.extend_from_slice(&text);
            let action = std::str::from_utf8(&action).expect("UTF-8");
            policy::encode_action(action, &mut out);
            black_box(out.len())
        })
    });
    // A retry that passed, with the X-Greylist header on.
    g.bench_function("PREPEND X-Greylist", |b| {
        b.iter(|| {
            out.clear();
            action.clear();
            policy::x_greylist_prepend(
                black_box(312),
                "0.1.0",
                "mx1.example.net",
                black_box(1_795_424_602),
                &mut action,
            );
            let action = std::str::from_utf8(&action).expect("UTF-8");
            policy::encode_action(action, &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("DUNNO", |b| {
        b.iter(|| {
            out.clear();
            policy::encode_action(black_box("DUNNO"), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = native_parse, native_encode, policy_parse, policy_encode
}
criterion_main!(benches);

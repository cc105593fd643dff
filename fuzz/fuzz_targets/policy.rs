//! The Postfix policy delegation protocol (`src/proto/policy.rs`).
//!
//! The input is what Postfix (or anyone) wrote to the policy socket. Invariants, under the
//! default limits and tight ones:
//! - a complete block consumed no more than was buffered nor than `max_block`, ends with an
//!   empty line, holds at most `max_attrs` attributes and is an `smtpd_access_policy` request;
//! - the answer depends only on the block: the block alone, or followed by anything, parses
//!   the same; an error stays the same error whatever follows; an incomplete buffer fits
//!   `max_block` and each of its prefixes is incomplete too;
//! - a parsed block, re-encoded by the client's encoder, parses to the same attributes
//!   (control characters, tab included, become spaces on the way);
//! - an action encoded for Postfix reads back as that action, within `MAX_ACTION_LINE`.

#![no_main]

use greyhound::proto::policy::{
    encode_action, encode_request, parse, parse_action, Block, BlockLimits, PolicyError,
    PolicyRequest, MAX_ACTION_LINE, POLICY_REQUEST,
};
use libfuzzer_sys::fuzz_target;

fn fields<'a>(r: &PolicyRequest<'a>) -> [&'a str; 15] {
    [
        r.request,
        r.protocol_state,
        r.client_address,
        r.client_name,
        r.reverse_client_name,
        r.helo_name,
        r.sender,
        r.recipient,
        r.sasl_username,
        r.protocol_name,
        r.ccert_subject,
        r.ccert_fingerprint,
        r.ccert_pubkey_fingerprint,
        r.queue_id,
        r.instance,
    ]
}

/// A control character becomes one space, as the encoders write it.
fn cleaned(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn check(data: &[u8], limits: &BlockLimits) {
    let result = parse(data, limits);
    let mut followed = data.to_vec();
    followed.extend_from_slice(b"request=smtpd_access_policy\nx\n\n");
    match result {
        Ok(Block::Complete { consumed, request }) => {
            assert!(consumed <= data.len() && consumed <= limits.max_block);
            let block = &data[..consumed];
            assert!(
                block.ends_with(b"\n\n") || block.ends_with(b"\n\r\n"),
                "a block ends with an empty line"
            );
            let lines = block.iter().filter(|&&b| b == b'\n').count();
            assert!(lines - 1 <= limits.max_attrs, "{lines} lines");
            assert_eq!(request.request, POLICY_REQUEST);
            for value in fields(&request) {
                // Borrowed from the block, one line, no control character but tab.
                let at = value.as_ptr() as usize;
                let start = block.as_ptr() as usize;
                assert!(value.is_empty() || (at >= start && at + value.len() <= start + consumed));
                assert!(!value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f));
            }
            assert_eq!(parse(block, limits), result, "the block alone");
            assert_eq!(parse(&followed, limits), result, "the block, then more");

            // Re-encoded as the client's encoder writes it, it parses to the same attributes.
            let mut again = Vec::new();
            encode_request(&request, &[], &mut again);
            let roomy = BlockLimits {
                max_block: again.len(),
                max_attrs: 15,
            };
            match parse(&again, &roomy) {
                Ok(Block::Complete {
                    consumed,
                    request: back,
                }) => {
                    assert_eq!(consumed, again.len());
                    let want: Vec<String> = fields(&request).iter().map(|v| cleaned(v)).collect();
                    assert_eq!(fields(&back).to_vec(), want);
                }
                other => panic!(
                    "re-encoded block {:?} parses as {other:?}",
                    String::from_utf8_lossy(&again)
                ),
            }

            // An action carrying attribute text comes back as written, within the limit.
            for text in [request.sender, request.recipient, request.helo_name] {
                let action = format!("DEFER_IF_PERMIT Greylisted {text}");
                let mut reply = Vec::new();
                encode_action(&action, &mut reply);
                let line = reply.iter().position(|&b| b == b'\n').unwrap() + 1;
                assert!(line <= MAX_ACTION_LINE);
                let (got, used) = parse_action(&reply).unwrap().expect("a whole reply");
                assert_eq!(used, reply.len());
                let want = cleaned(&action);
                assert!(want.starts_with(got));
                if 8 + want.len() <= MAX_ACTION_LINE {
                    assert_eq!(got, want);
                }
            }
        }
        Ok(Block::Incomplete) => {
            assert!(data.len() <= limits.max_block);
            assert_eq!(parse(&data[..data.len() / 2], limits), result, "a prefix");
        }
        Err(e) => {
            if e == PolicyError::BlockTooLarge {
                assert!(data.len() > limits.max_block);
            }
            assert_eq!(parse(&followed, limits), result, "an error is final");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &BlockLimits::default());
    // Tight limits, picked by the input's length, so both bounds are met often.
    let tight = BlockLimits {
        max_block: 16 + data.len() % 700,
        max_attrs: 1 + data.len() % 40,
    };
    check(data, &tight);
});

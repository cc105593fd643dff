//! The trusted TLS clients file (`src/engine/trust.rs`, `--trusted-certs`).
//!
//! Invariants:
//! - a refused file names itself and a line inside it, (one input in 4) the line of the same
//!   fault when the file is written differently;
//! - (one input in 4) a file that loads, written differently (comments added, CRLF line ends, lines in
//!   another order) or loaded again, trusts the same certificates;
//! - every entry of a loaded file trusts what it names, in any spelling: a fingerprint with
//!   or without colons, in either case, as certificate or public key fingerprint; a subject
//!   in either case.

#![no_main]

#[path = "common/lists.rs"]
mod lists;

use greyhound::engine::trust::{ClientCert, TrustedCerts};
use libfuzzer_sys::fuzz_target;
use lists::{cross_check, entries, refused_line, same_refusal, text_of, variants, words, SOURCE};

/// Certificates to ask about: the file's words as fingerprints and subjects.
fn probes(text: &str) -> Vec<String> {
    let mut out = vec![String::new(), "00".repeat(16), "mx.example.com".to_owned()];
    for w in words(text) {
        out.push(w.replace(':', ""));
        out.push(w.to_ascii_uppercase());
        if let Some((_, v)) = w.split_once('=') {
            out.push(v.trim().to_owned());
        }
        out.push(w);
    }
    out
}

fn answers(t: &TrustedCerts, probes: &[String]) -> Vec<[bool; 3]> {
    probes
        .iter()
        .map(|p| {
            let as_cert = ClientCert {
                fingerprint: p,
                ..ClientCert::default()
            };
            let as_key = ClientCert {
                pubkey_fingerprint: p,
                ..ClientCert::default()
            };
            let as_subject = ClientCert {
                subject: p,
                ..ClientCert::default()
            };
            [
                t.matches(&as_cert),
                t.matches(&as_key),
                t.matches(&as_subject),
            ]
        })
        .collect()
}

/// `abcd…` as `AB:CD:…`.
fn with_colons(hex: &str) -> String {
    let digits: Vec<char> = hex.chars().filter(|c| *c != ':').collect();
    digits
        .chunks(2)
        .map(|p| p.iter().collect::<String>().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fuzz_target!(|data: &[u8]| {
    let text = text_of(data);
    let questions = probes(&text);
    match TrustedCerts::parse(SOURCE, &text) {
        Err(err) => {
            refused_line(&text, &err);
            if !cross_check(data) {
                return;
            }
            for (variant, shift) in variants(&text) {
                let Err(verr) = TrustedCerts::parse(SOURCE, &variant) else {
                    panic!("the file is refused ({err}) but {variant:?} loads");
                };
                if let Some(shift) = shift {
                    same_refusal(&err, &verr, shift);
                }
            }
        }
        Ok(t) => {
            let listed = entries(&text);
            assert_eq!(t.len(), listed.len(), "one entry per line");
            for (line, entry) in listed {
                match entry.split_once('=') {
                    Some((_, name)) => {
                        let name = name.trim();
                        for s in [
                            name.to_owned(),
                            name.to_ascii_uppercase(),
                            name.to_ascii_lowercase(),
                        ] {
                            let c = ClientCert {
                                subject: &s,
                                ..ClientCert::default()
                            };
                            assert!(t.matches(&c), "line {line}: {entry:?} does not trust {s:?}");
                        }
                    }
                    None => {
                        let bare = entry.replace(':', "").to_ascii_lowercase();
                        for fp in [entry.clone(), bare.clone(), with_colons(&bare)] {
                            let c = ClientCert {
                                fingerprint: &fp,
                                ..ClientCert::default()
                            };
                            let k = ClientCert {
                                pubkey_fingerprint: &fp,
                                ..ClientCert::default()
                            };
                            assert!(
                                t.matches(&c) && t.matches(&k),
                                "line {line}: {entry:?} / {fp:?}"
                            );
                        }
                    }
                }
            }
            if !cross_check(data) {
                return;
            }
            let want = answers(&t, &questions);
            let again = TrustedCerts::parse(SOURCE, &text).expect("loads again");
            assert_eq!(answers(&again, &questions), want, "loaded again");
            for (variant, _) in variants(&text) {
                let v = TrustedCerts::parse(SOURCE, &variant)
                    .unwrap_or_else(|err| panic!("{text:?} loads, {variant:?} not: {err}"));
                assert_eq!(answers(&v, &questions), want, "{variant:?}");
                assert_eq!(v.len(), t.len());
            }
        }
    }
});

//! The per-recipient-domain policy file (`src/engine/domains.rs`, `--domain-policy`).
//!
//! Invariants:
//! - a refused file names itself and a line inside it, (one input in 4) the line of the same
//!   fault when the file is written differently, and leaves the policies loaded before it untouched;
//! - (one input in 4) a file that loads, written differently (comments added, CRLF line ends, lines in
//!   another order) or loaded again (names are hashed under a new random key each time),
//!   gives the same rule for every domain asked about;
//! - every entry of a loaded file applies to the domain it names, with its settings within
//!   the global ones.

#![no_main]

#[path = "common/lists.rs"]
mod lists;

use greyhound::engine::domains::DomainRule;
use greyhound::engine::exempt::{ExemptError, Exemptions};
use greyhound::engine::Policy;
use libfuzzer_sys::fuzz_target;
use lists::{cross_check, entries, refused_line, same_refusal, text_of, variants, words, SOURCE};

fn global() -> Policy {
    Policy::default()
}

fn load(text: &str) -> Result<Exemptions, ExemptError> {
    let mut b = Exemptions::builder();
    b.add_domain_policy(SOURCE, text, &global())?;
    Ok(b.build())
}

/// Domains to ask about: the file's words as names, their parents and children.
fn probes(text: &str) -> Vec<String> {
    let mut out = vec!["example.com".to_owned(), "com".to_owned(), String::new()];
    for w in words(text) {
        let bare = w.trim_start_matches('.').to_owned();
        out.push(format!("x.{bare}"));
        out.push(format!("y.x.{bare}"));
        if let Some((_, parent)) = bare.split_once('.') {
            out.push(parent.to_owned());
        }
        out.push(bare);
        out.push(w);
    }
    out
}

fn answers(e: &Exemptions, probes: &[String]) -> Vec<Option<DomainRule>> {
    probes.iter().map(|d| e.domain_rule(d)).collect()
}

fuzz_target!(|data: &[u8]| {
    let text = text_of(data);
    let questions = probes(&text);
    match load(&text) {
        Err(err) => {
            refused_line(&text, &err);
            if !cross_check(data) {
                return;
            }
            for (variant, shift) in variants(&text) {
                let Err(verr) = load(&variant) else {
                    panic!("the file is refused ({err}) but {variant:?} loads");
                };
                if let Some(shift) = shift {
                    same_refusal(&err, &verr, shift);
                }
            }
            // All or nothing: what was loaded before is kept whole.
            let base = "example.org delay=1m\n.example.net off\n";
            let mut b = Exemptions::builder();
            b.add_domain_policy("base", base, &global()).unwrap();
            assert!(b.add_domain_policy(SOURCE, &text, &global()).is_err());
            let after = b.build();
            let before = {
                let mut b = Exemptions::builder();
                b.add_domain_policy("base", base, &global()).unwrap();
                b.build()
            };
            assert_eq!(before.counts(), after.counts());
            assert_eq!(answers(&before, &questions), answers(&after, &questions));
        }
        Ok(e) => {
            let g = global();
            for (line, entry) in entries(&text) {
                let name = entry
                    .split_ascii_whitespace()
                    .next()
                    .unwrap()
                    .to_ascii_lowercase();
                let asked = match name.strip_prefix('.') {
                    Some(parent) => format!("sub.{parent}"),
                    None => name.clone(),
                };
                let rule = e.domain_rule(&asked).unwrap_or_else(|| {
                    panic!("line {line}: {entry:?} does not apply to {asked:?}")
                });
                let p = rule.over(&g);
                assert!(p.retry_window <= g.retry_window && p.whitelist_ttl <= g.whitelist_ttl);
            }
            if !cross_check(data) {
                return;
            }
            let want = answers(&e, &questions);
            let again = load(&text).expect("a file that loaded loads again");
            assert_eq!(answers(&again, &questions), want, "loaded again");
            for (variant, _) in variants(&text) {
                let v = load(&variant)
                    .unwrap_or_else(|err| panic!("{text:?} loads, {variant:?} not: {err}"));
                assert_eq!(answers(&v, &questions), want, "{variant:?}");
                assert_eq!(v.counts(), e.counts());
            }
        }
    }
});

//! The exemption list files (`src/engine/exempt.rs`): clients (without `/regex/` entries, see
//! below), senders, recipients and greytraps, picked by the input's first byte; the rest is the
//! file.
//!
//! Invariants:
//! - a refused file names itself and a line inside it, the line of the same fault when the
//!   file is written differently, and leaves the lists loaded before it untouched;
//! - (one input in 4) a file that loads, written differently (comments added, CRLF line ends, lines in
//!   another order) or simply loaded again, gives the same answers to every question;
//! - every address and network entry of a loaded file exempts what it names.

#![no_main]

#[path = "common/lists.rs"]
mod lists;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use greyhound::engine::exempt::{ExemptError, ExemptList, Exemptions, ExemptionsBuilder};
use libfuzzer_sys::fuzz_target;
use lists::{cross_check, entries, refused_line, same_refusal, text_of, variants, words, SOURCE};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Clients,
    Senders,
    Recipients,
    Greytraps,
}

fn add(b: &mut ExemptionsBuilder, kind: Kind, text: &str) -> Result<(), ExemptError> {
    match kind {
        Kind::Clients => b.add_clients(SOURCE, text),
        Kind::Senders => b.add_senders(SOURCE, text),
        Kind::Recipients => b.add_recipients(SOURCE, text),
        Kind::Greytraps => b.add_greytraps(SOURCE, text),
    }
    .map(|_| ())
}

fn load(kind: Kind, text: &str) -> Result<Exemptions, ExemptError> {
    let mut b = Exemptions::builder();
    add(&mut b, kind, text)?;
    Ok(b.build())
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77));

/// Addresses, names and mail addresses to ask about: from the file's words, and fixed ones.
fn probes(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = vec![
        ANY,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::BROADCAST),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0201)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    ];
    let mut strings = vec!["".to_owned(), "postmaster@example.com".to_owned()];
    for w in words(text) {
        let addr = w.split('/').next().unwrap_or("");
        if let Ok(ip) = addr.parse::<IpAddr>() {
            // The address, and the last one before it and after it.
            ips.push(ip);
            match ip {
                IpAddr::V4(a) => {
                    let n = u32::from(a);
                    ips.push(Ipv4Addr::from(n.wrapping_sub(1)).into());
                    ips.push(Ipv4Addr::from(n | 0xff).into());
                    ips.push(Ipv4Addr::from(n.wrapping_add(0x100)).into());
                }
                IpAddr::V6(a) => {
                    let n = u128::from(a);
                    ips.push(Ipv6Addr::from(n.wrapping_sub(1)).into());
                    ips.push(Ipv6Addr::from(n | 0xffff).into());
                    ips.push(Ipv6Addr::from(n.wrapping_add(1 << 80)).into());
                }
            }
        }
        let bare = w.trim_start_matches(['.', '@']);
        strings.push(format!("x.{bare}"));
        strings.push(format!("u@{bare}"));
        strings.push(format!("u@x.{bare}"));
        strings.push(bare.to_owned());
        strings.push(w);
    }
    (ips, strings)
}

/// Every answer the lists give to the probes.
fn answers(e: &Exemptions, (ips, strings): &(Vec<IpAddr>, Vec<String>)) -> Vec<Option<ExemptList>> {
    let mut out = Vec::with_capacity(ips.len() + 4 * strings.len());
    out.extend(ips.iter().map(|&ip| e.check(ip, None, "", "")));
    for s in strings {
        out.push(e.check(ANY, Some(s), "", ""));
        out.push(e.check(ANY, None, s, ""));
        out.push(e.check(ANY, None, "", s));
        out.push(e.is_greytrap(s).then_some(ExemptList::Recipient));
    }
    out
}

/// What each loaded entry says it exempts, it exempts.
fn entries_apply(e: &Exemptions, kind: Kind, text: &str) {
    for (line, entry) in entries(text) {
        let lower = entry.to_ascii_lowercase();
        match kind {
            Kind::Clients => {
                if entry.starts_with('/') {
                    continue; // a regex: what it matches is the regex crate's business
                }
                let (addr, prefix) = entry.split_once('/').unwrap_or((&entry, "128"));
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    let mapped = matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
                    if mapped && prefix.parse::<u8>().is_ok_and(|p| p < 96) {
                        // Documented: an IPv6 network wider than ::ffff:0:0/96 does not match
                        // IPv4 clients, even those it holds in mapped form.
                        continue;
                    }
                    assert_eq!(
                        e.check(ip, None, "", ""),
                        Some(ExemptList::Client),
                        "line {line}: {entry:?} does not exempt {ip}"
                    );
                } else if let Some(suffix) = lower.strip_prefix('.') {
                    let name = format!("host.{suffix}");
                    assert!(
                        e.check(ANY, Some(&name), "", "").is_some(),
                        "line {line}: {entry:?}"
                    );
                } else {
                    assert!(
                        e.check(ANY, Some(&lower), "", "").is_some(),
                        "line {line}: {entry:?}"
                    );
                }
            }
            Kind::Senders | Kind::Recipients | Kind::Greytraps => {
                let address = match lower.strip_prefix("@.") {
                    Some(parent) => format!("u@x.{parent}"),
                    None if lower.starts_with('@') => format!("u{lower}"),
                    None => lower,
                };
                let hit = match kind {
                    Kind::Senders => e.check(ANY, None, &address, "") == Some(ExemptList::Sender),
                    Kind::Recipients => {
                        e.check(ANY, None, "", &address) == Some(ExemptList::Recipient)
                    }
                    _ => e.is_greytrap(&address),
                };
                assert!(hit, "line {line}: {entry:?} does not match {address:?}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let kind = [
        Kind::Clients,
        Kind::Senders,
        Kind::Recipients,
        Kind::Greytraps,
    ][usize::from(pick % 4)];
    let text = text_of(rest);
    // Client regexes are left out: compiling them was 88% of this target's time (callgrind),
    // holding it to ~900 inputs/s, and their syntax is the regex crate's (fuzzed upstream).
    // What Greyhound does around them (slashes, errors naming the line) is covered by the
    // unit tests in src/engine/exempt.rs.
    if matches!(kind, Kind::Clients)
        && lists::entries(&text)
            .iter()
            .any(|(_, e)| e.starts_with('/'))
    {
        return;
    }
    let loaded = load(kind, &text);
    let questions = probes(&text);
    match &loaded {
        Err(err) => {
            refused_line(&text, err);
            if !cross_check(data) {
                return;
            }
            for (variant, shift) in variants(&text) {
                let again = load(kind, &variant);
                let Err(verr) = &again else {
                    panic!("{kind:?}: the file is refused ({err}) but {variant:?} loads");
                };
                if let Some(shift) = shift {
                    same_refusal(err, verr, shift);
                }
            }
            // All or nothing: the lists loaded before it are kept whole.
            let mut b = Exemptions::builder();
            add(&mut b, kind, "192.0.2.1\n@example.org\n").ok();
            let before = b.build();
            let mut b = Exemptions::builder();
            add(&mut b, kind, "192.0.2.1\n@example.org\n").ok();
            assert!(add(&mut b, kind, &text).is_err());
            let after = b.build();
            assert_eq!(before.counts(), after.counts());
            assert_eq!(answers(&before, &questions), answers(&after, &questions));
        }
        Ok(e) => {
            entries_apply(e, kind, &text);
            if !cross_check(data) {
                return;
            }
            let want = answers(e, &questions);
            for (variant, _) in variants(&text) {
                let v = load(kind, &variant).unwrap_or_else(|err| {
                    panic!("{kind:?}: {text:?} loads, {variant:?} not: {err}")
                });
                assert_eq!(answers(&v, &questions), want, "{kind:?}: {variant:?}");
                assert_eq!(v.counts(), e.counts());
            }
        }
    }
});

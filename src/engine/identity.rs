//! Client identities (`client-identity`, DESIGN §11): what the first part of a triplet is.
//!
//! A large sender retries from another address of a pool that spans many networks; keyed by
//! its address prefix, each retry is a new triplet and the mail waits for hours. An identity
//! names the pool instead:
//!
//! - `spf:<domain>` — the client address passes SPF for the sender's domain (the HELO name for
//!   the null sender). The server resolves it (`crate::spf`) and hands the engine only the
//!   domain that passed ([`super::Query::spf`]).
//! - `name:<domain>` — the registrable domain (public suffix list, compiled in by the `psl`
//!   crate) of the client's *verified* host name, unless the name looks generic
//!   ([`looks_generic`]): a name that encodes the address or says "dynamic pool" names one
//!   customer line of an access provider, and pooling it would let every line of that
//!   provider retry for each other.
//! - `prefix` — the address masked to `ipv4-prefix` / `ipv6-prefix`; always applies, always last.
//!
//! A request is looked up under every identity that applies, and written under the first.

use std::net::IpAddr;

use super::key::Key;

/// One kind of client identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// The sender's domain, when the client passes SPF for it.
    Spf,
    /// The registrable domain of the verified, non-generic host name.
    Name,
    /// The masked address.
    Prefix,
}

impl IdentityKind {
    /// The name used in settings and in `admin lookup`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Spf => "spf",
            IdentityKind::Name => "name",
            IdentityKind::Prefix => "prefix",
        }
    }

    /// The byte that starts the identity in a hashed message, in the place of a client
    /// network's family byte (4 or 6), so no identity key can equal a prefix key.
    pub(super) fn tag(self) -> u8 {
        match self {
            IdentityKind::Spf => b'S',
            IdentityKind::Name => b'N',
            IdentityKind::Prefix => 0,
        }
    }
}

/// The ordered identities in force (`client-identity`); `prefix` is always the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identities {
    order: [IdentityKind; 3],
    len: u8,
}

impl Default for Identities {
    /// `name,prefix`, DESIGN §11's default.
    fn default() -> Self {
        Self {
            order: [
                IdentityKind::Name,
                IdentityKind::Prefix,
                IdentityKind::Prefix,
            ],
            len: 2,
        }
    }
}

/// Why a `client-identity` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentitiesError {
    /// A name that is not `spf`, `name` or `prefix`.
    #[error("unknown identity {0:?} (expected spf, name or prefix)")]
    Unknown(String),
    /// The same identity twice.
    #[error("identity {0} is listed twice")]
    Duplicate(&'static str),
    /// `prefix` before another identity: it always applies, so nothing after it ever would.
    #[error("prefix must be the last identity (it always applies)")]
    PrefixNotLast,
}

impl Identities {
    /// Only the masked address (the behaviour before identities existed).
    pub const PREFIX_ONLY: Identities = Identities {
        order: [IdentityKind::Prefix; 3],
        len: 1,
    };

    /// Parses a comma-separated list such as `spf,name,prefix`. `prefix` is appended when
    /// missing (every request has an address).
    pub fn parse(s: &str) -> Result<Self, IdentitiesError> {
        let mut order = [IdentityKind::Prefix; 3];
        let mut len = 0usize;
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let kind = match word.to_ascii_lowercase().as_str() {
                "spf" => IdentityKind::Spf,
                "name" => IdentityKind::Name,
                "prefix" => IdentityKind::Prefix,
                _ => return Err(IdentitiesError::Unknown(word.to_string())),
            };
            if order[..len].contains(&kind) {
                return Err(IdentitiesError::Duplicate(kind.as_str()));
            }
            if order[..len].contains(&IdentityKind::Prefix) {
                return Err(IdentitiesError::PrefixNotLast);
            }
            order[len] = kind;
            len += 1;
        }
        if !order[..len].contains(&IdentityKind::Prefix) {
            order[len] = IdentityKind::Prefix;
            len += 1;
        }
        Ok(Self {
            order,
            len: len as u8,
        })
    }

    /// The identities, in order.
    pub fn kinds(&self) -> &[IdentityKind] {
        &self.order[..usize::from(self.len)]
    }

    /// Whether only `prefix` is in force (one key per request, as before identities).
    #[inline]
    pub fn prefix_only(&self) -> bool {
        self.len == 1
    }

    /// Whether `kind` is in force.
    pub fn uses(&self, kind: IdentityKind) -> bool {
        self.kinds().contains(&kind)
    }
}

impl std::fmt::Display for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, k) in self.kinds().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(k.as_str())?;
        }
        Ok(())
    }
}

/// Words that mark a host name as one line of an access provider's dynamic pool, as a whole
/// label or a label's prefix (DESIGN §11).
/// The name of the `spf` identity of a request that passed SPF for `domain`
/// ([`crate::engine::Query::spf`]): the domain without trailing root dots, in the request's
/// case; `None` when nothing is left. The one rule for the triplet's keys and for what
/// `greyhound admin` shows.
pub(super) fn spf_name(domain: Option<&str>) -> Option<&str> {
    let d = domain?;
    let end = d.bytes().rposition(|b| b != b'.')?;
    // `end` is an ASCII byte, so `end + 1` is a character boundary.
    Some(&d[..=end])
}

const POOL_WORDS: [&str; 16] = [
    "dyn",
    "dynamic",
    "dhcp",
    "dsl",
    "adsl",
    "pool",
    "ppp",
    "cable",
    "broadband",
    "client",
    "customer",
    "static",
    "host",
    "ip",
    "user",
    "res",
];

/// The longest host name considered (RFC 1035's limit on a name's text form).
const MAX_NAME: usize = 253;

/// The `name` identity of a verified host name `name` (already ASCII lower-case, as given by
/// the MTA, an optional trailing dot allowed) for a client at `addr`: the registrable domain,
/// or `None` when the name is not a usable DNS name, has no registrable domain (a public
/// suffix itself, a single label) or looks generic ([`looks_generic`]).
///
/// One pass over the name checks its characters and labels and looks for pool words; the
/// address is looked for only in a name with four digits or more, and the public suffix
/// list only for a name found not generic. (A first version split the name several times:
/// 4,800 instructions per decision against 1,800 keyed by prefix, callgrind,
/// `examples/identity_cost`; see docs/BENCHMARKS.md for this one.)
pub fn name_identity(name: &str, addr: IpAddr) -> Option<&str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME {
        return None;
    }
    let mut label_start = 0;
    let mut digits = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'a'..=b'z' | b'-' | b'_' => {}
            b'0'..=b'9' => digits += 1,
            b'.' => {
                if i == label_start || has_pool_word(&b[label_start..i]) {
                    return None;
                }
                label_start = i + 1;
            }
            _ => return None,
        }
    }
    let last = &b[label_start..];
    // An address written as a name (`192.0.2.1`): no top-level domain is numeric.
    if last.is_empty() || has_pool_word(last) || last.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits >= 4 && spells_address(b, addr) {
        return None;
    }
    psl::domain_str(name)
}

/// Whether a (lower-case) host name looks like one given to every line of an access pool:
/// it contains the client's four IPv4 octets, in either order, with any separators or none
/// (`203-0-113-7.dyn.example.net`, `c-7-113-0-203.example.com`, `cpe203000113007.example`),
/// or one of the pool words as a label or as a label's prefix followed by a non-letter
/// (`pool`, `host7`, `dsl-12`, `ip-203`). A word followed by a letter does not count:
/// `hosting`, `clients`, `resolver` and `ipsum` are ordinary words.
pub fn looks_generic(name: &str, addr: IpAddr) -> bool {
    name.split('.').any(|label| has_pool_word(label.as_bytes()))
        || spells_address(name.as_bytes(), addr)
}

/// Whether `label` is a pool word or starts with one followed by a non-letter.
#[inline]
fn has_pool_word(label: &[u8]) -> bool {
    // Most labels (`mail-12`, `example`, `com`) start with a letter no pool word starts with.
    if !matches!(
        label.first(),
        Some(b'a' | b'b' | b'c' | b'd' | b'h' | b'i' | b'p' | b'r' | b's' | b'u')
    ) {
        return false;
    }
    POOL_WORDS.iter().any(|w| {
        label
            .strip_prefix(w.as_bytes())
            .is_some_and(|rest| rest.first().is_none_or(|b| !b.is_ascii_alphabetic()))
    })
}

/// Whether `name` spells the IPv4 address `addr` (see [`looks_generic`]). An IPv6 address is
/// rarely spelt out in a name; the pool words still apply to those.
fn spells_address(name: &[u8], addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            contains_octets(name, &o) || contains_octets(name, &[o[3], o[2], o[1], o[0]])
        }
        IpAddr::V6(_) => false,
    }
}

/// Separators allowed between two octets: up to this many non-digits (`-`, `.`, `x`, `-ip-`
/// would be too many).
const MAX_SEPARATOR: usize = 3;

/// Whether `s` holds the four numbers of `octets` in that order, each written in decimal with
/// or without leading zeros (up to three digits), separated by at most [`MAX_SEPARATOR`]
/// non-digits (or nothing), and not part of a longer digit run at either end.
fn contains_octets(s: &[u8], octets: &[u8; 4]) -> bool {
    (0..s.len()).any(|start| {
        s[start].is_ascii_digit()
            && (start == 0 || !s[start - 1].is_ascii_digit())
            && match_from(s, start, octets)
    })
}

/// Matches `octets` at `s[at..]` (see [`contains_octets`]); a small backtracking search over
/// the zero-padding of each octet and the separator after it.
fn match_from(s: &[u8], at: usize, octets: &[u8]) -> bool {
    let Some((&first, rest)) = octets.split_first() else {
        // All four matched: the last must not run on into more digits.
        return s.get(at).is_none_or(|b| !b.is_ascii_digit());
    };
    // The octet's decimal digits, without allocating (this runs per digit of a name).
    let mut buf = [0u8; 3];
    let digits_of = match first {
        0..=9 => 1,
        10..=99 => 2,
        _ => 3,
    };
    let mut v = first;
    for slot in buf[..digits_of].iter_mut().rev() {
        *slot = b'0' + v % 10;
        v /= 10;
    }
    let text = &buf[..digits_of];
    for width in text.len()..=3 {
        let Some(digits) = s.get(at..at + width) else {
            break;
        };
        let pad = width - text.len();
        if !digits[..pad].iter().all(|&b| b == b'0') || &digits[pad..] != text {
            continue;
        }
        let after = at + width;
        if rest.is_empty() {
            if match_from(s, after, rest) {
                return true;
            }
            continue;
        }
        // Then a separator of 0..=MAX_SEPARATOR non-digits.
        for sep in 0..=MAX_SEPARATOR {
            match s.get(after..after + sep) {
                Some(gap) if gap.iter().all(|b| !b.is_ascii_digit()) => {
                    if match_from(s, after + sep, rest) {
                        return true;
                    }
                }
                _ => break,
            }
        }
    }
    false
}

/// Identity keys computed lately on this thread ([`crate::engine::key::KeyHasher::identity_client`]),
/// by the identity's name as the request spelled it: a pool's requests repeat a few names, and
/// the keyed hash of one cost ~200 instructions per request (callgrind, `examples/identity_cost
/// spf,prefix`), the lower-casing before it some more. A two-way set-associative table of
/// [`MEMO_SETS`] sets (64 KiB) of names up to [`MEMO_NAME`] bytes (longer ones are not kept):
/// a hit compares the whole name, so a collision only costs a recomputation. Kept for one hash
/// secret at a time (`owner`, the secret's id): a thread that serves another engine starts
/// it afresh.
pub(super) struct IdentityMemo {
    owner: u64,
    /// Two ways per set, the one used last first.
    slots: Box<[[MemoSlot; 2]]>,
}

/// Sets of an [`IdentityMemo`].
const MEMO_SETS: usize = 512;

/// The longest name an [`IdentityMemo`] keeps, in bytes: a slot is one 64-byte cache line.
const MEMO_NAME: usize = 46;

#[derive(Clone, Copy)]
#[repr(align(64))]
struct MemoSlot {
    key: Key,
    tag: u8,
    /// 0: empty (an identity name is never empty).
    len: u8,
    name: [u8; MEMO_NAME],
}

impl MemoSlot {
    const EMPTY: MemoSlot = MemoSlot {
        key: Key::VACANT,
        tag: 0,
        len: 0,
        name: [0; MEMO_NAME],
    };

    fn holds(&self, tag: u8, name: &[u8]) -> bool {
        self.tag == tag && usize::from(self.len) == name.len() && same(&self.name, name)
    }
}

/// Whether `stored` begins with `name`, compared eight bytes at a time (the last word
/// overlapping): names are short, and a `memcmp` call cost more than the comparison.
fn same(stored: &[u8; MEMO_NAME], name: &[u8]) -> bool {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let n = name.len();
    if n < 8 {
        return stored[..n] == *name;
    }
    let whole = name
        .chunks_exact(8)
        .zip(stored.chunks_exact(8))
        .all(|(a, b)| word(a) == word(b));
    whole && word(&name[n - 8..]) == word(&stored[n - 8..n])
}

impl Default for IdentityMemo {
    fn default() -> Self {
        Self {
            owner: 0,
            slots: vec![[MemoSlot::EMPTY; 2]; MEMO_SETS].into_boxed_slice(),
        }
    }
}

impl IdentityMemo {
    /// The key of identity `tag:name` under the secret `owner`: kept, or `compute`d and kept.
    /// `compute` must depend on nothing but those three (it may lower-case `name`: the memo is
    /// by the spelling asked).
    pub(super) fn get_or(
        &mut self,
        owner: u64,
        tag: u8,
        name: &[u8],
        compute: impl FnOnce() -> Key,
    ) -> Key {
        if name.is_empty() || name.len() > MEMO_NAME {
            return compute();
        }
        if owner != self.owner {
            self.slots.fill([MemoSlot::EMPTY; 2]);
            self.owner = owner;
        }
        // A cheap mix of the name's first and last eight bytes (two loads; copying partial
        // words to the stack stalled on store forwarding): it only picks a set.
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(w)
        };
        let n = name.len();
        let (first, last) = match name.first_chunk::<8>().zip(name.last_chunk::<8>()) {
            Some((a, b)) => (u64::from_le_bytes(*a), u64::from_le_bytes(*b)),
            None => (word(name), 0),
        };
        let h = (first ^ last.rotate_left(29) ^ ((n as u64) << 56) ^ u64::from(tag))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let set = &mut self.slots[(h >> (64 - MEMO_SETS.trailing_zeros())) as usize];
        if set[0].holds(tag, name) {
            return set[0].key;
        }
        if set[1].holds(tag, name) {
            set.swap(0, 1);
            return set[0].key;
        }
        let key = compute();
        set[1] = set[0];
        let slot = &mut set[0];
        slot.tag = tag;
        slot.len = name.len() as u8;
        slot.name[..name.len()].copy_from_slice(name);
        slot.key = key;
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_lists_and_appends_prefix() {
        assert_eq!(
            Identities::parse("name,prefix").unwrap(),
            Identities::default()
        );
        assert_eq!(
            Identities::parse("name").unwrap().to_string(),
            "name,prefix"
        );
        assert_eq!(
            Identities::parse(" SPF , name ,prefix")
                .unwrap()
                .to_string(),
            "spf,name,prefix"
        );
        assert_eq!(
            Identities::parse("prefix").unwrap(),
            Identities::PREFIX_ONLY
        );
        assert_eq!(Identities::parse("").unwrap(), Identities::PREFIX_ONLY);
        assert_eq!(
            Identities::parse("name,spf").unwrap().kinds(),
            &[IdentityKind::Name, IdentityKind::Spf, IdentityKind::Prefix]
        );
    }

    #[test]
    fn refuses_bad_lists() {
        assert_eq!(
            Identities::parse("name,dns"),
            Err(IdentitiesError::Unknown("dns".into()))
        );
        assert_eq!(
            Identities::parse("name,name"),
            Err(IdentitiesError::Duplicate("name"))
        );
        assert_eq!(
            Identities::parse("prefix,name"),
            Err(IdentitiesError::PrefixNotLast)
        );
    }

    #[test]
    fn provider_pool_names_pool_by_registrable_domain() {
        let cases = [
            ("mail-by1-f54.google.com", "209.85.128.54", "google.com"),
            ("mail-yw1-f170.google.com", "209.85.128.170", "google.com"),
            (
                "mail-am6eur05on2101.outbound.protection.outlook.com",
                "40.107.22.101",
                "outlook.com",
            ),
            (
                "a8-29.smtp-out.amazonses.com",
                "54.240.8.29",
                "amazonses.com",
            ),
            ("mx.example.co.uk", "192.0.2.1", "example.co.uk"),
            ("smtp.mailgun.net.", "198.51.100.9", "mailgun.net"),
            // Ordinary words that merely start like a pool word.
            (
                "relay.hosting-provider.example",
                "192.0.2.9",
                "hosting-provider.example",
            ),
            ("mx.clientsmail.example", "192.0.2.9", "clientsmail.example"),
            ("resolver.example.org", "192.0.2.9", "example.org"),
            // Two of the octets, or all four with a foreign one, are not the address.
            ("mx203-0.example.net", "203.0.113.7", "example.net"),
            ("n203-0-113-8.example.net", "203.0.113.7", "example.net"),
            // IPv6 clients: the name counts unless a pool word says otherwise.
            (
                "mail-oi1-x22c.google.com",
                "2607:f8b0:4864::22c",
                "google.com",
            ),
        ];
        for (name, addr, want) in cases {
            assert_eq!(
                name_identity(name, ip(addr)),
                Some(want),
                "{name} from {addr}"
            );
        }
    }

    #[test]
    fn address_in_the_name_is_generic() {
        let cases = [
            ("203-0-113-7.dyn.example.net", "203.0.113.7"),
            ("c-203-0-113-7.hsd1.example.com", "203.0.113.7"),
            ("7.113.0.203.static.example", "203.0.113.7"),
            ("7-113-0-203.example.org", "203.0.113.7"),
            ("cpe203000113007.example.org", "203.0.113.7"),
            ("abc20301137.example.org", "203.0.113.7"),
            ("x203x0x113x7.example.org", "203.0.113.7"),
            ("mail.203_0_113_7.example.org", "203.0.113.7"),
        ];
        for (name, addr) in cases {
            assert!(looks_generic(name, ip(addr)), "{name} from {addr}");
            assert_eq!(name_identity(name, ip(addr)), None, "{name}");
        }
        // The same names from an address they do not spell are judged by their words alone.
        assert!(!looks_generic(
            "7-113-0-203.example.org",
            ip("198.51.100.1")
        ));
        assert!(!looks_generic("n2030113.example.org", ip("203.0.113.7")));
        // A longer digit run is not the octet.
        assert!(!looks_generic(
            "mx1203-0-113-77.example.org",
            ip("203.0.113.7")
        ));
    }

    #[test]
    fn pool_words_are_generic() {
        let cases = [
            "host7.pool.isp.example",
            "dynamic.example.net",
            "a.dyn.example.net",
            "dhcp-12.example.net",
            "dsl-lns-1.example.net",
            "adsl12.example.net",
            "ppp0.example.net",
            "cable-modem.example.net",
            "broadband.example.net",
            "client-9.example.net",
            "customer.example.net",
            "static-mail.example.net",
            "ip-10-11.example.net",
            "user1.example.net",
            "res_9.example.net",
            "pool.example.net",
        ];
        for name in cases {
            assert!(looks_generic(name, ip("198.51.100.1")), "{name}");
            assert_eq!(name_identity(name, ip("198.51.100.1")), None, "{name}");
        }
    }

    #[test]
    fn unusable_names_have_no_identity() {
        let a = ip("192.0.2.1");
        for name in [
            "",
            "localhost",
            "com",
            "co.uk",
            "[192.0.2.1]",
            "mail..example.com",
            "MAIL.EXAMPLE.COM", // the caller lower-cases
            "mail example.com",
            "198.51.100.1",
            &"a.".repeat(130),
        ] {
            assert_eq!(name_identity(name, a), None, "{name:?}");
        }
    }

    #[test]
    fn memo_keeps_keys_by_owner_tag_and_spelling() {
        let mut m = IdentityMemo::default();
        let k = |n: u64| Key { lo: n, hi: 1 };
        let calls = std::cell::Cell::new(0);
        let get = |m: &mut IdentityMemo, owner, tag, name: &[u8], v| {
            m.get_or(owner, tag, name, || {
                calls.set(calls.get() + 1);
                k(v)
            })
        };
        assert_eq!(get(&mut m, 1, b'S', b"example.org", 10), k(10));
        assert_eq!(get(&mut m, 1, b'S', b"example.org", 99), k(10), "kept");
        // Another spelling, tag, owner or name is computed, not taken from the slot.
        assert_eq!(get(&mut m, 1, b'S', b"Example.org", 11), k(11));
        assert_eq!(get(&mut m, 1, b'N', b"example.org", 12), k(12));
        assert_eq!(get(&mut m, 2, b'S', b"example.org", 13), k(13));
        assert_eq!(get(&mut m, 1, b'S', b"example.net", 14), k(14));
        // Names too long to keep are computed every time.
        let long = [b'a'; MEMO_NAME + 1];
        assert_eq!(get(&mut m, 1, b'S', &long, 15), k(15));
        assert_eq!(get(&mut m, 1, b'S', &long, 16), k(16));
        assert_eq!(calls.get(), 7);
        // Many names: every answer is still the name's own.
        for i in 0..1000u64 {
            let name = format!("d{i}.example");
            let got = m.get_or(1, b'S', name.as_bytes(), || k(i));
            assert_eq!(got, k(i), "{name}");
            assert_eq!(m.get_or(1, b'S', name.as_bytes(), || k(u64::MAX)), k(i));
        }
    }
}

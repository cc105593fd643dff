//! The keyed, stable 128-bit key of a triplet.
//!
//! The table stores no addresses, only this key. It is SipHash-1-3 with 128-bit output, keyed
//! with a secret kept in the data directory: an outsider who does not know the secret cannot
//! choose triplets that collide or pile into one shard. SipHash is specified byte for byte, so
//! the same secret and input give the same key in every run and every version; the hasher is
//! never one of the per-process random ones (`ahash`'s default `RandomState`), which would
//! orphan every stored record at the next start.

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

use super::normalize::ClientNet;

/// A 128-bit record key. Two `u64` halves rather than a `u128`, so records stay 8-byte aligned
/// and a triplet record packs into 24 bytes instead of being padded to 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Key {
    /// Low 64 bits: pick the slot inside a shard.
    pub lo: u64,
    /// High 64 bits: the top bits pick the shard.
    pub hi: u64,
}

impl Key {
    /// The all-zero key marks a vacant table slot; [`KeyHasher`] never produces it.
    pub const VACANT: Key = Key { lo: 0, hi: 0 };

    /// Whether this is the vacant marker.
    #[inline]
    pub fn is_vacant(self) -> bool {
        self.lo == 0 && self.hi == 0
    }

    /// Builds a key from its 128-bit value; zero is mapped to 1 so it never reads as vacant.
    #[inline]
    pub fn from_u128(v: u128) -> Key {
        let k = Key {
            lo: v as u64,
            hi: (v >> 64) as u64,
        };
        if k.is_vacant() {
            Key { lo: 1, hi: 0 }
        } else {
            k
        }
    }

    /// The 128-bit value.
    #[inline]
    pub fn as_u128(self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }
}

/// The secret that keys the hash: 16 bytes, made once per data directory.
#[derive(Clone, PartialEq, Eq)]
pub struct HashSecret(pub [u8; 16]);

impl std::fmt::Debug for HashSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret itself: logs travel further than the data directory.
        write!(f, "HashSecret(id={:016x})", self.id())
    }
}

impl HashSecret {
    /// A public identifier of the secret (a hash of it), stored in snapshots so that a
    /// snapshot made with another secret is refused instead of mixed in.
    pub fn id(&self) -> u64 {
        let mut h = SipHasher13::new_with_key(&[0u8; 16]);
        h.write(b"greyhound key id");
        h.write(&self.0);
        h.finish128().h1
    }
}

/// Turns normalised triplets and client networks into [`Key`]s.
#[derive(Clone)]
pub struct KeyHasher {
    /// Keyed once: every key is one call to its one-shot `hash`, which reads the message
    /// eight bytes at a time with no tail buffering (callgrind: a triplet's key cost ~550
    /// instructions through `write` + `finish128`, ~280 this way; same function, same keys).
    sip: SipHasher13,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHasher").finish_non_exhaustive()
    }
}

/// Starts, in `buf` (cleared first), the message a triplet key is the hash of: the triplet
/// tag and the client. Sender and recipient follow with [`push_field`]; building it in place
/// lets the normaliser write straight into it instead of into buffers copied here after.
#[inline]
pub fn begin_triplet(client: &ClientNet, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(TAG_TRIPLET);
    buf.extend_from_slice(&client.encode());
}

/// Appends one length-prefixed field whose bytes `write` appends to `buf`; returns where
/// the field's bytes start.
#[inline]
pub fn push_field(buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> usize {
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let start = buf.len();
    write(buf);
    let len = (buf.len() - start) as u32;
    buf[len_at..start].copy_from_slice(&len.to_le_bytes());
    start
}

/// Appends the DATA-stage field in the recipient's place: `body:` and the digest, lower-cased.
/// An address can be `body:…` too, so the message's tag is also changed (`D` for `T`): a
/// (client, sender, digest) key can never be the key of any (client, sender, recipient).
#[inline]
pub fn push_body(buf: &mut Vec<u8>, digest: &str) {
    buf[0] = TAG_DATA;
    push_field(buf, |b| {
        b.extend_from_slice(b"body:");
        let at = b.len();
        b.extend_from_slice(digest.as_bytes());
        b[at..].make_ascii_lowercase();
    });
}

/// Runs `f` on the message of the triplet in `message` (built by [`begin_triplet`]) with its
/// client network replaced by a client identity: the identity's tag byte (never 4 or 6, a
/// network's family byte, so no identity message equals a network one) and the identity's
/// 16-byte key ([`KeyHasher::identity_client`], which is also its auto-whitelist key), then
/// the same sender and recipient (or digest) fields. The message keeps the length of the
/// network's: the name is hashed once, short, for both keys. Rewritten in place and put back
/// after `f`: a copy of the whole message per identity was a tenth of an `spf` identity's cost
/// (callgrind, `examples/identity_cost`).
#[inline]
pub fn with_identity<R>(
    message: &mut [u8],
    tag: u8,
    identity: Key,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let network: [u8; 17] = message[1..18].try_into().expect("a triplet message");
    message[1] = tag;
    message[2..10].copy_from_slice(&identity.lo.to_le_bytes());
    message[10..18].copy_from_slice(&identity.hi.to_le_bytes());
    let r = f(message);
    message[1..18].copy_from_slice(&network);
    r
}

/// The longest identity name hashed: a DNS name's limit (RFC 1035).
const MAX_IDENTITY_NAME: usize = 253;

// Domain-separation tags: a client key and a triplet key can never be the same input, nor a
// recipient triplet and a DATA-stage one.
const TAG_TRIPLET: u8 = b'T';
const TAG_CLIENT: u8 = b'C';
const TAG_DATA: u8 = b'D';

impl KeyHasher {
    /// A hasher keyed with `secret`.
    pub fn new(secret: &HashSecret) -> Self {
        Self {
            sip: SipHasher13::new_with_key(&secret.0),
        }
    }

    /// Key of a normalised triplet. Sender and recipient are length-prefixed so that no two
    /// different (sender, recipient) pairs give the same byte stream. `buf` is scratch space:
    /// the message is assembled there and hashed in one call, because SipHash fed in several
    /// small writes pays for buffering each one (measured: ~25 % of the raw-query cost).
    #[inline]
    pub fn triplet(
        &self,
        client: &ClientNet,
        sender: &[u8],
        recipient: &[u8],
        buf: &mut Vec<u8>,
    ) -> Key {
        begin_triplet(client, buf);
        push_field(buf, |b| b.extend_from_slice(sender));
        push_field(buf, |b| b.extend_from_slice(recipient));
        self.finish_triplet(buf)
    }

    /// The key of a message built with [`begin_triplet`] and two [`push_field`]s (sender,
    /// then recipient).
    #[inline]
    pub fn finish_triplet(&self, message: &[u8]) -> Key {
        Key::from_u128(self.sip.hash(message).as_u128())
    }

    /// Key of a client identity (`tag` and name, see [`with_identity`]) for the
    /// auto-whitelist table.
    #[inline]
    pub fn identity_client(&self, tag: u8, name: &[u8]) -> Key {
        let head = [TAG_CLIENT, tag];
        let len = (name.len() as u32).to_le_bytes();
        // On the stack for any DNS name (at most 253 bytes), hashed in one call; a longer
        // name (no caller passes one) is fed in pieces, which gives the same key.
        if name.len() > MAX_IDENTITY_NAME {
            let mut h = self.sip;
            h.write(&head);
            h.write(&len);
            h.write(name);
            return Key::from_u128(h.finish128().as_u128());
        }
        let mut msg = [0u8; 6 + MAX_IDENTITY_NAME];
        msg[..2].copy_from_slice(&head);
        msg[2..6].copy_from_slice(&len);
        msg[6..6 + name.len()].copy_from_slice(name);
        Key::from_u128(self.sip.hash(&msg[..6 + name.len()]).as_u128())
    }

    /// Key of a client network, for the auto-whitelist table.
    #[inline]
    pub fn client(&self, client: &ClientNet) -> Key {
        let mut msg = [0u8; 18];
        msg[0] = TAG_CLIENT;
        msg[1..].copy_from_slice(&client.encode());
        Key::from_u128(self.sip.hash(&msg).as_u128())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn secret(b: u8) -> HashSecret {
        HashSecret([b; 16])
    }

    #[test]
    fn key_is_pinned_across_versions() {
        // A stored snapshot is only usable if this value never changes. If this test fails,
        // the key derivation changed and every existing data directory would be orphaned.
        let h = KeyHasher::new(&HashSecret(*b"0123456789abcdef"));
        let c = ClientNet::V4(Ipv4Addr::new(192, 0, 2, 0));
        let k = h.triplet(
            &c,
            b"alice@example.org",
            b"bob@example.net",
            &mut Vec::new(),
        );
        assert_eq!(k.as_u128(), PINNED_TRIPLET);
        assert_eq!(h.client(&c).as_u128(), PINNED_CLIENT);
        // Records keyed under an `spf:` or `name:` identity, and the identity's own key.
        let id = h.identity_client(b'S', b"example.org");
        assert_eq!(id.as_u128(), PINNED_IDENTITY);
        // A name past the stack buffer takes the other path to the same function.
        let long = [b'a'; 300];
        let mut streamed = SipHasher13::new_with_key(b"0123456789abcdef");
        streamed.write(b"CN");
        streamed.write(&300u32.to_le_bytes());
        streamed.write(&long);
        assert_eq!(
            h.identity_client(b'N', &long).as_u128(),
            streamed.finish128().as_u128()
        );
        let mut message = Vec::new();
        begin_triplet(&c, &mut message);
        push_field(&mut message, |b| b.extend_from_slice(b"alice@example.org"));
        push_field(&mut message, |b| b.extend_from_slice(b"bob@example.net"));
        let network = message.clone();
        let k = with_identity(&mut message, b'S', id, |m| h.finish_triplet(m));
        assert_eq!(k.as_u128(), PINNED_IDENTITY_TRIPLET);
        assert_eq!(message, network, "the network's message is put back");
    }

    const PINNED_TRIPLET: u128 = 0x7f82_5b41_b6d6_1532_4aa0_9b83_8926_ccfb;
    const PINNED_CLIENT: u128 = 0xa1c1_3f44_1bff_7ca7_f3ea_428d_0749_7007;
    const PINNED_IDENTITY: u128 = 0xcb98_589d_1401_301e_b082_5019_f4dc_b552;
    const PINNED_IDENTITY_TRIPLET: u128 = 0x8b80_b48d_ad65_d553_36f3_37e8_ee2e_6624;

    #[test]
    fn different_secret_different_key() {
        let c = ClientNet::V4(Ipv4Addr::new(192, 0, 2, 0));
        let buf = &mut Vec::new();
        let a = KeyHasher::new(&secret(1)).triplet(&c, b"a@b", b"c@d", buf);
        let b = KeyHasher::new(&secret(2)).triplet(&c, b"a@b", b"c@d", buf);
        assert_ne!(a, b);
        assert_ne!(secret(1).id(), secret(2).id());
    }

    #[test]
    fn length_prefix_separates_fields() {
        let h = KeyHasher::new(&secret(7));
        let c = ClientNet::V4(Ipv4Addr::new(198, 51, 100, 0));
        // Same concatenation "ab" + "c" vs "a" + "bc": must differ.
        let buf = &mut Vec::new();
        assert_ne!(
            h.triplet(&c, b"ab", b"c", buf),
            h.triplet(&c, b"a", b"bc", buf)
        );
        // The null sender is distinct from any sender.
        assert_ne!(
            h.triplet(&c, b"", b"x@y", buf),
            h.triplet(&c, b"x", b"@y", buf)
        );
    }

    #[test]
    fn client_and_triplet_domains_are_separate() {
        let h = KeyHasher::new(&secret(7));
        let c = ClientNet::V4(Ipv4Addr::new(198, 51, 100, 0));
        assert_ne!(h.client(&c), h.triplet(&c, b"", b"", &mut Vec::new()));
    }

    #[test]
    fn body_and_recipient_triplets_never_collide() {
        let h = KeyHasher::new(&secret(7));
        let c = ClientNet::V4(Ipv4Addr::new(198, 51, 100, 0));
        let digest = "0123456789ABCDEF";
        let data = |buf: &mut Vec<u8>| {
            begin_triplet(&c, buf);
            push_field(buf, |b| b.extend_from_slice(b"a@b"));
            push_body(buf, digest);
            h.finish_triplet(buf)
        };
        let buf = &mut Vec::new();
        let k = data(buf);
        // The field holds the prefix and the lower-cased digest.
        assert!(buf.ends_with(b"body:0123456789abcdef"));
        // A recipient spelling the very same field bytes still gives another key.
        assert_ne!(k, h.triplet(&c, b"a@b", b"body:0123456789abcdef", buf));
        assert_ne!(k, h.triplet(&c, b"a@b", b"0123456789abcdef", buf));
        // The digest's case does not matter; the sender still does.
        begin_triplet(&c, buf);
        push_field(buf, |b| b.extend_from_slice(b"a@b"));
        push_body(buf, "0123456789abcdef");
        assert_eq!(k, h.finish_triplet(buf));
        begin_triplet(&c, buf);
        push_field(buf, |b| b.extend_from_slice(b"x@b"));
        push_body(buf, digest);
        assert_ne!(k, h.finish_triplet(buf));
    }

    #[test]
    fn zero_never_reads_as_vacant() {
        assert!(!Key::from_u128(0).is_vacant());
        assert!(Key::VACANT.is_vacant());
        assert_eq!(Key::from_u128(5u128 << 64 | 9).as_u128(), 5u128 << 64 | 9);
    }

    #[test]
    fn debug_does_not_leak_the_secret() {
        let s = format!("{:?}", HashSecret(*b"supersecretvalue"));
        assert!(!s.contains("supersecret"), "{s}");
        assert!(s.starts_with("HashSecret(id="), "{s}");
    }
}

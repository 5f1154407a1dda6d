//! Client keys: extraction from `Authorization`, hashing, and constant-time lookup by digest.
//!
//! The configuration holds only digests. A presented key is hashed and looked up; the key itself
//! is never stored, logged or forwarded. The lookup hashes the digest into a table, or searches a
//! sorted array of digests (the keys of a `key_set`, 36 bytes each instead of a table's ~85) with
//! comparisons that read every byte, and compares the candidate in constant time, so the time
//! taken says nothing about how close a wrong key was to a right one (at most which table bucket
//! or array position its digest falls in, which needs a preimage to use).

use std::hash::{BuildHasherDefault, Hash, Hasher};

use hashbrown::HashMap;
use md5::Md5;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::types::ClientId;

/// Longest bearer token accepted; real keys are far shorter, and this bounds hashing work.
pub const MAX_KEY_LEN: usize = 512;

/// Hash algorithm of a configured digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestKind {
    /// SHA-256 (`key_sha256`), the default.
    Sha256,
    /// MD5 (`key_md5`), accepted for migrations from the older proxy, whose client ids were MD5.
    Md5,
}

impl DigestKind {
    fn len(self) -> usize {
        match self {
            DigestKind::Sha256 => 32,
            DigestKind::Md5 => 16,
        }
    }
}

/// A key digest. Equality is constant-time in the digest bytes.
#[derive(Debug, Clone, Copy, Eq)]
pub struct Digest {
    kind: DigestKind,
    len: u8,
    bytes: [u8; 32],
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && bool::from(self.as_bytes().ct_eq(other.as_bytes()))
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Digests are uniformly distributed already: eight bytes make a good table hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(self.bytes.get(..8).unwrap_or(&[0; 8]));
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl Digest {
    /// Parses a hex digest (either case) of the given kind.
    pub fn from_hex(kind: DigestKind, hex: &str) -> Result<Self, String> {
        let want = kind.len() * 2;
        let algo = match kind {
            DigestKind::Sha256 => "SHA-256",
            DigestKind::Md5 => "MD5",
        };
        if hex.len() != want {
            return Err(format!(
                "expected {want} hex characters (the {algo} of the whole key), got {} characters",
                hex.chars().count()
            ));
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let (Some(&hi), Some(&lo)) = (pair.first(), pair.get(1)) else {
                return Err("not hexadecimal".into());
            };
            match (hex_val(hi), hex_val(lo), bytes.get_mut(i)) {
                (Some(h), Some(l), Some(slot)) => *slot = h << 4 | l,
                _ => return Err("not hexadecimal: use only 0-9 and a-f".into()),
            }
        }
        Ok(Self {
            kind,
            len: kind.len() as u8,
            bytes,
        })
    }

    /// A SHA-256 digest from its bytes (a `key_set` record).
    pub fn from_sha256(bytes: [u8; 32]) -> Self {
        Self {
            kind: DigestKind::Sha256,
            len: 32,
            bytes,
        }
    }

    /// Digest of a presented key.
    pub fn of_key(kind: DigestKind, key: &[u8]) -> Self {
        let mut bytes = [0u8; 32];
        match kind {
            DigestKind::Sha256 => bytes.copy_from_slice(&Sha256::digest(key)),
            DigestKind::Md5 => {
                if let Some(dst) = bytes.get_mut(..16) {
                    dst.copy_from_slice(&Md5::digest(key));
                }
            }
        }
        Self {
            kind,
            len: kind.len() as u8,
            bytes,
        }
    }

    /// Algorithm of this digest.
    pub fn kind(&self) -> DigestKind {
        self.kind
    }

    /// The raw digest bytes (16 or 32).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or(&self.bytes)
    }

    /// Lowercase hex, as in the configuration.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(self.as_bytes().len() * 2);
        for b in self.as_bytes() {
            for nibble in [b >> 4, b & 0xf] {
                s.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
            }
        }
        s
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Passes the precomputed table hash through (see `Hash for Digest`).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A key's owner and, for a key that expires, when (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHolder {
    /// The client the key belongs to; all of a client's keys spend its one budget.
    pub client: ClientId,
    /// First instant at which the key is refused; `None`: never.
    pub expires_at_ms: Option<u64>,
}

/// A SHA-256 digest of a key that never expires, and its client: 36 bytes.
#[derive(Debug, Clone, Copy)]
struct SortedKey {
    digest: [u8; 32],
    client: u32,
}

/// Maps key digests to clients.
///
/// Two stores: SHA-256 digests of keys that never expire, inserted in increasing order (a
/// `key_set`'s records are sorted by digest), go to a sorted array searched by bisection; every
/// other digest goes to a hash table. A lookup is one bisection (17 steps at 100,000 keys) and
/// at most two table probes, whatever the number of clients.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_digest: HashMap<Digest, KeyHolder, BuildHasherDefault<PassThrough>>,
    sorted: Vec<SortedKey>,
    has_md5: bool,
}

/// Whether `a < b`, reading every byte (no early exit on the first difference): four
/// big-endian words, compared without branches.
fn ct_less(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let word = |w: &[u8]| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(w);
        u64::from_be_bytes(bytes)
    };
    let mut less = 0u8;
    let mut decided = 0u8;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let (x, y) = (word(x), word(y));
        let lt = u8::from(x < y);
        let gt = u8::from(x > y);
        less |= lt & !decided;
        decided |= lt | gt;
    }
    less == 1
}

impl KeyIndex {
    /// An empty index with room for `n` digests in its table (one allocation for a whole
    /// configuration).
    pub fn with_capacity(n: usize) -> Self {
        Self::with_capacities(n, 0)
    }

    /// An empty index with room for `table` digests in its table and `sorted` in its sorted
    /// array (a key set's records).
    pub fn with_capacities(table: usize, sorted: usize) -> Self {
        Self {
            by_digest: HashMap::with_capacity_and_hasher(table, BuildHasherDefault::default()),
            sorted: Vec::with_capacity(sorted),
            has_md5: false,
        }
    }

    /// Number of digests indexed.
    pub fn len(&self) -> usize {
        self.by_digest.len() + self.sorted.len()
    }

    /// Whether no digest is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The client of a digest in the sorted array: a bisection whose number of steps depends
    /// only on the array's length, each comparison reading all 32 bytes, and a constant-time
    /// comparison of the one candidate.
    fn sorted_client(&self, digest: &[u8; 32]) -> Option<ClientId> {
        let mut base = 0usize;
        let mut size = self.sorted.len();
        if size == 0 {
            return None;
        }
        while size > 1 {
            let half = size / 2;
            let mid = base + half;
            if let Some(e) = self.sorted.get(mid) {
                if !ct_less(digest, &e.digest) {
                    base = mid;
                }
            }
            size -= half;
        }
        let e = self.sorted.get(base)?;
        bool::from(e.digest.ct_eq(digest)).then_some(e.client as ClientId)
    }

    /// The holder of exactly this digest.
    fn get(&self, digest: &Digest) -> Option<KeyHolder> {
        if digest.kind == DigestKind::Sha256 {
            if let Some(client) = self.sorted_client(&digest.bytes) {
                return Some(KeyHolder {
                    client,
                    expires_at_ms: None,
                });
            }
        }
        self.by_digest.get(digest).copied()
    }

    /// Adds a key that never expires; returns the client that already has it, if any.
    pub fn insert(&mut self, digest: Digest, client: ClientId) -> Option<ClientId> {
        self.insert_key(
            digest,
            KeyHolder {
                client,
                expires_at_ms: None,
            },
        )
    }

    /// Adds a key; returns the client that already has it, if any.
    pub fn insert_key(&mut self, digest: Digest, holder: KeyHolder) -> Option<ClientId> {
        let sortable = digest.kind == DigestKind::Sha256
            && holder.expires_at_ms.is_none()
            && self
                .sorted
                .last()
                .is_none_or(|last| last.digest < digest.bytes);
        if let (true, Ok(client)) = (sortable, u32::try_from(holder.client)) {
            // Above every sorted digest, so not among them: only the map may hold it. (The
            // full lookup, a constant-time bisection, was most of a key set's index time.)
            if let Some(other) = self.by_digest.get(&digest) {
                return Some(other.client);
            }
            self.sorted.push(SortedKey {
                digest: digest.bytes,
                client,
            });
            return None;
        }
        // Among the sorted digests, or else in the map (looked up once, by the entry).
        if digest.kind == DigestKind::Sha256 {
            if let Some(client) = self.sorted_client(&digest.bytes) {
                return Some(client);
            }
        }
        match self.by_digest.entry(digest) {
            hashbrown::hash_map::Entry::Occupied(e) => Some(e.get().client),
            hashbrown::hash_map::Entry::Vacant(e) => {
                self.has_md5 |= digest.kind == DigestKind::Md5;
                e.insert(holder);
                None
            }
        }
    }

    /// Finds the holder of the digest that matches this presented key, expired or not.
    pub fn holder(&self, key: &[u8]) -> Option<KeyHolder> {
        let sha = Digest::of_key(DigestKind::Sha256, key);
        if let Some(h) = self.get(&sha) {
            return Some(h);
        }
        if self.has_md5 {
            return self.get(&Digest::of_key(DigestKind::Md5, key));
        }
        None
    }

    /// Finds the client whose digest matches this presented key (expired or not).
    pub fn lookup(&self, key: &[u8]) -> Option<ClientId> {
        self.holder(key).map(|h| h.client)
    }

    /// The client of a presented key that is valid at `now_ms` (Unix milliseconds): unknown
    /// keys are [`KeyError::Unknown`], keys at or past their expiry [`KeyError::Expired`].
    pub fn admit(&self, key: &[u8], now_ms: u64) -> Result<ClientId, KeyError> {
        let h = self.holder(key).ok_or(KeyError::Unknown)?;
        match h.expires_at_ms {
            Some(at) if now_ms >= at => Err(KeyError::Expired),
            _ => Ok(h.client),
        }
    }
}

/// Why a request carries no usable key. Clients get one answer for all of them (no oracle);
/// the reason is for debug logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// No `authorization` header.
    Missing,
    /// More than one `authorization` header.
    Repeated,
    /// Not `Bearer <token>`, or the token has characters a key cannot have.
    Malformed,
    /// Well-formed, but no client has it.
    Unknown,
    /// No key, over a connection whose peer certificate names no configured identity (or
    /// carries none): see [`crate::identity`].
    UnknownIdentity,
    /// A client's key whose `expires_at` has passed. The only failure whose answer differs
    /// (the message says the key expired): only a holder of the exact key can get it.
    Expired,
}

/// Extracts the bearer token from the `authorization` header values of a request.
///
/// `values` are all values of that header in order. The scheme is case-insensitive (RFC 9110);
/// the token must be 1..=MAX_KEY_LEN visible ASCII characters.
pub fn bearer_token<'a, I>(values: I) -> Result<&'a [u8], KeyError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut it = values.into_iter();
    let value = it.next().ok_or(KeyError::Missing)?;
    if it.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let value = trim_ows(value);
    let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
        Some(sp) => (
            value.get(..sp).unwrap_or_default(),
            value.get(sp..).unwrap_or_default(),
        ),
        None => return Err(KeyError::Malformed),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(KeyError::Malformed);
    }
    let token = trim_ows(rest);
    if token.is_empty()
        || token.len() > MAX_KEY_LEN
        || !token.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(KeyError::Malformed);
    }
    Ok(token)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sha_hex(key: &str) -> String {
        Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex()
    }

    #[test]
    fn known_digests() {
        // Values from `printf %s sk-tollgate-demo | sha256sum` and `| md5sum`.
        assert_eq!(
            sha_hex("sk-tollgate-demo"),
            "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"
        );
        assert_eq!(
            Digest::of_key(DigestKind::Md5, b"sk-tollgate-demo").to_hex(),
            "32bd3c47e408828a22d81d4fe5f3c06d"
        );
    }

    #[test]
    fn hex_round_trip_and_case() {
        let d = Digest::of_key(DigestKind::Sha256, b"k");
        let upper = d.to_hex().to_uppercase();
        assert_eq!(Digest::from_hex(DigestKind::Sha256, &upper).unwrap(), d);
        assert!(Digest::from_hex(DigestKind::Md5, &d.to_hex()).is_err());
        let mut raw = [0u8; 32];
        raw.copy_from_slice(d.as_bytes());
        assert_eq!(Digest::from_sha256(raw), d);
    }

    #[test]
    fn index_finds_sha_and_md5_clients() {
        let mut idx = KeyIndex::default();
        assert_eq!(
            idx.insert(Digest::of_key(DigestKind::Sha256, b"key-a"), 0),
            None
        );
        assert_eq!(
            idx.insert(Digest::of_key(DigestKind::Md5, b"key-b"), 1),
            None
        );
        assert_eq!(
            idx.insert(Digest::of_key(DigestKind::Sha256, b"key-a"), 2),
            Some(0)
        );
        assert_eq!(idx.len(), 2);
        assert!(!idx.is_empty() && KeyIndex::with_capacity(8).is_empty());
        assert_eq!(idx.lookup(b"key-a"), Some(0));
        assert_eq!(idx.lookup(b"key-b"), Some(1));
        assert_eq!(idx.lookup(b"key-c"), None);
        assert_eq!(idx.lookup(b""), None);
    }

    #[test]
    fn expired_keys_are_refused_from_their_expiry_on() {
        let mut idx = KeyIndex::default();
        let holder = |expires_at_ms| KeyHolder {
            client: 3,
            expires_at_ms,
        };
        let soon = Digest::of_key(DigestKind::Sha256, b"soon");
        let never = Digest::of_key(DigestKind::Md5, b"never");
        assert_eq!(idx.insert_key(soon, holder(Some(1_000))), None);
        assert_eq!(idx.insert_key(never, holder(None)), None);
        assert_eq!(idx.admit(b"soon", 999), Ok(3));
        assert_eq!(idx.admit(b"soon", 1_000), Err(KeyError::Expired));
        assert_eq!(idx.admit(b"soon", u64::MAX), Err(KeyError::Expired));
        assert_eq!(idx.admit(b"never", u64::MAX), Ok(3));
        assert_eq!(idx.admit(b"other", 0), Err(KeyError::Unknown));
        // Lookup ignores expiry (duplicate checks, tools).
        assert_eq!(idx.lookup(b"soon"), Some(3));
        assert_eq!(idx.insert_key(soon, holder(None)), Some(3));
    }

    #[test]
    fn sorted_keys_are_found_by_bisection_and_mix_with_the_table() {
        // Digests in increasing order go to the sorted array, the others to the table.
        let mut digests: Vec<(Digest, String)> = (0..1000)
            .map(|i| {
                let key = format!("sk-{i}");
                (Digest::of_key(DigestKind::Sha256, key.as_bytes()), key)
            })
            .collect();
        digests.sort_by_key(|(d, _)| d.bytes);
        let mut idx = KeyIndex::with_capacities(4, digests.len());
        for (i, (d, _)) in digests.iter().enumerate() {
            assert_eq!(idx.insert(*d, i), None);
        }
        assert_eq!((idx.sorted.len(), idx.by_digest.len()), (1000, 0));
        // Out of order, expiring or MD5: the table.
        let late = Digest::of_key(DigestKind::Sha256, b"late");
        assert!(late.bytes < digests.last().unwrap().0.bytes);
        assert_eq!(idx.insert(late, 1000), None);
        let expiring = KeyHolder {
            client: 1001,
            expires_at_ms: Some(5),
        };
        let mut high = [0xffu8; 32];
        high[31] = 0xfe;
        assert_eq!(idx.insert_key(Digest::from_sha256(high), expiring), None);
        assert_eq!(
            idx.insert(Digest::of_key(DigestKind::Md5, b"old"), 1002),
            None
        );
        assert_eq!(
            (idx.sorted.len(), idx.by_digest.len(), idx.len()),
            (1000, 3, 1003)
        );
        for (i, (_, key)) in digests.iter().enumerate() {
            assert_eq!(idx.lookup(key.as_bytes()), Some(i), "{key}");
        }
        assert_eq!(idx.lookup(b"late"), Some(1000));
        assert_eq!(idx.lookup(b"old"), Some(1002));
        assert_eq!(idx.holder(b"sk-1000"), None);
        // Duplicates are found in either store, whichever store the new one would go to.
        let (first, _) = digests.first().unwrap();
        assert_eq!(idx.insert(*first, 7), Some(0));
        assert_eq!(idx.insert(late, 7), Some(1000));
        assert_eq!(
            idx.insert_key(Digest::from_sha256(high), expiring),
            Some(1001)
        );
        // The extremes of the digest space.
        let mut edges = KeyIndex::default();
        assert_eq!(edges.insert(Digest::from_sha256([0; 32]), 0), None);
        assert_eq!(edges.insert(Digest::from_sha256([0xff; 32]), 1), None);
        assert_eq!(edges.sorted.len(), 2);
        assert_eq!(
            edges.get(&Digest::from_sha256([0; 32])).map(|h| h.client),
            Some(0)
        );
        assert_eq!(
            edges
                .get(&Digest::from_sha256([0xff; 32]))
                .map(|h| h.client),
            Some(1)
        );
        assert_eq!(edges.get(&Digest::from_sha256([0x80; 32])), None);
        assert_eq!(KeyIndex::default().lookup(b"k"), None);
    }

    #[test]
    fn ct_less_orders_like_the_slices() {
        let a = [1u8; 32];
        let mut b = a;
        assert!(!ct_less(&a, &b));
        b[31] = 2;
        assert!(ct_less(&a, &b) && !ct_less(&b, &a));
        b[0] = 0;
        assert!(ct_less(&b, &a) && !ct_less(&a, &b));
    }

    #[test]
    fn same_bytes_different_kind_differ() {
        let a = Digest::from_hex(DigestKind::Md5, &"ab".repeat(16)).unwrap();
        let mut b = a;
        b.kind = DigestKind::Sha256;
        assert_ne!(a, b);
    }

    #[test]
    fn bearer_parsing() {
        fn ok(v: &str) -> Result<&[u8], KeyError> {
            bearer_token([v.as_bytes()])
        }
        assert_eq!(ok("Bearer sk-abc").unwrap(), b"sk-abc");
        assert_eq!(ok("bearer   sk-abc  ").unwrap(), b"sk-abc");
        assert_eq!(ok("BEARER\tsk").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Basic dXNlcjpwYXNz").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Bearer").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Bearer ").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Bearer a b").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Bearer sk-\u{e9}").err(), Some(KeyError::Malformed));
        assert_eq!(ok("Bearer sk\x01").err(), Some(KeyError::Malformed));
        assert_eq!(
            ok(&format!("Bearer {}", "k".repeat(MAX_KEY_LEN + 1))).err(),
            Some(KeyError::Malformed)
        );
        assert_eq!(
            bearer_token(std::iter::empty()).err(),
            Some(KeyError::Missing)
        );
        assert_eq!(
            bearer_token([&b"Bearer a"[..], &b"Bearer b"[..]]).err(),
            Some(KeyError::Repeated)
        );
        assert_eq!(
            bearer_token([&b"Bearer \xff\xfe"[..]]).err(),
            Some(KeyError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn bearer_never_panics_and_tokens_are_clean(v in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(t) = bearer_token([&v[..]]) {
                prop_assert!(!t.is_empty() && t.len() <= MAX_KEY_LEN);
                prop_assert!(t.iter().all(|b| (0x21..=0x7e).contains(b)));
            }
        }

        #[test]
        fn sorted_and_table_lookups_agree(seeds in proptest::collection::btree_set(any::<u16>(), 1..200), probe in any::<u16>()) {
            let keys: Vec<String> = seeds.iter().map(|s| format!("k{s}")).collect();
            let mut sorted: Vec<(Digest, usize)> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (Digest::of_key(DigestKind::Sha256, k.as_bytes()), i))
                .collect();
            sorted.sort_by_key(|(d, _)| d.bytes);
            let mut bisect = KeyIndex::default();
            let mut table = KeyIndex::default();
            for (d, i) in &sorted {
                prop_assert_eq!(bisect.insert(*d, *i), None);
                prop_assert_eq!(table.by_digest.insert(*d, KeyHolder { client: *i, expires_at_ms: None }), None);
            }
            prop_assert!(table.sorted.is_empty() && bisect.by_digest.is_empty());
            for k in keys.iter().map(String::as_str).chain([format!("k{probe}").as_str(), "none"]) {
                prop_assert_eq!(bisect.lookup(k.as_bytes()), table.lookup(k.as_bytes()));
            }
        }

        #[test]
        fn hex_parser_never_panics(s in "\\PC{0,70}") {
            let _ = Digest::from_hex(DigestKind::Sha256, &s);
            let _ = Digest::from_hex(DigestKind::Md5, &s);
        }
    }
}

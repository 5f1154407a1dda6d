//! The proxy-wasm header-map wire format, decoded and encoded without panicking.
//!
//! Layout: `u32 count`, then `count` pairs of `u32 name_len, u32 value_len`, then each name and
//! value followed by a NUL byte; all integers little-endian. The SDK's own decoder indexes and
//! unwraps, so a malformed map from the host would panic the VM; this one returns an error.

/// The host handed us a map that does not follow the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedMap;

/// A decoded header: name and raw value bytes (values may be any bytes, not only UTF-8),
/// borrowed from the map they were read from (a [`HeaderMap`], or a test's pairs).
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// A header that owns its bytes (the fake host's maps, tests).
pub type OwnedHeader = (Vec<u8>, Vec<u8>);

/// A header map as the host handed it over: the one buffer of the wire format, checked once.
/// Its pairs borrow from it, so reading a map of N headers allocates twice (the buffer and the
/// list of pairs), not 2N + 1 times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    bytes: Vec<u8>,
}

impl HeaderMap {
    /// Takes a serialized map once it decodes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, MalformedMap> {
        // Checked without building the list of pairs: `pairs` builds it where it is read.
        walk(&bytes, |_, _| ())?;
        Ok(Self { bytes })
    }

    /// A map of these pairs (tests and the fake host).
    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Self {
        Self {
            bytes: encode(pairs),
        }
    }

    /// The headers, in the order the host gave them.
    pub fn pairs(&self) -> Vec<Header<'_>> {
        // Checked when the map was made: an error cannot happen here.
        decode(&self.bytes).unwrap_or_default()
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    let arr: [u8; 4] = b.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(arr)).ok()
}

/// Decodes a serialized header map; the pairs borrow from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Vec<Header<'_>>, MalformedMap> {
    let mut out = Vec::with_capacity(pair_count(bytes)?);
    walk(bytes, |name, value| out.push((name, value)))?;
    Ok(out)
}

/// The number of pairs a serialized map declares, once the buffer can hold them.
fn pair_count(bytes: &[u8]) -> Result<usize, MalformedMap> {
    if bytes.is_empty() {
        return Ok(0);
    }
    let count = read_u32(bytes, 0).ok_or(MalformedMap)?;
    // Each pair needs at least 8 size bytes and 2 NULs: reject counts the buffer cannot hold
    // before allocating for them.
    if count.saturating_mul(10) > bytes.len() {
        return Err(MalformedMap);
    }
    Ok(count)
}

/// Reads a serialized header map pair by pair, handing each to `each`.
fn walk<'a>(bytes: &'a [u8], mut each: impl FnMut(&'a [u8], &'a [u8])) -> Result<(), MalformedMap> {
    let count = pair_count(bytes)?;
    let mut data = 4usize
        .checked_add(count.checked_mul(8).ok_or(MalformedMap)?)
        .ok_or(MalformedMap)?;
    for i in 0..count {
        let sizes = 4 + i * 8;
        let name_len = read_u32(bytes, sizes).ok_or(MalformedMap)?;
        let value_len = read_u32(bytes, sizes + 4).ok_or(MalformedMap)?;
        let name = take(bytes, &mut data, name_len)?;
        let value = take(bytes, &mut data, value_len)?;
        each(name, value);
    }
    Ok(())
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], MalformedMap> {
    let end = at.checked_add(len).ok_or(MalformedMap)?;
    let s = bytes.get(*at..end).ok_or(MalformedMap)?;
    if bytes.get(end) != Some(&0) {
        return Err(MalformedMap);
    }
    *at = end + 1;
    Ok(s)
}

/// Encodes header pairs into the wire format (for local replies and header replacement).
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
    let payload: usize = pairs
        .iter()
        .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + payload);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&len_u32(n.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&len_u32(v.as_ref().len()).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Headers Tollgate owns: clients may not set them.
pub const INTERNAL_PREFIX: &[u8] = b"x-tollgate-";

/// Credential headers removed from every forwarded request: the client's key travels in
/// `authorization`, and clients of other providers' SDKs send keys in the others (Anthropic's
/// `x-api-key`, Azure OpenAI's `api-key`). The provider gets only the key Tollgate injects.
pub const CREDENTIAL_HEADERS: &[&[u8]] = &[
    b"authorization",
    b"proxy-authorization",
    b"x-api-key",
    b"api-key",
];

/// True for a header name a client must not send upstream (ours, or a credential).
pub fn must_strip(name: &[u8]) -> bool {
    CREDENTIAL_HEADERS
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c))
        || (name.len() >= INTERNAL_PREFIX.len()
            && name
                .get(..INTERNAL_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(INTERNAL_PREFIX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The borrowed view of owned pairs.
    fn borrowed(pairs: &[OwnedHeader]) -> Vec<Header<'_>> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect()
    }

    #[test]
    fn round_trip() {
        let pairs = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b"x-bin".to_vec(), vec![0xff, 0x00, 0xfe]),
            (b"empty".to_vec(), Vec::new()),
        ];
        assert_eq!(decode(&encode(&pairs)).unwrap(), borrowed(&pairs));
        assert_eq!(decode(&[]).unwrap(), Vec::<Header>::new());
        assert_eq!(
            decode(&encode::<&[u8], &[u8]>(&[])).unwrap(),
            Vec::<Header>::new()
        );
    }

    #[test]
    fn malformed_maps_are_errors() {
        assert_eq!(decode(&[1, 0]), Err(MalformedMap));
        assert_eq!(decode(&[255, 255, 255, 255, 0, 0]), Err(MalformedMap));
        let mut good = encode(&[("a", "b")]);
        let last = good.len() - 1;
        good[last] = b'x'; // missing NUL terminator
        assert_eq!(decode(&good), Err(MalformedMap));
        let good = encode(&[("name", "value")]);
        assert_eq!(decode(&good[..good.len() - 3]), Err(MalformedMap));
    }

    #[test]
    fn a_map_is_checked_once_and_its_pairs_are_not_copies() {
        assert_eq!(HeaderMap::new(vec![1, 0]), Err(MalformedMap));
        let bytes = encode(&[(":path", "/v1/models"), ("authorization", "Bearer sk-a")]);
        let map = HeaderMap::new(bytes.clone()).unwrap();
        assert_eq!(map, HeaderMap::from_pairs(&decode(&bytes).unwrap()));
        let pairs = map.pairs();
        assert_eq!(
            pairs,
            [
                (&b":path"[..], &b"/v1/models"[..]),
                (b"authorization", b"Bearer sk-a")
            ]
        );
        // Every name and value points into the map's one buffer.
        let buffer = map.bytes.as_ptr_range();
        for (name, value) in &pairs {
            assert!(buffer.contains(&name.as_ptr()) && buffer.contains(&value.as_ptr()));
        }
    }

    #[test]
    fn strip_rules() {
        assert!(must_strip(b"authorization"));
        assert!(must_strip(b"Authorization"));
        assert!(must_strip(b"x-tollgate-client"));
        assert!(must_strip(b"X-Tollgate-Route"));
        assert!(must_strip(b"x-tollgate-"));
        assert!(must_strip(b"x-api-key"));
        assert!(must_strip(b"Api-Key"));
        assert!(must_strip(b"proxy-authorization"));
        assert!(!must_strip(b"x-tollgat"));
        assert!(!must_strip(b"content-type"));
        assert!(!must_strip(b"x-request-id"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn encode_decode_identity(pairs in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..20), proptest::collection::vec(any::<u8>(), 0..40)), 0..10)) {
            let bytes = encode(&pairs);
            prop_assert_eq!(decode(&bytes).unwrap(), borrowed(&pairs));
        }
    }
}

//! Base64 (RFC 4648): standard with padding for HTTP basic auth and the configuration's
//! `key_set`, base64url without padding for cache entries in Redis. Small enough not to need a
//! crate.

/// The standard base64 alphabet (RFC 4648 §4).
const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The base64url alphabet (RFC 4648 §5).
const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with padding (HTTP basic auth).
pub fn encode(input: &[u8]) -> String {
    encode64(input, STANDARD, true)
}

/// base64url without padding (RFC 4648 §5).
pub fn encode_url(input: &[u8]) -> String {
    encode64(input, URL, false)
}

fn encode64(input: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let sym = |i: u32| char::from(*alphabet.get((i & 63) as usize).unwrap_or(&b'A'));
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = b(0) << 16 | b(1) << 8 | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        for (present, shift) in [(chunk.len() > 1, 6), (chunk.len() > 2, 0)] {
            if present {
                out.push(sym(n >> shift));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes [`encode_url`]'s output; `None` for any other input (padding included).
pub fn decode_url(input: &str) -> Option<Vec<u8>> {
    let value = |c: u8| URL.iter().position(|&x| x == c).map(|v| v as u32);
    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let [_, a, b, c] = n.to_be_bytes();
        out.push(a);
        if chunk.len() > 2 {
            out.push(b);
        }
        if chunk.len() > 3 {
            out.push(c);
        }
    }
    Some(out)
}

/// Not a character of the standard alphabet, in [`STANDARD_VALUES`].
const NOT_BASE64: u8 = 0xff;

/// The value of each byte as a character of the standard alphabet ([`NOT_BASE64`] for the
/// others): one lookup per character.
// Evaluated at compile time: an index out of bounds fails the build, it cannot panic.
#[allow(clippy::indexing_slicing)]
const STANDARD_VALUES: [u8; 256] = {
    let mut table = [NOT_BASE64; 256];
    let mut i = 0;
    while i < 64 {
        table[STANDARD[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The value of a character of the standard alphabet.
fn standard_value(c: u8) -> Option<u32> {
    match STANDARD_VALUES.get(usize::from(c)) {
        Some(&v) if v != NOT_BASE64 => Some(u32::from(v)),
        _ => None,
    }
}

/// The 24 bits of a group of four characters of the standard alphabet (no padding), or the
/// index of the first character that is not one. Straight-line: a key set is megabytes of
/// these groups.
fn group_bits(group: [u8; 4]) -> Result<u32, usize> {
    let v = group.map(|c| {
        STANDARD_VALUES
            .get(usize::from(c))
            .copied()
            .unwrap_or(NOT_BASE64)
    });
    let [a, b, c, d] = v;
    if (a | b | c | d) & 0xc0 != 0 {
        // Some value is NOT_BASE64 (a character's value is below 64).
        return Err(v.iter().position(|&x| x == NOT_BASE64).unwrap_or(0));
    }
    Ok(u32::from(a) << 18 | u32::from(b) << 12 | u32::from(c) << 6 | u32::from(d))
}

/// Why standard base64 could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The length is not a multiple of 4 (standard base64 is padded with `=`).
    Length,
    /// A character outside the alphabet (or `=` before the end) at this offset.
    Character(usize),
    /// More bytes were read than the input holds.
    End,
}

/// Decodes standard base64 with padding ([`encode`]'s output) piece by piece, so that a large
/// input (the configuration's `key_set`) never needs a second, decoded copy in memory.
#[derive(Debug)]
pub struct Decoder<'a> {
    input: &'a [u8],
    /// Offset of the next group of four characters.
    at: usize,
    /// Bytes decoded from the last group and not read yet.
    pending: [u8; 3],
    pending_len: usize,
    /// Bytes not read yet, pending included.
    remaining: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder of `input`; only the length and the padding are checked here, each character
    /// as it is read.
    pub fn new(input: &'a str) -> Result<Self, DecodeError> {
        Self::from_bytes(input.as_bytes())
    }

    /// [`Decoder::new`] of bytes (a character outside the alphabet is an error when read, as
    /// in a string).
    pub fn from_bytes(input: &'a [u8]) -> Result<Self, DecodeError> {
        if input.len() % 4 != 0 {
            return Err(DecodeError::Length);
        }
        let pad = input
            .iter()
            .rev()
            .take(2)
            .take_while(|&&c| c == b'=')
            .count();
        Ok(Self {
            input,
            at: 0,
            pending: [0; 3],
            pending_len: 0,
            remaining: input.len() / 4 * 3 - pad,
        })
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Fills `out` with the next bytes.
    pub fn read(&mut self, out: &mut [u8]) -> Result<(), DecodeError> {
        if out.len() > self.remaining {
            return Err(DecodeError::End);
        }
        let mut out = out;
        // Whole groups straight into `out` while nothing is pending, all but the last group
        // (only the last may hold padding; it goes through `refill`, which checks it). The
        // same errors as `refill`: here `=` is a character like any other outside the alphabet.
        while self.pending_len == 0 && out.len() >= 3 && self.at + 4 < self.input.len() {
            let group = self
                .input
                .get(self.at..self.at + 4)
                .and_then(|g| <[u8; 4]>::try_from(g).ok())
                .ok_or(DecodeError::End)?;
            let n = group_bits(group).map_err(|i| DecodeError::Character(self.at + i))?;
            let [_, a, b, c] = n.to_be_bytes();
            let (head, rest) = std::mem::take(&mut out).split_at_mut(3);
            head.copy_from_slice(&[a, b, c]);
            out = rest;
            self.at += 4;
            self.remaining -= 3;
        }
        for slot in out.iter_mut() {
            if self.pending_len == 0 {
                self.refill()?;
            }
            let [a, b, c] = self.pending;
            *slot = a;
            self.pending = [b, c, 0];
            self.pending_len -= 1;
            self.remaining -= 1;
        }
        Ok(())
    }

    /// Decodes the next group of four characters into `pending`.
    fn refill(&mut self) -> Result<(), DecodeError> {
        let group = self
            .input
            .get(self.at..self.at + 4)
            .ok_or(DecodeError::End)?;
        let last = self.at + 4 == self.input.len();
        let mut n = 0u32;
        let mut len = 3;
        for (i, &c) in group.iter().enumerate() {
            let v = match standard_value(c) {
                Some(v) if len == 3 => v,
                // Padding: only in the last group, only its last one or two characters, and
                // only padding after it.
                _ if c == b'=' && last && i >= 2 => {
                    len = len.min(i - 1);
                    0
                }
                _ => return Err(DecodeError::Character(self.at + i)),
            };
            n |= v << (18 - 6 * i);
        }
        let [_, a, b, c] = n.to_be_bytes();
        self.pending = [a, b, c];
        self.pending_len = len;
        self.at += 4;
        Ok(())
    }
}

/// Decodes standard base64 with padding ([`encode`]'s output).
pub fn decode(input: &str) -> Result<Vec<u8>, DecodeError> {
    let mut d = Decoder::new(input)?;
    let mut out = vec![0; d.remaining()];
    d.read(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base64_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("tollgate:s3cret", "dG9sbGdhdGU6czNjcmV0"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
        for (bad, err) in [
            ("Zg=", DecodeError::Length),
            ("Z===", DecodeError::Character(1)),
            ("=Zg=", DecodeError::Character(0)),
            ("Zg=a", DecodeError::Character(3)),
            ("Zg==Zm9v", DecodeError::Character(2)),
            ("Zm-v", DecodeError::Character(2)),
            ("Zm9v\n", DecodeError::Length),
        ] {
            assert_eq!(decode(bad), Err(err), "{bad:?}");
        }
    }

    #[test]
    fn decoder_reads_in_pieces() {
        let mut d = Decoder::new("dG9sbGdhdGU6czNjcmV0").unwrap();
        assert_eq!(d.remaining(), 15);
        let mut a = [0u8; 4];
        d.read(&mut a).unwrap();
        assert_eq!(&a, b"toll");
        let mut b = [0u8; 11];
        d.read(&mut b).unwrap();
        assert_eq!(&b, b"gate:s3cret");
        assert_eq!(d.read(&mut [0u8; 1]), Err(DecodeError::End));
        d.read(&mut []).unwrap();
    }

    #[test]
    fn base64url_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("\u{fb}\u{ff}", "w7vDvw"),
        ] {
            assert_eq!(encode_url(plain.as_bytes()), enc);
            assert_eq!(decode_url(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(encode_url(&[0xfb, 0xff]), "-_8");
        for bad in ["A", "Zm9v=", "Zm+v", "Z m9"] {
            assert_eq!(decode_url(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn url_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(decode_url(&encode_url(&bytes)), Some(bytes));
        }

        #[test]
        fn standard_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(decode(&encode(&bytes)), Ok(bytes));
        }

        #[test]
        fn standard_decoder_never_panics(s in "[A-Za-z0-9+/=]{0,40}") {
            let _ = decode(&s);
        }

        /// A whole read (groups decoded straight into the output) and a read one byte at a time
        /// (every group through `refill`) give the same bytes and the same error.
        #[test]
        fn a_whole_read_and_a_bytewise_read_agree(s in "[A-Za-z0-9+/=.]{0,40}") {
            let bytewise = || -> Result<Vec<u8>, DecodeError> {
                let mut d = Decoder::new(&s)?;
                let mut out = Vec::new();
                while d.remaining() > 0 {
                    let mut byte = [0u8; 1];
                    d.read(&mut byte)?;
                    let [b] = byte;
                    out.push(b);
                }
                Ok(out)
            };
            prop_assert_eq!(decode(&s), bytewise());
        }
    }
}

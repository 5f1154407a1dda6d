//! Base64 (RFC 4648): standard with padding for HTTP basic auth, base64url without padding
//! for cache entries in Redis. Small enough not to need a crate.

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
        }
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
    }
}

//! Request headers as the host hands them over: `headers::decode` of the proxy-wasm header-map
//! wire format, `headers::encode`, `headers::must_strip`, and `keys::bearer_token` over the
//! `authorization` values, as `request::on_request_headers` reads them.
//!
//! Input: a serialized header map (seeds are real request headers); the same bytes are also
//! read as arbitrary header pairs for the encode/decode round trip, and as one raw
//! `authorization` value.
//!
//! Invariants:
//! - `decode` never panics; when it succeeds, `encode` of its result is exactly the bytes it
//!   read (a prefix of the input: the format has no end marker), and decodes to the same pairs;
//! - `decode(encode(pairs)) == pairs` for any pairs;
//! - `bearer_token` agrees with a reference parser of `Bearer <token>`: the token is a
//!   sub-slice of the value, 1..=MAX_KEY_LEN visible ASCII characters, and the scheme is
//!   `bearer` in any case; more than one `authorization` header is `Repeated`;
//! - `must_strip` is true exactly for credential headers and `x-tollgate-*`, in any case.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tollgate_core::headers::{self, Header};
use tollgate_core::keys::{bearer_token, KeyError, MAX_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = headers::decode(data) {
        let again = headers::encode(&pairs);
        if data.is_empty() {
            assert_eq!(again, [0, 0, 0, 0]);
        } else {
            assert!(
                data.starts_with(&again),
                "encode(decode(x)) is not a prefix of x"
            );
        }
        assert_eq!(headers::decode(&again).as_ref(), Ok(&pairs));
        check_request(&pairs);
    }

    let mut u = Unstructured::new(data);
    if let Ok(pairs) = Vec::<Header>::arbitrary(&mut u) {
        assert_eq!(
            headers::decode(&headers::encode(&pairs)).as_ref(),
            Ok(&pairs)
        );
        check_request(&pairs);
    }

    check_bearer(data);
});

/// What the request flow does with the headers: the `authorization` values to `bearer_token`,
/// every name to `must_strip`.
fn check_request(pairs: &[Header]) {
    let auth: Vec<&[u8]> = pairs
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"authorization"))
        .map(|(_, v)| *v)
        .collect();
    let got = bearer_token(auth.iter().copied());
    match auth.as_slice() {
        [] => assert_eq!(got, Err(KeyError::Missing)),
        [one] => assert_eq!(got, reference_bearer(one)),
        _ => assert_eq!(got, Err(KeyError::Repeated)),
    }
    for (name, value) in pairs {
        let lower = name.to_ascii_lowercase();
        let want = matches!(
            lower.as_slice(),
            b"authorization" | b"proxy-authorization" | b"x-api-key" | b"api-key"
        ) || lower.starts_with(b"x-tollgate-");
        assert_eq!(headers::must_strip(name), want, "{name:?}");
        check_bearer(value);
    }
}

fn check_bearer(value: &[u8]) {
    let got = bearer_token([value]);
    assert_eq!(got, reference_bearer(value), "{value:?}");
    if let Ok(token) = got {
        // A sub-slice of the value, never a copy.
        let range = value.as_ptr_range();
        assert!(range.contains(&token.as_ptr()));
    }
}

/// `Bearer <token>` per RFC 9110/6750 as Tollgate accepts it: optional spaces or tabs around
/// the value, the scheme in any case, one or more spaces, a token of visible ASCII.
fn reference_bearer(value: &[u8]) -> Result<&[u8], KeyError> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |e| e + 1);
    let value = &value[start..end];
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return Err(KeyError::Malformed);
    };
    if !value[..space].eq_ignore_ascii_case(b"bearer") {
        return Err(KeyError::Malformed);
    }
    let rest = &value[space..];
    let token_start = rest.iter().position(|b| !ows(b)).unwrap_or(rest.len());
    let token = &rest[token_start..];
    if token.is_empty() || token.len() > MAX_KEY_LEN || !token.iter().all(u8::is_ascii_graphic) {
        return Err(KeyError::Malformed);
    }
    Ok(token)
}

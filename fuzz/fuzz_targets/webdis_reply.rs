//! The Redis limiter's reply parser: `webdis::parse_reply(status, body)`.
//!
//! Input: `<status>\n<body>`, the callout's `:status` (anything that is not a number: no
//! headers, a failed callout) and the body Webdis or Envoy answered.
//!
//! Invariants:
//! - only a 200 with `{"EVAL":[0|1, count, ttl]}` is a count, and it is exactly that reply's
//!   numbers (serde_json's reading of the same bytes is the reference);
//! - no headers is `Unavailable`; a non-200 is never a count;
//! - a Redis error message is at most 200 characters;
//! - round trip: the reply Webdis would send for a count reads back as that count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_core::webdis::{parse_reply, Count, ReplyError};

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.iter().position(|&b| b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (&b""[..], data),
    };
    let status: Option<u16> = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse().ok());
    let result = parse_reply(status, body);

    match (status, &result) {
        (None, r) => assert_eq!(r, &Err(ReplyError::Unavailable)),
        (Some(200), _) => {}
        (Some(_), Ok(c)) => panic!("status {status:?} read as a count {c:?}"),
        (Some(_), Err(_)) => {}
    }
    if let Err(e) = &result {
        assert!(!e.reason().is_empty());
        assert!(ReplyError::REASONS.contains(&e.reason()));
        if let ReplyError::Redis(m) = e {
            assert!(m.chars().count() <= 200);
        }
    }

    // serde_json's reading of the same reply.
    if status == Some(200) {
        let eval = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("EVAL").cloned());
        let items = eval.as_ref().and_then(Value::as_array);
        match &result {
            Ok(c) => {
                let items = items.expect("a count from a reply without an EVAL array");
                assert_eq!(items.len(), 3);
                assert_eq!(items[0].as_i64().map(|a| a == 1), Some(c.admitted));
                assert!(matches!(items[0].as_i64(), Some(0 | 1)));
                assert_eq!(items[1].as_u64(), Some(c.count));
                let ttl = items[2].as_i64().expect("ttl not an integer");
                assert_eq!(c.key_ttl_ms, u64::try_from(ttl).ok());
            }
            Err(ReplyError::Redis(_)) => {
                let items = items.expect("a Redis error from a reply without an EVAL array");
                assert_eq!(items.len(), 2);
                assert_eq!(items[0], Value::Bool(false));
            }
            Err(ReplyError::Malformed) => {
                if let Some(items) = items {
                    let count_shaped = items.len() == 3
                        && matches!(items[0].as_i64(), Some(0 | 1))
                        && items[1].as_u64().is_some()
                        && items[2].as_i64().is_some();
                    assert!(!count_shaped, "a count reply read as malformed");
                }
            }
            Err(e) => panic!("status 200 read as {e:?}"),
        }
    }

    // Round trip: what Webdis sends for a count made of the input's first bytes.
    let mut word = [0u8; 17];
    for (w, b) in word.iter_mut().zip(data) {
        *w = *b;
    }
    let admitted = word[0] & 1 == 1;
    let count = u64::from_le_bytes(word[1..9].try_into().unwrap()) >> (word[0] >> 2);
    let ttl = i64::from_le_bytes(word[9..17].try_into().unwrap()) >> (word[0] >> 3);
    let reply = format!("{{\"EVAL\":[{},{count},{ttl}]}}", u8::from(admitted));
    assert_eq!(
        parse_reply(Some(200), reply.as_bytes()),
        Ok(Count {
            admitted,
            count,
            key_ttl_ms: u64::try_from(ttl).ok(),
        })
    );
});

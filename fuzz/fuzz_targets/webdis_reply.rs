//! The Redis limiter's reply parsers: `webdis::parse_reply(status, body)` (a check) and
//! `webdis::parse_settle_reply` (token settlements).
//!
//! Input: `<status>\n<body>`, the callout's `:status` (anything that is not a number: no
//! headers, a failed callout) and the body Webdis or Envoy answered.
//!
//! Invariants:
//! - only a 200 with `{"EVAL":[0|1, count, ttl]}` or `{"EVAL":[0|1|2, count, ttl, tokens]}` is
//!   a count, and it is exactly that reply's numbers (serde_json's reading of the same bytes is
//!   the reference); only a 200 with `{"EVAL":<u64>}` is a settlement's answer;
//! - no headers is `Unavailable`; a non-200 is never a count;
//! - a Redis error message is at most 200 characters;
//! - round trip: the reply Webdis would send for a count reads back as that count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_core::webdis::{parse_reply, parse_settle_reply, Checked, Count, ReplyError};

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.iter().position(|&b| b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (&b""[..], data),
    };
    let status: Option<u16> = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse().ok());
    let result = parse_reply(status, body);
    let settled = parse_settle_reply(status, body);
    if status != Some(200) {
        assert!(settled.is_err());
    }

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
                assert!(items.len() == 3 || items.len() == 4);
                let verdict = match c.checked {
                    Checked::Admitted => 1,
                    Checked::RequestsLimited => 0,
                    Checked::TokensLimited => 2,
                };
                assert_eq!(items[0].as_i64(), Some(verdict));
                assert_eq!(items[1].as_u64(), Some(c.count));
                let ttl = items[2].as_i64().expect("ttl not an integer");
                assert_eq!(c.key_ttl_ms, u64::try_from(ttl).ok());
                assert_eq!(c.tokens, items.get(3).map(|t| t.as_u64().expect("tokens")));
            }
            Err(ReplyError::Redis(_)) => {
                let items = items.expect("a Redis error from a reply without an EVAL array");
                assert_eq!(items.len(), 2);
                assert_eq!(items[0], Value::Bool(false));
            }
            Err(ReplyError::Malformed) => {
                if let Some(items) = items {
                    let count_shaped = (items.len() == 3
                        && matches!(items[0].as_i64(), Some(0 | 1))
                        || items.len() == 4
                            && matches!(items[0].as_i64(), Some(0..=2))
                            && items[3].as_u64().is_some())
                        && items[1].as_u64().is_some()
                        && items[2].as_i64().is_some();
                    assert!(!count_shaped, "a count reply read as malformed");
                }
            }
            Err(e) => panic!("status 200 read as {e:?}"),
        }
        match &settled {
            Ok(n) => assert_eq!(eval.as_ref().and_then(Value::as_u64), Some(*n)),
            Err(ReplyError::Malformed) => {
                assert!(eval.as_ref().and_then(Value::as_u64).is_none());
            }
            Err(_) => {}
        }
    }

    // Round trip: what Webdis sends for a count made of the input's first bytes.
    let mut word = [0u8; 17];
    for (w, b) in word.iter_mut().zip(data) {
        *w = *b;
    }
    let admitted = word[0] & 1 == 1;
    let checked = if admitted {
        Checked::Admitted
    } else {
        Checked::RequestsLimited
    };
    let count = u64::from_le_bytes(word[1..9].try_into().unwrap()) >> (word[0] >> 2);
    let ttl = i64::from_le_bytes(word[9..17].try_into().unwrap()) >> (word[0] >> 3);
    let reply = format!("{{\"EVAL\":[{},{count},{ttl}]}}", u8::from(admitted));
    assert_eq!(
        parse_reply(Some(200), reply.as_bytes()),
        Ok(Count {
            checked,
            count,
            key_ttl_ms: u64::try_from(ttl).ok(),
            tokens: None,
        })
    );
    // ... and with a token key.
    let tokens = count.rotate_left(7);
    let reply = format!(
        "{{\"EVAL\":[{},{count},{ttl},{tokens}]}}",
        u8::from(admitted)
    );
    assert_eq!(
        parse_reply(Some(200), reply.as_bytes()),
        Ok(Count {
            checked,
            count,
            key_ttl_ms: u64::try_from(ttl).ok(),
            tokens: Some(tokens),
        })
    );
});

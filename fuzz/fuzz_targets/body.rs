//! The request body: `body::parse`, `body::replace_model` and `body::with_stream_usage`.
//!
//! Input: the raw body a client sends. Invariants, checked against serde_json's own reading of
//! the same bytes:
//! - `parse` accepts only a JSON object, and what it extracts is what that object holds
//!   (`model`, `stream`, the `max_*tokens` precedence);
//! - for every body `parse` accepts, `replace_model` succeeds and its output is valid JSON equal
//!   to the input with only `model` changed, byte for byte outside that value;
//! - `with_stream_usage` changes exactly the streams that did not ask for usage, and its output
//!   is the same object with `stream_options.include_usage: true`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tollgate_core::body::{self, BodyError, MAX_MODEL_LEN};

/// Names an alias rename may produce: plain, and one that needs escaping.
const NEW_MODELS: [&str; 2] = ["deepseek-chat", "q\"u\\o/t\u{e9}\u{1F600}\u{7f}"];

fuzz_target!(|data: &[u8]| {
    let parsed = body::parse(data);
    // Whatever the outcome, neither rewrite may panic on arbitrary bytes.
    for new in NEW_MODELS {
        let _ = body::replace_model(data, new);
    }
    let rewritten = body::with_stream_usage(data);

    let value: Option<Value> = match serde_json::from_slice(data) {
        Ok(v) => Some(v),
        // JSON's grammar allows an unpaired surrogate escape (`"\ud83d"`) and numbers beyond
        // f64 (`1e400`); serde_json's reading of the skipped parts of a body allows them too,
        // but a `Value` cannot hold them. No reference then.
        Err(e)
            if ["surrogate", "hex escape", "number out of range"]
                .iter()
                .any(|m| e.to_string().contains(m)) =>
        {
            return
        }
        Err(_) => None,
    };
    let request = match parsed {
        Ok(r) => r,
        Err(BodyError::NoModel) => {
            let object = value
                .as_ref()
                .and_then(Value::as_object)
                .expect("NoModel for a body that is not a JSON object");
            if let Some(Value::String(m)) = object.get("model") {
                assert!(
                    m.is_empty() || m.len() > MAX_MODEL_LEN || m.chars().any(char::is_control),
                    "NoModel for the valid model {m:?}"
                );
            }
            return;
        }
        Err(BodyError::Malformed(why)) => {
            assert!(!why.is_empty());
            return;
        }
    };

    let value = value.expect("parse accepted a body serde_json rejects");
    let object = value
        .as_object()
        .expect("parse accepted a body that is not a JSON object");
    assert_eq!(
        object.get("model").and_then(Value::as_str),
        Some(request.model.as_str())
    );
    assert!(!request.model.is_empty() && request.model.len() <= MAX_MODEL_LEN);
    assert!(!request.model.chars().any(char::is_control));
    assert_eq!(
        request.stream,
        object.get("stream") == Some(&Value::Bool(true))
    );
    let tokens = |k: &str| object.get(k).and_then(Value::as_u64);
    assert_eq!(
        request.max_tokens,
        tokens("max_completion_tokens")
            .or(tokens("max_tokens"))
            .or(tokens("max_output_tokens"))
    );

    for new in NEW_MODELS {
        let out = body::replace_model(data, new).expect("no rename for a body parse accepted");
        let mut want = object.clone();
        want.insert("model".into(), Value::String(new.into()));
        assert_eq!(json_object(&out, "replace_model"), want);
        // Only the value's bytes changed: the same prefix and suffix around it.
        let enc = serde_json::to_string(new).unwrap();
        assert!(
            prefix_len(data, &out) + suffix_len(data, &out) + enc.len() >= out.len(),
            "replace_model changed more than the model value"
        );
    }

    let options = object.get("stream_options");
    let asked = matches!(options, Some(Value::Object(o)) if o.get("include_usage") == Some(&Value::Bool(true)));
    match rewritten {
        None => assert!(
            !request.stream || asked,
            "a stream without include_usage was not given it"
        ),
        Some(out) => {
            assert!(
                request.stream && !asked,
                "with_stream_usage changed a body it must not"
            );
            let mut options = match options {
                Some(Value::Object(o)) => o.clone(),
                _ => Map::new(),
            };
            options.insert("include_usage".into(), Value::Bool(true));
            let mut want = object.clone();
            want.insert("stream_options".into(), Value::Object(options));
            assert_eq!(json_object(&out, "with_stream_usage"), want);
            // The result is still a body the gateway accepts, with the same request in it.
            assert_eq!(body::parse(&out).as_ref(), Ok(&request));
        }
    }
});

fn json_object(bytes: &[u8], what: &str) -> Map<String, Value> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(o)) => o,
        other => panic!(
            "{what} produced {other:?}: {:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

fn prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn suffix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

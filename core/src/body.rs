//! Reading and rewriting the JSON body of a model request without re-serialising it.
//!
//! The body is validated by serde_json (so malformed JSON is refused), but only `model` and
//! `stream` are extracted; other fields are skipped without being built. A rename (an alias)
//! replaces the bytes of the top-level `model` value and nothing else, so the provider receives
//! the client's body byte for byte apart from that value.

use std::borrow::Cow;

use serde::Deserialize;

/// Longest accepted model name.
pub const MAX_MODEL_LEN: usize = 256;

/// Deepest accepted nesting of arrays and objects: serde_json's own limit when it builds a value
/// (and so what most providers built on it accept). serde_json skips unknown members without
/// any depth limit, so the gateway checks it itself rather than forward a body that only the
/// provider would refuse.
pub const MAX_DEPTH: usize = 128;

/// What routing needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRequest {
    /// The requested model.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens` (else `max_output_tokens`, Responses API).
    pub max_tokens: Option<u64>,
}

/// Why a body cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, or not a JSON object.
    Malformed(String),
    /// No `model`, or not a non-empty string of printable characters.
    NoModel,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    /// Read only so that a repeated `stream_options` or `include_usage` is refused: the gateway
    /// and the provider could read different ones, and the stream's usage go uncounted.
    #[serde(default, rename = "stream_options")]
    _stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default, rename = "include_usage")]
    _include_usage: Option<serde::de::IgnoredAny>,
}

/// Parses the body of a model request.
pub fn parse(body: &[u8]) -> Result<ModelRequest, BodyError> {
    // serde reads a struct from a JSON array too (`["gpt-4.1",true]`, fields in order); other
    // non-objects are data errors below.
    if body.get(skip_ws(body, 0)) == Some(&b'[') {
        return Err(BodyError::Malformed(
            "the request body must be a JSON object".to_string(),
        ));
    }
    // serde_json skips the members it does not extract without checking their strings' UTF-8
    // or their depth: check both here, so a body Tollgate forwards is JSON all through.
    let text = std::str::from_utf8(body)
        .map_err(|_| BodyError::Malformed("the request body is not valid UTF-8".to_string()))?;
    if nesting_exceeds(body, MAX_DEPTH) {
        return Err(BodyError::Malformed(format!(
            "the request body nests arrays and objects deeper than {MAX_DEPTH} levels"
        )));
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| {
        BodyError::Malformed(if e.is_data() {
            "the request body must be a JSON object".to_string()
        } else {
            e.to_string()
        })
    })?;
    let model = fields.model.ok_or(BodyError::NoModel)?;
    if model.is_empty() || model.len() > MAX_MODEL_LEN || model.chars().any(|c| c.is_control()) {
        return Err(BodyError::NoModel);
    }
    Ok(ModelRequest {
        model: model.into_owned(),
        stream: fields.stream.unwrap_or(false),
        max_tokens: fields
            .max_completion_tokens
            .or(fields.max_tokens)
            .or(fields.max_output_tokens),
    })
}

/// True when arrays and objects nest deeper than `max` anywhere in `body` (brackets inside
/// strings do not count). One pass, no allocation.
fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Replaces the value of the top-level `model` member with `new_model`; `None` if the body has
/// no such member (callers parse first, so that does not happen for routed requests).
pub fn replace_model(body: &[u8], new_model: &str) -> Option<Vec<u8>> {
    let (start, end) = top_level_value_span(body, b"model")?;
    let encoded = serde_json::to_string(new_model).ok()?;
    let mut out = Vec::with_capacity(body.len() + encoded.len());
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(body.get(end..)?);
    Some(out)
}

/// For a streaming request whose client did not ask for usage, the body with
/// `stream_options.include_usage: true` (so the stream reports its tokens); `None` when nothing
/// needs to change (not streaming, or usage already asked for). The body must be one [`parse`]
/// accepted (no repeated members that matter here).
pub fn with_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: Option<bool>,
        #[serde(default)]
        stream_options: Option<serde_json::Value>,
    }
    let s: Stream = serde_json::from_slice(body).ok()?;
    if s.stream != Some(true) {
        return None;
    }
    match s.stream_options {
        Some(serde_json::Value::Object(options)) => {
            if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
                return None;
            }
            // Edit the client's bytes rather than re-encode the object: serde_json does not
            // round-trip every number (`1e400`-like integers, long fractions).
            let (start, end) = top_level_value_span(body, b"stream_options")?;
            let object = body.get(start..end)?;
            let mut out = Vec::with_capacity(body.len() + 24);
            out.extend_from_slice(body.get(..start)?);
            match top_level_value_span(object, b"include_usage") {
                Some((s, e)) => {
                    out.extend_from_slice(object.get(..s)?);
                    out.extend_from_slice(b"true");
                    out.extend_from_slice(object.get(e..)?);
                }
                None => {
                    out.push(b'{');
                    out.extend_from_slice(br#""include_usage":true"#);
                    if !options.is_empty() {
                        out.push(b',');
                    }
                    out.extend_from_slice(object.get(1..)?);
                }
            }
            out.extend_from_slice(body.get(end..)?);
            Some(out)
        }
        // null or absent: add the member right after the opening brace.
        _ => {
            let open = body.iter().position(|&b| b == b'{')?;
            let (start, end) = match top_level_value_span(body, b"stream_options") {
                Some(span) => span,
                None => {
                    let mut out = Vec::with_capacity(body.len() + 40);
                    out.extend_from_slice(body.get(..=open)?);
                    out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
                    out.extend_from_slice(body.get(open + 1..)?);
                    return Some(out);
                }
            };
            let mut out = Vec::with_capacity(body.len() + 24);
            out.extend_from_slice(body.get(..start)?);
            out.extend_from_slice(br#"{"include_usage":true}"#);
            out.extend_from_slice(body.get(end..)?);
            Some(out)
        }
    }
}

/// Byte span of the value of the top-level member whose key is `key`.
/// The body must be valid JSON (checked by [`parse`] first); on anything unexpected, `None`.
fn top_level_value_span(body: &[u8], key: &[u8]) -> Option<(usize, usize)> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        match body.get(i) {
            Some(b'"') => {}
            _ => return None,
        }
        let key_end = string_end(body, i)?;
        let this_key = body.get(i..key_end)?;
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(body, i + 1);
        let value_end = value_end(body, value_start)?;
        if key_is(this_key, key) {
            return Some((value_start, value_end));
        }
        i = skip_ws(body, value_end);
        match body.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// Whether the JSON string `quoted` (quotes included) is `key` once its escapes are decoded:
/// serde reads `"mod\u0065l"` as `model`, so the rewrite must find it too.
fn key_is(quoted: &[u8], key: &[u8]) -> bool {
    match quoted.get(1..quoted.len().saturating_sub(1)) {
        Some(raw) if !raw.contains(&b'\\') => raw == key,
        _ => serde_json::from_slice::<String>(quoted).is_ok_and(|k| k.as_bytes() == key),
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index just past the closing quote of the string starting at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// Index just past the JSON value starting at `i` (strings, numbers, literals, nesting).
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extracts_model_and_stream() {
        let r = parse(
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4.1","stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ModelRequest {
                model: "gpt-4.1".into(),
                stream: true,
                max_tokens: None
            }
        );
        let r = parse(br#"{"model":"m","max_tokens":7,"max_completion_tokens":9}"#).unwrap();
        assert_eq!(r.max_tokens, Some(9));
        let r = parse(br#"{"model":"a\u00e9"}"#).unwrap();
        assert_eq!(r.model, "a\u{e9}");
        assert!(!r.stream);
    }

    #[test]
    fn refuses_bad_bodies() {
        assert!(matches!(parse(b"{"), Err(BodyError::Malformed(_))));
        assert!(matches!(parse(b""), Err(BodyError::Malformed(_))));
        assert!(matches!(parse(b"[1,2]"), Err(BodyError::Malformed(_))));
        // Fuzz target body, seed gen-array.json: serde reads a struct from an array.
        assert!(matches!(
            parse(br#" ["gpt-4.1",true,100]"#),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"a"} x"#),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(parse(b"{}"), Err(BodyError::NoModel));
        assert_eq!(parse(br#"{"model":""}"#), Err(BodyError::NoModel));
        assert_eq!(parse(br#"{"model":"a\nb"}"#), Err(BodyError::NoModel));
        assert!(matches!(
            parse(br#"{"model":5}"#),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            parse(br#"{"model":"a","stream":"yes"}"#),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_what_serde_json_skips_unchecked() {
        // Invalid UTF-8 inside a member that is not extracted.
        let bad_utf8 = b"{\"model\":\"m\",\"messages\":\"\xff\xfe\"}";
        assert!(matches!(parse(bad_utf8), Err(BodyError::Malformed(_))));
        // Nesting: 128 levels pass, 129 do not, in arrays or objects, and brackets in strings
        // (escaped quotes included) do not count.
        let nested = |open: &str, close: &str, n: usize| {
            format!(
                r#"{{"model":"m","x":{}1{}}}"#,
                open.repeat(n),
                close.repeat(n)
            )
            .into_bytes()
        };
        assert!(parse(&nested("[", "]", MAX_DEPTH - 1)).is_ok());
        assert!(matches!(
            parse(&nested("[", "]", MAX_DEPTH)),
            Err(BodyError::Malformed(_))
        ));
        assert!(parse(&nested(r#"{"a":"#, "}", MAX_DEPTH - 1)).is_ok());
        assert!(matches!(
            parse(&nested(r#"{"a":"#, "}", 20_000)),
            Err(BodyError::Malformed(_))
        ));
        let in_string = format!(r#"{{"model":"m","x":"\"{}"}}"#, "[".repeat(1000));
        assert!(parse(in_string.as_bytes()).is_ok());
    }

    #[test]
    fn replaces_only_the_top_level_model() {
        let body = br#"{ "messages": [{"model": "inner", "x": {"model": "deep"}}], "model" : "fast", "n": 1 }"#;
        let out = replace_model(body, "deepseek-chat").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{ "messages": [{"model": "inner", "x": {"model": "deep"}}], "model" : "deepseek-chat", "n": 1 }"#
        );
        let out = replace_model(br#"{"a":"}\"{","model":"m"}"#, "x\"y").unwrap();
        assert_eq!(out, br#"{"a":"}\"{","model":"x\"y"}"#);
        assert_eq!(replace_model(br#"{"other":1}"#, "x"), None);
    }

    /// Fuzz target body, seed gen-escaped-key.json: serde decodes escapes in keys,
    /// so `"mod\u0065l"` is the model, and `"stream_opti\u006fns"` the stream options a client
    /// could otherwise use to keep its stream's usage (and tokens) from being counted.
    #[test]
    fn escaped_keys_are_the_same_members() {
        let body =
            br#"{"mod\u0065l":"fast","stream":true,"stream_opti\u006fns":{"include_usage":false}}"#;
        assert_eq!(parse(body).unwrap().model, "fast");
        let out = replace_model(body, "deepseek-chat").unwrap();
        assert_eq!(
            out,
            br#"{"mod\u0065l":"deepseek-chat","stream":true,"stream_opti\u006fns":{"include_usage":false}}"#
        );
        let v: serde_json::Value =
            serde_json::from_slice(&with_stream_usage(body).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // `null` options: replaced, not a second `stream_options` member.
        let out = with_stream_usage(br#"{"stream":true,"stream_opti\u006fns":null}"#).unwrap();
        assert_eq!(
            out,
            br#"{"stream":true,"stream_opti\u006fns":{"include_usage":true}}"#
        );
    }

    /// Fuzz finding (fuzz/seeds/body/stream-options-big-number.json): re-encoding the
    /// options changed a number serde_json does not round-trip.
    #[test]
    fn stream_options_keep_the_clients_bytes() {
        let body = br#"{"stream":true,"stream_options":{ "n": 555555555500000000000000000000000000000000000001809112183, "include_usage" : false }}"#;
        assert_eq!(
            with_stream_usage(body).unwrap(),
            br#"{"stream":true,"stream_options":{ "n": 555555555500000000000000000000000000000000000001809112183, "include_usage" : true }}"#
        );
        assert_eq!(
            with_stream_usage(br#"{"stream":true,"stream_options":{"x":1.10}}"#).unwrap(),
            br#"{"stream":true,"stream_options":{"include_usage":true,"x":1.10}}"#
        );
        assert_eq!(
            with_stream_usage(br#"{"stream":true,"stream_options":{ }}"#).unwrap(),
            br#"{"stream":true,"stream_options":{"include_usage":true }}"#
        );
    }

    /// A repeated `stream_options` or `include_usage` is refused: the gateway would read one and
    /// the provider (last one wins) the other, and the stream's tokens would go uncounted.
    #[test]
    fn repeated_stream_options_are_malformed() {
        for body in [
            &br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}}"#[..],
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
        ] {
            assert!(matches!(parse(body), Err(BodyError::Malformed(_))));
        }
        assert!(parse(br#"{"model":"m","stream_options":null}"#).is_ok());
        assert!(matches!(
            parse(br#"{"model":"m","stream_options":"x"}"#),
            Err(BodyError::Malformed(_))
        ));
    }

    /// Fuzz finding (fuzz/seeds/body/invalid-utf8-ignored-field.json): serde_json does not
    /// check the UTF-8 of strings it skips.
    #[test]
    fn invalid_utf8_anywhere_is_malformed() {
        assert!(matches!(
            parse(b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xff\"}]}"),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"{\"model\":\"m\",\"x\xc3\":1}"),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn streams_get_usage_asked_for() {
        let v = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).unwrap() };
        let out = with_stream_usage(br#"{"model":"m","stream":true}"#).unwrap();
        assert_eq!(v(&out)["stream_options"]["include_usage"], true);
        assert_eq!(v(&out)["model"], "m");
        let out =
            with_stream_usage(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#).unwrap();
        assert_eq!(
            v(&out)["stream_options"],
            serde_json::json!({"x":1,"include_usage":true})
        );
        let out =
            with_stream_usage(br#"{"stream":true,"stream_options":null,"model":"m"}"#).unwrap();
        assert_eq!(v(&out)["stream_options"]["include_usage"], true);
        let out = with_stream_usage(br#"{"stream":true,"stream_options":{"include_usage":false}}"#)
            .unwrap();
        assert_eq!(v(&out)["stream_options"]["include_usage"], true);
        assert_eq!(
            with_stream_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(with_stream_usage(br#"{"model":"m"}"#), None);
        assert_eq!(with_stream_usage(br#"{"model":"m","stream":false}"#), None);
        assert_eq!(with_stream_usage(b"{"), None);
    }

    proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&body);
            let _ = replace_model(&body, "m");
            let _ = with_stream_usage(&body);
        }

        #[test]
        fn rename_round_trips(model in "\\PC{1,30}", other in "\\PC{0,30}", new in "\\PC{1,30}") {
            let v = serde_json::json!({"messages": [{"content": other, "model": "x"}], "model": model, "temperature": 0.5});
            let body = serde_json::to_vec(&v).unwrap();
            let out = replace_model(&body, &new).unwrap();
            let mut want = v.clone();
            want["model"] = serde_json::Value::String(new.clone());
            prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), want);
        }
    }
}

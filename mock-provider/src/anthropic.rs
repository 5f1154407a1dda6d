//! Anthropic's Messages API, as the mock speaks it: `POST /v1/messages` (a message, or its
//! event stream `message_start`, `content_block_start`, `ping`, `content_block_delta`...,
//! `content_block_stop`, `message_delta`, `message_stop`), `POST /v1/messages/count_tokens`,
//! and Anthropic's error shape `{"type":"error","error":{"type","message"},"request_id"}`.
//!
//! Token counts follow the OpenAI side's rules (4 + chars/4 per message, one token per reply
//! word). Blocks marked with `cache_control` go through a prompt cache kept per mock process:
//! the first time a block's text is seen its tokens are reported as
//! `cache_creation_input_tokens`, every later time as `cache_read_input_tokens`, and
//! `input_tokens` holds the rest, as Anthropic reports them.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use crate::openai::{
    echo_words, field, invalid_type, item_tokens, missing, parse_object, required_string, to_json,
    Reply,
};

/// An error in Anthropic's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl Error {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Error {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(400, "invalid_request_error", message)
    }

    pub fn body(&self, request_id: &str) -> Vec<u8> {
        to_json(&json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        }))
    }

    /// What Anthropic answers a missing or wrong `x-api-key` with.
    pub fn invalid_api_key(present: bool) -> Self {
        Error::new(
            401,
            "authentication_error",
            if present {
                "invalid x-api-key"
            } else {
                "x-api-key header is required"
            },
        )
    }

    pub fn not_found(method: &str, path: &str) -> Self {
        Error::new(
            404,
            "not_found_error",
            format!("Not found: {method} {path}"),
        )
    }

    /// The body Anthropic would send with `status`, for error injection.
    pub fn injected(status: u16) -> Self {
        let (kind, message) = match status {
            400 => ("invalid_request_error", "Invalid request (error injected by the mock provider)."),
            401 => ("authentication_error", "invalid x-api-key (error injected by the mock provider)"),
            403 => ("permission_error", "Your API key does not have permission to use the specified resource."),
            404 => ("not_found_error", "The requested resource could not be found."),
            413 => ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
            429 => ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit (error injected by the mock provider)."),
            529 => ("overloaded_error", "Overloaded"),
            500..=599 => ("api_error", "Internal server error (error injected by the mock provider)."),
            _ => ("invalid_request_error", "Error injected by the mock provider."),
        };
        Error::new(status, kind, message)
    }
}

/// The response headers Anthropic sends with a status (besides `content-type`): its request
/// id, the account's organisation and the account's rate-limit budget, which a gateway is
/// expected to remove or replace.
pub fn headers(status: u16, request_id: &str) -> Vec<(String, String)> {
    let mut h = vec![
        ("request-id".to_string(), request_id.to_string()),
        (
            "anthropic-organization-id".to_string(),
            "org-mock-anthropic".to_string(),
        ),
    ];
    if status == 200 || status == 429 {
        let remaining = if status == 429 { "0" } else { "3999" };
        for (name, value) in [
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", remaining),
            ("anthropic-ratelimit-requests-reset", "2030-01-01T00:00:00Z"),
            ("anthropic-ratelimit-tokens-limit", "400000"),
            ("anthropic-ratelimit-tokens-remaining", "399000"),
            ("anthropic-ratelimit-tokens-reset", "2030-01-01T00:00:00Z"),
            ("anthropic-ratelimit-input-tokens-limit", "200000"),
            ("anthropic-ratelimit-input-tokens-remaining", "199000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2030-01-01T00:00:00Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "200000"),
            ("anthropic-ratelimit-output-tokens-remaining", "200000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2030-01-01T00:00:00Z",
            ),
        ] {
            h.push((name.to_string(), value.to_string()));
        }
    }
    if status == 429 {
        h.push(("retry-after".to_string(), "1".to_string()));
    }
    h
}

/// The prompt cache of one mock process: hashes of the cached blocks' texts.
#[derive(Default)]
pub struct PromptCache(Mutex<HashSet<u64>>);

impl PromptCache {
    /// Whether `text` was cached before (and it is now).
    fn seen(&self, text: &str) -> bool {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let key = h.finish();
        match self.0.lock() {
            Ok(mut set) => !set.insert(key),
            Err(_) => false,
        }
    }
}

/// The tokens of a request, as Anthropic reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
    pub output: u64,
}

impl Usage {
    fn json(&self) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": self.output,
        })
    }
}

/// What the mock needs from a Messages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub model: String,
    pub max_tokens: u64,
    pub stream: bool,
    pub usage: Usage,
    /// Words of the last user message.
    pub echo: Vec<String>,
}

/// The blocks of a `content` or `system`: a string is one block without `cache_control`.
fn blocks(value: &Value, param: &str) -> Result<Vec<(String, bool)>, crate::openai::ApiError> {
    match value {
        Value::String(s) => Ok(vec![(s.clone(), false)]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let Some(obj) = p.as_object() else {
                    return Err(invalid_type(&format!("{param}.{i}"), "an object", p));
                };
                let text = obj.get("text").and_then(Value::as_str).unwrap_or_default();
                Ok((
                    text.to_string(),
                    obj.get("cache_control").is_some_and(|c| !c.is_null()),
                ))
            })
            .collect(),
        other => Err(invalid_type(param, "a string or an array", other)),
    }
}

/// Parses a Messages request (or a token count: `count_only`, no `max_tokens` needed) and
/// counts its prompt tokens through the prompt cache.
pub fn parse(body: &[u8], count_only: bool, cache: &PromptCache) -> Result<Request, Error> {
    let to_error = |e: crate::openai::ApiError| Error::invalid(e.message);
    let obj = parse_object(body).map_err(to_error)?;
    let model = required_string(&obj, "model").map_err(to_error)?;
    let max_tokens = match field(&obj, "max_tokens") {
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(Error::invalid(
                    "max_tokens: must be an integer of at least 1",
                ))
            }
        },
        None if count_only => 0,
        None => return Err(to_error(missing("max_tokens"))),
    };
    let messages = match field(&obj, "messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(Error::invalid("messages: at least one message is required"))
        }
        None => return Err(to_error(missing("messages"))),
        Some(other) => return Err(to_error(invalid_type("messages", "an array", other))),
    };
    let stream = match field(&obj, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(to_error(invalid_type("stream", "a boolean", other))),
    };
    let mut all: Vec<(String, bool)> = Vec::new();
    if let Some(system) = field(&obj, "system") {
        all.extend(blocks(system, "system").map_err(to_error)?);
    }
    let mut echo_source: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(to_error(invalid_type(
                &format!("messages.{i}"),
                "an object",
                m,
            )));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            _ => {
                return Err(Error::invalid(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )))
            }
        };
        let Some(content) = m.get("content") else {
            return Err(to_error(missing(&format!("messages.{i}.content"))));
        };
        let parts = blocks(content, &format!("messages.{i}.content")).map_err(to_error)?;
        if role == "user" {
            echo_source = parts.iter().map(|(t, _)| t.clone()).collect();
        }
        all.extend(parts);
    }
    let mut usage = Usage::default();
    for (text, cached) in &all {
        let tokens = item_tokens(text.chars().count());
        match (cached, *cached && cache.seen(text)) {
            (false, _) => usage.input += tokens,
            (true, true) => usage.cache_read += tokens,
            (true, false) => usage.cache_creation += tokens,
        }
    }
    Ok(Request {
        model,
        max_tokens,
        stream,
        usage,
        echo: echo_words(echo_source.iter().map(String::as_str)),
    })
}

fn stop_reason(reply: &Reply) -> &'static str {
    if reply.finish_reason == "length" {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// A message.
pub fn message(id: &str, req: &Request, reply: &Reply) -> Vec<u8> {
    let usage = Usage {
        output: reply.completion_tokens(),
        ..req.usage
    };
    to_json(&json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": reply.content()}],
        "stop_reason": stop_reason(reply),
        "stop_sequence": null,
        "usage": usage.json(),
    }))
}

/// `{"input_tokens": N}`: every prompt token, cached or not.
pub fn count(req: &Request) -> Vec<u8> {
    let u = req.usage;
    to_json(&json!({"input_tokens": u.input + u.cache_creation + u.cache_read}))
}

fn event(name: &str, data: &Value) -> Vec<u8> {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    out.extend(to_json(data));
    out.extend_from_slice(b"\n\n");
    out
}

/// The event stream of a message, each event one chunk.
pub fn stream(id: &str, req: &Request, reply: &Reply) -> Vec<Vec<u8>> {
    let start_usage = Usage {
        output: 1,
        ..req.usage
    };
    let mut events = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": req.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": start_usage.json(),
            }}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    for token in &reply.tokens {
        events.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": token}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta_usage = Map::new();
    delta_usage.insert("output_tokens".into(), json!(reply.completion_tokens()));
    events.push(event(
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(reply), "stop_sequence": null},
                "usage": Value::Object(delta_usage)}),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"model":"claude-sonnet-4","max_tokens":64,
        "system":[{"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}],
        "messages":[{"role":"user","content":"hello there"}]}"#;

    #[test]
    fn a_request_is_counted_through_the_prompt_cache() {
        let cache = PromptCache::default();
        let first = parse(BODY.as_bytes(), false, &cache).unwrap();
        // "You are terse." is 14 chars: 4 + 4; "hello there" 11 chars: 4 + 3.
        assert_eq!(
            first.usage,
            Usage {
                input: 7,
                cache_creation: 8,
                cache_read: 0,
                output: 0
            }
        );
        let again = parse(BODY.as_bytes(), false, &cache).unwrap();
        assert_eq!((again.usage.cache_creation, again.usage.cache_read), (0, 8));
        assert_eq!(first.echo, vec!["hello", "there"]);
        let n: Value = serde_json::from_slice(&count(&again)).unwrap();
        assert_eq!(n["input_tokens"], 15);
    }

    #[test]
    fn bad_requests_are_refused_in_anthropics_shape() {
        let cache = PromptCache::default();
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[]}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
            r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
            "not json",
        ] {
            let e = parse(body.as_bytes(), false, &cache).unwrap_err();
            assert_eq!((e.status, e.kind), (400, "invalid_request_error"), "{body}");
        }
        // A token count needs no max_tokens.
        let ok = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        assert!(parse(ok.as_bytes(), true, &cache).is_ok());
        let v: Value = serde_json::from_slice(&Error::injected(429).body("req_1")).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["request_id"], "req_1");
    }

    #[test]
    fn the_stream_has_anthropics_event_sequence() {
        let req = parse(BODY.as_bytes(), false, &PromptCache::default()).unwrap();
        let reply = Reply::new("mock", &req.echo, Some(req.max_tokens));
        let events = stream("msg_1", &req, &reply);
        let names: Vec<String> = events
            .iter()
            .map(|e| {
                let s = String::from_utf8(e.clone()).unwrap();
                s.lines()
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_string()
            })
            .collect();
        let deltas = reply.tokens.len();
        let mut want = vec!["message_start", "content_block_start", "ping"];
        want.extend(std::iter::repeat_n("content_block_delta", deltas));
        want.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, want);
        let last_delta = String::from_utf8(events[events.len() - 2].clone()).unwrap();
        assert!(last_delta.contains(&format!("\"output_tokens\":{}", reply.completion_tokens())));
        let m: Value = serde_json::from_slice(&message("msg_1", &req, &reply)).unwrap();
        assert_eq!(m["content"][0]["text"], reply.content());
        assert_eq!(m["usage"]["cache_creation_input_tokens"], 8);
        assert_eq!(m["stop_reason"], "end_turn");
    }
}

//! Anthropic's Messages API at the gate: the client key from `x-api-key` (or a bearer token),
//! Tollgate's own errors in Anthropic's shape with the statuses its SDKs map to their exception
//! classes, the client's budget as `anthropic-ratelimit-*` headers, and usage from a message
//! (JSON) or its event stream (`message_start`, `message_delta`).
//!
//! Tollgate decides the same way for every API and builds its answers in OpenAI's shape
//! ([`crate::openai`]); [`error_reply`] re-shapes one for a client of Anthropic's API, so the
//! decisions and their messages have one home.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::headers::Header;
use crate::keys::{bearer_token, KeyError, MAX_KEY_LEN};
use crate::openai::LocalReply;

/// The client key of a request to Anthropic's API: `x-api-key` (what Anthropic's API and
/// SDKs use) or `authorization: Bearer` (what some SDK versions and relays send). Both may be
/// sent only with the same key; a repeated header is refused as for `authorization`.
pub fn client_key<'a>(headers: &[Header<'a>]) -> Result<&'a [u8], KeyError> {
    fn values<'a: 'h, 'h>(
        headers: &'h [Header<'a>],
        name: &'static [u8],
    ) -> impl Iterator<Item = &'a [u8]> + 'h {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
    let mut api_keys = values(headers, b"x-api-key");
    let api_key = match (api_keys.next(), api_keys.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => return Err(KeyError::Repeated),
        (Some(v), None) => Some(key_value(v)?),
    };
    let bearer = match values(headers, b"authorization").next() {
        None => None,
        Some(_) => Some(bearer_token(values(headers, b"authorization"))?),
    };
    match (api_key, bearer) {
        (Some(k), None) | (None, Some(k)) => Ok(k),
        // Two different keys: which client is it? Neither.
        (Some(a), Some(b)) if a == b => Ok(a),
        (Some(_), Some(_)) => Err(KeyError::Malformed),
        (None, None) => Err(KeyError::Missing),
    }
}

/// An `x-api-key` value: 1..=MAX_KEY_LEN visible ASCII characters (surrounding blanks trimmed).
fn key_value(v: &[u8]) -> Result<&[u8], KeyError> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > MAX_KEY_LEN || !v.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::Malformed);
    }
    Ok(v)
}

/// Anthropic's `error.type` for a status Tollgate answers with. Anthropic's SDKs pick the
/// exception class from the status (401 `AuthenticationError`, 403 `PermissionDeniedError`,
/// 404 `NotFoundError`, 413 request too large, 429 `RateLimitError`, 5xx server errors).
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Tollgate's answer re-shaped for a client of Anthropic's API: an error body
/// `{"type":"error","error":{"type","message"},"request_id"}` (a 2xx passes unchanged), the
/// budget headers renamed to `anthropic-ratelimit-*` (resets as RFC 3339 times from `now_ms`),
/// `retry-after` kept, and `request-id` (the one Envoy gave the request) when known.
pub fn error_reply(reply: &LocalReply, now_ms: u64, request_id: Option<&str>) -> LocalReply {
    if reply.status < 400 {
        return reply.clone();
    }
    let parsed = serde_json::from_str::<Value>(&reply.body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get("error")?.get(name)?.as_str())
            .map(str::to_string)
    };
    let (message, code) = (field("message").unwrap_or_default(), field("code"));
    let message = anthropic_message(reply.status, &message);
    let mut error = Map::new();
    error.insert("type".into(), json!(error_type(reply.status)));
    error.insert("message".into(), json!(message));
    // Which limit refused (requests or tokens), which model check failed: a stable code, as
    // Anthropic sends in `error.details.error_code`.
    if let Some(code) = code {
        error.insert("details".into(), json!({ "error_code": code }));
    }
    let body = json!({
        "type": "error",
        "error": Value::Object(error),
        "request_id": request_id,
    });
    let mut headers = budget_headers_from(&reply.headers, now_ms);
    if let Some(id) = request_id {
        headers.push(("request-id", id.to_string()));
    }
    LocalReply {
        status: reply.status,
        headers,
        body: body.to_string(),
        kind: reply.kind,
    }
}

/// The message of an OpenAI-shaped answer, where it names OpenAI's conventions, in Anthropic's.
fn anthropic_message(status: u16, message: &str) -> String {
    if status == 401 {
        return "invalid x-api-key: send your Tollgate client key as 'x-api-key: <key>' (or \
                'Authorization: Bearer <key>')."
            .to_string();
    }
    if let Some(at) = message.find("Parser: ") {
        if message.starts_with("We could not parse the JSON body") {
            let why = message.get(at + "Parser: ".len()..).unwrap_or_default();
            return format!("The request body is not valid JSON: {why}");
        }
    }
    message.to_string()
}

/// OpenAI's budget headers in a reply, renamed to Anthropic's (other headers kept as they are).
fn budget_headers_from(
    headers: &[(&'static str, String)],
    now_ms: u64,
) -> Vec<(&'static str, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let renamed = match *name {
                "x-ratelimit-limit-requests" => "anthropic-ratelimit-requests-limit",
                "x-ratelimit-remaining-requests" => "anthropic-ratelimit-requests-remaining",
                "x-ratelimit-reset-requests" => "anthropic-ratelimit-requests-reset",
                "x-ratelimit-limit-tokens" => "anthropic-ratelimit-tokens-limit",
                "x-ratelimit-remaining-tokens" => "anthropic-ratelimit-tokens-remaining",
                "x-ratelimit-reset-tokens" => "anthropic-ratelimit-tokens-reset",
                other => other,
            };
            let value = if renamed.ends_with("-reset") && renamed != *name {
                rfc3339(now_ms.saturating_add(parse_duration_ms(value)))
            } else {
                value.clone()
            };
            (renamed, value)
        })
        .collect()
}

/// A client's budget window (limit, remaining, milliseconds to its reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The limit per window.
    pub limit: u64,
    /// What is left of it.
    pub remaining: u64,
    /// Milliseconds until the window resets.
    pub reset_ms: u64,
}

/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` for the client's own
/// budgets (the reset an RFC 3339 time, as Anthropic sends it).
pub fn budget_headers(
    requests: Option<Budget>,
    tokens: Option<Budget>,
    now_ms: u64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(b) = requests {
        out.push(("anthropic-ratelimit-requests-limit", b.limit.to_string()));
        out.push((
            "anthropic-ratelimit-requests-remaining",
            b.remaining.to_string(),
        ));
        out.push((
            "anthropic-ratelimit-requests-reset",
            rfc3339(now_ms.saturating_add(b.reset_ms)),
        ));
    }
    if let Some(b) = tokens {
        out.push(("anthropic-ratelimit-tokens-limit", b.limit.to_string()));
        out.push((
            "anthropic-ratelimit-tokens-remaining",
            b.remaining.to_string(),
        ));
        out.push((
            "anthropic-ratelimit-tokens-reset",
            rfc3339(now_ms.saturating_add(b.reset_ms)),
        ));
    }
    out
}

/// OpenAI's reset duration (`250ms`, `17s`, `1m0s`, `1h2m3s`) in milliseconds; 0 if unreadable.
fn parse_duration_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().unwrap_or(0);
    }
    let mut total = 0u64;
    let mut n = 0u64;
    for c in s.chars() {
        match c {
            '0'..='9' => {
                n = n
                    .saturating_mul(10)
                    .saturating_add(u64::from(c) - u64::from('0'))
            }
            'h' => (total, n) = (total.saturating_add(n.saturating_mul(3_600_000)), 0),
            'm' => (total, n) = (total.saturating_add(n.saturating_mul(60_000)), 0),
            's' => (total, n) = (total.saturating_add(n.saturating_mul(1000)), 0),
            _ => return 0,
        }
    }
    total
}

/// An RFC 3339 UTC time (`2024-05-01T12:00:07Z`) for Unix milliseconds, rounded up to the
/// second (a client never retries early).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms.div_ceil(1000);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// Usage

/// The tokens of a message, as Anthropic reports them: `input_tokens` excludes the prompt
/// tokens written to or read from its prompt cache, which are reported on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageUsage {
    /// `input_tokens`.
    pub input: u64,
    /// `output_tokens`.
    pub output: u64,
    /// `cache_creation_input_tokens`.
    pub cache_creation: u64,
    /// `cache_read_input_tokens`.
    pub cache_read: u64,
}

impl MessageUsage {
    /// Every prompt token the model read: input, cache writes and cache reads (what the
    /// client's token budget is charged for the prompt).
    pub fn prompt_total(&self) -> u64 {
        self.input
            .saturating_add(self.cache_creation)
            .saturating_add(self.cache_read)
    }

    /// Takes the fields a `usage` object sets (numbers only; `null` or absent keep the value).
    fn update(&mut self, usage: &Value) -> bool {
        let Some(obj) = usage.as_object() else {
            return false;
        };
        let mut any = false;
        for (name, slot) in [
            ("input_tokens", &mut self.input),
            ("output_tokens", &mut self.output),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("cache_read_input_tokens", &mut self.cache_read),
        ] {
            if let Some(n) = obj.get(name).and_then(Value::as_u64) {
                *slot = n;
                any = true;
            }
        }
        any
    }
}

/// The members of a message body or a stream event that carry usage.
#[derive(Deserialize)]
struct WithUsage {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    usage: Option<Value>,
    /// `message_start` carries the message, with its usage so far.
    #[serde(default)]
    message: Option<Value>,
}

fn parse_object(json: &[u8]) -> Option<WithUsage> {
    // serde reads a struct from an array too; a message or an event is an object.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Usage of a message body (`{"type":"message",...,"usage":{...}}`); `None` without one.
pub fn usage_from_json(body: &[u8]) -> Option<MessageUsage> {
    let parsed = parse_object(body)?;
    let mut usage = MessageUsage::default();
    usage.update(parsed.usage.as_ref()?).then_some(usage)
}

/// What one event of a message stream was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Content (`content_block_delta`): what a cut stream is charged for, one token each.
    Content,
    /// It carried usage.
    Usage,
    /// Anything else (`ping`, `content_block_start`/`stop`, `message_stop`, errors, ...).
    Other,
}

/// The usage of a message stream: `message_start` holds the input tokens (and a first output
/// count), each `message_delta` the cumulative counts it sets; the usage is final once a
/// `message_delta` was seen (it comes right before `message_stop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamUsage {
    usage: MessageUsage,
    /// A `message_delta` with usage was seen.
    complete: bool,
}

impl StreamUsage {
    /// Reads the data of one event.
    pub fn event(&mut self, data: &[u8]) -> Event {
        // Only an event that may name `usage` can carry it (a `\u` escape may spell it): the
        // content deltas, most of the stream, are not parsed at all.
        let may_carry =
            data.windows(7).any(|w| w == b"\"usage\"") || data.windows(2).any(|w| w == b"\\u");
        if !may_carry {
            return if data.windows(21).any(|w| w == b"\"content_block_delta\"") {
                Event::Content
            } else {
                Event::Other
            };
        }
        let Some(parsed) = parse_object(data) else {
            return Event::Other;
        };
        match parsed.kind.as_deref() {
            Some("message_start") => {
                let usage = parsed.message.as_ref().and_then(|m| m.get("usage"));
                if usage.is_some_and(|u| self.usage.update(u)) {
                    Event::Usage
                } else {
                    Event::Other
                }
            }
            Some("message_delta") => {
                if parsed.usage.as_ref().is_some_and(|u| self.usage.update(u)) {
                    self.complete = true;
                    Event::Usage
                } else {
                    Event::Other
                }
            }
            Some("content_block_delta") => Event::Content,
            _ => Event::Other,
        }
    }

    /// The stream's usage, once final (`None` for a stream cut before its `message_delta`).
    pub fn usage(&self) -> Option<MessageUsage> {
        self.complete.then_some(self.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai;

    use crate::fake::view as h;

    #[test]
    fn the_key_comes_from_x_api_key_or_a_bearer_token() {
        let key = |pairs: &[(&str, &str)]| client_key(&h(pairs)).map(<[u8]>::to_vec);
        assert_eq!(key(&[("x-api-key", "sk-a")]), Ok(b"sk-a".to_vec()));
        assert_eq!(key(&[("X-Api-Key", " sk-a ")]), Ok(b"sk-a".to_vec()));
        assert_eq!(
            key(&[("authorization", "Bearer sk-a")]),
            Ok(b"sk-a".to_vec())
        );
        assert_eq!(
            key(&[("x-api-key", "sk-a"), ("authorization", "Bearer sk-a")]),
            Ok(b"sk-a".to_vec())
        );
        assert_eq!(key(&[]), Err(KeyError::Missing));
        assert_eq!(
            key(&[("x-api-key", "sk-a"), ("x-api-key", "sk-a")]),
            Err(KeyError::Repeated)
        );
        assert_eq!(
            key(&[("x-api-key", "sk-a"), ("authorization", "Bearer sk-b")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            key(&[("x-api-key", "sk-a"), ("authorization", "Basic sk-a")]),
            Err(KeyError::Malformed)
        );
        for bad in ["", " ", "sk a", "sk-\u{e9}", &"k".repeat(MAX_KEY_LEN + 1)] {
            assert_eq!(
                key(&[("x-api-key", bad)]),
                Err(KeyError::Malformed),
                "{bad}"
            );
        }
    }

    fn body(r: &LocalReply) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn errors_take_anthropics_shape_and_statuses() {
        let now = 1_700_000_000_000;
        let r = error_reply(&openai::invalid_api_key(), now, Some("req-1"));
        assert_eq!(r.status, 401);
        let v = body(&r);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-api-key"));
        assert_eq!(v["error"]["details"]["error_code"], "invalid_api_key");
        assert_eq!(v["request_id"], "req-1");
        assert!(r.headers.contains(&("request-id", "req-1".to_string())));

        let cases = [
            (openai::malformed_body("EOF"), 400, "invalid_request_error"),
            (openai::missing_model(), 400, "invalid_request_error"),
            (openai::model_not_allowed("a", "m"), 403, "permission_error"),
            (openai::model_not_found("m"), 404, "not_found_error"),
            (openai::unknown_url("GET", "/v1/x"), 404, "not_found_error"),
            (openai::body_too_large(10), 413, "request_too_large"),
            (openai::length_required(), 411, "invalid_request_error"),
            (openai::internal_error(), 500, "api_error"),
            (openai::limiter_unavailable(), 503, "api_error"),
        ];
        for (reply, status, kind) in cases {
            let r = error_reply(&reply, now, None);
            assert_eq!(r.status, status);
            let v = body(&r);
            assert_eq!(v["error"]["type"], kind, "{v}");
            assert!(v["request_id"].is_null());
            assert!(!v["error"]["message"].as_str().unwrap().contains("OpenAI"));
        }
        let r = error_reply(&openai::malformed_body("EOF at 1"), now, None);
        assert_eq!(
            body(&r)["error"]["message"],
            "The request body is not valid JSON: EOF at 1"
        );
        // A 2xx (the model list) is not an error.
        let ok = openai::json_ok("{}".into());
        assert_eq!(error_reply(&ok, now, None), ok);
    }

    #[test]
    fn rate_limits_carry_anthropics_budget_headers_and_retry_after() {
        let now = 1_700_000_000_000; // 2023-11-14T22:13:20Z
        let r = error_reply(
            &openai::requests_rate_limited("team", 60, 16_200),
            now,
            None,
        );
        assert_eq!(r.status, 429);
        assert_eq!(body(&r)["error"]["type"], "rate_limit_error");
        let hm: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
        assert_eq!(hm["anthropic-ratelimit-requests-limit"], "60");
        assert_eq!(hm["anthropic-ratelimit-requests-remaining"], "0");
        assert_eq!(
            hm["anthropic-ratelimit-requests-reset"],
            "2023-11-14T22:13:37Z"
        );
        assert_eq!(hm["retry-after"], "17");
        assert!(!hm.keys().any(|k| k.starts_with("x-ratelimit")));
        let r = error_reply(
            &openai::tokens_rate_limited("team", 1000, 10, 58, 250),
            now,
            None,
        );
        let hm: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
        assert_eq!(hm["anthropic-ratelimit-tokens-remaining"], "10");
        assert_eq!(
            hm["anthropic-ratelimit-tokens-reset"],
            "2023-11-14T22:13:21Z"
        );
        assert_eq!(
            body(&r)["error"]["details"]["error_code"],
            "rate_limit_exceeded"
        );
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(parse_duration_ms("250ms"), 250);
        assert_eq!(parse_duration_ms("17s"), 17_000);
        assert_eq!(parse_duration_ms("1m0s"), 60_000);
        assert_eq!(parse_duration_ms("1h2m3s"), 3_723_000);
        assert_eq!(parse_duration_ms("x"), 0);
        let b = Budget {
            limit: 5,
            remaining: 4,
            reset_ms: 1500,
        };
        assert_eq!(
            budget_headers(Some(b), None, 0),
            vec![
                ("anthropic-ratelimit-requests-limit", "5".to_string()),
                ("anthropic-ratelimit-requests-remaining", "4".to_string()),
                (
                    "anthropic-ratelimit-requests-reset",
                    "1970-01-01T00:00:02Z".to_string()
                ),
            ]
        );
    }

    #[test]
    fn usage_of_a_message() {
        let m = br#"{"id":"msg_1","type":"message","role":"assistant","content":[],
            "usage":{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":3,
                     "cache_read_input_tokens":null}}"#;
        let u = usage_from_json(m).unwrap();
        assert_eq!(
            (u.input, u.output, u.cache_creation, u.cache_read),
            (10, 5, 3, 0)
        );
        assert_eq!(u.prompt_total(), 13);
        assert_eq!(
            usage_from_json(br#"{"input_tokens":12}"#),
            None,
            "count_tokens"
        );
        assert_eq!(
            usage_from_json(br#"{"type":"error","error":{"type":"x"}}"#),
            None
        );
        assert_eq!(usage_from_json(br#"[{"usage":{"input_tokens":1}}]"#), None);
        assert_eq!(usage_from_json(br#"{"usage":[1,2]}"#), None);
        assert_eq!(usage_from_json(b"nope"), None);
    }

    #[test]
    fn usage_of_a_stream() {
        let mut s = StreamUsage::default();
        let events: [&[u8]; 7] = [
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1,"cache_creation_input_tokens":0,"cache_read_input_tokens":7}}}"#,
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            br#"{"type":"ping"}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\"usage\""}}"#,
            br#"{"type":"content_block_stop","index":0}"#,
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        ];
        let kinds: Vec<Event> = events.iter().map(|e| s.event(e)).collect();
        assert_eq!(
            kinds,
            vec![
                Event::Usage,
                Event::Other,
                Event::Other,
                Event::Content,
                Event::Content,
                Event::Other,
                Event::Usage
            ]
        );
        let u = s.usage().unwrap();
        assert_eq!(
            (u.input, u.output, u.cache_read, u.prompt_total()),
            (25, 15, 7, 32)
        );
        assert_eq!(s.event(br#"{"type":"message_stop"}"#), Event::Other);

        // Cut before message_delta: no final usage.
        let mut cut = StreamUsage::default();
        cut.event(events[0]);
        assert_eq!(cut.usage(), None);
        // A later message_delta that reports the input too (cumulative) overrides it.
        cut.event(br#"{"type":"message_delta","usage":{"input_tokens":30,"output_tokens":2}}"#);
        assert_eq!(cut.usage().map(|u| (u.input, u.output)), Some((30, 2)));
    }
}

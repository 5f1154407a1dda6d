//! What the client asked for, and which requests are cacheable.

use serde_json::Value;

use crate::headers::Header;

use super::*;

/// Why a lookup or a store did not happen (`tollgate_cache_skips_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The client sent `cache-control: no-cache` (or `max-age=0`, or `pragma: no-cache`): no
    /// lookup; the answer is still stored.
    NoCache,
    /// The client sent `cache-control: no-store`: not stored.
    NoStore,
    /// A streaming request.
    Stream,
    /// `n` other than 1.
    N,
    /// A `temperature` the setting does not cache.
    Temperature,
    /// `tools` or `functions` without `allow_tools`.
    Tools,
    /// A request that depends on state kept by the provider (`previous_response_id`,
    /// `conversation`).
    Stateful,
    /// The response was not a 200.
    Status,
    /// The response body was larger than `max_entry_bytes`.
    TooLarge,
    /// The response was compressed, streamed, or had an unusable content type.
    Encoding,
    /// The response ended before its end of stream (reset, client gone).
    Incomplete,
    /// The request has a query string (it reaches the provider; the key does not cover it).
    Query,
}

impl Skip {
    /// Metric label value.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::NoCache => "no_cache",
            Skip::NoStore => "no_store",
            Skip::Stream => "stream",
            Skip::N => "n",
            Skip::Temperature => "temperature",
            Skip::Tools => "tools",
            Skip::Stateful => "stateful",
            Skip::Status => "status",
            Skip::TooLarge => "too_large",
            Skip::Encoding => "encoding",
            Skip::Incomplete => "incomplete",
            Skip::Query => "query",
        }
    }
}

/// The client's `cache-control` request directives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// Do not answer from the cache (`no-cache`, `max-age=0`, `pragma: no-cache`).
    pub no_cache: bool,
    /// Do not store the answer (`no-store`).
    pub no_store: bool,
}

/// Reads `cache-control` (every value, comma-separated directives, any case) and `pragma`.
pub fn cache_control(headers: &[Header]) -> CacheControl {
    let mut cc = CacheControl::default();
    for (name, value) in headers {
        let pragma = name.eq_ignore_ascii_case(b"pragma");
        if !pragma && !name.eq_ignore_ascii_case(b"cache-control") {
            continue;
        }
        for directive in value.split(|&b| b == b',') {
            let d = directive.trim_ascii().to_ascii_lowercase();
            match d.as_slice() {
                b"no-cache" => cc.no_cache = true,
                b"no-store" if !pragma => cc.no_store = true,
                b"max-age=0" if !pragma => cc.no_cache = true,
                _ => {}
            }
        }
    }
    cc
}

/// The cacheability rule: whether a request (its path and parsed body) may be answered from the
/// cache and stored, under `settings`.
///
/// Not cached: streams; `n` other than 1; `tools` or `functions` unless `allow_tools`;
/// `previous_response_id` or `conversation` (the answer depends on state at the provider);
/// and, except for `/v1/embeddings` (deterministic whatever the settings), a `temperature`
/// other than 0 (with `"temperature": "zero"`, also none at all).
pub fn check(settings: &Settings, path: &str, body: &Value) -> Result<(), Skip> {
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    if field("stream").and_then(Value::as_bool) == Some(true) {
        return Err(Skip::Stream);
    }
    if let Some(n) = field("n") {
        if n.as_f64() != Some(1.0) {
            return Err(Skip::N);
        }
    }
    if !settings.allow_tools {
        for name in ["tools", "functions"] {
            match field(name) {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(_) => return Err(Skip::Tools),
            }
        }
    }
    if field("previous_response_id").is_some() || field("conversation").is_some() {
        return Err(Skip::Stateful);
    }
    if path != "/v1/embeddings" {
        match field("temperature") {
            None if settings.temperature == Temperature::ZeroOrAbsent => {}
            Some(t) if t.as_f64() == Some(0.0) => {}
            _ => return Err(Skip::Temperature),
        }
    }
    Ok(())
}

//! Runs tollgate-core's request path in a loop, as the filter drives it for one admitted request:
//! decode the host's header map, `on_request_headers` (and `on_request_body` with routing), the
//! limiter's shared-data CAS against an in-memory store, and the response's rate-limit headers.
//!
//!     core-profile [single|routed|usage-json|usage-sse] [ITERATIONS]
//!
//! `single` and `routed`: the request path. `usage-json` and `usage-sse`: reading token usage
//! from the mock provider's response (a JSON body; an SSE stream in nine chunks).
//!
//! Prints nanoseconds per request (native code: wasm in V8 is slower, by a factor to measure, not
//! assume). Under `valgrind --tool=callgrind` it gives instruction counts per function.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use tollgate_core::headers;
use tollgate_core::host::{CasStore, SetError, StoreError};
use tollgate_core::request::{self, Decision, Start};
use tollgate_core::usage::{self, SseUsage};
use tollgate_core::Config;

/// The demo client (key `sk-tollgate-demo`) with the bench's budgets (requests and tokens per
/// minute, as `make bench` sets them), one provider.
const SINGLE: &str = r#"{
  "clients": [{"name": "demo",
    "key_sha256": "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f",
    "requests_per_minute": 1000000000, "tokens_per_minute": 1000000000}],
  "default_requests_per_minute": 60,
  "upstream": {"api_key_env": "TOLLGATE_PROVIDER_KEY"},
  "limiter": {"backend": "local"}
}"#;

/// The same with envoy/demo.yaml's model routing.
const ROUTED: &str = r#"{
  "clients": [{"name": "demo",
    "key_sha256": "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f",
    "requests_per_minute": 1000000000, "tokens_per_minute": 1000000000}],
  "default_requests_per_minute": 60,
  "providers": [
    {"name": "relay", "cluster": "provider_relay", "api_key_env": "TOLLGATE_PROVIDER_KEY"},
    {"name": "backup", "cluster": "provider_backup", "api_key_env": "TOLLGATE_BACKUP_KEY"}],
  "models": [
    {"match": "gpt-4.1", "providers": ["relay", "backup"]},
    {"match": "gpt-4.1-*", "providers": ["relay"]},
    {"match": "fast", "providers": ["backup"], "upstream_model": "deepseek-chat"}],
  "default_provider": "relay",
  "limiter": {"backend": "local"}
}"#;

const BODY: &[u8] = br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"Say hello"}]}"#;

/// The mock provider's answer to BODY.
const RESPONSE: &[u8] = br#"{"id":"chatcmpl-DKcVabYlmiNJOqEJT3BsX4","object":"chat.completion","created":1795744175,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","content":"Mock reply from bench: Say hello","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":6,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

/// The events of the mock provider's stream for BODY with `stream_options.include_usage`.
const STREAM: &[&[u8]] = &[
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"Mock "},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"reply "},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"from "},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"bench: "},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"Say "},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"hello"},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

"#,
    br#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","system_fingerprint":"fp_mock","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":6,"total_tokens":13}}

data: [DONE]

"#,
];

/// Reads usage as the filter does; returns the total tokens found.
fn usage_of(mode: &str) -> u64 {
    let found = if mode == "usage-json" {
        usage::from_json(black_box(RESPONSE))
    } else {
        let mut sse = SseUsage::default();
        for chunk in STREAM {
            sse.push(black_box(chunk));
        }
        sse.finish();
        sse.usage
    };
    found.map_or(0, |u| u.prompt_tokens + u.completion_tokens)
}

/// Envoy shared data's semantics: a CAS token per key, bumped on every write.
#[derive(Default)]
struct Store(RefCell<HashMap<String, (Vec<u8>, u32)>>);

impl CasStore for Store {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.0.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut map = self.0.borrow_mut();
        let next = match map.get(key) {
            Some((_, current)) if cas != 0 && cas != *current => return Err(SetError::CasMismatch),
            Some((_, current)) => current.wrapping_add(1).max(1),
            None => 1,
        };
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("single", String::as_str);
    let iterations: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let json = match mode {
        "single" | "usage-json" | "usage-sse" => SINGLE,
        "routed" => ROUTED,
        other => {
            eprintln!("mode must be single, routed, usage-json or usage-sse, not {other:?}");
            std::process::exit(2);
        }
    };
    if mode.starts_with("usage") {
        if usage_of(mode) != 13 {
            eprintln!("no usage found");
            std::process::exit(1);
        }
        let t0 = Instant::now();
        let mut sink = 0u64;
        for _ in 0..iterations {
            sink = sink.wrapping_add(usage_of(mode));
        }
        black_box(sink);
        println!(
            "{mode}: {iterations} responses, {:.0} ns per response (native)",
            t0.elapsed().as_nanos() as f64 / iterations as f64
        );
        return;
    }
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-bench-provkey".to_string()))
        .unwrap_or_else(|e| {
            eprintln!("config: {e}");
            std::process::exit(2);
        });
    // The request headers as Envoy hands them to the filter (wrk's request through the listener).
    let map = headers::encode(&[
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("authorization", "Bearer sk-tollgate-demo"),
        ("content-type", "application/json"),
        ("content-length", "76"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5b3c9a0e-3f7d-4c39-9a51-2f0c8e0d7a11"),
    ]);
    let store = Store::default();
    let mut now_ms: u64 = 1_800_000_000_000;
    let run = |now_ms: u64| -> usize {
        let Ok(headers) = headers::decode(black_box(&map)) else {
            return 0;
        };
        let strip = request::strip_list(&config, &headers);
        let mut start = request::on_request_headers(&config, &headers, false, now_ms, &store);
        if let Start::ReadBody(awaiting) = start {
            start = request::on_request_body(&config, awaiting, black_box(BODY), now_ms, &store);
        }
        match start {
            Start::Done(step) => match step.decision {
                Decision::Forward(f) => {
                    strip.len()
                        + f.set.len()
                        + f.window.map_or(0, |w| request::response_headers(&w).len())
                }
                Decision::Reply(r) => {
                    eprintln!("unexpected reply {}: {}", r.status, r.body);
                    std::process::exit(1);
                }
            },
            other => {
                eprintln!("unexpected {other:?}");
                std::process::exit(1);
            }
        }
    };
    // Warm the store (the filter creates the record in on_configure).
    black_box(run(now_ms));
    let t0 = Instant::now();
    let mut sink = 0usize;
    for _ in 0..iterations {
        now_ms += 1;
        sink = sink.wrapping_add(run(black_box(now_ms)));
    }
    let elapsed = t0.elapsed();
    black_box(sink);
    println!(
        "{mode}: {iterations} requests, {:.0} ns per request (native)",
        elapsed.as_nanos() as f64 / iterations as f64
    );
}

//! Runs tollgate-core's whole exchange in a loop, as the filter drives it for one admitted
//! request of `make bench`: `Exchange` from request headers to the log, over the core's fake host
//! (the same one the core's tests count host calls with; its shared data has Envoy's CAS
//! semantics).
//!
//!     core-profile [single|routed|stream|usage-json|usage-sse] [ITERATIONS]
//!
//! `single`: one provider, a JSON answer (the bench's `local` peer). `routed`: the listener role
//! with model routing (`routing`; the upstream role's attempt is not included). `stream`: one
//! provider, the answer streamed in nine SSE chunks (`stream`). `usage-json` and `usage-sse`:
//! only reading token usage from the answer.
//!
//! Prints nanoseconds per request and the host calls each made (native code: wasm in V8 is
//! slower, by a factor to measure, not assume). Under `valgrind --tool=callgrind` it gives
//! instruction counts per function; the fake host's own work shows as `tollgate_core::fake`.

use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use tollgate_core::exchange::Exchange;
use tollgate_core::fake::{pairs, FakeHost};
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
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

/// The request headers as Envoy hands them to the filter (wrk's request through the listener).
const REQUEST: &[(&str, &str)] = &[
    (":authority", "127.0.0.1:10000"),
    (":path", "/v1/chat/completions"),
    (":method", "POST"),
    (":scheme", "http"),
    ("authorization", "Bearer sk-tollgate-demo"),
    ("content-type", "application/json"),
    ("content-length", "76"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "5b3c9a0e-3f7d-4c39-9a51-2f0c8e0d7a11"),
];

/// The mock provider's response headers.
const RESPONSE_HEADERS: &[(&str, &str)] = &[
    (":status", "200"),
    ("content-type", "application/json"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-reset-requests", "6ms"),
];

/// The mock provider's response headers for a stream.
const STREAM_HEADERS: &[(&str, &str)] =
    &[(":status", "200"), ("content-type", "text/event-stream")];

fn fail(what: &str) -> ! {
    eprintln!("{what}");
    std::process::exit(1);
}

/// One admitted request, headers to log; returns the host calls it made.
fn exchange(host: &FakeHost, gw: &Rc<Gateway>, mode: &str) -> usize {
    *host.request.borrow_mut() = pairs(REQUEST);
    let mut ex = Exchange::new(Some(gw.clone()));
    let mut action = ex.on_request_headers(host, false);
    if mode == "routed" {
        *host.request_body.borrow_mut() = BODY.to_vec();
        action = ex.on_request_body(host, BODY.len(), true);
    }
    if action != Action::Continue || !ex.forwarded() {
        fail(&format!(
            "not forwarded: {action:?}, replies {:?}",
            host.replies.borrow().last()
        ));
    }
    if mode == "stream" {
        *host.response.borrow_mut() = pairs(STREAM_HEADERS);
        ex.on_response_headers(host);
        for (i, chunk) in STREAM.iter().enumerate() {
            *host.response_chunk.borrow_mut() = chunk.to_vec();
            ex.on_response_body(host, chunk.len(), i + 1 == STREAM.len());
        }
    } else {
        *host.response.borrow_mut() = pairs(RESPONSE_HEADERS);
        ex.on_response_headers(host);
        *host.response_chunk.borrow_mut() = RESPONSE.to_vec();
        ex.on_response_body(host, RESPONSE.len(), true);
    }
    ex.on_log(host);
    host.samples.borrow_mut().clear();
    host.take_calls().len()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("single", String::as_str);
    let iterations: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let json = match mode {
        "single" | "stream" | "usage-json" | "usage-sse" => SINGLE,
        "routed" => ROUTED,
        other => {
            eprintln!(
                "mode must be single, routed, stream, usage-json or usage-sse, not {other:?}"
            );
            std::process::exit(2);
        }
    };
    if mode.starts_with("usage") {
        if usage_of(mode) != 13 {
            fail("no usage found");
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
        .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let host = FakeHost::new(1_800_000_000_000, REQUEST);
    let gw = Rc::new(
        Gateway::configure(&host, config).unwrap_or_else(|e| fail(&format!("configure: {e}"))),
    );
    host.take_calls();
    // The first request defines the metric series it uses (once per VM in the filter too).
    exchange(&host, &gw, mode);
    let calls = exchange(&host, &gw, mode);
    let t0 = Instant::now();
    let mut sink = 0usize;
    for _ in 0..iterations {
        host.now.set(host.now.get() + 1);
        sink = sink.wrapping_add(exchange(&host, &gw, black_box(mode)));
    }
    let elapsed = t0.elapsed();
    black_box(sink);
    println!(
        "{mode}: {iterations} requests, {:.0} ns per request (native, fake host included), \
         {calls} host calls each",
        elapsed.as_nanos() as f64 / iterations as f64
    );
}

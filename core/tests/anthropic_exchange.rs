//! Anthropic's Messages API through the whole exchange against the fake host: the key from
//! `x-api-key`, the provider key as `x-api-key`, errors in Anthropic's shape, the budget as
//! `anthropic-ratelimit-*`, usage from a message and from its event stream.

// Tests fail loudly: unwrapping is what they are for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::rc::Rc;

use serde_json::Value;
use tollgate_core::exchange::Exchange;
use tollgate_core::fake::{pairs, FakeHost};
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

const NOW: u64 = 1_800_000_000_000;
const KEY: &str = "sk-claude-client";

fn gateway(host: &FakeHost, tpm: u32) -> Rc<Gateway> {
    let sha = Digest::of_key(DigestKind::Sha256, KEY.as_bytes()).to_hex();
    let json = format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{sha}","requests_per_minute":10,
                         "tokens_per_minute":{tpm}}}],
            "upstream":{{"api_key_env":"K","api":"anthropic"}}}}"#
    );
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-ant-provider".into())).unwrap();
    let gw = Gateway::configure(host, config).unwrap();
    host.take_calls();
    Rc::new(gw)
}

fn messages_request(host: &FakeHost, key: &str, len: usize) {
    *host.request.borrow_mut() = pairs(&[
        (":method", "POST"),
        (":path", "/v1/messages"),
        (":authority", "gw"),
        ("x-api-key", key),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31"),
        ("content-type", "application/json"),
        ("content-length", &len.to_string()),
        ("x-request-id", "envoy-id-1"),
        ("authorization", &format!("Bearer {key}")),
    ]);
}

#[test]
fn a_message_end_to_end() {
    let host = FakeHost::new(NOW, &[]);
    let mut ex = Exchange::new(Some(gateway(&host, 1000)));
    messages_request(&host, KEY, 400);
    assert_eq!(ex.on_request_headers(&host, false), Action::Continue);
    // The provider gets its own key in x-api-key, Anthropic's headers, no client credential.
    assert_eq!(
        host.request_header("x-api-key").as_deref(),
        Some("sk-ant-provider")
    );
    assert_eq!(host.request_header("authorization"), None);
    assert_eq!(
        host.request_header("anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(
        host.request_header("anthropic-beta").as_deref(),
        Some("prompt-caching-2024-07-31")
    );

    *host.response.borrow_mut() = pairs(&[
        (":status", "200"),
        ("content-type", "application/json"),
        ("anthropic-organization-id", "org-secret"),
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-input-tokens-remaining", "399000"),
        ("request-id", "req_provider"),
    ]);
    ex.on_response_headers(&host);
    assert_eq!(host.response_header("anthropic-organization-id"), None);
    assert_eq!(
        host.response_header("anthropic-ratelimit-input-tokens-remaining"),
        None
    );
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-limit")
            .as_deref(),
        Some("10")
    );
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-remaining")
            .as_deref(),
        Some("9")
    );
    assert_eq!(
        host.response_header("anthropic-ratelimit-tokens-remaining")
            .as_deref(),
        Some("900"),
        "100 tokens reserved for 400 bytes"
    );
    assert!(host
        .response_header("anthropic-ratelimit-requests-reset")
        .unwrap()
        .ends_with('Z'));
    assert_eq!(host.response_header("x-ratelimit-limit-requests"), None);
    assert_eq!(
        host.response_header("request-id").as_deref(),
        Some("req_provider")
    );

    *host.response_chunk.borrow_mut() = br#"{"id":"msg_1","type":"message","usage":{"input_tokens":20,"output_tokens":9,"cache_creation_input_tokens":4,"cache_read_input_tokens":6}}"#.to_vec();
    let size = host.response_chunk.borrow().len();
    ex.on_response_body(&host, size, true);
    ex.on_log(&host);
    assert_eq!(tokens(&host, "prompt"), 30);
    assert_eq!(tokens(&host, "completion"), 9);

    // The next request sees the 39 tokens used, not the estimate.
    let mut ex = Exchange::new(Some(gateway_shared(&host)));
    messages_request(&host, KEY, 4);
    ex.on_request_headers(&host, false);
    ex.on_response_headers(&host);
    assert_eq!(
        host.response_header("anthropic-ratelimit-tokens-remaining")
            .as_deref(),
        Some("960")
    );
}

/// A second gateway over the same shared data (another VM of the same Envoy).
fn gateway_shared(host: &FakeHost) -> Rc<Gateway> {
    gateway(host, 1000)
}

#[test]
fn a_stream_is_charged_its_reported_usage() {
    let host = FakeHost::new(NOW, &[]);
    let mut ex = Exchange::new(Some(gateway(&host, 1000)));
    messages_request(&host, KEY, 40);
    ex.on_request_headers(&host, false);
    *host.response.borrow_mut() = pairs(&[
        (":status", "200"),
        ("content-type", "text/event-stream; charset=utf-8"),
    ]);
    ex.on_response_headers(&host);
    let stream = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1,\"cache_read_input_tokens\":2}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    for (i, piece) in stream.as_bytes().chunks(13).enumerate() {
        *host.response_chunk.borrow_mut() = piece.to_vec();
        let last = (i + 1) * 13 >= stream.len();
        assert_eq!(
            ex.on_response_body(&host, piece.len(), last),
            Action::Continue
        );
        // Not one byte of an Anthropic stream is changed.
        assert_eq!(*host.response_chunk.borrow(), piece);
    }
    ex.on_log(&host);
    assert_eq!(tokens(&host, "prompt"), 13);
    assert_eq!(tokens(&host, "completion"), 7);
}

fn reply_json(host: &FakeHost) -> (u16, Vec<(String, String)>, Value) {
    let replies = host.replies.borrow();
    let r = replies.last().unwrap();
    (
        r.status,
        r.headers.clone(),
        serde_json::from_slice(&r.body).unwrap(),
    )
}

#[test]
fn gate_errors_are_anthropic_shaped() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, 150);
    // A wrong key: 401 authentication_error, with request-id.
    let mut ex = Exchange::new(Some(gw.clone()));
    messages_request(&host, "sk-wrong", 10);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let (status, headers, body) = reply_json(&host);
    assert_eq!(status, 401);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["request_id"], "envoy-id-1");
    assert!(headers.contains(&("request-id".into(), "envoy-id-1".into())));
    // Over the token budget: 429 rate_limit_error with retry-after and Anthropic's headers.
    let mut ex = Exchange::new(Some(gw.clone()));
    messages_request(&host, KEY, 800);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let (status, headers, body) = reply_json(&host);
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"retry-after"), "{names:?}");
    assert!(names.contains(&"anthropic-ratelimit-tokens-remaining"));
    assert!(!names.iter().any(|n| n.starts_with("x-ratelimit")));
    // Not an endpoint: 404 not_found_error.
    let mut ex = Exchange::new(Some(gw));
    messages_request(&host, KEY, 10);
    host.request.borrow_mut()[0].1 = b"GET".to_vec();
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let (status, _, body) = reply_json(&host);
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found_error");
}

/// The tokens counted of one kind (`prompt`, `completion`), over every client and model.
fn tokens(host: &FakeHost, kind: &str) -> u64 {
    let suffix = format!(".kind={kind}");
    let names = host.metric_names.borrow().clone();
    names
        .iter()
        .filter(|n| n.starts_with("tollgate_tokens_total.") && n.ends_with(&suffix))
        .map(|n| host.counter(n))
        .sum()
}

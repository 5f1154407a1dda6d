//! The whole exchange against the fake host: what each callback decides, what reaches the
//! provider, and what it costs in host calls (the budget in docs/benchmark.md).

// Tests fail loudly: unwrapping is what they are for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::rc::Rc;

use tollgate_core::access_log;
use tollgate_core::exchange::Exchange;
use tollgate_core::fake::{pairs, FakeHost};
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

const NOW: u64 = 1_800_000_000_000;
const KEY: &str = "sk-exchange-test";

fn sha(key: &str) -> String {
    Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex()
}

fn gateway(host: &FakeHost, json: &str) -> Rc<Gateway> {
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let gw = Gateway::configure(host, config).unwrap();
    host.take_calls();
    Rc::new(gw)
}

fn one_provider(tpm: &str) -> String {
    format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{}","requests_per_minute":10{tpm}}}],
            "upstream":{{"api_key_env":"K"}}}}"#,
        sha(KEY)
    )
}

/// `json` with the access log's properties turned on (`"access_log": true`).
fn logged(json: &str) -> String {
    json.replacen('{', r#"{"access_log":true,"#, 1)
}

fn routed() -> String {
    format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{}","models":["gpt-4.1","fast"]}}],
            "providers":[{{"name":"relay","cluster":"relay","api_key_env":"K"}}],
            "models":[{{"match":"gpt-4.1","providers":["relay"]}},
                      {{"match":"fast","providers":["relay"],"upstream_model":"deepseek-chat"}}]}}"#,
        sha(KEY)
    )
}

/// The request header edits made so far.
fn header_edits(host: &FakeHost) -> usize {
    let edits = ["remove_header", "replace_header", "set_headers"];
    host.calls
        .borrow()
        .iter()
        .filter(|c| edits.contains(c))
        .count()
}

fn chat_request(host: &FakeHost, len: usize) {
    *host.request.borrow_mut() = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gw"),
        ("authorization", &format!("Bearer {KEY}")),
        ("content-type", "application/json"),
        ("content-length", &len.to_string()),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "r-1"),
        ("x-api-key", "sk-someone-else"),
        ("x-tollgate-route", "r0"),
    ]);
}

/// An SDK's chat request: its key, and no other header to strip.
fn sdk_request(host: &FakeHost, len: usize) {
    chat_request(host, len);
    host.request
        .borrow_mut()
        .retain(|(n, _)| n != b"x-api-key" && n != b"x-tollgate-route");
}

fn provider_response(host: &FakeHost, content_type: &str) {
    *host.response.borrow_mut() = pairs(&[
        (":status", "200"),
        ("content-type", content_type),
        ("openai-organization", "org-secret"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-tokens", "29999000"),
        ("x-ratelimit-reset-tokens", "2ms"),
    ]);
}

/// The access log's properties (`wasm.tollgate_<field>`) as (field, value) pairs, in the
/// order of `access_log::FIELDS` (leaked: a test's few bytes).
fn log_record(host: &FakeHost) -> Vec<(&'static str, &'static str)> {
    let properties = host.properties.borrow();
    access_log::FIELDS
        .iter()
        .zip(access_log::PROPERTIES)
        .filter_map(|(field, property)| {
            let value = properties.get(property)?;
            Some((*field, &*String::from_utf8(value.clone()).unwrap().leak()))
        })
        .collect()
}

#[test]
fn a_rate_limited_request_names_its_client_model_and_limit() {
    let host = FakeHost::new(NOW, &[]);
    let json = routed().replace(
        r#""models":["gpt-4.1","fast"]"#,
        r#""models":["gpt-4.1","fast"],"requests_per_minute":1"#,
    );
    let gw = gateway(&host, &logged(&json));
    for expected in [200, 429] {
        let mut ex = Exchange::new(Some(gw.clone()));
        chat_request(&host, 20);
        host.request
            .borrow_mut()
            .retain(|(n, _)| n != b"x-tollgate-route");
        assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
        *host.request_body.borrow_mut() = br#"{"model":"fast"}"#.to_vec();
        host.take_calls();
        let action = ex.on_request_body(&host, 16, true);
        let calls = host.take_calls();
        if expected == 429 {
            assert_eq!(action, Action::Pause);
            assert_eq!(host.replies.borrow()[0].status, 429);
            // One access-log property per field it has: client, model, outcome, reason.
            assert_eq!(calls.iter().filter(|c| **c == "set_property").count(), 4);
        }
    }
    assert_eq!(
        log_record(&host),
        [
            ("client", "team"),
            ("model", "fast"),
            ("outcome", "rate_limited"),
            ("reason", "requests_per_minute")
        ]
    );
}

#[test]
fn an_admitted_json_request_end_to_end_and_its_host_calls() {
    // The access log's properties are opt-in (`access_log`): the same exchange with them.
    for access_log in [false, true] {
        let host = FakeHost::new(NOW, &[]);
        let json = one_provider(r#","tokens_per_minute":1000"#);
        let gw = gateway(&host, &if access_log { logged(&json) } else { json });
        let mut ex = Exchange::new(Some(gw));
        chat_request(&host, 100);
        assert_eq!(ex.on_request_headers(&host, false), Action::Continue);
        assert!(ex.forwarded());
        let request_calls = host.take_calls();
        // The provider gets its key and nothing of the client's credentials or routing headers.
        assert_eq!(
            host.request_header("authorization").as_deref(),
            Some("Bearer sk-provider")
        );
        assert_eq!(host.request_header("x-api-key"), None);
        assert_eq!(host.request_header("x-tollgate-route"), None);
        assert_eq!(host.request_header("x-request-id").as_deref(), Some("r-1"));
        // The body passes.
        assert_eq!(ex.on_request_body(&host, 100, true), Action::Continue);
        assert!(
            host.take_calls().is_empty(),
            "a forwarded body costs nothing"
        );

        provider_response(&host, "application/json");
        assert_eq!(ex.on_response_headers(&host), Action::Continue);
        let response_calls = host.take_calls();
        assert_eq!(host.response_header("openai-organization"), None);
        assert_eq!(
            host.response_header("x-ratelimit-limit-requests")
                .as_deref(),
            Some("10")
        );
        assert_eq!(
            host.response_header("x-ratelimit-remaining-requests")
                .as_deref(),
            Some("9")
        );
        assert_eq!(
            host.response_header("x-ratelimit-limit-tokens").as_deref(),
            Some("1000")
        );

        *host.response_chunk.borrow_mut() =
            br#"{"id":"x","usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#
                .to_vec();
        let size = host.response_chunk.borrow().len();
        assert_eq!(ex.on_response_body(&host, size, true), Action::Continue);
        let body_calls = host.take_calls();
        ex.on_log(&host);
        let log_calls = host.take_calls();

        assert_eq!(
            host.counter("tollgate_requests_total.client=team.outcome=admitted"),
            1
        );
        assert_eq!(
            host.counter("tollgate_tokens_total.client=team.model=_default.kind=prompt"),
            7
        );
        let all = request_calls.len() + response_calls.len() + body_calls.len() + log_calls.len();
        println!("request {request_calls:?}\nresponse {response_calls:?}\nbody {body_calls:?}\nlog {log_calls:?}");
        // Alone on its worker, the request writes the worker's batch as it ends: its request
        // and token counters and its settlement (get + CAS set) are in the log callback. The
        // request's two headers to strip and its key are one write of the header map. Under
        // load the batch waits for the root tick: see `under_load_an_admitted_json_request_
        // costs_ten_host_calls` for the budget.
        assert_eq!(
            (
                request_calls.len(),
                response_calls.len(),
                body_calls.len(),
                log_calls.len()
            ),
            if access_log {
                (8, 2, 5, 8)
            } else {
                (6, 2, 3, 8)
            },
            "host calls per phase"
        );
        // Four of them define a metric series on its first use in this VM, once (the client's
        // request counter, two token counters, the duration histogram). With the access log,
        // four more set its properties, one per field: client and outcome at admission, the two
        // token counts with the provider's usage.
        assert_eq!(all, if access_log { 23 } else { 19 });
        let expected: &[(&str, &str)] = if access_log {
            &[
                ("client", "team"),
                ("outcome", "admitted"),
                ("prompt_tokens", "7"),
                ("completion_tokens", "5"),
            ]
        } else {
            &[]
        };
        assert_eq!(log_record(&host), expected);
    }
}

/// One admitted JSON request through the exchange (the chat request with nothing to strip but
/// its key, the provider's JSON answer with usage); the host calls of each phase.
fn admitted_json(host: &FakeHost, ex: &mut Exchange) -> [Vec<&'static str>; 4] {
    sdk_request(host, 100);
    host.take_calls();
    assert_eq!(ex.on_request_headers(host, false), Action::Continue);
    let request = host.take_calls();
    assert_eq!(ex.on_request_body(host, 100, true), Action::Continue);
    provider_response(host, "application/json");
    assert_eq!(ex.on_response_headers(host), Action::Continue);
    let response = host.take_calls();
    let (body, log) = usage_answer_and_log(host, ex);
    [request, response, body, log]
}

/// The provider's JSON body with its usage, then the log callback: the host calls of each.
fn usage_answer_and_log(
    host: &FakeHost,
    ex: &mut Exchange,
) -> (Vec<&'static str>, Vec<&'static str>) {
    *host.response_chunk.borrow_mut() =
        br#"{"id":"x","usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#
            .to_vec();
    let size = host.response_chunk.borrow().len();
    assert_eq!(ex.on_response_body(host, size, true), Action::Continue);
    let body = host.take_calls();
    ex.on_log(host);
    (body, host.take_calls())
}

#[test]
fn under_load_an_admitted_json_request_costs_ten_host_calls() {
    // The budget of issue #16, stated (docs/benchmark.md "Host calls"): a change that adds a
    // host call to this path must say so here.
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(r#","tokens_per_minute":1000"#));
    // A first request defines the series; the worker is idle after it.
    admitted_json(&host, &mut Exchange::new(Some(gw.clone())));
    let tokens = "tollgate_tokens_total.client=team.model=_default.kind=prompt";
    assert_eq!(host.counter(tokens), 7);
    // What the first request's answer said was left (its own estimate reserved).
    let remaining = |host: &FakeHost| -> u64 {
        host.response_header("x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = remaining(&host);

    // Another request is in flight while this one runs from start to end.
    let mut other = Exchange::new(Some(gw.clone()));
    let calls = admitted_json(&host, &mut Exchange::new(Some(gw.clone())));
    println!("under load: {calls:?}");
    assert_eq!(
        calls,
        [
            // Read the headers, the clock, the budget record (both budgets) and write it, and
            // the key in one header edit.
            vec![
                "get_headers",
                "now",
                "get_shared_data",
                "set_shared_data",
                "replace_header"
            ],
            // The response's headers read and written at once.
            vec!["get_headers", "set_headers"],
            // The body with its usage.
            vec!["get_body"],
            // The clock and the duration histogram.
            vec!["now", "record"],
        ]
    );
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 10);
    // Its counters and settlement wait for the batch.
    assert_eq!(host.counter(tokens), 7);

    // The last request of the worker ends: the batch is written, each series once and the
    // client's record in one compare-and-swap for both requests.
    chat_request(&host, 100);
    assert_eq!(other.on_request_headers(&host, false), Action::Continue);
    host.take_calls();
    other.on_log(&host);
    let flush = host.take_calls();
    println!("flush: {flush:?}");
    assert_eq!(
        flush.iter().filter(|c| **c == "increment").count(),
        3,
        "requests, prompt and completion tokens"
    );
    assert_eq!(
        flush.iter().filter(|c| c.ends_with("_shared_data")).count(),
        2
    );
    assert_eq!(host.counter(tokens), 14);
    assert_eq!(
        host.counter("tollgate_requests_total.client=team.outcome=admitted"),
        3
    );
    // Both settlements reached the record, and the request that got no answer gave its
    // whole estimate back: a new request sees what the first saw, less the 12 tokens each of
    // the first two answers used.
    admitted_json(&host, &mut Exchange::new(Some(gw.clone())));
    assert_eq!(remaining(&host), first - 24);
}

#[test]
fn the_root_tick_writes_a_busy_workers_batch() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(r#","tokens_per_minute":1000"#));
    admitted_json(&host, &mut Exchange::new(Some(gw.clone())));
    let _busy = Exchange::new(Some(gw.clone()));
    admitted_json(&host, &mut Exchange::new(Some(gw.clone())));
    let requests = "tollgate_requests_total.client=team.outcome=admitted";
    assert_eq!(host.counter(requests), 1);
    gw.on_tick(&host);
    assert_eq!(host.counter(requests), 2);
    // Nothing left: the next tick writes nothing.
    host.take_calls();
    gw.on_tick(&host);
    assert!(!host.take_calls().contains(&"increment"));
}

#[test]
fn a_refused_request_strips_nothing_and_is_answered() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &logged(&one_provider("")));
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 100);
    host.request
        .borrow_mut()
        .retain(|(n, _)| n != b"authorization");
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let calls = host.take_calls();
    assert_eq!(
        calls,
        vec![
            "get_headers",
            "now",
            // tollgate_refusals_total{reason="invalid_api_key"}, defined on its first use.
            "define_metric",
            "increment",
            // The access log's outcome and reason.
            "set_property",
            "set_property",
            "send_reply",
            // (The request counter waits for the worker's batch: see below.)
        ]
    );
    ex.on_log(&host);
    assert_eq!(host.replies.borrow()[0].status, 401);
    assert_eq!(
        host.counter(
            "tollgate_refusals_total.client=_anonymous.model=_default.reason=invalid_api_key"
        ),
        1
    );
    assert_eq!(
        log_record(&host),
        [("outcome", "unauthorized"), ("reason", "invalid_api_key")]
    );
    // Whatever follows stays held: nothing of this request goes upstream.
    assert_eq!(ex.on_request_body(&host, 100, false), Action::Pause);
    assert_eq!(ex.on_request_trailers(&host), Action::Pause);
    assert!(!ex.forwarded());
}

#[test]
fn a_routed_body_that_ends_with_trailers_is_decided_then_forwarded() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &routed());
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 0);
    host.request
        .borrow_mut()
        .retain(|(n, _)| n != b"content-length");
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    // Held, and not edited yet: the stripping is part of the one write that forwards it.
    assert_eq!(header_edits(&host), 0);
    *host.request_body.borrow_mut() = br#"{"model":"fast","stream":true}"#.to_vec();
    assert_eq!(ex.on_request_body(&host, 10, false), Action::Pause);
    assert_eq!(header_edits(&host), 0);
    assert_eq!(ex.on_request_trailers(&host), Action::Continue);
    assert!(ex.forwarded());
    // Forwarded: the client's credentials and route header are gone, the route and the first
    // provider's key are set.
    assert_eq!(
        host.request_header("x-tollgate-route").as_deref(),
        Some("r1")
    );
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    assert_eq!(host.request_header("x-api-key"), None);
    assert_eq!(host.reroutes.get(), 1);
    let body = String::from_utf8(host.request_body.borrow().clone()).unwrap();
    assert!(body.contains(r#""include_usage":true"#), "{body}");
}

#[test]
fn a_routed_stream_asks_for_its_usage_in_the_write_that_forwards_it() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &routed());
    // A first request defines the series.
    routed_admission(&host, &mut Exchange::new(Some(gw.clone())), "gpt-4.1", 10);
    let mut ex = Exchange::new(Some(gw));
    sdk_request(&host, 40);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let body = br#"{"model":"gpt-4.1","stream":true,"messages":[]}"#;
    *host.request_body.borrow_mut() = body.to_vec();
    host.take_calls();
    assert_eq!(
        ex.on_request_body(&host, body.len(), true),
        Action::Continue
    );
    // The body is read once; its new length is one more header of the one write; the new body
    // replaces exactly the old one.
    assert_eq!(
        host.take_calls(),
        [
            "get_body",
            "get_shared_data",
            "set_shared_data",
            "set_headers",
            "replace_body",
            "clear_route_cache"
        ]
    );
    let sent = host.request_body.borrow().clone();
    let text = String::from_utf8(sent.clone()).unwrap();
    assert!(text.contains(r#""include_usage":true"#), "{text}");
    assert!(
        text.ends_with("]}") && text.matches("\"model\"").count() == 1,
        "{text}"
    );
    assert_eq!(
        host.request_header("content-length"),
        Some(sent.len().to_string())
    );
}

#[test]
fn headers_then_trailers_without_a_body_is_refused() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &routed());
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 0);
    host.request
        .borrow_mut()
        .retain(|(n, _)| n != b"content-length");
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    assert_eq!(ex.on_request_trailers(&host), Action::Pause);
    assert_eq!(host.replies.borrow()[0].status, 400);
    assert!(!ex.forwarded());
}

#[test]
fn a_model_off_the_allow_list_is_refused_whatever_the_framing() {
    for with_trailers in [false, true] {
        let host = FakeHost::new(NOW, &[]);
        let gw = gateway(&host, &logged(&routed()));
        let mut ex = Exchange::new(Some(gw));
        chat_request(&host, 20);
        assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
        *host.request_body.borrow_mut() = br#"{"model":"o1"}"#.to_vec();
        let action = if with_trailers {
            assert_eq!(ex.on_request_body(&host, 14, false), Action::Pause);
            ex.on_request_trailers(&host)
        } else {
            ex.on_request_body(&host, 14, true)
        };
        assert_eq!(action, Action::Pause);
        assert_eq!(host.replies.borrow()[0].status, 403);
        assert_eq!(
            log_record(&host),
            [
                ("client", "team"),
                ("model", "o1"),
                ("outcome", "invalid"),
                ("reason", "model_not_allowed")
            ]
        );
        assert!(!ex.forwarded());
    }
}

#[test]
fn a_body_arriving_while_the_limiter_is_asked_is_held() {
    let host = FakeHost::new(NOW, &[]);
    let json = one_provider("").replace(
        r#""upstream""#,
        r#""limiter":{"backend":"redis","cluster":"webdis","authority":"webdis","on_error":"deny"},"upstream""#,
    );
    let gw = gateway(&host, &json);
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 10);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    assert_eq!(host.callouts.borrow().len(), 1);
    // Held, and not edited yet: the stripping is part of the one write that forwards it.
    assert_eq!(header_edits(&host), 0);
    assert_eq!(ex.on_request_body(&host, 10, false), Action::Pause);
    assert_eq!(ex.on_request_body(&host, 10, true), Action::Pause);
    assert_eq!(ex.on_request_trailers(&host), Action::Pause);
    assert!(!ex.forwarded());
    *host.call_response.borrow_mut() = (
        pairs(&[(":status", "200")]),
        br#"{"EVAL":[1,1,60000]}"#.to_vec(),
    );
    ex.on_callout(&host, 1, 1);
    assert!(ex.forwarded());
    assert_eq!(host.resumed.get(), 1);
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
}

#[test]
fn each_sse_chunk_costs_one_host_call() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(""));
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 100);
    assert_eq!(ex.on_request_headers(&host, false), Action::Continue);
    provider_response(&host, "text/event-stream");
    ex.on_response_headers(&host);
    host.take_calls();
    for _ in 0..5 {
        *host.response_chunk.borrow_mut() =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n".to_vec();
        let n = host.response_chunk.borrow().len();
        assert_eq!(ex.on_response_body(&host, n, false), Action::Continue);
        assert_eq!(host.take_calls(), vec!["get_body"]);
    }
}

#[test]
fn a_failed_host_call_never_forwards() {
    // The key alone is one replace; the key and headers to strip are one write of the map.
    for (call, strip) in [("replace_header", false), ("set_headers", true)] {
        let host = FakeHost::new(NOW, &[]);
        let gw = gateway(&host, &one_provider(""));
        let mut ex = Exchange::new(Some(gw));
        if strip {
            chat_request(&host, 100);
        } else {
            sdk_request(&host, 100);
        }
        host.fail.borrow_mut().push(call);
        assert_eq!(ex.on_request_headers(&host, false), Action::Pause, "{call}");
        assert!(host.take_calls().contains(&call));
        assert!(!ex.forwarded());
        assert_eq!(host.replies.borrow()[0].status, 500);
        ex.on_log(&host);
        assert_eq!(
            host.counter("tollgate_requests_total.client=team.outcome=error"),
            1
        );
        assert_eq!(
            host.counter("tollgate_requests_total.client=team.outcome=admitted"),
            0
        );
    }
}

/// A rule with a fallback, as the demo's `gpt-4.1`.
fn with_fallback() -> String {
    format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{}"}}],
            "providers":[{{"name":"relay","cluster":"relay","api_key_env":"K"}},
                         {{"name":"backup","cluster":"backup","api_key_env":"B"}}],
            "models":[{{"match":"gpt-4.1","providers":["relay","backup"]}}]}}"#,
        sha(KEY)
    )
}

/// One routed JSON exchange through both roles, its first attempt answered: the host calls of
/// each phase.
fn routed_json(
    host: &FakeHost,
    ex: &mut Exchange,
    upstream: &Rc<tollgate_core::attempt::Upstream>,
) -> Vec<Vec<&'static str>> {
    use tollgate_core::attempt::AttemptExchange;
    sdk_request(host, 33);
    host.take_calls();
    assert_eq!(ex.on_request_headers(host, false), Action::Pause);
    let headers = host.take_calls();
    *host.request_body.borrow_mut() = br#"{"model":"gpt-4.1","messages":[]}"#.to_vec();
    assert_eq!(ex.on_request_body(host, 33, true), Action::Continue);
    let body = host.take_calls();
    // Envoy's router numbers the attempt, and its upstream filter runs.
    host.request
        .borrow_mut()
        .push((b"x-envoy-attempt-count".to_vec(), b"1".to_vec()));
    let mut attempt = AttemptExchange::new(upstream.clone());
    assert_eq!(attempt.on_request_headers(host, false), Action::Continue);
    let attempt_headers = host.take_calls();
    provider_response(host, "application/json");
    assert_eq!(attempt.on_response_headers(host), Action::Continue);
    let attempt_response = host.take_calls();
    // The router adds its count to the response (`include_attempt_count_in_response`).
    host.response
        .borrow_mut()
        .push((b"x-envoy-attempt-count".to_vec(), b"1".to_vec()));
    assert_eq!(ex.on_response_headers(host), Action::Continue);
    let response = host.take_calls();
    let (response_body, log) = usage_answer_and_log(host, ex);
    vec![
        headers,
        body,
        attempt_headers,
        attempt_response,
        response,
        response_body,
        log,
    ]
}

#[test]
fn under_load_a_routed_request_costs_fourteen_host_calls_in_both_roles() {
    use tollgate_core::attempt::Upstream;
    // The budget of issue #16 for body routing, stated (docs/benchmark.md "Host calls").
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &with_fallback());
    let config =
        Config::parse(with_fallback().as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let upstream = Rc::new(Upstream::configure(&host, config).unwrap());
    // The upstream role defines no metric (the listener role counts its attempts).
    assert!(host.take_calls().is_empty());
    // A first exchange defines the series.
    routed_json(&host, &mut Exchange::new(Some(gw.clone())), &upstream);
    let relay = "tollgate_upstream_requests_total.provider=relay.model=gpt-4_1";
    assert_eq!(host.counter(relay), 1);

    // Another request is in flight while this one runs from start to end.
    let other = Exchange::new(Some(gw.clone()));
    let calls = routed_json(&host, &mut Exchange::new(Some(gw.clone())), &upstream);
    println!("routed, under load: {calls:?}");
    assert_eq!(
        calls,
        [
            // Listener, request headers: read them and the clock; the request waits for its
            // body, unedited.
            vec!["get_headers", "now"],
            // Listener, body: read it, the budget record read and written, one write of the
            // headers (the client's key out; the route and the first provider's key in), and
            // the route picked again.
            vec![
                "get_body",
                "get_shared_data",
                "set_shared_data",
                "set_headers",
                "clear_route_cache"
            ],
            // Upstream role, the attempt's headers: read them; the listener left nothing to do.
            vec!["get_headers"],
            // Upstream role, the attempt's response: its status (a success is not recorded).
            vec!["get_header"],
            // Listener, response headers: read and written at once; Envoy's attempt count says
            // one attempt, so the attempt log is not read.
            vec!["get_headers", "set_headers"],
            // Listener, the body with its usage.
            vec!["get_body"],
            // Listener, log: the clock and the duration histogram.
            vec!["now", "record"],
        ]
    );
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 14);
    // The provider got its key and the route; the client's key and Envoy's count stay home.
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    assert_eq!(
        host.request_header("x-tollgate-route").as_deref(),
        Some("r0")
    );
    assert_eq!(host.response_header("x-envoy-attempt-count"), None);
    // The attempt is counted when the worker's batch is written.
    drop(other);
    gw.on_tick(&host);
    assert_eq!(host.counter(relay), 2);
    assert_eq!(
        host.counter("tollgate_upstream_requests_total.provider=backup.model=gpt-4_1"),
        0
    );
}

#[test]
fn a_routed_request_and_its_attempt_in_host_calls() {
    use tollgate_core::attempt::{AttemptExchange, Upstream};
    // An SDK's request (its key, and nothing else to strip), routed on its body's model: the
    // host calls of its headers and of its body.
    let admit = |host: &FakeHost, ex: &mut Exchange| {
        sdk_request(host, 40);
        host.take_calls();
        assert_eq!(ex.on_request_headers(host, false), Action::Pause);
        let headers = host.take_calls();
        *host.request_body.borrow_mut() = br#"{"model":"gpt-4.1","messages":[]}"#.to_vec();
        assert_eq!(ex.on_request_body(host, 33, true), Action::Continue);
        (headers, host.take_calls())
    };
    // The access log's properties are opt-in: three more host calls when they are on.
    let host = FakeHost::new(NOW, &[]);
    let mut ex = Exchange::new(Some(gateway(&host, &logged(&routed()))));
    let (_, logged_body) = admit(&host, &mut ex);
    assert_eq!(
        log_record(&host),
        [
            ("client", "team"),
            ("model", "gpt-4.1"),
            ("outcome", "admitted")
        ]
    );

    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &routed());
    let mut ex = Exchange::new(Some(gw));
    let (headers, body) = admit(&host, &mut ex);
    println!("headers {headers:?}\nbody {body:?}");
    // The body's six include the client's request counter, defined on its first use (its
    // increment waits for the worker's batch).
    assert_eq!((headers.len(), body.len()), (2, 6));
    assert_eq!(logged_body.len(), body.len() + 3);
    assert_eq!(log_record(&host), []);

    // The upstream role's attempt on the same request, on a virtual host without Envoy's
    // count on the response.
    let config = Config::parse(routed().as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let upstream = Rc::new(Upstream::configure(&host, config).unwrap());
    host.request
        .borrow_mut()
        .push((b"x-envoy-attempt-count".to_vec(), b"1".to_vec()));
    let mut attempt = AttemptExchange::new(upstream);
    assert_eq!(attempt.on_request_headers(&host, false), Action::Continue);
    assert_eq!(host.take_calls(), ["get_headers"]);
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    // The provider fails: the attempt records itself with its status (one host call more).
    *host.response.borrow_mut() = pairs(&[(":status", "503")]);
    assert_eq!(attempt.on_response_headers(&host), Action::Continue);
    assert_eq!(host.take_calls(), ["get_header", "set_property"]);
    assert_eq!(
        host.properties.borrow().get("tollgate_attempts").cloned(),
        Some(b"0.0.0=503".to_vec())
    );

    // The listener role reads the attempt log when the response is not one attempt's success
    // (one property read), once: not again at the log.
    *host.response.borrow_mut() = pairs(&[(":status", "503"), ("content-type", "text/plain")]);
    assert_eq!(ex.on_response_headers(&host), Action::Continue);
    let response = host.take_calls();
    println!("response {response:?}");
    assert_eq!(response.iter().filter(|c| **c == "property").count(), 1);
    ex.on_log(&host);
    assert!(!host.take_calls().contains(&"property"));
    assert_eq!(
        host.counter("tollgate_upstream_requests_total.provider=relay.model=gpt-4_1"),
        1
    );
    assert_eq!(
        host.counter("tollgate_upstream_errors_total.provider=relay.status=503"),
        1
    );
}

#[test]
fn a_fallback_reads_the_attempt_log_and_the_listener_counts_it() {
    use tollgate_core::attempt::{AttemptExchange, Upstream};
    let json = format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{}"}}],
            "providers":[{{"name":"relay","cluster":"relay","api_key_env":"K"}},
                         {{"name":"backup","cluster":"backup","api_key_env":"K"}}],
            "models":[{{"match":"gpt-4.1","providers":["relay","backup"]}}]}}"#,
        sha(KEY)
    );
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &logged(&json));
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let upstream = Rc::new(Upstream::configure(&host, config).unwrap());
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 33);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    *host.request_body.borrow_mut() = br#"{"model":"gpt-4.1","messages":[]}"#.to_vec();
    assert_eq!(ex.on_request_body(&host, 33, true), Action::Continue);
    for (n, status) in [("1", "500"), ("2", "200")] {
        host.request
            .borrow_mut()
            .retain(|(name, _)| name != b"x-envoy-attempt-count");
        host.request
            .borrow_mut()
            .push((b"x-envoy-attempt-count".to_vec(), n.as_bytes().to_vec()));
        let mut attempt = AttemptExchange::new(upstream.clone());
        host.take_calls();
        assert_eq!(attempt.on_request_headers(&host, false), Action::Continue);
        // The first attempt starts the log; the fallback reads it first.
        let reads = host
            .take_calls()
            .iter()
            .filter(|c| **c == "property")
            .count();
        assert_eq!(reads, usize::from(n == "2"));
        *host.response.borrow_mut() = pairs(&[(":status", status)]);
        attempt.on_response_headers(&host);
    }
    assert_eq!(
        host.properties.borrow().get("tollgate_attempts").cloned(),
        Some(b"0.0.0=500,0.1.1".to_vec())
    );
    *host.response.borrow_mut() =
        pairs(&[(":status", "200"), ("content-type", "application/json")]);
    ex.on_response_headers(&host);
    // The access log names the provider whose answer the client gets: the last attempt's.
    assert!(log_record(&host).contains(&("provider", "backup")));
    // The counts go to the worker's batch, written as the exchange ends.
    ex.on_log(&host);
    for (name, n) in [
        (
            "tollgate_upstream_requests_total.provider=relay.model=gpt-4_1",
            1,
        ),
        (
            "tollgate_upstream_requests_total.provider=backup.model=gpt-4_1",
            1,
        ),
        (
            "tollgate_fallbacks_total.model=gpt-4_1.from=relay.to=backup",
            1,
        ),
        (
            "tollgate_upstream_errors_total.provider=relay.status=500",
            1,
        ),
        (
            "tollgate_upstream_errors_total.provider=backup.status=200",
            0,
        ),
    ] {
        assert_eq!(host.counter(name), n, "{name}");
    }
}

fn priced() -> String {
    routed().replace(
        r#""models":[{"match""#,
        r#""prices":[{"model":"gpt-4.1","input_per_million_tokens":2,"cached_input_per_million_tokens":0.5,"output_per_million_tokens":8},
                     {"model":"deepseek-chat","input_per_million_tokens":0.28,"output_per_million_tokens":0.42}],
            "models":[{"match""#,
    )
}

/// A routed request for `model` with `body` as the provider's answer: the exchange from its
/// headers to its log.
fn routed_exchange(
    host: &FakeHost,
    gw: &Rc<Gateway>,
    model: &str,
    content_type: &str,
    body: &[u8],
) {
    let mut ex = Exchange::new(Some(gw.clone()));
    sdk_request(host, 40);
    assert_eq!(ex.on_request_headers(host, false), Action::Pause);
    *host.request_body.borrow_mut() =
        format!(r#"{{"model":"{model}","messages":[]}}"#).into_bytes();
    let len = host.request_body.borrow().len();
    assert_eq!(ex.on_request_body(host, len, true), Action::Continue);
    provider_response(host, content_type);
    assert_eq!(ex.on_response_headers(host), Action::Continue);
    *host.response_chunk.borrow_mut() = body.to_vec();
    assert_eq!(
        ex.on_response_body(host, body.len(), true),
        Action::Continue
    );
    ex.on_log(host);
}

#[test]
fn spend_is_counted_at_the_billed_model_price_with_cached_and_reasoning_tokens() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &logged(&priced()));
    // 1000 in (600 cached), 500 out (200 reasoning): 400 x 2 + 600 x 0.5 + 500 x 8 = 5100.
    routed_exchange(
        &host,
        &gw,
        "gpt-4.1",
        "application/json",
        br#"{"usage":{"prompt_tokens":1000,"completion_tokens":500,"prompt_tokens_details":{"cached_tokens":600},"completion_tokens_details":{"reasoning_tokens":200}}}"#,
    );
    assert_eq!(
        host.counter("tollgate_spend_micros_total.client=team.model=gpt-4_1"),
        5100
    );
    // The access log carries the charge, set in the log callback (which Envoy runs before
    // the configured access logs).
    assert!(log_record(&host).contains(&("cost_micros", "5100")));
    // `fast` is billed as deepseek-chat: 3 x 0.28 + 7 x 0.42 = 3.78, charged 4.
    let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
    routed_exchange(&host, &gw, "fast", "text/event-stream", stream.as_bytes());
    assert_eq!(
        host.counter("tollgate_spend_micros_total.client=team.model=deepseek-chat"),
        4
    );
    routed_exchange(&host, &gw, "fast", "text/event-stream", stream.as_bytes());
    assert_eq!(
        host.counter("tollgate_spend_micros_total.client=team.model=deepseek-chat"),
        8
    );
}

/// A routed request for `model` with `max_tokens`, up to its decision; the host calls it made.
fn routed_admission(host: &FakeHost, ex: &mut Exchange, model: &str, max_tokens: u64) -> usize {
    sdk_request(host, 40);
    host.take_calls();
    assert_eq!(ex.on_request_headers(host, false), Action::Pause);
    *host.request_body.borrow_mut() =
        format!(r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[]}}"#).into_bytes();
    let len = host.request_body.borrow().len();
    ex.on_request_body(host, len, true);
    host.take_calls().len()
}

#[test]
fn a_daily_money_budget_refuses_exactly_at_the_budget_with_no_extra_host_call() {
    // Output at $1 per million tokens: a micro-unit per token; input free. Requests of
    // max_tokens 10 reserve 10 micro-units and, answering 10 tokens, cost exactly that.
    let prices = r#""prices":[{"model":"gpt-4.1","input_per_million_tokens":0,"output_per_million_tokens":1}],"models""#;
    let plain = routed().replace(r#""models":[{"match""#, &format!(r#"{prices}:[{{"match""#));
    let budgeted = plain.replace(
        r#""models":["gpt-4.1","fast"]"#,
        r#""models":["gpt-4.1","fast"],"budgets":[{"window":"day","money":0.00005},{"window":"month","requests":1000,"tokens":100000}]"#,
    )
    .replacen(
        r#""providers""#,
        r#""limiter":{"backend":"local","budgets_on_restart":"reset"},"providers""#,
        1,
    );
    let host = FakeHost::new(NOW, &[]);
    let gw_plain = gateway(&host, &plain);
    let mut ex = Exchange::new(Some(gw_plain));
    let calls_plain = routed_admission(&host, &mut ex, "gpt-4.1", 10);

    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &budgeted);
    let usage = br#"{"usage":{"prompt_tokens":9,"completion_tokens":10}}"#;
    for i in 0..5 {
        let mut ex = Exchange::new(Some(gw.clone()));
        let calls = routed_admission(&host, &mut ex, "gpt-4.1", 10);
        assert!(ex.forwarded(), "request {i}");
        if i == 0 {
            assert_eq!(calls, calls_plain, "two more budgets, no more host calls");
        }
        provider_response(&host, "application/json");
        ex.on_response_headers(&host);
        *host.response_chunk.borrow_mut() = usage.to_vec();
        ex.on_response_body(&host, usage.len(), true);
        ex.on_log(&host);
    }
    assert_eq!(
        host.counter("tollgate_spend_micros_total.client=team.model=gpt-4_1"),
        50
    );
    // The client's budget endpoint agrees with the metric, and is not counted.
    let mut ex = Exchange::new(Some(gw.clone()));
    *host.request.borrow_mut() = pairs(&[
        (":method", "GET"),
        (":path", "/v1/tollgate/budgets"),
        ("authorization", &format!("Bearer {KEY}")),
    ]);
    host.take_calls();
    assert_eq!(ex.on_request_headers(&host, true), Action::Pause);
    let calls = host.take_calls();
    assert_eq!(calls.iter().filter(|c| **c == "get_shared_data").count(), 1);
    let reply = host.replies.borrow().last().cloned().unwrap();
    assert_eq!(reply.status, 200);
    let b: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(b["client"], "team");
    assert_eq!(b["currency"], "USD");
    assert_eq!(b["budgets"][0]["window"], "day");
    assert_eq!(b["budgets"][0]["money"]["used"], 50);
    assert_eq!(b["budgets"][0]["money"]["remaining"], 0);
    assert_eq!(b["budgets"][0]["requests"]["used"], 5);
    assert_eq!(b["budgets"][0]["tokens"]["used"], 5 * 19);
    assert_eq!(b["budgets"][1]["window"], "month");
    assert_eq!(b["budgets"][1]["requests"]["remaining"], 995);
    assert_eq!(b["budgets"][0]["resets_at"], NOW / 1000 + 57_600);
    assert_eq!(b["per_minute"]["requests"]["used"], 5);
    ex.on_log(&host);

    // 50 of 50 micro-units used: the sixth is refused, in OpenAI's shape.
    let mut ex = Exchange::new(Some(gw.clone()));
    routed_admission(&host, &mut ex, "gpt-4.1", 10);
    assert!(!ex.forwarded());
    ex.on_log(&host);
    let reply = host.replies.borrow().last().cloned().unwrap();
    assert_eq!(reply.status, 429);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    let header = |n: &str| {
        reply
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("x-tollgate-budget").as_deref(),
        Some("money-per-day")
    );
    assert_eq!(
        header("x-tollgate-budget-limit").as_deref(),
        Some("0.00005")
    );
    assert_eq!(header("x-tollgate-budget-remaining").as_deref(), Some("0"));
    // NOW is 2027-01-15 08:00 UTC: the day resets in 16 hours.
    assert_eq!(header("x-tollgate-budget-reset").as_deref(), Some("57600"));
    assert_eq!(header("x-should-retry").as_deref(), Some("false"));
    assert_eq!(
        host.counter("tollgate_requests_total.client=team.outcome=rate_limited"),
        1
    );
}

#[test]
fn budgets_in_redis_are_one_callout_and_settle_through_the_root_tick() {
    let host = FakeHost::new(NOW, &[]);
    let json = priced()
        .replace(
            r#""models":["gpt-4.1","fast"]"#,
            r#""models":["gpt-4.1","fast"],"budgets":[{"window":"day","money":1}]"#,
        )
        .replacen(
            r#""providers""#,
            r#""limiter":{"backend":"redis","cluster":"webdis"},"providers""#,
            1,
        );
    let gw = gateway(&host, &json);
    assert_eq!(gw.tick_period_ms(), 100);
    let mut ex = Exchange::new(Some(gw.clone()));
    routed_admission(&host, &mut ex, "gpt-4.1", 100);
    let call = host.callouts.borrow().last().cloned().unwrap();
    let body = String::from_utf8(call.body.clone()).unwrap();
    assert!(body.contains("tollgate%3Abudget%3Ateam%3Aday%3A"), "{body}");
    // Admitted: the three day counters, then the minute's requests.
    *host.call_response.borrow_mut() = (
        pairs(&[(":status", "200")]),
        br#"{"EVAL":[1,0,1,200,810,1]}"#.to_vec(),
    );
    ex.on_callout(&host, 1, 1);
    assert!(ex.forwarded());
    provider_response(&host, "application/json");
    ex.on_response_headers(&host);
    let usage = br#"{"usage":{"prompt_tokens":100,"completion_tokens":50}}"#;
    *host.response_chunk.borrow_mut() = usage.to_vec();
    ex.on_response_body(&host, usage.len(), true);
    ex.on_log(&host);
    // 100 x 2 + 50 x 8 = 600 micro-units.
    assert_eq!(
        host.counter("tollgate_spend_micros_total.client=team.model=gpt-4_1"),
        600
    );
    host.callouts.borrow_mut().clear();
    gw.on_tick(&host);
    let settle = host.callouts.borrow();
    // The budgets' adjustments, then the day's spend record for `tollgate spend`.
    assert_eq!(settle.len(), 2);
    let body = String::from_utf8(settle[0].body.clone()).unwrap();
    assert!(body.contains("%3Amoney"), "{body}");
    assert!(body.contains("%3Atokens"), "{body}");
    let body = String::from_utf8(settle[1].body.clone()).unwrap();
    let day = NOW / 86_400_000;
    assert!(
        body.contains(&format!(
            "/tollgate%3Aspend%3A{day}%3Ateam%3Agpt-4%2E1/600/"
        )),
        "{body}"
    );

    // Refused by the money counter (index 3): insufficient_quota.
    drop(settle);
    let mut ex = Exchange::new(Some(gw));
    routed_admission(&host, &mut ex, "gpt-4.1", 100);
    *host.call_response.borrow_mut() = (
        pairs(&[(":status", "200")]),
        br#"{"EVAL":[0,3,999990]}"#.to_vec(),
    );
    ex.on_callout(&host, 2, 1);
    assert!(!ex.forwarded());
    let reply = host.replies.borrow().last().cloned().unwrap();
    assert_eq!(reply.status, 429);
    assert!(String::from_utf8_lossy(&reply.body).contains("insufficient_quota"));
}

// ---------------------------------------------------------------------------------------------
// Mesh identity as a credential: a client known by its peer certificate's SPIFFE ID is admitted
// and limited like a keyed one, a key always wins over the certificate, nothing a client writes
// in a header can stand in for the certificate, and a request with a key pays no host call for
// any of it.

const KEYED: &str = "sk-keyed-team";
const MESH: &str = "spiffe://tollgate.test/ns/team-a/sa/app";
/// How the fake host names the attribute Envoy serves as `connection.uri_san_peer_certificate`.
const PEER: &str = "connection.uri_san_peer_certificate";

/// A client known by its certificate (two requests a minute) and a keyed one, one provider
/// speaking `api`.
fn mesh_gateway(host: &FakeHost, api: &str) -> Rc<Gateway> {
    let json = format!(
        r#"{{"clients":[
              {{"name":"mesh-a","identities":["{MESH}"],"requests_per_minute":2}},
              {{"name":"keyed","key_sha256":"{}"}}],
            "upstream":{{"api_key_env":"K","api":"{api}"}}}}"#,
        sha(KEYED)
    );
    gateway(host, &json)
}

const CHAT: &str = "/v1/chat/completions";

fn mesh_request(host: &FakeHost, path: &str, extra: &[(&str, &str)]) {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/json"),
        ("content-length", "2"),
    ];
    headers.extend_from_slice(extra);
    *host.request.borrow_mut() = pairs(&headers);
}

fn set_peer(host: &FakeHost, id: Option<&str>) {
    let mut properties = host.properties.borrow_mut();
    properties.remove(PEER);
    if let Some(id) = id {
        properties.insert(PEER.to_string(), id.as_bytes().to_vec());
    }
}

/// `tollgate_requests_total` of the certificate client with this outcome.
fn mesh_a(host: &FakeHost, outcome: &str) -> u64 {
    host.counter(&format!(
        "tollgate_requests_total.client=mesh-a.outcome={outcome}"
    ))
}

/// Runs one request's headers; the status of the local reply, or 200 when it was forwarded.
fn mesh_status(host: &FakeHost, gw: &Rc<Gateway>) -> u16 {
    host.replies.borrow_mut().clear();
    let mut ex = Exchange::new(Some(gw.clone()));
    let status = match ex.on_request_headers(host, false) {
        Action::Continue => {
            assert!(ex.forwarded());
            200
        }
        Action::Pause => host.replies.borrow()[0].status,
    };
    // The exchange ends (the worker writes its counters).
    ex.on_log(host);
    status
}

#[test]
fn a_client_is_admitted_by_its_certificate_and_limited_like_any_other() {
    let host = FakeHost::new(NOW, &[]);
    let gw = mesh_gateway(&host, "openai");
    set_peer(&host, Some(MESH));
    mesh_request(&host, CHAT, &[]);
    assert_eq!(mesh_status(&host, &gw), 200);
    // One host call more than a keyed request: the attribute, read once.
    let calls = host.take_calls();
    assert_eq!(calls.iter().filter(|c| **c == "property").count(), 1);
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    // (The fake host's request now carries the provider's key: start each one afresh.)
    mesh_request(&host, CHAT, &[]);
    assert_eq!(mesh_status(&host, &gw), 200);
    mesh_request(&host, CHAT, &[]);
    assert_eq!(mesh_status(&host, &gw), 429, "requests_per_minute 2");
    assert_eq!(mesh_a(&host, "admitted"), 2);
    assert_eq!(mesh_a(&host, "rate_limited"), 1);
}

#[test]
fn anthropic_clients_use_the_same_credential() {
    let host = FakeHost::new(NOW, &[]);
    let gw = mesh_gateway(&host, "anthropic");
    set_peer(&host, Some(MESH));
    mesh_request(
        &host,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
    );
    assert_eq!(mesh_status(&host, &gw), 200);
    assert_eq!(
        host.request_header("x-api-key").as_deref(),
        Some("sk-provider")
    );
    assert_eq!(mesh_a(&host, "admitted"), 1);
}

#[test]
fn a_request_with_a_key_is_judged_by_its_key_and_reads_no_certificate() {
    let host = FakeHost::new(NOW, &[]);
    let gw = mesh_gateway(&host, "openai");
    set_peer(&host, Some(MESH));
    mesh_request(
        &host,
        CHAT,
        &[("authorization", &format!("Bearer {KEYED}"))],
    );
    host.take_calls();
    assert_eq!(mesh_status(&host, &gw), 200);
    assert!(
        !host.take_calls().contains(&"property"),
        "a keyed request reads no attribute"
    );
    assert_eq!(
        host.counter("tollgate_requests_total.client=keyed.outcome=admitted"),
        1
    );
    // A wrong key over the mesh client's connection is refused, not admitted as the mesh client.
    mesh_request(&host, CHAT, &[("authorization", "Bearer sk-wrong")]);
    assert_eq!(mesh_status(&host, &gw), 401);
    mesh_request(&host, "/v1/messages", &[("x-api-key", "sk-wrong")]);
    assert_eq!(mesh_status(&host, &gw), 401);
    assert_eq!(mesh_a(&host, "admitted"), 0);
}

#[test]
fn nothing_but_the_connection_names_an_identity() {
    let host = FakeHost::new(NOW, &[]);
    let gw = mesh_gateway(&host, "openai");
    // No certificate (plain text or TLS without one), whatever the headers claim.
    set_peer(&host, None);
    for forged in [
        ("x-forwarded-client-cert", format!("URI={MESH}")),
        ("x-tollgate-identity", MESH.to_string()),
        ("x-spiffe-id", MESH.to_string()),
    ] {
        mesh_request(&host, CHAT, &[(forged.0, &forged.1)]);
        assert_eq!(mesh_status(&host, &gw), 401, "{}", forged.0);
    }
    // A certificate that is not exactly a configured identity.
    for near in [
        "spiffe://tollgate.test/ns/team-a/sa/app/",
        "spiffe://tollgate.test/ns/team-a/sa/ap",
        "spiffe://tollgate.test/ns/team-a/sa/app2",
        "SPIFFE://tollgate.test/ns/team-a/sa/app",
        "spiffe://other.test/ns/team-a/sa/app",
    ] {
        set_peer(&host, Some(near));
        mesh_request(&host, CHAT, &[]);
        assert_eq!(mesh_status(&host, &gw), 401, "{near}");
    }
    assert_eq!(mesh_a(&host, "admitted"), 0);
    assert_eq!(
        host.counter(
            "tollgate_refusals_total.client=_anonymous.model=_default.reason=invalid_api_key"
        ),
        8
    );
}

#[test]
fn a_failed_attribute_read_refuses_the_request() {
    let host = FakeHost::new(NOW, &[]);
    let gw = mesh_gateway(&host, "openai");
    set_peer(&host, Some(MESH));
    host.fail.borrow_mut().push("property");
    mesh_request(&host, CHAT, &[]);
    assert_eq!(mesh_status(&host, &gw), 500);
    assert_eq!(mesh_a(&host, "admitted"), 0);
}

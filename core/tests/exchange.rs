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

fn routed() -> String {
    format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{}","models":["gpt-4.1","fast"]}}],
            "providers":[{{"name":"relay","cluster":"relay","api_key_env":"K"}}],
            "models":[{{"match":"gpt-4.1","providers":["relay"]}},
                      {{"match":"fast","providers":["relay"],"upstream_model":"deepseek-chat"}}]}}"#,
        sha(KEY)
    )
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
    let gw = gateway(&host, &json);
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
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(r#","tokens_per_minute":1000"#));
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
    // The budget, stated (docs/benchmark.md "Host calls"): a change that adds a host call to
    // this path must say so here.
    assert_eq!(
        (
            request_calls.len(),
            response_calls.len(),
            body_calls.len(),
            log_calls.len()
        ),
        (11, 2, 7, 5),
        "host calls per phase"
    );
    // Four of them define a metric series on its first use in this VM, once (the client's
    // request counter, two token counters, the duration histogram). Four set the access log's
    // properties, one per field: client and outcome at admission, the two token counts with
    // the provider's usage.
    assert_eq!(all, 25);
    assert_eq!(
        log_record(&host),
        [
            ("client", "team"),
            ("outcome", "admitted"),
            ("prompt_tokens", "7"),
            ("completion_tokens", "5"),
        ]
    );
}

#[test]
fn a_refused_request_strips_nothing_and_is_answered() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(""));
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
            "increment"
        ]
    );
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
    // Stripped before the pause: the client's credentials and route header are gone.
    assert_eq!(host.request_header("authorization"), None);
    assert_eq!(host.request_header("x-tollgate-route"), None);
    assert_eq!(host.request_header("x-api-key"), None);
    *host.request_body.borrow_mut() = br#"{"model":"fast","stream":true}"#.to_vec();
    assert_eq!(ex.on_request_body(&host, 10, false), Action::Pause);
    assert_eq!(ex.on_request_trailers(&host), Action::Continue);
    assert!(ex.forwarded());
    assert_eq!(
        host.request_header("x-tollgate-route").as_deref(),
        Some("r1")
    );
    assert_eq!(host.reroutes.get(), 1);
    let body = String::from_utf8(host.request_body.borrow().clone()).unwrap();
    assert!(body.contains(r#""include_usage":true"#), "{body}");
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
        let gw = gateway(&host, &routed());
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
    // The client's key is gone before the pause.
    assert_eq!(host.request_header("authorization"), None);
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
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &one_provider(""));
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 100);
    host.fail.borrow_mut().push("replace_header");
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    assert!(!ex.forwarded());
    assert_eq!(host.replies.borrow()[0].status, 500);
    assert_eq!(
        host.counter("tollgate_requests_total.client=team.outcome=error"),
        1
    );
}

#[test]
fn a_routed_request_and_its_attempt_in_host_calls() {
    use tollgate_core::attempt::{AttemptExchange, Upstream};
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &routed());
    let mut ex = Exchange::new(Some(gw));
    chat_request(&host, 40);
    // An SDK's request: its key, and nothing else to strip.
    host.request
        .borrow_mut()
        .retain(|(n, _)| n != b"x-api-key" && n != b"x-tollgate-route");
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let headers = host.take_calls();
    *host.request_body.borrow_mut() = br#"{"model":"gpt-4.1","messages":[]}"#.to_vec();
    assert_eq!(ex.on_request_body(&host, 33, true), Action::Continue);
    let body = host.take_calls();
    println!("headers {headers:?}\nbody {body:?}");
    // The body's ten include the client's request counter, defined on its first use, and the
    // access log's client, model and outcome.
    assert_eq!((headers.len(), body.len()), (3, 10));
    assert_eq!(
        log_record(&host),
        [
            ("client", "team"),
            ("model", "gpt-4.1"),
            ("outcome", "admitted")
        ]
    );

    // The upstream role's attempt on the same request.
    let config = Config::parse(routed().as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let upstream = Rc::new(Upstream::configure(&host, config).unwrap());
    host.take_calls();
    host.request
        .borrow_mut()
        .push((b"x-envoy-attempt-count".to_vec(), b"1".to_vec()));
    let mut attempt = AttemptExchange::new(upstream);
    assert_eq!(attempt.on_request_headers(&host, false), Action::Continue);
    let attempt_calls = host.take_calls();
    println!("attempt {attempt_calls:?}");
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    assert_eq!(attempt_calls.len(), 3);
}

//! Quota leases through the whole exchange against the fake host: a request the lease covers
//! costs the local limiter's host calls and no callout; a request that finds the lease empty
//! waits for one lease call; prefetches and returns go out on the root tick; the worker's
//! breaker stops requests from waiting for a failing Webdis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::rc::Rc;

use tollgate_core::exchange::Exchange;
use tollgate_core::fake::{pairs, FakeHost};
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

/// 10 s into a minute window.
const NOW: u64 = 1_800_000_010_000;
const KEY: &str = "sk-lease-test";

fn config(limiter: &str) -> String {
    let sha = Digest::of_key(DigestKind::Sha256, KEY.as_bytes()).to_hex();
    format!(
        r#"{{"clients":[{{"name":"team","key_sha256":"{sha}","requests_per_minute":100}}],
            "upstream":{{"api_key_env":"K"}},"limiter":{limiter}}}"#
    )
}

const LEASES: &str = r#"{"backend":"redis","cluster":"webdis","on_error":"deny","timeout_ms":50,"leases":{"breaker_failures":2,"breaker_open_ms":1000}}"#;

fn gateway(host: &FakeHost, json: &str) -> Rc<Gateway> {
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let gw = Gateway::configure(host, config).unwrap();
    host.take_calls();
    Rc::new(gw)
}

fn request(host: &FakeHost) {
    *host.request.borrow_mut() = pairs(&[
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gw"),
        ("authorization", &format!("Bearer {KEY}")),
        ("content-type", "application/json"),
        ("content-length", "10"),
    ]);
}

fn answer(host: &FakeHost, body: &str) {
    *host.call_response.borrow_mut() = (pairs(&[(":status", "200")]), body.as_bytes().to_vec());
}

fn failed(host: &FakeHost) {
    *host.call_response.borrow_mut() = (Vec::new(), Vec::new());
}

fn callouts(host: &FakeHost) -> usize {
    host.callouts.borrow().len()
}

fn last_body(host: &FakeHost) -> String {
    String::from_utf8(host.callouts.borrow().last().unwrap().body.clone()).unwrap()
}

#[test]
fn a_request_the_lease_covers_costs_what_the_local_limiter_costs() {
    // The local limiter's request path, for comparison.
    let local = FakeHost::new(NOW, &[]);
    let gw = gateway(&local, &config(r#"{"backend":"local"}"#));
    let mut ex = Exchange::new(Some(gw));
    request(&local);
    assert_eq!(ex.on_request_headers(&local, false), Action::Continue);
    // (Less the request counter's definition on its first use in the VM.)
    let mut local_calls = local.take_calls();
    local_calls.retain(|c| *c != "define_metric");

    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &config(LEASES));
    assert_eq!(gw.tick_period_ms(), 20);
    // The first request finds no lease: it waits for one lease call.
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    let body = last_body(&host);
    let minute = NOW / 60_000;
    assert!(
        body.contains(&format!("rate%3A{}%3A{minute}", md5())),
        "{body}"
    );
    assert!(
        body.ends_with(&format!("/100/{}/1/1/10", (minute + 2) * 60_000 - NOW)),
        "{body}"
    );
    // Redis granted 5 (the request's own and 4 more).
    answer(&host, r#"{"EVAL":[1,5,0,5,0]}"#);
    ex.on_callout(&host, 1, 1);
    assert!(ex.forwarded());
    assert_eq!(host.resumed.get(), 1);
    host.take_calls();
    // The next one is admitted from the lease: no callout, the local limiter's host calls.
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    assert_eq!(ex.on_request_headers(&host, false), Action::Continue);
    let lease_calls = host.take_calls();
    assert_eq!(callouts(&host), 1);
    assert_eq!(
        lease_calls, local_calls,
        "the same host calls as the local limiter"
    );
    // 95 left in Redis, 3 held here.
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    assert_eq!(
        host.counter("tollgate_lease_fetches_total.kind=blocking.outcome=granted"),
        1
    );
    assert_eq!(
        host.counter("tollgate_lease_granted_total.kind=requests"),
        5
    );
    assert_eq!(
        host.counter("tollgate_limiter_calls_total.backend=redis.kind=lease"),
        1
    );
}

#[test]
fn prefetches_and_returns_go_out_on_the_root_tick() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &config(LEASES));
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    ex.on_request_headers(&host, false);
    answer(&host, r#"{"EVAL":[1,4,0,4,0]}"#);
    ex.on_callout(&host, 1, 1);
    // 3 held, last block 4: the next admission leaves 2 (half): a prefetch is queued.
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    assert_eq!(ex.on_request_headers(&host, false), Action::Continue);
    assert_eq!(callouts(&host), 1, "not sent by the request");
    gw.on_tick(&host);
    assert_eq!(callouts(&host), 2);
    assert!(last_body(&host).ends_with("/0/10"), "{}", last_body(&host));
    answer(&host, r#"{"EVAL":[1,20,0,24,0]}"#);
    gw.on_root_callout(&host, 2, 1);
    assert_eq!(
        host.counter("tollgate_lease_fetches_total.kind=prefetch.outcome=granted"),
        1
    );
    // Idle for idle_ms: what is held (22) goes back with the next settlement batch.
    host.now.set(NOW + 2_500);
    for _ in 0..10 {
        gw.on_tick(&host);
    }
    assert_eq!(callouts(&host), 3);
    let body = last_body(&host);
    assert!(
        body.ends_with(&format!("/1/rate%3A{}%3A{}/-22", md5(), NOW / 60_000)),
        "{body}"
    );
    assert_eq!(
        host.counter("tollgate_lease_returned_total.kind=requests"),
        22
    );
    // Granted (blocking 4 + prefetch 20) - returned = the two requests drawn from the lease.
    assert_eq!(
        host.counter("tollgate_lease_granted_total.kind=requests"),
        24
    );
    assert_eq!(
        host.counter("tollgate_limiter_calls_total.backend=redis.kind=settle"),
        1
    );
}

fn md5() -> String {
    Digest::of_key(DigestKind::Md5, KEY.as_bytes()).to_hex()
}

#[test]
fn the_breaker_stops_requests_waiting_for_a_failing_webdis_and_recovers() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &config(LEASES));
    // Two failed fetches (on_error deny: 503), then the breaker is open.
    for token in 1..=2 {
        let mut ex = Exchange::new(Some(gw.clone()));
        request(&host);
        assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
        failed(&host);
        ex.on_callout(&host, token, 0);
        assert_eq!(host.replies.borrow().last().unwrap().status, 503);
    }
    assert_eq!(host.counter("tollgate_lease_breaker_total.kind=open"), 1);
    // Open: refused at once (no callout, nothing to wait for).
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    assert_eq!(callouts(&host), 2);
    assert_eq!(host.replies.borrow().last().unwrap().status, 503);
    assert_eq!(
        host.counter("tollgate_limiter_errors_total.backend=redis.reason=circuit_open"),
        1
    );
    // After breaker_open_ms one probe goes out; Webdis answers: closed again.
    host.now.set(NOW + 1_000);
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    assert_eq!(ex.on_request_headers(&host, false), Action::Pause);
    assert_eq!(callouts(&host), 3);
    assert_eq!(
        host.counter("tollgate_lease_breaker_total.kind=half_open"),
        1
    );
    answer(&host, r#"{"EVAL":[1,3,0,3,0]}"#);
    ex.on_callout(&host, 3, 1);
    assert!(ex.forwarded());
    assert_eq!(host.counter("tollgate_lease_breaker_total.kind=closed"), 1);
}

#[test]
fn a_spent_window_is_refused_locally_until_the_recheck() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host, &config(LEASES));
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    ex.on_request_headers(&host, false);
    answer(&host, r#"{"EVAL":[0,0,0,100,0]}"#);
    ex.on_callout(&host, 1, 1);
    let reply = host.replies.borrow().last().cloned().unwrap();
    assert_eq!(reply.status, 429);
    // The next one: refused without a callout.
    let mut ex = Exchange::new(Some(gw.clone()));
    request(&host);
    ex.on_request_headers(&host, false);
    assert_eq!(callouts(&host), 1);
    assert_eq!(host.replies.borrow().last().unwrap().status, 429);
    assert_eq!(
        host.counter("tollgate_lease_fetches_total.kind=blocking.outcome=spent"),
        1
    );
    // Both requests are still open: the worker's batch is written on demand.
    gw.flush(&host);
    assert_eq!(
        host.counter("tollgate_requests_total.client=team.outcome=rate_limited"),
        2
    );
}

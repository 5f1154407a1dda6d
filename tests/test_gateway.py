"""End to end: a real Envoy (two workers) running tollgate.wasm in front of the mock provider.
What is asserted is what a client and the provider actually see."""

from __future__ import annotations

import re
import time

import pytest

import harness
from harness import PROVIDER_KEY, chat_body, default_plugin_config, md5_hex, sha256_hex

TEAM_A = "sk-team-a-5b3f1c0e9d7a"
TEAM_B = "sk-team-b-legacy-77c2"  # configured by MD5, as migrated from the older proxy
CLIENT_KEYS = (TEAM_A, TEAM_B)


def config(rpm_a: int = 100, rpm_b: int | None = None) -> dict:
    b = {"name": "team-b", "key_md5": md5_hex(TEAM_B)}
    if rpm_b is not None:
        b["requests_per_minute"] = rpm_b
    return default_plugin_config(
        [{"name": "team-a", "key_sha256": sha256_hex(TEAM_A), "requests_per_minute": rpm_a}, b],
        default_requests_per_minute=50,
    )


@pytest.fixture
def gw(start_gateway, mock):
    return start_gateway(config(), mock.url)


def assert_no_client_key(mock_requests):
    for r in mock_requests:
        blob = repr(r["headers"]) + r["body"]
        for key in CLIENT_KEYS:
            assert key not in blob, f"client key reached the provider: {r['path']}"


def test_admitted_request_reaches_provider_with_provider_key_only(gw, mock):
    r = gw.post(key=TEAM_A, body=chat_body(content="hello there"))
    assert r.status == 200, r.body
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] > 0

    seen = mock.requests()
    assert len(seen) == 1
    auth = [v for n, v in seen[0]["headers"] if n == "authorization"]
    assert auth == [f"Bearer {PROVIDER_KEY}"]
    assert seen[0]["path"] == "/v1/chat/completions"
    assert "hello there" in seen[0]["body"]
    assert_no_client_key(seen)


def test_md5_configured_client_is_accepted(gw, mock):
    r = gw.post(key=TEAM_B)
    assert r.status == 200, r.body
    assert r.header("x-ratelimit-limit-requests") == "50"  # the default limit
    assert_no_client_key(mock.requests())


def test_spoofed_internal_and_credential_headers_never_reach_the_provider(gw, mock):
    r = gw.post(
        key=TEAM_A,
        headers=[
            ("x-tollgate-client", "team-admin"),
            ("X-Tollgate-Route", "other-cluster"),
            ("x-tollgate-client", "again"),
            ("x-api-key", TEAM_A),
            ("api-key", TEAM_A),
            ("x-custom", "dropped"),
            ("openai-beta", "kept"),
        ],
    )
    assert r.status == 200, r.body
    (seen,) = mock.requests()
    names = [n for n, _ in seen["headers"]]
    assert not [n for n in names if n.startswith("x-tollgate-")], names
    assert "x-api-key" not in names and "api-key" not in names
    assert_no_client_key([seen])
    # Deny by default: only allow-listed headers reach the provider (docs/security.md).
    assert "x-custom" not in names
    assert ("openai-beta", "kept") in [tuple(h) for h in seen["headers"]]


UNAUTHORIZED_CASES = {
    "missing": [],
    "unknown key": [("authorization", "Bearer sk-not-a-client")],
    "wrong scheme": [("authorization", f"Basic {TEAM_A}")],
    "empty bearer": [("authorization", "Bearer ")],
    "key with a space": [("authorization", f"Bearer {TEAM_A} x")],
    "non-UTF-8 bytes": [("authorization", b"Bearer sk-\xff\xfe")],
    "two authorization headers": [
        ("authorization", f"Bearer {TEAM_A}"),
        ("authorization", f"Bearer {TEAM_A}"),
    ],
    "key in another header": [("x-api-key", TEAM_A)],
}


def test_every_key_failure_is_the_same_openai_401(gw, mock):
    answers = set()
    for case, headers in UNAUTHORIZED_CASES.items():
        r = harness.request(gw.url, "POST", "/v1/chat/completions", headers, chat_body())
        assert r.status == 401, case
        assert r.header("www-authenticate") == "Bearer", case
        assert r.header("content-type") == "application/json", case
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error", case
        assert err["code"] == "invalid_api_key", case
        assert err["param"] is None, case
        answers.add(r.body)
    assert len(answers) == 1, "the 401 body must not reveal which check failed"
    assert mock.requests() == [], "unauthenticated requests must not reach the provider"
    assert gw.counter("tollgate_requests_total", client="_anonymous", outcome="unauthorized") == len(
        UNAUTHORIZED_CASES
    )


def test_admitted_responses_carry_the_clients_budget_not_the_providers(gw):
    harness.wait_for_fresh_window()
    remaining = []
    for _ in range(3):
        r = gw.post(key=TEAM_A)
        assert r.status == 200
        assert r.header("x-ratelimit-limit-requests") == "100"
        assert re.fullmatch(r"\d+s|\d+ms|1m0s", r.header("x-ratelimit-reset-requests"))
        remaining.append(int(r.header("x-ratelimit-remaining-requests")))
        # The mock sends provider-account token headers; clients must not see them.
        assert r.header("x-ratelimit-limit-tokens") is None
        assert r.header("x-ratelimit-remaining-tokens") is None
    assert remaining == [99, 98, 97]


def test_over_the_limit_is_an_openai_429_and_not_forwarded(start_gateway, mock):
    gw = start_gateway(config(rpm_a=3), mock.url)
    harness.wait_for_fresh_window()
    statuses = [gw.post(key=TEAM_A).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = gw.post(key=TEAM_A)
    assert r.status == 429
    assert r.header("content-type") == "application/json"
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded"
    assert err["type"] == "requests"
    assert "team-a" in err["message"] and TEAM_A not in err["message"]
    assert r.header("x-ratelimit-limit-requests") == "3"
    assert r.header("x-ratelimit-remaining-requests") == "0"
    assert re.fullmatch(r"\d+s|1m0s", r.header("x-ratelimit-reset-requests"))
    retry = int(r.header("retry-after"))
    assert 1 <= retry <= 60
    assert len(mock.requests()) == 3
    # Another client's budget is its own.
    assert gw.post(key=TEAM_B).status == 200


def test_exactly_the_limit_is_admitted_under_concurrency_across_both_workers(start_gateway, mock):
    limit, connections, per_connection = 300, 32, 25
    gw = start_gateway(config(rpm_a=limit), mock.url)
    minute = harness.wait_for_fresh_window()
    statuses = harness.burst([gw], TEAM_A, connections, per_connection)
    assert time.time() // 60 == minute, "the burst crossed a minute boundary; rerun"

    assert statuses.count(200) == limit
    assert statuses.count(429) == connections * per_connection - limit
    assert len(mock.requests()) == limit
    # Both workers took connections, so the budget was shared through Envoy shared data.
    listener = f"listener.127.0.0.1_{gw.port}"
    per_worker = [gw.envoy_stat(f"{listener}.worker_{w}.downstream_cx_total") for w in (0, 1)]
    assert all(n > 0 for n in per_worker), per_worker
    assert gw.counter("tollgate_requests_total", client="team-a", outcome="admitted") == limit
    assert gw.counter("tollgate_requests_total", client="team-a", outcome="rate_limited") == (
        connections * per_connection - limit
    )


def test_metrics_are_labelled_by_client_and_outcome_and_hold_no_keys(start_gateway, mock):
    gw = start_gateway(config(rpm_a=2), mock.url)
    harness.wait_for_fresh_window()
    for _ in range(3):
        gw.post(key=TEAM_A)
    gw.post(key=TEAM_B)
    gw.post(key="sk-wrong")
    text = gw.stats_text()
    assert 'tollgate_requests_total{client="team-a",outcome="admitted"} 2' in text
    assert 'tollgate_requests_total{client="team-a",outcome="rate_limited"} 1' in text
    assert 'tollgate_requests_total{client="team-b",outcome="admitted"} 1' in text
    assert 'tollgate_requests_total{client="_anonymous",outcome="unauthorized"} 1' in text
    assert 'tollgate_limiter_errors_total{backend="local",reason="contention"} 0' in text
    for secret in (TEAM_A, TEAM_B, "sk-wrong", PROVIDER_KEY, sha256_hex(TEAM_A)):
        assert secret not in text


def test_streaming_passes_through_with_the_clients_headers(gw, mock):
    r = gw.post(key=TEAM_A, body=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status == 200
    assert r.header("content-type").startswith("text/event-stream")
    assert r.header("x-ratelimit-limit-requests") == "100"
    events = [l.removeprefix("data: ") for l in r.body.decode().split("\n\n") if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"usage"' in events[-2]


def test_keys_never_appear_in_envoy_logs(gw):
    gw.post(key=TEAM_A)
    gw.post(key="sk-leak-check-wrong-key")
    gw.post(headers=[("authorization", "Bearer sk-leak-check-wrong-key"), ("authorization", "x")])
    log = gw.log()
    assert "configured: 2 clients" in log  # the filter does log (debug level is on)
    for secret in (TEAM_A, "sk-leak-check-wrong-key", PROVIDER_KEY):
        assert secret not in log


def test_health_answers_without_a_key_and_is_not_counted(gw, mock):
    r = harness.request(gw.url, "GET", "/health")
    assert r.status == 200
    assert mock.requests() == []
    assert gw.counter("tollgate_requests_total", client="_anonymous", outcome="unauthorized") == 0

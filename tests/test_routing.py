"""End to end: model routing over two mock providers, each checking the key it receives:
rules (exact, glob, alias), allow-lists, /v1/models, body errors, fallback to the second provider,
and Envoy's own errors in OpenAI's shape."""

from __future__ import annotations

import json

import openai
import pytest

import harness
from harness import BACKUP_KEY, PROVIDER_KEY, chat_body, sha256_hex

TEAM = "sk-route-team-1a2b3c"  # allow-list: gpt-4.1 family and "fast"
OPEN = "sk-route-open-4d5e6f"  # no allow-list: every routed model
MAX_BODY = 4096


def plugin() -> dict:
    return {
        "clients": [
            {"name": "team", "key_sha256": sha256_hex(TEAM), "requests_per_minute": 1000,
             "models": ["gpt-4.1", "gpt-4.1-*", "fast"]},
            {"name": "open", "key_sha256": sha256_hex(OPEN), "requests_per_minute": 1000},
        ],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [
            {"match": "gpt-4.1", "providers": ["relay", "backup"]},
            {"match": "gpt-4.1-*", "providers": ["relay"]},
            {"match": "fast", "providers": ["backup"], "upstream_model": "deepseek-chat"},
            {"match": "claude-*", "providers": ["backup"]},
        ],
        "max_body_bytes": MAX_BODY,
    }


def urls(relay_url: str, backup_url: str, **relay_settings) -> dict:
    """Provider settings with URLs given directly (a relay that is down, or has a timeout)."""
    return {"relay": {"url": relay_url, **relay_settings}, "backup": {"url": backup_url}}


@pytest.fixture
def gw(start_gateway, providers):
    relay, backup = providers
    return start_gateway(plugin(), urls(relay.url, backup.url))


def keys_seen(mock) -> list[str]:
    return [v for r in mock.requests() for n, v in r["headers"] if n == "authorization"]


def assert_no_client_keys(*mocks):
    for m in mocks:
        for r in m.requests():
            blob = json.dumps(r)
            assert TEAM not in blob and OPEN not in blob


def test_exact_glob_and_alias_rules_reach_the_right_provider_with_its_key(gw, providers):
    relay, backup = providers
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1"))
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "relay"
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1-mini"))
    assert r.header("x-mock-name") == "relay"
    assert r.json()["model"] == "gpt-4.1-mini"

    r = gw.post(key=TEAM, body=chat_body("fast", content="alias please"))
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "backup"
    (seen,) = backup.requests()
    sent = json.loads(seen["body"])
    assert sent["model"] == "deepseek-chat", "the provider gets the upstream model name"
    assert sent["messages"] == [{"role": "user", "content": "alias please"}]

    assert keys_seen(relay) == [f"Bearer {PROVIDER_KEY}"] * 2
    assert keys_seen(backup) == [f"Bearer {BACKUP_KEY}"]
    assert_no_client_keys(relay, backup)
    for mock in providers:
        for req in mock.requests():
            internal = [(n, v) for n, v in req["headers"] if n.startswith("x-tollgate-")]
            # The route header must stay for later attempts (see core/src/upstream.rs): a rule
            # number, nothing from the client.
            assert internal in ([("x-tollgate-route", "r0")], [("x-tollgate-route", "r1")],
                                [("x-tollgate-route", "r2")]), internal
    assert gw.counter("tollgate_upstream_requests_total", provider="relay", model="gpt-4_1") == 1
    assert gw.counter("tollgate_upstream_requests_total", provider="backup", model="fast") == 1


def test_refusals_happen_before_any_upstream_call(gw, providers):
    cases = [
        (TEAM, chat_body("claude-3-opus"), 403, "model_not_allowed"),
        (OPEN, chat_body("no-such-model"), 404, "model_not_found"),
        (OPEN, b'{"model": "gpt-4.1", "messages": [', 400, None),
        (OPEN, b'{"messages": []}', 400, None),
        (OPEN, b"[1, 2, 3]", 400, None),
    ]
    for key, body, status, code in cases:
        r = gw.post(key=key, body=body)
        assert r.status == status, (body, r.body)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert err["code"] == code, body
    big = chat_body(content="x" * MAX_BODY)
    r = gw.post(key=OPEN, body=big)
    assert r.status == 413
    assert r.json()["error"]["code"] == "request_too_large"
    for mock in providers:
        assert mock.requests() == []
    assert gw.counter("tollgate_requests_total", client="open", outcome="invalid") == 5


def test_models_list_is_filtered_per_client(gw):
    team = harness.request(gw.url, "GET", "/v1/models", [("authorization", f"Bearer {TEAM}")]).json()
    assert team["object"] == "list"
    assert [m["id"] for m in team["data"]] == ["gpt-4.1", "fast"]
    assert all(m["object"] == "model" for m in team["data"])
    opened = harness.request(gw.url, "GET", "/v1/models", [("authorization", f"Bearer {OPEN}")]).json()
    assert [m["id"] for m in opened["data"]] == ["gpt-4.1", "fast"]
    anonymous = harness.request(gw.url, "GET", "/v1/models", [])
    assert anonymous.status == 401


@pytest.mark.parametrize("failure", ["500", "429", "not listening"])
def test_fallback_to_the_second_provider_with_its_own_key(failure, start_gateway, workdir):
    backup = harness.MockProvider(workdir, name="backup", expect_key=BACKUP_KEY)
    relay = None
    if failure == "not listening":
        relay_url = f"http://127.0.0.1:{harness.free_port()}"
    else:
        relay = harness.MockProvider(workdir, name="relay", expect_key=PROVIDER_KEY,
                                     extra_args=["--status", failure])
        relay_url = relay.url
    try:
        gw = start_gateway(plugin(), urls(relay_url, backup.url))
        r = gw.post(key=TEAM, body=chat_body("gpt-4.1", content="fall back"))
        assert r.status == 200, r.body
        assert r.header("x-mock-name") == "backup"
        assert r.json()["object"] == "chat.completion"
        assert keys_seen(backup) == [f"Bearer {BACKUP_KEY}"]
        assert json.loads(backup.requests()[0]["body"])["model"] == "gpt-4.1"
        if relay:
            assert keys_seen(relay) == [f"Bearer {PROVIDER_KEY}"], "the first attempt had the relay's key"
            assert_no_client_keys(relay)
        assert_no_client_keys(backup)
        assert gw.counter("tollgate_fallbacks_total", model="gpt-4_1", **{"from": "relay", "to": "backup"}) == 1
        # Both attempts are counted, the first one also when it never got an answer (no
        # status, so the upstream role recorded nothing for it: Envoy's count says it was made).
        for provider in ("relay", "backup"):
            assert gw.counter("tollgate_upstream_requests_total", provider=provider, model="gpt-4_1") == 1
        if relay:
            assert gw.counter("tollgate_upstream_errors_total", provider="relay", status=failure) == 1
        # Envoy's count, read by Tollgate, is not the client's business.
        assert r.header("x-envoy-attempt-count") is None
    finally:
        backup.stop()
        if relay:
            relay.stop()


def test_a_provider_slower_than_its_timeout_is_an_openai_504(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), urls(relay.url, backup.url, timeout_ms=300))
    relay.rule("slower-than-timeout", delay_ms=3000)
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1-mini", content="slower-than-timeout"))
    assert r.status == 504
    assert r.header("content-type") == "application/json"
    err = r.json()["error"]
    assert err["code"] == "upstream_timeout" and err["type"] == "server_error"


def test_envoys_own_errors_are_openai_shaped(start_gateway, providers):
    _, backup = providers
    dead = f"http://127.0.0.1:{harness.free_port()}"
    gw = start_gateway(plugin(), urls(dead, backup.url))
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1-mini"))  # relay only, and it is down
    assert r.status == 503
    assert r.header("content-type") == "application/json"
    assert r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["code"] in ("upstream_connect_error", "upstream_reset", "no_healthy_upstream")
    # The one attempt is counted (from Envoy's count on its own reply), with no provider error:
    # no provider answered.
    assert gw.counter("tollgate_upstream_requests_total", provider="relay", model="gpt-4_1-_") == 1
    assert gw.counter("tollgate_upstream_errors_total", provider="relay", status="503") == 0


def test_a_client_cannot_pick_the_attempt_or_its_key(gw, providers):
    """An attacker with a valid key sends Envoy's attempt header and a route of its own, to
    reach the fallback provider (or its key) on the first attempt: the first attempt still
    goes to the rule's first provider with that provider's key, counted as one attempt."""
    relay, backup = providers
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1"),
                headers=[("x-envoy-attempt-count", "2"), ("x-tollgate-route", "r2")])
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "relay"
    assert keys_seen(relay) == [f"Bearer {PROVIDER_KEY}"]
    assert backup.requests() == []
    (seen,) = relay.requests()
    assert dict(seen["headers"]).get("x-envoy-attempt-count") == "1"
    assert ["x-tollgate-route", "r0"] in seen["headers"]
    assert gw.counter("tollgate_upstream_requests_total", provider="relay", model="gpt-4_1") == 1
    assert gw.counter("tollgate_upstream_requests_total", provider="backup", model="gpt-4_1") == 0
    assert gw.counter("tollgate_fallbacks_total", model="gpt-4_1", **{"from": "relay", "to": "backup"}) == 0


def test_streams_are_routed(gw, providers):
    r = gw.post(key=TEAM, body=chat_body("fast", stream=True))
    assert r.status == 200
    assert r.header("content-type").startswith("text/event-stream")
    assert r.body.decode().rstrip().endswith("data: [DONE]")


def test_openai_sdk_lists_models_and_chats_through_two_providers(gw):
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEAM, max_retries=0, timeout=30)
    assert [m.id for m in c.models.list().data] == ["gpt-4.1", "fast"]
    a = c.chat.completions.with_raw_response.create(model="gpt-4.1", messages=[{"role": "user", "content": "a"}])
    b = c.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "b"}])
    assert (a.headers["x-mock-name"], b.headers["x-mock-name"]) == ("relay", "backup")
    assert a.parse().choices[0].message.content and b.parse().choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="claude-3-opus", messages=[{"role": "user", "content": "x"}])
    opened = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=OPEN, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as e:
        opened.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"

"""End to end: the mock provider's controls cannot be reached through the gateway. The demo puts
the mock behind Envoy; a client holding a valid key must not read its request log (which holds
the provider key and other clients' prompts), clear it, add rules, or change what the provider
answers with `x-mock-*` headers. The controls live on the mock's own control listener, which
no gateway is configured with (docs/mock-provider.md)."""

from __future__ import annotations

import json

import pytest

import harness
from h2client import H2Client
from harness import chat_body, sha256_hex

KEY = "sk-mock-isolation-client"
PATH = "/v1/chat/completions"

CONTROL_CALLS = [
    ("GET", "/__mock/requests"),
    ("DELETE", "/__mock/requests"),
    ("GET", "/__mock/health"),
    ("GET", "/__mock/rules"),
    ("POST", "/__mock/rules"),
    ("DELETE", "/__mock/rules"),
]

# Every header the mock used to obey, set to something that would show.
INJECTION_HEADERS = [
    ("x-mock-status", "500"),
    ("x-mock-error-body", '{"usage":{"prompt_tokens":999999}}'),
    ("x-mock-delay-ms", "60000"),
    ("x-mock-chunk-delay-ms", "60000"),
    ("x-mock-stream-abort-after", "1"),
]


def plugin() -> dict:
    return {
        "clients": [{"name": "iso", "key_sha256": sha256_hex(KEY), "requests_per_minute": 100000,
                     "tokens_per_minute": 100000000}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay"]}],
    }


@pytest.fixture
def setup(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), harness.provider_urls(relay, backup))
    # Something worth stealing: a request that reached the provider with the provider key.
    assert gw.post(key=KEY, body=chat_body(content="another client's secret prompt")).status == 200
    relay.rule("isolation-sentinel-rule", status=503)
    return gw, relay, backup


def assert_controls_untouched(relay):
    log = relay.requests()
    assert any("another client's secret prompt" in e["body"] for e in log), "the log was cleared"
    assert [r["match"] for r in relay.rules()] == ["isolation-sentinel-rule"], "the rules were changed"


def test_control_paths_are_not_reachable_through_the_gateway(setup):
    gw, relay, _ = setup
    auth = [("authorization", f"Bearer {KEY}")]
    for method, path in CONTROL_CALLS:
        body = {"match": "", "status": 500} if method == "POST" else None
        r = harness.request(gw.url, method, path, auth, body)
        assert r.status == 404, (method, path, r.status, r.body[:200])
        assert harness.PROVIDER_KEY.encode() not in r.body
        assert b"secret prompt" not in r.body
    assert_controls_untouched(relay)
    # No rule was added by the POST: an ordinary request is answered normally.
    assert gw.post(key=KEY).status == 200


def test_control_paths_over_http2(setup):
    gw, relay, _ = setup
    c = H2Client(gw.port)
    try:
        for method, path in CONTROL_CALLS:
            r = c.request(method, path, [("authorization", f"Bearer {KEY}")],
                          chat_body() if method == "POST" else None)
            assert r.status == 404, (method, path, r.status)
            assert harness.PROVIDER_KEY.encode() not in r.body
    finally:
        c.close()
    assert_controls_untouched(relay)


def test_injection_headers_through_the_gateway_change_nothing(setup):
    gw, relay, _ = setup
    r = gw.post(key=KEY, body=chat_body(content="plain request"), headers=INJECTION_HEADERS)
    assert r.status == 200, r.body[:200]
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] < 100
    # A stream with the cut and stall headers arrives whole and promptly (the bound is the
    # client's 30 s timeout: a 60 s stall would fail it).
    r = gw.post(key=KEY, body=chat_body(content="plain stream", stream=True), headers=INJECTION_HEADERS)
    assert r.status == 200 and r.body.rstrip().endswith(b"data: [DONE]")
    # Whatever the gateway forwarded of those headers, the provider ignored them.
    assert len(relay.requests(match="plain request")) == 1
    c = H2Client(gw.port)
    try:
        r = c.request("POST", PATH, [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
                      + INJECTION_HEADERS, chat_body(content="plain h2"))
        assert r.status == 200 and json.loads(r.body)["object"] == "chat.completion"
    finally:
        c.close()


def test_a_rule_set_on_the_control_listener_does_apply(setup):
    """The positive control: the same gateway does let the provider's behaviour be changed, but
    only from the mock's own control listener."""
    gw, relay, _ = setup
    r = gw.post(key=KEY, body=chat_body(content="isolation-sentinel-rule"))
    assert r.status == 503
    (rule,) = relay.rules()
    assert rule["hits"] == 1

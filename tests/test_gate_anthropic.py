"""Adversarial cases for Anthropic's Messages API at the gate: what a client with one valid,
low-privilege key tries on /v1/messages and /v1/messages/count_tokens. The evidence is what
reached the provider (the mock's request log) and which counter moved."""

from __future__ import annotations

import http.client
import json

import pytest

import harness
from harness import PROVIDER_KEY, sha256_hex

INTERN = "sk-claude-intern-0a1b2c"  # claude-haiku-4 only; a token budget
OTHER = "sk-claude-other-3d4e5f"  # another client: its key must never help the intern
CHATONLY = "sk-claude-chatonly-6a7b8c"  # endpoints: chat completions only
TPM = 5000
VERSION = [("anthropic-version", "2023-06-01")]


def plugin() -> dict:
    return {
        "clients": [
            {"name": "intern", "key_sha256": sha256_hex(INTERN), "requests_per_minute": 1000,
             "tokens_per_minute": TPM, "models": ["claude-haiku-4"]},
            {"name": "other", "key_sha256": sha256_hex(OTHER), "requests_per_minute": 1000},
            {"name": "chatonly", "key_sha256": sha256_hex(CHATONLY), "endpoints": ["chat_completions"]},
        ],
        "providers": [
            {"name": "claude", "cluster": "provider_claude", "api": "anthropic",
             "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "oai", "cluster": "provider_oai", "api_key_env": harness.PROVIDER_KEY_ENV},
        ],
        "models": [
            {"match": "claude-haiku-4", "providers": ["claude"]},
            {"match": "claude-opus-4", "providers": ["claude"]},
            {"match": "gpt-4.1", "providers": ["oai"]},
        ],
    }


@pytest.fixture
def gate(start_gateway, mock):
    gw = start_gateway(plugin(), {"claude": {"url": mock.url}, "oai": {"url": mock.url}})
    return gw, mock


def body(model="claude-haiku-4", content="hi", **extra) -> dict:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}], **extra}


def post(gw, path="/v1/messages", headers=(), payload=None):
    return harness.request(gw.url, "POST", path, list(VERSION) + list(headers),
                           body(**{}) if payload is None else payload)


def anthropic_error(r, status: int, kind: str) -> None:
    assert r.status == status, (r.status, r.body)
    v = r.json()
    assert v["type"] == "error" and v["error"]["type"] == kind, v
    assert r.header("request-id") and v["request_id"] == r.header("request-id")


def test_keys_must_be_one_valid_key(gate):
    gw, mock = gate
    for headers in [
        [],
        [("x-api-key", "sk-unknown")],
        [("x-api-key", INTERN), ("x-api-key", INTERN)],
        [("x-api-key", INTERN), ("authorization", f"Bearer {OTHER}")],  # which client is it?
        [("x-api-key", OTHER), ("authorization", f"Bearer {INTERN}")],
        [("x-api-key", INTERN), ("authorization", f"Basic {INTERN}")],
        [("x-api-key", f"{INTERN} ")],  # trimmed: the intern's key, valid
        [("x-api-key", f"Bearer {INTERN}")],
    ]:
        r = post(gw, headers=headers)
        if headers == [("x-api-key", f"{INTERN} ")]:
            assert r.status == 200, r.body
            continue
        anthropic_error(r, 401, "authentication_error")
    assert len(mock.requests("/v1/messages")) == 1
    # x-api-key is no key on OpenAI's endpoints (their clients send a bearer token), and it
    # never reaches a provider.
    r = harness.request(gw.url, "POST", "/v1/chat/completions", [("x-api-key", OTHER)],
                        harness.chat_body("gpt-4.1"))
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = harness.request(gw.url, "POST", "/v1/chat/completions",
                        [("authorization", f"Bearer {OTHER}"), ("x-api-key", INTERN)],
                        harness.chat_body("gpt-4.1"))
    assert r.status == 200
    [seen] = mock.requests("/v1/chat/completions")
    names = [n.lower() for n, _ in seen["headers"]]
    assert "x-api-key" not in names
    assert INTERN not in json.dumps(seen) and OTHER not in json.dumps(seen)


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/messages"), ("PUT", "/v1/messages"), ("DELETE", "/v1/messages"),
    ("POST", "/v1/messages/"), ("POST", "/v1/Messages"), ("POST", "/v1/messages;x=1"),
    ("POST", "/v1/messages/batches"), ("GET", "/v1/messages/batches"), ("POST", "/v1/complete"),
    ("POST", "/v1/messages/count_tokens/"), ("POST", "/v1/messages/%63ount_tokens"),
])
def test_other_methods_and_spellings_never_reach_a_provider(gate, method, path):
    gw, mock = gate
    # A model the intern may not use: even a spelling Envoy normalises into the endpoint is
    # refused (403) rather than forwarded.
    r = harness.request(gw.url, method, path, VERSION + [("x-api-key", INTERN)], body("claude-opus-4"))
    # (401 for a spelling outside /v1/messages: an OpenAI-style path reads no x-api-key.)
    assert r.status in (400, 401, 403, 404), (r.status, r.body)
    if (path == "/v1/messages" or path.startswith("/v1/messages/")) and r.status != 400:
        assert r.json()["type"] == "error", r.body
    assert mock.requests() == [], f"{method} {path} reached the provider"


def test_an_endpoint_not_granted_is_not_found(gate):
    gw, mock = gate
    r = post(gw, headers=[("x-api-key", CHATONLY)])
    anthropic_error(r, 404, "not_found_error")
    assert mock.requests() == []


def test_allow_lists_and_the_providers_api_hold(gate):
    gw, mock = gate
    key = [("x-api-key", INTERN)]
    anthropic_error(post(gw, headers=key, payload=body("claude-opus-4")), 403, "permission_error")
    anthropic_error(post(gw, "/v1/messages/count_tokens", key, body("claude-opus-4")), 403, "permission_error")
    # A model of an OpenAI provider is not served on Anthropic's endpoint, nor the reverse.
    other = [("x-api-key", OTHER)]
    anthropic_error(post(gw, headers=other, payload=body("gpt-4.1")), 404, "not_found_error")
    r = harness.request(gw.url, "POST", "/v1/chat/completions", [("authorization", f"Bearer {OTHER}")],
                        harness.chat_body("claude-haiku-4"))
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
    anthropic_error(post(gw, headers=key, payload={"max_tokens": 5}), 400, "invalid_request_error")
    anthropic_error(post(gw, headers=key, payload=json.dumps([body()]).encode()), 400, "invalid_request_error")
    assert mock.requests() == []


def test_smuggled_headers_do_not_reach_the_provider(gate):
    gw, mock = gate
    smuggled = [("authorization", f"Bearer {INTERN}"), ("x-tollgate-route", "r1"),
                ("x-envoy-original-path", "/v1/chat/completions"), ("anthropic-organization-id", "org-x"),
                ("x-forwarded-for", "10.9.8.7"), ("cookie", "a=b"), ("cache-control", "no-store"),
                ("anthropic-beta", "prompt-caching-2024-07-31")]
    r = post(gw, headers=[("x-api-key", INTERN)] + smuggled)
    assert r.status == 200, r.body
    [seen] = mock.requests()
    sent = [(n.lower(), v) for n, v in seen["headers"]]
    assert ("x-api-key", PROVIDER_KEY) in sent
    assert [n for n, _ in sent].count("x-api-key") == 1
    assert ("anthropic-version", "2023-06-01") in sent
    assert ("anthropic-beta", "prompt-caching-2024-07-31") in sent
    for name in ("authorization", "anthropic-organization-id", "x-forwarded-for", "cookie",
                 "cache-control", "x-envoy-original-path"):
        assert name not in [n for n, _ in sent], f"{name} reached the provider"
    assert ("x-tollgate-route", "r0") in sent, "the route is Tollgate's, not the client's"
    assert INTERN not in json.dumps(seen)
    # The provider's account headers never reach the client.
    assert r.header("anthropic-organization-id") is None
    assert r.header("anthropic-ratelimit-input-tokens-remaining") is None
    assert r.header("anthropic-ratelimit-requests-limit") == "1000"


def test_count_tokens_is_no_way_around_the_token_budget(gate):
    gw, mock = gate
    key = [("x-api-key", INTERN)]
    # A token count asks for nothing: even a max_tokens over the budget passes, and it is
    # charged no tokens; the provider sees the count path, not /v1/messages.
    r = post(gw, "/v1/messages/count_tokens", key, body(max_tokens=TPM * 10, stream=True))
    assert r.status == 200, r.body
    assert r.json() == {"input_tokens": 5}
    assert r.header("anthropic-ratelimit-tokens-remaining") == str(TPM)
    [seen] = mock.requests()
    assert seen["path"] == "/v1/messages/count_tokens"
    # The same max_tokens on /v1/messages is refused before the provider.
    anthropic_error(post(gw, headers=key, payload=body(max_tokens=TPM * 10)), 429, "rate_limit_error")
    assert len(mock.requests()) == 1
    assert gw.counter("tollgate_tokens_total", client="intern", model="claude-haiku-4", kind="prompt") == 0


def estimate(payload: bytes, max_tokens: int = 0) -> int:
    return -(-len(payload) // 4) + max_tokens


def test_a_cut_stream_is_charged_for_what_it_delivered(gate):
    gw, mock = gate
    harness.wait_for_fresh_window()
    # message_start, content_block_start, ping, then two content deltas: cut.
    mock.rule("cut-this-story", abort_after=5)
    payload = json.dumps(body(content="cut-this-story please tell it", max_tokens=500, stream=True)).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("POST", "/v1/messages", body=payload, headers={
            "x-api-key": INTERN, "content-type": "application/json", **dict(VERSION)})
        r = conn.getresponse()
        assert r.status == 200
        try:
            received = r.read()
        except http.client.IncompleteRead as e:
            received = e.partial
    finally:
        conn.close()
    deltas = received.count(b"event: content_block_delta")
    assert deltas == 2 and b"message_delta" not in received, received
    # Charged like a cut OpenAI stream: the prompt estimate and one token per delta delivered,
    # not the 500 max_tokens, and not nothing.
    charged = estimate(payload) + deltas
    probe = json.dumps(body(content="probe")).encode()
    r = harness.request(gw.url, "POST", "/v1/messages", VERSION + [("x-api-key", INTERN)], probe)
    assert r.status == 200
    assert int(r.header("anthropic-ratelimit-tokens-remaining")) == TPM - charged - estimate(probe, 16)

"""The real Anthropic Python SDK through the gateway: Claude clients with their own SDK, counted
and limited like OpenAI's (create, the streaming helper, count_tokens, the exception classes,
exact usage in both modes, limits, allow-lists, fallback between two Anthropic providers)."""

from __future__ import annotations

import json
import math

import anthropic
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION as SDK_VERSION

import harness
from harness import BACKUP_KEY, PROVIDER_KEY, sha256_hex

TEAM = "sk-claude-team-5e6f7a8b"  # allow-list: claude-* only; a token budget
SMALL = "sk-claude-small-1c2d3e4f"  # 3 requests a minute
TPM = 2000
SYSTEM = [{"type": "text", "text": "You are a terse assistant for tests.", "cache_control": {"type": "ephemeral"}}]


def plugin() -> dict:
    return {
        "clients": [
            {"name": "claude-team", "key_sha256": sha256_hex(TEAM), "requests_per_minute": 1000,
             "tokens_per_minute": TPM, "models": ["claude-*"]},
            {"name": "claude-small", "key_sha256": sha256_hex(SMALL), "requests_per_minute": 3},
        ],
        "providers": [
            {"name": "claude", "cluster": "provider_claude", "api": "anthropic",
             "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "claude2", "cluster": "provider_claude2", "api": "anthropic",
             "api_key_env": harness.BACKUP_KEY_ENV},
            {"name": "oai", "cluster": "provider_oai", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [
            {"match": "claude-sonnet-4", "providers": ["claude", "claude2"]},
            {"match": "claude-haiku-4", "providers": ["claude"]},
            {"match": "gpt-4.1", "providers": ["oai"]},
        ],
    }


@pytest.fixture
def gw(start_gateway, providers):
    relay, backup = providers
    urls = {"claude": {"url": relay.url}, "claude2": {"url": backup.url}, "oai": {"url": backup.url}}
    return start_gateway(plugin(), urls)


def client(gw, key=TEAM, **kw) -> anthropic.Anthropic:
    # Retries off: a 429 or a 5xx must surface as an exception, not be retried away.
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30, **kw)


def tokens(gw, kind: str, model: str = "claude-sonnet-4") -> float:
    return gw.counter("tollgate_tokens_total", client="claude-team", model=model, kind=kind)


def sent_to(mock) -> list[dict]:
    return [r for r in mock.requests() if r["path"].startswith("/v1/messages")]


def header(entry: dict, name: str) -> list[str]:
    return [v for n, v in entry["headers"] if n.lower() == name]


def test_create_counts_exact_usage_and_shows_the_clients_budget(gw, providers):
    relay, backup = providers
    c = client(gw)
    raw = c.messages.with_raw_response.create(
        model="claude-sonnet-4", max_tokens=64, system=SYSTEM,
        messages=[{"role": "user", "content": "Hello Claude SDK"}],
    )
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].text == "Mock reply from relay: Hello Claude SDK"
    assert m.stop_reason == "end_turn"
    # The mock's prompt cache: the system block is written the first time.
    u = m.usage
    assert (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) == (8, 13, 0)
    assert u.output_tokens == 7
    # The client's own budget, in Anthropic's names; nothing of the provider account.
    h = raw.headers
    assert h["anthropic-ratelimit-requests-limit"] == "1000"
    assert h["anthropic-ratelimit-requests-remaining"] == "999"
    assert h["anthropic-ratelimit-tokens-limit"] == str(TPM)
    assert h["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert "anthropic-organization-id" not in h
    assert "anthropic-ratelimit-input-tokens-remaining" not in h
    assert not [k for k in h if k.startswith("x-ratelimit")]
    # The provider got its own key the way Anthropic expects it, and the client's version.
    [seen] = sent_to(relay)
    assert header(seen, "x-api-key") == [PROVIDER_KEY]
    assert header(seen, "authorization") == []
    assert header(seen, "anthropic-version") == [SDK_VERSION], "the SDK's version passes through"
    assert TEAM not in json.dumps(seen)
    assert sent_to(backup) == []
    # Every prompt token counts: input, cache writes and cache reads.
    assert tokens(gw, "prompt") == 8 + 13
    assert tokens(gw, "completion") == 7

    # The second time the block is read from the cache: counted as prompt tokens too.
    m2 = c.messages.create(model="claude-sonnet-4", max_tokens=64, system=SYSTEM,
                           messages=[{"role": "user", "content": "Hello Claude SDK"}])
    assert (m2.usage.cache_creation_input_tokens, m2.usage.cache_read_input_tokens) == (0, 13)
    assert tokens(gw, "prompt") == 2 * (8 + 13)
    # The budget was charged what was used (2 x 28), not the estimates.
    raw = c.messages.with_raw_response.count_tokens(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hello Claude SDK"}])
    assert raw.parse().input_tokens == 8
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(TPM - 2 * 28)
    # A token count costs a request, no tokens.
    assert tokens(gw, "prompt") == 2 * (8 + 13)


def test_the_streaming_helper_gets_the_stream_and_usage_is_counted_exactly(gw, providers):
    relay, _ = providers
    c = client(gw)
    with c.messages.stream(model="claude-haiku-4", max_tokens=3, system=SYSTEM,
                           messages=[{"role": "user", "content": "stream me some words please"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Mock reply from"
    assert final.stop_reason == "max_tokens"
    u = final.usage
    assert (u.input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (11, 13, 3)
    assert tokens(gw, "prompt", "claude-haiku-4") == 11 + 13
    assert tokens(gw, "completion", "claude-haiku-4") == 3
    # The stream reached the client as the provider sent it: no usage chunk added or taken.
    [seen] = sent_to(relay)
    assert "stream_options" not in seen["body"]
    # Raw events, in Anthropic's order.
    events = [e.type for e in c.messages.create(
        model="claude-haiku-4", max_tokens=2, stream=True,
        messages=[{"role": "user", "content": "x"}])]
    assert events == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                      "content_block_stop", "message_delta", "message_stop"]


def test_gate_errors_raise_the_sdks_exception_classes(gw, providers):
    relay, backup = providers
    msg = [{"role": "user", "content": "x"}]
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gw, key="sk-not-a-client").messages.create(model="claude-sonnet-4", max_tokens=5, messages=msg)
    assert e.value.status_code == 401 and e.value.type == "authentication_error"
    assert e.value.request_id, "request-id names the request"
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(gw).messages.create(model="gpt-4.1", max_tokens=5, messages=msg)
    assert e.value.type == "permission_error"
    assert e.value.error_code == "model_not_allowed"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(gw).messages.create(model="claude-opus-9", max_tokens=5, messages=msg)
    assert e.value.type == "not_found_error"
    # A model served by an OpenAI provider is not on /v1/messages.
    with pytest.raises(anthropic.NotFoundError):
        client(gw, key=SMALL).messages.create(model="gpt-4.1", max_tokens=5, messages=msg)
    with pytest.raises(anthropic.BadRequestError) as e:
        client(gw).messages.create(model="", max_tokens=5, messages=msg)
    assert e.value.type == "invalid_request_error"
    assert sent_to(relay) == [] and sent_to(backup) == []


def test_limits_raise_rate_limit_error_with_retry_after(gw, providers):
    harness.wait_for_fresh_window()
    msg = [{"role": "user", "content": "x"}]
    small = client(gw, key=SMALL)
    for _ in range(3):
        small.messages.create(model="claude-haiku-4", max_tokens=5, messages=msg)
    with pytest.raises(anthropic.RateLimitError) as e:
        small.messages.create(model="claude-haiku-4", max_tokens=5, messages=msg)
    assert e.value.type == "rate_limit_error"
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1
    assert h["anthropic-ratelimit-requests-remaining"] == "0"
    assert h["anthropic-ratelimit-requests-limit"] == "3"
    # The token budget: a max_tokens beyond it does not fit.
    with pytest.raises(anthropic.RateLimitError) as e:
        client(gw).messages.create(model="claude-haiku-4", max_tokens=TPM + 1, messages=msg)
    assert e.value.error_code == "rate_limit_exceeded"
    assert "anthropic-ratelimit-tokens-remaining" in e.value.response.headers
    assert gw.counter("tollgate_requests_total", client="claude-small", outcome="rate_limited") == 1


def test_the_key_may_come_in_x_api_key(gw, providers):
    relay, _ = providers
    # Anthropic's own header, as most Claude clients send it.
    c = anthropic.Anthropic(base_url=gw.url, api_key=None, auth_token=None, max_retries=0,
                            default_headers={"x-api-key": TEAM})
    m = c.messages.create(model="claude-haiku-4", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text.startswith("Mock reply from relay")
    [seen] = sent_to(relay)
    assert header(seen, "x-api-key") == [PROVIDER_KEY]
    assert TEAM not in json.dumps(seen)


def test_a_failing_anthropic_provider_falls_back_to_the_next(gw, providers):
    relay, backup = providers
    relay.rule("fallback-marker", status=529)
    m = client(gw).messages.create(model="claude-sonnet-4", max_tokens=20,
                                   messages=[{"role": "user", "content": "fallback-marker"}])
    assert m.content[0].text.startswith("Mock reply from backup")
    [first] = sent_to(relay)
    [second] = sent_to(backup)
    assert header(first, "x-api-key") == [PROVIDER_KEY]
    assert header(second, "x-api-key") == [BACKUP_KEY]
    assert header(second, "authorization") == []
    assert gw.counter("tollgate_fallbacks_total", model="claude-sonnet-4",
                      **{"from": "claude", "to": "claude2"}) == 1
    # A provider error that is not retried reaches the client as the SDK's class.
    relay.rule("overloaded-marker", status=529)
    backup.rule("overloaded-marker", status=529)
    with pytest.raises(anthropic.InternalServerError) as e:
        client(gw).messages.create(model="claude-sonnet-4", max_tokens=20,
                                   messages=[{"role": "user", "content": "overloaded-marker"}])
    assert e.value.status_code == 529 and e.value.type == "overloaded_error"


def test_envoys_own_errors_are_anthropic_shaped_on_the_messages_api(start_gateway, providers):
    """A provider that cannot be reached: Envoy answers itself (no Tollgate decision is involved),
    in Anthropic's error shape on /v1/messages and in OpenAI's elsewhere."""
    relay, backup = providers
    dead = f"http://127.0.0.1:{harness.free_port()}"
    gw = start_gateway(plugin(), {"claude": {"url": dead}, "claude2": {"url": backup.url},
                                  "oai": {"url": dead}})
    with pytest.raises(anthropic.InternalServerError) as e:
        client(gw).messages.create(model="claude-haiku-4", max_tokens=5,
                                   messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "api_error", body
    assert body["error"]["message"]
    r = gw.post(key=SMALL, body=harness.chat_body("gpt-4.1"))
    assert r.status == 503 and r.json()["error"]["type"] == "server_error"


def test_prompt_cache_reads_and_writes_are_priced_as_anthropic_bills_them(start_gateway, providers):
    """Claude Sonnet at $3 input, $0.30 cache reads, $3.75 cache writes, $15 output per million:
    the first message writes the system block to the cache, the second reads it."""
    relay, backup = providers
    config = {**plugin(), "currency": "USD", "prices": [
        {"model": "claude-sonnet-4", "input_per_million_tokens": 3,
         "cached_input_per_million_tokens": 0.3, "cache_write_input_per_million_tokens": 3.75,
         "output_per_million_tokens": 15}]}
    gw = start_gateway(config, {"claude": {"url": relay.url}, "claude2": {"url": backup.url},
                                "oai": {"url": backup.url}})
    c = client(gw)
    expected = 0
    for written, read in ((13, 0), (0, 13)):
        m = c.messages.create(model="claude-sonnet-4", max_tokens=64, system=SYSTEM,
                              messages=[{"role": "user", "content": "Hello Claude SDK"}])
        u = m.usage
        assert (u.cache_creation_input_tokens, u.cache_read_input_tokens) == (written, read)
        # Micro-units: a price per million tokens is micro-units per token; rounded up once.
        expected += math.ceil(u.input_tokens * 3 + read * 0.3 + written * 3.75 + u.output_tokens * 15)
        assert gw.counter("tollgate_spend_micros_total", client="claude-team",
                          model="claude-sonnet-4") == expected
    assert expected == math.ceil(8 * 3 + 13 * 3.75 + 7 * 15) + math.ceil(8 * 3 + 13 * 0.3 + 7 * 15)

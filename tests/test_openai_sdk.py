"""The real OpenAI Python SDK through the gateway: what an application team actually runs."""

from __future__ import annotations

import openai
import pytest

import harness
from harness import default_plugin_config, sha256_hex

KEY = "sk-sdk-team-9f8e7d6c"


@pytest.fixture
def gw(start_gateway, mock):
    plugin = default_plugin_config([{"name": "sdk-team", "key_sha256": sha256_hex(KEY), "requests_per_minute": 4}])
    return start_gateway(plugin, mock.url)


def client(gw, key=KEY) -> openai.OpenAI:
    # Retries off: a 429 must surface as an exception, not be retried away.
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion(gw):
    harness.wait_for_fresh_window()
    c = client(gw)
    r = c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "Hello SDK"}])
    assert r.object == "chat.completion"
    assert r.model == "gpt-4.1"
    assert r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    raw = c.chat.completions.with_raw_response.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-ratelimit-limit-requests"] == "4"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"


def test_streaming_chat(gw):
    harness.wait_for_fresh_window()
    stream = client(gw).chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "stream please"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_bad_key_raises_authentication_error(gw):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gw, key="sk-not-valid").chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


def test_over_the_limit_raises_rate_limit_error(gw):
    harness.wait_for_fresh_window()
    c = client(gw)
    for _ in range(4):
        c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_models_list_passes_through(gw):
    models = client(gw).models.list()
    assert "gpt-4.1" in [m.id for m in models.data]

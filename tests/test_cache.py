"""End to end: the response cache, local (Envoy shared data) and Redis (real Webdis and Redis),
in front of two mock providers. A hit never reaches a provider and returns the stored body with
`x-tollgate-cache: hit`; what is not repeatable (sampling, streams, another model or client) goes
upstream; `cache-control` is honoured; a cache that fails is a miss, never a failed request."""

from __future__ import annotations

import json

import openai
import pytest

import harness
import render_envoy
from harness import chat_body, provider_urls, sha256_hex

TEAM_A = "sk-cache-team-a-3f9c1e"
TEAM_B = "sk-cache-team-b-8d2a7b"
TPM = 100_000


def plugin(cache: dict, **extra) -> dict:
    """Two clients; `gpt-4.1` (relay, then backup), `gpt-4.1-mini` and embeddings cached with
    `cache`; `fast` (an alias) not cached."""
    return {
        "clients": [
            {"name": "team-a", "key_sha256": sha256_hex(TEAM_A), "requests_per_minute": 1000,
             "tokens_per_minute": TPM},
            {"name": "team-b", "key_sha256": sha256_hex(TEAM_B), "requests_per_minute": 1000},
        ],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [
            {"match": "gpt-4.1", "providers": ["relay", "backup"], "cache": cache},
            {"match": "gpt-4.1-mini", "providers": ["relay"], "cache": cache},
            {"match": "text-embedding-3-small", "providers": ["relay"], "cache": cache},
            {"match": "fast", "providers": ["backup"], "upstream_model": "deepseek-chat"},
        ],
        **extra,
    }


REDIS_CACHE = {"cache_backends": {"redis": {"cluster": "webdis", "timeout_ms": 200}}}


@pytest.fixture(params=["local", "redis"])
def cached(request, start_gateway, providers):
    """(gateway, relay mock, backend) with `gpt-4.1` cached in each backend."""
    relay, backup = providers
    backend = request.param
    if backend == "local":
        gw = start_gateway(plugin({"backend": "local"}), provider_urls(relay, backup))
    else:
        r = harness.RedisServer(request.getfixturevalue("workdir"))
        request.addfinalizer(r.stop)
        w = harness.Webdis(request.getfixturevalue("workdir"), r)
        request.addfinalizer(w.stop)
        gw = start_gateway(plugin({"backend": "redis"}, **REDIS_CACHE), provider_urls(relay, backup),
                           webdis=w.addr)
    return gw, relay, backend


def cache_counter(gw, what: str, backend: str, model: str = "gpt-4_1", **labels) -> float:
    return gw.counter(f"tollgate_cache_{what}_total", backend=backend, model=model, **labels)


def stored(gw, backend: str, n: int, model: str = "gpt-4_1") -> None:
    """Wait until `n` responses are stored: a local store happens before the response's last
    byte reaches the client, a Redis store right after (sent from the worker's root context)."""
    harness.wait_until(lambda: cache_counter(gw, "stores", backend, model) >= n,
                       f"{n} stored responses ({backend})", timeout_s=10)


def post(gw, key: str, body, headers=()):
    return gw.post(key=key, body=body, headers=list(headers))


def test_the_second_identical_request_is_a_hit(cached):
    gw, relay, backend = cached
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEAM_A, max_retries=0, timeout=30)
    ask = dict(model="gpt-4.1", temperature=0, messages=[{"role": "user", "content": "What is Tollgate?"}])

    first = sdk.chat.completions.with_raw_response.create(**ask)
    assert first.headers["x-tollgate-cache"] == "miss"
    stored(gw, backend, 1)
    second = sdk.chat.completions.with_raw_response.create(**ask)

    assert second.headers["x-tollgate-cache"] == "hit"
    assert second.http_response.content == first.http_response.content, "the stored body, byte for byte"
    assert second.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(relay.requests()) == 1, "a hit never reaches the provider"
    assert "x-mock-name" not in second.headers
    assert int(second.headers["age"]) >= 0
    # Limits still count the hit, and the client sees its own budget on it.
    assert first.headers["x-ratelimit-remaining-requests"] == "999"
    assert second.headers["x-ratelimit-remaining-requests"] == "998"
    assert second.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert gw.counter("tollgate_requests_total", client="team-a", outcome="admitted") == 2
    assert cache_counter(gw, "hits", backend) == 1
    assert cache_counter(gw, "misses", backend) == 1
    size = len(first.http_response.content)
    assert cache_counter(gw, "stored_bytes", backend) == size
    assert cache_counter(gw, "served_bytes", backend) == size

    # The same request written differently (member order, whitespace, 0.0) is the same request.
    same = (b'{ "messages": [ {"content": "What is Tollgate?", "role": "user"} ],\n'
            b'  "temperature": 0.0, "model": "gpt-4.1" }')
    r = post(gw, TEAM_A, same)
    assert r.status == 200 and r.header("x-tollgate-cache") == "hit"
    assert r.body == first.http_response.content
    assert len(relay.requests()) == 1


def test_what_differs_misses(cached):
    gw, relay, backend = cached
    base = chat_body("gpt-4.1", content="Same words", temperature=0)
    assert post(gw, TEAM_A, base).header("x-tollgate-cache") == "miss"
    stored(gw, backend, 1)
    assert post(gw, TEAM_A, base).header("x-tollgate-cache") == "hit"
    calls = len(relay.requests())

    variants = [
        (TEAM_A, {**base, "temperature": 0.7}, "bypass"),                      # sampling: not cached
        (TEAM_A, {**base, "model": "gpt-4.1-mini"}, "miss"),                   # another model
        (TEAM_A, {**base, "max_tokens": 5}, "miss"),                           # another parameter
        (TEAM_B, base, "miss"),                                                # another client
        (TEAM_A, {**base, "n": 2}, "bypass"),                                  # several choices
        (TEAM_A, {**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, "bypass"),
        (TEAM_A, {k: v for k, v in base.items() if k != "temperature"}, "bypass"),  # the provider's default
    ]
    for key, body, want in variants:
        r = post(gw, key, body)
        assert r.status == 200, body
        assert r.header("x-tollgate-cache") == want, body
    assert len(relay.requests()) == calls + len(variants)
    assert cache_counter(gw, "skips", backend, reason="temperature") == 2
    assert cache_counter(gw, "skips", backend, reason="n") == 1
    assert cache_counter(gw, "skips", backend, reason="tools") == 1
    # A model without a cache setting says nothing about the cache.
    r = post(gw, TEAM_A, chat_body("fast", temperature=0))
    assert r.status == 200 and r.header("x-tollgate-cache") is None


def test_streams_are_never_cached(cached):
    gw, relay, backend = cached
    body = chat_body("gpt-4.1", content="stream me", temperature=0, stream=True)
    for _ in range(2):
        r = post(gw, TEAM_A, body)
        assert r.status == 200
        assert r.header("content-type").startswith("text/event-stream")
        assert r.header("x-tollgate-cache") == "bypass"
        assert r.body.decode().rstrip().endswith("data: [DONE]")
    assert len(relay.requests()) == 2
    assert cache_counter(gw, "skips", backend, reason="stream") == 2
    assert cache_counter(gw, "stores", backend) == 0


def test_cache_control_no_cache_and_no_store(cached):
    gw, relay, backend = cached
    body = chat_body("gpt-4.1", content="control", temperature=0)
    first = post(gw, TEAM_A, body)
    stored(gw, backend, 1)
    # no-cache: not answered from the cache; the fresh answer replaces the stored one.
    fresh = post(gw, TEAM_A, body, [("cache-control", "no-cache")])
    assert fresh.header("x-tollgate-cache") == "bypass"
    assert fresh.body != first.body, "a new answer from the provider (new id)"
    assert len(relay.requests()) == 2
    stored(gw, backend, 2)
    hit = post(gw, TEAM_A, body)
    assert hit.header("x-tollgate-cache") == "hit"
    assert hit.body == fresh.body
    assert cache_counter(gw, "skips", backend, reason="no_cache") == 1

    # no-store: looked up (a miss) but not stored, so the next one misses too.
    private = chat_body("gpt-4.1", content="keep this to yourself", temperature=0)
    for _ in range(2):
        r = post(gw, TEAM_A, private, [("cache-control", "no-store")])
        assert r.status == 200 and r.header("x-tollgate-cache") == "miss"
    assert post(gw, TEAM_A, private).header("x-tollgate-cache") == "miss"
    assert len(relay.requests()) == 5
    assert cache_counter(gw, "skips", backend, reason="no_store") == 2


def test_large_responses_pass_unchanged_and_are_not_stored(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin({"max_entry_bytes": 1024}), provider_urls(relay, backup))
    body = {"model": "text-embedding-3-small", "input": "a long vector", "dimensions": 512}
    answers = [gw.post("/v1/embeddings", key=TEAM_A, body=body) for _ in range(2)]
    for r in answers:
        assert r.status == 200 and r.header("x-tollgate-cache") == "miss"
        assert len(r.body) > 1024
        assert len(r.json()["data"][0]["embedding"]) == 512, "the client gets the whole response"
    assert answers[0].json()["data"] == answers[1].json()["data"]
    assert len(relay.requests()) == 2
    model = "text-embedding-3-small"
    assert cache_counter(gw, "skips", "local", model, reason="too_large") == 2


def test_errors_are_not_stored(start_gateway, workdir):
    relay = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY,
                                 extra_args=["--status", "400"])
    backup = harness.MockProvider(workdir, name="backup", expect_key=harness.BACKUP_KEY)
    try:
        gw = start_gateway(plugin({}), provider_urls(relay, backup))
        body = chat_body("gpt-4.1-mini", content="bad", temperature=0)
        for _ in range(2):
            r = post(gw, TEAM_A, body)
            assert r.status == 400 and r.header("x-tollgate-cache") == "miss"
        assert len(relay.requests()) == 2
        assert cache_counter(gw, "skips", "local", "gpt-4_1-mini", reason="status") == 2
    finally:
        relay.stop()
        backup.stop()


def test_shared_scope_serves_every_client(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin({"scope": "shared"}), provider_urls(relay, backup))
    body = chat_body("gpt-4.1", content="FAQ: opening hours?", temperature=0)
    a = post(gw, TEAM_A, body)
    b = post(gw, TEAM_B, body)
    assert (a.header("x-tollgate-cache"), b.header("x-tollgate-cache")) == ("miss", "hit")
    assert b.body == a.body
    assert len(relay.requests()) == 1
    # Each client is still limited and counted on its own.
    assert b.header("x-ratelimit-remaining-requests") == "999"
    assert gw.counter("tollgate_requests_total", client="team-b", outcome="admitted") == 1


def test_embeddings_are_cached_without_a_temperature(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin({}), provider_urls(relay, backup))
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEAM_A, max_retries=0, timeout=30)
    first = sdk.embeddings.with_raw_response.create(model="text-embedding-3-small", input="cache me")
    second = sdk.embeddings.with_raw_response.create(model="text-embedding-3-small", input="cache me")
    assert (first.headers["x-tollgate-cache"], second.headers["x-tollgate-cache"]) == ("miss", "hit")
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert len(relay.requests()) == 1


def access_log_lines(gw, count: int) -> list[dict]:
    def lines():
        found = [json.loads(l) for l in gw.log().splitlines() if l.startswith("{")]
        return found if len(found) >= count else None
    return harness.wait_until(lines, f"{count} access-log lines", timeout_s=15)


def test_hits_cost_no_tokens(start_gateway, providers):
    relay, backup = providers
    # The access log's properties on: the hit's line is read below.
    gw = start_gateway(plugin({}, access_log=True), provider_urls(relay, backup))
    harness.wait_for_fresh_window()
    body = json.dumps(chat_body("gpt-4.1", content="tokens?", temperature=0)).encode()
    first = post(gw, TEAM_A, body)
    used = first.json()["usage"]["total_tokens"]
    access_log_lines(gw, 1)  # the first request is settled to its usage
    hit = post(gw, TEAM_A, body)
    assert hit.header("x-tollgate-cache") == "hit"
    # The hit's reservation is given back: its budget is what the first request left.
    assert int(hit.header("x-ratelimit-remaining-tokens")) == TPM - used
    lines = access_log_lines(gw, 2)
    fields = lines[1]
    assert lines[1]["status"] == 200 and fields["client"] == "team-a" and fields["cache"] == "hit"
    assert fields["prompt_tokens"] is None, "no provider tokens on a hit"
    other = json.dumps(chat_body("gpt-4.1", content="another question", temperature=0)).encode()
    third = post(gw, TEAM_A, other)
    assert third.header("x-tollgate-cache") == "miss"
    assert int(third.header("x-ratelimit-remaining-tokens")) == TPM - used - -(-len(other) // 4)
    prompt = gw.counter("tollgate_tokens_total", client="team-a", model="gpt-4_1", kind="prompt")
    assert prompt == first.json()["usage"]["prompt_tokens"] + third.json()["usage"]["prompt_tokens"]


def test_hits_cost_no_tokens_with_the_redis_limiter(start_gateway, providers, redis, webdis):
    """The hit's reservation, made in Redis, is given back through the worker's settlements."""
    relay, backup = providers
    config = plugin({}, limiter={"backend": "redis", "cluster": "webdis", "on_error": "deny"})
    gw = start_gateway(config, provider_urls(relay, backup), webdis=webdis.addr)
    minute = harness.wait_for_fresh_window()
    key = f"tokens:{harness.md5_hex(TEAM_A)}:{int(minute)}"
    body = json.dumps(chat_body("gpt-4.1", content="tokens in redis?", temperature=0)).encode()
    used = post(gw, TEAM_A, body).json()["usage"]["total_tokens"]
    harness.wait_until(lambda: redis.cli("GET", key) == str(used), f"{key} settled at {used}",
                       timeout_s=10)
    hit = post(gw, TEAM_A, body)
    assert hit.header("x-tollgate-cache") == "hit"
    assert int(hit.header("x-ratelimit-remaining-tokens")) == TPM - used
    # The hit reserved its estimate in Redis; the settlement gives all of it back.
    harness.wait_until(lambda: redis.cli("GET", key) == str(used), f"{key} back at {used}",
                       timeout_s=10)
    assert len(relay.requests()) == 1


def test_rate_limits_apply_before_the_cache(start_gateway, providers):
    relay, backup = providers
    config = plugin({})
    config["clients"][1]["requests_per_minute"] = 2
    gw = start_gateway(config, provider_urls(relay, backup))
    harness.wait_for_fresh_window()
    body = chat_body("gpt-4.1", content="limited", temperature=0)
    statuses = [post(gw, TEAM_B, body) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert [r.header("x-tollgate-cache") for r in statuses[:2]] == ["miss", "hit"]
    assert len(relay.requests()) == 1


class Outage:
    """How to take the Redis backend down and bring it back, and the reason counted."""

    def __init__(self, redis, webdis):
        self.cases = [
            ("redis stopped", "status", redis.stop, redis.start),
            ("webdis stopped", "unavailable", webdis.stop, webdis.start),
            ("webdis slower than timeout_ms", "timeout", webdis.pause, webdis.resume),
        ]


def test_redis_down_means_misses_and_successful_requests(start_gateway, providers, redis, webdis):
    relay, backup = providers
    gw = start_gateway(plugin({"backend": "redis"}, **REDIS_CACHE), provider_urls(relay, backup),
                       webdis=webdis.addr)
    body = chat_body("gpt-4.1", content="outage", temperature=0)
    assert post(gw, TEAM_A, body).header("x-tollgate-cache") == "miss"
    stored(gw, "redis", 1)
    assert post(gw, TEAM_A, body).header("x-tollgate-cache") == "hit"
    calls = len(relay.requests())
    for name, reason, cause, undo in Outage(redis, webdis).cases:
        cause()
        try:
            for i in range(2):
                r = post(gw, TEAM_A, body)
                assert r.status == 200, (name, r.body)
                assert r.header("x-tollgate-cache") == "miss", name
                assert r.json()["object"] == "chat.completion"
            calls += 2
            assert len(relay.requests()) == calls, name
            assert cache_counter(gw, "errors", "redis", reason=reason) >= 2, name
        finally:
            undo()
        # Back: answers come from Redis again (after a stopped Redis, once stored again).
        def hit_again():
            return post(gw, TEAM_A, body).header("x-tollgate-cache") == "hit"
        harness.wait_until(hit_again, f"a cache hit after {name}", timeout_s=20)
        calls = len(relay.requests())
    assert gw.counter("tollgate_requests_total", client="team-a", outcome="error") == 0


def test_redis_entries_expire_and_hold_no_secret(start_gateway, providers, redis, webdis):
    relay, backup = providers
    gw = start_gateway(plugin({"backend": "redis", "ttl_s": 120}, **REDIS_CACHE),
                       provider_urls(relay, backup), webdis=webdis.addr)
    post(gw, TEAM_A, chat_body("gpt-4.1", content="expiry", temperature=0))
    stored(gw, "redis", 1)
    keys = redis.cli("KEYS", "*").split()
    assert len(keys) == 1 and keys[0].startswith("tollgate:cache:v1:"), keys
    assert 0 < int(redis.cli("TTL", keys[0])) <= 120
    value = redis.cli("GET", keys[0])
    for secret in (TEAM_A, harness.PROVIDER_KEY, "team-a"):
        assert secret not in value and secret not in keys[0]


def test_the_demo_caches_gpt_4_1_at_temperature_0(start_gateway, providers):
    """envoy/demo.yaml (`make run`) caches `gpt-4.1` requests with temperature 0 locally: a new
    user sees a hit on the second identical request, and nothing else changes."""
    relay, backup = providers
    demo = render_envoy.plugin_config(render_envoy.load())
    gw = start_gateway(demo, provider_urls(relay, backup))
    key = "sk-tollgate-demo"
    body = chat_body("gpt-4.1", content="Hello!", temperature=0)
    first, second = post(gw, key, body), post(gw, key, body)
    assert (first.header("x-tollgate-cache"), second.header("x-tollgate-cache")) == ("miss", "hit")
    assert second.body == first.body
    plain = chat_body("gpt-4.1", content="Hello!")
    assert [post(gw, key, plain).header("x-tollgate-cache") for _ in range(2)] == ["bypass"] * 2
    assert len(relay.requests()) == 3

"""End to end: token-per-minute limits with the Redis limiter (reserved in the same script call as
the request count, settled in Redis after the response), and what a stream cut off mid-way is
charged, with both backends."""

from __future__ import annotations

import http.client
import json
import threading

import openai
import pytest

import harness
from harness import chat_body, md5_hex, sha256_hex

KEY = "sk-token-team-91c3"
TPM = 2000


def plugin(backend: str, tpm: int = TPM) -> dict:
    config = {
        "clients": [{"name": "token-team", "key_sha256": sha256_hex(KEY),
                     "requests_per_minute": 1000, "tokens_per_minute": tpm}],
        "providers": [{"name": "relay", "cluster": "provider_relay",
                       "api_key_env": harness.PROVIDER_KEY_ENV}],
        "models": [{"match": "gpt-4.1", "providers": ["relay"]}],
    }
    if backend == "redis":
        config["limiter"] = {"backend": "redis", "cluster": "webdis", "on_error": "deny"}
    return config


def tokens_key(minute: float) -> str:
    return f"tokens:{md5_hex(KEY)}:{int(minute)}"


def estimate(body: bytes, max_tokens: int = 0) -> int:
    return -(-len(body) // 4) + max_tokens


@pytest.fixture
def relay(workdir):
    r = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    yield r
    r.stop()


@pytest.fixture(params=["local", "redis"])
def gateway(request, start_gateway, relay, workdir):
    """A routed gateway with a token limit, on either limiter backend."""
    if request.param == "redis":
        redis = request.getfixturevalue("redis")
        webdis = request.getfixturevalue("webdis")
        gw = start_gateway(plugin("redis"), {"relay": {"url": relay.url}}, webdis=webdis.addr)
        return gw, redis
    return start_gateway(plugin("local"), {"relay": {"url": relay.url}}), None


def remaining_tokens(gw, body: bytes) -> int:
    """Sends a request and returns the client's token budget after its reservation."""
    r = gw.post(key=KEY, body=body)
    assert r.status == 200, r.body
    return int(r.header("x-ratelimit-remaining-tokens"))


def test_redis_reserves_and_settles_tokens(start_gateway, relay, redis, webdis):
    gw = start_gateway(plugin("redis"), {"relay": {"url": relay.url}}, webdis=webdis.addr)
    minute = harness.wait_for_fresh_window()
    body = json.dumps(chat_body("gpt-4.1", max_tokens=300)).encode()
    r = gw.post(key=KEY, body=body)
    assert r.status == 200
    assert r.header("x-ratelimit-limit-tokens") == str(TPM)
    assert int(r.header("x-ratelimit-remaining-tokens")) == TPM - estimate(body, 300)
    used = json.loads(r.body)["usage"]["total_tokens"]
    assert used < estimate(body, 300)
    # The worker sends the difference to Redis shortly after the response: the window then
    # holds what the request really used.
    harness.wait_until(lambda: redis.cli("GET", tokens_key(minute)) == str(used),
                       f"the token window to settle at {used}", timeout_s=10)
    ttl_ms = int(redis.cli("PTTL", tokens_key(minute)))
    assert 60_000 < ttl_ms <= 120_000, "the token key expires like the request key"
    assert KEY not in redis.cli("KEYS", "*")


def test_redis_token_budget_is_shared_and_refused_with_rate_limit_error(
        start_gateway, relay, redis, webdis):
    gateways = [start_gateway(plugin("redis"), {"relay": {"url": relay.url}}, webdis=webdis.addr)
                for _ in range(2)]
    minute = harness.wait_for_fresh_window()
    # Another replica (or the older proxy) spent most of the window's tokens.
    redis.cli("SET", tokens_key(minute), str(TPM - 100), "PX", "120000")
    body = json.dumps(chat_body("gpt-4.1", max_tokens=10)).encode()
    assert estimate(body, 10) < 100
    assert remaining_tokens(gateways[0], body) == 100 - estimate(body, 10)

    c = openai.OpenAI(base_url=f"{gateways[1].url}/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}],
                                  max_tokens=500)
    headers = e.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert int(headers["x-ratelimit-remaining-tokens"]) <= 100
    assert int(headers["retry-after"]) >= 1
    assert len(relay.requests()) == 1, "the refused request never reached the provider"
    assert gateways[1].counter("tollgate_requests_total", client="token-team",
                               outcome="rate_limited") == 1
    assert redis.cli("GET", f"rate:{md5_hex(KEY)}:{int(minute)}") == "1", \
        "a request refused for tokens is not counted as a request"


def read_cut_off(gw, body: bytes) -> bytes:
    """POSTs a stream the provider cuts off (a rule set by the caller); returns what the client
    received."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={
            "authorization": f"Bearer {KEY}", "content-type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        try:
            return r.read()
        except http.client.IncompleteRead as e:
            return e.partial
    finally:
        conn.close()


def test_a_cut_off_stream_is_charged_for_what_it_delivered(gateway, relay):
    gw, redis = gateway
    relay.rule("tell me a long story", abort_after=3)
    minute = harness.wait_for_fresh_window()
    probe = json.dumps(chat_body("gpt-4.1", content="probe")).encode()
    r = gw.post(key=KEY, body=probe)
    assert r.status == 200
    probe_used = json.loads(r.body)["usage"]["total_tokens"]

    stream = json.dumps(chat_body("gpt-4.1", content="tell me a long story", stream=True,
                                  max_tokens=500)).encode()
    received = read_cut_off(gw, stream)
    chunks = [e for e in received.decode().split("\n\n") if e.startswith("data: {")]
    assert len(chunks) == 3 and b"[DONE]" not in received, received

    # Charged: its prompt estimate and one token per chunk delivered, not its 500 max_tokens;
    # settled once.
    charged = estimate(stream) + len(chunks)
    if redis is not None:
        harness.wait_until(
            lambda: redis.cli("GET", tokens_key(minute)) == str(probe_used + charged),
            f"the token window to settle at {probe_used} + {charged}", timeout_s=10)
    assert remaining_tokens(gw, probe) == TPM - probe_used - charged - estimate(probe)


def test_a_burst_settles_every_request_exactly_once(gateway, relay):
    """A client's key fires 8 connections x 3 requests at once, each reserving far more than it
    uses (`max_tokens` 40). While others are in flight a worker sums its requests' settlements
    and counters in its batch, and writes them as its last request ends or on its tick
    (docs/limiters.md#token-limits): afterwards the budget is exactly the limit less what the
    provider reported, and every request and token is counted once (no settlement lost, none
    applied twice, no unused estimate kept)."""
    gw, redis = gateway
    minute = harness.wait_for_fresh_window()
    body = json.dumps(chat_body("gpt-4.1", content="a burst", max_tokens=40)).encode()
    assert 24 * estimate(body, 40) < TPM, "every request of the burst fits the minute"
    used: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        start.wait()
        mine = []
        for _ in range(3):
            r = gw.post(key=KEY, body=body, conn=conn)
            assert r.status == 200, r.body
            mine.append(json.loads(r.body)["usage"]["total_tokens"])
        conn.close()
        with lock:
            used.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(used) == 24, "a client thread failed"
    assert len(relay.requests()) == 24
    total = sum(used)
    assert gw.counter("tollgate_requests_total", client="token-team", outcome="admitted") == 24
    counted = sum(gw.counter("tollgate_tokens_total", client="token-team", model="gpt-4_1", kind=k)
                  for k in ("prompt", "completion"))
    assert counted == total
    if redis is not None:
        harness.wait_until(lambda: redis.cli("GET", tokens_key(minute)) == str(total),
                           f"the token window to settle at {total}", timeout_s=10)
    probe = json.dumps(chat_body("gpt-4.1", content="probe")).encode()
    assert remaining_tokens(gw, probe) == TPM - total - estimate(probe)

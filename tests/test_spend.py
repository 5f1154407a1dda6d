"""End to end: prices, spend per client and model in micro-units, and budgets over days and
months, with real Envoy, Redis (through Webdis) and the OpenAI SDK."""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import threading

import openai
import pytest

import harness
from harness import chat_body, provider_urls, sha256_hex

KEY = "sk-spend-team-5c7e"
CLIENT = "spend-team"
MILLION = 1_000_000

# Per million tokens, in micro-units: $2.50 in, $1.25 cached in, $10 out.
PRICE = {"input": 2_500_000, "cached": 1_250_000, "output": 10_000_000}


def plugin(budgets=None, limiter=None, prices=None) -> dict:
    client = {"name": CLIENT, "key_sha256": sha256_hex(KEY), "requests_per_minute": 1000}
    if budgets:
        client["budgets"] = budgets
    cfg = {
        "clients": [client],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay", "backup"]},
                   {"match": "cheap", "providers": ["relay"], "upstream_model": "gpt-4.1-mini"}],
        "prices": prices or [
            {"model": "gpt-4.1", "input_per_million_tokens": 2.5,
             "cached_input_per_million_tokens": 1.25, "output_per_million_tokens": 10},
            {"model": "gpt-4.1-mini", "input_per_million_tokens": 0.4,
             "output_per_million_tokens": 1.6},
        ],
    }
    if limiter:
        cfg["limiter"] = limiter
    return cfg


def cost(u, price=PRICE) -> int:
    """The price table applied to one response's usage, rounded up to the micro-unit."""
    details = getattr(u, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details else 0
    total = ((u.prompt_tokens - cached) * price["input"] + cached * price["cached"]
             + u.completion_tokens * price["output"])
    return math.ceil(total / MILLION)


def spend(gw, model: str = "gpt-4_1") -> int:
    return int(gw.counter("tollgate_spend_micros_total", client=CLIENT, model=model))


def sdk(gw, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=retries, timeout=30)


def budgets(gw) -> dict:
    r = harness.request(gw.url, "GET", "/v1/tollgate/budgets", [("authorization", f"Bearer {KEY}")])
    assert r.status == 200, r.body
    return r.json()


def test_spend_to_the_micro_unit_for_json_stream_cached_and_reasoning_answers(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), provider_urls(relay, backup))
    c = sdk(gw)
    expected = 0

    r = c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "price this"}])
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    expected += cost(r.usage)
    assert spend(gw) == expected > 0

    chunks = list(c.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "price this stream"}], stream=True,
        stream_options={"include_usage": True}))
    expected += cost(chunks[-1].usage)
    assert spend(gw) == expected

    relay.rule("cached-marker", cached_tokens=6, times=1)
    r = c.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "cached-marker with a long shared prefix"}])
    assert r.usage.prompt_tokens_details.cached_tokens == 6
    expected += cost(r.usage)
    assert spend(gw) == expected

    relay.rule("reasoning-marker", reasoning_tokens=3, times=2)
    r = c.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "reasoning-marker think first"}])
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    expected += cost(r.usage)  # reasoning tokens are output tokens, already in completion_tokens
    chunks = list(c.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "reasoning-marker stream it"}],
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 3
    expected += cost(chunks[-1].usage)
    assert spend(gw) == expected

    # An alias is billed as the provider's model, at its own price.
    r = c.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "aliased"}])
    mini = {"input": 400_000, "cached": 400_000, "output": 1_600_000}
    assert spend(gw, "gpt-4_1-mini") == cost(r.usage, mini) > 0
    assert spend(gw) == expected


def cheap_prices() -> list[dict]:
    # Input free, output $1 per million: one micro-unit per output token. With max_tokens 5
    # every answer is 5 tokens, so a request reserves exactly what it costs (5 micro-units).
    return [{"model": "gpt-4.1", "input_per_million_tokens": 0, "output_per_million_tokens": 1}]


def five_token_body(marker: str = "budget") -> bytes:
    return chat_body("gpt-4.1", content=f"{marker} one two three four five six", max_tokens=5)


def redis_plugin(budget_micros: int) -> dict:
    return plugin(
        budgets=[{"window": "day", "money": budget_micros / MILLION}, {"window": "month", "requests": 100000}],
        limiter={"backend": "redis", "cluster": "webdis", "timeout_ms": 1000, "on_error": "deny"},
        prices=cheap_prices(),
    )


def concurrent_posts(gateways, n: int, body: bytes) -> list[tuple[int, dict]]:
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one(i: int):
        gw = gateways[i % len(gateways)]
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        start.wait()
        r = gw.post(key=KEY, body=body, conn=conn)
        conn.close()
        with lock:
            results.append((r.status, dict(r.headers), r.body))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n, "a client thread failed"
    return results


def test_a_daily_money_budget_refuses_exactly_at_the_budget_across_two_envoys(
        start_gateway, providers, redis, webdis):
    relay, backup = providers
    budget = 100  # micro-units: 20 requests of 5
    gateways = [start_gateway(redis_plugin(budget), provider_urls(relay, backup), webdis=webdis.addr)
                for _ in range(2)]
    results = concurrent_posts(gateways, 40, five_token_body())
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 20
    assert len(relay.requests()) == 20
    refused = [(h, json.loads(b)) for s, h, b in results if s == 429]
    for headers, body in refused:
        assert body["error"]["type"] == "insufficient_quota"
        assert body["error"]["code"] == "insufficient_quota"
        assert headers["x-tollgate-budget"] == "money-per-day"
        assert headers["x-tollgate-budget-limit"] == "0.0001"
        assert headers["x-should-retry"] == "false"
        assert 0 < int(headers["x-tollgate-budget-reset"]) <= 86400
    # Spent exactly the budget, on both Envoys together, and Redis and the endpoint agree.
    assert spend(gateways[0]) + spend(gateways[1]) == budget
    assert spend(gateways[0]) > 0 and spend(gateways[1]) > 0
    for gw in gateways:
        day = budgets(gw)["budgets"][0]
        assert day["window"] == "day"
        assert (day["money"]["limit"], day["money"]["used"], day["money"]["remaining"]) == (budget, budget, 0)
        assert day["requests"]["used"] == 20
    keys = redis.cli("KEYS", f"tollgate:budget:{CLIENT}:day:*:money").split()
    assert len(keys) == 1 and redis.cli("GET", keys[0]) == str(budget)

    # `tollgate spend` reads the same figure from the spend records the root ticks write.
    def cli_total():
        r = subprocess.run(
            [str(harness.ROOT / "target" / "release" / "tollgate"), "spend", "--redis", f"127.0.0.1:{redis.port}",
             "--password-env", "REDIS_PW", "--window", "day", "--json"],
            capture_output=True, text=True, timeout=30, env={**os.environ, "REDIS_PW": harness.REDIS_PASSWORD})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        return out["total_micros"] == budget and out
    out = harness.wait_until(cli_total, "the spend records to reach Redis", timeout_s=10)
    assert out["spend"] == [{"client": CLIENT, "model": "gpt-4.1", "micros": budget}]


def test_a_budget_survives_an_envoy_restart_with_redis(start_gateway, providers, redis, webdis):
    relay, backup = providers
    first = start_gateway(redis_plugin(20), provider_urls(relay, backup), webdis=webdis.addr)
    for _ in range(3):
        assert first.post(key=KEY, body=five_token_body()).status == 200
    first.stop()
    second = start_gateway(redis_plugin(20), provider_urls(relay, backup), webdis=webdis.addr)
    assert budgets(second)["budgets"][0]["money"]["used"] == 15
    assert second.post(key=KEY, body=five_token_body()).status == 200
    r = second.post(key=KEY, body=five_token_body())
    assert r.status == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert budgets(second)["budgets"][0]["money"]["remaining"] == 0


def test_the_budget_endpoint_agrees_with_the_metrics_after_settlement(start_gateway, providers, redis, webdis):
    """A reservation above the cost (max_tokens 50, answers of 13 tokens) is settled down to
    the reported usage by the root tick; the endpoint then shows what the metric counts."""
    relay, backup = providers
    gw = start_gateway(redis_plugin(10_000), provider_urls(relay, backup), webdis=webdis.addr)
    body = chat_body("gpt-4.1", content="settle one two three four five six seven eight", max_tokens=50)
    for _ in range(3):
        assert gw.post(key=KEY, body=body).status == 200

    def agreed():
        day = budgets(gw)["budgets"][0]
        # One micro-unit per output token: 3 answers of 13 ("Mock reply from relay:" + 9 words).
        return day["money"]["used"] == spend(gw) == 3 * 13 and day
    day = harness.wait_until(agreed, "the settlements to reach Redis", timeout_s=10)
    assert day["tokens"]["used"] == sum(
        int(gw.counter("tollgate_tokens_total", client=CLIENT, model="gpt-4_1", kind=k))
        for k in ("prompt", "completion"))


def test_local_budgets_refuse_with_insufficient_quota_and_the_sdk_does_not_retry(start_gateway, providers):
    relay, backup = providers
    cfg = plugin(budgets=[{"window": "month", "money": 0.00001}], prices=cheap_prices(),
                 limiter={"backend": "local", "budgets_on_restart": "reset"})
    gw = start_gateway(cfg, provider_urls(relay, backup))
    c = sdk(gw, retries=2)
    for _ in range(2):
        c.chat.completions.create(model="gpt-4.1", max_tokens=5,
                                  messages=[{"role": "user", "content": "one two three four five six"}])
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4.1", max_tokens=5,
                                  messages=[{"role": "user", "content": "one two three four five six"}])
    assert e.value.code == "insufficient_quota"
    assert e.value.response.headers["x-tollgate-budget"] == "money-per-month"
    # x-should-retry: false: the SDK asked once, not three times.
    assert gw.counter("tollgate_requests_total", client=CLIENT, outcome="rate_limited") == 1
    assert len(relay.requests()) == 2
    month = budgets(gw)["budgets"][0]
    assert (month["money"]["used"], month["money"]["remaining"]) == (10, 0)
    assert budgets(gw)["limiter"] == "local"


def test_the_demo_budget_is_reached_by_a_few_large_requests(start_gateway, providers):
    """The README's demo: the demo client's 0.02 USD a day, prompts of 10 200 characters."""
    relay, backup = providers
    demo = harness.render_envoy.plugin_config(harness.render_envoy.load())
    gw = start_gateway(demo, provider_urls(relay, backup))
    big = "lorem ipsum " * 850
    demo_key = "sk-tollgate-demo"
    statuses = [gw.post(key=demo_key, body=chat_body("gpt-4.1", content=big)).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    r = gw.post(key=demo_key, body=chat_body("gpt-4.1", content=big))
    assert r.json()["error"]["code"] == "insufficient_quota"
    assert r.header("x-tollgate-budget") == "money-per-day"
    spent = int(gw.counter("tollgate_spend_micros_total", client="demo", model="gpt-4_1"))
    r = harness.request(gw.url, "GET", "/v1/tollgate/budgets", [("authorization", f"Bearer {demo_key}")])
    day = r.json()["budgets"][0]
    assert (day["money"]["limit"], day["money"]["used"]) == (20_000, spent)
    assert 15_000 < spent <= 20_000

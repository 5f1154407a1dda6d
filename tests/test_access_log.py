"""End to end: every request Tollgate decides is attributable in the JSON access log. For each
outcome (admitted, each refusal, cache hit, limiter fail-open, unauthenticated, and a request
Envoy refused before Tollgate saw it) the test reads the line and checks every documented field
Tollgate writes (docs/metrics.md#access-log): what is there, and that the others are null."""

from __future__ import annotations

import json

import pytest

import harness
from harness import chat_body, sha256_hex

KEY = "sk-log-team-5c1d"
SLOW = "sk-log-slow-0b7e"
TINY = "sk-log-tiny-93fa"
DOCUMENTED = {"client", "model", "outcome", "reason", "cache", "limiter_error",
              "prompt_tokens", "completion_tokens", "provider", "cost_micros"}
# gpt-4.1 is priced (micro-USD per token = USD per million tokens); gpt-4.1-mini is not.
PRICES = [{"model": "gpt-4.1", "input_per_million_tokens": 2, "output_per_million_tokens": 8}]


def cost(usage: dict) -> str:
    return str(usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8)


def plugin(**extra) -> dict:
    return {
        "access_log": True,
        "clients": [
            {"name": "log-team", "key_sha256": sha256_hex(KEY), "requests_per_minute": 1000,
             "models": ["gpt-4.1", "gpt-4.1-mini", "unknown-*"]},
            {"name": "log-slow", "key_sha256": sha256_hex(SLOW), "requests_per_minute": 1},
            {"name": "log-tiny", "key_sha256": sha256_hex(TINY), "requests_per_minute": 1000,
             "tokens_per_minute": 10},
        ],
        "providers": [{"name": "relay", "cluster": "provider_relay",
                       "api_key_env": harness.PROVIDER_KEY_ENV},
                      {"name": "backup", "cluster": "provider_backup",
                       "api_key_env": harness.BACKUP_KEY_ENV}],
        "prices": PRICES,
        "models": [
            {"match": "gpt-4.1", "providers": ["relay", "backup"]},
            {"match": "gpt-4.1-mini", "providers": ["relay"], "cache": {"backend": "local"}},
            {"match": "o1", "providers": ["relay"]},
        ],
        **extra,
    }


@pytest.fixture
def relay(workdir):
    r = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    yield r
    r.stop()


@pytest.fixture
def backup(workdir):
    b = harness.MockProvider(workdir, name="backup", expect_key=harness.BACKUP_KEY)
    yield b
    b.stop()


def urls(relay, backup) -> dict:
    return {"relay": {"url": relay.url}, "backup": {"url": backup.url}}


def log_lines(gw, count: int) -> list[dict]:
    """The first `count` access-log lines, once Envoy has flushed them."""
    def lines():
        found = [json.loads(ln) for ln in gw.log().splitlines() if ln.startswith("{")]
        return found if len(found) >= count else None
    return harness.wait_until(lines, f"{count} access-log lines", timeout_s=15)[:count]


def fields(line: dict) -> dict | None:
    """Tollgate's fields of the line that have a value (None when Tollgate decided nothing).
    Every one is on every line, null when not set, and every value is a string."""
    assert DOCUMENTED <= set(line), line
    got = {k: line[k] for k in DOCUMENTED if line[k] is not None}
    assert all(isinstance(v, str) for v in got.values()), line
    return got or None


def test_every_outcome_is_logged_with_its_fields(start_gateway, relay, backup):
    gw = start_gateway(plugin(), urls(relay, backup))
    harness.wait_for_fresh_window()
    body = lambda model, **kw: json.dumps(chat_body(model, **kw)).encode()  # noqa: E731

    admitted = gw.post(key=KEY, body=body("gpt-4.1"))
    assert admitted.status == 200
    usage = admitted.json()["usage"]
    assert gw.post(key="sk-not-a-client", body=body("gpt-4.1")).status == 401
    assert gw.post(key=KEY, body=body("o1")).status == 403
    assert gw.post(key=KEY, body=body("unknown-model")).status == 404
    assert gw.post(key=KEY, path="/v1/nothing-here").status == 404
    assert gw.post(key=KEY, body=b"{not json").status == 400
    slow = gw.post(key=SLOW, body=body("gpt-4.1"))
    assert slow.status == 200
    assert gw.post(key=SLOW, body=body("gpt-4.1")).status == 429
    assert gw.post(key=TINY, body=body("gpt-4.1", max_tokens=100)).status == 429
    miss = gw.post(key=KEY, body=body("gpt-4.1-mini", temperature=0))
    assert miss.header("x-tollgate-cache") == "miss"
    harness.wait_until(lambda: gw.counter("tollgate_cache_stores_total", backend="local",
                                          model="gpt-4_1-mini") >= 1, "the response stored")
    hit = gw.post(key=KEY, body=body("gpt-4.1-mini", temperature=0))
    assert hit.header("x-tollgate-cache") == "hit"
    # Refused by Envoy itself (an escaped slash): Tollgate decided nothing.
    assert harness.request(gw.url, "POST", "/v1%2Fchat/completions",
                           [("authorization", f"Bearer {KEY}")], chat_body()).status == 400

    lines = log_lines(gw, 12)
    got = [(line["status"], fields(line)) for line in lines]
    team = {"client": "log-team"}
    mini_usage = miss.json()["usage"]
    assert got == [
        (200, {**team, "model": "gpt-4.1", "outcome": "admitted",
               "prompt_tokens": str(usage["prompt_tokens"]),
               "completion_tokens": str(usage["completion_tokens"]),
               "provider": "relay", "cost_micros": cost(usage)}),
        (401, {"outcome": "unauthorized", "reason": "invalid_api_key"}),
        (403, {**team, "model": "o1", "outcome": "invalid", "reason": "model_not_allowed"}),
        (404, {**team, "model": "unknown-model", "outcome": "invalid",
               "reason": "model_not_found"}),
        (404, {**team, "outcome": "invalid", "reason": "unknown_url"}),
        (400, {**team, "outcome": "invalid", "reason": "malformed_body"}),
        (200, {"client": "log-slow", "model": "gpt-4.1", "outcome": "admitted",
               "prompt_tokens": str(slow.json()["usage"]["prompt_tokens"]),
               "completion_tokens": str(slow.json()["usage"]["completion_tokens"]),
               "provider": "relay", "cost_micros": cost(slow.json()["usage"])}),
        (429, {"client": "log-slow", "model": "gpt-4.1", "outcome": "rate_limited",
               "reason": "requests_per_minute"}),
        (429, {"client": "log-tiny", "model": "gpt-4.1", "outcome": "rate_limited",
               "reason": "tokens_per_minute"}),
        (200, {**team, "model": "gpt-4.1-mini", "outcome": "admitted", "cache": "miss",
               "prompt_tokens": str(mini_usage["prompt_tokens"]),
               "completion_tokens": str(mini_usage["completion_tokens"]), "provider": "relay"}),
        (200, {**team, "model": "gpt-4.1-mini", "outcome": "admitted", "cache": "hit"}),
        (400, None),
    ]
    assert KEY not in json.dumps(lines) and harness.PROVIDER_KEY not in json.dumps(lines)
    # Every refusal Tollgate answered is counted by client, model rule and reason.
    refusals = {(line["client"] or "_anonymous", line["reason"]) for line in lines if line["reason"]}
    rules = {"requests_per_minute": "gpt-4_1", "tokens_per_minute": "gpt-4_1",
             "model_not_allowed": "o1"}
    for client, reason in sorted(refusals):
        model = "_none" if client == "_anonymous" else rules.get(reason, "_none")
        assert gw.counter("tollgate_refusals_total", client=client, model=model,
                          reason=reason) == 1, (client, reason)
    assert len(refusals) == 7
    # Nothing went upstream for a refusal or a cache hit; one try for each admitted request.
    assert [line["attempts"] for line in lines] == [1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0]


def test_the_fields_are_opt_in(start_gateway, relay, backup):
    """Without `access_log` Tollgate sets no property (four host calls fewer per admitted
    request): Envoy still writes every line with its own fields, and Tollgate's are null, for an
    admitted request and for a refusal alike."""
    config = plugin()
    del config["access_log"]
    gw = start_gateway(config, urls(relay, backup))
    harness.wait_for_fresh_window()
    assert gw.post(key=KEY, body=json.dumps(chat_body("gpt-4.1")).encode()).status == 200
    assert gw.post(key="sk-not-a-client").status == 401
    lines = log_lines(gw, 2)
    assert [(line["status"], fields(line)) for line in lines] == [(200, None), (401, None)]
    assert [line["attempts"] for line in lines] == [1, 0]
    assert len(relay.requests()) == 1
    assert gw.counter("tollgate_requests_total", client="log-team", outcome="admitted") == 1


def test_the_provider_that_answered_and_the_charge_are_logged(start_gateway, relay, backup):
    """The relay fails with a 503 and the backup answers: `provider` names the backup (the
    answer the client got), `attempts` says two tries, and the charge is the backup's usage
    priced; a stream is charged from its final usage chunk."""
    gw = start_gateway(plugin(), urls(relay, backup))
    relay.rule("log-fall-back", status=503, times=1)
    r = gw.post(key=KEY, body=json.dumps(chat_body("gpt-4.1", content="log-fall-back")).encode())
    assert r.status == 200 and r.header("x-mock-name") == "backup"
    stream = gw.post(key=KEY, body=json.dumps(chat_body(
        "gpt-4.1", stream=True, stream_options={"include_usage": True})).encode())
    assert stream.status == 200
    usage = [json.loads(ln[6:]) for ln in stream.body.decode().splitlines()
             if ln.startswith("data: {")][-1]["usage"]
    fell_back, streamed = log_lines(gw, 2)
    assert fell_back["attempts"] == 2
    assert fields(fell_back) == {
        "client": "log-team", "model": "gpt-4.1", "outcome": "admitted", "provider": "backup",
        "prompt_tokens": str(r.json()["usage"]["prompt_tokens"]),
        "completion_tokens": str(r.json()["usage"]["completion_tokens"]),
        "cost_micros": cost(r.json()["usage"])}
    assert streamed["attempts"] == 1
    assert fields(streamed) == {
        "client": "log-team", "model": "gpt-4.1", "outcome": "admitted", "provider": "relay",
        "prompt_tokens": str(usage["prompt_tokens"]),
        "completion_tokens": str(usage["completion_tokens"]), "cost_micros": cost(usage)}
    assert gw.counter("tollgate_spend_micros_total", client="log-team", model="gpt-4_1") == \
        int(cost(r.json()["usage"])) + int(cost(usage))


def test_a_limiter_failing_open_is_logged(start_gateway, relay, backup):
    """The Redis limiter is unreachable and `on_error: allow`: the request is admitted without
    limits, and the log says which limiter failed and why."""
    dead = f"127.0.0.1:{harness.free_port()}"
    limiter = {"backend": "redis", "cluster": "webdis", "on_error": "allow", "timeout_ms": 200}
    gw = start_gateway(plugin(limiter=limiter), urls(relay, backup), webdis=dead)
    r = gw.post(key=KEY, body=json.dumps(chat_body("gpt-4.1")).encode())
    assert r.status == 200
    (line,) = log_lines(gw, 1)
    got = fields(line)
    assert got.pop("limiter_error").startswith("redis:"), line
    usage = r.json()["usage"]
    assert got == {"client": "log-team", "model": "gpt-4.1", "outcome": "admitted",
                   "prompt_tokens": str(usage["prompt_tokens"]),
                   "completion_tokens": str(usage["completion_tokens"]),
                   "provider": "relay", "cost_micros": cost(usage)}


def test_the_otlp_example_validates(tmp_path):
    """docs/examples/otel-access-log.yaml, added to the demo bootstrap, passes
    `envoy --mode validate` (which also loads the module and runs its configuration)."""
    import render_envoy
    import yaml
    from test_envoy_configs import validate

    example = yaml.safe_load((harness.ROOT / "docs" / "examples" / "otel-access-log.yaml").read_text())
    cfg = render_envoy.load()
    render_envoy._hcm(cfg)["access_log"].extend(example["access_log"])
    cfg["static_resources"]["clusters"].extend(example["clusters"])
    path = tmp_path / "otel.yaml"
    path.write_text(render_envoy.dump(cfg))
    r = validate(path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr

"""End to end: token usage read from JSON and SSE responses, counted per client, model and
kind, and written to the JSON access log with the client's name (never its key)."""

from __future__ import annotations

import json
import re

import openai
import pytest

import harness
from harness import PROVIDER_KEY, chat_body, provider_urls, sha256_hex

KEY = "sk-usage-team-77aa"


def routed() -> dict:
    return {
        "access_log": True,
        "clients": [{"name": "usage-team", "key_sha256": sha256_hex(KEY), "requests_per_minute": 1000}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay", "backup"]}],
    }


@pytest.fixture
def setup(start_gateway, providers):
    relay, backup = providers
    return start_gateway(routed(), provider_urls(relay, backup)), relay


def tokens(gw, kind: str) -> float:
    return gw.counter("tollgate_tokens_total", client="usage-team", model="gpt-4_1", kind=kind)


def access_log(gw, path: str, count: int) -> list[dict]:
    """The access-log lines for `path`, once `count` of them are written (Envoy flushes its
    access log about once a second)."""
    def lines():
        found = [json.loads(l) for l in gw.log().splitlines() if l.startswith("{")]
        found = [l for l in found if l["path"] == path]
        return found if len(found) >= count else None
    return harness.wait_until(lines, f"{count} access-log lines for {path}", timeout_s=15)


def test_json_and_stream_usage_is_counted_and_logged(setup):
    gw, relay = setup
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    r = c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "count my tokens please"}])
    prompt, completion = r.usage.prompt_tokens, r.usage.completion_tokens
    assert prompt > 0 and completion > 0
    assert (tokens(gw, "prompt"), tokens(gw, "completion")) == (prompt, completion)

    chunks = list(c.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "and stream them"}], stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert (tokens(gw, "prompt"), tokens(gw, "completion")) == (
        prompt + usage.prompt_tokens, completion + usage.completion_tokens)

    logs = access_log(gw, "/v1/chat/completions", 2)
    assert len(logs) == 2
    for line, u in zip(logs, [r.usage, usage]):
        assert line["client"] == "usage-team"
        assert line["model"] == "gpt-4.1"
        assert line["status"] == 200
        assert line["prompt_tokens"] == str(u.prompt_tokens)
        assert line["completion_tokens"] == str(u.completion_tokens)
        assert line["upstream_cluster"] == "tollgate_route_r0"
    assert KEY not in gw.log() and PROVIDER_KEY not in gw.log()
    # The provider got an uncompressed response to read: accept-encoding is not forwarded.
    for req in relay.requests():
        assert "accept-encoding" not in [n for n, _ in req["headers"]]


def test_refused_requests_are_logged_without_tokens(setup):
    gw, _ = setup
    assert gw.post(key="sk-nope").status == 401
    assert gw.post(key=KEY, body=chat_body("unknown")).status == 404
    logs = access_log(gw, "/v1/chat/completions", 2)
    assert [l["status"] for l in logs] == [401, 404]
    assert logs[0]["client"] is None
    assert logs[1]["prompt_tokens"] is None


def test_token_budget_refuses_what_it_cannot_cover(start_gateway, providers):
    relay, backup = providers
    plugin = routed()
    plugin["clients"][0]["tokens_per_minute"] = 500
    gw = start_gateway(plugin, provider_urls(relay, backup))
    harness.wait_for_fresh_window()
    body = json.dumps(chat_body("gpt-4.1", max_tokens=100)).encode()
    r = gw.post(key=KEY, body=body)
    assert r.status == 200
    assert r.header("x-ratelimit-limit-tokens") == "500"
    estimate = -(-len(body) // 4) + 100
    assert int(r.header("x-ratelimit-remaining-tokens")) == 500 - estimate
    assert r.header("x-ratelimit-reset-tokens").endswith("s")

    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}],
                                  max_tokens=1000)
    err = e.value.body if isinstance(e.value.body, dict) else {}
    assert e.value.code == "rate_limit_exceeded"
    assert err.get("type") == "tokens" or "tokens per minute" in str(e.value)
    headers = e.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "500"
    assert int(headers["retry-after"]) >= 1
    assert len(relay.requests()) == 1, "the refused request never reached a provider"
    assert gw.counter("tollgate_requests_total", client="usage-team", outcome="rate_limited") == 1


def events(raw: bytes) -> list:
    """A stream's data events, without the fields that differ between responses."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.startswith("data: "):
            continue
        data = block.removeprefix("data: ")
        if data == "[DONE]":
            out.append(data)
            continue
        chunk = json.loads(data)
        for volatile in ("id", "created"):
            chunk.pop(volatile, None)
        out.append(chunk)
    return out


def test_every_stream_reports_usage_and_the_client_sees_its_own_stream(setup):
    gw, relay = setup
    body = chat_body("gpt-4.1", content="stream without asking for usage", stream=True)
    through = gw.post(key=KEY, body=body)
    assert through.status == 200
    (seen,) = relay.requests()
    sent = json.loads(seen["body"])
    assert sent["stream_options"] == {"include_usage": True}, "the gateway asked for usage"
    direct = harness.request(relay.url, "POST", "/v1/chat/completions",
                             [("authorization", f"Bearer {PROVIDER_KEY}")], body)
    assert events(through.body) == events(direct.body), "chunk for chunk what the client asked for"
    assert all(isinstance(e, str) or "usage" not in e for e in events(through.body))
    # ... and the tokens were counted all the same.
    assert tokens(gw, "prompt") > 0 and tokens(gw, "completion") > 0

    # A client that asks for usage gets the usage chunk.
    asked = gw.post(key=KEY, body=chat_body("gpt-4.1", stream=True, stream_options={"include_usage": True}))
    chunks = events(asked.body)
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["total_tokens"] > 0


def test_durations_are_histograms_by_model(setup):
    gw, _ = setup
    assert gw.post(key=KEY, body=chat_body("gpt-4.1")).status == 200
    assert gw.post(key=KEY, body=chat_body("gpt-4.1", stream=True)).status == 200

    def histograms():
        text = gw.stats_text()
        names = ("tollgate_request_duration_ms_count", "tollgate_stream_first_byte_ms_count")
        found = {n: v for fam, labels, v in harness.parse_prometheus(text)
                 for n in names if fam == n and labels.get("model") == "gpt-4_1"}
        want = {"tollgate_request_duration_ms_count": 2, "tollgate_stream_first_byte_ms_count": 1}
        return found if found == want else None

    # Envoy publishes histogram samples at its stats flush (every 5 s by default); the bound
    # fails the test if the samples never arrive or their counts are wrong.
    harness.wait_until(histograms, "2 request durations and 1 first-byte time for gpt-4_1", timeout_s=20)


def test_every_label_the_filter_encodes_has_a_stats_tag(setup):
    """Labels live in metric names (`.client=team`); the bootstrap's stats_tags turn them into
    Prometheus labels. Every label name in the metrics the filter defined must have its tag."""
    gw, _ = setup
    gw.post(key=KEY, body=chat_body("gpt-4.1"))
    gw.post(key=KEY, body=chat_body("gpt-4.1", stream=True))
    names = harness.request(gw.admin, "GET", "/stats?filter=^wasmcustom%5C.").body.decode()
    encoded = set(re.findall(r"\.([a-z]+)=", names))
    assert {"client", "outcome", "model", "kind", "provider"} <= encoded, encoded
    tags = {t["tag_name"] for t in harness.render_envoy.load()["stats_config"]["stats_tags"]}
    assert encoded <= tags, encoded - tags


def test_one_provider_mode_streams_pass_untouched_and_pay_for_their_chunks(start_gateway, mock):
    """Without model routing (the Istio and Envoy Gateway mode) bodies are not read: a stream
    goes through as sent, and one without usage is charged its prompt estimate (from
    content-length) plus one token per chunk delivered."""
    plugin = harness.default_plugin_config(
        [{"name": "usage-team", "key_sha256": sha256_hex(KEY), "tokens_per_minute": 100000}])
    gw = start_gateway(plugin, mock.url)
    harness.wait_for_fresh_window()
    raw = json.dumps(chat_body("gpt-4.1", content="one provider stream", stream=True)).encode()
    through = gw.post(key=KEY, body=raw)
    assert through.status == 200
    (seen,) = mock.requests()
    assert "stream_options" not in json.loads(seen["body"]), "the body is forwarded as sent"
    estimate = -(-len(raw) // 4)
    assert int(through.header("x-ratelimit-remaining-tokens")) == 100000 - estimate
    chunks = [e for e in events(through.body) if not isinstance(e, str)]
    probe = json.dumps(chat_body("gpt-4.1")).encode()
    after = gw.post(key=KEY, body=probe)
    assert int(after.header("x-ratelimit-remaining-tokens")) == \
        100000 - estimate - len(chunks) - (-(-len(probe) // 4))

"""End to end: the provider failing in the ways docs/hardening.md lists (down, slow, stalling or
cut mid-stream, answering garbage), what the client sees each time, and that the gateway
recovers by itself when the provider does. Limiter faults are in test_redis_limiter.py, a bad
configuration pushed at runtime in test_config_push.py, provider fallback in test_routing.py."""

from __future__ import annotations

import json
import socket

import pytest

import harness
from harness import chat_body, sha256_hex

KEY = "sk-faults-team-0c1d"


def plugin() -> dict:
    return {
        "clients": [{"name": "faults", "key_sha256": sha256_hex(KEY), "requests_per_minute": 100000,
                     "tokens_per_minute": 100000000}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay"]},
                   {"match": "fallback", "providers": ["relay", "backup"]}],
    }


def raw_post(gw, body: dict, headers: bytes = b"") -> bytes:
    """One request on a raw connection; everything until the gateway closes it (10 s bound)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer "
                  + KEY.encode() + b"\r\ncontent-type: application/json\r\n" + headers
                  + b"content-length: %d\r\n\r\n" % len(data) + data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def access_log(gw, count: int) -> list[dict]:
    def lines():
        found = [json.loads(l) for l in gw.log().splitlines() if l.startswith("{")]
        return found if len(found) >= count else None
    return harness.wait_until(lines, f"{count} access-log lines", timeout_s=15)


def tokens(gw) -> float:
    return sum(gw.counter("tollgate_tokens_total", client="faults", model="gpt-4_1", kind=k)
               for k in ("prompt", "completion"))


def test_a_stream_cut_or_stalled_mid_way_reaches_the_client_as_a_cut_stream(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), {"relay": {"url": relay.url, "idle_timeout_ms": 500}, "backup": {"url": backup.url}})
    # Cut: the provider closes the connection after two events.
    relay.rule("cut-after-two", abort_after=2)
    cut = raw_post(gw, chat_body(content="cut-after-two", stream=True))
    # Stalled: the provider stops sending for longer than the route's idle timeout.
    relay.rule("stall-mid-stream", chunk_delay_ms=2000)
    stalled = raw_post(gw, chat_body(content="stall-mid-stream a b c", stream=True))
    for out in (cut, stalled):
        assert out.startswith(b"HTTP/1.1 200"), out[:40]
        assert b"data: {" in out
        assert b"[DONE]" not in out and not out.endswith(b"0\r\n\r\n"), "the stream must end cut, not complete"
    # The filter read no usage from either (none was sent), and the gateway says why it ended.
    assert tokens(gw) == 0
    flags = [l["response_flags"] for l in access_log(gw, 2)]
    assert flags[0] in ("UPE", "UC", "UR") and flags[1] == "SI", flags
    assert gw.counter("tollgate_requests_total", client="faults", outcome="admitted") == 2
    # Cut streams are not retried, even on a rule with a fallback: the client got a 200 already.
    backup.clear()
    relay.rule("cut-after-one", abort_after=1)
    raw_post(gw, chat_body("fallback", content="cut-after-one", stream=True))
    assert backup.requests() == []
    assert gw.post(key=KEY, body=chat_body(stream=True)).status == 200


def test_a_provider_that_answers_garbage_is_passed_through_untouched(start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), harness.provider_urls(relay, backup))
    for i, garbage in enumerate(("not json at all", '{"usage": "lots"}', '{"usage": {"prompt_tokens": -5}}',
                                 "[" * 5000)):
        relay.rule(f"garbage-{i}-", error_body=garbage)
        r = gw.post(key=KEY, body=chat_body(content=f"garbage-{i}-"))
        assert r.status == 200
        assert r.body == garbage.encode(), "the provider's body reaches the client as it was"
    # A stream request answered with a body that is neither JSON nor a stream.
    relay.rule("garbage-stream", error_body="data: {{{ [DONE]")
    r = gw.post(key=KEY, body=chat_body(content="garbage-stream", stream=True))
    assert r.status == 200 and r.body == b"data: {{{ [DONE]"
    assert tokens(gw) == 0, "no usage was read from garbage"
    assert gw.post(key=KEY).status == 200
    assert tokens(gw) > 0
    assert gw.envoy_stat("wasm.tollgate.vm_reload") == 0


def test_a_provider_that_goes_down_and_comes_back(start_gateway, workdir, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), harness.provider_urls(relay, backup))
    assert gw.post(key=KEY).status == 200
    relay.stop()
    r = gw.post(key=KEY)
    assert r.status == 503
    assert r.json()["error"]["code"] in ("upstream_connect_error", "upstream_reset")
    # A rule with a fallback is served by the other provider meanwhile.
    r = gw.post(key=KEY, body=chat_body("fallback"))
    assert r.status == 200 and r.header("x-mock-name") == "backup"
    # The provider comes back on its address: served again, no restart, nothing to clear.
    back = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY,
                                extra_args=["--listen", relay.addr])
    try:
        harness.wait_until(lambda: gw.post(key=KEY).status == 200, "the provider to be used again", timeout_s=15)
        assert gw.post(key=KEY, body=chat_body("fallback")).header("x-mock-name") == "relay"
    finally:
        back.stop()


@pytest.mark.parametrize("status", ["500", "503", "429"])
def test_provider_errors_pass_through_with_the_clients_headers(status, start_gateway, providers):
    relay, backup = providers
    gw = start_gateway(plugin(), harness.provider_urls(relay, backup))
    relay.rule("provider-error", status=int(status))
    r = gw.post(key=KEY, body=chat_body(content="provider-error"))
    assert r.status == int(status)
    assert r.json()["error"]["type"] in ("server_error", "requests")
    # The client's own budget, never the provider's account headers.
    assert r.header("x-ratelimit-limit-requests") == "100000"
    assert gw.counter("tollgate_upstream_errors_total", provider="relay", status=status) == 1

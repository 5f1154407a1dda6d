"""Hostile and broken input against a real Envoy (two workers) with model routing: each case
gets its answer, and afterwards the same workers still serve valid requests, no wasm VM failed
or was reloaded, and the filter never panicked."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

import harness
from harness import chat_body, provider_urls, sha256_hex

KEY = "sk-hostile-input-test"


def plugin() -> dict:
    return {
        "clients": [{"name": "t", "key_sha256": sha256_hex(KEY), "requests_per_minute": 100000,
                     "tokens_per_minute": 100000000}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay"]}, {"match": "other", "providers": ["backup"]}],
        "max_body_bytes": 65536,
    }


@pytest.fixture
def setup(start_gateway, providers):
    relay, backup = providers
    return start_gateway(plugin(), provider_urls(relay, backup)), relay


AUTH = [("authorization", f"Bearer {KEY}")]


def raw(gw, data: bytes, read: bool = True) -> bytes:
    """Send raw bytes on a fresh connection; return what came back (until close or 2 s)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=2)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and (b"content-length: " in out.lower() or b"chunked" in out.lower()):
                    break
        except socket.timeout:
            pass
        return out
    finally:
        s.close()


BAD_BODIES = {
    "truncated": (b'{"model": "gpt-4.1", "messages": [', 400),
    "not JSON": (b"model=gpt-4.1", 400),
    "array": (b'[{"model": "gpt-4.1"}]', 400),
    "deeply nested": (b'{"model": "gpt-4.1", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
    "model not a string": (b'{"model": ["gpt-4.1"]}', 400),
    "model with a newline": (b'{"model": "gpt-4.1\\n"}', 400),
    "duplicate model": (b'{"model": "gpt-4.1", "model": "other"}', 400),
    "invalid UTF-8": (b'{"model": "gpt-4.1", "messages": "\xff\xfe"}', 400),
    "huge": (json.dumps(chat_body(content="x" * 70000)).encode(), 413),
}


def vm_stats(gw) -> tuple[int, int]:
    return (gw.envoy_stat("wasm.envoy.wasm.runtime.v8.created"),
            gw.envoy_stat("wasm.envoy.wasm.runtime.v8.active"))


def test_hostile_input_gets_its_answer_and_nothing_breaks(setup):
    gw, relay = setup
    vms_before = vm_stats(gw)
    for case, (body, status) in BAD_BODIES.items():
        r = gw.post(key=KEY, body=body)
        assert r.status == status, (case, r.body[:200])
        assert r.json()["error"]["type"] == "invalid_request_error", case

    # A POST without a body is answered at once, not left waiting for one.
    r = harness.request(gw.url, "POST", "/v1/chat/completions", AUTH, None)
    assert r.status == 400

    # Content types do not matter: the body is what it is.
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = gw.post(key=KEY, body=chat_body(), headers=[("content-type", ctype)])
        assert r.status == 200, ctype

    # A chunked body without content-length, and one sent slowly.
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    c.request("POST", "/v1/chat/completions", body=iter([b'{"model": "gpt-', b'4.1", "messages": [{"role": "user", "content": "hi"}]}']),
              headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
              encode_chunked=True)
    assert c.getresponse().status == 200
    c.close()
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    body = json.dumps(chat_body()).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
              + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    for i in range(0, len(body), 7):
        s.sendall(body[i:i + 7])
        time.sleep(0.01)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()

    # A client that disconnects mid-body, and one that sends headers only.
    raw(gw, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
        + b"\r\ncontent-length: 500\r\n\r\n{\"model\": \"gp", read=False)
    raw(gw, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
        + b"\r\ncontent-length: 50\r\n\r\n", read=False)

    # Non-UTF-8 and oversized header values; keys with spaces and control characters.
    r = gw.post(key=KEY, headers=[("x-binary", b"\xff\xfe\x80")])
    assert r.status == 200
    r = harness.request(gw.url, "POST", "/v1/chat/completions",
                        [("authorization", b"Bearer \xff" + KEY.encode())], chat_body())
    assert r.status == 401
    for bad_key in (b"Bearer sk a", b"Bearer  " + b"k" * 4000):
        r = harness.request(gw.url, "POST", "/v1/chat/completions", [("authorization", bad_key)], chat_body())
        assert r.status == 401, bad_key[:20]
    # Control characters never reach the filter: Envoy's HTTP/1 codec refuses the request with
    # its own plain-text 400 (codec errors bypass local_reply_config; see docs/errors.md).
    r = harness.request(gw.url, "POST", "/v1/chat/completions", [("authorization", b"Bearer sk\x01a")], chat_body())
    assert r.status == 400
    big = raw(gw, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 431"), big[:60]

    # A spoofed route header cannot pick another provider.
    r = gw.post(key=KEY, body=chat_body("gpt-4.1"), headers=[("x-tollgate-route", "r1")])
    assert r.status == 200 and r.header("x-mock-name") == "relay"

    # A provider that fails mid-stream: the client gets what was sent, then a cut stream (Envoy
    # resets it), never a [DONE] the provider did not send.
    try:
        r = gw.post(key=KEY, body=chat_body(stream=True), headers=[("x-mock-stream-abort-after", "2")])
        assert b"[DONE]" not in r.body
    except (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionResetError) as e:
        partial = getattr(e, "partial", b"") or b""
        assert b"[DONE]" not in partial

    # The same workers still serve, on both of them; no VM failed, reloaded or panicked.
    statuses = harness.burst([gw], KEY, 8, 5)
    assert statuses == [200] * 40
    for stat in ("wasm.tollgate.vm_reload", "wasm.tollgate.vm_reload_failure"):
        assert gw.envoy_stat(stat) == 0, stat
    assert vm_stats(gw) == vms_before, "a wasm VM was created or destroyed: one failed"
    log = gw.log()
    assert "panic" not in log
    assert "Function: proxy_on" not in log, "a wasm callback failed"

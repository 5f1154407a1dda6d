"""Hostile and broken input against ONE real Envoy (two workers) with model routing, over HTTP/1.1
and HTTP/2: each case gets its documented answer (docs/hardening.md), and the last test checks
that the same Envoy process and the same wasm VMs still serve valid requests on both workers, no
VM failed, was reloaded or panicked.

The gateway is module-scoped on purpose: every case here hits the same workers, so a case that
broke a VM would show in the final test (and usually in the cases after it)."""

from __future__ import annotations

import json
import socket
import time

import pytest

import harness
from h2client import H2Client
from harness import chat_body, sha256_hex

KEY = "sk-hostile-input-test"
LIMITED = "sk-hostile-limited-2rpm"  # requests_per_minute 2, for the 429 over HTTP/2
MAX_BODY = 65536
PATH = "/v1/chat/completions"


def plugin() -> dict:
    return {
        "clients": [{"name": "t", "key_sha256": sha256_hex(KEY), "requests_per_minute": 100000,
                     "tokens_per_minute": 100000000},
                    {"name": "limited", "key_sha256": sha256_hex(LIMITED), "requests_per_minute": 2}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay"]}, {"match": "other", "providers": ["backup"]},
                   {"match": "fallback", "providers": ["relay", "backup"]}],
        "max_body_bytes": MAX_BODY,
    }


VM_STATS = ("wasm.envoy.wasm.runtime.v8.created", "wasm.envoy.wasm.runtime.v8.active", "wasm.wasm_vm_count")
RELOAD_STATS = tuple(f"wasm.{name}.{stat}" for name in ("tollgate", "tollgate-upstream")
                     for stat in ("vm_reload", "vm_reload_failure", "vm_reload_backoff"))


class Setup:
    def __init__(self, gw: harness.Gateway, relay: harness.MockProvider, backup: harness.MockProvider):
        self.gw, self.relay, self.backup = gw, relay, backup
        self.pid = gw.proc.pid
        self.vms = {s: gw.envoy_stat(s) for s in VM_STATS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bad-input")
    relay = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    backup = harness.MockProvider(workdir, name="backup", expect_key=harness.BACKUP_KEY)
    gw = None
    try:
        gw = harness.Gateway(provider_url=harness.provider_urls(relay, backup), plugin=plugin(), log_dir=workdir)
        yield Setup(gw, relay, backup)
    finally:
        if gw:
            gw.stop()
            print(f"--- {gw.log_path} (last 30 lines) ---")
            print("\n".join(gw.log().splitlines()[-30:]))
        relay.stop()
        backup.stop()


AUTH = [("authorization", f"Bearer {KEY}")]


def head(key: str = KEY, extra: bytes = b"") -> bytes:
    return (b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
            + b"\r\ncontent-type: application/json\r\n" + extra)


def raw(gw, data: bytes, read: bool = True, until_close: bool = False, timeout_s: float = 5) -> bytes:
    """Sends raw bytes on a fresh connection; returns what came back: one response's head (and
    what arrived with it), or everything until the server closes (`until_close`)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout_s)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if not until_close and b"\r\n\r\n" in out:
                    break
        except (socket.timeout, ConnectionResetError):
            pass
        return out
    finally:
        s.close()


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def error_of(r) -> dict:
    assert r.header("content-type") == "application/json"
    return r.json()["error"]


# ---------------------------------------------------------------------------------------------
# Bodies (HTTP/1.1): every broken body is an OpenAI-shaped 400 or 413 before any provider call

NESTED = 10000  # deeper than Tollgate's 128 levels, and under max_body_bytes as objects
BAD_BODIES = {
    "truncated": (b'{"model": "gpt-4.1", "messages": [', 400),
    "not JSON": (b"model=gpt-4.1", 400),
    "empty object": (b"{}", 400),
    "JSON null": (b"null", 400),
    "array": (b'[{"model": "gpt-4.1"}]', 400),
    "deeply nested arrays": (b'{"model": "gpt-4.1", "x": ' + b"[" * NESTED + b"]" * NESTED + b"}", 400),
    "deeply nested objects": (b'{"model": "gpt-4.1", "x": ' + b'{"a":' * NESTED + b"1" + b"}" * NESTED + b"}", 400),
    "model not a string": (b'{"model": ["gpt-4.1"]}', 400),
    "model with a newline": (b'{"model": "gpt-4.1\\n"}', 400),
    "duplicate model": (b'{"model": "gpt-4.1", "model": "other"}', 400),
    "invalid UTF-8": (b'{"model": "gpt-4.1", "messages": "\xff\xfe"}', 400),
    "trailing garbage": (b'{"model": "gpt-4.1"} {"model": "other"}', 400),
    "huge (over max_body_bytes)": (json.dumps(chat_body(content="x" * 70000)).encode(), 413),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_broken_bodies_are_refused_before_any_provider(case, setup):
    body, status = BAD_BODIES[case]
    setup.relay.clear()
    r = setup.gw.post(key=KEY, body=body)
    assert r.status == status, r.body[:200]
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    if status == 413:
        assert err["code"] == "request_too_large"
    assert setup.relay.requests() == []


def test_large_valid_json_within_the_limit_is_served(setup):
    # Many messages and unicode escapes, just under max_body_bytes.
    msgs = [{"role": "user", "content": "\u00e9\u4e2d\U0001F600 " * 40} for _ in range(60)]
    body = json.dumps({"model": "gpt-4.1", "messages": msgs}).encode()
    assert MAX_BODY // 2 < len(body) < MAX_BODY
    r = setup.gw.post(key=KEY, body=body)
    assert r.status == 200, r.body[:200]


def test_a_declared_body_over_the_limit_is_refused_from_its_content_length(setup):
    # 2 MiB declared, nothing sent: the answer comes from the header alone.
    out = raw(setup.gw, head(extra=b"content-length: 2097152\r\n\r\n"))
    assert status_of(out) == 413, out[:80]
    assert b'"request_too_large"' in out


def test_a_post_without_a_body_is_answered(setup):
    r = harness.request(setup.gw.url, "POST", PATH, AUTH, None)
    assert r.status == 400
    assert error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_content_type_does_not_matter(ctype, setup):
    # The body is read as what it is; a missing or wrong content-type changes nothing.
    data = json.dumps(chat_body()).encode()
    h = b"" if ctype is None else b"content-type: " + ctype.encode() + b"\r\n"
    req = (b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
           + b"\r\n" + h + b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    assert status_of(raw(setup.gw, req)) == 200


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_chunked_bodies_without_content_length(setup):
    gw = setup.gw
    te = b"transfer-encoding: chunked\r\n\r\n"
    ok = raw(gw, head(extra=te) + chunked(b'{"model": "gpt-', b'4.1", "messages": [{"role": "user", "content": "hi"}]}'))
    assert status_of(ok) == 200, ok[:80]
    broken = raw(gw, head(extra=te) + chunked(b'{"model": "gpt-', b'4.1", "mess'))
    assert status_of(broken) == 400, broken[:80]
    # Over max_body_bytes with no length declared: refused once the buffered body passes it.
    big = raw(gw, head(extra=te) + chunked(*[b" " * 16384] * 5))
    assert status_of(big) == 413, big[:80]
    # A chunk-size line that is not hex: Envoy's codec refuses it (plain 400, no filter).
    bad = raw(gw, head(extra=te) + b"zz\r\n{}\r\n0\r\n\r\n")
    assert status_of(bad) == 400, bad[:80]


def test_a_body_sent_slowly_is_still_served(setup):
    """A client dribbling its body over about two seconds: the request waits for it."""
    body = json.dumps(chat_body(content="slow " * 10)).encode()
    s = socket.create_connection(("127.0.0.1", setup.gw.port), timeout=15)
    try:
        s.sendall(head(extra=b"content-length: %d\r\n\r\n" % len(body)))
        for i in range(0, len(body), 5):
            s.sendall(body[i:i + 5])
            time.sleep(0.1)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        s.close()


def test_clients_that_disconnect_mid_body_leave_nothing_behind(setup):
    gw = setup.gw
    before = gw.counter("tollgate_requests_total", client="t", outcome="admitted")
    setup.relay.clear()
    raw(gw, head(extra=b"content-length: 500\r\n\r\n") + b'{"model": "gp', read=False)
    raw(gw, head(extra=b"content-length: 50\r\n\r\n"), read=False)
    raw(gw, head(extra=b"transfer-encoding: chunked\r\n\r\n") + b"10\r\n{\"model\": \"gpt-4", read=False)
    # Half a body then a pause then a close, while the filter waits for the rest.
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s.sendall(head(extra=b"content-length: 100\r\n\r\n") + b'{"model"')
    time.sleep(0.3)
    s.close()
    # Nothing was forwarded or counted: the requests never had a complete body.
    assert gw.post(key=KEY).status == 200
    assert len(setup.relay.requests()) == 1
    assert gw.counter("tollgate_requests_total", client="t", outcome="admitted") == before + 1


# ---------------------------------------------------------------------------------------------
# Headers and keys (HTTP/1.1)

def test_non_utf8_and_large_header_values(setup):
    gw = setup.gw
    assert gw.post(key=KEY, headers=[("x-binary", b"\xff\xfe\x80")]).status == 200
    r = harness.request(gw.url, "POST", PATH, [("authorization", b"Bearer \xff" + KEY.encode())], chat_body())
    assert r.status == 401 and error_of(r)["code"] == "invalid_api_key"
    # 8 KiB key: within Envoy's header limits, over Tollgate's 512-byte key limit.
    r = harness.request(gw.url, "POST", PATH, [("authorization", "Bearer " + "k" * 8192)], chat_body())
    assert r.status == 401
    # A 40 KiB header on a valid request is carried (under Envoy's 60 KiB limit).
    assert gw.post(key=KEY, headers=[("x-large", "v" * 40960)]).status == 200
    # Headers over 60 KiB: Envoy's codec answers 431 before any filter runs.
    big = raw(gw, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n")
    assert status_of(big) == 431, big[:60]


BAD_KEYS = {
    "space inside": b"Bearer sk a",
    "tab inside": b"Bearer sk\ta",
    "tab as separator": b"Bearer\t" + KEY.encode(),
    "over 512 bytes": b"Bearer  " + b"k" * 4000,
    "no scheme": KEY.encode(),
    "empty": b"",
}


@pytest.mark.parametrize("case", BAD_KEYS)
def test_malformed_keys_are_the_one_401(case, setup):
    r = harness.request(setup.gw.url, "POST", PATH, [("authorization", BAD_KEYS[case])], chat_body())
    assert r.status == 401
    assert r.header("www-authenticate") == "Bearer"
    assert error_of(r)["code"] == "invalid_api_key"


def test_control_characters_are_refused_by_envoys_codec(setup):
    # Never reaches the filter: Envoy's HTTP/1 codec answers its own plain-text 400 (codec errors
    # bypass local_reply_config; see docs/errors.md).
    for value in (b"Bearer sk\x01a", b"Bearer sk\x00a", b"Bearer sk\x7fa"):
        out = raw(setup.gw, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: " + value + b"\r\n\r\n")
        assert status_of(out) == 400, (value, out[:60])


def test_several_authorization_headers_are_refused(setup):
    # Envoy joins repeated authorization headers into one value with commas (the filter refuses
    # several values too): a joined value is never a key.
    for values in ([f"Bearer {KEY}", f"Bearer {KEY}"], [f"Bearer {KEY}", KEY], [f"Bearer {KEY}", "Bearer sk-x"],
                   ["Bearer sk-x", f"Bearer {KEY}"]):
        r = harness.request(setup.gw.url, "POST", PATH, [("authorization", v) for v in values], chat_body())
        assert r.status == 401, values
    # An empty repeat adds nothing to the joined value: the request is the valid one it was.
    r = harness.request(setup.gw.url, "POST", PATH, [("authorization", f"Bearer {KEY}"), ("authorization", "")],
                        chat_body())
    assert r.status == 200


def test_spoofed_internal_headers_change_nothing(setup):
    gw, relay = setup.gw, setup.relay
    relay.clear()
    # The route header cannot pick another provider; other x-tollgate-* never reach it.
    r = gw.post(key=KEY, body=chat_body("gpt-4.1"),
                headers=[("x-tollgate-route", "r1"), ("X-Tollgate-Client", "admin"), ("x-tollgate-route", "default")])
    assert r.status == 200 and r.header("x-mock-name") == "relay"
    (seen,) = relay.requests()
    assert [v for n, v in seen["headers"] if n.startswith("x-tollgate-")] == ["r0"]
    # Envoy's own x-envoy-* request headers from a client are not trusted (not an internal
    # address): no 1 ms timeout, no choice of attempt, no extra retries.
    relay.clear()
    relay.rule("spoofed-timeout", delay_ms=300)
    r = gw.post(key=KEY, body=chat_body("gpt-4.1", content="spoofed-timeout"),
                headers=[("x-envoy-upstream-rq-timeout-ms", "1")])
    assert r.status == 200
    r = gw.post(key=KEY, body=chat_body("fallback"), headers=[("x-envoy-attempt-count", "2")])
    assert r.header("x-mock-name") == "relay", "a spoofed attempt count picked the fallback"
    relay.clear()
    setup.backup.clear()
    for provider in (relay, setup.backup):
        provider.rule("spoofed-retries", status=500)
    r = gw.post(key=KEY, body=chat_body("fallback", content="spoofed-retries"),
                headers=[("x-envoy-max-retries", "5"), ("x-envoy-retry-on", "5xx")])
    assert r.status == 500
    assert (len(relay.requests()), len(setup.backup.requests())) == (1, 1), "one attempt per provider"


# ---------------------------------------------------------------------------------------------
# Streams cut by either side (HTTP/1.1)

def test_a_provider_reset_mid_stream_cuts_the_clients_stream(setup):
    """The client gets the events sent so far, then the connection closes without the final
    chunk: never a [DONE] the provider did not send, never a response made up by the gateway."""
    setup.relay.rule("h1-provider-cut", abort_after=2)
    data = json.dumps(chat_body(content="h1-provider-cut", stream=True)).encode()
    out = raw(setup.gw, head(extra=b"content-length: %d\r\n\r\n" % len(data)) + data, until_close=True)
    assert status_of(out) == 200
    assert out.count(b"data: {") == 2
    assert b"[DONE]" not in out and not out.endswith(b"0\r\n\r\n")


def test_a_client_that_leaves_mid_stream(setup):
    setup.relay.rule("h1-client-leaves", chunk_delay_ms=200)
    data = json.dumps(chat_body(content="h1-client-leaves a b c d e f g h", stream=True)).encode()
    s = socket.create_connection(("127.0.0.1", setup.gw.port), timeout=10)
    try:
        s.sendall(head(extra=b"content-length: %d\r\n\r\n" % len(data)) + data)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    assert setup.gw.post(key=KEY).status == 200


# ---------------------------------------------------------------------------------------------
# HTTP/2 (cleartext, prior knowledge: the listener's codec is AUTO)

H2_HEAD = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]


@pytest.fixture
def h2(setup):
    c = H2Client(setup.gw.port)
    yield c
    c.close()


def test_h2_admits_routes_and_counts(setup, h2):
    setup.relay.clear()
    r = h2.request("POST", PATH, H2_HEAD, chat_body())
    assert r.status == 200, r.body[:200]
    assert r.json()["object"] == "chat.completion"
    assert r.header("x-mock-name") == "relay"
    assert r.header("x-ratelimit-limit-requests") == "100000"
    (seen,) = setup.relay.requests()
    assert KEY not in json.dumps(seen)
    r = h2.request("GET", "/v1/models", H2_HEAD)
    assert r.status == 200 and [m["id"] for m in r.json()["data"]] == ["gpt-4.1", "other", "fallback"]


def test_h2_streams(h2):
    r = h2.request("POST", PATH, H2_HEAD, chat_body(stream=True))
    assert r.status == 200 and r.ended
    assert r.header("content-type").startswith("text/event-stream")
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in r.body, "the usage chunk the gateway asked for is not shown"


def test_h2_key_failures_are_the_one_401(h2):
    bodies = set()
    for headers in ([("content-type", "application/json")],
                    [("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {KEY}")],
                    [("authorization", "Bearer sk a")],
                    [("authorization", b"Bearer \xff\xfe")]):
        r = h2.request("POST", PATH, headers, chat_body())
        assert r.status == 401, headers
        assert r.header("www-authenticate") == "Bearer"
        bodies.add(r.body)
    assert len(bodies) == 1


def test_h2_rate_limit_is_an_openai_429(h2):
    harness.wait_for_fresh_window(margin_s=10)
    auth = [("authorization", f"Bearer {LIMITED}")]
    statuses = [h2.request("POST", PATH, auth, chat_body()).status for _ in range(2)]
    r = h2.request("POST", PATH, auth, chat_body())
    assert statuses == [200, 200]
    assert r.status == 429
    assert error_of(r)["code"] == "rate_limit_exceeded"
    assert r.header("x-ratelimit-remaining-requests") == "0" and int(r.header("retry-after")) >= 1


def test_h2_broken_and_huge_bodies(h2):
    for body, status in [(b'{"model": "gpt-4.1", "mess', 400), (b"[]", 400),
                         (json.dumps(chat_body(content="x" * 70000)).encode(), 413)]:
        r = h2.request("POST", PATH, H2_HEAD, body)
        assert r.status == status, body[:30]
    # Over the limit, no content-length (HTTP/2 bodies need none): refused while buffering.
    sid = h2.start("POST", PATH, H2_HEAD, end_stream=False)
    h2.send_body(sid, b" " * (MAX_BODY + 16384))
    assert h2.wait(sid).status == 413


def test_h2_many_streams_on_one_connection(setup, h2):
    sids = [h2.start("POST", PATH, H2_HEAD, end_stream=False) for _ in range(12)]
    for i, sid in enumerate(sids):
        h2.send_body(sid, json.dumps(chat_body(content=f"stream-{i}", stream=i % 2 == 1)).encode())
    for i, sid in enumerate(sids):
        r = h2.wait(sid)
        assert r.status == 200 and r.ended, i
        assert f"stream-{i}".encode() in r.body


def test_h2_slow_body_and_streams_reset_by_the_client(setup, h2):
    setup.relay.clear()
    # A body in 3-byte frames over about two seconds.
    sid = h2.start("POST", PATH, H2_HEAD, end_stream=False)
    data = json.dumps(chat_body(content="slowly")).encode()
    for i in range(0, len(data), 3):
        h2.send_body(sid, data[i:i + 3], end_stream=i + 3 >= len(data))
        time.sleep(0.03)
    assert h2.wait(sid).status == 200
    # Reset mid-body: never forwarded.
    sid = h2.start("POST", PATH, H2_HEAD, end_stream=False)
    h2.send_body(sid, b'{"model": "gpt-4.1", "mess', end_stream=False)
    h2.reset(sid)
    # Reset mid-response (a stream that is still sending).
    setup.relay.rule("h2-client-reset", chunk_delay_ms=200)
    sid = h2.start("POST", PATH, H2_HEAD, end_stream=False)
    h2.send_body(sid, json.dumps(chat_body(content="h2-client-reset a b c d e f", stream=True)).encode())
    first = h2.wait(sid, until=lambda r: b"data: " in r.body)
    assert first.status == 200
    h2.reset(sid)
    # The connection is still good.
    assert h2.request("POST", PATH, H2_HEAD, chat_body()).status == 200
    # The slow one, the one reset mid-response and the last one; never the one reset mid-body.
    assert len(setup.relay.requests()) == 3


def test_h2_provider_reset_mid_stream_resets_the_clients_stream(setup, h2):
    setup.relay.rule("h2-provider-cut", abort_after=2)
    r = h2.request("POST", PATH, H2_HEAD, chat_body(content="h2-provider-cut", stream=True))
    assert r.status == 200
    assert r.reset is not None and not r.ended, "the cut must reach the client as a reset"
    assert r.body.count(b"data: {") == 2 and b"[DONE]" not in r.body
    # Only that stream: the connection goes on.
    assert h2.request("POST", PATH, H2_HEAD, chat_body()).status == 200


def test_h2_control_characters_close_the_connection(setup):
    # Envoy's HTTP/2 codec refuses the header block (a protocol error): the connection is closed
    # before any filter runs.
    c = H2Client(setup.gw.port)
    try:
        r = c.request("POST", PATH, [("authorization", b"Bearer sk\x01a")], chat_body())
        assert r.status is None
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# Last: the same Envoy and the same VMs still serve, on both workers

def test_afterwards_the_same_workers_still_serve_and_no_vm_failed(setup):
    gw = setup.gw
    assert gw.proc.poll() is None and gw.proc.pid == setup.pid
    listener = f"listener.127.0.0.1_{gw.port}"
    before = [gw.envoy_stat(f"{listener}.worker_{w}.downstream_cx_total") for w in (0, 1)]
    statuses = harness.burst([gw], KEY, 8, 5)
    assert statuses == [200] * 40
    with H2Client(gw.port) as c:
        assert c.request("POST", PATH, H2_HEAD, chat_body()).status == 200
    after = [gw.envoy_stat(f"{listener}.worker_{w}.downstream_cx_total") for w in (0, 1)]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    for stat in RELOAD_STATS:
        assert gw.envoy_stat(stat) == 0, stat
    assert {s: gw.envoy_stat(s) for s in VM_STATS} == setup.vms, "a wasm VM was created or destroyed: one failed"
    log = gw.log()
    assert "panic" not in log
    assert "Function: proxy_on" not in log, "a wasm callback failed"
    assert "wasm log tollgate: cannot" not in log and "critical" not in log


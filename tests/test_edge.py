"""Envoy's edge hardening (docs/edge.md), end to end against the real Envoy rendered from
envoy/demo.yaml: what a client trying the edge itself sees, over HTTP/1.1 and HTTP/2 (h2c).
The evidence is what reached the providers (their request logs), Envoy's own counters and the
access log lines."""

from __future__ import annotations

import json
import re
import select
import socket
import time

import hpack
import pytest

import harness
import render_envoy
from h2client import H2Client

DEMO_KEY = "sk-tollgate-demo"
PROTOCOLS = ["http1", "h2"]
FORGED_ID = "forged-request-id-0123456789"
FORGED_PATH = "/v1/forged/original/path"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# How long a test waits for Envoy to act at most (never asserted: a bound, not a measurement).
BOUND_S = 20.0


@pytest.fixture
def gateway(start_gateway, providers, monkeypatch):
    """The demo gateway (its plugin configuration, both mock providers), with a request-headers
    timeout of 1 s instead of 10 s so the dripping client is cut off quickly."""
    monkeypatch.setitem(render_envoy.EDGE_HCM, "request_headers_timeout", "1s")
    relay, backup = providers
    plugin = render_envoy.plugin_config(render_envoy.load())
    gw = start_gateway(plugin, harness.provider_urls(relay, backup))
    gw.relay, gw.backup = relay, backup
    return gw


def reached_providers(gw) -> list[dict]:
    return gw.relay.requests() + gw.backup.requests()


def access_log(gw, count: int) -> list[dict]:
    """The first `count` access-log lines, once Envoy has flushed them."""
    def lines():
        found = [json.loads(ln) for ln in gw.log().splitlines() if ln.startswith("{")]
        return found if len(found) >= count else None
    return harness.wait_until(lines, f"{count} access-log lines", timeout_s=BOUND_S)[:count]


def send(gw, protocol: str, method: str, path: str, headers=(), body=None):
    """One request; returns (status or None, whether the stream was reset)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if protocol == "http1":
        r = harness.request(gw.url, method, path, list(headers), body)
        return r.status, False
    h = list(headers)
    if body is not None:
        h += [("content-type", "application/json"), ("content-length", str(len(body)))]
    with H2Client(gw.port) as c:
        r = c.request(method, path, h, body)
        return r.status, r.reset is not None


def authorized(*extra) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {DEMO_KEY}"), *extra]


# --- slow clients ------------------------------------------------------------------------------

def _h2_frames(data: bytes):
    """(type, flags, stream id, payload) of each whole HTTP/2 frame in `data`."""
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            return
        yield data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9:9 + length]
        data = data[9 + length:]


def _ended(protocol: str, received: bytes) -> bool:
    """HTTP/2: Envoy answered stream 1 and reset it, or sent GOAWAY."""
    if protocol == "http1":
        return False
    kinds = {(kind, stream) for kind, _, stream, _ in _h2_frames(received)}
    return (0x3, 1) in kinds or any(kind == 0x7 for kind, _ in kinds)


def _drip(sock: socket.socket, protocol: str, pieces) -> tuple[bytes, bool]:
    """Sends `pieces` one at a time, a little apart, until Envoy closes the connection (returns
    what it sent, True) or, over HTTP/2, ends the stream (what it sent, False); fails if neither
    happens within the bound."""
    deadline = time.monotonic() + BOUND_S
    received = b""
    for piece in pieces:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return received, True
        while select.select([sock], [], [], 0.2)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
        if _ended(protocol, received):
            return received, False
    raise AssertionError("Envoy kept waiting for request headers that never ended")


def _http1_drip() -> tuple[bytes, ...]:
    start = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer " + DEMO_KEY.encode() + b"\r\n"
    return (start, *(f"x-drip-{i}: {i}\r\n".encode() for i in range(10_000)))


def _h2_drip() -> tuple[bytes, ...]:
    """A connection preface, then one HEADERS frame without END_HEADERS and CONTINUATION frames
    of a few bytes each, never the last one."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    preface = conn.data_to_send()
    block = hpack.Encoder().encode(
        [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"), (":authority", "gateway"),
         ("authorization", f"Bearer {DEMO_KEY}")] + [(f"x-drip-{i}", str(i)) for i in range(2000)])
    chunks = [block[i:i + 8] for i in range(0, len(block) - 8, 8)]

    def frame(kind: int, payload: bytes) -> bytes:
        # length (24 bits), type, flags 0 (no END_HEADERS, no END_STREAM), stream 1
        return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + (1).to_bytes(4, "big") + payload

    return (preface + frame(0x1, chunks[0]), *(frame(0x9, c) for c in chunks[1:]))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_client_that_drips_its_headers_is_cut_off(gateway, protocol):
    """Request headers that never end: Envoy closes the connection (HTTP/1.1, after a 408) or
    ends the stream, counts a request-headers timeout, and nothing reaches a provider."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=BOUND_S)
    try:
        answer, closed = _drip(sock, protocol, _http1_drip() if protocol == "http1" else _h2_drip())
    finally:
        sock.close()
    if protocol == "http1":
        assert closed and (answer == b"" or answer.startswith(b"HTTP/1.1 408")), answer[:200]
    else:
        # A 408 on the stream, then RST_STREAM; the connection may stay open for other streams.
        headers = [payload for kind, _, stream, payload in _h2_frames(answer) if kind == 0x1 and stream == 1]
        assert closed or (headers and dict(hpack.Decoder().decode(headers[0])).get(":status") == "408"), answer
    assert gateway.envoy_stat("http.gateway.downstream_rq_header_timeout") == 1
    assert reached_providers(gateway) == []


# --- headers and paths -----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_headers_with_underscores_are_rejected(gateway, protocol):
    """`x_api_key` next to `x-api-key` (services that read `_` as `-`): refused before Tollgate."""
    status, reset = send(gateway, protocol, "POST", "/v1/chat/completions",
                         authorized(("x_api_key", "sk-someone-else")), harness.chat_body())
    assert status == 400 or reset, (status, reset)
    codec = "http1" if protocol == "http1" else "http2"
    assert gateway.envoy_stat(f"{codec}.requests_rejected_with_underscores_in_headers") == 1
    assert reached_providers(gateway) == []


ESCAPED_SLASHES = ["/v1%2Fchat/completions", "/v1/chat%2fcompletions", "/v1%5Cchat/completions",
                   "/v1/chat%5ccompletions"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_escaped_slashes_are_rejected(gateway, protocol):
    for path in ESCAPED_SLASHES:
        status, _ = send(gateway, protocol, "POST", path, authorized(), harness.chat_body())
        assert status == 400, path
    assert gateway.envoy_stat("http.gateway.downstream_rq_failed_path_normalization") == len(ESCAPED_SLASHES)
    assert reached_providers(gateway) == []
    # Refused before Tollgate: no decision counted.
    decided = [v for name, _, v in harness.parse_prometheus(gateway.stats_text()) if name == "tollgate_requests_total"]
    assert sum(decided) == 0


NORMALISED = ["//v1//chat/completions", "/v1/./chat/completions", "/v1/models/../chat/completions",
              "/v1//chat///completions"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_paths_are_normalised_before_the_filter(gateway, protocol):
    """Merged slashes, `.` and `..` segments: Tollgate and the provider see one spelling."""
    for path in NORMALISED:
        status, _ = send(gateway, protocol, "POST", path, authorized(), harness.chat_body())
        assert status == 200, path
    assert [r["path"] for r in reached_providers(gateway)] == ["/v1/chat/completions"] * len(NORMALISED)
    assert gateway.counter("tollgate_requests_total", client="demo", outcome="admitted") == len(NORMALISED)
    assert [line["path"] for line in access_log(gateway, len(NORMALISED))] == ["/v1/chat/completions"] * len(NORMALISED)


# --- the access log -------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_access_log_has_no_query_string_and_no_key(gateway, protocol):
    secret = "sk-secret-in-the-query-0123456789"
    send(gateway, protocol, "POST", f"/v1/chat/completions?api_key={secret}&x=1", authorized(), harness.chat_body())
    send(gateway, protocol, "POST", f"//v1/./chat/completions?key={secret}", authorized(), harness.chat_body())
    lines = access_log(gateway, 2)
    assert [line["path"] for line in lines] == ["/v1/chat/completions"] * 2
    for line in lines:
        assert secret not in json.dumps(line) and "?" not in line["path"]
        assert DEMO_KEY not in json.dumps(line)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_request_id_and_original_path_are_not_logged(gateway, protocol):
    """A client's x-request-id and x-envoy-original-path never make the log's request id or
    path: not on an admitted request, not on one Envoy refuses (an escaped slash, refused before
    Envoy replaces the request id), not on one Tollgate refuses (no key)."""
    forged = [("x-request-id", FORGED_ID), ("x-envoy-original-path", FORGED_PATH)]
    assert send(gateway, protocol, "POST", "/v1/chat/completions", authorized(*forged), harness.chat_body())[0] == 200
    assert send(gateway, protocol, "POST", "/v1%2Fchat/completions", authorized(*forged), harness.chat_body())[0] == 400
    assert send(gateway, protocol, "POST", "/v1/chat/completions", forged, harness.chat_body())[0] == 401
    admitted, refused_by_envoy, refused_by_tollgate = access_log(gateway, 3)
    for line in (admitted, refused_by_envoy, refused_by_tollgate):
        assert FORGED_ID not in json.dumps(line) and FORGED_PATH not in json.dumps(line), line
    assert UUID.match(admitted["request_id"]) and UUID.match(refused_by_tollgate["request_id"])
    assert admitted["request_id"] != refused_by_tollgate["request_id"]
    assert admitted["path"] == refused_by_tollgate["path"] == "/v1/chat/completions"
    assert refused_by_envoy["response_code_details"] == "path_normalization_failed"
    assert refused_by_envoy["request_id"] in ("", None)
    # The provider got Envoy's id, the one in the log, never the client's.
    (upstream,) = reached_providers(gateway)
    ids = [v for k, v in upstream["headers"] if k == "x-request-id"]
    assert ids == [admitted["request_id"]]

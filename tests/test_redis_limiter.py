"""End to end: the Redis limiter through real Webdis and Redis (Debian packages), shared by two
Envoy processes, and what each failure mode does with each `on_error` setting."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

import harness
from harness import default_plugin_config, md5_hex, sha256_hex

KEY = "sk-redis-team-4e1d2c"
WEBDIS_USER = "tollgate:webdis-s3cret"


def plugin(rpm: int, on_error: str = "local", timeout_ms: int = 200, **limiter) -> dict:
    return default_plugin_config(
        [{"name": "shared", "key_sha256": sha256_hex(KEY), "requests_per_minute": rpm}],
        limiter={"backend": "redis", "cluster": "webdis", "timeout_ms": timeout_ms,
                 "on_error": on_error, **limiter},
    )


def redis_key(minute: float) -> str:
    return f"rate:{md5_hex(KEY)}:{int(minute)}"


def test_two_envoys_share_one_budget_exactly(start_gateway, mock, redis, webdis):
    limit, connections, per_connection = 60, 24, 10
    gateways = [start_gateway(plugin(limit), mock.url, webdis=webdis.addr) for _ in range(2)]
    minute = harness.wait_for_fresh_window()
    statuses = harness.burst(gateways, KEY, connections, per_connection)
    assert time.time() // 60 == minute, "the burst crossed a minute boundary; rerun"

    assert statuses.count(200) == limit
    assert statuses.count(429) == connections * per_connection - limit
    assert len(mock.requests()) == limit
    # The count lives in Redis under the older proxy's key layout.
    assert redis.cli("GET", redis_key(minute)) == str(limit)
    ttl_ms = int(redis.cli("PTTL", redis_key(minute)))
    assert 60_000 < ttl_ms <= 120_000
    for gw in gateways:
        admitted = gw.counter("tollgate_requests_total", client="shared", outcome="admitted")
        assert 0 < admitted < limit, "both Envoys served part of the budget"
        for worker in (0, 1):
            stat = f"listener.127.0.0.1_{gw.port}.worker_{worker}.downstream_cx_total"
            assert gw.envoy_stat(stat) > 0
        assert "redis" in gw.log()  # "configured: 1 clients, limiter redis"


def test_admitted_responses_count_down_from_redis(start_gateway, mock, redis, webdis):
    gw = start_gateway(plugin(5), mock.url, webdis=webdis.addr)
    minute = harness.wait_for_fresh_window()
    remaining = [gw.post(key=KEY).header("x-ratelimit-remaining-requests") for _ in range(3)]
    assert remaining == ["4", "3", "2"]
    assert redis.cli("GET", redis_key(minute)) == "3"
    redis.cli("SET", redis_key(minute), "5")  # e.g. the older proxy spent the rest
    r = gw.post(key=KEY)
    assert r.status == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert redis.cli("GET", redis_key(minute)) == "5", "denied requests are not counted"


class Faults:
    """Each fault, how to cause it and undo it, and the reason Tollgate counts for it."""

    def __init__(self, redis: harness.RedisServer, webdis: harness.Webdis):
        self.redis, self.webdis = redis, webdis

    def cases(self):
        return [
            ("redis stopped", "status", self.redis.stop, self.redis.start),
            ("webdis stopped", "unavailable", self.webdis.stop, self.webdis.start),
            ("webdis slower than timeout_ms", "timeout", self.webdis.pause, self.webdis.resume),
            # Webdis up, Redis frozen behind it: Webdis waits for Redis, the callout times out.
            ("redis slower than timeout_ms", "timeout", self.redis.pause, self.redis.resume),
            ("redis error reply", "redis_error", self._poison, self._heal),
        ]

    def _poison(self):
        # A counter that is not a number makes the script fail inside Redis: Webdis answers
        # HTTP 200 with [false, "ERR ..."].
        self.redis.cli("SET", redis_key(time.time() // 60), "not-a-number")

    def _heal(self):
        self.redis.cli("DEL", redis_key(time.time() // 60))


def errors(gw, reason: str) -> float:
    return gw.counter("tollgate_limiter_errors_total", backend="redis", reason=reason)


def redis_counts_again(gw, redis) -> bool:
    """True once a request is counted in Redis again."""
    key = redis_key(time.time() // 60)
    redis.cli("SET", key, "0")
    return gw.post(key=KEY).status == 200 and redis.cli("GET", key) == "1"


@pytest.mark.parametrize("on_error", ["allow", "deny", "local"])
def test_failure_modes(on_error, start_gateway, mock, redis, webdis):
    rpm = 2
    gw = start_gateway(plugin(rpm, on_error=on_error), mock.url, webdis=webdis.addr)
    for name, reason, cause, undo in Faults(redis, webdis).cases():
        harness.wait_for_fresh_window(margin_s=20)
        before = errors(gw, reason)
        cause()
        try:
            first = gw.post(key=KEY)
            if on_error == "allow":
                assert first.status == 200, name
                assert first.header("x-ratelimit-limit-requests") is None, name
            elif on_error == "deny":
                assert first.status == 503, name
                err = first.json()["error"]
                assert (err["code"], err["type"]) == ("limiter_unavailable", "server_error"), name
                assert first.header("retry-after") == "1"
            else:
                # The shared-data limiter takes over with the client's budget: its headers are on
                # every answer, and a 429 comes within rpm + 1 requests (earlier faults in the
                # same minute may have spent part of the local budget already).
                answers = [first] + [gw.post(key=KEY) for _ in range(rpm)]
                statuses = [r.status for r in answers]
                assert set(statuses) <= {200, 429} and statuses[-1] == 429, (name, statuses)
                assert all(r.header("x-ratelimit-limit-requests") == str(rpm) for r in answers), name
            assert errors(gw, reason) > before, f"{name}: limiter error {reason!r} not counted"
        finally:
            undo()
        # Redis back: requests are counted in Redis again, without restarting Envoy.
        harness.wait_until(lambda: redis_counts_again(gw, redis),
                           f"requests to be counted in Redis again after {name}", timeout_s=20)
        redis.cli("DEL", redis_key(time.time() // 60))


def test_webdis_basic_auth(start_gateway, mock, workdir, redis):
    webdis = harness.Webdis(workdir, redis, basic_auth=WEBDIS_USER)
    try:
        common = dict(webdis=webdis.addr, env={"TOLLGATE_WEBDIS_AUTH": WEBDIS_USER},
                      host_env_keys=[harness.PROVIDER_KEY_ENV, "TOLLGATE_WEBDIS_AUTH"])
        gw = start_gateway(plugin(10, on_error="deny", basic_auth_env="TOLLGATE_WEBDIS_AUTH"),
                           mock.url, **common)
        minute = harness.wait_for_fresh_window()
        assert gw.post(key=KEY).status == 200
        assert redis.cli("GET", redis_key(minute)) == "1"
        # Without credentials Webdis's ACL refuses EVAL with a 403: a limiter error.
        anon = start_gateway(plugin(10, on_error="deny"), mock.url, **common)
        r = anon.post(key=KEY)
        assert r.status == 503
        assert errors(anon, "forbidden") == 1
        for secret in (WEBDIS_USER, "d2ViZGlzLXMzY3JldA"):
            assert secret not in gw.log() and secret not in gw.stats_text()
    finally:
        webdis.stop()


def test_routed_requests_are_limited_in_redis(start_gateway, workdir, redis, webdis):
    """With model routing the limit is checked after the body is read: the Redis callout is
    made from the body callback and the request resumes from its reply."""
    relay = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    try:
        config = {
            "clients": [{"name": "shared", "key_sha256": sha256_hex(KEY), "requests_per_minute": 2}],
            "providers": [{"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV}],
            "models": [{"match": "gpt-4.1", "providers": ["relay"]}],
            "limiter": {"backend": "redis", "cluster": "webdis", "on_error": "deny"},
        }
        gw = start_gateway(config, {"relay": {"url": relay.url}}, webdis=webdis.addr)
        minute = harness.wait_for_fresh_window()
        statuses = [gw.post(key=KEY).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert redis.cli("GET", redis_key(minute)) == "2"
        assert len(relay.requests()) == 2
        assert gw.post(key=KEY, body=b"{broken").status == 400, "refused before the limiter"
        assert redis.cli("GET", redis_key(minute)) == "2"
    finally:
        relay.stop()


class FakeWebdis:
    """A stand-in for Webdis on the limiter cluster that answers whatever the test sets in
    `mode` (one of ANSWERS): garbage a broken Webdis, a proxy in between or a wrong service on
    the port could send."""

    def __init__(self):
        self.mode = "valid"
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(l.split(b":")[1]) for l in head.lower().split(b"\r\n")
                               if l.startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += self.request.recv(65536)
                try:
                    ANSWERS[fake.mode](self.request)
                except OSError:
                    pass  # Envoy gave up on us (timeout): expected for the slow answers

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def answer(status: str, body: bytes, content_type: bytes = b"application/json"):
    def send(sock: socket.socket):
        sock.sendall(b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
                     + b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
    return send


def drip(sock: socket.socket):
    """A valid answer, one byte every 50 ms: slower than timeout_ms in total."""
    body = b'{"EVAL":[1,1,60000]}'
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                 b"connection: close\r\n\r\n" % len(body))
    for i in range(len(body)):
        time.sleep(0.05)
        sock.sendall(body[i:i + 1])


def hang_up(sock: socket.socket):
    """Read the request, close without a word."""


ANSWERS = {
    "valid": answer("200 OK", b'{"EVAL":[1,1,60000]}'),
    "not JSON": answer("200 OK", b"OK", b"text/plain"),
    "an HTML page": answer("200 OK", b"<html><body>Bad Gateway</body></html>", b"text/html"),
    "200, empty body": answer("200 OK", b""),
    "another command's reply": answer("200 OK", b'{"GET":null}'),
    "EVAL not an array": answer("200 OK", b'{"EVAL":"OK"}'),
    "EVAL with a string count": answer("200 OK", b'{"EVAL":[1,"7",60000]}'),
    "EVAL with a negative count": answer("200 OK", b'{"EVAL":[1,-1,60000]}'),
    "EVAL with a count beyond u64": answer("200 OK", b'{"EVAL":[1,99999999999999999999999,60000]}'),
    "EVAL with two items": answer("200 OK", b'{"EVAL":[1,7]}'),
    "a huge body (2 MiB)": answer("200 OK", b'{"EVAL":[1,1,60000],"pad":"' + b"x" * (2 << 20) + b'"}'),
    "HTTP 500": answer("500 Internal Server Error", b"oops", b"text/plain"),
    "HTTP 502 from a proxy": answer("502 Bad Gateway", b"<html>bad gateway</html>", b"text/html"),
    "connection closed without an answer": hang_up,
    "an answer dripping in slower than timeout_ms": drip,
}
REASON = {
    "HTTP 500": "status",
    "HTTP 502 from a proxy": "status",
    "connection closed without an answer": "unavailable",
    "an answer dripping in slower than timeout_ms": "timeout",
}


@pytest.mark.parametrize("on_error", ["allow", "deny", "local"])
def test_garbage_from_webdis_is_a_limiter_error(on_error, start_gateway, mock):
    rpm = 1000
    fake = FakeWebdis()
    try:
        gw = start_gateway(plugin(rpm, on_error=on_error), mock.url, webdis=fake.addr)
        for mode in ANSWERS:
            if mode == "valid":
                continue
            reason = REASON.get(mode, "malformed")
            before = errors(gw, reason)
            fake.mode = mode
            r = gw.post(key=KEY)
            if on_error == "allow":
                assert r.status == 200 and r.header("x-ratelimit-limit-requests") is None, mode
            elif on_error == "deny":
                assert r.status == 503, mode
                assert r.json()["error"]["code"] == "limiter_unavailable", mode
            else:
                assert r.status == 200 and r.header("x-ratelimit-limit-requests") == str(rpm), mode
            assert errors(gw, reason) == before + 1, f"{mode}: expected reason {reason!r}"
        # A good answer again: counted from it, no restart, nothing left broken.
        fake.mode = "valid"
        total = sum(errors(gw, r) for r in ("malformed", "status", "unavailable", "timeout"))
        r = gw.post(key=KEY)
        assert r.status == 200
        assert r.header("x-ratelimit-remaining-requests") == str(rpm - 1)
        assert sum(errors(gw, r) for r in ("malformed", "status", "unavailable", "timeout")) == total
        assert gw.envoy_stat("wasm.tollgate.vm_reload") == 0
        assert "panic" not in gw.log()
    finally:
        fake.stop()

"""The gate, attacked as a client holding one valid low-privilege key would (docs/security.md,
"The adversarial suite"): other framings (HTTP/1.1 and HTTP/2, chunked, trailers, trailers
without a body), endpoints and methods it was not granted, path spellings, smuggled headers, and
the shared response cache. The evidence is what reached the providers (their request logs) and
which of Tollgate's counters moved.

One Envoy (two workers) with model routing serves the whole module; each test starts from empty
provider logs."""

from __future__ import annotations

import json
import os
import socket

import pytest

import harness
from h2client import H2Client
from harness import chat_body, sha256_hex

INTERN = "sk-gate-intern-low-privilege"  # allow-list, inference only, low limits
OPS = "sk-gate-ops-files-granted"  # may also use the files endpoints
VICTIM = "sk-gate-victim-shares-the-cache"
PATH = "/v1/chat/completions"


def plugin() -> dict:
    config = {
        "clients": [
            {"name": "intern", "key_sha256": sha256_hex(INTERN), "requests_per_minute": 400,
             "tokens_per_minute": 400000, "models": ["gpt-4.1-mini", "fast"]},
            {"name": "ops", "key_sha256": sha256_hex(OPS), "requests_per_minute": 400,
             "endpoints": ["inference", "files"]},
            {"name": "victim", "key_sha256": sha256_hex(VICTIM), "requests_per_minute": 400},
        ],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [
            {"match": "gpt-4.1", "providers": ["relay", "backup"]},
            {"match": "gpt-4.1-mini", "providers": ["relay"],
             "cache": {"ttl_s": 600, "scope": "shared"}},
            {"match": "fast", "providers": ["backup"], "upstream_model": "deepseek-chat"},
        ],
        "default_provider": "relay",
        "cache_backends": {"local": {"max_bytes": 1 << 20}},
    }
    if os.environ.get("TOLLGATE_GATE_LEGACY_CONFIG"):
        # To run this suite against a build from before the endpoint table (TOLLGATE_WASM), and
        # see which attacks got through it: such a build refuses the `endpoints` field.
        for c in config["clients"]:
            c.pop("endpoints", None)
    return config


class Gate:
    def __init__(self, gw: harness.Gateway, relay: harness.MockProvider, backup: harness.MockProvider):
        self.gw, self.relay, self.backup = gw, relay, backup

    def reached(self) -> list[dict]:
        """Every request either provider received since the test started."""
        return self.relay.requests() + self.backup.requests()

    def count(self, client: str, outcome: str) -> float:
        return self.gw.counter("tollgate_requests_total", client=client, outcome=outcome)

    def h2(self) -> H2Client:
        return H2Client(self.gw.port)


@pytest.fixture(scope="module")
def module_gate(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gate")
    relay = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    backup = harness.MockProvider(workdir, name="backup", expect_key=harness.BACKUP_KEY)
    gw = None
    try:
        gw = harness.Gateway(provider_url=harness.provider_urls(relay, backup), plugin=plugin(),
                             log_dir=workdir)
        yield Gate(gw, relay, backup)
    finally:
        if gw:
            gw.stop()
            print(f"--- {gw.log_path} (last 30 lines) ---")
            print("\n".join(gw.log().splitlines()[-30:]))
        relay.stop()
        backup.stop()


@pytest.fixture
def gate(module_gate):
    module_gate.relay.clear()
    module_gate.backup.clear()
    return module_gate


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}"), ("content-type", "application/json")]


def body_of(model: str, **extra) -> bytes:
    return json.dumps(chat_body(model, **extra)).encode()


# ---------------------------------------------------------------------------------------------
# Framing: every request is decided, whatever the framing.

def h2_with_trailers(gate: Gate, key: str, body: bytes | None, extra=()) -> tuple[int, bytes]:
    with gate.h2() as h2:
        sid = h2.start("POST", PATH, auth(key) + list(extra), end_stream=False)
        if body is not None:
            h2.send_body(sid, body, end_stream=False)
        h2.send_trailers(sid, [("x-trailer", "1")])
        r = h2.wait(sid)
        return r.status, r.body


def test_h2_trailers_cannot_carry_a_model_past_the_allow_list(gate):
    before = gate.count("intern", "invalid")
    status, body = h2_with_trailers(gate, INTERN, body_of("gpt-4.1"))
    assert status == 403, body
    assert gate.reached() == []
    assert gate.count("intern", "invalid") == before + 1


def test_h2_trailers_cannot_pick_the_route_with_a_client_route_header(gate):
    # The client names the route of a rule it may not use; Tollgate strips it on arrival.
    status, _ = h2_with_trailers(gate, INTERN, body_of("gpt-4.1"), [("x-tollgate-route", "r0")])
    assert status == 403
    assert gate.reached() == []


def test_h2_headers_then_trailers_without_a_body_is_refused(gate):
    before = gate.count("intern", "invalid")
    status, _ = h2_with_trailers(gate, INTERN, None)
    assert status == 400
    assert gate.reached() == []
    assert gate.count("intern", "invalid") == before + 1


def test_h2_trailers_request_is_decided_routed_renamed_and_counted(gate):
    admitted = gate.count("intern", "admitted")
    status, body = h2_with_trailers(
        gate, INTERN, body_of("fast", stream=True),
        [("x-api-key", OPS), ("openai-organization", "org-someone-else")])
    assert status == 200, body
    (seen,) = gate.reached()
    sent = json.loads(seen["body"])
    assert sent["model"] == "deepseek-chat", "the alias was renamed"
    assert sent["stream_options"] == {"include_usage": True}, "usage was asked for"
    names = {n for n, _ in seen["headers"]}
    assert "x-api-key" not in names and "openai-organization" not in names
    assert ("authorization", f"Bearer {harness.BACKUP_KEY}") in [tuple(h) for h in seen["headers"]]
    assert gate.count("intern", "admitted") == admitted + 1


def raw_http1(gate: Gate, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", gate.gw.port), timeout=10) as s:
        s.sendall(head + body)
        out = b""
        while b"\r\n\r\n" not in out or not _complete(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def _complete(raw: bytes) -> bool:
    head, _, rest = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":", 1)[1])
    return rest.endswith(b"0\r\n\r\n")


def chunked(body: bytes, trailers: bytes = b"") -> bytes:
    half = len(body) // 2
    parts = [body[:half], body[half:]]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailers + b"\r\n"


def http1_head(key: str, extra: bytes = b"") -> bytes:
    return (b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer "
            + key.encode() + b"\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
            + extra + b"\r\n")


def test_http1_chunked_body_with_trailers_is_decided(gate):
    refused = raw_http1(gate, http1_head(INTERN), chunked(body_of("gpt-4.1"), b"x-trailer: 1\r\n"))
    assert refused.startswith(b"HTTP/1.1 403"), refused[:200]
    assert gate.reached() == []
    admitted = gate.count("intern", "admitted")
    ok = raw_http1(gate, http1_head(INTERN, b"x-tollgate-route: r0\r\n"),
                   chunked(body_of("gpt-4.1-mini", temperature=0.7), b"x-trailer: 1\r\n"))
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    (seen,) = gate.relay.requests()
    assert json.loads(seen["body"])["model"] == "gpt-4.1-mini"
    assert gate.count("intern", "admitted") == admitted + 1


# ---------------------------------------------------------------------------------------------
# Endpoints and methods: deny by default.

ACCOUNT_ENDPOINTS = [
    ("GET", "/v1/files"), ("POST", "/v1/files"), ("DELETE", "/v1/files/file-abc123"),
    ("GET", "/v1/files/file-abc123/content"), ("GET", "/v1/batches"), ("POST", "/v1/batches"),
    ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/assistants"),
    ("POST", "/v1/threads"), ("GET", "/v1/vector_stores"), ("POST", "/v1/images/generations"),
    ("POST", "/v1/audio/speech"), ("POST", "/v1/moderations"), ("POST", "/v1/realtime/sessions"),
    ("GET", "/v1/chat/completions"), ("GET", "/v1/chat/completions/chatcmpl-1"),
    ("DELETE", "/v1/chat/completions/chatcmpl-1"), ("GET", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses/resp_1"), ("GET", "/v1/organization/costs"), ("GET", "/v1/usage"),
    ("GET", "/__mock/requests"), ("DELETE", "/__mock/requests"), ("GET", "/v2/models"),
]

OTHER_METHODS = [(m, PATH) for m in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS")]

PATH_SPELLINGS = [
    "/v1/chat/completions/", "/v1/chat/completions//", "/V1/chat/completions", "/v1/Chat/Completions",
    "/v1/chat/completions;x=1", "/v1/chat/completions%3F", "/v1/chat/completions%20", "/v1/%63hat/completions",
    "/v1%2Fchat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/chat/completions/..", "/v1/chat/./completions/x",
    "/v1/chat/completions/x/..%2F", "/v1/embeddings/../files",
]


def refused_everywhere(gate: Gate, key: str, method: str, path: str) -> int:
    """Sends the request over HTTP/1.1 and HTTP/2 with a body naming a model the key may not use,
    so that even a path Envoy normalises into a granted endpoint is refused; returns how many
    answers Tollgate counted (404 or 403, as opposed to Envoy's own 400 for a path it rejects)."""
    body = body_of("gpt-4.1")
    r1 = harness.request(gate.gw.url, method, path, auth(key), body)
    with gate.h2() as h2:
        r2 = h2.request(method, path, auth(key), body)
    counted = 0
    for status in (r1.status, r2.status):
        assert status in (400, 403, 404), f"{method} {path}: {status}"
        counted += status in (403, 404)
    return counted


@pytest.mark.parametrize("method,path", ACCOUNT_ENDPOINTS + OTHER_METHODS,
                         ids=[f"{m} {p}" for m, p in ACCOUNT_ENDPOINTS + OTHER_METHODS])
def test_endpoints_and_methods_not_granted_never_reach_a_provider(gate, method, path):
    before = gate.count("intern", "invalid")
    counted = refused_everywhere(gate, INTERN, method, path)
    assert gate.reached() == [], f"{method} {path} reached a provider"
    assert counted == 2 and gate.count("intern", "invalid") == before + 2


@pytest.mark.parametrize("path", PATH_SPELLINGS)
def test_path_spellings_never_reach_a_provider(gate, path):
    before = gate.count("intern", "invalid")
    counted = refused_everywhere(gate, INTERN, "POST", path)
    assert gate.reached() == [], f"{path} reached a provider"
    assert gate.count("intern", "invalid") == before + counted


def test_a_granted_account_endpoint_reaches_the_default_provider_only_for_its_client(gate):
    r = harness.request(gate.gw.url, "DELETE", "/v1/files/file-abc123", auth(INTERN))
    assert r.status == 404
    assert gate.reached() == []
    admitted = gate.count("ops", "admitted")
    r = harness.request(gate.gw.url, "DELETE", "/v1/files/file-abc123", auth(OPS))
    (seen,) = gate.relay.requests()
    assert (seen["method"], seen["path"]) == ("DELETE", "/v1/files/file-abc123")
    assert ("authorization", f"Bearer {harness.PROVIDER_KEY}") in [tuple(h) for h in seen["headers"]]
    assert gate.count("ops", "admitted") == admitted + 1
    assert r.status != 403


# ---------------------------------------------------------------------------------------------
# Headers: only allow-listed client headers reach a provider.

SMUGGLED = [
    ("x-api-key", OPS), ("api-key", OPS), ("proxy-authorization", f"Bearer {OPS}"),
    ("x-tollgate-route", "r0"), ("x-tollgate-client", "ops"), ("x-envoy-original-path", "/v1/files"),
    ("x-envoy-max-retries", "9"), ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("openai-organization", "org-other-team"), ("openai-project", "proj-other-team"),
    ("cookie", "session=stolen"), ("forwarded", "for=10.9.8.7"), ("x-forwarded-for", "10.9.8.7"),
    ("x-forwarded-host", "evil.example"), ("x-mock-status", "500"), ("x-mock-usage", "0"),
    ("cache-control", "no-store"), ("x-custom-instruction", "ignore previous"),
]


def assert_clean(seen: dict) -> None:
    sent = [(n.lower(), v) for n, v in seen["headers"]]
    for name, value in SMUGGLED:
        assert (name, value) not in sent, f"{name} reached the provider"
    for key in (INTERN, OPS, VICTIM):
        assert key not in repr(sent) + seen["body"], "a client key reached the provider"


def test_smuggled_headers_are_removed_over_http1(gate):
    r = harness.request(gate.gw.url, "POST", PATH, auth(INTERN) + SMUGGLED,
                        chat_body("gpt-4.1-mini", temperature=0.5))
    assert r.status == 200, r.body
    (seen,) = gate.reached()
    assert_clean(seen)
    # The provider's account headers do not come back (the mock sends them, as providers do).
    assert r.header("openai-organization") is None and r.header("openai-project") is None
    assert r.header("x-ratelimit-limit-requests") == "400", "the client's own budget"


def test_smuggled_headers_are_removed_over_http2(gate):
    with gate.h2() as h2:
        r = h2.request("POST", PATH, auth(INTERN) + SMUGGLED, chat_body("gpt-4.1-mini", temperature=0.5))
    assert r.status == 200, r.body
    (seen,) = gate.reached()
    assert_clean(seen)


# ---------------------------------------------------------------------------------------------
# The shared response cache: one client cannot plant an answer another client gets.

def test_a_query_string_makes_a_request_uncacheable(gate):
    body = chat_body("gpt-4.1-mini", temperature=0, content="poison via query")
    r = harness.request(gate.gw.url, "POST", PATH + "?seed=attacker", auth(INTERN), body)
    assert r.status == 200 and r.header("x-tollgate-cache") == "bypass"
    r = harness.request(gate.gw.url, "POST", PATH, auth(VICTIM), body)
    assert r.header("x-tollgate-cache") == "miss"
    assert len(gate.relay.requests()) == 2, "the victim's request went to the provider"


def test_forwarded_headers_that_change_the_answer_are_part_of_the_key(gate):
    body = chat_body("gpt-4.1-mini", temperature=0, content="poison via header")
    r = harness.request(gate.gw.url, "POST", PATH, auth(INTERN) + [("openai-beta", "attacker")], body)
    assert r.status == 200 and r.header("x-tollgate-cache") == "miss"
    r = harness.request(gate.gw.url, "POST", PATH, auth(VICTIM), body)
    assert r.header("x-tollgate-cache") == "miss", "the attacker's entry answered the victim"
    r = harness.request(gate.gw.url, "POST", PATH, auth(VICTIM), body)
    assert r.header("x-tollgate-cache") == "hit", "the victim's own entry answers it"
    assert len(gate.relay.requests()) == 2


# ---------------------------------------------------------------------------------------------
# One provider: a body of unknown length cannot dodge the token estimate.

def test_one_provider_chunked_body_needs_a_length(start_gateway, mock):
    gw = start_gateway(harness.default_plugin_config(
        [{"name": "intern", "key_sha256": sha256_hex(INTERN), "tokens_per_minute": 1000}]), mock.url)
    g = Gate(gw, mock, mock)
    out = raw_http1(g, http1_head(INTERN), chunked(body_of("gpt-4.1")))
    assert out.startswith(b"HTTP/1.1 411"), out[:200]
    assert b"length_required" in out
    assert mock.requests() == []
    with g.h2() as h2:
        sid = h2.start("POST", PATH, auth(INTERN), end_stream=False)
        h2.send_body(sid, body_of("gpt-4.1"), end_stream=True)
        assert h2.wait(sid).status == 411
    assert mock.requests() == []
    # The same body with its length is admitted and estimated from it.
    r = gw.post(key=INTERN, body=chat_body("gpt-4.1"))
    assert r.status == 200
    assert len(mock.requests()) == 1

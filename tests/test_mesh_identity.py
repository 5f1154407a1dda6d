"""End to end: mesh identity as a credential. Envoy terminates mTLS with a test CA (as a sidecar or
an egress gateway does with the mesh's CA); a client configured with `identities` is admitted by
the SPIFFE ID in its certificate's URI SAN, with no key, and limited, counted and logged under its
name like a keyed client. Written as an attacker holding one low-privilege credential would try it:
another workload's identity in a header, a certificate from another CA that claims the identity, a
trusted certificate with a near-miss ID or no ID, a wrong key over the right connection. The
evidence is what reached the provider and which counter moved."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess

import pytest

import harness
from h2client import H2Client
from harness import chat_body, sha256_hex

MESH_ID = "spiffe://tollgate.test/ns/team-a/sa/app"
OTHER_ID = "spiffe://tollgate.test/ns/team-b/sa/app"
KEYED = "sk-mesh-test-keyed"
RPM = 3


def openssl(*args: str, cwd) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def issue(dir, name: str, ca: str, ext: str) -> None:
    """A P-256 key and a certificate for it, signed by `ca` (its .pem and .key in `dir`)."""
    (dir / f"{name}.ext").write_text(ext)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=dir)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", "2", "-days", "3650", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
            cwd=dir)


def authority(dir, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "3650", "-subj", f"/CN={name}",
            "-set_serial", "1",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The mesh CA with the server's and four clients' certificates, and a rogue CA whose
    certificate claims the mesh client's identity."""
    d = tmp_path_factory.mktemp("certs")
    authority(d, "mesh-ca")
    authority(d, "rogue-ca")
    issue(d, "server", "mesh-ca",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client = "extendedKeyUsage=clientAuth\n"
    issue(d, "team-a", "mesh-ca", f"subjectAltName=URI:{MESH_ID}\n{client}")
    issue(d, "team-b", "mesh-ca", f"subjectAltName=URI:{OTHER_ID}\n{client}")
    issue(d, "near", "mesh-ca", f"subjectAltName=URI:{MESH_ID}/\n{client}")
    issue(d, "no-uri", "mesh-ca", f"subjectAltName=DNS:team-a.test\n{client}")
    issue(d, "rogue", "rogue-ca", f"subjectAltName=URI:{MESH_ID}\n{client}")
    return d


def mtls(certs):
    """The listener terminates TLS, asks for a client certificate and validates one against
    the mesh CA; a client may also come without one (and then needs a key)."""
    def transform(cfg: dict) -> None:
        chain = cfg["static_resources"]["listeners"][0]["filter_chains"][0]
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": False,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": str(certs / "server.pem")},
                        "private_key": {"filename": str(certs / "server.key")},
                    }],
                    "validation_context": {"trusted_ca": {"filename": str(certs / "mesh-ca.pem")}},
                },
            },
        }
    return transform


def plugin() -> dict:
    return harness.default_plugin_config([
        {"name": "mesh-a", "identities": [MESH_ID], "requests_per_minute": RPM,
         "endpoints": ["chat_completions"]},
        {"name": "keyed", "key_sha256": sha256_hex(KEYED)},
    ])


def connect(gw, certs, cert: str | None, alpn: str = "http/1.1") -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(certs / "mesh-ca.pem"))
    ctx.set_alpn_protocols([alpn])
    if cert:
        ctx.load_cert_chain(str(certs / f"{cert}.pem"), str(certs / f"{cert}.key"))
    return http.client.HTTPSConnection("localhost", gw.port, context=ctx, timeout=30)


def post(gw, certs, cert: str | None, headers=(), path: str = "/v1/chat/completions", body=None):
    conn = connect(gw, certs, cert)
    try:
        body = json.dumps(body or chat_body()).encode()
        conn.request("POST", path, body=body,
                     headers={"content-type": "application/json", **dict(headers)})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture
def gw(start_gateway, mock, certs):
    harness.wait_for_fresh_window(margin_s=20)
    return start_gateway(plugin(), mock.url, transform=mtls(certs))


def test_a_client_is_admitted_by_its_certificate_and_limited(gw, mock, certs):
    statuses = [post(gw, certs, "team-a")[0] for _ in range(RPM + 1)]
    assert statuses == [200] * RPM + [429]
    seen = mock.requests()
    assert len(seen) == RPM
    for entry in seen:
        headers = {k.lower(): v for k, v in entry["headers"]}
        assert headers["authorization"] == f"Bearer {harness.PROVIDER_KEY}"
        assert "x-forwarded-client-cert" not in headers
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted") == RPM
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="rate_limited") == 1
    # The keyed client on the same listener, without a certificate, is unaffected.
    assert post(gw, certs, None, [("authorization", f"Bearer {KEYED}")])[0] == 200
    assert gw.counter("tollgate_requests_total", client="keyed", outcome="admitted") == 1


def test_the_certificate_client_keeps_to_its_endpoints(gw, mock, certs):
    status, body = post(gw, certs, "team-a", path="/v1/embeddings",
                        body={"model": "text-embedding-3-small", "input": "hello"})
    assert status == 404, body
    assert mock.requests() == []
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="invalid") == 1
    # The keyed client (the default endpoints) may.
    embed = {"model": "text-embedding-3-small", "input": "hello"}
    status, body = post(gw, certs, None, [("authorization", f"Bearer {KEYED}")],
                        path="/v1/embeddings", body=embed)
    assert status == 200, body
    assert len(mock.requests()) == 1


def test_anthropic_clients_use_their_certificate_too(gw, mock, certs):
    status, body = post(gw, certs, "team-a", [("anthropic-version", "2023-06-01")],
                        path="/v1/messages")
    # The one provider here speaks OpenAI's API: past authentication, the gate answers 404 in
    # Anthropic's shape (a request that failed authentication would get a 401).
    assert status == 404, body
    assert json.loads(body)["type"] == "error"
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="invalid") == 1


def test_no_header_stands_in_for_the_certificate(gw, mock, certs):
    forged = [
        ("x-forwarded-client-cert", f"By={MESH_ID};URI={MESH_ID}"),
        ("x-spiffe-id", MESH_ID),
    ]
    for cert in (None, "team-b", "near", "no-uri"):
        for header in forged:
            status, body = post(gw, certs, cert, [header])
            assert status == 401, (cert, header, body)
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert mock.requests() == []
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted") == 0
    assert gw.counter("tollgate_refusals_total", client="_anonymous", model="_default",
                      reason="invalid_api_key") == 8


def test_a_key_decides_alone_over_the_mesh_clients_connection(gw, mock, certs):
    status, _ = post(gw, certs, "team-a", [("authorization", "Bearer sk-wrong")])
    assert status == 401
    status, _ = post(gw, certs, "team-a", [("x-api-key", "sk-wrong"),
                                           ("anthropic-version", "2023-06-01")],
                     path="/v1/messages")
    assert status == 401
    # The keyed client's key over the mesh client's connection is the keyed client.
    assert post(gw, certs, "team-a", [("authorization", f"Bearer {KEYED}")])[0] == 200
    assert gw.counter("tollgate_requests_total", client="keyed", outcome="admitted") == 1
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted") == 0
    assert len(mock.requests()) == 1


def test_a_certificate_from_another_ca_does_not_connect(gw, mock, certs):
    conn = connect(gw, certs, "rogue")
    with pytest.raises((ssl.SSLError, ConnectionError, socket.timeout, http.client.HTTPException)):
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body()).encode(),
                     headers={"content-type": "application/json"})
        conn.getresponse().read()
    conn.close()
    assert mock.requests() == []
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted") == 0
    # Envoy refused the handshake itself: the certificate failed verification.
    assert gw.envoy_stat(f"listener.127.0.0.1_{gw.port}.ssl.fail_verify_error") == 1


def test_every_http2_stream_is_decided_on_its_own(gw, mock, certs):
    ctx = ssl.create_default_context(cafile=str(certs / "mesh-ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(str(certs / "team-a.pem"), str(certs / "team-a.key"))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=10),
                           server_hostname="localhost")
    assert sock.selected_alpn_protocol() == "h2"
    with H2Client(gw.port, sock=sock) as h2:
        body = json.dumps(chat_body()).encode()
        head = [("content-type", "application/json"), ("content-length", str(len(body)))]
        mesh = h2.request("POST", "/v1/chat/completions", head, body)
        wrong = h2.request("POST", "/v1/chat/completions",
                           head + [("authorization", "Bearer sk-wrong")], body)
        forged = h2.request("POST", "/v1/chat/completions",
                            head + [("x-forwarded-client-cert", f"URI={OTHER_ID}")], body)
    assert (mesh.status, wrong.status, forged.status) == (200, 401, 200)
    # The forged header named another workload: the stream was still the certificate's.
    assert gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted") == 2
    assert len(mock.requests()) == 2


def test_with_the_redis_limiter_the_certificate_client_counts_under_its_name(
        start_gateway, mock, certs, redis, webdis):
    """Two Envoys share one Redis budget for the certificate client, kept under
    `rate:name-<client>:<minute>` (a client's credentials spend one budget)."""
    config = plugin()
    config["limiter"] = {"backend": "redis", "cluster": "webdis", "on_error": "deny"}
    gateways = [start_gateway(config, mock.url, transform=mtls(certs), webdis=webdis.addr)
                for _ in range(2)]
    minute = harness.wait_for_fresh_window(margin_s=20)
    statuses = [post(gw, certs, "team-a")[0] for gw in gateways for _ in range(2)]
    assert sorted(statuses) == [200] * RPM + [429], statuses
    assert redis.cli("GET", f"rate:name-mesh-a:{int(minute)}") == str(RPM)
    assert len(mock.requests()) == RPM
    assert sum(gw.counter("tollgate_requests_total", client="mesh-a", outcome="admitted")
               for gw in gateways) == RPM

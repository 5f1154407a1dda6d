"""End to end: a large key set as a `key_set` (clients packed by `tollgate keys pack`) next to a
JSON client, in a real Envoy with two workers. A packed key is admitted within its own limit and
refused past it, an unknown key is refused, the JSON client is unaffected, and a malformed key
set is refused by Envoy with the record named, as `tollgate config check` names it."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import harness
from harness import PROVIDER_KEY, PROVIDER_KEY_ENV, ROOT, render_envoy, sha256_hex

CLI = ROOT / "target" / "release" / "tollgate"
PACKED = 2_000
# The packed client the test uses, with a limit of its own; the others keep the default.
TARGET = 1_234
TARGET_RPM = 3
JSON_KEY = "sk-keyset-json-client"
LOGGED = re.compile(r"invalid plugin configuration: (.*)")


def packed_key(i: int) -> str:
    return f"sk-keyset-{i:05d}"


def clients_list() -> list[dict]:
    out = []
    for i in range(PACKED):
        c = {"name": f"packed-{i:05d}", "key_sha256": sha256_hex(packed_key(i))}
        if i == TARGET:
            c["requests_per_minute"] = TARGET_RPM
        out.append(c)
    return out


def pack(clients: list[dict], tmp_path) -> str:
    """`tollgate keys pack` of a clients list: the key_set string."""
    if not CLI.exists():
        pytest.skip(f"{CLI} is missing: run make build")
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(clients))
    done = subprocess.run([str(CLI), "keys", "pack", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"packed {len(clients)} clients into key_set\n"
    return done.stdout.strip()


def test_packed_keys_are_admitted_within_their_limit(start_gateway, mock, tmp_path):
    key_set = pack(clients_list(), tmp_path)
    plugin = harness.default_plugin_config(
        [{"name": "json-client", "key_sha256": sha256_hex(JSON_KEY), "requests_per_minute": 100}],
        key_set=key_set)
    gw = start_gateway(plugin, mock.url)
    assert f"configured: {PACKED + 1} clients" in gw.log()

    harness.wait_for_fresh_window()
    statuses = [gw.post(key=packed_key(TARGET)).status for _ in range(TARGET_RPM + 1)]
    assert statuses == [200] * TARGET_RPM + [429], statuses
    # Another packed client has the default limit, and its own window.
    assert gw.post(key=packed_key(7)).status == 200
    # A key no client has, and one a packed key's digest was made from but not the key.
    unknown = gw.post(key="sk-keyset-unknown")
    assert unknown.status == 401
    assert gw.post(key=sha256_hex(packed_key(7))).status == 401
    # The JSON client next to the key set.
    assert gw.post(key=JSON_KEY).status == 200

    assert len(mock.requests()) == TARGET_RPM + 2
    name = f"packed-{TARGET:05d}"
    assert gw.counter("tollgate_requests_total", client=name, outcome="admitted") == TARGET_RPM
    assert gw.counter("tollgate_requests_total", client=name, outcome="rate_limited") == 1
    assert gw.counter("tollgate_requests_total", client="json-client", outcome="admitted") == 1
    # The key set holds digests only: no key is in Envoy's configuration.
    assert packed_key(TARGET) not in gw.config_path.read_text()


def test_a_broken_key_set_is_refused_with_the_record_named(tmp_path):
    """Envoy's `--mode validate` runs the filter's parser: a key set whose second record (in
    digest order) repeats a JSON client's name is refused, and config check says the same."""
    clients = [{"name": "first", "key_sha256": sha256_hex("k-first")},
               {"name": "dup", "key_sha256": sha256_hex("k-dup")}]
    key_set = pack(clients, tmp_path)
    order = sorted(clients, key=lambda c: c["key_sha256"])
    dup_at = next(i for i, c in enumerate(order) if c["name"] == "dup")
    plugin = harness.default_plugin_config(
        [{"name": "dup", "key_sha256": sha256_hex("k-json")}], key_set=key_set)
    # The one-provider layout the plugin configuration asks for (the routing layout's upstream
    # filters would refuse it first, for having no `providers`: they do not read clients).
    cfg = harness.render(plugin)
    path = tmp_path / "broken.yaml"
    path.write_text(render_envoy.dump(cfg))
    env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY}
    envoy = harness.envoy_validate(path, env)
    logged = LOGGED.findall(envoy.stdout + envoy.stderr)
    want = f'key_set[{dup_at}].name: duplicate client name "dup" (also clients[0])'
    assert logged and logged[0] == want, envoy.stdout + envoy.stderr
    cli = subprocess.run([str(CLI), "config", "check", str(path)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 1
    assert set(LOGGED.findall(cli.stderr)) == {want}, cli.stderr

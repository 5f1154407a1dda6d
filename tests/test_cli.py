"""The `tollgate` CLI (cli/) against the real gateway: a key made by `tollgate keys new` is
accepted end to end by a gateway configured with the printed entry, and `tollgate config check`
refuses a broken configuration with the very message Envoy's `--mode validate` logs.

The CLI binary is built by `make build` (`cargo build --release -p tollgate-cli`)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import harness
import render_envoy
from harness import PROVIDER_KEY, PROVIDER_KEY_ENV, ROOT, chat_body, md5_hex, sha256_hex

CLI = ROOT / "target" / "release" / "tollgate"
LOGGED = re.compile(r"invalid plugin configuration: (.*)$", re.M)


@pytest.fixture(scope="module", autouse=True)
def cli_is_built():
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: build it with `make build` (cargo build --release -p tollgate-cli)")


def tollgate(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env=os.environ if env is None else env)


def test_a_new_key_is_accepted_end_to_end(mock, start_gateway):
    r = tollgate("keys", "new", "--name", "e2e", "--rpm", "5", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    made = json.loads(r.stdout)
    key, entry = made["key"], made["entry"]
    assert re.fullmatch(r"sk-tg-[0-9A-Za-z]{43}", key), key
    assert entry == {"name": "e2e", "key_sha256": sha256_hex(key), "requests_per_minute": 5}

    # `keys hash` of the same key (from stdin) gives the same entry, and the MD5 of a migration.
    r = tollgate("keys", "hash", "--name", "e2e", "--rpm", "5", "--json", stdin=key + "\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"key_sha256": sha256_hex(key), "key_md5": md5_hex(key), "entry": entry}

    gw = start_gateway(harness.default_plugin_config([entry]), mock.url)
    harness.wait_for_fresh_window()
    ok = gw.post(key=key, body=chat_body(content="made by tollgate keys new"))
    assert ok.status == 200, ok.body
    assert ok.header("x-ratelimit-limit-requests") == "5"
    seen = mock.requests()
    assert [v for n, v in seen[0]["headers"] if n == "authorization"] == [f"Bearer {PROVIDER_KEY}"]
    assert key not in repr(seen)

    wrong = gw.post(key=key[:-1] + ("a" if key[-1] != "a" else "b"))
    assert wrong.status == 401, wrong.body
    assert wrong.json()["error"]["code"] == "invalid_api_key"

    # The printed limit is the one enforced: 5 per minute, the sixth is refused.
    statuses = [gw.post(key=key).status for _ in range(5)]
    assert statuses == [200] * 4 + [429], statuses


GOOD_CLIENT = {"name": "a", "key_sha256": sha256_hex("k")}
UPSTREAM = {"api_key_env": PROVIDER_KEY_ENV}

BROKEN = {
    "short digest": {"clients": [{"name": "a", "key_sha256": "abcd"}], "upstream": UPSTREAM},
    "unknown field": {"clients": [{**GOOD_CLIENT, "rpm": 3}], "upstream": UPSTREAM},
    "duplicate name": {"clients": [GOOD_CLIENT, {"name": "a", "key_sha256": sha256_hex("j")}],
                       "upstream": UPSTREAM},
    "bad name": {"clients": [{**GOOD_CLIENT, "name": "team.a"}], "upstream": UPSTREAM},
    "zero limit": {"clients": [GOOD_CLIENT], "upstream": UPSTREAM, "default_requests_per_minute": 0},
    "redis without a cluster": {"clients": [GOOD_CLIENT], "upstream": UPSTREAM,
                                "limiter": {"backend": "redis"}},
    "provider key not passed into the VM": {"clients": [GOOD_CLIENT],
                                            "upstream": {"api_key_env": "NOT_IN_HOST_ENV_KEYS"}},
    "not JSON": "{clients: nope",
}


@pytest.mark.parametrize("case", list(BROKEN), ids=str)
def test_config_check_says_what_envoy_logs(case, tmp_path):
    cfg = harness.render(BROKEN[case])
    path = tmp_path / "broken.yaml"
    path.write_text(render_envoy.dump(cfg))
    # The same environment for both: the variable is set but not in host_env_keys.
    env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY, "NOT_IN_HOST_ENV_KEYS": "sk-set-but-not-listed"}

    envoy = harness.envoy_validate(path, env)
    envoy_log = envoy.stdout + envoy.stderr
    logged = LOGGED.findall(envoy_log)
    assert logged, envoy_log

    cli = tollgate("config", "check", str(path), "--strict-env", env=env)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout == ""
    said = LOGGED.findall(cli.stderr)
    # One line per Tollgate filter in the file, each with Envoy's message, byte for byte.
    assert said and set(said) == {logged[0]}, (said, logged)
    assert "sk-set-but-not-listed" not in cli.stderr and PROVIDER_KEY not in cli.stderr

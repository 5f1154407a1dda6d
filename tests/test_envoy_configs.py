"""Every Envoy YAML in the repo passes `envoy --mode validate` with the built module (which runs
the filter's on_configure), and a broken plugin configuration is refused with a log line that
names the field."""

from __future__ import annotations

import os
import subprocess

import pytest

import harness
import render_envoy
from harness import BACKUP_KEY, BACKUP_KEY_ENV, PROVIDER_KEY, PROVIDER_KEY_ENV, ROOT, sha256_hex

ENVOY_YAMLS = sorted(p.relative_to(ROOT) for p in (ROOT / "envoy").rglob("*.yaml"))


def validate(path, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY, BACKUP_KEY_ENV: BACKUP_KEY, **(env_extra or {})}
    return harness.envoy_validate(path, env)


def test_there_are_configs_to_validate():
    assert len(ENVOY_YAMLS) >= 2, ENVOY_YAMLS


@pytest.mark.parametrize("path", ENVOY_YAMLS, ids=str)
def test_repo_envoy_config_is_valid(path):
    r = validate(path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_rendered_https_provider_config_is_valid(tmp_path):
    cfg = render_envoy.load()
    plugin = render_envoy.plugin_config(cfg)
    render_envoy.configure_routing(cfg, plugin, {**render_envoy.DEMO_PROVIDERS,
                                                 "relay": {"url": "https://api.holysheep.ai/v1"}})
    out = tmp_path / "https.yaml"
    out.write_text(render_envoy.dump(cfg))
    r = validate(out)
    assert r.returncode == 0, r.stdout + r.stderr
    cluster = render_envoy._cluster(cfg, "provider_relay")
    assert cluster["transport_socket"]["typed_config"]["sni"] == "api.holysheep.ai"


GOOD_CLIENT = {"name": "a", "key_sha256": sha256_hex("k")}

BROKEN = {
    "unknown top-level field": (
        {"clients": [GOOD_CLIENT], "upstream": {"api_key_env": PROVIDER_KEY_ENV}, "client": []},
        "client: unknown field `client`",
    ),
    "unknown client field": (
        {"clients": [{**GOOD_CLIENT, "rpm": 3}], "upstream": {"api_key_env": PROVIDER_KEY_ENV}},
        "clients[0].rpm: unknown field `rpm`",
    ),
    "short digest": (
        {"clients": [{"name": "a", "key_sha256": "abcd"}], "upstream": {"api_key_env": PROVIDER_KEY_ENV}},
        "clients[0].key_sha256: expected 64 hex characters",
    ),
    "duplicate name": (
        {"clients": [GOOD_CLIENT, {"name": "a", "key_sha256": sha256_hex("j")}],
         "upstream": {"api_key_env": PROVIDER_KEY_ENV}},
        'clients[1].name: duplicate client name "a"',
    ),
    "zero limit": (
        {"clients": [{**GOOD_CLIENT, "requests_per_minute": 0}], "upstream": {"api_key_env": PROVIDER_KEY_ENV}},
        "clients[0].requests_per_minute: must be between 1",
    ),
    "provider key not passed into the VM": (
        {"clients": [GOOD_CLIENT], "upstream": {"api_key_env": "NOT_IN_HOST_ENV_KEYS"}},
        'upstream.api_key_env: environment variable "NOT_IN_HOST_ENV_KEYS" is not set',
    ),
    "unknown limiter backend": (
        {"clients": [GOOD_CLIENT], "upstream": {"api_key_env": PROVIDER_KEY_ENV}, "limiter": {"backend": "memcached"}},
        "limiter.backend: unknown variant `memcached`",
    ),
    "not JSON": ("{clients: nope", "not valid JSON: key must be a string at line 1 column 2"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=str)
def test_invalid_plugin_config_is_refused_naming_the_field(case, tmp_path):
    plugin, message = BROKEN[case]
    # In the layout it asks for: routing's upstream filters do not read clients, and would
    # refuse a one-provider configuration first, for having no `providers`.
    cfg = harness.render(plugin)
    out = tmp_path / "broken.yaml"
    out.write_text(render_envoy.dump(cfg))
    r = validate(out, {"NOT_IN_HOST_ENV_KEYS": "sk-set-but-not-listed"})
    log = r.stdout + r.stderr
    assert "OK" not in r.stdout, log
    assert f"invalid plugin configuration: {message}" in log, log
    assert "sk-set-but-not-listed" not in log and PROVIDER_KEY not in log


def test_demo_routes_are_generated_from_its_plugin_config():
    """envoy/demo.yaml's routes and clusters are what configure_routing makes of its own plugin
    configuration, so the tests (which render the same way) run what the demo runs."""
    cfg = render_envoy.load()
    regenerated = render_envoy.load()
    render_envoy.configure_routing(regenerated, render_envoy.plugin_config(cfg), render_envoy.DEMO_PROVIDERS)
    assert regenerated == cfg


def test_https_example_is_the_rendered_demo():
    """envoy/provider-https.yaml must not drift from the demo it is generated from."""
    cfg = render_envoy.load()
    plugin = render_envoy.plugin_config(cfg)
    urls = {**render_envoy.DEMO_PROVIDERS, "relay": {"url": "https://api.openai.com"}}
    render_envoy.set_authorities(plugin, urls)
    assert [p["authority"] for p in plugin["providers"]] == ["api.openai.com", "127.0.0.1:10081", "127.0.0.1:10080"]
    render_envoy.configure_routing(cfg, plugin, urls)
    assert render_envoy.load(ROOT / "envoy" / "provider-https.yaml") == cfg


def test_redis_example_is_the_rendered_demo():
    """envoy/demo-redis.yaml must not drift from the demo it is generated from."""
    cfg = render_envoy.load()
    render_envoy.use_redis_limiter(cfg)
    assert render_envoy.load(ROOT / "envoy" / "demo-redis.yaml") == cfg

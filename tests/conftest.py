"""Fixtures for the end-to-end tests: each test gets its own mock provider and Envoy on free
loopback ports, stopped on teardown whether the test passed or not."""

from __future__ import annotations

import subprocess

import pytest

import harness


def pytest_report_header(config):
    """Which Envoy ran: the compat matrix (scripts/compat.sh) runs the suite once per version."""
    binary = harness.envoy_bin()
    try:
        version = ".".join(map(str, harness.envoy_version(binary)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        version = f"unknown ({e})"
    return f"envoy: {version} ({binary})"


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def mock(workdir):
    m = harness.MockProvider(workdir)
    yield m
    m.stop()


@pytest.fixture
def providers(workdir):
    """Two mock providers, `relay` and `backup`, each accepting only its own provider key."""
    relay = harness.MockProvider(workdir, name="relay", expect_key=harness.PROVIDER_KEY)
    backup = harness.MockProvider(workdir, name="backup", expect_key=harness.BACKUP_KEY)
    yield relay, backup
    relay.stop()
    backup.stop()


@pytest.fixture
def redis(workdir):
    """A real redis-server on a free loopback port."""
    r = harness.RedisServer(workdir)
    yield r
    r.stop()


@pytest.fixture
def webdis(workdir, redis):
    """A real Webdis in front of `redis`, allowing EVAL only."""
    w = harness.Webdis(workdir, redis)
    yield w
    w.stop()


@pytest.fixture
def start_gateway(workdir, request):
    """Factory: start_gateway(plugin_config, provider_url=..., **kwargs) -> harness.Gateway."""
    started: list[harness.Gateway] = []

    def start(plugin, provider_url: str, **kwargs) -> harness.Gateway:
        gw = harness.Gateway(provider_url=provider_url, plugin=plugin, log_dir=workdir,
                             name=f"envoy{len(started)}", **kwargs)
        started.append(gw)
        return gw

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for gw in started:
        gw.stop()
        if failed:
            print(f"--- {gw.log_path} (last 40 lines) ---")
            print("\n".join(gw.log().splitlines()[-40:]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)

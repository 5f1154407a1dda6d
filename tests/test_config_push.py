"""End to end: a configuration pushed to a RUNNING Envoy. Without a control plane, Envoy reads
its listener from a watched file (LDS over `path_config_source` with `watched_directory`); a new
file moved into place is a new listener configuration, exactly as an xDS push would be.

An invalid Tollgate configuration makes `on_configure` fail, Envoy rejects the whole listener
update, logs the field that is wrong, and the running listener (old configuration, same VMs)
keeps serving. A valid update takes effect without a restart, and a stream in flight finishes."""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

import harness
from harness import chat_body, default_plugin_config, sha256_hex

OLD = "sk-push-old-key-1"
NEW = "sk-push-new-key-2"


def plugin(name: str, key_sha256: str, **extra) -> dict:
    return default_plugin_config([{"name": name, "key_sha256": key_sha256, "requests_per_minute": 10000}], **extra)


class DynamicGateway(harness.EnvoyProcess):
    """Envoy (two workers) whose listener comes from a watched LDS file; clusters are static."""

    def __init__(self, workdir, provider_url: str):
        self.workdir = workdir
        cfg = harness.render_envoy.load()
        self.port, self.admin_port = harness.free_port(), harness.free_port()
        harness.render_envoy.set_listen(cfg, f"127.0.0.1:{self.port}")
        harness.render_envoy.set_admin(cfg, f"127.0.0.1:{self.admin_port}")
        harness.render_envoy.configure_single(cfg, plugin("old", sha256_hex(OLD)), provider_url)
        harness.render_envoy.set_wasm(cfg, str(harness.WASM))
        self.listener = cfg["static_resources"].pop("listeners")[0]
        self.lds_dir = workdir / "lds"
        self.lds_dir.mkdir()
        self.lds_path = self.lds_dir / "listeners.yaml"
        self.push_listener(self.listener)
        cfg["node"] = {"id": "tollgate-test", "cluster": "tollgate-test"}
        cfg["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": str(self.lds_path), "watched_directory": {"path": str(self.lds_dir)}}}}
        self.config_path = workdir / "envoy-dynamic.yaml"
        self.config_path.write_text(harness.render_envoy.dump(cfg))
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self._launch(self.config_path, workdir / "envoy-dynamic.log",
                     {**os.environ, harness.PROVIDER_KEY_ENV: harness.PROVIDER_KEY})
        self._await_ready(lambda: self.envoy_stat("listener_manager.lds.update_success") == 1
                          and self.envoy_stat("listener_manager.workers_started") == 1
                          and harness.request(self.admin, "GET", "/ready").status == 200,
                          "Envoy to load its listener")

    def push(self, plugin_config: dict | str) -> None:
        """Writes a listener with this plugin configuration and moves it into place (atomic)."""
        listener = copy.deepcopy(self.listener)
        for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["name"] == harness.render_envoy.WASM_FILTER:
                value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
                f["typed_config"]["config"]["configuration"]["value"] = value
        self.push_listener(listener)

    def push_listener(self, listener: dict) -> None:
        tmp = self.lds_dir / ".listeners.yaml.tmp"
        tmp.write_text(yaml.safe_dump({"resources": [
            {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}]}))
        os.rename(tmp, self.lds_path)



@pytest.fixture
def dyn(workdir, mock):
    gw = DynamicGateway(workdir, mock.url)
    yield gw
    gw.stop()


INVALID = {
    "a bad key digest": (plugin("new", "abc"), "clients[0].key_sha256: expected 64 hex characters"),
    "an unknown field": (plugin("new", sha256_hex(NEW), requests_per_mnute=5), "unknown field `requests_per_mnute`"),
    "a missing provider key variable": (
        default_plugin_config([{"name": "new", "key_sha256": sha256_hex(NEW)}])
        | {"upstream": {"api_key_env": "TOLLGATE_UNSET_VARIABLE"}},
        'environment variable "TOLLGATE_UNSET_VARIABLE" is not set'),
    "not JSON": ('{"clients": [', "invalid plugin configuration"),
}


def test_an_invalid_push_is_rejected_and_the_old_configuration_keeps_serving(dyn):
    vms = dyn.envoy_stat("wasm.envoy.wasm.runtime.v8.active")
    for n, (case, (config, logged)) in enumerate(INVALID.items(), start=1):
        dyn.push(config)
        harness.wait_until(lambda: dyn.envoy_stat("listener_manager.lds.update_rejected") == n,
                           f"Envoy to reject the update with {case}", timeout_s=15)
        assert logged in dyn.log(), case
        # The running listener still has the old configuration, on both workers.
        statuses = [dyn.chat(OLD).status for _ in range(10)]
        assert statuses == [200] * 10, case
        assert dyn.chat(NEW).status == 401, case
    assert dyn.envoy_stat("listener_manager.lds.update_success") == 1
    # Envoy's own wording: 1.40 "lds: listener 'gateway' config rejected: ...", 1.36
    # "Error adding/updating listener(s) gateway: ..." (docs/compatibility.md).
    rejected = ("lds: listener 'gateway' config rejected: ", "Error adding/updating listener(s) gateway: ")
    assert any(f"{r}Unable to create Wasm plugin tollgate" in dyn.log() for r in rejected)
    # The serving VMs were never touched: none failed, none was reloaded.
    assert dyn.envoy_stat("wasm.envoy.wasm.runtime.v8.active") == vms
    assert dyn.envoy_stat("wasm.tollgate.vm_reload") == 0
    listener = f"listener.127.0.0.1_{dyn.port}"
    assert all(dyn.envoy_stat(f"{listener}.worker_{w}.downstream_cx_total") > 0 for w in (0, 1))


def test_a_valid_push_takes_effect_and_lets_a_stream_in_flight_finish(dyn, mock):
    import http.client

    mock.rule("slow-stream-in-flight", chunk_delay_ms=150)
    conn = http.client.HTTPConnection("127.0.0.1", dyn.port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps(chat_body(content="slow-stream-in-flight a b c d e f", stream=True)),
                 headers={"authorization": f"Bearer {OLD}", "content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    dyn.push(plugin("new", sha256_hex(NEW)))
    harness.wait_until(lambda: dyn.envoy_stat("listener_manager.lds.update_success") == 2, "the update", timeout_s=15)
    harness.wait_until(lambda: dyn.chat(NEW).status == 200, "the new key to be served", timeout_s=15)
    assert dyn.chat(OLD).status == 401
    # The stream that started under the old configuration ends normally (the old listener drains).
    assert r.read().decode().rstrip().endswith("data: [DONE]")
    conn.close()

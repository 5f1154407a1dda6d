"""The README's `make run`: the demo script starts the mock provider and Envoy with
envoy/demo.yaml, serves the demo key with 60 requests per minute, and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anthropic
import pytest

import harness
from harness import ROOT, chat_body, md5_hex


@pytest.mark.parametrize("limiter", ["local", "redis"])
def test_demo_serves_the_demo_key_and_stops_on_ctrl_c(limiter, tmp_path):
    listen, admin, mock, backup = (f"127.0.0.1:{harness.free_port()}" for _ in range(4))
    redis_port, webdis_port = harness.free_port(), harness.free_port()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "LIMITER": limiter,
        "TOLLGATE_LISTEN": listen,
        "TOLLGATE_ADMIN": admin,
        "TOLLGATE_MOCK_LISTEN": mock,
        "TOLLGATE_BACKUP_LISTEN": backup,
        "TOLLGATE_REDIS_PORT": str(redis_port),
        "TOLLGATE_WEBDIS_PORT": str(webdis_port),
    }
    env.pop("TOLLGATE_PROVIDER_URL", None)
    env.pop("TOLLGATE_PROVIDER_KEY", None)
    out = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(["bash", "scripts/run-demo.sh"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        harness.wait_until(lambda: "Ctrl-C stops everything" in (tmp_path / "run.log").read_text(),
                           "the demo banner", proc=proc)
        banner = (tmp_path / "run.log").read_text()
        assert "sk-tollgate-demo" in banner and f"curl -s http://{listen}/v1/chat/completions" in banner

        url = f"http://{listen}"
        assert harness.request(url, "POST", "/v1/chat/completions", [], chat_body()).status == 401
        harness.wait_for_fresh_window(margin_s=20)
        demo = [("authorization", "Bearer sk-tollgate-demo")]
        # A Claude client with Anthropic's SDK: the demo routes claude-* to the provider's
        # Messages API, on the same key and budget.
        claude = anthropic.Anthropic(base_url=url, api_key="sk-tollgate-demo", max_retries=0, timeout=30)
        message = claude.messages.create(model="claude-sonnet-5", max_tokens=32,
                                         messages=[{"role": "user", "content": "Hello Claude"}])
        assert message.type == "message" and "Hello Claude" in message.content[0].text
        statuses = [harness.request(url, "POST", "/v1/chat/completions", demo, chat_body()).status
                    for _ in range(60)]
        assert statuses[:59] == [200] * 59
        assert statuses[59] == 429
        # The alias and the second provider (the 429 window is per client, so use the models
        # list, which is answered by the gateway).
        models = harness.request(url, "GET", "/v1/models", demo).json()
        assert [m["id"] for m in models["data"]] == ["gpt-4.1", "fast"]
        if limiter == "redis":
            assert "limiter:          redis" in banner
            key = f"rate:{md5_hex('sk-tollgate-demo')}:{int(time.time() // 60)}"
            count = subprocess.run(["redis-cli", "-p", str(redis_port), "GET", key],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            assert count == "60"

        # Ctrl-C (SIGINT to the foreground process group) stops Envoy and the mock provider.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for addr in (listen, admin, mock, backup, f"127.0.0.1:{redis_port}", f"127.0.0.1:{webdis_port}"):
            host, port = addr.rsplit(":", 1)
            try:
                harness.socket.create_connection((host, int(port)), timeout=1).close()
                raise AssertionError(f"{addr} still accepts connections after Ctrl-C")
            except ConnectionRefusedError:
                pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()

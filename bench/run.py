#!/usr/bin/env python3
"""Tollgate's benchmark (`make bench`): starts every peer on loopback, measures them in the same
run, stops everything, and writes a markdown table and the raw numbers to bench/results/.

    .venv/bin/python bench/run.py [--repeats 3] [--peers bare,empty,local] [--smoke] ...

Peers (see PEERS): the mock provider direct; bare Envoy (envoy/demo.yaml without the wasm
filter); Envoy with an empty proxy-wasm filter (bench/empty-filter, the wasm floor); Envoy +
Tollgate with the local limiter, with the Redis limiter (real Redis + Webdis), with body routing
(the demo's layout; listed as not built where scripts/render_envoy.py has no routing); streaming
responses through Tollgate and through bare Envoy.

Every Envoy config is derived from envoy/demo.yaml with scripts/render_envoy.py, so the gateway
measured is the gateway that ships. Each round measures every peer in turn (the order rotates
between rounds): a warm-up, a latency run at 1 connection, a load run at --connections. wrk
(bench/wrk.lua) checks the status, body and rate-limit header of every response, and Tollgate's
own counters are checked after each run: a run with a single error is reported as invalid.

Pinning (2+ cores, see Pinning): at load, Envoy (--concurrency 1) runs alone on CPU 0 and wrk,
the mock provider, Redis and Webdis share CPU 1; at 1 connection, Envoy joins them on CPU 1.
Envoy's CPU time per request comes from /proc/PID/stat around each run.

Standard library and PyYAML only; everything runs on 127.0.0.1 and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402  (tests/ is not a package; it also puts scripts/ on sys.path)
import render_envoy  # noqa: E402

TOLLGATE_WASM = harness.WASM
EMPTY_WASM = ROOT / "target" / "bench-empty-filter" / "wasm32-wasip1" / "release" / "empty_filter.wasm"
WRK_LUA = BENCH / "wrk.lua"

# The demo client key (its SHA-256 is in envoy/demo.yaml). The provider key has the same length,
# so a client sends the same bytes to every peer: the demo key to Tollgate, which swaps it for the
# provider key, and the provider key itself to peers that do not swap keys.
CLIENT_KEY = "sk-tollgate-demo"
PROVIDER_KEY = "sk-bench-provkey"
# A budget the bench can never exhaust (requests and tokens per minute): a 429 would be counted
# as an error.
BENCH_REQUESTS_PER_MINUTE = 1_000_000_000
MOCK_NAME = "bench"
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Say hello"}]}
# What every good answer contains (the mock's reply is a function of the request).
CHAT_REPLY = '"content":"Mock reply from bench: Say hello"'
STREAM_FINISH = '"finish_reason":"stop"'
STREAM_TAIL = "data: [DONE]\n\n"
MOCK_RATELIMIT = "10000"  # the mock's own x-ratelimit-limit-requests

# Targets of issue 6 (measured with the local limiter and body routing on).
TARGET_RPS_VS_EMPTY = 0.85
TARGET_ADDED_CPU_US = 10.0
TARGET_ADDED_P50_US = 60.0
TARGET_MODULE_BYTES = 300_000  # 300 KB, read strictly (300 KiB would be 307 200)

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Peers


@dataclass(frozen=True)
class Peer:
    """One thing measured. Later features are one more entry with a `configure` hook."""

    id: str
    title: str
    #: "direct" (the mock provider itself) or "envoy".
    front: str = "envoy"
    #: "none" (bare Envoy), "empty" (the empty wasm filter) or "tollgate".
    filter: str = "none"
    #: Tollgate's limiter: "local" or "redis" (starts Redis and Webdis).
    limiter: str = "local"
    #: Ask for SSE streams (`"stream": true`).
    stream: bool = False
    #: The peer without the filter under the same traffic: added latency and req/s ratios.
    baseline: str | None = "bare"
    #: The empty-filter peer under the same traffic, if any: added CPU and the req/s target.
    floor: str | None = "empty"
    #: Route on the body's `model` (the demo's providers and model rules) instead of sending
    #: everything to one provider.
    routing: bool = False
    #: Edits the rendered Envoy config (after the limiter is set), e.g. to turn a feature on.
    configure: Callable[[dict], None] | None = None
    #: Returns why this peer cannot run (yet), or "" when it can; such a peer is listed as such.
    unavailable: Callable[[], str] | None = None

    @property
    def not_built(self) -> str:
        return self.unavailable() if self.unavailable else ""


def routing_unavailable() -> str:
    if not hasattr(render_envoy, "configure_routing"):
        return "not yet built (scripts/render_envoy.py has no model routing)"
    if "providers" not in render_envoy.plugin_config(render_envoy.load()):
        return "not yet built (envoy/demo.yaml has no model routing)"
    return ""


def with_leases(cfg: dict) -> None:
    """The Redis limiter with quota leases at their defaults (docs/limiters.md#leases)."""
    plugin = render_envoy.plugin_config(cfg)
    plugin["limiter"]["leases"] = {}
    render_envoy.set_plugin_config(cfg, plugin)


def with_access_log(cfg: dict) -> None:
    """The access log's fields on (`access_log`, docs/metrics.md#access-log): four properties
    more per admitted request, one host call each."""
    plugin = render_envoy.plugin_config(cfg)
    plugin["access_log"] = True
    render_envoy.set_plugin_config(cfg, plugin)


def with_budgets(cfg: dict) -> None:
    """Every client with day, week and month budgets in money, tokens and requests (issue #18),
    too large to refuse the bench: each is checked, reserved and settled on every request."""
    plugin = render_envoy.plugin_config(cfg)
    for client in plugin["clients"]:
        client["budgets"] = [
            {"window": "day", "money": 1_000_000},
            {"window": "week", "tokens": 1_000_000_000},
            {"window": "month", "requests": 1_000_000_000, "money": 1_000_000},
        ]
    render_envoy.set_plugin_config(cfg, plugin)


PEERS: list[Peer] = [
    Peer("mock", "mock provider direct (no Envoy)", front="direct", baseline="bare", floor=None),
    Peer("bare", "bare Envoy (no wasm filter)", filter="none", baseline=None, floor=None),
    Peer("empty", "Envoy + empty wasm filter (the floor)", filter="empty", floor=None),
    Peer("local", "Envoy + Tollgate, local limiter", filter="tollgate", limiter="local"),
    Peer("logged", "Envoy + Tollgate, local limiter, access-log fields", filter="tollgate",
         limiter="local", configure=with_access_log),
    Peer("redis", "Envoy + Tollgate, Redis limiter (Webdis)", filter="tollgate", limiter="redis"),
    Peer("leases", "Envoy + Tollgate, Redis limiter with quota leases", filter="tollgate",
         limiter="redis", configure=with_leases),
    # The demo's own layout once body routing is built (the model in the body picks the provider;
    # every provider of the demo points at the mock). The targets are measured on this peer when
    # it can run, on `local` otherwise.
    Peer("routing", "Envoy + Tollgate, local limiter + body routing", filter="tollgate",
         limiter="local", routing=True, unavailable=routing_unavailable),
    Peer("budgets", "Envoy + Tollgate, body routing, priced, day/week/month budgets",
         filter="tollgate", limiter="local", routing=True, configure=with_budgets,
         unavailable=routing_unavailable),
    Peer("stream", "Envoy + Tollgate, local limiter, SSE streaming", filter="tollgate",
         limiter="local", stream=True, baseline="bare-stream", floor=None),
    Peer("bare-stream", "bare Envoy, SSE streaming", filter="none", stream=True, baseline=None,
         floor=None),
]
PEER_BY_ID = {p.id: p for p in PEERS}


def target_peer(peers: list[Peer]) -> Peer:
    """The peer the targets are measured on: body routing on once it is built."""
    ids = {p.id for p in peers}
    if "routing" in ids and not PEER_BY_ID["routing"].not_built:
        return PEER_BY_ID["routing"]
    return PEER_BY_ID["local"]


# --------------------------------------------------------------------------------------------
# Envoy configs, all derived from envoy/demo.yaml


def remove_wasm_filter(cfg: dict) -> None:
    """Bare Envoy: the demo bootstrap without the Tollgate filter."""
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                tc = f.get("typed_config", {})
                if "http_filters" in tc:
                    tc["http_filters"] = [h for h in tc["http_filters"]
                                          if h["name"] != render_envoy.WASM_FILTER]


# Plugin fields that only exist with model routing (prices need the model from the body).
ROUTING_FIELDS = ("providers", "models", "default_provider", "max_body_bytes", "prices", "currency")


def bench_plugin(cfg: dict, routing: bool) -> dict:
    """The demo's plugin configuration with a budget the bench never exhausts; without routing,
    one provider for everything (`upstream`)."""
    plugin = render_envoy.plugin_config(cfg)
    # Every per-minute budget (requests, tokens, ...), the client's own and the defaults.
    for key in [k for k in plugin if k.startswith("default_") and k.endswith("_per_minute")]:
        plugin[key] = BENCH_REQUESTS_PER_MINUTE
    for client in plugin["clients"]:
        client["requests_per_minute"] = BENCH_REQUESTS_PER_MINUTE
        for key in [k for k in client if k.endswith("_per_minute")]:
            client[key] = BENCH_REQUESTS_PER_MINUTE
        # The demo's daily money budget (docs/spend.md) would refuse the bench within seconds;
        # prices stay (with routing), so spend is counted as in the demo.
        client.pop("budgets", None)
        if not routing:
            client.pop("models", None)  # model allow-lists need routing
    # The bench measures what the gateway adds on the way to a provider: the demo's response
    # cache (docs/cache.md) would inspect, and at temperature 0 answer, its identical requests.
    for rule in plugin.get("models", []):
        rule.pop("cache", None)
    # The access log's fields are opt-in (the demo turns them on to show them); the `logged`
    # peer measures them.
    plugin.pop("access_log", None)
    if not routing:
        plugin = {k: v for k, v in plugin.items() if k not in ROUTING_FIELDS}
        plugin["upstream"] = {"api_key_env": harness.PROVIDER_KEY_ENV}
    return plugin


def single_provider(cfg: dict, plugin: dict, provider_url: str) -> None:
    """The one-provider layout: one route to the `provider` cluster."""
    if hasattr(render_envoy, "configure_single"):
        render_envoy.configure_single(cfg, plugin, provider_url)
    else:  # before model routing, the demo was this layout
        render_envoy.set_provider(cfg, provider_url)
        render_envoy.set_plugin_config(cfg, plugin)


def key_envs(cfg: dict) -> list[str]:
    """Every environment variable the plugin configuration reads a provider key from."""
    try:
        plugin = render_envoy.plugin_config(cfg)
    except (KeyError, ValueError):
        return []
    found = [p.get("api_key_env") for p in plugin.get("providers", [])]
    found.append(plugin.get("upstream", {}).get("api_key_env"))
    return [e for e in found if e]


# The smoke run's Webdis timeout: it checks that every peer works, on whatever machine runs it (a
# loaded CI machine can take more than the measured 100 ms for a callout; that is a slow machine,
# not a failure of the run). The measured runs keep the default, where a timeout is a real error.
SMOKE_WEBDIS_TIMEOUT_MS = 2000


def envoy_config(peer: Peer, listen: str, admin: str, provider_url: str, webdis: str | None,
                 smoke: bool = False) -> dict:
    cfg = render_envoy.load()
    render_envoy.set_listen(cfg, listen)
    render_envoy.set_admin(cfg, admin)
    if peer.routing:
        plugin = bench_plugin(cfg, routing=True)
        render_envoy.configure_routing(cfg, plugin, {p["name"]: {"url": provider_url}
                                                     for p in plugin["providers"]})
    else:
        single_provider(cfg, bench_plugin(cfg, routing=False), provider_url)
    if peer.filter == "none":
        remove_wasm_filter(cfg)
    elif peer.filter == "empty":
        # The Tollgate filter swapped for the empty one; its VM settings stay the same.
        render_envoy.set_wasm(cfg, str(EMPTY_WASM))
        render_envoy.set_plugin_config(cfg, "{}")
    elif peer.filter == "tollgate":
        render_envoy.set_wasm(cfg, str(TOLLGATE_WASM))
        if peer.limiter == "redis":
            if smoke:
                render_envoy.use_redis_limiter(cfg, timeout_ms=SMOKE_WEBDIS_TIMEOUT_MS)
            else:
                render_envoy.use_redis_limiter(cfg)
            if webdis:
                render_envoy.set_webdis(cfg, webdis)
    else:
        raise ValueError(f"unknown filter {peer.filter!r}")
    if peer.configure:
        peer.configure(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Processes and /proc


def proc_cpu_s(pid: int) -> float:
    """User + system CPU time of a process (all its threads, exited ones included)."""
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_cpu() -> dict[str, list[int]]:
    """/proc/stat per-CPU counters (ticks): user nice system idle iowait irq softirq steal."""
    out = {}
    for line in pathlib.Path("/proc/stat").read_text().splitlines():
        if re.match(r"cpu\d* ", line):
            name, *vals = line.split()
            out[name] = [int(v) for v in vals[:8]]
    return out


def machine_busy_s(before: dict, after: dict) -> tuple[float, float]:
    """CPU seconds spent by anything on the machine, and seconds stolen by the hypervisor."""
    b, a = before["cpu"], after["cpu"]
    d = [x - y for x, y in zip(a, b)]
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    return busy / CLK_TCK, d[7] / CLK_TCK


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each process runs on; all None when not pinned.

    Load runs: Envoy alone on CPU 0, so its core is the bottleneck and nothing else runs on it;
    wrk, the mock provider, Redis and Webdis on the others. Latency runs (1 connection): Envoy
    joins them, so the whole request chain runs on one core. A chain of one request at a time
    gains nothing from a second core, and on a VM every hop to an idle vCPU is a wake-up that
    costs tens of microseconds and varies, which would swamp what is measured.
    """

    envoy_load: set[int] | None = None
    others: set[int] | None = None

    @property
    def enabled(self) -> bool:
        return self.others is not None

    def prefix(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, sorted(self.envoy_load)))] if self.enabled else []

    def describe(self) -> dict:
        if not self.enabled:
            return {"load": "not pinned", "latency": "not pinned"}
        return {"load": f"Envoy on CPU {fmt_cpus(self.envoy_load)}; wrk, mock provider, Redis and "
                        f"Webdis on CPU {fmt_cpus(self.others)}",
                "latency": f"everything on CPU {fmt_cpus(self.others)}"}


def fmt_cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def cpu_pinning(n_cpus: int, enabled: bool) -> Pinning:
    if not enabled or n_cpus < 2:
        return Pinning()
    # One core each even on bigger machines: the numbers stay comparable with a 2-core run.
    return Pinning(envoy_load={0}, others={1})


def raise_priority() -> str:
    """Runs this process and everything it starts at nice -20 when allowed (root), so other work on
    a shared machine takes little of the pinned cores while a run lasts (runs are bounded)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        return "nice -20"
    except OSError:
        return f"nice {os.getpriority(os.PRIO_PROCESS, 0)} (not allowed to raise)"


def set_process_affinity(pid: int, cpus: set[int]) -> None:
    """Moves every thread of a process (Envoy's threads are long-lived)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


class Envoy:
    """One Envoy on free loopback ports with a rendered config; stopped by stop()."""

    def __init__(self, name: str, cfg: dict, workdir: pathlib.Path, prefix: list[str],
                 concurrency: int):
        self.name = name
        self.port = harness.free_port()
        self.admin_port = harness.free_port()
        render_envoy.set_listen(cfg, f"127.0.0.1:{self.port}")
        render_envoy.set_admin(cfg, f"127.0.0.1:{self.admin_port}")
        self.config_path = workdir / f"envoy-{name}.yaml"
        self.config_path.write_text(render_envoy.dump(cfg))
        self.log_path = workdir / f"envoy-{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self._log = open(self.log_path, "wb")
        # Every provider of the config is the mock, which accepts one key.
        env = {**os.environ, **{k: PROVIDER_KEY for k in [harness.PROVIDER_KEY_ENV, *key_envs(cfg)]}}
        self.proc = subprocess.Popen(
            [*prefix, harness.envoy_bin(), "-c", str(self.config_path),
             "--concurrency", str(concurrency), "--disable-hot-restart", "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.pid = self.proc.pid
        try:
            harness.wait_until(self._ready, f"Envoy ({name}) to be ready", proc=self.proc)
        except Exception:
            self.stop()
            raise

    def _ready(self) -> bool:
        if harness.request(self.admin, "GET", "/ready").status != 200:
            return False
        workers = harness.request(self.admin, "GET", "/stats?filter=^listener_manager.workers_started$")
        if b"workers_started: 1" not in workers.body:
            return False
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return True

    def tollgate_counters(self) -> dict[str, float]:
        """Tollgate's series, as `family{labels}` -> value."""
        text = harness.request(self.admin, "GET", "/stats/prometheus").body.decode()
        out = {}
        for fam, labels, value in harness.parse_prometheus(text):
            if fam.startswith("tollgate_"):
                key = fam + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                out[key] = value
        return out

    def stop(self) -> None:
        harness.stop(self.proc)
        self._log.close()


# --------------------------------------------------------------------------------------------
# One measurement


@dataclass
class Target:
    """Where a peer is reached and which process serves it."""

    peer: Peer
    url: str
    pid: int
    envoy: Envoy | None = None

    def place(self, pinning: Pinning, kind: str) -> None:
        """Moves Envoy for a latency or a load run (see Pinning)."""
        if self.envoy is not None and pinning.enabled:
            set_process_affinity(self.pid, pinning.others if kind == "latency" else pinning.envoy_load)


@dataclass
class Settings:
    repeats: int
    warmup_s: int
    latency_s: int
    load_s: int
    connections: int
    concurrency: int
    pin: bool
    out: pathlib.Path
    peers: list[Peer]
    smoke: bool
    command: str
    profile: bool = False


def wrk_args(peer: Peer) -> list[str]:
    # Streams ask for usage, as clients that are billed by tokens do (and Tollgate counts it).
    body = dict(CHAT, stream=True, stream_options={"include_usage": True}) if peer.stream else CHAT
    key = CLIENT_KEY if peer.filter == "tollgate" else PROVIDER_KEY
    want = STREAM_FINISH if peer.stream else CHAT_REPLY
    tail = STREAM_TAIL if peer.stream else ""
    ratelimit = str(BENCH_REQUESTS_PER_MINUTE) if peer.filter == "tollgate" else MOCK_RATELIMIT
    return [key, json.dumps(body, separators=(",", ":")), want, tail, ratelimit]


def run_wrk(target: Target, connections: int, duration_s: int, helper_pids: list[int]) -> dict:
    """One bounded wrk run with the CPU each side spent during it."""
    helper_pids = [p for p in helper_pids if p != target.pid]
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
           "-s", str(WRK_LUA), target.url, "--", *wrk_args(target.peer)]
    counters0 = target.envoy.tollgate_counters() if target.peer.filter == "tollgate" else None
    m0, s0 = machine_cpu(), proc_cpu_s(target.pid)
    h0 = sum(proc_cpu_s(p) for p in helper_pids)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    wall = time.monotonic() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1, m1 = proc_cpu_s(target.pid), machine_cpu()
    h1 = sum(proc_cpu_s(p) for p in helper_pids)
    problems: list[str] = []
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        return {"valid": False, "problems": [f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]}"]}
    w = json.loads(line.removeprefix("BENCH_JSON "))
    n = w["requests"]
    errors = {k: v for k, v in w["errors"].items() if v}
    if n == 0:
        problems.append("no request completed")
    if w["bad"]:
        problems.append(f"{w['bad']} of {n} responses wrong; first: {w['first_bad'][:200]!r}")
    if errors:
        problems.append(f"wrk errors: {errors}")
    if w["good"] != n:
        problems.append(f"{n} requests but {w['good']} good responses")
    if counters0 is not None:
        # A busy worker writes its counters on its root tick (every 100 ms) or once its last
        # request ends (docs/metrics.md): give the last ones up to a second to arrive.
        deadline = time.monotonic() + 1.0
        while True:
            found = check_counters(target.peer, counters0, target.envoy.tollgate_counters(), w["good"])
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        problems += found
    wrk_cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    server_cpu = s1 - s0
    busy, steal = machine_busy_s(m0, m1)
    ours = server_cpu + (h1 - h0) + wrk_cpu
    n_cpus = len(m0) - 1
    seconds = w["duration_us"] / 1e6
    return {
        "valid": not problems,
        "problems": problems,
        "connections": connections,
        "requests": n,
        "seconds": seconds,
        "rps": n / seconds if seconds else 0.0,
        "latency_us": w["latency_us"],
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_request": server_cpu / n * 1e6 if n else None,
        # Share of one core the server used while wrk ran (1.0: it was the bottleneck).
        "server_core_busy": server_cpu / wall,
        # wrk, the mock provider, Redis and Webdis (CPU 1 when pinned).
        "client_side_cpu_us_per_request": (wrk_cpu + h1 - h0) / n * 1e6 if n else None,
        "client_side_core_busy": (wrk_cpu + h1 - h0) / wall,
        # What other processes on this shared machine took, as a share of all its cores.
        "foreign_cpu_share": max(0.0, busy - ours) / (wall * n_cpus),
        "steal_share": steal / (wall * n_cpus),
    }


# A Tollgate series whose name says something went wrong. Any such series that moves during a run
# (a limiter error, a fallback to another provider, ...) makes the run invalid, as does any request
# outcome but `admitted`; other series (attempts, tokens, durations) may move freely.
FAILURE_WORDS = ("error", "fallback", "ratelimited", "rate_limited", "rejected", "denied", "fail",
                 "timeout", "invalid", "unauthorized", "dropped", "overflow")


def check_counters(peer: Peer, before: dict, after: dict, good: int) -> list[str]:
    """Tollgate counted every request as admitted, and nothing went wrong on the way."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta = {k: v for k, v in delta.items() if v}
    problems = []
    requests = {k: v for k, v in delta.items() if k.startswith("tollgate_requests_total{")}
    admitted = sum(v for k, v in requests.items() if "outcome=admitted" in k)
    # wrk drops the answers still in flight when it stops, so Envoy may count a few more.
    if admitted < good:
        problems.append(f"Tollgate counted {admitted:.0f} admitted requests for {good} good answers")
    wrong = {k: v for k, v in requests.items() if "outcome=admitted" not in k}
    wrong.update({k: v for k, v in delta.items()
                  if any(w in k.split("{")[0] for w in FAILURE_WORDS)})
    if wrong:
        shown = dict(sorted(wrong.items())[:6])
        problems.append(f"Tollgate counted failures: {shown}" + (" ..." if len(wrong) > 6 else ""))
    return problems


# --------------------------------------------------------------------------------------------
# The run


def measure(settings: Settings, targets: dict[str, Target], helper_pids: list[int],
            pinning: Pinning) -> list[dict]:
    runs = []
    ids = list(targets)
    for r in range(settings.repeats):
        order = ids[r % len(ids):] + ids[:r % len(ids)]
        for pid in order:
            t = targets[pid]
            t.place(pinning, "load")
            if settings.warmup_s:
                warm = run_wrk(t, settings.connections, settings.warmup_s, helper_pids)
                if not warm["valid"]:
                    runs.append({"peer": pid, "round": r, "kind": "warmup", **warm})
            for kind, conns, secs in (("latency", 1, settings.latency_s),
                                      ("load", settings.connections, settings.load_s)):
                t.place(pinning, kind)
                res = run_wrk(t, conns, secs, helper_pids)
                runs.append({"peer": pid, "round": r, "kind": kind, **res})
                status = "ok" if res["valid"] else "INVALID: " + "; ".join(res["problems"])
                rps = res.get("rps", 0)
                p50 = res.get("latency_us", {}).get("p50", 0)
                cpu = res.get("server_cpu_us_per_request") or 0
                print(f"  round {r + 1}/{settings.repeats} {pid:<12} {kind:<7} c={conns:<3} "
                      f"{rps:9.0f} req/s  p50 {p50:5d} us  cpu {cpu:6.1f} us/req  {status}",
                      flush=True)
    return runs


def profile(settings: Settings, targets: dict[str, Target], helper_pids: list[int],
            pinning: Pinning, workdir: pathlib.Path) -> dict[str, dict]:
    """One more load run per Envoy peer under `perf record` (cpu-clock samples; Envoy is stripped,
    so by binary: Envoy itself with V8's runtime, the kernel, the wasm code V8 compiled, libc).
    Separate from the measured runs, which perf would slow down."""
    out: dict[str, dict] = {}
    for pid, t in targets.items():
        if t.envoy is None:
            continue
        data = workdir / f"perf-{pid}.data"
        t.place(pinning, "load")
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-o", str(data),
                                 "-p", str(t.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        res = run_wrk(t, settings.connections, settings.load_s, helper_pids)
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                                 "--sort", "dso"], capture_output=True, text=True, timeout=300)
        shares: dict[str, float] = {}
        for line in report.stdout.splitlines():
            m = re.match(r"\s+([\d.]+)%\s+(.+?)\s*$", line)
            if m:
                dso = m.group(2)
                group = ("wasm (V8-compiled code)" if dso.startswith("[JIT]") else
                         "kernel" if dso.startswith("[kernel") else
                         "Envoy + V8 runtime" if dso == "envoy" else
                         "libc, vdso" if dso.startswith(("libc", "[vdso]", "libm", "ld-linux")) else "other")
                shares[group] = shares.get(group, 0.0) + float(m.group(1)) / 100
        cpu = res.get("server_cpu_us_per_request")
        out[pid] = {"valid": res["valid"], "cpu_us_per_request": cpu, "shares": shares,
                    "us_per_request": {g: v * cpu for g, v in shares.items()} if cpu else {}}
        print(f"  profile {pid:<12} {cpu or 0:6.1f} us/req  "
              + "  ".join(f"{g} {v:.0%}" for g, v in sorted(shares.items(), key=lambda x: -x[1])), flush=True)
    return out


def start_all(settings: Settings, workdir: pathlib.Path, stack: list,
              pinning: Pinning) -> tuple[dict[str, Target], list[int]]:
    """Starts the mock provider, Redis + Webdis if needed, and one Envoy per peer."""
    if pinning.enabled:
        # Children (mock provider, Redis, Webdis, wrk) inherit this; Envoy starts on its own CPU.
        os.sched_setaffinity(0, pinning.others)
    runnable = [p for p in settings.peers if not p.not_built]
    mock = harness.MockProvider(workdir, name=MOCK_NAME, expect_key=PROVIDER_KEY)
    stack.append(mock.stop)
    helper_pids = [mock.proc.pid]
    webdis_addr = None
    if any(p.limiter == "redis" and p.filter == "tollgate" for p in runnable):
        redis = harness.RedisServer(workdir)
        stack.append(redis.stop)
        webdis = harness.Webdis(workdir, redis)
        stack.append(webdis.stop)
        webdis_addr = webdis.addr
        helper_pids += [redis.proc.pid, webdis.proc.pid]
    targets: dict[str, Target] = {}
    for p in runnable:
        if p.front == "direct":
            targets[p.id] = Target(p, mock.url, mock.proc.pid)
            continue
        cfg = envoy_config(p, "127.0.0.1:0", "127.0.0.1:0", mock.url, webdis_addr, settings.smoke)
        e = Envoy(p.id, cfg, workdir, pinning.prefix(), settings.concurrency)
        stack.append(e.stop)
        targets[p.id] = Target(p, e.url, e.pid, e)
    return targets, helper_pids


def _terminated(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def run(settings: Settings) -> int:
    # Stop everything this run started on SIGTERM (and on SIGINT, even when started in the
    # background, where a shell ignores it).
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for path, how in ((TOLLGATE_WASM, "make build"), (harness.MOCK_BIN, "make build"),
                      (EMPTY_WASM, "make bench (builds bench/empty-filter)")):
        if not path.exists():
            print(f"missing {path.relative_to(ROOT)}: run {how}", file=sys.stderr)
            return 2
    if not shutil.which("wrk"):
        print("wrk is not installed: run make deps", file=sys.stderr)
        return 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    started = dt.datetime.now(dt.timezone.utc)
    machine = machine_info()
    machine["loadavg_at_start"] = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    print(f"Tollgate benchmark: {len(settings.peers)} peers, {settings.repeats} rounds, "
          f"{settings.latency_s}s at 1 connection and {settings.load_s}s at "
          f"{settings.connections} connections per peer and round (logs in {workdir})", flush=True)
    stack: list[Callable[[], None]] = []
    pinning = cpu_pinning(os.cpu_count() or 1, settings.pin)
    priority = raise_priority() if settings.pin else "default"
    m0 = machine_cpu()
    t0 = time.monotonic()
    try:
        targets, helper_pids = start_all(settings, workdir, stack, pinning)
        runs = measure(settings, targets, helper_pids, pinning)
        rss = {pid: proc_rss_kib(t.pid) for pid, t in targets.items()}
        profiles = profile(settings, targets, helper_pids, pinning, workdir) if settings.profile else {}
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as e:  # keep stopping the others
                print(f"while stopping: {e}", file=sys.stderr)
    wall = time.monotonic() - t0
    busy, steal = machine_busy_s(m0, machine_cpu())
    machine["busy_share_during_run"] = busy / (wall * (len(m0) - 1))
    machine["steal_share_during_run"] = steal / (wall * (len(m0) - 1))
    results = summarise(settings, runs, rss)
    doc = {
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "command": settings.command,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                     if k not in ("peers", "out", "command")},
        "peers": [{"id": p.id, "title": p.title, "not_built": p.not_built} for p in settings.peers],
        "pinning": {**pinning.describe(), "priority": priority},
        "machine": machine,
        "modules": module_sizes(),
        "results": results,
        "targets": targets_check(settings, results),
        "profiles": profiles,
        "valid": all(r["valid"] for r in runs),
        "runs": runs,
    }
    md = render_markdown(doc)
    settings.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for name in (stamp, "latest"):
        (settings.out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (settings.out / f"{name}.md").write_text(md)
    print()
    print(md)
    where = settings.out.relative_to(ROOT) if settings.out.is_relative_to(ROOT) else settings.out
    print(f"written: {where}/{stamp}.md, {stamp}.json, latest.md, latest.json")
    if doc["valid"]:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"INVALID RUN; Envoy configs and logs kept in {workdir}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------
# Results


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> float | None:
    """(max - min) / median: how much the repeats disagree."""
    if len(xs) < 2:
        return None
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else None


def summarise(settings: Settings, runs: list[dict], rss: dict[str, int]) -> dict:
    def series(peer: str, kind: str, get) -> dict[int, float]:
        return {r["round"]: get(r) for r in runs
                if r["peer"] == peer and r["kind"] == kind and r["valid"]}

    def paired(a: dict[int, float], b: dict[int, float], op) -> list[float]:
        return [op(a[r], b[r]) for r in sorted(a) if r in b]

    out: dict[str, dict] = {}
    ran = {r["peer"] for r in runs}
    metrics = {
        "p50": ("latency", lambda r: r["latency_us"]["p50"]),
        "p90": ("latency", lambda r: r["latency_us"]["p90"]),
        "p99": ("latency", lambda r: r["latency_us"]["p99"]),
        "rps": ("load", lambda r: r["rps"]),
        "load_p50": ("load", lambda r: r["latency_us"]["p50"]),
        "load_p99": ("load", lambda r: r["latency_us"]["p99"]),
        "cpu_us": ("load", lambda r: r["server_cpu_us_per_request"]),
        "cpu_us_1conn": ("latency", lambda r: r["server_cpu_us_per_request"]),
        "server_core_busy": ("load", lambda r: r["server_core_busy"]),
        "client_side_core_busy": ("load", lambda r: r["client_side_core_busy"]),
        "client_side_cpu_us": ("load", lambda r: r["client_side_cpu_us_per_request"]),
        "foreign_cpu_share": ("load", lambda r: r["foreign_cpu_share"]),
    }
    for p in settings.peers:
        if p.id not in ran:
            out[p.id] = {"title": p.title, "not_built": p.not_built or "not run"}
            continue
        s = {name: series(p.id, kind, get) for name, (kind, get) in metrics.items()}
        res: dict = {"title": p.title, "baseline": p.baseline, "floor": p.floor,
                     "valid": all(r["valid"] for r in runs if r["peer"] == p.id),
                     "rounds": len(s["rps"]), "rss_mib": rss.get(p.id, 0) / 1024}
        for name, values in s.items():
            v = list(values.values())
            res[name] = median(v)
            res[name + "_spread"] = spread(v)
            res[name + "_min"] = min(v) if v else None
            res[name + "_max"] = max(v) if v else None
        for rel, other in (("baseline", p.baseline), ("floor", p.floor)):
            if not other or other not in ran:
                continue
            o = {name: series(other, kind, get) for name, (kind, get) in metrics.items()}
            res[f"added_p50_vs_{rel}"] = median(paired(s["p50"], o["p50"], lambda a, b: a - b))
            res[f"added_p99_vs_{rel}"] = median(paired(s["p99"], o["p99"], lambda a, b: a - b))
            res[f"rps_ratio_vs_{rel}"] = median(paired(s["rps"], o["rps"], lambda a, b: a / b))
            res[f"added_cpu_us_vs_{rel}"] = median(paired(s["cpu_us"], o["cpu_us"], lambda a, b: a - b))
            diffs = paired(s["cpu_us"], o["cpu_us"], lambda a, b: a - b)
            res[f"added_cpu_us_vs_{rel}_range"] = [min(diffs), max(diffs)] if diffs else None
        out[p.id] = res
    return out


def module_sizes() -> dict:
    return {"tollgate.wasm": TOLLGATE_WASM.stat().st_size, "empty_filter.wasm": EMPTY_WASM.stat().st_size,
            "tollgate.wasm path": str(TOLLGATE_WASM.relative_to(ROOT) if TOLLGATE_WASM.is_relative_to(ROOT)
                                      else TOLLGATE_WASM),
            "tollgate.wasm sha256": hashlib.sha256(TOLLGATE_WASM.read_bytes()).hexdigest()}


def targets_check(settings: Settings, results: dict) -> list[dict]:
    tp = target_peer(settings.peers)
    r = results.get(tp.id, {})
    body_routing = "" if tp.id == "routing" else " (body routing not yet built: local limiter only)"
    size = module_sizes()["tollgate.wasm"]

    def row(what, value, limit, ok, unit):
        return {"target": what, "peer": tp.id, "value": value, "limit": limit, "unit": unit,
                "met": None if value is None else ok(value)}

    return [
        row(f"req/s at {settings.connections} connections, vs the empty filter{body_routing}",
            r.get("rps_ratio_vs_floor"), TARGET_RPS_VS_EMPTY, lambda v: v >= TARGET_RPS_VS_EMPTY, ">= x"),
        row(f"Envoy CPU per request added over the empty filter{body_routing}",
            r.get("added_cpu_us_vs_floor"), TARGET_ADDED_CPU_US, lambda v: v <= TARGET_ADDED_CPU_US, "<= us"),
        row(f"p50 latency added over bare Envoy at 1 connection{body_routing}",
            r.get("added_p50_vs_baseline"), TARGET_ADDED_P50_US, lambda v: v <= TARGET_ADDED_P50_US, "<= us"),
        row("tollgate.wasm size", size, TARGET_MODULE_BYTES, lambda v: v <= TARGET_MODULE_BYTES, "<= bytes"),
    ]


def fmt(v, spec: str = ".0f", dash: str = "—") -> str:
    return dash if v is None else format(v, spec)


def signed(v, spec: str = ".0f") -> str:
    return "—" if v is None else ("+" if v >= 0 else "−") + format(abs(v), spec)


def pct(v) -> str:
    return "—" if v is None else f"{v * 100:.1f}%"


def render_markdown(doc: dict) -> str:
    s = doc["settings"]
    m = doc["machine"]
    res = doc["results"]
    conns = s["connections"]
    lines = [
        f"# Tollgate benchmark, {doc['started_utc']}",
        "",
        "**INVALID RUN: some responses or counters were wrong (see below); do not quote these numbers.**"
        if not doc["valid"] else
        "Every response was checked (status, body, rate-limit header) and Tollgate's counters "
        "matched: the run is valid.",
        "",
        f"Command: `{doc['command']}` ({s['repeats']} rounds; each round: per peer, "
        f"{s['warmup_s']} s warm-up, {s['latency_s']} s at 1 connection, {s['load_s']} s at "
        f"{conns} connections; medians of the rounds; {doc['wall_s']:.0f} s in all).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']:.0f} GiB, Linux {m['kernel']}, "
        f"{m['os']}; Envoy {m['envoy_version']} (`--concurrency {s['concurrency']}`), {m['wrk_version']}; "
        f"git {m['git']}. Pinning: at load, {doc['pinning']['load']}; at 1 connection, "
        f"{doc['pinning']['latency']}; all at {doc['pinning']['priority']}.",
        "",
        "| peer | p50 µs | p90 µs | p99 µs | +p50 vs bare | req/s | ÷ bare | ÷ empty | p99 µs under load "
        "| server CPU µs/req | +CPU vs empty | RSS MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for pid, r in res.items():
        if "not_built" in r:
            lines.append(f"| {r['title']} | {r['not_built']} |||||||||||")
            continue
        mark = "" if r["valid"] else " **(invalid)**"
        star = " ¹" if r.get("baseline") == "bare-stream" else ""
        lines.append(
            f"| {r['title']}{mark} | {fmt(r['p50'])} | {fmt(r['p90'])} | {fmt(r['p99'])} "
            f"| {signed(r.get('added_p50_vs_baseline'))}{star if r.get('added_p50_vs_baseline') is not None else ''} "
            f"| {fmt(r['rps'])} | {fmt(r.get('rps_ratio_vs_baseline'), '.2f')}{star if r.get('rps_ratio_vs_baseline') is not None else ''} "
            f"| {fmt(r.get('rps_ratio_vs_floor'), '.2f')} | {fmt(r['load_p99'])} "
            f"| {fmt(r['cpu_us'], '.1f')} | {signed(r.get('added_cpu_us_vs_floor'), '.1f')} "
            f"| {fmt(r['rss_mib'], '.1f')} |")
    lines += [
        "",
        "p50/p90/p99: latency at 1 connection (wrk, 1 µs resolution). req/s and \"under load\": "
        f"{conns} connections. ÷ and + columns are medians of per-round differences and ratios "
        "(peers of one round run back to back). Server CPU: user + system time of the Envoy process "
        "(of the mock provider on its own row) per request at load. RSS: after the last round. "
        "¹ streaming rows compare with bare Envoy streaming.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met |",
        "|---|--:|--:|---|",
    ]
    for t in doc["targets"]:
        unit = t["unit"]
        if unit == ">= x":
            val, lim = fmt(t["value"], ".3f"), f"≥ {t['limit']:.2f}"
        elif unit == "<= us":
            val, lim = f"{fmt(t['value'], '.1f')} µs", f"≤ {t['limit']:.0f} µs"
        else:
            val, lim = f"{t['value']:,} bytes", f"≤ {t['limit']:,} bytes"
        met = "—" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} (peer `{t['peer']}`) | {val} | {lim} | {met} |")
    mods = doc["modules"]
    lines += [
        "",
        f"Modules: tollgate.wasm {mods['tollgate.wasm']:,} bytes (`{mods['tollgate.wasm path']}`, "
        f"sha256 `{mods['tollgate.wasm sha256'][:16]}…`); empty_filter.wasm {mods['empty_filter.wasm']:,} bytes.",
        "",
        "## Noise",
        "",
        "Spread = (max − min) / median over the rounds. \"Envoy core\": share of one core the server "
        "used during the load run (near 100%: it was the bottleneck). \"Client core\": wrk, the mock "
        "provider, Redis and Webdis together. \"Others\": CPU taken by other processes on this "
        "machine, as a share of all its cores (the worst round).",
        "",
        "| peer | req/s min–max | spread | p50 min–max µs | spread | CPU/req spread | Envoy core | client core | others |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for pid, r in res.items():
        if "not_built" in r:
            continue
        lines.append(
            f"| {r['title']} | {fmt(r['rps_min'])}–{fmt(r['rps_max'])} | {pct(r['rps_spread'])} "
            f"| {fmt(r['p50_min'])}–{fmt(r['p50_max'])} | {pct(r['p50_spread'])} | {pct(r['cpu_us_spread'])} "
            f"| {pct(r['server_core_busy'])} | {pct(r['client_side_core_busy'])} "
            f"| {pct(r['foreign_cpu_share_max'])} |")
    spreads = [r["rps_spread"] for r in res.values() if r.get("rps_spread") is not None]
    p50s = [r["p50_spread"] for r in res.values() if r.get("p50_spread") is not None]
    lines += [
        "",
        f"Machine noise: req/s spread between rounds up to {pct(max(spreads) if spreads else None)}, "
        f"p50 spread up to {pct(max(p50s) if p50s else None)}; the machine was "
        f"{pct(m['busy_share_during_run'])} busy overall during the run (this benchmark included), "
        f"{pct(m['steal_share_during_run'])} stolen by the hypervisor; load average at start "
        f"{' '.join(m['loadavg_at_start'])}.",
    ]
    if doc.get("profiles"):
        groups = ["Envoy + V8 runtime", "kernel", "wasm (V8-compiled code)", "libc, vdso", "other"]
        lines += [
            "",
            "## Profile",
            "",
            "One more load run per Envoy peer under `perf record -e cpu-clock` (not one of the measured "
            "runs). Envoy's CPU time per request split by where the samples fell: Envoy's binary "
            "(stripped: Envoy, V8's runtime and the proxy-wasm host calls together), the kernel, the "
            "wasm code V8 compiled (the filter itself and the SDK), libc.",
            "",
            "| peer | CPU µs/req | " + " | ".join(groups) + " |",
            "|---|--:|" + "--:|" * len(groups),
        ]
        for pid, pr in doc["profiles"].items():
            title = res.get(pid, {}).get("title", pid)
            us = pr["us_per_request"]
            cells = " | ".join(f"{us.get(g, 0):.1f} ({pr['shares'].get(g, 0):.0%})" for g in groups)
            lines.append(f"| {title} | {fmt(pr['cpu_us_per_request'], '.1f')} | {cells} |")
    bad = [r for r in doc["runs"] if not r["valid"]]
    if bad:
        lines += ["", "## Invalid runs", ""]
        for r in bad:
            lines.append(f"- round {r['round'] + 1}, {r['peer']}, {r['kind']}: {'; '.join(r['problems'])}")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", pathlib.Path("/proc/meminfo").read_text(), re.M)
    os_release = pathlib.Path("/etc/os-release")
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', os_release.read_text(), re.M) if os_release.exists() else None
    envoy_version = first([harness.envoy_bin(), "--version"])
    envoy_version = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    git = first(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "mem_gib": int(mem.group(1)) / 2**20 if mem else 0,
        "kernel": platform.release(),
        "os": pretty.group(1) if pretty else "unknown",
        "envoy_version": envoy_version.group(1) if envoy_version else "unknown",
        "wrk_version": " ".join(first(["wrk", "-v"]).split()[:2]),
        "rustc": first(["rustc", "--version"]),
        "git": git + (" (with uncommitted changes)" if dirty else ""),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds over every peer (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per peer and round")
    p.add_argument("--latency-duration", type=int, default=3, help="seconds at 1 connection")
    p.add_argument("--load-duration", type=int, default=5, help="seconds at --connections")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1,
                   help="Envoy worker threads (default 1: one worker alone on CPU 0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--peers", help="comma-separated peer ids (default: all): " + ",".join(PEER_BY_ID))
    p.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, one more load run per Envoy peer under `perf record` "
                        "(needs perf: Debian's linux-perf) for a profile by binary")
    p.add_argument("--tollgate-wasm", help="measure this module instead of the one `make build` makes "
                                           "(e.g. a build with another opt-level)")
    p.add_argument("--smoke", action="store_true",
                   help="check the benchmark end to end in seconds: 1 round, 1 s runs, results "
                        "in target/bench-smoke/ (the numbers mean nothing)")
    a = p.parse_args(argv)
    if a.tollgate_wasm:
        global TOLLGATE_WASM
        TOLLGATE_WASM = pathlib.Path(a.tollgate_wasm).resolve()
    if a.smoke:
        a.repeats, a.warmup, a.latency_duration, a.load_duration = 1, 0, 1, 1
        if a.out == str(BENCH / "results"):
            a.out = str(ROOT / "target" / "bench-smoke")
    peers = PEERS
    if a.peers:
        unknown = [x for x in a.peers.split(",") if x not in PEER_BY_ID]
        if unknown:
            p.error(f"unknown peers {unknown}; known: {', '.join(PEER_BY_ID)}")
        wanted = set(a.peers.split(","))
        peers = [x for x in PEERS if x.id in wanted]
    for name in ("repeats", "latency_duration", "load_duration", "connections", "concurrency"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    pin = not a.no_pin and a.concurrency == 1
    command = os.environ.get("BENCH_COMMAND") or " ".join(
        [pathlib.Path(sys.executable).name, "bench/run.py", *argv])
    settings = Settings(
        repeats=a.repeats, warmup_s=max(0, a.warmup), latency_s=a.latency_duration,
        load_s=a.load_duration, connections=a.connections, concurrency=a.concurrency, pin=pin,
        out=pathlib.Path(a.out).resolve(), peers=peers, smoke=a.smoke, command=command,
        profile=a.profile,
    )
    if a.profile and not shutil.which("perf"):
        p.error("--profile needs perf (Debian package linux-perf)")
    return run(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

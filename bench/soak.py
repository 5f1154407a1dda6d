#!/usr/bin/env python3
"""Tollgate's soak run (`make soak`, not part of `make test`): one Envoy (two workers) with
Tollgate in the demo's routing layout, the mock provider, and optionally Redis + Webdis, under a
bounded load (default 120 s, 64 connections spread over several clients with different
requests_per_minute limits), then:

- **exact accounting**: every answer is a 200 or a 429; every admitted answer carries
  `x-ratelimit-remaining-requests`; within each minute window (from the receive time and
  `x-ratelimit-reset-requests`) a client's admitted answers carry exactly the remaining values
  {limit-1, ..., limit-n}, no duplicate, no gap, and n == limit whenever the window also refused
  requests; the totals equal Envoy's `tollgate_requests_total{client,outcome}` and, with
  `--limiter redis`, each window's count in Redis;
- **memory over time**: Envoy's RSS (/proc/PID/status VmRSS) and the admin `/memory` figures
  every few seconds: start, peak, end, and growth after the warm-up.

    .venv/bin/python bench/soak.py [--limiter local|redis] [--duration 120] [--concurrency 64]

Everything runs on 127.0.0.1, at nice 10 (the machine may be shared), and stops by itself. The
results go to bench/results/soak-<limiter>-<time>.{json,md} and soak-<limiter>-latest.md; the
exit status is 1 when the accounting check fails or any request errs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402  (tests/ is not a package)

RESULTS = ROOT / "bench" / "results"
# name, key, requests per minute. Demand (~thousands a minute per client) exceeds every limit
# but the last, so most windows refuse requests and must admit exactly `limit`; the last
# client is never limited and checks the counting of a window that is not full.
CLIENTS = [
    ("soak-a", "sk-soak-client-a-6b1f", 300),
    ("soak-b", "sk-soak-client-b-02c9", 1000),
    ("soak-c", "sk-soak-client-c-9e44", 3000),
    ("soak-open", "sk-soak-client-open-71d0", 10_000_000),
]
STREAM_EVERY = 8  # one request in 8 is an SSE stream


def plugin(limiter: str) -> dict:
    config = {
        "clients": [{"name": n, "key_sha256": harness.sha256_hex(k), "requests_per_minute": rpm}
                    for n, k, rpm in CLIENTS],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [{"match": "gpt-4.1", "providers": ["relay", "backup"]}],
    }
    if limiter == "redis":
        config["limiter"] = {"backend": "redis", "cluster": "webdis", "timeout_ms": 500, "on_error": "deny"}
    return config


def parse_duration_s(v: str) -> float:
    """`17s`, `250ms`, `1m0s` -> seconds."""
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|m|s)", v):
        total += float(num) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    return total


class Load:
    """`concurrency` keep-alive connections, round-robin over the clients, until `deadline`."""

    def __init__(self, gw: harness.Gateway, concurrency: int, deadline: float):
        self.gw, self.deadline = gw, deadline
        self.records: list[list[tuple]] = [[] for _ in range(concurrency)]
        self.errors: list[list[str]] = [[] for _ in range(concurrency)]
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(concurrency)]

    def run(self, i: int) -> None:
        name, key, _ = CLIENTS[i % len(CLIENTS)]
        chat = json.dumps(harness.chat_body(content=f"soak {i}")).encode()
        stream = json.dumps(harness.chat_body(content=f"soak {i}", stream=True)).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        conn = None
        n = 0
        while time.time() < self.deadline:
            n += 1
            body = stream if n % STREAM_EVERY == 0 else chat
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=30)
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                t = time.time()
            except (OSError, http.client.HTTPException) as e:
                self.errors[i].append(f"{name}: {type(e).__name__}: {e}")
                if conn:
                    conn.close()
                conn = None
                continue
            ok = r.status == 429 or (r.status == 200 and (data.endswith(b"data: [DONE]\n\n")
                                                          if body is stream else b'"chat.completion"' in data))
            if not ok:
                self.errors[i].append(f"{name}: status {r.status}: {data[:120]!r}")
            remaining = r.getheader("x-ratelimit-remaining-requests")
            reset = r.getheader("x-ratelimit-reset-requests")
            self.records[i].append((name, t, r.status, None if remaining is None else int(remaining),
                                    None if reset is None else parse_duration_s(reset)))
        if conn:
            conn.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)


class Sampler:
    """Envoy's memory every `every_s`, and (Redis) every client's window counts."""

    def __init__(self, gw: harness.Gateway, every_s: float, redis: harness.RedisServer | None):
        self.gw, self.every_s, self.redis = gw, every_s, redis
        self.memory: list[dict] = []
        self.redis_counts: dict[tuple[str, int], int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.t0 = time.time()

    def sample(self) -> None:
        rss = 0
        with open(f"/proc/{self.gw.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        mem = json.loads(harness.request(self.gw.admin, "GET", "/memory").body)
        self.memory.append({"t_s": round(time.time() - self.t0, 1), "rss_kib": rss,
                            "allocated": int(mem["allocated"]), "heap_size": int(mem["heap_size"])})
        if self.redis:
            minute = int(time.time() // 60)
            for name, key, _ in CLIENTS:
                for m in (minute - 1, minute):
                    v = self.redis.cli("GET", f"rate:{harness.md5_hex(key)}:{m}")
                    if v.isdigit():
                        self.redis_counts[(name, m)] = int(v)

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            try:
                self.sample()
            except OSError:
                pass

    def start(self) -> None:
        self.sample()
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.sample()


def check_accounting(records: list[tuple], gw: harness.Gateway, redis_counts: dict | None) -> dict:
    """Per client: admitted/refused totals, and every window's exactness. Returns the verdicts."""
    windows: dict[tuple[str, int], dict] = defaultdict(lambda: {"remaining": [], "refused": 0})
    per_client: dict[str, Counter] = defaultdict(Counter)
    problems: list[str] = []
    for name, t, status, remaining, reset in records:
        per_client[name][status] += 1
        if status == 200 and (remaining is None or reset is None):
            problems.append(f"{name}: an admitted answer without x-ratelimit-*-requests")
            continue
        if reset is None:
            continue
        window = round((t + reset) / 60) - 1  # the window ends at a whole minute
        w = windows[(name, window)]
        if status == 200:
            w["remaining"].append(remaining)
        else:
            w["refused"] += 1
    report = {}
    # A busy worker writes its counters on its root tick (every 100 ms) or once its last request
    # ends (docs/metrics.md): the load is over, so they are all there after a few ticks.
    time.sleep(0.5)
    for name, _, limit in CLIENTS:
        mine = {m: w for (n, m), w in windows.items() if n == name}
        bad_windows = []
        for m, w in sorted(mine.items()):
            got = sorted(w["remaining"], reverse=True)
            want = list(range(limit - 1, limit - 1 - len(got), -1))
            exact = got == want and (w["refused"] == 0 or len(got) == limit)
            if redis_counts is not None and (name, m) in redis_counts and redis_counts[(name, m)] != len(got):
                exact = False
                problems.append(f"{name} window {m}: Redis counted {redis_counts[(name, m)]}, clients saw {len(got)}")
            if not exact:
                dups = [v for v, c in Counter(got).items() if c > 1][:5]
                bad_windows.append({"window": m, "admitted": len(got), "refused": w["refused"],
                                    "duplicates": dups, "lowest": got[-1] if got else None})
        admitted, refused = per_client[name][200], per_client[name][429]
        metric_admitted = gw.counter("tollgate_requests_total", client=name, outcome="admitted")
        metric_refused = gw.counter("tollgate_requests_total", client=name, outcome="rate_limited")
        if (metric_admitted, metric_refused) != (admitted, refused):
            problems.append(f"{name}: clients saw {admitted}/{refused} admitted/refused, "
                            f"Envoy counted {metric_admitted:.0f}/{metric_refused:.0f}")
        report[name] = {
            "limit": limit, "admitted": admitted, "refused": refused,
            "windows": len(mine), "full_windows": sum(1 for w in mine.values() if w["refused"]),
            "inexact_windows": bad_windows,
            "envoy_counted": [metric_admitted, metric_refused],
            "exact": not bad_windows and (metric_admitted, metric_refused) == (admitted, refused),
        }
    report["_problems"] = problems
    return report


def memory_summary(samples: list[dict], warmup_s: float) -> dict:
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    out = {}
    for k in ("rss_kib", "allocated", "heap_size"):
        start, end = after[0][k], samples[-1][k]
        out[k] = {"first": samples[0][k], "after_warmup": start, "peak": max(s[k] for s in samples),
                  "end": end, "growth_after_warmup": end - start}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limiter", choices=["local", "redis"], default="local")
    ap.add_argument("--duration", type=float, default=120, help="seconds of load (at most 600)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before growth is measured")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args()
    duration = min(args.duration, 600)
    try:
        os.nice(10)  # a shared machine: everything this starts yields to interactive work
    except OSError:
        pass
    work = harness.tmpdir("tollgate-soak-")
    started = dt.datetime.now(dt.timezone.utc)
    mock = redis = webdis = gw = None
    try:
        mock = harness.MockProvider(work, name="soak", expect_key="")
        if args.limiter == "redis":
            redis = harness.RedisServer(work)
            webdis = harness.Webdis(work, redis)
        gw = harness.Gateway(provider_url={"relay": {"url": mock.url}, "backup": {"url": mock.url}},
                             plugin=plugin(args.limiter), log_dir=work, concurrency=2,
                             webdis=webdis.addr if webdis else None)
        sampler = Sampler(gw, args.sample_every, redis)
        sampler.start()
        load = Load(gw, args.concurrency, time.time() + duration)
        print(f"soak: {args.limiter} limiter, {args.concurrency} connections, {duration:.0f} s, "
              f"{len(CLIENTS)} clients; Envoy pid {gw.proc.pid}", flush=True)
        t0 = time.time()
        load.start()
        load.join()
        elapsed = time.time() - t0
        time.sleep(0.5)  # the last counter increments
        sampler.stop()
        records = [r for rs in load.records for r in rs]
        errors = [e for es in load.errors for e in es]
        accounting = check_accounting(records, gw, sampler.redis_counts if redis else None)
        problems = accounting.pop("_problems")
        vm_ok = all(gw.envoy_stat(f"wasm.tollgate{s}.vm_reload") == 0 for s in ("", "-upstream"))
        panics = gw.log().count("panic")
    finally:
        for p in (gw, webdis, redis, mock):
            if p:
                p.stop()
    memory = memory_summary(sampler.memory, args.warmup)
    ok = not errors and not problems and all(c["exact"] for c in accounting.values()) and vm_ok and not panics
    result = {
        "started": started.isoformat(timespec="seconds"), "limiter": args.limiter,
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency, "envoy_workers": 2,
        "requests": len(records), "requests_per_s": round(len(records) / elapsed, 1),
        "errors": len(errors), "error_examples": errors[:10], "problems": problems,
        "clients": accounting, "memory": memory, "memory_samples": sampler.memory,
        "vm_reloads_zero": vm_ok, "panics_in_log": panics, "verdict": "PASS" if ok else "FAIL",
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Linux {platform.release()}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
    }
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"soak-{args.limiter}-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"soak-{args.limiter}-{stamp}.md").write_text(md)
    (args.out / f"soak-{args.limiter}-latest.md").write_text(md)
    return 0 if ok else 1


def markdown(r: dict) -> str:
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    lines = [
        f"# Soak: {r['limiter']} limiter, {r['verdict']}", "",
        f"{r['started']}, commit `{r['commit']}`, {r['machine']}; Envoy with {r['envoy_workers']} workers, "
        f"{r['concurrency']} connections for {r['duration_s']} s, one request in {STREAM_EVERY} a stream.", "",
        f"**{r['requests']} requests** ({r['requests_per_s']}/s), {r['errors']} errors "
        f"(anything but a good 200 or a 429), VM reloads zero: {r['vm_reloads_zero']}, "
        f"panics in the log: {r['panics_in_log']}.", "",
        "| client | limit/min | admitted | refused (429) | windows (full) | Envoy counted admitted/refused | exact |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for name, c in r["clients"].items():
        lines.append(f"| {name} | {c['limit']} | {c['admitted']} | {c['refused']} | {c['windows']} "
                     f"({c['full_windows']}) | {c['envoy_counted'][0]:.0f}/{c['envoy_counted'][1]:.0f} | "
                     f"{'yes' if c['exact'] else 'NO: ' + json.dumps(c['inexact_windows'][:3])} |")
    m = r["memory"]
    lines += [
        "", "Envoy memory (samples every few seconds; growth from the first sample after the warm-up):", "",
        "| measure | first | after warm-up | peak | end | growth after warm-up |",
        "|---|--:|--:|--:|--:|--:|",
        f"| RSS MiB | {mib(m['rss_kib']['first'])} | {mib(m['rss_kib']['after_warmup'])} | "
        f"{mib(m['rss_kib']['peak'])} | {mib(m['rss_kib']['end'])} | {mib(m['rss_kib']['growth_after_warmup'])} |",
    ]
    for k in ("allocated", "heap_size"):
        lines.append(f"| `/memory` {k} MiB | " + " | ".join(
            f"{m[k][f] / 2**20:.1f}" for f in ("first", "after_warmup", "peak", "end", "growth_after_warmup")) + " |")
    series = ", ".join(f"{s['t_s']:.0f}s {mib(s['rss_kib'])}" for s in r["memory_samples"])
    lines += ["", f"RSS series (MiB): {series}", ""]
    if r["problems"] or r["error_examples"]:
        lines += ["Problems:", ""] + [f"- {p}" for p in r["problems"] + r["error_examples"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The scale-out judge of quota leases (issue 17): N Envoy processes (`--concurrency 1` each)
share one Redis through Webdis; several clients with limits below and above their demand send
traffic skewed across the replicas (80% of a client's requests to one replica, which changes
every third of the run); the same run with per-request Redis checks (no leases) for comparison.

    .venv/bin/python bench/leases.py [--replicas 10] [--seconds 20] [--out bench/results/...]

Per mode and client: requests sent, admitted, refused, the limit, under-admission (limit minus
admitted, for clients whose demand exceeds their limit), and Redis `EVAL` calls per 1,000
admitted (from Redis's own `INFO commandstats`, so every call counts: checks, lease fetches,
settlements and returns). Bounded: each run fits in one minute window (it waits for a fresh
one), every request has a timeout, everything binds to 127.0.0.1. Uses the end-to-end harness
(tests/harness.py) for Redis, Webdis, the mock provider and Envoy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from harness import default_plugin_config, sha256_hex  # noqa: E402

# name, limit per minute, demand over the run (requests), skewed
CLIENTS = [
    ("below", 6000, 600, False),   # demand far below the limit
    ("above", 300, 600, False),    # demand twice the limit, spread evenly
    ("skewed", 400, 800, True),    # demand twice the limit, 80% on one replica, moving
]


def key(name: str) -> str:
    return f"sk-bench-lease-{name}-5d1c"


def plugin(leases: bool) -> dict:
    limiter = {"backend": "redis", "cluster": "webdis", "timeout_ms": 200, "on_error": "deny"}
    if leases:
        limiter["leases"] = {}
    return default_plugin_config(
        [{"name": n, "key_sha256": sha256_hex(key(n)), "requests_per_minute": limit}
         for n, limit, _, _ in CLIENTS],
        limiter=limiter,
    )


def eval_calls(redis: harness.RedisServer) -> int:
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_eval:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def drive(gateways, seconds: float) -> dict:
    """Sends every client's demand over `seconds`, paced, from one thread per client and
    replica; returns per client the statuses seen."""
    n = len(gateways)
    results = {name: [] for name, *_ in CLIENTS}
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def worker(name: str, replica: int, times: list[float]):
        gw = gateways[replica]
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        mine = []
        for t in times:
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                mine.append(gw.post(key=key(name), conn=conn).status)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
                mine.append(0)
        conn.close()
        with lock:
            results[name].extend(mine)

    threads = []
    for name, _, demand, skewed in CLIENTS:
        per_replica: list[list[float]] = [[] for _ in range(n)]
        for i in range(demand):
            t = seconds * i / demand
            if skewed:
                hot = int(3 * t / seconds) % n
                replica = hot if i % 5 != 4 else (i // 5) % n
            else:
                replica = i % n
            per_replica[replica].append(t)
        for r, times in enumerate(per_replica):
            if times:
                threads.append(threading.Thread(target=worker, args=(name, r, times)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run(mode: str, replicas: int, seconds: float, workdir: pathlib.Path) -> dict:
    redis = harness.RedisServer(workdir)
    webdis = harness.Webdis(workdir, redis)
    mock = harness.MockProvider(workdir)
    gateways = []
    try:
        for i in range(replicas):
            gateways.append(harness.Gateway(provider_url=mock.url, plugin=plugin(mode == "leases"),
                                            log_dir=workdir, concurrency=1,
                                            name=f"{mode}-envoy{i}", webdis=webdis.addr))
        minute = harness.wait_for_fresh_window(margin_s=seconds + 8)
        calls_before = eval_calls(redis)
        results = drive(gateways, seconds)
        crossed = time.time() // 60 != minute
        calls = eval_calls(redis) - calls_before
        clients = []
        total_admitted = 0
        for name, limit, demand, skewed in CLIENTS:
            statuses = results[name]
            admitted = statuses.count(200)
            total_admitted += admitted
            clients.append({
                "client": name, "limit": limit, "demand": demand, "skewed": skewed,
                "sent": len(statuses), "admitted": admitted,
                "refused": statuses.count(429),
                "other": len(statuses) - admitted - statuses.count(429),
                "over_limit": admitted > limit,
                "under_admission": max(0, min(limit, demand) - admitted),
            })
        return {
            "mode": mode, "replicas": replicas, "seconds": seconds,
            "crossed_window": crossed, "redis_eval_calls": calls,
            "admitted": total_admitted,
            "redis_calls_per_1000_admitted": round(1000 * calls / max(total_admitted, 1), 1),
            "clients": clients,
        }
    finally:
        for gw in gateways:
            gw.stop()
        mock.stop()
        webdis.stop()
        redis.stop()


def markdown(report: dict) -> str:
    lines = [f"# Quota leases: scale-out judge ({report['date']})", "",
             f"`{report['command']}`", "",
             "| mode | replicas | client | limit | demand | admitted | refused | under-admission | over limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        for c in r["clients"]:
            lines.append(f"| {r['mode']} | {r['replicas']} | {c['client']} | {c['limit']} | "
                         f"{c['demand']} | {c['admitted']} | {c['refused']} | "
                         f"{c['under_admission']} | {'YES' if c['over_limit'] else 'no'} |")
    lines += ["", "| mode | replicas | admitted | Redis EVAL calls | per 1,000 admitted |",
              "|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['mode']} | {r['replicas']} | {r['admitted']} | "
                     f"{r['redis_eval_calls']} | {r['redis_calls_per_1000_admitted']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--modes", default="leases,per-request")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    if not 1 <= args.replicas <= 10 or not 1 <= args.seconds <= 45:
        ap.error("--replicas 1..10, --seconds 1..45 (a run fits in one minute window)")
    workdir = harness.tmpdir("tollgate-bench-leases-")
    runs = [run(m, args.replicas, args.seconds, workdir) for m in args.modes.split(",")]
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["bench/leases.py"] + sys.argv[1:]), "runs": runs}
    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    bad = [r for r in runs if r["crossed_window"] or any(c["over_limit"] for c in r["clients"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

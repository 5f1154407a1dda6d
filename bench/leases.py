#!/usr/bin/env python3
"""The scale-out judge of quota leases (issue 17): N Envoy processes (`--concurrency 1` each)
share one Redis through Webdis; several clients with limits below and above their demand send
traffic skewed across the replicas (80% of a client's requests to one replica, which changes
every third of the run); the same run with per-request Redis checks (no leases) for comparison.

    .venv/bin/python bench/leases.py [--replicas 10] [--seconds 20] [--out bench/results/...]

Clients: `steady` (steady load: tens of requests/s per replica, limit far above the demand),
`below` (a few requests/s per replica, under its limit; reported apart from steady load), `above` (twice its limit, even) and
`skewed` (twice its limit, 80% on one replica, moving).

Per mode and client: requests sent, admitted, refused, the limit, under-admission (limit minus
admitted, for clients whose demand exceeds their limit), and Redis `EVAL` calls per 1,000
admitted. The total comes from Redis's own `INFO commandstats`, so every call counts (checks,
lease fetches, settlements and returns); the split per client comes from Redis `MONITOR` during
the run (a call is attributed to the clients whose keys it names; a settlement batch naming k
clients counts 1/k for each). Clients under their limit (steady load) and over it (their window's
budget runs out, and replicas recheck Redis for budget given back) are summed apart.

Bounded: each run fits in one minute window (it waits for a fresh one when too little of the
current one is left), every request has a timeout, everything binds to 127.0.0.1. Uses the
end-to-end harness (tests/harness.py) for Redis, Webdis, the mock provider and Envoy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import pathlib
import re
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402
from harness import REDIS_PASSWORD, default_plugin_config, md5_hex, sha256_hex  # noqa: E402

# name, limit per minute, demand over the run (requests; None: STEADY_RPS per replica for the
# whole run), skewed
CLIENTS = [
    ("steady", 60000, None, False),  # steady load, far below the limit
    ("below", 6000, 600, False),     # a few requests/s per replica, below the limit
    ("above", 300, 600, False),      # demand twice the limit, spread evenly
    ("skewed", 400, 800, True),      # demand twice the limit, 80% on one replica, moving
]
# Requests per second and replica of the steady client.
STEADY_RPS = 30


def demands(replicas: int, seconds: float) -> dict[str, int]:
    return {name: demand if demand is not None else int(STEADY_RPS * replicas * seconds)
            for name, _, demand, _ in CLIENTS}


def key(name: str) -> str:
    return f"sk-bench-lease-{name}-5d1c"


def plugin(leases: bool) -> dict:
    limiter = {"backend": "redis", "cluster": "webdis", "timeout_ms": 200, "on_error": "deny"}
    if leases:
        limiter["leases"] = {}
    return default_plugin_config(
        [{"name": n, "key_sha256": sha256_hex(key(n)), "requests_per_minute": limit}
         for n, limit, *_ in CLIENTS],
        limiter=limiter,
    )


def eval_calls(redis: harness.RedisServer) -> int:
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_eval:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


class Monitor:
    """Redis `MONITOR` for the length of a run (redis-cli in the background, output to a file),
    to split the `EVAL` calls by client and kind."""

    def __init__(self, redis: harness.RedisServer, path: pathlib.Path):
        self.path = path
        self.out = path.open("w")
        self.proc = subprocess.Popen(
            ["redis-cli", "-p", str(redis.port), "--no-auth-warning", "-a", REDIS_PASSWORD, "MONITOR"],
            stdout=self.out, stderr=subprocess.DEVNULL)
        # MONITOR answers OK once it is on: wait for that line (bounded).
        harness.wait_until(lambda: self.path.stat().st_size > 0, "Redis MONITOR to start", timeout_s=10)

    def stop(self) -> None:
        harness.stop(self.proc)
        self.out.close()

    def calls(self, ids: dict[str, str]) -> dict[str, dict[str, float]]:
        """Per client (`ids`: client -> the Redis keys' middle part): EVAL calls by kind
        (`lease`, `settle`, `check`), a call naming k clients counting 1/k for each."""
        pattern = re.compile(r"(?:rate|tokens):(" + "|".join(map(re.escape, ids.values())) + r"):")
        by_id = {v: k for k, v in ids.items()}
        out = {name: {"lease": 0.0, "settle": 0.0, "check": 0.0} for name in ids}
        with self.path.open(errors="replace") as f:
            for line in f:
                # Top-level calls only: the script's own commands show as `[0 lua]`.
                if '"EVAL"' not in line or "lua]" in line:
                    continue
                names = {by_id[m] for m in pattern.findall(line)}
                if not names:
                    continue
                kind = "lease" if "local share" in line else "settle" if "'EXISTS'" in line else "check"
                for name in names:
                    out[name][kind] += 1 / len(names)
        return out


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
    demand_of = demands(n, seconds)
    for name, _, _, skewed in CLIENTS:
        demand = demand_of[name]
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


def wait_for_offset(offset: float) -> float:
    """Waits until `offset` seconds into a minute window (a run that starts mid-window, as a new
    replica or a client's traffic does); returns the minute."""
    time.sleep((offset - time.time() % 60) % 60)
    return time.time() // 60


def run(mode: str, replicas: int, seconds: float, workdir: pathlib.Path,
        offset: float | None = None) -> dict:
    redis = harness.RedisServer(workdir)
    webdis = harness.Webdis(workdir, redis)
    mock = harness.MockProvider(workdir)
    gateways = []
    monitor = None
    try:
        for i in range(replicas):
            gateways.append(harness.Gateway(provider_url=mock.url, plugin=plugin(mode == "leases"),
                                            log_dir=workdir, concurrency=1,
                                            name=f"{mode}-envoy{i}", webdis=webdis.addr))
        if offset is None:
            minute = harness.wait_for_fresh_window(margin_s=seconds + 15)
        else:
            minute = wait_for_offset(offset)
        offset = time.time() % 60
        monitor = Monitor(redis, workdir / f"monitor-{mode}.log")
        calls_before = eval_calls(redis)
        began = time.monotonic()
        results = drive(gateways, seconds)
        took = time.monotonic() - began
        crossed = time.time() // 60 != minute
        calls = eval_calls(redis) - calls_before
        monitor.stop()
        split = monitor.calls({name: md5_hex(key(name)) for name, *_ in CLIENTS})
        clients = []
        total_admitted = 0
        demand_of = demands(replicas, seconds)
        for name, limit, _, skewed in CLIENTS:
            demand = demand_of[name]
            statuses = results[name]
            admitted = statuses.count(200)
            total_admitted += admitted
            mine = split[name]
            client_calls = sum(mine.values())
            clients.append({
                "client": name, "limit": limit, "demand": demand, "skewed": skewed,
                "over_limit_demand": demand > limit,
                "sent": len(statuses), "admitted": admitted,
                "refused": statuses.count(429),
                "other": len(statuses) - admitted - statuses.count(429),
                "over_limit": admitted > limit,
                "under_admission": max(0, min(limit, demand) - admitted),
                "redis_calls": round(client_calls, 1),
                "redis_calls_by_kind": {k: round(v, 1) for k, v in mine.items()},
                "redis_calls_per_1000_admitted": round(1000 * client_calls / max(admitted, 1), 1),
            })

        def group(names: list[str]) -> dict:
            cs = [c for c in clients if c["client"] in names]
            adm = sum(c["admitted"] for c in cs)
            n = sum(c["redis_calls"] for c in cs)
            return {"clients": [c["client"] for c in cs], "admitted": adm, "redis_calls": round(n, 1),
                    "redis_calls_per_1000_admitted": round(1000 * n / max(adm, 1), 1)}

        return {
            "mode": mode, "replicas": replicas, "seconds": seconds,
            "started_into_window_s": round(offset, 1), "took_s": round(took, 1),
            "crossed_window": crossed, "redis_eval_calls": calls,
            "admitted": total_admitted,
            "redis_calls_per_1000_admitted": round(1000 * calls / max(total_admitted, 1), 1),
            "steady_load": group(["steady"]),
            "low_rate": group(["below"]),
            "over_limit_clients": group([c["client"] for c in clients if c["over_limit_demand"]]),
            "clients": clients,
        }
    finally:
        if monitor is not None and monitor.proc.poll() is None:
            monitor.stop()
        for gw in gateways:
            gw.stop()
        mock.stop()
        webdis.stop()
        redis.stop()


def markdown(report: dict) -> str:
    lines = [f"# Quota leases: scale-out judge ({report['date']})", "",
             f"`{report['command']}`", ""]
    if report.get("commit"):
        lines += [f"At `{report['commit']}`. " + " ".join(
            f"{r['mode']}: started {r['started_into_window_s']} s into its minute window, "
            f"took {r['took_s']} s." for r in report["runs"]), ""]
    lines += ["| mode | replicas | client | limit | demand | admitted | refused | under-admission | "
              "over limit | Redis calls (lease/settle/check) | per 1,000 admitted |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        for c in r["clients"]:
            k = c["redis_calls_by_kind"]
            lines.append(f"| {r['mode']} | {r['replicas']} | {c['client']} | {c['limit']} | "
                         f"{c['demand']} | {c['admitted']} | {c['refused']} | "
                         f"{c['under_admission']} | {'YES' if c['over_limit'] else 'no'} | "
                         f"{c['redis_calls']:g} ({k['lease']:g}/{k['settle']:g}/{k['check']:g}) | "
                         f"{c['redis_calls_per_1000_admitted']} |")
    lines += ["", "| mode | replicas | clients | admitted | Redis EVAL calls | per 1,000 admitted |",
              "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        for label, g in (("steady load", r["steady_load"]),
                         ("a few requests/s per replica, under the limit", r["low_rate"]),
                         ("over their limit", r["over_limit_clients"])):
            lines.append(f"| {r['mode']} | {r['replicas']} | {label} ({', '.join(g['clients'])}) | "
                         f"{g['admitted']} | {g['redis_calls']:g} | {g['redis_calls_per_1000_admitted']} |")
        lines.append(f"| {r['mode']} | {r['replicas']} | all (Redis `INFO commandstats`) | "
                     f"{r['admitted']} | {r['redis_eval_calls']} | {r['redis_calls_per_1000_admitted']} |")
    if report.get("acceptance"):
        lines += ["", "| acceptance (issue 17) | mode | holds | detail |", "|---|---|---|---|"]
        for a in report["acceptance"]:
            lines.append(f"| {a['check']} | {a['mode']} | {'yes' if a['holds'] else 'NO'} | {a.get('detail', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--modes", default="leases,per-request")
    ap.add_argument("--offset", type=float, default=None,
                    help="start each run this many seconds into a minute window (default: as soon "
                         "as the current window has room)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    if not 1 <= args.replicas <= 10 or not 1 <= args.seconds <= 45:
        ap.error("--replicas 1..10, --seconds 1..45 (a run fits in one minute window)")
    if args.offset is not None and not 0 <= args.offset <= 50 - args.seconds:
        ap.error("--offset 0..(50 - seconds): the run ends 10 s before its window does")
    workdir = harness.tmpdir("tollgate-bench-leases-")
    runs = [run(m, args.replicas, args.seconds, workdir, args.offset) for m in args.modes.split(",")]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["bench/leases.py"] + sys.argv[1:]), "commit": commit, "runs": runs}
    report["acceptance"] = acceptance(runs)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0 if all(a["holds"] for a in report["acceptance"]) else 1


def acceptance(runs: list[dict]) -> list[dict]:
    """Issue 17's acceptance, per run: never over any limit (every mode); with leases,
    under-admission at most 1% of the limit for clients over their limit, and at most 20 Redis
    calls per 1,000 admitted at steady load (the `steady` client: tens of requests/s per replica;
    `below`, a few per replica, is reported apart: a block covers `horizon_ms` of a replica's
    traffic, so at 3 requests/s one call per 15 is its floor)."""
    out = []
    for r in runs:
        out.append({"mode": r["mode"], "check": "the run stayed in one minute window",
                    "holds": not r["crossed_window"]})
        over = [c["client"] for c in r["clients"] if c["over_limit"]]
        out.append({"mode": r["mode"], "check": "admitted never exceeds a client's limit",
                    "holds": not over, "detail": ", ".join(over)})
        if r["mode"] != "leases":
            continue
        under = {c["client"]: c["under_admission"] for c in r["clients"] if c["over_limit_demand"]}
        out.append({"mode": r["mode"], "check": "under-admission <= 1% of the limit (clients over it)",
                    "holds": all(100 * u <= c["limit"] for c in r["clients"]
                                 for name, u in under.items() if c["client"] == name),
                    "detail": ", ".join(f"{k} {v}" for k, v in under.items())})
        steady = r["steady_load"]["redis_calls_per_1000_admitted"]
        out.append({"mode": r["mode"], "check": "Redis calls <= 20 per 1,000 admitted at steady load",
                    "holds": steady <= 20, "detail": f"{steady} ({', '.join(r['steady_load']['clients'])})"})
    return out


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Prices proxy-wasm host calls on this Envoy: where Tollgate's CPU time per request goes.

    .venv/bin/python bench/hostcalls.py [--repeats 3] [--calls 40] [--load-duration 3]

Runs Envoy (as `make bench` does: one worker alone on CPU 0, the rest on CPU 1) with the
host-call probe (bench/hostcall-probe) making `--calls` calls of one kind per request, one Envoy
per kind, next to the probe with no calls (the floor), Tollgate with the local limiter, and the
probe making Tollgate's own mix of calls (TOLLGATE_MIX, counted from filter/src/plugin.rs).
A call's price is (Envoy CPU per request with the calls - without) / calls, from rounds run back
to back. Tollgate minus its mix is what its own code (hashing, parsing, allocation) costs.

Needs `make build` and the probe module:
    cargo build --release --locked --target wasm32-wasip1 \\
        --manifest-path bench/hostcall-probe/Cargo.toml --target-dir target/bench-hostcall-probe
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py)
from run import harness, render_envoy  # noqa: E402

PROBE_WASM = run.ROOT / "target" / "bench-hostcall-probe" / "wasm32-wasip1" / "release" / "hostcall_probe.wasm"

KINDS = ["headers", "header", "now", "shared", "remove", "replace", "increment", "property",
         "set_property", "clear_route_cache", "resp_remove", "resp_replace", "resp_header",
         "resp_body"]

# Host calls Tollgate makes for one admitted request with the local limiter (requests and tokens
# per minute), one provider and a JSON response, counted from filter/src/plugin.rs at commit
# 2196c24: read all request headers and the clock; shared-data get + CAS set for the request
# budget and for the token reservation; replace `authorization`; set the `tollgate_client` and
# `tollgate_model` properties; count the request. Response headers: remove the provider's six
# x-ratelimit-* headers, set the client's three request and three token headers, read `:status`
# and `content-type`. Body: read it (a chunk, then the end of stream), count prompt and completion
# tokens, set their two properties. on_log: read the clock, record the duration histogram, settle
# the token reservation (get + CAS set).
TOLLGATE_MIX = ("headers=1 now=2 shared=3 replace=1 set_property=4 increment=4 "
                "resp_remove=6 resp_replace=6 resp_header=2 resp_body=1")


def probe_config(mock_url: str, plan: str) -> dict:
    cfg = run.envoy_config(run.PEER_BY_ID["empty"], "127.0.0.1:0", "127.0.0.1:0", mock_url, None)
    render_envoy.set_wasm(cfg, str(PROBE_WASM))
    render_envoy.set_plugin_config(cfg, plan)
    return cfg


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=40, help="calls of one kind per request")
    p.add_argument("--load-duration", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--mix", default=TOLLGATE_MIX, help="the probe plan equal to Tollgate's calls")
    p.add_argument("--out", default=str(run.BENCH / "results"))
    a = p.parse_args(argv)
    for path in (PROBE_WASM, run.TOLLGATE_WASM, harness.MOCK_BIN):
        if not path.exists():
            print(f"missing {path}: see the docstring", file=sys.stderr)
            return 2
    pinning = run.cpu_pinning(os.cpu_count() or 1, True)
    if pinning.enabled:
        os.sched_setaffinity(0, pinning.others)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-hostcalls-"))
    plans = {"floor": ""}
    kinds = [k for k in a.kinds.split(",") if k]
    plans.update({k: f"{k}={a.calls}" for k in kinds})
    plans["tollgate-mix"] = a.mix
    stack = []
    runs: dict[str, dict[int, float]] = {}
    try:
        mock = harness.MockProvider(workdir, name=run.MOCK_NAME, expect_key=run.PROVIDER_KEY)
        stack.append(mock.stop)
        targets = {}
        for name, plan in plans.items():
            e = run.Envoy(name, probe_config(mock.url, plan), workdir, pinning.prefix(), 1)
            stack.append(e.stop)
            targets[name] = run.Target(run.PEER_BY_ID["empty"], e.url, e.pid, e)
        peer = run.PEER_BY_ID["local"]
        cfg = run.envoy_config(peer, "127.0.0.1:0", "127.0.0.1:0", mock.url, None)
        e = run.Envoy("tollgate", cfg, workdir, pinning.prefix(), 1)
        stack.append(e.stop)
        targets["tollgate"] = run.Target(peer, e.url, e.pid, e)
        names = list(targets)
        for r in range(a.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = targets[name]
                run.run_wrk(t, a.connections, 1, [mock.proc.pid])  # warm-up
                res = run.run_wrk(t, a.connections, a.load_duration, [mock.proc.pid])
                if not res["valid"]:
                    print(f"{name}: INVALID: {res['problems']}", file=sys.stderr)
                    return 1
                runs.setdefault(name, {})[r] = res["server_cpu_us_per_request"]
                print(f"  round {r + 1}/{a.repeats} {name:<18} {res['rps']:8.0f} req/s "
                      f"{res['server_cpu_us_per_request']:6.1f} us/req", flush=True)
    finally:
        for stop in reversed(stack):
            stop()

    def added(name: str) -> list[float]:
        return [runs[name][r] - runs["floor"][r] for r in runs[name] if r in runs["floor"]]

    rows = []
    for name in names:
        if name == "floor":
            continue
        d = added(name)
        per_call = statistics.median(d) / a.calls if name in kinds else None
        rows.append({"name": name, "plan": plans.get(name, "Tollgate (local limiter)"),
                     "cpu_us": statistics.median(runs[name].values()),
                     "added_us": statistics.median(d), "added_range": [min(d), max(d)],
                     "per_call_us": per_call})
    floor_cpu = statistics.median(runs["floor"].values())
    lines = [
        f"# Host-call prices, {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        "",
        f"Command: `python bench/hostcalls.py {' '.join(argv)}`. Envoy CPU per request at "
        f"{a.connections} connections, medians of {a.repeats} rounds; the probe with no calls: "
        f"{floor_cpu:.1f} µs.",
        "",
        "| probe | plan | Envoy CPU µs/req | added µs/req (min–max) | µs per call |",
        "|---|---|--:|--:|--:|",
    ]
    for row in rows:
        lo, hi = row["added_range"]
        per_call = "" if row["per_call_us"] is None else f"{row['per_call_us']:.2f}"
        lines.append(f"| {row['name']} | `{row['plan']}` | {row['cpu_us']:.1f} | {row['added_us']:+.1f} "
                     f"({lo:+.1f}–{hi:+.1f}) | {per_call} |")
    md = "\n".join(lines) + "\n"
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostcalls-latest.md").write_text(md)
    (out / "hostcalls-latest.json").write_text(json.dumps({"runs": runs, "rows": rows, "plans": plans}, indent=2) + "\n")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

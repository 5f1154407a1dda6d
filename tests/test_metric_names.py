"""End to end: the exact `tollgate_*` series (names and label sets) a fixed scenario leaves in
`/stats/prometheus`. The same assertion holds on every supported Envoy (scripts/compat.sh runs
it on each): dashboards and alerts read these names, so a version that renames, prefixes or
drops one fails here, with the difference printed. With `TOLLGATE_METRIC_NAMES_DIR` set (as
scripts/compat.sh does) the series seen are also written to `<dir>/<envoy version>.txt`, and the
matrix compares those files across versions."""

from __future__ import annotations

import os
import pathlib

import harness
from harness import BACKUP_KEY, PROVIDER_KEY, chat_body, sha256_hex

TEAM = "sk-metric-names-team-5f6e"


def plugin() -> dict:
    return {
        "clients": [{"name": "team", "key_sha256": sha256_hex(TEAM), "requests_per_minute": 1000}],
        "providers": [
            {"name": "relay", "cluster": "provider_relay", "api_key_env": harness.PROVIDER_KEY_ENV},
            {"name": "backup", "cluster": "provider_backup", "api_key_env": harness.BACKUP_KEY_ENV},
        ],
        "models": [
            {"match": "gpt-4.1", "providers": ["relay", "backup"]},
            {"match": "fast", "providers": ["backup"]},
        ],
    }


OUTCOMES = ("admitted", "unauthorized", "rate_limited", "invalid", "error")

# Every counter series of the scenario, with its value (tokens: any positive count). A
# client's request series are defined on its first request with that outcome; the anonymous
# client's at configure.
COUNTERS = {
    **{("tollgate_requests_total", (("client", "_anonymous"), ("outcome", o))): 0
       for o in OUTCOMES},
    ("tollgate_requests_total", (("client", "team"), ("outcome", "admitted"))): 2,
    ("tollgate_requests_total", (("client", "_anonymous"), ("outcome", "unauthorized"))): 1,
    ("tollgate_refusals_total",
     (("client", "_anonymous"), ("model", "_none"), ("reason", "invalid_api_key"))): 1,
    ("tollgate_limiter_errors_total", (("backend", "local"), ("reason", "contention"))): 0,
    ("tollgate_limiter_errors_total", (("backend", "local"), ("reason", "store"))): 0,
    ("tollgate_upstream_requests_total", (("model", "gpt-4_1"), ("provider", "relay"))): 1,
    ("tollgate_upstream_requests_total", (("model", "gpt-4_1"), ("provider", "backup"))): 1,
    ("tollgate_upstream_requests_total", (("model", "fast"), ("provider", "backup"))): 1,
    ("tollgate_fallbacks_total", (("from", "relay"), ("model", "gpt-4_1"), ("to", "backup"))): 1,
    ("tollgate_upstream_errors_total", (("provider", "relay"), ("status", "500"))): 1,
    **{("tollgate_tokens_total", (("client", "team"), ("kind", k), ("model", m))): "positive"
       for k in ("prompt", "completion") for m in ("gpt-4_1", "fast")},
}

# Histogram families and the label sets of their series (`le` aside), with their sample counts.
HISTOGRAMS = {
    ("tollgate_request_duration_ms", (("model", "gpt-4_1"),)): 1,
    ("tollgate_request_duration_ms", (("model", "fast"),)): 1,
    ("tollgate_stream_first_byte_ms", (("model", "fast"),)): 1,
}


def tollgate_series(text: str) -> dict:
    """{(family, sorted labels without `le`): value} of every `tollgate_*` series; histogram
    buckets are summed into one entry per family and label set (only their presence matters)."""
    out: dict = {}
    for fam, labels, value in harness.parse_prometheus(text):
        if not fam.startswith("tollgate_"):
            continue
        if fam.endswith("_bucket"):
            assert "le" in labels, (fam, labels)
            labels = {k: v for k, v in labels.items() if k != "le"}
        key = (fam, tuple(sorted(labels.items())))
        out[key] = out.get(key, 0) + value
    return out


def expected_names() -> set:
    names = {key for key in COUNTERS}
    for (fam, labels) in HISTOGRAMS:
        names |= {(fam + suffix, labels) for suffix in ("_bucket", "_sum", "_count")}
    return names


def test_every_series_has_its_name_and_labels_on_this_envoy(start_gateway, workdir):
    relay = harness.MockProvider(workdir, name="relay", expect_key=PROVIDER_KEY,
                                 extra_args=["--status", "500"])
    backup = harness.MockProvider(workdir, name="backup", expect_key=BACKUP_KEY)
    try:
        gw = start_gateway(plugin(), harness.provider_urls(relay, backup))
        # Falls back from the relay's 500 to the backup.
        assert gw.post(key=TEAM, body=chat_body("gpt-4.1")).status == 200
        # One provider, streamed (the first-byte histogram).
        assert gw.post(key=TEAM, body=chat_body("fast", stream=True)).status == 200
        assert gw.post(key="sk-nobody", body=chat_body("gpt-4.1")).status == 401

        text = gw.stats_text()
        assert "wasmcustom" not in text, [l for l in text.splitlines() if "wasmcustom" in l][:5]
        counters = {k: v for k, v in tollgate_series(text).items() if k in COUNTERS or not k[0].endswith(
            ("_bucket", "_sum", "_count"))}
        assert set(counters) == set(COUNTERS), (
            f"missing: {sorted(set(COUNTERS) - set(counters))}\n"
            f"unexpected: {sorted(set(counters) - set(COUNTERS))}")
        for key, want in COUNTERS.items():
            if want == "positive":
                assert counters[key] > 0, key
            else:
                assert counters[key] == want, (key, counters[key])

        # Envoy publishes histogram samples at its stats flush (every 5 s by default): wait for
        # them, bounded, then compare the whole set of series once more.
        def histograms_arrived():
            series = tollgate_series(gw.stats_text())
            counts = {(fam, labels): series.get((fam + "_count", labels)) for fam, labels in HISTOGRAMS}
            return series if counts == HISTOGRAMS else None

        series = harness.wait_until(histograms_arrived, "one sample in each duration histogram", timeout_s=20)
        out = os.environ.get("TOLLGATE_METRIC_NAMES_DIR")
        if out:
            version = ".".join(map(str, harness.envoy_version()))
            lines = sorted(fam + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
                           for fam, labels in series)
            pathlib.Path(out, f"{version}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert set(series) == expected_names(), (
            f"missing: {sorted(expected_names() - set(series))}\n"
            f"unexpected: {sorted(set(series) - expected_names())}")
    finally:
        relay.stop()
        backup.stop()


def test_the_filter_reads_the_envoy_version_it_runs_on(start_gateway, mock):
    """The filter reads Envoy's version (`xds.node.user_agent_build_version`) at start-up: a
    supported one gets a debug line, one outside the range a warning (docs/compatibility.md)."""
    gw = start_gateway(harness.default_plugin_config(
        [{"name": "team", "key_sha256": sha256_hex(TEAM)}]), mock.url)
    major, minor, _ = harness.envoy_version()
    log = gw.log()
    assert f"running on Envoy {major}.{minor}" in log, log[-2000:]
    assert "unsupported Envoy" not in log and "cannot read Envoy's version" not in log
    assert harness.SUPPORTED_ENVOY[0] <= (major, minor) <= harness.SUPPORTED_ENVOY[1]

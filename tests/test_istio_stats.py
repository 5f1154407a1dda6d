"""End to end: Tollgate's metric names in Istio's Prometheus output (docs/deploy/istio.md).

Istio builds its proxy's bootstrap itself: `stats_config` with Istio's own `stats_tags` (and
`use_all_default_tags: false`) and a `stats_matcher` that keeps only some prefixes. Tollgate's
`stats_tags` reach it through the mesh's own mechanism: the ConfigMap of
k8s/istio/stats-tags.yaml, named by the pod annotation `sidecar.istio.io/bootstrapOverride`,
which Istio merges into the generated bootstrap (protobuf merge: lists are appended). This test
runs the equivalent Envoy configuration locally: the listener filter of the EnvoyFilter in
k8s/istio-envoyfilter, in a bootstrap with an Istio-like stats_config, with and without the
override merged, and reads `/stats/prometheus`."""

from __future__ import annotations

import copy
import json

import yaml

import harness
from harness import ROOT, chat_body, sha256_hex

TEAM = "sk-istio-stats-team-41c2"

# The parts of Istio's generated bootstrap that decide metric names (Istio 1.28's template,
# abridged: its tags for its own stats, and the stats matcher's prefixes).
ISTIO_STATS_CONFIG = {
    "use_all_default_tags": False,
    "stats_tags": [
        {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
        {"tag_name": "http_conn_manager_prefix", "regex": r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
        {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
    ],
    "stats_matcher": {"inclusion_list": {"patterns": [
        {"prefix": "reporter="}, {"prefix": "cluster_manager"}, {"prefix": "listener_manager"},
        {"prefix": "server"}, {"prefix": "cluster.xds-grpc"}, {"prefix": "wasm"},
        {"suffix": "rbac.allowed"}, {"suffix": "rbac.denied"}, {"prefix": "component"},
    ]}},
}


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def override() -> dict:
    (cm,) = docs(ROOT / "k8s/istio/stats-tags.yaml")
    return json.loads(cm["data"]["custom_bootstrap.json"])


def merge(base: dict, extra: dict) -> dict:
    """Protobuf MergeFrom on the JSON form, as Istio merges a bootstrap override: messages
    merge field by field, repeated fields are appended, scalars replaced."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = out[k] + copy.deepcopy(v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def envoyfilter_wasm() -> dict:
    """The wasm filter config the EnvoyFilter inserts before the router."""
    (ef,) = docs(ROOT / "k8s/istio-envoyfilter/envoyfilter.yaml")
    (patch,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    return patch["patch"]["value"]["typed_config"]["config"]


def istio_like(with_override: bool):
    def transform(cfg: dict) -> None:
        local = harness.render_envoy.wasm_config(cfg)
        mesh = copy.deepcopy(envoyfilter_wasm())
        # Here: the test's module file and plugin configuration (the resource holds placeholders).
        mesh["vm_config"]["code"] = local["vm_config"]["code"]
        mesh["vm_config"]["environment_variables"] = local["vm_config"]["environment_variables"]
        mesh["configuration"] = local["configuration"]
        local.clear()
        local.update(mesh)
        cfg["stats_config"] = copy.deepcopy(ISTIO_STATS_CONFIG)
        if with_override:
            cfg.update(merge(cfg, override()))
    return transform


def plugin() -> dict:
    return harness.default_plugin_config([{"name": "team", "key_sha256": sha256_hex(TEAM)}])


def series(gw) -> dict:
    return {(fam, tuple(sorted(labels.items()))): v for fam, labels, v in harness.parse_prometheus(gw.stats_text())}


def test_the_override_gives_tollgate_series_their_names_in_an_istio_bootstrap(start_gateway, mock):
    gw = start_gateway(plugin(), mock.url, transform=istio_like(with_override=True))
    assert gw.post(key=TEAM, body=chat_body()).status == 200
    assert gw.post(key="sk-nobody", body=chat_body()).status == 401
    s = series(gw)
    assert s[("tollgate_requests_total", (("client", "team"), ("outcome", "admitted")))] == 1
    assert s[("tollgate_requests_total", (("client", "_anonymous"), ("outcome", "unauthorized")))] == 1
    assert not [k for k in s if "wasmcustom" in k[0]], [k for k in s if "wasmcustom" in k[0]][:5]
    # Istio's own stats_config still applies (merged, not replaced): its matcher drops the
    # provider cluster's request stats.
    assert not [k for k in s if k[0] == "envoy_cluster_upstream_rq_total"]


def test_without_the_override_istio_serves_flattened_names(start_gateway, mock):
    """What the dashboard saw before: Istio's bootstrap alone has no rule for Tollgate's labels,
    so every series is one flat name without labels, which the dashboard does not read."""
    gw = start_gateway(plugin(), mock.url, transform=istio_like(with_override=False))
    assert gw.post(key=TEAM, body=chat_body()).status == 200
    s = series(gw)
    assert s[("tollgate_requests_total_client_team_outcome_admitted", ())] == 1
    assert not [k for k in s if k[0] == "tollgate_requests_total"]


# --- Envoy Gateway: the same tags through EnvoyProxy spec.bootstrap (type Merge) ----------------

# Envoy Gateway's generated bootstrap, the part that decides metric names (its
# internal/xds/bootstrap template: Envoy's default tags plus its own).
ENVOY_GATEWAY_STATS_CONFIG = {
    "use_all_default_tags": True,
    "stats_tags": [
        {"tag_name": "from_zone", "regex": r"\.zone(\.(([^\.]+)\.))"},
        {"tag_name": "to_zone", "regex": r"\.zone\.[^\.]+\.(([^\.]+)\.)"},
        {"tag_name": "socket_match_name", "regex": r"^cluster(\..+\.(.+))\.total_match_count$"},
        {"tag_name": "priority", "regex": r"circuit_breakers\.((.+?)\.).+"},
    ],
}


def envoy_gateway_bootstrap_value() -> dict:
    (proxy,) = [d for d in docs(ROOT / "k8s/envoy-gateway/gateway.yaml") if d["kind"] == "EnvoyProxy"]
    bootstrap = proxy["spec"]["bootstrap"]
    assert bootstrap["type"] == "Merge"
    return yaml.safe_load(bootstrap["value"])


def test_envoy_proxy_bootstrap_holds_the_demos_stats_tags():
    demo = harness.render_envoy.load()["stats_config"]["stats_tags"]
    assert envoy_gateway_bootstrap_value() == {"stats_config": {"stats_tags": demo}}


def test_envoy_gateway_bootstrap_merge_gives_tollgate_series_their_names(start_gateway, mock):
    """The EnvoyExtensionPolicy's plugin configuration in a bootstrap with Envoy Gateway's
    stats_config and the EnvoyProxy's `bootstrap` merged as Envoy Gateway merges it (protobuf
    merge: lists appended)."""
    (eep,) = docs(ROOT / "k8s/envoy-gateway/extensionpolicy.yaml")
    ext = eep["spec"]["wasm"][0]

    def transform(cfg: dict) -> None:
        wasm = harness.render_envoy.wasm_config(cfg)
        assert wasm["root_id"] == ext["rootID"]
        cfg["stats_config"] = copy.deepcopy(ENVOY_GATEWAY_STATS_CONFIG)
        cfg.update(merge(cfg, envoy_gateway_bootstrap_value()))

    gw = start_gateway(plugin(), mock.url, transform=transform)
    assert gw.post(key=TEAM, body=chat_body()).status == 200
    assert gw.post(key="sk-nobody", body=chat_body()).status == 401
    s = series(gw)
    assert s[("tollgate_requests_total", (("client", "team"), ("outcome", "admitted")))] == 1
    assert s[("tollgate_requests_total", (("client", "_anonymous"), ("outcome", "unauthorized")))] == 1
    assert not [k for k in s if k[0].startswith("tollgate_requests_total_")]
    assert not [k for k in s if "wasmcustom" in k[0]]

"""End to end: model routing and fallback on an Istio gateway (k8s/istio-envoyfilter,
docs/deploy/istio.md), run as the equivalent Envoy configuration.

No istiod runs here. What runs is what istiod would send the gateway: an Istio-like gateway
configuration (the listener `0.0.0.0_8080` with Istio's HTTP filters and the VirtualService's
routes in `http.8080`, provider clusters named and shaped as istiod makes them for a
ServiceEntry, Istio's stats_config with the bootstrap override of k8s/istio/stats-tags.yaml),
to which `istio_apply` applies the EnvoyFilter patches of k8s/istio-envoyfilter/routing.yaml and
k8s/istio/edge.yaml with istiod's semantics (pilot/pkg/networking/core/envoyfilter and
pkg/proto/merge: MERGE appends lists, replaces map entries and Any values as a whole;
INSERT_FIRST without a route match prepends; ADD appends). Istio's own extensions (istio.stats,
metadata exchange) are not in upstream Envoy and are left out; the providers are the mock
provider over plain HTTP instead of TLS to port 443."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import yaml

import harness
import test_istio_stats
from harness import BACKUP_KEY, BACKUP_KEY_ENV, PROVIDER_KEY, PROVIDER_KEY_ENV, ROOT, WASM, chat_body, sha256_hex

_spec = importlib.util.spec_from_file_location("istio_render", ROOT / "k8s" / "istio-envoyfilter" / "render.py")
istio_render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(istio_render)

TEAM = "sk-istio-routing-team-7f3e"
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
GATEWAY_PORT = istio_render.GATEWAY_PORT
# protobuf map fields in the patched messages: MERGE replaces their entries, never merges them.
MAP_FIELDS = {"typed_extension_protocol_options", "typed_per_filter_config", "filter_metadata"}

PROVIDERS = [
    {"name": "relay", "url": "https://relay.tollgate.test", "api_key_env": PROVIDER_KEY_ENV},
    {"name": "backup", "url": "https://backup.tollgate.test", "api_key_env": BACKUP_KEY_ENV},
]
CLIENTS = [{"name": "team", "key_sha256": sha256_hex(TEAM), "requests_per_minute": 1000,
            "endpoints": ["inference", "files"]}]
MODELS = [
    {"match": "gpt-4.1", "providers": ["relay", "backup"]},
    {"match": "fast", "providers": ["backup"], "upstream_model": "deepseek-chat"},
]


def docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- istiod's patch semantics, on the JSON form of the xDS resources -----------------------------

def merge(dst: dict, src: dict) -> dict:
    """Istio's merge.Merge: lists appended, map entries and Any values (objects with `@type`)
    replaced whole, other messages merged field by field, scalars replaced."""
    for k, v in src.items():
        if isinstance(v, list):
            dst[k] = list(dst.get(k, [])) + copy.deepcopy(v)
        elif k in MAP_FIELDS and isinstance(v, dict):
            dst.setdefault(k, {}).update(copy.deepcopy(v))
        elif isinstance(v, dict) and "@type" not in v and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _port(listener: dict) -> int:
    return listener["address"]["socket_address"]["port_value"]


class UnsupportedPatch(Exception):
    pass


def istio_apply(cfg: dict, envoyfilter: dict, listener_port: int) -> None:
    """Apply an EnvoyFilter's patches to an Istio-like gateway configuration, as istiod would.
    `listener_port`: the port istiod's listener has (the Gateway's server port; here the test's
    free port stands in for it). Anything this helper does not implement raises, so a patch
    never silently does nothing."""
    listeners = cfg["static_resources"]["listeners"]
    clusters = cfg["static_resources"]["clusters"]
    for i, cp in enumerate(envoyfilter["spec"]["configPatches"]):
        where = f"{envoyfilter['metadata']['name']}.configPatches[{i}]"
        match, patch = cp.get("match", {}), cp["patch"]
        op, value, apply_to = patch["operation"], patch.get("value"), cp["applyTo"]
        if match.get("context") != "GATEWAY":
            raise UnsupportedPatch(f"{where}: context {match.get('context')!r}")
        applied = 0
        if apply_to in ("LISTENER", "NETWORK_FILTER", "HTTP_FILTER"):
            lm = dict(match.get("listener", {}))
            port = lm.pop("portNumber", None)
            chain = lm.pop("filterChain", {})
            if lm:
                raise UnsupportedPatch(f"{where}: listener match {sorted(lm)}")
            for listener in listeners:
                if port is not None and port != GATEWAY_PORT:
                    raise UnsupportedPatch(f"{where}: the gateway listens on {GATEWAY_PORT}, not {port}")
                if listener["name"] != f"0.0.0.0_{GATEWAY_PORT}":
                    continue
                if apply_to == "LISTENER":
                    if op != "MERGE":
                        raise UnsupportedPatch(f"{where}: {apply_to} {op}")
                    merge(listener, value)
                    applied += 1
                    continue
                for fc in listener["filter_chains"]:
                    for f in fc["filters"]:
                        if f["name"] != chain.get("filter", {}).get("name"):
                            continue
                        if apply_to == "NETWORK_FILTER":
                            if op != "MERGE" or value["typed_config"]["@type"] != f["typed_config"]["@type"]:
                                raise UnsupportedPatch(f"{where}: {apply_to} {op}")
                            # Filter configs merge inside their Any (Istio's MergeAnyWithAny).
                            merge(f["typed_config"], {k: v for k, v in value["typed_config"].items() if k != "@type"})
                            applied += 1
                            continue
                        sub = chain["filter"]["subFilter"]["name"]
                        filters = f["typed_config"]["http_filters"]
                        at = [j for j, h in enumerate(filters) if h["name"] == sub]
                        if op != "INSERT_BEFORE" or not at:
                            raise UnsupportedPatch(f"{where}: {apply_to} {op} before {sub}")
                        filters.insert(at[0], copy.deepcopy(value))
                        applied += 1
        elif apply_to == "CLUSTER":
            if op == "ADD":
                clusters.append(copy.deepcopy(value))
                applied = 1
            elif op == "MERGE":
                name = match.get("cluster", {}).get("name")
                if not name or set(match["cluster"]) != {"name"} or "transport_socket" in value:
                    raise UnsupportedPatch(f"{where}: cluster match {match.get('cluster')}")
                for c in clusters:
                    if c["name"] == name:
                        merge(c, value)
                        applied += 1
            else:
                raise UnsupportedPatch(f"{where}: CLUSTER {op}")
        elif apply_to in ("VIRTUAL_HOST", "HTTP_ROUTE"):
            rm = dict(match.get("routeConfiguration", {}))
            port = rm.pop("portNumber", None)
            if rm or port != GATEWAY_PORT:
                raise UnsupportedPatch(f"{where}: routeConfiguration match {match.get('routeConfiguration')}")
            for listener in listeners:
                for fc in listener["filter_chains"]:
                    for f in fc["filters"]:
                        rc = f["typed_config"].get("route_config", {})
                        if rc.get("name") != f"http.{GATEWAY_PORT}":
                            continue
                        for vh in rc["virtual_hosts"]:
                            if apply_to == "VIRTUAL_HOST" and op == "MERGE":
                                merge(vh, value)
                            elif apply_to == "HTTP_ROUTE" and op == "INSERT_FIRST":
                                vh["routes"].insert(0, copy.deepcopy(value))
                            else:
                                raise UnsupportedPatch(f"{where}: {apply_to} {op}")
                            applied += 1
        else:
            raise UnsupportedPatch(f"{where}: applyTo {apply_to}")
        if not applied:
            raise UnsupportedPatch(f"{where}: matched nothing (istiod would skip it silently)")


# --- what istiod generates for k8s/istio without Tollgate ---------------------------------------

def vs_routes() -> list[dict]:
    """The routes istiod makes from the VirtualService of k8s/istio-envoyfilter: its catch-all."""
    (vs,) = docs(ROOT / "k8s/istio-envoyfilter/virtualservice.yaml")
    (http,) = vs["spec"]["http"]
    dr = http["directResponse"]
    return [{"name": http["name"], "match": {"prefix": "/"},
             "direct_response": {"status": dr["status"], "body": {"inline_string": dr["body"]["string"]}},
             "decorator": {"operation": "tollgate-unrouted"}}]


def istio_cluster(name: str, address: str) -> dict:
    """A cluster as istiod makes it for a ServiceEntry or Service port (abridged), here with a
    static endpoint: its own HttpProtocolOptions (which the patch replaces) and Istio's
    circuit-breaker thresholds."""
    host, _, port = address.rpartition(":")
    return {
        "name": name, "type": "STATIC", "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                             "max_requests": 4294967295, "max_retries": 4294967295,
                                             "track_remaining": True}]},
        "typed_extension_protocol_options": {HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}},
        "metadata": {"filter_metadata": {"istio": {"services": [{"host": name.split("|")[-1], "namespace": "tollgate"}]}}},
    }


def istio_gateway(listen: dict, admin: dict, clusters: dict[str, str]) -> dict:
    """An Istio-like gateway configuration: bootstrap (stats_config with the override merged) and
    what istiod's LDS, RDS and CDS would hold, static here. The listener keeps istiod's name
    and the test's free port."""
    stats = test_istio_stats.merge({"stats_config": copy.deepcopy(test_istio_stats.ISTIO_STATS_CONFIG)},
                                   test_istio_stats.override())["stats_config"]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": f"outbound_0.0.0.0_{GATEWAY_PORT}",
        "use_remote_address": True,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "stream_idle_timeout": "0s",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "route_config": {"name": f"http.{GATEWAY_PORT}", "validate_clusters": False, "virtual_hosts": [
            {"name": f"*:{GATEWAY_PORT}", "domains": ["*"], "routes": vs_routes()}]},
        "http_filters": [
            {"name": "envoy.filters.http.cors", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
            {"name": "envoy.filters.http.fault", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "node": {"id": "router~10.0.0.7~tollgate-gateway-0.tollgate~tollgate.svc.cluster.local",
                 "cluster": "tollgate-gateway.tollgate"},
        "admin": admin,
        "stats_config": stats,
        "static_resources": {
            "listeners": [{"name": f"0.0.0.0_{GATEWAY_PORT}", "address": listen,
                           "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}]}],
            "clusters": [istio_cluster(n, a) for n, a in clusters.items()],
        },
    }


def patched_gateway(listen, admin, clusters: dict[str, str], routing: dict) -> dict:
    cfg = istio_gateway(listen, admin, clusters)
    for ef in [*docs(ROOT / "k8s/istio/edge.yaml"), routing]:
        istio_apply(cfg, ef, GATEWAY_PORT)
    harness.render_envoy.set_wasm(cfg, str(WASM))
    return cfg


def routing_for_test() -> dict:
    """routing.yaml's rendering for two providers (a fallback rule and an alias rule) and this
    test's client, local limiter."""
    return istio_render.routing_envoyfilter(PROVIDERS, models=MODELS, clients=CLIENTS, limiter="local")


@pytest.fixture
def istio_gw(start_gateway, workdir):
    """Start the patched Istio-like gateway in front of mock providers: istio_gw(relay_args)."""
    mocks = []

    def start(relay_args=()):
        relay = harness.MockProvider(workdir, name="relay", expect_key=PROVIDER_KEY, extra_args=list(relay_args))
        backup = harness.MockProvider(workdir, name="backup", expect_key=BACKUP_KEY)
        mocks.extend([relay, backup])
        clusters = {istio_render.istio_cluster(p["url"]): m.addr for p, m in zip(PROVIDERS, (relay, backup))}

        def transform(cfg: dict) -> None:
            istio = patched_gateway(cfg["static_resources"]["listeners"][0]["address"], cfg["admin"],
                                    clusters, routing_for_test())
            cfg.clear()
            cfg.update(istio)

        gw = start_gateway("{}", relay.url, transform=transform)
        return gw, relay, backup

    yield start
    for m in mocks:
        m.stop()


def keys_seen(mock) -> list[str]:
    return [v for r in mock.requests() for n, v in r["headers"] if n == "authorization"]


def series(gw) -> dict:
    return {(fam, tuple(sorted(labels.items()))): v for fam, labels, v in harness.parse_prometheus(gw.stats_text())}


# --- the tests -----------------------------------------------------------------------------------

def test_routing_yaml_is_the_rendered_demo():
    """routing.yaml is what render.py makes from envoy/demo.yaml now."""
    assert (ROOT / "k8s/istio-envoyfilter/routing.yaml").read_text() == istio_render.shipped(), \
        "out of date: run `python3 k8s/istio-envoyfilter/render.py`"


def test_routes_and_clusters_are_the_demos_routing_layout():
    """Applied to the Istio-like gateway, the patches give exactly the routes, aggregate clusters
    and upstream filters that configure_routing gives the standalone gateway for the same rules."""
    routing = routing_for_test()
    clusters = {istio_render.istio_cluster(p["url"]): "127.0.0.1:1" for p in PROVIDERS}
    cfg = patched_gateway({"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                          {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}}},
                          clusters, routing)
    want = istio_render.routed_bootstrap(PROVIDERS, MODELS, "relay", CLIENTS, "local")
    harness.render_envoy.set_wasm(want, str(WASM))
    want_vh = harness.render_envoy._hcm(want)["route_config"]["virtual_hosts"][0]
    (vh,) = harness.render_envoy._hcm(cfg)["route_config"]["virtual_hosts"]
    got_routes = [{k: v for k, v in r.items() if k != "name"} for r in vh["routes"]]
    assert got_routes[:-1] == want_vh["routes"][:-1], "the header routes, in the demo's order"
    assert vh["routes"][-1]["name"] == "unrouted" and vh["routes"][-1]["direct_response"]["status"] == 404
    assert vh["include_request_attempt_count"] is True
    assert vh["include_attempt_count_in_response"] is True
    by_name = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    for c in want["static_resources"]["clusters"]:
        if c["name"].startswith("tollgate_route_"):
            assert by_name[c["name"]] == c
        elif c["name"] in clusters:
            got = by_name[c["name"]]
            assert got["typed_extension_protocol_options"] == c["typed_extension_protocol_options"], \
                "the HttpProtocolOptions entry is replaced whole (istiod's use_downstream_protocol_config gone)"
            opts = got["typed_extension_protocol_options"][HTTP_OPTIONS]
            assert [f["name"] for f in opts["http_filters"]] == ["envoy.filters.http.wasm", "envoy.filters.http.upstream_codec"]
            assert opts["http_filters"][0]["typed_config"]["config"]["vm_config"]["vm_id"] == "tollgate_upstream"
            # istiod's own settings of the cluster stay.
            assert got["circuit_breakers"]["thresholds"][0]["max_retries"] == 4294967295
            assert got["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                "socket_address"]["port_value"] == 1
    (agg,) = [c for c in cfg["static_resources"]["clusters"] if c["name"].startswith("tollgate_route_")]
    assert agg["cluster_type"]["typed_config"]["clusters"] == [
        "outbound|80||relay.tollgate.test", "outbound|80||backup.tollgate.test"]
    filters = [f["name"] for f in harness.render_envoy._hcm(cfg)["http_filters"]]
    assert filters == ["envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.wasm",
                       "envoy.filters.http.router"]


def test_rules_reach_their_provider_with_its_key_on_the_istio_gateway(istio_gw):
    gw, relay, backup = istio_gw()
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1"))
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "relay"
    assert keys_seen(relay) == [f"Bearer {PROVIDER_KEY}"]
    (seen,) = relay.requests()
    assert dict(seen["headers"]).get("host") == "relay.tollgate.test", "the provider's own Host"

    r = gw.post(key=TEAM, body=chat_body("fast", content="alias please"))
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "backup"
    (seen,) = backup.requests()
    assert json.loads(seen["body"])["model"] == "deepseek-chat", "the body was read and the model renamed"
    assert keys_seen(backup) == [f"Bearer {BACKUP_KEY}"]

    # Other paths take the default route, to the first provider.
    r = harness.request(gw.url, "DELETE", "/v1/files/file-abc123", [("authorization", f"Bearer {TEAM}")])
    assert r.header("x-mock-name") == "relay", r.body

    assert gw.post(key="sk-nobody", body=chat_body()).status == 401
    assert len(relay.requests()) == 2 and len(backup.requests()) == 1, "refusals never reach a provider"
    assert relay.requests()[-1]["path"] == "/v1/files/file-abc123"
    s = series(gw)
    assert s[("tollgate_upstream_requests_total", (("model", "gpt-4_1"), ("provider", "relay")))] == 1
    assert s[("tollgate_upstream_requests_total", (("model", "fast"), ("provider", "backup")))] == 1
    assert s[("tollgate_requests_total", (("client", "team"), ("outcome", "admitted")))] == 3
    assert s[("tollgate_requests_total", (("client", "_anonymous"), ("outcome", "unauthorized")))] == 1
    assert not [k for k in s if "wasmcustom" in k[0]], [k for k in s if "wasmcustom" in k[0]][:5]


def test_fallback_to_the_second_provider_on_the_istio_gateway(istio_gw):
    gw, relay, backup = istio_gw(relay_args=["--status", "500"])
    r = gw.post(key=TEAM, body=chat_body("gpt-4.1", content="fall back"))
    assert r.status == 200, r.body
    assert r.header("x-mock-name") == "backup"
    assert keys_seen(relay) == [f"Bearer {PROVIDER_KEY}"], "the first attempt had the relay's key"
    assert keys_seen(backup) == [f"Bearer {BACKUP_KEY}"], "the fallback had the backup's key"
    assert gw.counter("tollgate_fallbacks_total", model="gpt-4_1", **{"from": "relay", "to": "backup"}) == 1
    assert gw.counter("tollgate_upstream_errors_total", provider="relay", status="500") == 1
    assert gw.counter("tollgate_upstream_requests_total", provider="backup", model="gpt-4_1") == 1
    s = series(gw)
    assert not [k for k in s if "wasmcustom" in k[0]], [k for k in s if "wasmcustom" in k[0]][:5]



def test_shipped_routing_passes_envoy_validate(tmp_path):
    """The shipped rendering (api.openai.com over TLS, the Redis limiter through Istio's Webdis
    cluster) applied to the Istio-like gateway loads the module and its configuration."""
    (routing,) = docs(ROOT / "k8s/istio-envoyfilter/routing.yaml")
    clusters = {"outbound|80||api.openai.com": "127.0.0.1:443",
                "outbound|7379||webdis.tollgate.svc.cluster.local": "127.0.0.1:7379"}
    cfg = patched_gateway({"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                          {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
                          clusters, routing)
    path = tmp_path / "istio.yaml"
    path.write_text(harness.render_envoy.dump(cfg))
    env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY, "TOLLGATE_WEBDIS_AUTH": "tollgate:pw"}
    r = harness.envoy_validate(path, env)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    plugin = json.loads(harness.render_envoy.wasm_config(cfg)["configuration"]["value"])
    assert plugin["limiter"]["cluster"] == "outbound|7379||webdis.tollgate.svc.cluster.local"
    assert [p["cluster"] for p in plugin["providers"]] == ["outbound|80||api.openai.com"]


def test_gateway_deployment_sets_every_variable_the_filters_read():
    (gw,) = [d for d in docs(ROOT / "k8s/istio/gateway.yaml") if d["kind"] == "Deployment"]
    env = {e["name"] for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
    (routing,) = docs(ROOT / "k8s/istio-envoyfilter/routing.yaml")
    for cp in routing["spec"]["configPatches"]:
        text = json.dumps(cp)
        for key in ("TOLLGATE_PROVIDER_KEY", "TOLLGATE_WEBDIS_AUTH"):
            if key in text:
                assert key in env


def test_a_patch_the_helper_cannot_apply_fails_loudly():
    cfg = istio_gateway({"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}}}, {})
    ef = {"metadata": {"name": "x"}, "spec": {"configPatches": [
        {"applyTo": "CLUSTER", "match": {"context": "GATEWAY", "cluster": {"name": "outbound|80||nowhere"}},
         "patch": {"operation": "MERGE", "value": {"connect_timeout": "1s"}}}]}}
    with pytest.raises(UnsupportedPatch, match="matched nothing"):
        istio_apply(cfg, ef, GATEWAY_PORT)

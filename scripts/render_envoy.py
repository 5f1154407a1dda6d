#!/usr/bin/env python3
"""Render a runnable Envoy bootstrap from envoy/demo.yaml.

`make run` and the end-to-end tests both start Envoy from the output of this script, so the
gateway that is tested is the gateway that ships: only addresses, the module path, the plugin
configuration and the provider cluster change.

    render_envoy.py [--listen 127.0.0.1:10000] [--admin 127.0.0.1:9901]
                    [--provider-url http://127.0.0.1:10080 | https://api.example.com]
                    [--limiter local|redis] [--webdis 127.0.0.1:7379]
                    [--wasm PATH] [--plugin-config FILE] [-o OUT]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import urllib.parse

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy" / "demo.yaml"
WASM_FILTER = "envoy.filters.http.wasm"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTE_HEADER = "x-tollgate-route"
# Envoy's own errors (no healthy upstream, connect failure, timeouts, overflow) in OpenAI's shape,
# keyed by the response flag Envoy sets; Tollgate's own replies carry no such flag.
ENVOY_ERRORS = [
    ("UT", "upstream_timeout", "The provider did not answer in time."),
    ("UH", "no_healthy_upstream", "No provider is available for this request."),
    ("UF", "upstream_connect_error", "The gateway could not connect to the provider."),
    ("URX", "upstream_retries_exhausted", "Every provider for this model failed."),
    ("UO", "upstream_overflow", "The gateway is overloaded; retry shortly."),
    ("UC", "upstream_connection_terminated", "The provider closed the connection."),
    ("UR", "upstream_reset", "The provider reset the request."),
    ("NR", "no_route", "No route serves this request."),
]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# Edge hardening (docs/edge.md has the table and the reasons): Envoy's "Configuring Envoy as an
# edge proxy" applied to a gateway whose clients are untrusted and whose answers stream for
# minutes. Every shipped config gets these HttpConnectionManager settings; the filter matches
# endpoints exactly, so Envoy normalises the path before it (and rejects escaped slashes).
EDGE_HCM = {
    # The client is the TCP peer: x-forwarded-for, x-envoy-* and x-request-id from clients are
    # not trusted, and Envoy generates its own x-request-id for every request.
    "use_remote_address": True,
    "xff_num_trusted_hops": 0,
    # No peer counts as internal: Envoy trusts RFC 1918 and loopback peers when cidr_ranges is
    # empty (it keeps their x-request-id and x-envoy-* headers), so the list names one address
    # no TCP peer can have.
    "internal_address_config": {"unix_sockets": False,
                                "cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}]},
    "preserve_external_request_id": False,
    # Client addresses are no business of the provider.
    "skip_xff_append": True,
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    # A client that drips its headers is cut off; one that takes over a minute to send its body
    # (at most the body cap) too. request_timeout ends when the request has gone upstream, so it
    # does not limit how long an answer streams (the route's timeout and idle_timeout do).
    "request_headers_timeout": "10s",
    "request_timeout": "60s",
    # Streams without a route timeout of their own (direct responses); routes set idle_timeout.
    "stream_idle_timeout": "300s",
    "common_http_protocol_options": {
        "idle_timeout": "300s",
        "headers_with_underscores_action": "REJECT_REQUEST",
    },
    "http2_protocol_options": {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    },
}
# Connection limits and memory protection for the whole process. The heap limit is sized for the
# 512Mi container limit of k8s/ and the chart: raise both together.
OVERLOAD_MANAGER = {
    "refresh_interval": "0.25s",
    "resource_monitors": [
        {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": 10000}},
        {"name": "envoy.resource_monitors.fixed_heap", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
            "max_heap_size_bytes": 402653184}},
    ],
    "actions": [
        {"name": "envoy.overload_actions.shrink_heap",
         "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.95}}]},
        {"name": "envoy.overload_actions.stop_accepting_requests",
         "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.98}}]},
    ],
}


def load(path: pathlib.Path = TEMPLATE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _hcm(cfg: dict) -> dict:
    listener = cfg["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_config(cfg: dict) -> dict:
    """The PluginConfig of the Tollgate wasm filter on the listener."""
    for f in _hcm(cfg)["http_filters"]:
        if f["name"] == WASM_FILTER:
            return f["typed_config"]["config"]
    raise KeyError("no wasm filter in the Envoy config")


def _all_wasm_configs(cfg: dict):
    """The listener's Tollgate PluginConfig and those of the upstream filters of provider
    clusters (routing mode), which must stay identical but for name, root_id and vm_id."""
    yield wasm_config(cfg)
    for c in cfg["static_resources"]["clusters"]:
        opts = c.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {})
        for f in opts.get("http_filters", []):
            if f["name"] == WASM_FILTER:
                yield f["typed_config"]["config"]


def plugin_config(cfg: dict) -> dict:
    return json.loads(wasm_config(cfg)["configuration"]["value"])


def set_plugin_config(cfg: dict, plugin: dict | str) -> None:
    value = plugin if isinstance(plugin, str) else json.dumps(plugin, indent=2)
    for w in _all_wasm_configs(cfg):
        w["configuration"]["value"] = value


def use_redis_limiter(cfg: dict, **settings) -> None:
    """Switch the plugin configuration to the Redis limiter through the `webdis` cluster."""
    plugin = plugin_config(cfg)
    plugin["limiter"] = {"backend": "redis", "cluster": "webdis", "timeout_ms": 100,
                         "on_error": "local", **settings}
    set_plugin_config(cfg, plugin)


def set_webdis(cfg: dict, hostport: str) -> None:
    """Point the `webdis` cluster at Webdis."""
    _cluster(cfg, "webdis")["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _addr(hostport)}}]}
    ]


def set_wasm(cfg: dict, path: str) -> None:
    for w in _all_wasm_configs(cfg):
        w["vm_config"]["code"]["local"]["filename"] = str(path)


def set_host_env_keys(cfg: dict, keys: list[str]) -> None:
    for w in _all_wasm_configs(cfg):
        w["vm_config"]["environment_variables"]["host_env_keys"] = list(keys)


def _addr(hostport: str) -> dict:
    host, _, port = hostport.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def set_listen(cfg: dict, hostport: str) -> None:
    cfg["static_resources"]["listeners"][0]["address"] = _addr(hostport)


def set_admin(cfg: dict, hostport: str) -> None:
    cfg["admin"]["address"] = _addr(hostport)


def _cluster(cfg: dict, name: str) -> dict:
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == name:
            return c
    raise KeyError(f"no cluster {name!r}")


def set_provider(cfg: dict, url: str) -> None:
    """One provider at `url` for everything (the single-provider layout): a plain cluster for
    http, TLS with SNI and certificate checks for https, and the provider's host as :authority."""
    configure_single(cfg, plugin_config(cfg), url)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the plugin configuration JSON) as readable literal blocks."""


def _endpoint_cluster(name: str, url: str, connect_timeout_ms: int = 2000) -> dict:
    """A cluster for the origin of `url`: plain for http, TLS with SNI and SAN checks for https."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"provider URL must be http(s)://host[:port], got {url!r}")
    tls = u.scheme == "https"
    host, port = u.hostname, u.port or (443 if tls else 80)
    is_ip = host.replace(".", "").isdigit() or ":" in host
    cluster = {
        "name": name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "connect_timeout": f"{connect_timeout_ms / 1000:g}s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(f"{host}:{port}")}}]}],
        },
    }
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": CA_BUNDLE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    }
                },
            },
        }
    return cluster


def configure_routing(cfg: dict, plugin: dict, providers: dict[str, dict]) -> None:
    """Build the routes and clusters of model routing from a plugin configuration.

    `providers` maps each provider name to `{"url": ..., "connect_timeout_ms": ..., "timeout_ms":
    ..., "idle_timeout_ms": ...}` (Envoy-side settings the plugin configuration does not hold).
    For every provider: a cluster whose upstream filter chain runs Tollgate again, once per
    attempt, to set that provider's key, host, path prefix and model name. For every model rule:
    a route on `x-tollgate-route: r<i>` to the provider, or to an aggregate cluster of its
    providers in order with a retry policy that moves to the next one on connect failure,
    reset, 5xx or 429. Requests the filter did not route get a 404 from the catch-all.
    """
    set_plugin_config(cfg, plugin)
    base = wasm_config(cfg)
    # Keep the clusters that are not ours (e.g. webdis); drop the single-provider cluster, the
    # aggregates and every cluster that runs the upstream filter (the previous providers).
    def ours(c: dict) -> bool:
        filters = c.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {}).get("http_filters", [])
        return (c["name"] == "provider" or c["name"].startswith("tollgate_")
                or c["name"] in {p["cluster"] for p in plugin["providers"]}
                or any(f["name"] == WASM_FILTER for f in filters))
    clusters = [c for c in cfg["static_resources"]["clusters"] if not ours(c)]
    upstream = json.loads(json.dumps(base))
    upstream["name"] = "tollgate-upstream"
    upstream["root_id"] = "tollgate_upstream"
    # A VM of its own: the VM is created by the first filter that asks for its vm_id, and
    # before Envoy 1.39 a VM an upstream filter created puts every custom metric under that
    # cluster's stats scope (`cluster.<name>.wasmcustom.*`). With vm_id `tollgate` shared,
    # the listener role's metrics were renamed so on 1.36-1.38 (docs/compatibility.md).
    upstream["vm_config"]["vm_id"] = "tollgate_upstream"
    # Envoy runs the upstream filters of the cluster a route names: the provider's cluster for
    # one-provider rules, the aggregate cluster for rules with fallbacks.
    upstream_options = {HTTP_OPTIONS: {
        "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {}},
        "http_filters": [
            {"name": WASM_FILTER, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": upstream}},
            {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
        ],
    }}
    for p in plugin["providers"]:
        settings = providers[p["name"]]
        cluster = _endpoint_cluster(p["cluster"], settings["url"], settings.get("connect_timeout_ms", 2000))
        cluster["typed_extension_protocol_options"] = json.loads(json.dumps(upstream_options))
        clusters.append(cluster)
    by_name = {p["name"]: p for p in plugin["providers"]}
    routes = []
    targets = [(f"r{i}", rule["providers"]) for i, rule in enumerate(plugin["models"])]
    if plugin.get("default_provider"):
        targets.append(("default", [plugin["default_provider"]]))
    for route_id, names in targets:
        first = providers[names[0]]
        route = {
            "timeout": f"{first.get('timeout_ms', 600_000) / 1000:g}s",
            "idle_timeout": f"{first.get('idle_timeout_ms', 120_000) / 1000:g}s",
        }
        if len(names) == 1:
            route["cluster"] = by_name[names[0]]["cluster"]
        else:
            agg = f"tollgate_route_{route_id}"
            clusters.append({
                "name": agg,
                "connect_timeout": "1s",
                "typed_extension_protocol_options": json.loads(json.dumps(upstream_options)),
                "lb_policy": "CLUSTER_PROVIDED",
                "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                    "clusters": [by_name[n]["cluster"] for n in names]}},
            })
            route["cluster"] = agg
            route["retry_policy"] = {
                "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": len(names) - 1,
                "retry_priority": {"name": "envoy.retry_priorities.previous_priorities", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    "update_frequency": 1}},
            }
        routes.append({"match": {"prefix": "/", "headers": [
            {"name": ROUTE_HEADER, "string_match": {"exact": route_id}}]}, "route": route})
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string":
        '{"error":{"message":"No route serves this request.","type":"invalid_request_error",'
        '"param":null,"code":null}}'}}})
    vhost = _hcm(cfg)["route_config"]["virtual_hosts"][0]
    vhost["routes"] = routes
    # The upstream filter maps attempt N to the rule's N-th provider; the listener role counts
    # one successful attempt from the response's count without reading the attempt log (and
    # removes the header before the client sees it).
    vhost["include_request_attempt_count"] = True
    vhost["include_attempt_count_in_response"] = True
    vhost.pop("response_headers_to_add", None)
    cfg["static_resources"]["clusters"] = clusters
    # The filter pauses the request headers to read the body (model), then resumes.
    for w in _all_wasm_configs(cfg):
        w["allow_on_headers_stop_iteration"] = True
    set_buffer_limit(cfg, plugin)
    set_local_replies(cfg)
    set_edge(cfg)


def buffer_limit(plugin: dict) -> int:
    """The gateway listener's buffer limit: the filter's body cap (`max_body_bytes`, 1 MiB by
    default) plus room for headers. The filter holds the body until it has read the model, so
    Envoy's own limit must not be the smaller one (that would be a 413 the filter never decided)."""
    return max(plugin.get("max_body_bytes", 1 << 20), 1 << 20) + 65536


def set_buffer_limit(cfg: dict, plugin: dict) -> None:
    cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = buffer_limit(plugin)


def set_edge(cfg: dict) -> None:
    """Envoy's edge-proxy settings (EDGE_HCM, OVERLOAD_MANAGER) on the gateway listener, placed
    right after its stat_prefix so they read first; and the overload manager after stats_config."""
    hcm = _hcm(cfg)
    rest = {k: v for k, v in hcm.items() if k not in EDGE_HCM}
    hcm.clear()
    for k in ("@type", "stat_prefix"):
        if k in rest:
            hcm[k] = rest.pop(k)
    hcm.update(json.loads(json.dumps(EDGE_HCM)))
    hcm.update(rest)
    top = {k: v for k, v in cfg.items() if k != "overload_manager"}
    cfg.clear()
    for k, v in top.items():
        cfg[k] = v
        if k == "stats_config":
            cfg["overload_manager"] = json.loads(json.dumps(OVERLOAD_MANAGER))
    cfg.setdefault("overload_manager", json.loads(json.dumps(OVERLOAD_MANAGER)))


DEMO_PROVIDERS = {
    "relay": {"url": "http://127.0.0.1:10080"},
    "backup": {"url": "http://127.0.0.1:10081"},
    # The relay's Anthropic Messages API (relays such as HolySheep serve both APIs with one key).
    "claude": {"url": "http://127.0.0.1:10080"},
}


def configure_single(cfg: dict, plugin: dict, url: str) -> None:
    """One provider for everything (`upstream` in the plugin configuration): one route to the
    `provider` cluster, which the filter's key injection serves."""
    set_plugin_config(cfg, plugin)
    keep = [c for c in cfg["static_resources"]["clusters"]
            if c["name"] == "webdis"]
    cfg["static_resources"]["clusters"] = [_endpoint_cluster("provider", url)] + keep
    route = {"cluster": "provider", "timeout": "600s", "idle_timeout": "120s"}
    host = urllib.parse.urlsplit(url)
    if host.scheme == "https":
        route["host_rewrite_literal"] = host.hostname
    vhost = _hcm(cfg)["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [{"match": {"prefix": "/"}, "route": route}]
    vhost.pop("include_request_attempt_count", None)
    vhost.pop("include_attempt_count_in_response", None)
    for w in _all_wasm_configs(cfg):
        w.pop("allow_on_headers_stop_iteration", None)
    set_buffer_limit(cfg, plugin)
    set_local_replies(cfg)
    set_edge(cfg)


def configure(cfg: dict, plugin: dict, providers: dict[str, dict] | str) -> None:
    """Single-provider or routing layout, whichever the plugin configuration asks for."""
    if "providers" in plugin:
        configure_routing(cfg, plugin, providers)
    else:
        configure_single(cfg, plugin, providers if isinstance(providers, str) else providers["url"])


def set_authorities(plugin: dict, urls: dict[str, dict]) -> None:
    """Give every provider its own URL's host as `authority` (a real provider needs its Host;
    the providers of a rule must all set one or none)."""
    for p in plugin["providers"]:
        u = urllib.parse.urlsplit(urls[p["name"]]["url"])
        default_port = {"http": 80, "https": 443}[u.scheme]
        p["authority"] = u.hostname if u.port in (None, default_port) else f"{u.hostname}:{u.port}"


def _provider_urls(cfg: dict, plugin: dict) -> dict[str, dict]:
    """The current address of each provider's cluster, as `configure_routing` input."""
    urls = {}
    for p in plugin["providers"]:
        c = _cluster(cfg, p["cluster"])
        sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        scheme = "https" if "transport_socket" in c else "http"
        urls[p["name"]] = {"url": f"{scheme}://{sa['address']}:{sa['port_value']}"}
    return urls


# The response code details of the replies Envoy's connection manager sends before it replaces
# the client's x-request-id with its own (missing :authority or :path, an absolute or
# unnormalisable path such as an escaped slash, overload).
REJECTED_BEFORE_ID = ("['path_normalization_failed', 'missing_host_header', 'missing_path_rejected', "
                      "'absolute_path_rejected', 'overload']")

ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    # Envoy's own id: with use_remote_address and no internal addresses, Envoy replaces any
    # x-request-id a client sends, but only after its first checks of the request line: a request
    # it refuses there (REJECTED_BEFORE_ID) still holds the client's, which is not logged.
    "request_id": "%CEL(response.code_details in " + REJECTED_BEFORE_ID + " ? '' : request.id)%",
    "method": "%REQ(:METHOD)%",
    # The normalised :path without its query string (a key sent as ?api_key= is never written),
    # and never x-envoy-original-path, which a client can send.
    "path": "%PATH(NQ:PATH)%",
    "status": "%RESPONSE_CODE%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    # Tries of the request upstream (1 + retries, a fallback to the next provider included).
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    # What Tollgate decided (docs/metrics.md#access-log): one PLAIN string property per field,
    # set only when the request has it (null otherwise). Never TYPED: Envoy converts a typed
    # value to JSON and back on every line.
    **{f: f"%FILTER_STATE(wasm.tollgate_{f}:PLAIN)%" for f in (
        "client", "model", "outcome", "reason", "cache", "limiter_error",
        "prompt_tokens", "completion_tokens", "provider", "cost_micros")},
    "duration_ms": "%DURATION%",
    "response_flags": "%RESPONSE_FLAGS%",
    # Why Envoy answered itself, e.g. path_normalization_failed, request_headers_timeout.
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
}


def set_access_log(cfg: dict) -> None:
    """One JSON line per request on stdout, with what the filter recorded (client name, model
    rule, token usage) next to Envoy's own fields. Never a key: the filter records none."""
    _hcm(cfg)["access_log"] = [{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": dict(ACCESS_LOG_FIELDS)},
        },
    }]


# Anthropic's error types for the same flags (its SDKs read `error.type`); the rest are api_error.
ANTHROPIC_ERROR_TYPES = {"UT": "timeout_error", "UO": "overloaded_error"}
# The paths of Anthropic's API (core/src/endpoints.rs: `messages`, `messages_count_tokens`).
ANTHROPIC_PATH_PREFIX = "/v1/messages"


def set_local_replies(cfg: dict) -> None:
    """Envoy's own errors in the JSON error shape of the client's API (SDKs retry or raise on them
    as they would against the provider): Anthropic's on its Messages API, OpenAI's elsewhere;
    Tollgate's replies pass unchanged (no response flag)."""
    mappers = []
    for flag, code, message in ENVOY_ERRORS:
        mappers.append({
            "filter": {"and_filter": {"filters": [
                {"header_filter": {"header": {"name": ":path",
                                              "string_match": {"prefix": ANTHROPIC_PATH_PREFIX}}}},
                {"response_flag_filter": {"flags": [flag]}},
            ]}},
            "body_format_override": {
                "json_format": {"type": "error",
                                "error": {"type": ANTHROPIC_ERROR_TYPES.get(flag, "api_error"),
                                          "message": message}},
                "content_type": "application/json",
            },
        })
    for flag, code, message in ENVOY_ERRORS:
        kind = "server_error"
        mappers.append({
            "filter": {"response_flag_filter": {"flags": [flag]}},
            "body_format_override": {
                "json_format": {"error": {"message": message, "type": kind,
                                          "param": None, "code": code}},
                "content_type": "application/json",
            },
        })
    _hcm(cfg)["local_reply_config"] = {"mappers": mappers}
    set_access_log(cfg)


def _str(dumper: yaml.SafeDumper, s: str):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str)


def dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)


def write_output(text: str, output: str) -> None:
    """Writes a rendered file to `output`, or to standard output for "-"."""
    if output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(output).write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", default=str(TEMPLATE))
    p.add_argument("--listen")
    p.add_argument("--admin")
    p.add_argument("--provider-url", help="URL of the first provider (the demo's \"relay\")")
    p.add_argument("--provider", action="append", default=[], metavar="NAME=URL",
                   help="URL of a named provider (routing configs); repeatable")
    p.add_argument("--limiter", choices=("local", "redis"))
    p.add_argument("--webdis", help="host:port of Webdis")
    p.add_argument("--wasm")
    p.add_argument("--plugin-config", help="file holding the plugin configuration JSON")
    p.add_argument("--reload-dir", help="live reload: write the filter configuration to watched files "
                   "in this directory (scripts/ecds.py) instead of into the bootstrap")
    p.add_argument("-o", "--output", default="-")
    a = p.parse_args(argv)
    cfg = load(pathlib.Path(a.template))
    if a.listen:
        set_listen(cfg, a.listen)
    if a.admin:
        set_admin(cfg, a.admin)
    if a.provider:
        plugin = plugin_config(cfg)
        urls = _provider_urls(cfg, plugin)
        for item in a.provider:
            name, _, url = item.partition("=")
            urls[name] = {"url": url}
        configure_routing(cfg, plugin, urls)
    if a.provider_url:
        plugin = plugin_config(cfg)
        if "providers" in plugin:
            # The demo's first provider ("relay") goes to the given URL; the others keep theirs.
            urls = _provider_urls(cfg, plugin)
            first = plugin["providers"][0]
            urls[first["name"]] = {"url": a.provider_url}
            set_authorities(plugin, urls)
            configure_routing(cfg, plugin, urls)
        else:
            set_provider(cfg, a.provider_url)
    if a.limiter == "redis":
        use_redis_limiter(cfg)
    if a.webdis:
        set_webdis(cfg, a.webdis)
    if a.wasm:
        set_wasm(cfg, a.wasm)
    if a.plugin_config:
        set_plugin_config(cfg, pathlib.Path(a.plugin_config).read_text(encoding="utf-8"))
    if a.reload_dir:
        import ecds
        reload_dir = pathlib.Path(a.reload_dir).resolve()
        ecds.write(reload_dir, ecds.use_ecds(cfg, str(reload_dir)))
    write_output(dump(cfg), a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

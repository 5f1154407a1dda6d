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
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def load(path: pathlib.Path = TEMPLATE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _hcm(cfg: dict) -> dict:
    listener = cfg["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_config(cfg: dict) -> dict:
    """The PluginConfig of the Tollgate wasm filter."""
    for f in _hcm(cfg)["http_filters"]:
        if f["name"] == WASM_FILTER:
            return f["typed_config"]["config"]
    raise KeyError("no wasm filter in the Envoy config")


def plugin_config(cfg: dict) -> dict:
    return json.loads(wasm_config(cfg)["configuration"]["value"])


def set_plugin_config(cfg: dict, plugin: dict | str) -> None:
    value = plugin if isinstance(plugin, str) else json.dumps(plugin, indent=2)
    wasm_config(cfg)["configuration"]["value"] = value


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
    wasm_config(cfg)["vm_config"]["code"]["local"]["filename"] = str(path)


def set_host_env_keys(cfg: dict, keys: list[str]) -> None:
    wasm_config(cfg)["vm_config"]["environment_variables"]["host_env_keys"] = list(keys)


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


def _route(cfg: dict) -> dict:
    return _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def set_provider(cfg: dict, url: str) -> None:
    """Point the `provider` cluster at a URL's origin.

    `http://host:port` gives a plain cluster (the mock provider); `https://host[:port]` gives a
    TLS cluster with SNI and certificate checks against the system CA bundle, and the provider's
    host sent as `:authority`. A path (e.g. `/v1`) is ignored: clients already send `/v1/...`.
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"provider URL must be http(s)://host[:port], got {url!r}")
    if u.path not in ("", "/", "/v1", "/v1/"):
        raise ValueError(f"provider URL path must be empty or /v1, got {u.path!r}")
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    host = u.hostname
    cluster = _cluster(cfg, "provider")
    is_ip = host.replace(".", "").isdigit() or ":" in host
    cluster["type"] = "STATIC" if is_ip else "LOGICAL_DNS"
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = {
        "cluster_name": "provider",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(f"{host}:{port}")}}]}],
    }
    route = _route(cfg)
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": CA_BUNDLE},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    }
                },
            },
        }
        route["host_rewrite_literal"] = host
    else:
        cluster.pop("transport_socket", None)
        route.pop("host_rewrite_literal", None)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the plugin configuration JSON) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, s: str):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str)


def dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", default=str(TEMPLATE))
    p.add_argument("--listen")
    p.add_argument("--admin")
    p.add_argument("--provider-url")
    p.add_argument("--limiter", choices=("local", "redis"))
    p.add_argument("--webdis", help="host:port of Webdis")
    p.add_argument("--wasm")
    p.add_argument("--plugin-config", help="file holding the plugin configuration JSON")
    p.add_argument("-o", "--output", default="-")
    a = p.parse_args(argv)
    cfg = load(pathlib.Path(a.template))
    if a.listen:
        set_listen(cfg, a.listen)
    if a.admin:
        set_admin(cfg, a.admin)
    if a.provider_url:
        set_provider(cfg, a.provider_url)
    if a.limiter == "redis":
        use_redis_limiter(cfg)
    if a.webdis:
        set_webdis(cfg, a.webdis)
    if a.wasm:
        set_wasm(cfg, a.wasm)
    if a.plugin_config:
        set_plugin_config(cfg, pathlib.Path(a.plugin_config).read_text(encoding="utf-8"))
    out = dump(cfg)
    if a.output == "-":
        sys.stdout.write(out)
    else:
        pathlib.Path(a.output).write_text(out, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Live reload: Tollgate's filter configuration delivered by extension config discovery (ECDS)
from watched files, so that a change to keys, limits or the plugin's routing applies to the
running Envoy without a restart.

`use_ecds(cfg, directory)` turns a rendered bootstrap (render_envoy.py) into one whose Tollgate
filters read their configuration from `directory`:

- the listener's filter from `<directory>/tollgate.json`,
- the upstream filters of provider clusters (model routing) from
  `<directory>/tollgate-upstream.json`,

and returns those files' contents. Each file is a discovery response holding one
`TypedExtensionConfig` (the filter's `Wasm` configuration, plugin configuration included), in
JSON so that `tollgate keys` can edit it without a YAML library. Envoy watches the directory
(`watched_directory`): a file moved into place (a rename, or a Kubernetes ConfigMap's symlink
swap) is a new configuration. Envoy builds the new plugin in the VMs it already runs (same
`vm_id`, same code): shared data (the local limiter's windows and token reservations, the local
cache) is kept, requests in flight finish under the configuration they started with, and a
configuration the filter refuses (`on_configure` fails) is rejected while the old one keeps
serving (`extension_config_discovery.tollgate.config_fail`).
"""

from __future__ import annotations

import json
import os
import pathlib

WASM_FILTER = "envoy.filters.http.wasm"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Resource names: the name of the HTTP filter that discovers them.
LISTENER_RESOURCE = "tollgate"
UPSTREAM_RESOURCE = "tollgate-upstream"
FILES = {LISTENER_RESOURCE: "tollgate.json", UPSTREAM_RESOURCE: "tollgate-upstream.json"}


def resource(name: str, wasm_config: dict) -> dict:
    """A discovery response with one filter configuration, as Envoy reads it from a file."""
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name,
        "typed_config": {"@type": WASM_TYPE, "config": wasm_config},
    }]}


def _discovered(name: str, directory: str) -> dict:
    return {"name": name, "config_discovery": {
        "config_source": {
            "resource_api_version": "V3",
            "path_config_source": {"path": f"{directory}/{FILES[name]}",
                                   "watched_directory": {"path": directory}},
        },
        "type_urls": [WASM_TYPE],
    }}


def use_ecds(cfg: dict, directory: str) -> dict[str, dict]:
    """Move every Tollgate filter configuration of `cfg` into discovered resources read from
    `directory`; returns {file name: content} to write there (see `write`)."""
    files: dict[str, dict] = {}
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    for i, f in enumerate(filters):
        if f["name"] == WASM_FILTER:
            files[FILES[LISTENER_RESOURCE]] = resource(LISTENER_RESOURCE, f["typed_config"]["config"])
            filters[i] = _discovered(LISTENER_RESOURCE, directory)
    for c in cfg["static_resources"]["clusters"]:
        opts = c.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {})
        ups = opts.get("http_filters", [])
        for i, f in enumerate(ups):
            if f["name"] == WASM_FILTER:
                # Every provider cluster runs the same upstream plugin: one resource for all.
                files[FILES[UPSTREAM_RESOURCE]] = resource(UPSTREAM_RESOURCE, f["typed_config"]["config"])
                ups[i] = _discovered(UPSTREAM_RESOURCE, directory)
    if FILES[LISTENER_RESOURCE] not in files:
        raise KeyError("no Tollgate filter on the listener")
    # Discovered resources need a node identity (any: no management server is asked).
    cfg.setdefault("node", {"id": "tollgate", "cluster": "tollgate"})
    return files


def plugin_config(resource_doc: dict) -> str:
    """The plugin configuration (a JSON string) held by one of these files."""
    return resource_doc["resources"][0]["typed_config"]["config"]["configuration"]["value"]


def with_plugin_config(resource_doc: dict, plugin: dict | str) -> dict:
    """A copy of one of these files with another plugin configuration."""
    doc = json.loads(json.dumps(resource_doc))
    value = plugin if isinstance(plugin, str) else json.dumps(plugin, indent=2)
    doc["resources"][0]["typed_config"]["config"]["configuration"]["value"] = value
    return doc


def write(directory: pathlib.Path, files: dict[str, dict]) -> None:
    """Write each file next to its final place and rename it there (atomic: Envoy never reads a
    half-written file). The upstream file goes first: a new provider key is in place before the
    listener sends anything new."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n != FILES[UPSTREAM_RESOURCE]):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(json.dumps(files[name], indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, directory / name)

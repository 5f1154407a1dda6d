#!/usr/bin/env python3
"""Offline checks of the deploy artifacts that need the Python libraries of .venv-deploy
(deploy/requirements.txt). tests/test_deploy.py runs them; so can you:

    .venv-deploy/bin/python deploy/validate.py helm [--values FILE.json] -o rendered.yaml
        `helm lint --strict` and `helm template` of charts/tollgate (Helm v4 SDK, no cluster)
    .venv-deploy/bin/python deploy/validate.py crds FILE.yaml...
        custom resources against their schemas: Istio and Prometheus Operator kinds through
        the models generated from their CRDs (cloudcoil), Envoy Gateway and Gateway API kinds
        against the field lists below; other kinds are left to kubernetes-validate

Exit status 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tollgate"

# kind -> module of its model (generated from the project's CRDs: pinned in requirements.txt).
MODELS = {
    ("extensions.istio.io/v1alpha1", "WasmPlugin"): "cloudcoil.models.istio.extensions.v1alpha1",
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): "cloudcoil.models.istio.networking.v1alpha3",
    ("networking.istio.io/v1", "Gateway"): "cloudcoil.models.istio.networking.v1",
    ("networking.istio.io/v1", "VirtualService"): "cloudcoil.models.istio.networking.v1",
    ("networking.istio.io/v1", "ServiceEntry"): "cloudcoil.models.istio.networking.v1",
    ("networking.istio.io/v1", "DestinationRule"): "cloudcoil.models.istio.networking.v1",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "cloudcoil.models.prometheus_operator.v1",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "cloudcoil.models.prometheus_operator.v1",
}

# No Python models exist for Envoy Gateway or the Gateway API: these trees list the fields
# Tollgate uses, as the API types define them (gateway.envoyproxy.io/v1alpha1: wasm_types.go,
# envoyproxy_types.go, backend_types.go; gateway.networking.k8s.io). A dict is an object with
# exactly those keys allowed, [x] a list of x, a tuple an enum, ANY any value.
ANY = object()
META = {"name": ANY, "namespace": ANY, "labels": ANY, "annotations": ANY}
REF = {"group": ANY, "kind": ANY, "name": ANY, "namespace": ANY, "sectionName": ANY, "port": ANY}
STRUCTURES = {
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): {"spec": {
        "targetRefs": [REF],
        "wasm": [{
            "name": ANY, "rootID": ANY, "failOpen": (True, False), "config": ANY,
            "env": {"hostKeys": [ANY]},
            "code": {"type": ("HTTP", "Image"), "pullPolicy": ("IfNotPresent", "Always"),
                     "http": {"url": ANY, "sha256": ANY},
                     "image": {"url": ANY, "sha256": ANY, "pullSecretRef": REF}},
        }],
    }},
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): {"spec": {
        # envoyproxy_types.go ProxyBootstrap (Merge: protobuf merge into Envoy Gateway's bootstrap)
        "bootstrap": {"type": ("Merge", "Replace", "JSONPatch"), "value": ANY, "jsonPatches": ANY},
        "provider": {
            "type": ("Kubernetes",),
            "kubernetes": {"envoyDeployment": {"replicas": ANY, "container": {
                "env": ANY, "resources": ANY, "securityContext": ANY, "image": ANY}}},
        },
        # envoyproxy_accesslogging_types.go
        "telemetry": {"accessLog": {"disable": (True, False), "settings": [{
            "format": {"type": ("Text", "JSON"), "text": ANY, "json": ANY},
            "matches": [ANY], "type": ("Listener", "Route"),
            "sinks": [{"type": ("ALS", "File", "OpenTelemetry"), "file": {"path": ANY}}],
        }]}},
    }},
    # clienttrafficpolicy_types.go, timeout_types.go, connection_types.go, pathsettings_types.go,
    # shared_types.go (v1.6: no requestHeadersReceivedTimeout yet)
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): {"spec": {
        "targetRefs": [REF],
        "headers": {"withUnderscoresAction": ("Allow", "RejectRequest", "DropHeader"),
                    "requestID": ("PreserveOrGenerate", "Preserve", "Generate", "Disable"),
                    "preserveXRequestID": (True, False), "enableEnvoyHeaders": (True, False)},
        "path": {"escapedSlashesAction": ("KeepUnchanged", "RejectRequest", "UnescapeAndForward", "UnescapeAndRedirect"),
                 "disableMergeSlashes": (True, False)},
        "timeout": {"tcp": {"idleTimeout": ANY},
                    "http": {"requestReceivedTimeout": ANY, "idleTimeout": ANY, "streamIdleTimeout": ANY}},
        "connection": {"connectionLimit": {"value": ANY, "closeDelay": ANY}, "bufferLimit": ANY,
                       "socketBufferLimit": ANY},
        "http2": {"maxConcurrentStreams": ANY, "initialStreamWindowSize": ANY, "initialConnectionWindowSize": ANY},
        "clientIPDetection": {"xForwardedFor": {"numTrustedHops": ANY}},
    }},
    ("gateway.envoyproxy.io/v1alpha1", "Backend"): {"spec": {
        "endpoints": [{"fqdn": {"hostname": ANY, "port": ANY}, "ip": {"address": ANY, "port": ANY}}]}},
    ("gateway.networking.k8s.io/v1", "Gateway"): {"spec": {
        "gatewayClassName": ANY,
        "infrastructure": {"parametersRef": REF, "labels": ANY, "annotations": ANY},
        "listeners": [{"name": ANY, "protocol": ("HTTP", "HTTPS"), "port": ANY, "hostname": ANY, "tls": ANY}],
    }},
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {"spec": {
        "parentRefs": [REF], "hostnames": ANY,
        "rules": [{"matches": ANY, "backendRefs": [REF], "timeouts": {"request": ANY, "backendRequest": ANY},
                   "filters": [{"type": ("URLRewrite", "RequestHeaderModifier"),
                                "urlRewrite": {"hostname": ANY, "path": ANY},
                                "requestHeaderModifier": ANY}]}],
    }},
    ("gateway.networking.k8s.io/v1alpha3", "BackendTLSPolicy"): {"spec": {
        "targetRefs": [REF],
        "validation": {"wellKnownCACertificates": ("System",), "hostname": ANY, "caCertificateRefs": [REF]},
    }},
}


def _structure(value, shape, path: str) -> list[str]:
    if shape is ANY:
        return []
    if isinstance(shape, tuple):
        return [] if value in shape else [f"{path}: {value!r} is not one of {list(shape)}"]
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in _structure(v, shape[0], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return [f"{path}: expected an object"]
    errors = [f"{path}.{k}: unknown field" for k in value if k not in shape]
    return errors + [e for k, v in value.items() if k in shape for e in _structure(v, shape[k], f"{path}.{k}")]


def check_resource(doc: dict) -> tuple[bool, list[str]]:
    """(whether this kind was checked here, problems found)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    where = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
    if key in MODELS:
        model = getattr(importlib.import_module(MODELS[key]), key[1])
        try:
            parsed = model.model_validate(doc)
        except Exception as e:  # pydantic's ValidationError names every bad field
            return True, [f"{where}: {e}"]
        # The models drop unknown fields silently: a round trip that loses something is a typo.
        back = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        if back != doc:
            return True, [f"{where}: fields the schema does not know: {_diff(doc, back)}"]
        return True, []
    if key in STRUCTURES:
        shape = {"apiVersion": ANY, "kind": ANY, "metadata": META, **STRUCTURES[key]}
        return True, [f"{where}: {e}" for e in _structure(doc, shape, "")]
    return False, []


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a for p in (_diff(a[k], b[k], f"{path}.{k}") if k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def crds(paths: list[str]) -> int:
    problems, checked = [], 0
    for path in paths:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if not doc:
                continue
            done, errs = check_resource(doc)
            checked += done
            problems += [f"{path}: {e}" for e in errs]
    for p in problems:
        print(p)
    print(f"{checked} custom resources checked, {len(problems)} problems")
    return 1 if problems else 0


def helm(values: dict, output: str, name: str = "tollgate", namespace: str = "tollgate") -> int:
    import helm_python

    report = helm_python.lint(str(CHART), values, strict=True, namespace=namespace)
    # Severity 1 is "info" (e.g. "icon is recommended"); warnings fail in strict mode.
    bad = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    for m in bad:
        print(f"helm lint: {m.get('path', '')}: {m['error']}")
    if bad:
        return 1
    chart = helm_python.Chart.load(str(CHART))
    chart.validate_schema(values)
    rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = [text.strip() for _, text in sorted(rendered.items()) if text.strip() and not _.endswith("NOTES.txt")]
    pathlib.Path(output).write_text("\n---\n".join(docs) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("helm")
    h.add_argument("--values", help="JSON file of values overriding values.yaml")
    h.add_argument("-o", "--output", required=True)
    c = sub.add_parser("crds")
    c.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    if a.command == "crds":
        return crds(a.files)
    values = json.loads(pathlib.Path(a.values).read_text()) if a.values else {}
    try:
        return helm(values, a.output)
    except Exception as e:  # the SDK's errors carry Helm's message (schema, template failure)
        print(f"helm: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

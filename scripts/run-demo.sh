#!/usr/bin/env bash
# Starts the demo gateway: the mock provider (unless a real provider is configured) and Envoy
# running tollgate.wasm with envoy/demo.yaml. Ctrl-C stops everything. Called by `make run`.
#
#   TOLLGATE_PROVIDER_URL   https://host[/v1] of a real OpenAI-compatible provider (default: the mock)
#   TOLLGATE_PROVIDER_KEY   that provider's API key (required with TOLLGATE_PROVIDER_URL)
#   TOLLGATE_LISTEN         gateway address (default 127.0.0.1:10000)
#   TOLLGATE_ADMIN          Envoy admin address (default 127.0.0.1:9901)
#   TOLLGATE_MOCK_LISTEN    mock provider address (default 127.0.0.1:10080)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
LISTEN=${TOLLGATE_LISTEN:-127.0.0.1:10000}
ADMIN=${TOLLGATE_ADMIN:-127.0.0.1:9901}
MOCK_LISTEN=${TOLLGATE_MOCK_LISTEN:-127.0.0.1:10080}
RUN_DIR=.run
mkdir -p "$RUN_DIR"
ENVOY=$("$PYTHON" -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo; echo "stopping"; exit 0' INT TERM

if [[ -n "${TOLLGATE_PROVIDER_URL:-}" ]]; then
  : "${TOLLGATE_PROVIDER_KEY:?set TOLLGATE_PROVIDER_KEY to the API key of $TOLLGATE_PROVIDER_URL}"
  provider_url=$TOLLGATE_PROVIDER_URL
  provider_desc="$TOLLGATE_PROVIDER_URL"
else
  export TOLLGATE_PROVIDER_KEY=${TOLLGATE_PROVIDER_KEY:-sk-mock-provider-key}
  target/release/mock-provider --listen "$MOCK_LISTEN" --name mock \
    --expect-key "$TOLLGATE_PROVIDER_KEY" > "$RUN_DIR/mock.log" 2>&1 &
  pids+=($!)
  provider_url="http://$MOCK_LISTEN"
  provider_desc="mock provider on $MOCK_LISTEN (set TOLLGATE_PROVIDER_URL and TOLLGATE_PROVIDER_KEY for a real one)"
fi

"$PYTHON" scripts/render_envoy.py --listen "$LISTEN" --admin "$ADMIN" \
  --provider-url "$provider_url" -o "$RUN_DIR/envoy.yaml"

"$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --disable-hot-restart \
  --log-level warning --component-log-level wasm:info &
pids+=($!)

"$PYTHON" - "$ADMIN" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/ready", timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("Envoy did not become ready within 30 s; see the log above")
PY

cat <<MSG

Tollgate is running on http://$LISTEN  (provider: $provider_desc)
  demo client key:  sk-tollgate-demo  (60 requests per minute)

  curl -s http://$LISTEN/v1/chat/completions \\
    -H 'authorization: Bearer sk-tollgate-demo' -H 'content-type: application/json' \\
    -d '{"model":"gpt-4.1","messages":[{"role":"user","content":"Hello!"}]}'

  metrics:  curl -s http://$ADMIN/stats/prometheus | grep tollgate_
  Ctrl-C stops everything.

MSG
wait -n

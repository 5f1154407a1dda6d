#!/usr/bin/env bash
# Starts the demo gateway: the mock provider (unless a real provider is configured) and Envoy
# running tollgate.wasm with envoy/demo.yaml. Ctrl-C stops everything. Called by `make run`.
#
#   TOLLGATE_PROVIDER_URL   https://host[/v1] of a real OpenAI-compatible provider (default: the mock)
#   TOLLGATE_PROVIDER_KEY   that provider's API key (required with TOLLGATE_PROVIDER_URL)
#   TOLLGATE_LISTEN         gateway address (default 127.0.0.1:10000)
#   TOLLGATE_ADMIN          Envoy admin address (default 127.0.0.1:9901)
#   TOLLGATE_MOCK_LISTEN    mock "relay" provider address (default 127.0.0.1:10080)
#   TOLLGATE_BACKUP_LISTEN  mock "backup" provider address (default 127.0.0.1:10081)
#   TOLLGATE_BACKUP_KEY     the backup mock's key (default sk-mock-backup-key)
#   LIMITER                 local (default) or redis: Redis + Webdis on loopback, shared counters
#   TOLLGATE_REDIS_PORT     Redis port with LIMITER=redis (default 16379)
#   TOLLGATE_WEBDIS_PORT    Webdis port with LIMITER=redis (default 7379)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
LISTEN=${TOLLGATE_LISTEN:-127.0.0.1:10000}
ADMIN=${TOLLGATE_ADMIN:-127.0.0.1:9901}
MOCK_LISTEN=${TOLLGATE_MOCK_LISTEN:-127.0.0.1:10080}
BACKUP_LISTEN=${TOLLGATE_BACKUP_LISTEN:-127.0.0.1:10081}
export TOLLGATE_BACKUP_KEY=${TOLLGATE_BACKUP_KEY:-sk-mock-backup-key}
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
# The second provider (fallback for gpt-4.1, and the one behind the alias "fast") is a mock.
target/release/mock-provider --listen "$BACKUP_LISTEN" --name backup \
  --expect-key "$TOLLGATE_BACKUP_KEY" > "$RUN_DIR/mock-backup.log" 2>&1 &
pids+=($!)

limiter_args=()
limiter_desc="local (Envoy shared data)"
if [[ "${LIMITER:-local}" == redis ]]; then
  redis_port=${TOLLGATE_REDIS_PORT:-16379}
  webdis_port=${TOLLGATE_WEBDIS_PORT:-7379}
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$RUN_DIR" --logfile redis.log &
  pids+=($!)
  cat > "$RUN_DIR/webdis.json" <<JSON
{"redis_host": "127.0.0.1", "redis_port": $redis_port, "http_host": "127.0.0.1", "http_port": $webdis_port,
 "threads": 2, "pool_size": 8, "daemonize": false, "database": 0,
 "acl": [{"disabled": ["*"]}, {"enabled": ["EVAL"]}],
 "verbosity": 3, "logfile": "$PWD/$RUN_DIR/webdis.log"}
JSON
  webdis "$RUN_DIR/webdis.json" &
  pids+=($!)
  limiter_args=(--limiter redis --webdis "127.0.0.1:$webdis_port")
  limiter_desc="redis (Redis on 127.0.0.1:$redis_port via Webdis on 127.0.0.1:$webdis_port)"
elif [[ "${LIMITER:-local}" != local ]]; then
  echo "LIMITER must be local or redis, not ${LIMITER}" >&2
  exit 2
fi

"$PYTHON" scripts/render_envoy.py --listen "$LISTEN" --admin "$ADMIN" \
  --provider "backup=http://$BACKUP_LISTEN" --provider "claude=$provider_url" --provider-url "$provider_url" \
  "${limiter_args[@]}" --reload-dir "$RUN_DIR/filter" -o "$RUN_DIR/envoy.yaml"

"$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --disable-hot-restart \
  --log-level warning --component-log-level wasm:info --file-flush-interval-msec 1000 &
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
  limiter:          $limiter_desc
  demo client key:  sk-tollgate-demo  (60 requests and 20000 tokens per minute)

  curl -s http://$LISTEN/v1/chat/completions \\
    -H 'authorization: Bearer sk-tollgate-demo' -H 'content-type: application/json' \\
    -d '{"model":"gpt-4.1","messages":[{"role":"user","content":"Hello!"}]}'

  models:   gpt-4.1 (relay, falls back to backup), gpt-4.1-* (relay),
            fast (an alias: backup receives "deepseek-chat"),
            claude-* (Anthropic's Messages API of the same provider: POST /v1/messages
            with 'x-api-key: sk-tollgate-demo'; docs/clients.md)
            curl -s http://$LISTEN/v1/models -H 'authorization: Bearer sk-tollgate-demo'
  metrics:  curl -s http://$ADMIN/stats/prometheus | grep tollgate_
  keys:     target/release/tollgate keys add $RUN_DIR/filter/tollgate.json --name NAME
            (applies within a second, no restart; docs/keys.md)
  Ctrl-C stops everything.

MSG
wait -n

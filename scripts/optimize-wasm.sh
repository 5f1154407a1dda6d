#!/usr/bin/env bash
# Optimises the release module with Binaryen's wasm-opt (-O3 without inlining: it takes ~11% off
# the size), from cargo's own output (target/.../deps/tollgate.wasm, which cargo keeps) to the
# module Envoy loads. Runs once per cargo output and set of flags: what it optimised is recorded,
# so a second `make build` neither optimises twice nor gives another module, and a change of
# flags here applies on the next `make build`.
set -euo pipefail
wasm=$1
stamp="$wasm.optimized-sha256"
command -v wasm-opt >/dev/null || {
  echo "wasm-opt not found: run 'make deps' (Debian package binaryen)" >&2
  exit 1
}
# The features rustc's wasm32-wasip1 target emits (Rust 1.86: bulk memory, sign extension,
# mutable globals, non-trapping float-to-int, multi-value, reference types).
# No inlining (-aimfs 0 -fimfs 0 -ocimfs 0): LLVM has inlined what pays already. Binaryen's
# inlining on top made the functions that V8 compiles (TurboFan only: proxy-wasm-cpp-host turns
# Liftoff off) bigger, and Envoy keeps the allocator memory of that compile for its life: at
# 1,000 clients +39.6 MiB over the empty filter with the inlining, +31.0 MiB without, for a
# module of the same size and no slower in `make bench` (docs/scale.md). `bench/wasm_size.py
# --compile-memory` shows what each function's compile costs.
flags=(-O3 -aimfs 0 -fimfs 0 -ocimfs 0 --enable-bulk-memory --enable-sign-ext --enable-mutable-globals
  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types)
src="$(dirname "$wasm")/deps/$(basename "$wasm")"
if [[ -f "$src" ]]; then
  key="$(sha256sum "$src" | cut -d' ' -f1) ${flags[*]}"
  [[ -f "$wasm" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && exit 0
else
  # No cargo output beside it (a module copied elsewhere): optimise in place, once.
  src=$wasm
  [[ -f "$stamp" && "$(cat "$stamp")" == "$(sha256sum "$wasm" | cut -d' ' -f1) optimized" ]] && exit 0
  key=""
fi
wasm-opt "${flags[@]}" "$src" -o "$wasm.tmp"
mv "$wasm.tmp" "$wasm"
echo "${key:-$(sha256sum "$wasm" | cut -d' ' -f1) optimized}" > "$stamp"

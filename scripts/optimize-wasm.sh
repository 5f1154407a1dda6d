#!/usr/bin/env bash
# Optimises the release module with Binaryen's wasm-opt (-O3 without inlining: it takes ~11% off
# the size), from cargo's own output (target/.../deps/tollgate.wasm, which cargo keeps) to the
# module Envoy loads. wasm-opt runs once per cargo output and set of flags: its output is kept
# beside the module (tollgate.wasm.optimized) with what it was made from, so a second `make build`
# does not optimise again but still ends with the optimised module. (Cargo may hard-link its
# output to tollgate.wasm again on a later build, even when nothing changed: the module is
# therefore replaced, never written in place, which would write through the link into cargo's
# own copy.) A change of flags here applies on the next `make build`.
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
  out="$wasm.optimized"
  if ! [[ -f "$out" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    wasm-opt "${flags[@]}" "$src" -o "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$key" > "$stamp"
  fi
  if ! cmp -s "$out" "$wasm"; then
    cp "$out" "$wasm.tmp"
    mv "$wasm.tmp" "$wasm"
  fi
elif ! [[ -f "$stamp" && "$(cat "$stamp")" == "$(sha256sum "$wasm" | cut -d' ' -f1) optimized" ]]; then
  # No cargo output beside it (a module copied elsewhere): optimise in place, once.
  wasm-opt "${flags[@]}" "$wasm" -o "$wasm.tmp"
  mv "$wasm.tmp" "$wasm"
  echo "$(sha256sum "$wasm" | cut -d' ' -f1) optimized" > "$stamp"
fi

#!/usr/bin/env bash
# Bounded fuzz run of every target in fuzz/ (see docs/fuzzing.md), one after the other, one
# libFuzzer process at a time; fails on any crash, assertion or timeout.
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   space-separated targets (default: all of `cargo fuzz list`)
#   FUZZ_WORK      working directory (default target/fuzz-smoke): corpus/<t>, artifacts/<t>, logs
#   FUZZ_KEEP_CORPUS=1  keep corpus/<t> from earlier runs (default: start from the seeds only)
#   FUZZ_ARGS      extra libFuzzer options
#   FUZZ_TOOLCHAIN rustup toolchain to build with (default: nightly if installed, else the default)
#   FUZZ_SANITIZER cargo fuzz --sanitizer (default none; address needs nightly or RUSTC_BOOTSTRAP)
#
# Each target starts from its committed seeds (fuzz/seeds/<t>, read-only) and grows a scratch
# corpus under FUZZ_WORK. Installs cargo-fuzz (pinned) when it is missing. Without a sanitizer,
# cargo fuzz passes only stable -C flags to rustc, so a stable toolchain builds the targets as
# is; with one (-Zsanitizer=...), a stable toolchain gets RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_WORK=${FUZZ_WORK:-target/fuzz-smoke}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}
BUILD_DIR=target/fuzz

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

toolchain=${FUZZ_TOOLCHAIN:-}
if [[ -z "$toolchain" ]] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=nightly
fi
fuzz=(cargo ${toolchain:+"+$toolchain"} fuzz)
rustc_version=$(rustc ${toolchain:+"+$toolchain"} --version)
if [[ "$FUZZ_SANITIZER" != none && "$rustc_version" != *nightly* ]]; then
  export RUSTC_BOOTSTRAP=1
fi
echo "building the fuzz targets with $rustc_version, sanitizer $FUZZ_SANITIZER${RUSTC_BOOTSTRAP:+, RUSTC_BOOTSTRAP=1}"

# The core has no unsafe code: AddressSanitizer would only slow the runs down. Debug assertions
# and overflow checks stay on (cargo fuzz's default), so an overflow is a finding too.
"${fuzz[@]}" build --sanitizer "$FUZZ_SANITIZER" --target-dir "$BUILD_DIR"
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$BUILD_DIR/$host/release"

targets=${FUZZ_TARGETS:-$("${fuzz[@]}" list)}
mkdir -p "$FUZZ_WORK/logs"
summary=()
failed=()
for t in $targets; do
  corpus="$FUZZ_WORK/corpus/$t"
  artifacts="$FUZZ_WORK/artifacts/$t"
  log="$FUZZ_WORK/logs/$t.log"
  [[ "${FUZZ_KEEP_CORPUS:-0}" == 1 ]] || rm -rf "$corpus"
  rm -rf "$artifacts"
  mkdir -p "$corpus" "$artifacts"
  dict=()
  [[ -f "fuzz/dict/$t.dict" ]] && dict=("-dict=fuzz/dict/$t.dict")
  echo "fuzz $t: ${FUZZ_SECONDS}s"
  # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
  if "$bin_dir/$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=1024 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" ${FUZZ_ARGS:-} \
      "$corpus" "fuzz/seeds/$t" >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | cut -d' ' -f2)
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' <<<"$last" | cut -d' ' -f2)
  summary+=("$(printf '%-13s %-7s %10s %8s %6s %6s %12s %7s' "$t" "$status" "${runs:-?}" \
    "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}")")
  if [[ $status == FAILED ]]; then
    echo "--- $t failed; the end of $log:"
    tail -n 40 "$log"
    for a in "$artifacts"/*; do
      [[ -e "$a" ]] && echo "--- reproduce: $bin_dir/$t $a"
    done
  fi
done

printf '%-13s %-7s %10s %8s %6s %6s %12s %7s\n' target status execs exec/s cov ft corpus "rss MB"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz findings in: ${failed[*]} (inputs in $FUZZ_WORK/artifacts/)"
  exit 1
fi

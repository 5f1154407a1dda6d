#!/usr/bin/env bash
# Runs every target in fuzz/ (see docs/fuzzing.md), one after the other, one libFuzzer process
# at a time; fails on any crash, assertion or timeout. Two modes:
#
#   smoke (default; `make fuzz-smoke`, part of `make test`): deterministic. Each target replays
#     every committed input (fuzz/seeds/<t>, and fuzz/corpus/<t> when there is one) and then
#     runs a fixed number of executions from a fixed seed (-seed=, -runs=; nothing timed), so the
#     same commit gives the same executions, coverage and outcome on every machine and run.
#   long (`make fuzz-long`): exploration. A random seed, FUZZ_SECONDS per target, and a corpus
#     kept in FUZZ_WORK between runs; a finding there is minimised, fixed and committed as a seed.
#
#   FUZZ_MODE      smoke | long (default smoke)
#   FUZZ_SEED      smoke: libFuzzer's -seed (default 1)
#   FUZZ_RUNS      smoke: -runs for every target (default: the per-target table below)
#   FUZZ_SECONDS   long: seconds per target (default 300)
#   FUZZ_TARGETS   space-separated targets (default: all of `cargo fuzz list`)
#   FUZZ_WORK      working directory: corpus/<t>, artifacts/<t>, logs
#                  (default target/fuzz-smoke, or target/fuzz-long)
#   FUZZ_ARGS      extra libFuzzer options
#   FUZZ_TOOLCHAIN rustup toolchain to build with (default: the default one)
#   FUZZ_SANITIZER cargo fuzz --sanitizer (default none; address needs nightly or RUSTC_BOOTSTRAP)
#
# Installs cargo-fuzz (pinned) when it is missing. Without a sanitizer, cargo fuzz passes only
# stable -C flags to rustc, so a stable toolchain builds the targets as is; with one
# (-Zsanitizer=...), a stable toolchain gets RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_MODE=${FUZZ_MODE:-smoke}
FUZZ_SEED=${FUZZ_SEED:-1}
FUZZ_SECONDS=${FUZZ_SECONDS:-300}
FUZZ_WORK=${FUZZ_WORK:-target/fuzz-$FUZZ_MODE}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}
BUILD_DIR=target/fuzz

# Smoke executions per target (seed replays included): about 15-20 s each on the 2-core VM. Changing a number changes what the smoke run explores: the
# same commit still gives the same result everywhere.
smoke_runs() {
  case $1 in
    body) echo 2000000 ;;
    config) echo 1000000 ;;
    glob) echo 4000000 ;;
    headers) echo 1300000 ;;
    webdis_reply) echo 2000000 ;;
    sse) echo 40000 ;;
    sse_bound) echo 700 ;;
    *) echo 100000 ;;
  esac
}

case $FUZZ_MODE in
  smoke | long) ;;
  *)
    echo "FUZZ_MODE must be smoke or long, not $FUZZ_MODE" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# The toolchain `make` uses everywhere else, not one the machine happens to have: another
# compiler builds other binaries, whose coverage differs (same executions, other corpus).
toolchain=${FUZZ_TOOLCHAIN:-}
fuzz=(cargo ${toolchain:+"+$toolchain"} fuzz)
rustc_version=$(rustc ${toolchain:+"+$toolchain"} --version)
if [[ "$FUZZ_SANITIZER" != none && "$rustc_version" != *nightly* ]]; then
  export RUSTC_BOOTSTRAP=1 # -Zsanitizer=...
fi
echo "building the fuzz targets with $rustc_version, sanitizer $FUZZ_SANITIZER${RUSTC_BOOTSTRAP:+, RUSTC_BOOTSTRAP=1}"

# The core has no unsafe code: AddressSanitizer would only slow the runs down. Debug assertions
# and overflow checks stay on (cargo fuzz's default), so an overflow is a finding too.
# No stack-depth coverage (cargo fuzz turns it on for Linux): frames that align the stack to
# 32 or 64 bytes make the depth depend on where ASLR put the stack, so the same input gave
# other features from run to run, and the same seed explored differently. The core has no
# unbounded recursion (serde_json stops at 128 levels) for it to find.
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cllvm-args=-sanitizer-coverage-stack-depth=false"
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
  rm -rf "$artifacts"
  mkdir -p "$artifacts"
  committed=("fuzz/seeds/$t")
  [[ -d "fuzz/corpus/$t" ]] && committed+=("fuzz/corpus/$t")
  # -timeout: a hang is a finding (10 s is far beyond any input's time, even on a slow
  # machine); -reload=0: no timed rereading of the corpus directory.
  opts=(-timeout=10 -rss_limit_mb=1024 -reload=0 -print_final_stats=1
    -artifact_prefix="$artifacts/")
  [[ -f "fuzz/dict/$t.dict" ]] && opts+=("-dict=fuzz/dict/$t.dict")
  if [[ $FUZZ_MODE == smoke ]]; then
    # libFuzzer shuffles its inputs with the seed, then stable-sorts them by size: listed from a
    # directory, equal-sized ones would come in the file system's order, which differs between
    # machines. So the committed inputs go in as a list in a fixed order, and new inputs go to
    # an empty scratch directory, which libFuzzer never reads back. -use_cmp=0: libFuzzer
    # feeds the operands of the target's comparisons back into its mutations, and some of them
    # are addresses (the standard library's debug checks of unsafe calls compare pointers),
    # which ASLR changes on every run: with them, the same seed explored differently.
    # The process runs in FUZZ_WORK and sees the same relative paths whatever FUZZ_WORK is:
    # their lengths shift the heap, and some coverage depends on how the input is aligned.
    rm -rf "$corpus" "$FUZZ_WORK/inputs/$t"
    mkdir -p "$corpus" "$FUZZ_WORK/inputs/$t" "$FUZZ_WORK/bin"
    for d in "${committed[@]}"; do
      cp -R "$d" "$FUZZ_WORK/inputs/$t/$(basename "$(dirname "$d")")"
    done
    (cd "$FUZZ_WORK" && find "inputs/$t" -type f -size +0 | LC_ALL=C sort | paste -sd, - |
      tr -d '\n' >"logs/$t.inputs")
    ln -sfn "$PWD/$bin_dir/$t" "$FUZZ_WORK/bin/$t"
    runs=${FUZZ_RUNS:-$(smoke_runs "$t")}
    opts=(-timeout=10 -rss_limit_mb=1024 -reload=0 -print_final_stats=1
      -artifact_prefix="artifacts/$t/" -seed="$FUZZ_SEED" -runs="$runs" -use_cmp=0
      -seed_inputs="@logs/$t.inputs")
    if [[ -f "fuzz/dict/$t.dict" ]]; then
      mkdir -p "$FUZZ_WORK/dict"
      cp "fuzz/dict/$t.dict" "$FUZZ_WORK/dict/$t.dict"
      opts+=("-dict=dict/$t.dict")
    fi
    echo "fuzz $t: replay $(find "${committed[@]}" -type f -size +0 | wc -l) inputs, then up to $runs executions in all, seed $FUZZ_SEED"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
    if (cd "$FUZZ_WORK" && exec "bin/$t" "${opts[@]}" ${FUZZ_ARGS:-} "corpus/$t") \
      >"$log" 2>&1; then
      status=ok
    else
      status=FAILED
    fi
  else
    mkdir -p "$corpus"
    opts+=(-max_total_time="$FUZZ_SECONDS")
    echo "fuzz $t: ${FUZZ_SECONDS}s, random seed, corpus $corpus"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
    if "$bin_dir/$t" "${opts[@]}" ${FUZZ_ARGS:-} "$corpus" "${committed[@]}" >"$log" 2>&1; then
      status=ok
    else
      status=FAILED
    fi
  fi
  [[ $status == ok ]] || failed+=("$t")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  seed=$(sed -n 's/^INFO: Seed: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | cut -d' ' -f2)
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' <<<"$last" | cut -d' ' -f2)
  summary+=("$(printf '%-13s %-7s %11s %10s %8s %6s %6s %12s %7s' "$t" "$status" "${seed:-?}" \
    "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}")")
  if [[ $status == FAILED ]]; then
    echo "--- $t failed; the end of $log:"
    tail -n 40 "$log"
    for a in "$artifacts"/*; do
      [[ -e "$a" ]] && echo "--- reproduce: $bin_dir/$t $a"
    done
  fi
done

printf '%-13s %-7s %11s %10s %8s %6s %6s %12s %7s\n' target status seed execs exec/s cov ft \
  corpus "rss MB"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz findings in: ${failed[*]} (inputs in $FUZZ_WORK/artifacts/)"
  exit 1
fi

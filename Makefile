# Tollgate: `make run` starts the demo gateway, `make test` runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
WASM   := target/wasm32-wasip1/release/tollgate.wasm
MOCK   := target/release/mock-provider

.PHONY: help run test build deps system-packages toolchain lint unit e2e clean fuzz-smoke fuzz-long compat

help:
	@echo "make run    build and start the demo gateway (Envoy + Tollgate + mock provider)"
	@echo "            LIMITER=redis: with the cluster-wide limiter (Redis + Webdis on loopback)"
	@echo "make test   install what the tests need and run everything (fmt, clippy, unit, fuzz smoke, end-to-end)"
	@echo "make compat the end-to-end suite on every supported Envoy (1.36-1.40), with a table (docs/compatibility.md)"
	@echo "            COMPAT_VERSIONS=\"1.36.4 1.40.0\": some of them"
	@echo "make fuzz-long   fuzz every parser FUZZ_LONG_SECONDS (300) each (docs/fuzzing.md)"

## Installation of what is missing: the wasm target and lint components, and a venv with Envoy.
toolchain:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

system-packages:
	@bash scripts/install-system-packages.sh

DEPLOY_VENV ?= .venv-deploy

## Offline validators of the deploy artifacts (checkov needs packaging<24, pytest 9 >=24: own venv).
$(DEPLOY_VENV)/.installed: deploy/requirements.txt
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/requirements.txt
	touch $@

deps: system-packages toolchain $(VENV)/.installed $(DEPLOY_VENV)/.installed

build: toolchain
	cargo build --release --target wasm32-wasip1 -p tollgate-filter
	bash scripts/optimize-wasm.sh $(WASM)
	cargo build --release -p tollgate-mock-provider -p tollgate-cli
	@ls -l $(WASM) | awk '{print "tollgate.wasm: " $$5 " bytes"}'

LIMITER ?= local

run: deps build
	PYTHON=$(PYTHON) LIMITER=$(LIMITER) bash scripts/run-demo.sh

## The filter crate is a cdylib of wasm imports: it is linted for its real target and has no
## host tests (its logic lives in tollgate-core). The fuzz targets are a workspace of their own.
lint: toolchain $(VENV)/.installed
	cargo fmt --all -- --check
	cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
	cargo fmt --manifest-path bench/core-profile/Cargo.toml -- --check
	cargo clippy --workspace --exclude tollgate-filter --all-targets -- -D warnings
	cargo clippy -p tollgate-filter --target wasm32-wasip1 -- -D warnings
	cargo clippy --manifest-path fuzz/Cargo.toml --target-dir target/fuzz-clippy --locked -- -D warnings
	# The bench's native harness of the core builds against today's core API (it had rotted once).
	cargo clippy --manifest-path bench/core-profile/Cargo.toml --target-dir target/bench-core-profile --locked -- -D warnings
	python3 scripts/modgraph.py
	$(VENV)/bin/python -m pyflakes $$(git ls-files '*.py')

unit:
	cargo test --workspace --exclude tollgate-filter

e2e: deps build
	cd tests && ../$(PYTHON) -m pytest -q

## The Envoy version matrix (docs/compatibility.md): the suite without the deploy tests, once per
## supported Envoy; the wheels are cached outside the repository (ENVOY_CACHE).
COMPAT_VERSIONS ?=
compat: deps build
	PYTHON=$(PYTHON) bash scripts/compat.sh $(COMPAT_VERSIONS)

## The benchmark's smoke run (about 20 s) checks that `make bench` still works end to end;
## the end-to-end suite runs last, so its summary closes the output.
test: deps lint unit fuzz-smoke build bench-smoke e2e

## Fuzzing (docs/fuzzing.md): every parser on the request path, one libFuzzer process at a
## time. `fuzz-smoke` is deterministic: each target replays its committed inputs, then runs a
## fixed number of executions from seed FUZZ_SEED (1); it fails on any finding. `fuzz-long`
## explores: random seeds, FUZZ_LONG_SECONDS (300) per target, its corpus kept in
## target/fuzz-long/.
FUZZ_SEED ?= 1
FUZZ_LONG_SECONDS ?= 300

fuzz-smoke:
	FUZZ_MODE=smoke FUZZ_SEED=$(FUZZ_SEED) bash scripts/fuzz-smoke.sh

fuzz-long:
	FUZZ_MODE=long FUZZ_SECONDS=$(FUZZ_LONG_SECONDS) bash scripts/fuzz-smoke.sh

clean:
	cargo clean
	rm -rf $(VENV) $(DEPLOY_VENV) .run

## Benchmark (not part of `make test`; see docs/benchmark.md). `make bench` starts every peer on
## loopback, measures, stops everything and writes bench/results/; BENCH_ARGS adds options of
## bench/run.py (e.g. BENCH_ARGS="--repeats 5"). `make bench-smoke` checks it end to end in
## seconds (results in target/bench-smoke/, numbers meaningless).
BENCH_EMPTY_FILTER := cargo build --release --locked --target wasm32-wasip1 \
	--manifest-path bench/empty-filter/Cargo.toml --target-dir target/bench-empty-filter

.PHONY: bench bench-smoke soak

## Soak (not part of `make test`; see docs/benchmark.md#soak): 120 s at 64 connections against
## Envoy with two workers, then exact limiter accounting and Envoy's memory over time. SOAK_ARGS
## adds options of bench/soak.py, e.g. SOAK_ARGS="--limiter redis".
soak: deps build
	$(PYTHON) bench/soak.py $(SOAK_ARGS)

bench: deps build
	$(BENCH_EMPTY_FILTER)
	BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" $(PYTHON) bench/run.py $(BENCH_ARGS)

bench-smoke: deps build
	$(BENCH_EMPTY_FILTER)
	$(PYTHON) bench/run.py --smoke $(BENCH_ARGS)

## Scale benchmark (not part of `make test`; see docs/scale.md): 1,000, 10,000 and 100,000
## clients: Envoy's time to ready and memory over the empty-filter floor, `tollgate config check`
## time, and the request path at each size, in one run; results in bench/results/scale-*.
## SCALE_ARGS adds options of bench/scale.py (e.g. SCALE_ARGS="--sizes 1000,100000 --starts 1").
.PHONY: bench-scale
bench-scale: deps build
	$(BENCH_EMPTY_FILTER)
	BENCH_COMMAND="make bench-scale$(if $(SCALE_ARGS), SCALE_ARGS='$(SCALE_ARGS)')" $(PYTHON) bench/scale.py $(SCALE_ARGS)

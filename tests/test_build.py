"""`make build`'s last step, scripts/optimize-wasm.sh: the module Envoy loads is wasm-opt's output
on every build, also after cargo has linked its own (unoptimised) output over it again, and
cargo's copy is never written through that link."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess

import pytest

from harness import ROOT, WASM

SCRIPT = ROOT / "scripts" / "optimize-wasm.sh"
CARGO_OUTPUT = WASM.parent / "deps" / WASM.name


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cargo_links(release: pathlib.Path) -> None:
    """What cargo does on a build: its output hard-linked to the module's path."""
    module = release / "tollgate.wasm"
    module.unlink(missing_ok=True)
    os.link(release / "deps" / "tollgate.wasm", module)


def optimize(release: pathlib.Path) -> None:
    subprocess.run(["bash", str(SCRIPT), str(release / "tollgate.wasm")], check=True, timeout=300)


@pytest.mark.skipif(not CARGO_OUTPUT.is_file() or shutil.which("wasm-opt") is None,
                    reason="needs `make build` (cargo's output) and wasm-opt (`make deps`)")
def test_every_build_ends_with_the_optimised_module(tmp_path):
    release = tmp_path / "release"
    (release / "deps").mkdir(parents=True)
    own = release / "deps" / "tollgate.wasm"
    shutil.copyfile(CARGO_OUTPUT, own)
    cargo = digest(own)
    module, kept = release / "tollgate.wasm", release / "tollgate.wasm.optimized"

    cargo_links(release)
    optimize(release)
    first = digest(module)
    assert first != cargo, "the module is cargo's output, not wasm-opt's"
    assert digest(own) == cargo, "cargo's own copy was written"
    assert module.stat().st_ino != own.stat().st_ino

    # A second build: cargo links its output over the module again, nothing else changed.
    cargo_links(release)
    optimize(release)
    assert digest(module) == first, "a second build left cargo's unoptimised module in place"
    assert digest(own) == cargo
    # wasm-opt ran once: its output is kept, and the second build put it back.
    assert digest(kept) == first
    optimized_at = kept.stat().st_mtime_ns
    cargo_links(release)
    optimize(release)
    assert digest(module) == first
    assert kept.stat().st_mtime_ns == optimized_at, "wasm-opt ran again for the same input"

    # A build where cargo did not link again: the module stays as it is.
    optimize(release)
    assert digest(module) == first

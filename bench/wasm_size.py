#!/usr/bin/env python3
"""Where the bytes of a wasm module go: section sizes, and code size by crate and by function;
with --compile-memory, what compiling each function costs V8's optimizing compiler.

    python3 bench/wasm_size.py MODULE.wasm [--top 25] [--compile-memory]

Function names come from the module's `name` section, which the release profile strips; build a
copy that keeps it (same code, names added) with

    CARGO_PROFILE_RELEASE_STRIP=false cargo build --release --target wasm32-wasip1 \\
        -p tollgate-filter --target-dir target/bench-size-names

--compile-memory compiles the module in Node.js's V8 as Envoy's V8 does (TurboFan only, every
function up front: proxy-wasm-cpp-host turns Liftoff off) and lists the functions whose compile
needs the most memory, from V8's own trace (`--trace-wasm-compilation-times`: peak zone and total
bytes per function). Node's V8 is not Envoy's, so the figures are relative; Envoy keeps the
allocator memory of that compile for the life of the process (docs/scale.md). Needs `node`.

Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys

SECTIONS = {0: "custom", 1: "type", 2: "import", 3: "function", 4: "table", 5: "memory",
            6: "global", 7: "export", 8: "start", 9: "element", 10: "code", 11: "data",
            12: "data count"}


def leb(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def parse(buf: bytes):
    if buf[:4] != b"\0asm":
        raise ValueError("not a wasm module")
    i = 8
    sections = []
    imported_funcs = 0
    bodies: list[int] = []
    names: dict[int, str] = {}
    while i < len(buf):
        sid = buf[i]
        size, j = leb(buf, i + 1)
        end = j + size
        label = SECTIONS.get(sid, f"id {sid}")
        if sid == 0:
            nlen, k = leb(buf, j)
            cname = buf[k:k + nlen].decode(errors="replace")
            label = f"custom {cname!r}"
            if cname == "name":
                names = parse_names(buf, k + nlen, end)
        elif sid == 2:
            count, k = leb(buf, j)
            for _ in range(count):
                for _ in range(2):  # module, field
                    n, k = leb(buf, k)
                    k += n
                kind = buf[k]
                k += 1
                if kind == 0:
                    imported_funcs += 1
                    _, k = leb(buf, k)
                elif kind == 1:
                    k += 1
                    flags, k = leb(buf, k)
                    _, k = leb(buf, k)
                    if flags & 1:
                        _, k = leb(buf, k)
                elif kind == 2:
                    flags, k = leb(buf, k)
                    _, k = leb(buf, k)
                    if flags & 1:
                        _, k = leb(buf, k)
                elif kind == 3:
                    k += 2
        elif sid == 10:
            count, k = leb(buf, j)
            for _ in range(count):
                n, k2 = leb(buf, k)
                bodies.append(k2 - k + n)
                k = k2 + n
        sections.append((label, end - i))
        i = end
    funcs = [(names.get(imported_funcs + idx, f"func[{imported_funcs + idx}]"), size)
             for idx, size in enumerate(bodies)]
    return sections, funcs, imported_funcs


def parse_names(buf: bytes, i: int, end: int) -> dict[int, str]:
    names = {}
    while i < end:
        sub = buf[i]
        size, j = leb(buf, i + 1)
        if sub == 1:
            count, k = leb(buf, j)
            for _ in range(count):
                idx, k = leb(buf, k)
                n, k = leb(buf, k)
                names[idx] = buf[k:k + n].decode(errors="replace")
                k += n
        i = j + size
    return names


_TRACE = re.compile(r"#(\d+) using TurboFan, took (\d+) ms and (\d+) / (\d+) max/total bytes")


def compile_memory(module: str, funcs: list[tuple[str, int]], imported: int, top: int) -> int:
    """Prints the functions whose TurboFan compile takes the most memory (Node.js's V8, one
    compile task so that each function's figures are its own)."""
    node = shutil.which("node")
    if node is None:
        print("--compile-memory needs node", file=sys.stderr)
        return 2
    load = "new WebAssembly.Module(require('fs').readFileSync(process.argv[1]))"
    done = subprocess.run([node, "--no-liftoff", "--no-wasm-lazy-compilation",
                           "--wasm-num-compilation-tasks=0", "--trace-wasm-compilation-times",
                           "-e", load, module], capture_output=True, text=True, timeout=600)
    rows = []
    for m in _TRACE.finditer(done.stdout + done.stderr):
        index, ms, peak, total = map(int, m.groups())
        name, size = funcs[index - imported] if 0 <= index - imported < len(funcs) else (f"func[{index}]", 0)
        rows.append((total, peak, ms, size, name))
    if done.returncode != 0 or not rows:
        print(f"node could not compile {module}: {done.stderr.strip()[:300]}", file=sys.stderr)
        return 2
    rows.sort(reverse=True)
    print(f"\nTurboFan compile memory (Node.js {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{len(rows)} functions, {sum(r[0] for r in rows) / 2**20:.0f} MiB allocated in all):")
    print(f"  {'total MiB':>9}  {'peak MiB':>8}  {'ms':>4}  {'bytes':>7}  function")
    for total, peak, ms, size, name in rows[:top]:
        print(f"  {total / 2**20:9.1f}  {peak / 2**20:8.1f}  {ms:4d}  {size:7,}  {name[:120]}")
    return 0


def crate_of(symbol: str) -> str:
    """The crate a Rust symbol belongs to, roughly: for a trait impl, the crate of the type."""
    if symbol.startswith("_R"):  # v0 mangling: the first crate root, C[s<disambiguator>_]<len><name>
        m = re.search(r"C(?:s[0-9A-Za-z]*_)?(\d+)", symbol)
        if m:
            n, start = int(m.group(1)), m.end()
            return symbol[start:start + n]
        return "(unknown)"
    m = re.match(r"_ZN(\d+)", symbol)
    first = symbol[m.end():m.end() + int(m.group(1))] if m else symbol
    first = (first.replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ")
             .replace("$RF$", "&").replace("..", "::"))
    first = first.lstrip("_<&* ")
    first = re.split(r"::| |<|>", first)[0]
    return first or "(unnamed)"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile-memory", action="store_true",
                   help="also list the functions whose compile in V8 (TurboFan) takes the most memory")
    a = p.parse_args(argv)
    buf = pathlib.Path(a.module).read_bytes()
    sections, funcs, imported = parse(buf)
    print(f"{a.module}: {len(buf):,} bytes")
    print("\nsections:")
    for label, size in sorted(sections, key=lambda s: -s[1]):
        print(f"  {size:>9,}  {label}")
    code = sum(s for _, s in funcs)
    by_crate = collections.Counter()
    for name, size in funcs:
        by_crate[crate_of(name)] += size
    print(f"\ncode by crate ({len(funcs)} functions, {code:,} bytes):")
    for crate, size in by_crate.most_common(a.top):
        print(f"  {size:>9,}  {size / code:6.1%}  {crate}")
    print("\nlargest functions:")
    for name, size in sorted(funcs, key=lambda f: -f[1])[:a.top]:
        print(f"  {size:>9,}  {name[:150]}")
    if a.compile_memory:
        return compile_memory(a.module, funcs, imported, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

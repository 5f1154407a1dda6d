#!/usr/bin/env python3
"""The core's module graph: which top-level module of core/src uses which, and any circle.

A module is a file `core/src/x.rs` or a directory `core/src/x/`; its test module (from
`#[cfg(test)]` on) and `tests.rs` files are left out, since tests may use anything.
Exit status 1 when the graph has a circle (run by `make lint`).
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "core" / "src"
USE = re.compile(r"\bcrate::(\w+)|\buse crate::\{([^}]*)\}", re.S)


def sources():
    for path in sorted(SRC.rglob("*.rs")):
        rel = path.relative_to(SRC)
        if rel.name == "tests.rs" or rel.parts[0] == "lib.rs":
            continue
        module = rel.parts[0].removesuffix(".rs")
        text = path.read_text()
        cut = text.find("#[cfg(test)]\nmod tests")
        code = text if cut < 0 else text[:cut]
        # Comments (and doc links in them) are no dependency.
        yield module, re.sub(r"//[^\n]*", "", code)


def graph():
    edges = {}
    for module, text in sources():
        deps = edges.setdefault(module, set())
        for m in USE.finditer(text):
            names = [m.group(1)] if m.group(1) else re.findall(r"^\s*(\w+)", m.group(2), re.M)
            for name in names:
                if (SRC / f"{name}.rs").exists() or (SRC / name).is_dir():
                    if name != module:
                        deps.add(name)
    return edges


def circles(edges):
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def main():
    edges = graph()
    if "-v" in sys.argv:
        for module in sorted(edges):
            print(f"{module} -> {', '.join(sorted(edges[module])) or '-'}")
    found = circles(edges)
    for c in found:
        print("module circle: " + " -> ".join(c), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

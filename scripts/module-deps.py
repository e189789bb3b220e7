#!/usr/bin/env python3
"""Measure the library's structure: import cycles between top-level modules
and functions longer than a screen.

    scripts/module-deps.py            # cycles, then functions over 100 lines
    scripts/module-deps.py --edges    # also every module -> module edge
    scripts/module-deps.py --over 60  # functions over 60 lines instead
    scripts/module-deps.py --no-tests # leave out tests (tests/, tests.rs,
                                      # #[cfg(test)] modules, #[test] fns)

A module is a top-level name under lib/src (`cache` for lib/src/cache/*.rs),
or, in the grouped layout (scripts/group-modules.sh), a module that lives in
a group directory and that lib.rs re-exports (`pub use formats::cache;`:
lib/src/formats/cache/*.rs is `cache`). An edge A -> B is any `crate::B`
path written in A's files (use lines and inline paths alike; `crate::formats::cache`
counts as `cache`), comments excluded. Function lengths come from brace
matching from the `fn` line to its closing brace, test modules included.
tests/structure.rs enforces the no-cycle rule in CI; this script is the
report.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LIB = os.path.join(ROOT, "lib", "src")


def rust_files(top):
    for dirpath, _, names in os.walk(top):
        for n in sorted(names):
            if n.endswith(".rs"):
                yield os.path.join(dirpath, n)


def strip_comments(text):
    # Line comments and doc comments; strings are left (a `crate::` in a
    # string literal is rare and would only over-report).
    return re.sub(r"//[^\n]*", "", text)


def grouped():
    """(group, name) for each `pub use GROUP::NAME;` / `pub use GROUP::{A, B};`
    in lib.rs: module NAME lives in lib/src/GROUP/."""
    out = set()
    for line in open(os.path.join(LIB, "lib.rs"), encoding="utf-8"):
        m = re.match(r"\s*pub use ([a-z_][a-z0-9_]*)::(\{[^}]*\}|[a-z_][a-z0-9_]*);", line)
        if m:
            for name in m.group(2).strip("{}").split(","):
                if re.fullmatch(r"[a-z_][a-z0-9_]*", name.strip()):
                    out.add((m.group(1), name.strip()))
    return out


def module_of(path, groups=frozenset()):
    parts = [p[:-3] if p.endswith(".rs") else p for p in os.path.relpath(path, LIB).split(os.sep)]
    if len(parts) >= 2 and (parts[0], parts[1]) in groups:
        return parts[1]
    return parts[0]


def edges():
    groups = grouped()
    deps = {}
    for f in rust_files(LIB):
        m = module_of(f, groups)
        if m in ("lib", "main"):
            continue
        text = strip_comments(open(f, encoding="utf-8").read())
        targets = set()
        for a, b in re.findall(r"\bcrate::([a-z_][a-z0-9_]*)(?:::([a-z_][a-z0-9_]*))?", text):
            targets.add(b if (a, b) in groups else a)
        # `use crate::{a, b::c}` groups
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text, re.S):
            for item in group.split(","):
                path = [p.strip() for p in item.strip().split("::")]
                name = path[0]
                if len(path) > 1 and (name, path[1]) in groups:
                    name = path[1]
                if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                    targets.add(name)
        deps.setdefault(m, set()).update(t for t in targets if t != m)
    return deps


def cycles(deps):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(deps.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def pairs(deps):
    return sorted(
        (a, b) for a in deps for b in deps[a] if a < b and a in deps.get(b, ())
    )


FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)")


def is_test_file(path):
    rel = os.path.relpath(path, ROOT).split(os.sep)
    return rel[0] == "tests" or rel[-1] == "tests.rs" or "tests" in rel[:-1]


def long_functions(limit=100, tests=True):
    found = []
    for top in (LIB, os.path.join(ROOT, "bins"), os.path.join(ROOT, "tests")):
        for f in rust_files(top):
            if not tests and is_test_file(f):
                continue
            lines = open(f, encoding="utf-8").read().split("\n")
            # A `#[cfg(test)]` module runs to the end of its file here (the
            # project keeps test modules last).
            test_from = next(
                (k for k, l in enumerate(lines) if l.strip() == "#[cfg(test)]"
                 and k + 1 < len(lines) and re.match(r"\s*(pub\s+)?mod\s", lines[k + 1])),
                len(lines),
            )
            i = 0
            while i < len(lines):
                m = FN.match(lines[i])
                if not m:
                    i += 1
                    continue
                if not tests and (i >= test_from or (i > 0 and lines[i - 1].strip() == "#[test]")):
                    i += 1
                    continue
                depth, started, j = 0, False, i
                while j < len(lines):
                    code = re.sub(r"//.*", "", lines[j])
                    code = re.sub(r"'(\\.|[^\\'])'", "''", code)  # char literals
                    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
                    if not started and ";" in code and "{" not in code:
                        break  # a declaration without a body
                    depth += code.count("{") - code.count("}")
                    if "{" in code:
                        started = True
                    if started and depth <= 0:
                        break
                    j += 1
                n = j - i + 1
                if started and n > limit:
                    found.append((n, os.path.relpath(f, ROOT), m.group(7)))
                i += 1
    return sorted(found, reverse=True)


def main():
    deps = edges()
    if "--edges" in sys.argv:
        for a in sorted(deps):
            print(f"{a} -> {', '.join(sorted(deps[a]))}")
        print()
    cyc = cycles(deps)
    print(f"import cycles (strongly connected groups): {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    print(f"mutual imports (A uses B and B uses A): {len(pairs(deps))}")
    for a, b in pairs(deps):
        print(f"  {a} <-> {b}")
    limit = 100
    if "--over" in sys.argv:
        limit = int(sys.argv[sys.argv.index("--over") + 1])
    fns = long_functions(limit, tests="--no-tests" not in sys.argv)
    scope = " outside tests" if "--no-tests" in sys.argv else ""
    print(f"functions over {limit} lines{scope}: {len(fns)}")
    for n, f, name in fns:
        print(f"  {n:4d}  {f}::{name}")
    return 1 if cyc else 0


if __name__ == "__main__":
    sys.exit(main())

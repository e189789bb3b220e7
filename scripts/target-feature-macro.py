#!/usr/bin/env python3
"""Rewrites raw `#[target_feature(enable = "...")]` attributes in
lib/src/kernels/ into the level macros of kernels/isa.rs (`avx2_fn!`,
`avx512_vnni_fn!`), as line-local edits that leave function bodies alone:

    /// doc                         avx2_fn! {
    #[inline]                       /// doc
    #[target_feature(enable =  ->   #[inline]
      "avx2,fma,f16c")]             unsafe fn f() {
    unsafe fn f() {                     ...
        ...                         }
    }                               }

Functions wrapped next to each other (only blank lines between) share one
invocation. Each rewritten file gets `use crate::kernels::isa::<macro>;`
(inside a `mod x86 { ... }` when the functions are there) unless it has
one.

    scripts/target-feature-macro.py            # rewrite lib/src/kernels/*.rs
    scripts/target-feature-macro.py FILE...    # only these files
    scripts/target-feature-macro.py --check    # list raw attributes, exit 1 if any

Run `cargo fmt` afterwards only if you like: rustfmt leaves the inside of
`name! { ... }` alone, so it changes nothing here.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LIB = os.path.join(ROOT, "lib", "src")
# lib/src/kernels, or lib/src/GROUP/kernels in the grouped layout.
KERNELS = next(
    d for d in [os.path.join(LIB, "kernels")]
    + [os.path.join(LIB, g, "kernels") for g in sorted(os.listdir(LIB))]
    if os.path.isfile(os.path.join(d, "isa.rs"))
)

# The one place the lists are read from: the macros in isa.rs.
MACRO_DEF = re.compile(
    r'macro_rules!\s+(\w+)\s*\{.*?#\[target_feature\(enable = "([^"]*)"\)\]', re.S
)
ATTR = re.compile(r'^(\s*)#\[target_feature\(enable = "([^"]*)"\)\]\s*$')


def macros():
    text = open(os.path.join(KERNELS, "isa.rs"), encoding="utf-8").read()
    return {features: name for name, features in MACRO_DEF.findall(text)}


def code_of(line):
    code = re.sub(r"//.*", "", line)
    code = re.sub(r"'(\\.|[^\\'])'", "''", code)
    return re.sub(r'"(\\.|[^"\\])*"', '""', code)


def fn_end(lines, i):
    """Index of the line closing the fn whose header starts at or after i."""
    depth, started = 0, False
    for j in range(i, len(lines)):
        code = code_of(lines[j])
        depth += code.count("{") - code.count("}")
        started = started or "{" in code
        if started and depth <= 0:
            return j
    raise SystemExit(f"unbalanced braces after line {i + 1}")


def item_start(lines, i):
    """First line of the doc comments and attributes above line i."""
    while i > 0:
        prev = lines[i - 1].strip()
        if prev.startswith(("///", "#[", "//")) and not prev.startswith("//!"):
            i -= 1
        else:
            break
    return i


def rewrite(path, by_list):
    lines = open(path, encoding="utf-8").read().split("\n")
    spans = []  # (start, attr, end, indent, macro)
    for i, line in enumerate(lines):
        m = ATTR.match(line)
        if not m:
            continue
        indent, features = m.groups()
        if features not in by_list:
            raise SystemExit(
                f"{path}:{i + 1}: target_feature \"{features}\" is no level's list "
                f"({', '.join(by_list)})"
            )
        spans.append((item_start(lines, i), i, fn_end(lines, i), indent, by_list[features]))
    if not spans:
        return []
    opens, closes, drop = {}, set(), set()
    for k, (start, attr, end, indent, macro) in enumerate(spans):
        drop.add(attr)
        prev = spans[k - 1] if k else None
        joined = (
            prev is not None
            and prev[4] == macro
            and prev[3] == indent
            and all(not l.strip() for l in lines[prev[2] + 1 : start])
        )
        if joined:
            closes.discard(prev[2])
        else:
            opens[start] = f"{indent}{macro}! {{"
        closes.add(end)
    out = []
    for i, line in enumerate(lines):
        if i in opens:
            out.append(opens[i])
        if i not in drop:
            out.append(line)
        if i in closes:
            out.append(re.match(r"\s*", line).group(0) + "}")
    used = sorted({s[4] for s in spans})
    out = add_imports(out, used)
    open(path, "w", encoding="utf-8").write("\n".join(out))
    return [(path, s[1] + 1, s[4]) for s in spans]


def add_imports(lines, used):
    """`use crate::kernels::isa::{...};` after the `use std::arch` line of
    the scope the macros are used in (the file, or its `mod x86`)."""
    for macro in used:
        if any(re.search(rf"\bisa::(\{{[^}}]*\b)?{macro}\b", l) for l in lines):
            continue
        for i, l in enumerate(lines):
            if re.match(r"\s*use std::arch::x86_64::\*;", l):
                indent = re.match(r"\s*", l).group(0)
                lines.insert(i + 1, f"{indent}use crate::kernels::isa::{macro};")
                break
        else:
            raise SystemExit(f"no `use std::arch::x86_64::*;` to put the {macro} import after")
    return lines


def main():
    by_list = macros()
    if len(by_list) < 2:
        raise SystemExit("kernels/isa.rs: found no level macros")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    files = args or [
        os.path.join(KERNELS, n) for n in sorted(os.listdir(KERNELS))
        if n.endswith(".rs") and n != "isa.rs"
    ]
    if "--check" in sys.argv:
        raw = [
            f"{f}:{i + 1}" for f in files
            for i, l in enumerate(open(f, encoding="utf-8").read().split("\n"))
            if ATTR.match(l)
        ]
        print("\n".join(raw) or "no raw #[target_feature] attributes")
        return 1 if raw else 0
    for f in files:
        for path, line, macro in rewrite(f, by_list):
            print(f"{os.path.relpath(path, ROOT)}:{line}: {macro}!")
    return 0


if __name__ == "__main__":
    sys.exit(main())

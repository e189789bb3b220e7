//! The library's module graph, read from the sources: no import cycles
//! between top-level modules, and the kernels import no file format.
//! (`scripts/module-deps.py` prints the same graph with every edge and the
//! functions over 100 lines.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Mutual imports waiting on a change outside this check's reach, each with
/// what removes it. Empty is the goal; a new cycle fails the test.
const PENDING: &[(&str, &str, &str)] = &[];

/// What the kernels may import: the layouts they read, the mapping their
/// tests use, the bandwidth probe their benchmark compares against, and
/// the environment variables that tune them.
const KERNEL_DEPS: &[&str] = &["env", "membw", "mmap", "tensor"];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::name` paths in `text`, comments dropped, `crate::{a, b}` groups
/// opened.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 {
            let before = code.as_bytes()[i - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue; // e.g. `roundhouse_crate::`
            }
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for item in group.split('}').next().unwrap_or("").split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lib/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let targets = crate_paths(&text);
        let entry = deps.entry(module.clone()).or_default();
        entry.extend(targets.into_iter().filter(|t| *t != module));
    }
    deps
}

/// Modules reachable from `from`.
fn reach(deps: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for d in deps.get(&m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_module_graph_has_no_cycles() {
    let mut deps = graph();
    assert!(deps.len() > 15, "read only {} modules", deps.len());
    for (a, b, _) in PENDING {
        if let Some(d) = deps.get_mut(*b) {
            d.remove(*a);
        }
    }
    let cycles: Vec<String> = deps
        .keys()
        .filter(|m| reach(&deps, m).contains(*m))
        .map(|m| {
            let back: Vec<&String> = deps[m]
                .iter()
                .filter(|d| reach(&deps, d).contains(m))
                .collect();
            format!("{m} -> {back:?} -> ... -> {m}")
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn pending_cycles_are_still_real() {
    // Once a pending pair is gone, it must leave the list (so the list
    // never hides a new cycle between the same modules).
    let deps = graph();
    for (a, b, why) in PENDING {
        let both = deps.get(*a).is_some_and(|d| d.contains(*b))
            && deps.get(*b).is_some_and(|d| d.contains(*a));
        assert!(both, "{a} <-> {b} is gone ({why}): remove it from PENDING");
    }
}

#[test]
fn kernels_import_no_file_format() {
    let deps = graph();
    let extra: Vec<&String> = deps["kernels"]
        .iter()
        .filter(|d| !KERNEL_DEPS.contains(&d.as_str()))
        .collect();
    assert!(extra.is_empty(), "kernels import {extra:?}");
}

#[test]
fn the_reader_sees_groups_and_skips_comments() {
    let t = "use crate::{a, b::c};\n// crate::commented\nlet x = crate::d::e();";
    let got: Vec<String> = crate_paths(t).into_iter().collect();
    assert_eq!(got, ["a", "b", "d"]);
}

//! The library's structure, read from the sources: no import cycles
//! between top-level modules (flat, or grouped into directories by
//! scripts/group-modules.sh), the kernels import no file format, and SIMD
//! kernels enable CPU features only through kernels/isa.rs's level macros.
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

/// `pub use GROUP::NAME;` lines of lib.rs: module NAME lives in the
/// directory lib/src/GROUP/ (the grouped layout scripts/group-modules.sh
/// makes) and keeps its `crate::NAME` path. Empty while every module sits
/// at the top.
fn grouped(lib_rs: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for line in lib_rs.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((group, rest)) = path.trim_end_matches(';').split_once("::") else {
            continue;
        };
        for name in rest.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = name.trim();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert((group.to_string(), name.to_string()));
            }
        }
    }
    out
}

/// `crate::name` paths in `text`, comments dropped, `crate::{a, b}` groups
/// opened; `crate::GROUP::name` counts as `name` for a grouped module.
fn crate_paths(text: &str, groups: &BTreeSet<(String, String)>) -> BTreeSet<String> {
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
    // `a` or, when `a` is a group holding `b`, `b` (from the text after `a`).
    let module = |name: String, after: &str| -> String {
        let inner = after.strip_prefix("::").map(ident).unwrap_or_default();
        if groups.contains(&(name.clone(), inner.clone())) {
            inner
        } else {
            name
        }
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
                let item = item.trim();
                let name = ident(item);
                if !name.is_empty() {
                    out.insert(module(name.clone(), &item[name.len()..]));
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(module(name.clone(), &rest[name.len()..]));
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lib/src");
    let groups = grouped(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .components()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .collect();
        // lib/src/GROUP/NAME/... is module NAME when lib.rs re-exports it.
        let module = match &parts[..] {
            [g, m, ..] if groups.contains(&(g.clone(), m.clone())) => m.clone(),
            [m, ..] => m.clone(),
            [] => continue,
        };
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let targets = crate_paths(&text, &groups);
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
    let got: Vec<String> = crate_paths(t, &BTreeSet::new()).into_iter().collect();
    assert_eq!(got, ["a", "b", "d"]);
    // In the grouped layout `crate::engine::kernels` is `kernels`.
    let groups = grouped("pub use engine::{kernels, tensor};\npub use formats::cache;\n");
    let t = "use crate::engine::kernels::Isa;\nuse crate::{formats::cache, engine};";
    let got: Vec<String> = crate_paths(t, &groups).into_iter().collect();
    assert_eq!(got, ["cache", "engine", "kernels"]);
}

/// The kernels' sources: every `.rs` under lib/src/kernels, by path
/// relative to it.
fn kernel_sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lib/src");
    // lib/src/kernels, or lib/src/GROUP/kernels in the grouped layout.
    let dir = std::iter::once(src.join("kernels"))
        .chain(
            std::fs::read_dir(&src)
                .unwrap()
                .map(|e| e.unwrap().path().join("kernels")),
        )
        .find(|d| d.join("isa.rs").is_file())
        .expect("no kernels/isa.rs under lib/src");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(&dir).unwrap().display().to_string();
            (rel, std::fs::read_to_string(&f).unwrap())
        })
        .collect()
}

/// `macro_rules! NAME { ... }` definitions in `text`: name and body
/// (brace matched; the macros here hold no braces in strings).
fn macro_definitions(text: &str) -> Vec<(String, &str)> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("macro_rules!") {
        let rest = &text[i + "macro_rules!".len()..];
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let open = i + "macro_rules!".len() + rest.find('{').unwrap();
        let mut depth = 0;
        let close = text[open..]
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '{' => 1,
                    '}' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(k, _)| open + k)
            .unwrap();
        out.push((name, &text[open..=close]));
    }
    out
}

/// The level macros of kernels/isa.rs and the feature list each one's
/// `#[target_feature]` enables.
fn level_macros() -> BTreeMap<String, String> {
    let isa = kernel_sources()
        .into_iter()
        .find(|(f, _)| f == "isa.rs")
        .unwrap()
        .1;
    let mut out = BTreeMap::new();
    for (name, body) in macro_definitions(&isa) {
        if let Some(at) = body.find("#[target_feature(enable = \"") {
            let list = body[at..].split('"').nth(1).unwrap().to_string();
            out.insert(name, list);
        }
    }
    out
}

#[test]
fn each_simd_level_has_one_macro_with_its_feature_list() {
    use roundhouse::kernels::Isa;
    let macros = level_macros();
    let mut want: BTreeMap<String, String> = [
        ("avx2_fn", Isa::Avx2),
        ("avx_vnni_fn", Isa::AvxVnni),
        ("avx512_vnni_fn", Isa::Avx512Vnni),
    ]
    .into_iter()
    .map(|(m, isa)| (m.to_string(), isa.target_features().to_string()))
    .collect();
    // The AVX-VNNI level's other encoding.
    want.insert(
        "avx_vnni_evex_fn".to_string(),
        Isa::AvxVnni.encodings()[1].to_string(),
    );
    let encodings: usize = Isa::ALL.iter().map(|i| i.encodings().len()).sum();
    assert_eq!(
        macros.len() + 1,
        encodings,
        "one macro per encoding (scalar has none)"
    );
    assert_eq!(macros, want, "kernels/isa.rs's level macros");
    // Every level but the scalar one is covered.
    for isa in Isa::ALL {
        let lists: Vec<&String> = macros.values().collect();
        assert_eq!(
            lists.contains(&&isa.target_features().to_string()),
            isa != Isa::Scalar,
            "{isa:?}"
        );
    }
}

#[test]
fn kernels_enable_target_features_only_through_the_level_macros() {
    // A raw attribute outside the macros could enable a feature its level
    // does not detect. To convert one: scripts/target-feature-macro.py.
    let mut raw = Vec::new();
    let mut uses = 0;
    for (file, text) in kernel_sources() {
        let defined: Vec<&str> = macro_definitions(&text).into_iter().map(|d| d.1).collect();
        for (at, _) in text.match_indices("#[target_feature") {
            let line_start = text[..at].rfind('\n').map_or(0, |k| k + 1);
            if text[line_start..at].contains("//") {
                continue; // a comment that names the attribute
            }
            let inside = defined.iter().any(|body| {
                let start = body.as_ptr() as usize - text.as_ptr() as usize;
                (start..start + body.len()).contains(&at)
            });
            if !inside {
                let line = text[..at].lines().count() + 1;
                raw.push(format!("kernels/{file}:{line}"));
            }
        }
        uses += level_macros()
            .keys()
            .map(|m| text.matches(&format!("{m}! {{")).count())
            .sum::<usize>();
    }
    assert!(
        raw.is_empty(),
        "#[target_feature] written outside kernels/isa.rs's level macros (wrap the fn in avx2_fn! {{ }} or avx512_vnni_fn! {{ }}; scripts/target-feature-macro.py does it):\n{}",
        raw.join("\n")
    );
    assert!(uses >= 10, "only {uses} level macro invocations found");
}

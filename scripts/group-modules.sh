#!/usr/bin/env bash
# Groups the library's flat modules into four directories (issue 18):
#
#   lib/src/engine/    tensor, kernels, model, config, weights, sample, membw
#   lib/src/formats/   checkpoint, quant, cache, open, synthetic, assets
#   lib/src/pipeline/  fetch, inspect, verify, stage, chat, serve, evaluate,
#                      speedbench, and the manifest itself (pipeline.rs ->
#                      pipeline/manifest.rs, re-exported by pipeline/mod.rs)
#   lib/src/support/   cli, fsutil, mmap, direct_io, env
#
# Every module keeps its path: lib.rs re-exports each one
# (`pub use engine::kernels;`), so `crate::kernels::Isa`,
# `roundhouse::cache::Cache` and the like stay valid and no other source
# file changes. Files move with `git mv` (history follows them); the only
# edits inside moved files are include_str!/include_bytes! paths that
# leave the moved module, which get one more `../`.
#
# The script also rewrites lib.rs (the module map in its docs, the
# declarations and re-exports), writes the groups' mod.rs files, and
# updates `lib/src/...` paths and the layout paragraph in ARCHITECTURE.md,
# README.md and docs/*.md. It stages everything; review with
# `git diff --cached -M --stat`, build, test, commit.
#
# Usage (on a clean tree, e.g. right after a merge):
#   scripts/group-modules.sh            # move, rewrite, stage
#   scripts/group-modules.sh --dry-run  # print the moves only
#
# A module in lib.rs that the table below does not name stays at the top
# (the script says so); add it to a group here and rerun on a fresh tree.
# Runs only on the flat layout: it refuses when lib/src/engine exists.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
SRC=lib/src
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

# Group -> its modules, and each group's one-line description (the
# group's mod.rs docs). Order is the reading order, bottom up.
GROUPS_IN_ORDER=(support engine formats pipeline)
declare -A MODULES=(
  [support]="cli fsutil mmap direct_io env"
  [engine]="tensor kernels config weights model sample membw"
  [formats]="quant checkpoint cache open synthetic assets"
  [pipeline]="stage fetch inspect verify chat serve evaluate speedbench"
)
declare -A ABOUT=(
  [support]="Plumbing every other group uses: exit codes and one-line errors (\`cli\`), crash-safe writes (\`fsutil\`), the one unsafe file mapping (\`mmap\`), aligned reads that bypass the page cache (\`direct_io\`), and every environment variable read (\`env\`)."
  [engine]="What runs the model: weight layouts (\`tensor\`), the SIMD and scalar kernels (\`kernels\`), \`config.json\` (\`config\`), the weight-source interface (\`weights\`), the Qwen3-Next forward pass and expert cache (\`model\`), token choice (\`sample\`) and the memory-bandwidth probe (\`membw\`)."
  [formats]="Model files on disk: AutoRound packing (\`quant\`), safetensors checkpoints (\`checkpoint\`), the repacked mmap-ready cache (\`cache\`), the one opener (\`open\`), generated checkpoints (\`synthetic\`) and the bundled tokenizer and template (\`assets\`)."
  [pipeline]="The stages \`pipeline.toml\` chains and what they drive: the manifest itself (this module: \`Pipeline\`, \`defaults\`), stage records (\`stage\`), \`fetch\`, \`inspect\`, \`verify\`, chat (\`chat\`), the HTTP engine thread (\`serve\`), logits and perplexity (\`evaluate\`) and pp/tg runs (\`speedbench\`)."
)

if [[ -e $SRC/engine || -e $SRC/formats || -e $SRC/support || -d $SRC/pipeline ]]; then
  echo "group-modules: $SRC is already grouped (engine/, formats/, support/ or pipeline/ exists)" >&2
  exit 1
fi
if [[ $DRY == 0 ]] && ! git diff --quiet HEAD; then
  echo "group-modules: the tree has uncommitted changes; commit or stash them first" >&2
  exit 1
fi

declared=$(sed -n 's/^pub mod \([a-z_0-9]*\);$/\1/p' $SRC/lib.rs)
moved=()
for g in "${GROUPS_IN_ORDER[@]}"; do
  for m in ${MODULES[$g]}; do
    if ! grep -qx "$m" <<<"$declared"; then
      echo "group-modules: lib.rs declares no module \`$m\`; skipped" >&2
      continue
    fi
    moved+=("$g:$m")
  done
done
for m in $declared; do
  [[ $m == pipeline ]] && continue
  found=0
  for gm in "${moved[@]}"; do
    if [[ ${gm#*:} == "$m" ]]; then found=1; fi
  done
  [[ $found == 1 ]] || echo "group-modules: module \`$m\` is in no group; it stays in $SRC/" >&2
done

# 1. Moves (history follows with git mv).
for g in "${GROUPS_IN_ORDER[@]}"; do
  [[ $DRY == 1 ]] || mkdir -p "$SRC/$g"
done
for gm in "${moved[@]}"; do
  g=${gm%%:*} m=${gm#*:}
  for p in "$SRC/$m.rs" "$SRC/$m"; do
    [[ -e $p ]] || continue
    echo "git mv $p $SRC/$g/${p#$SRC/}"
    [[ $DRY == 1 ]] || git mv "$p" "$SRC/$g/${p#$SRC/}"
  done
done
echo "git mv $SRC/pipeline.rs $SRC/pipeline/manifest.rs"
[[ $DRY == 1 ]] && exit 0
git mv "$SRC/pipeline.rs" "$SRC/pipeline/manifest.rs"

# 2. include_str!/include_bytes! paths that leave a moved module: one
#    level deeper now.
python3 - "$SRC" "${moved[@]}" pipeline:manifest <<'EOF'
import os, re, sys
src, moved = sys.argv[1], sys.argv[2:]
INC = re.compile(r'(include_(?:str|bytes)!\(\s*")([^"]+)(")')
for gm in moved:
    g, m = gm.split(":")
    unit_new = os.path.join(src, g, m)
    old_of = lambda p: p.replace(os.path.join(src, g, m), os.path.join(src, "pipeline" if m == "manifest" else m), 1)
    files = [unit_new + ".rs"] if os.path.isfile(unit_new + ".rs") else []
    for d, _, names in os.walk(unit_new):
        files += [os.path.join(d, n) for n in names if n.endswith(".rs")]
    for f in files:
        text = open(f, encoding="utf-8").read()
        def fix(mt):
            rel = mt.group(2)
            old_dir = os.path.dirname(old_of(f))
            target = os.path.normpath(os.path.join(old_dir, rel))
            inside_unit = os.path.normpath(old_of(unit_new)) + os.sep
            if (target + os.sep).startswith(inside_unit) or target == os.path.normpath(old_of(unit_new)) + ".rs":
                return mt.group(0)
            return mt.group(1) + os.path.relpath(target, os.path.dirname(f)) + mt.group(3)
        new = INC.sub(fix, text)
        if new != text:
            open(f, "w", encoding="utf-8").write(new)
            print(f"include paths fixed in {f}")
EOF

# 3. The groups' mod.rs files.
for g in "${GROUPS_IN_ORDER[@]}"; do
  f=$SRC/$g/mod.rs
  {
    fold -s -w 74 <<<"${ABOUT[$g]}" | sed 's/ *$//; s/^/\/\/! /'
    echo "//!"
    echo "//! Each module keeps its top-level path (\`crate::NAME\`): lib.rs"
    echo "//! re-exports it. scripts/group-modules.sh made this layout."
    if [[ $g == pipeline ]]; then
      echo "//!"
      echo "//! The manifest (\`pipeline.toml\`: [\`Pipeline\`], [\`defaults\`], setting"
      echo "//! errors) is \`manifest.rs\`; its items are this module's."
      echo
      echo "mod manifest;"
      echo "pub use manifest::*;"
    fi
    echo
    # Sorted, as rustfmt orders declarations.
    for gm in "${moved[@]}"; do
      if [[ ${gm%%:*} == "$g" ]]; then echo "pub mod ${gm#*:};"; fi
    done | LC_ALL=C sort
  } >"$f"
  git add "$f"
done

# 4. lib.rs: the module map and the declarations.
python3 - "$SRC" "${moved[@]}" <<'EOF'
import re, sys
src, moved = sys.argv[1], [gm.split(":") for gm in sys.argv[2:]]
path = f"{src}/lib.rs"
text = open(path, encoding="utf-8").read()
lines = text.split("\n")
doc_end = next(i for i, l in enumerate(lines) if not l.startswith("//!"))
groups = ["support", "engine", "formats", "pipeline"]
doc = """//! Roundhouse: Qwen3-Next AutoRound checkpoints from the hub to a chat
//! prompt on a CPU.
//!
//! The library holds everything; the `rh-*` binaries parse flags and call
//! into it. ARCHITECTURE.md at the repository root is the reading path.
//! The modules sit in four directories, bottom up; each keeps its
//! top-level path (`roundhouse::kernels`, `crate::cache`) through the
//! re-exports below:
//!
//! * [`support`] (lib/src/support/): [`cli`] (exit codes, logs, progress),
//!   [`fsutil`] (crash-safe writes), [`mmap`] (the one unsafe mapping),
//!   [`direct_io`] (aligned positioned reads that bypass the page cache),
//!   [`env`](mod@env) (every environment variable read);
//! * [`engine`] (lib/src/engine/): [`tensor`] (the weight layouts kernels
//!   read, and their element readers), [`kernels`] (matvec/matmul per
//!   instruction set, with a scalar reference; [`kernels::Isa`] is the one
//!   instruction-set type), [`config`] (`config.json`), [`weights`] (the
//!   weight-source interface the formats implement), [`model`] (the
//!   Qwen3-Next forward pass, and [`model::experts`], the expert cache that
//!   pages routed experts under a RAM budget), [`sample`] (token choice),
//!   [`membw`] (memory-bandwidth probe);
//! * [`formats`] (lib/src/formats/): [`quant`] (AutoRound packing),
//!   [`checkpoint`] (safetensors), [`cache`] (the repacked, mmap-ready
//!   cache), [`open`] (the one opener: cache or checkpoint, checked),
//!   [`synthetic`] (generated demo and benchmark checkpoints), [`assets`]
//!   (the bundled tokenizer and template);
//! * [`pipeline`] (lib/src/pipeline/): the manifest (`pipeline.toml`,
//!   [`pipeline::defaults`], setting errors), [`stage`] (resumable stage
//!   records, [`stage::Stage`]), the stages [`fetch`], [`inspect`],
//!   [`verify`] (and [`cache::write`] for repack), [`chat`] (tokenizer,
//!   template, multi-turn conversation), [`serve`] (the engine thread,
//!   prompt reuse and answer shaping behind `rh-serve --listen`),
//!   [`evaluate`] (logits and perplexity), [`speedbench`] (pp/tg runs)."""
named = {m for _, m in moved}
body = []
first_decl = None
for i, l in enumerate(lines[doc_end:], doc_end):
    m = re.fullmatch(r"pub mod ([a-z_0-9]+);", l)
    if m and (m.group(1) in named or m.group(1) == "pipeline"):
        if first_decl is None:
            first_decl = len(body)
        continue
    body.append(l)
decls = [f"pub mod {g};" for g in sorted(groups)] + [""]
decls += [f"pub use {g}::{m};" for g, m in sorted(moved)]  # rustfmt's order
body[first_decl:first_decl] = decls
out = doc.split("\n") + body
open(path, "w", encoding="utf-8").write("\n".join(out))
EOF
git add $SRC/lib.rs

# 5. Paths in the documents, and ARCHITECTURE.md's layout paragraph.
python3 - "${moved[@]}" <<'EOF'
import glob, re, sys
moved = [gm.split(":") for gm in sys.argv[1:]]
docs = ["ARCHITECTURE.md", "README.md", "CONTRIBUTING.md"] + sorted(glob.glob("docs/*.md"))
for path in docs:
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        continue
    new = text
    for g, m in moved:
        new = re.sub(rf"lib/src/{m}(?=[/.`\s)])", f"lib/src/{g}/{m}", new)
    new = re.sub(r"lib/src/pipeline\.rs", "lib/src/pipeline/manifest.rs", new)
    if path == "ARCHITECTURE.md":
        old = re.search(r"The library stays one crate of flat modules.*?(other work is editing\)|renames every file)\.", new, re.S)
        layout = """The library is one crate whose modules sit in four directories,
bottom up: `lib/src/support/` (cli, fsutil, mmap, direct_io, env),
`lib/src/engine/` (tensor, kernels, config, weights, model, sample, membw),
`lib/src/formats/` (quant, checkpoint, cache, open, synthetic, assets) and
`lib/src/pipeline/` (the manifest, stage, fetch, inspect, verify, chat,
serve, evaluate, speedbench). Every module keeps its top-level path
(`crate::kernels`, `roundhouse::cache`): `lib.rs` re-exports it. The one
upward reach is the expert cache (`model::experts`), which reads the
repacked cache's files itself. Still one crate, so the build is unchanged
(crates were not measured against it)."""
        if old:
            new = new[: old.start()] + layout + new[old.end():]
        else:
            new = new.replace("## Dependencies point one way", layout + "\n\n## Dependencies point one way", 1)
    if new != text:
        open(path, "w", encoding="utf-8").write(new)
        print(f"paths updated in {path}")
EOF
git add -A ARCHITECTURE.md README.md docs 2>/dev/null || true
if [[ -e CONTRIBUTING.md ]]; then git add CONTRIBUTING.md; fi

git add -A $SRC
echo "group-modules: done; review with: git diff --cached -M --stat"

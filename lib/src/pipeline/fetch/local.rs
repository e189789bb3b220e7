//! `dir:PATH`: a checkpoint already on this machine (a directory of
//! safetensors and metadata, or a snapshot in the Hugging Face cache whose
//! entries are symlinks into `blobs/`). Every safetensors header is
//! validated against its file's length first; files are then hardlinked
//! into the output directory when it is on the same filesystem, else copied
//! through a temp file (fsync, rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{
    check_disk, ensure_parent, parallel, safe_relative, with_suffix, FetchError, FetchOptions,
    Fetched, Filter, HashingWriter, Units,
};
use crate::fsutil::{self, FsError};

/// Most entries a local checkpoint listing visits before giving up (a
/// model has a few hundred files; this bounds a walk of a hostile tree).
const MAX_ENTRIES: usize = 100_000;

/// Lists the regular files under `dir`, relative and `/`-separated,
/// skipping hidden entries and our temp files. Symlinks to directories are
/// not followed, so a link loop (`L -> .`) cannot make the walk explode
/// and the walk never leaves the tree through one; the walk is bounded in
/// depth and in entries. Symlinks to files are followed: a Hugging Face
/// snapshot is made of links `../../blobs/<hash>`, and a checkpoint made by
/// rh-fetch of links to snapshot entries ([`FileLink`] tells them apart).
pub fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, FetchError> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut Vec<(String, PathBuf)>,
        depth: usize,
        seen: &mut usize,
    ) -> Result<(), FetchError> {
        if depth > 16 {
            return Ok(());
        }
        let rd = fs::read_dir(dir).map_err(|e| FsError::io(dir, e))?;
        for e in rd {
            let e = e.map_err(|e| FsError::io(dir, e))?;
            *seen += 1;
            if *seen > MAX_ENTRIES {
                return Err(FetchError::Invalid(format!(
                    "{}: more than {MAX_ENTRIES} entries; not a checkpoint directory",
                    root.display()
                )));
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name.ends_with(".part") || name.ends_with(".tmp") {
                continue;
            }
            let p = e.path();
            let link = fs::symlink_metadata(&p).map_err(|e| FsError::io(&p, e))?;
            let meta = if link.file_type().is_symlink() {
                match fs::metadata(&p) {
                    Ok(m) if m.is_dir() => {
                        tracing::warn!("{}: a link to a directory; not followed", p.display());
                        continue;
                    }
                    Ok(m) => {
                        if FileLink::of(root, &p) == FileLink::Elsewhere {
                            tracing::info!(
                                "{}: a link to a file outside the checkpoint; reading it",
                                p.display()
                            );
                        }
                        m
                    }
                    Err(err) => return Err(FsError::io(&p, err).into()),
                }
            } else {
                link
            };
            if meta.is_dir() {
                walk(root, &p, out, depth + 1, seen)?;
            } else if meta.is_file() {
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, p));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0, &mut 0)?;
    out.sort();
    Ok(out)
}

/// Where a symlink to a file in a checkpoint leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileLink {
    /// To a file inside the walked tree.
    Inside,
    /// To a blob of a Hugging Face cache (`models--*/blobs/<hash>`): a
    /// snapshot entry, or a checkpoint file that rh-fetch linked there.
    HfBlob,
    /// Somewhere else on this machine (a file the user linked by hand).
    Elsewhere,
}

impl FileLink {
    /// Classifies the link at `link` under the tree `root` (by the file it
    /// finally resolves to).
    pub fn of(root: &Path, link: &Path) -> FileLink {
        let (Ok(root), Ok(target)) = (root.canonicalize(), link.canonicalize()) else {
            return FileLink::Elsewhere;
        };
        if target.starts_with(&root) {
            FileLink::Inside
        } else if super::hf_cache::is_blob_path(&target) {
            FileLink::HfBlob
        } else {
            FileLink::Elsewhere
        }
    }
}

/// Validates a safetensors file's header against its length (the data is
/// mapped, not read).
pub fn validate_safetensors(path: &Path) -> Result<(), FetchError> {
    let map = crate::mmap::MappedFile::open(path)?;
    crate::checkpoint::read_header(path, map.bytes())
        .map_err(|e| FetchError::Invalid(crate::cli::one_line(&e)))?;
    Ok(())
}

/// Puts `src` at `target`: a hardlink when possible, else a copy; both via
/// a temp name and a rename so `target` is never half-written. Returns the
/// blake3 of the content and whether it was linked.
pub(crate) fn link_or_copy(
    src: &Path,
    target: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<(String, bool), FetchError> {
    ensure_parent(target)?;
    let src = src.canonicalize().map_err(|e| FsError::io(src, e))?;
    let tmp = with_suffix(target, ".tmp");
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(&src, &tmp).is_ok() {
        let h = fsutil::blake3_file(&tmp)?;
        bar.inc(fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0));
        fsutil::commit_temp(&tmp, target)?;
        return Ok((h.to_hex().to_string(), true));
    }
    let mut hash = None;
    fsutil::write_atomic_with(target, |f| {
        let mut r = fs::File::open(&src)?;
        let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, f), bar);
        std::io::copy(&mut r, &mut w)?;
        w.flush()?;
        hash = Some(w.blake3.finalize().to_hex().to_string());
        Ok(())
    })?;
    Ok((hash.expect("set on success"), false))
}

/// Brings the checkpoint at `dir` into `units.out`.
pub(crate) fn fetch(
    opts: &FetchOptions,
    dir: &Path,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    if !dir.is_dir() {
        return Err(FetchError::Invalid(format!(
            "{}: not a directory (dir: sources need a checkpoint directory with config.json and *.safetensors)",
            dir.display()
        )));
    }
    let src_root = dir.canonicalize().map_err(|e| FsError::io(dir, e))?;
    let in_place = units
        .out
        .canonicalize()
        .map(|o| o == src_root)
        .unwrap_or(false);
    let files: Vec<(String, PathBuf)> = list(dir)?
        .into_iter()
        .filter(|(rel, _)| safe_relative(rel) && filter.wants(rel))
        .collect();
    if !files.iter().any(|(r, _)| r.ends_with(".safetensors")) {
        return Err(FetchError::Invalid(format!(
            "{}: no *.safetensors files{}",
            dir.display(),
            if opts.include.is_empty() && opts.exclude.is_empty() {
                ""
            } else {
                " matching --include/--exclude"
            }
        )));
    }
    if !files.iter().any(|(r, _)| r == "config.json") {
        tracing::warn!(
            "{}: no config.json; later stages will need one",
            dir.display()
        );
    }
    // Validate every header before copying anything.
    for (rel, p) in &files {
        if rel.ends_with(".safetensors") {
            validate_safetensors(p)?;
        }
    }
    let sizes: Vec<u64> = files
        .iter()
        .map(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .collect();
    let total: u64 = sizes.iter().sum();
    let names: Vec<String> = files.iter().map(|(r, _)| r.clone()).collect();
    let todo: Vec<(String, PathBuf, u64)> = files
        .into_iter()
        .zip(sizes)
        .filter(|((rel, _), _)| !units.is_done(rel))
        .map(|((r, p), s)| (r, p, s))
        .collect();
    let reused = names.len() - todo.len();
    if !in_place {
        // Hardlinks need no space, but a copy does; assume the worst.
        let same_fs = same_device(&src_root, &units.out);
        if !same_fs {
            check_disk(&units.out, todo.iter().map(|t| t.2).sum())?;
        }
    }
    let bar = crate::cli::bytes_bar(total, "local checkpoint", opts.quiet);
    bar.inc(total - todo.iter().map(|t| t.2).sum::<u64>());
    let linked = std::sync::atomic::AtomicUsize::new(0);
    parallel(todo, opts.concurrency, units, |(rel, src, size)| {
        let target = units.out.join(&rel);
        let hash = if in_place {
            bar.inc(size);
            fsutil::blake3_file(&src)?.to_hex().to_string()
        } else {
            units.claim(&rel)?;
            let (h, was_linked) = link_or_copy(&src, &target, &bar)?;
            if was_linked {
                linked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            h
        };
        units.done(&rel, size, Some(hash))
    })?;
    bar.finish_and_clear();
    Ok(Fetched {
        files: names,
        details: serde_json::json!({
            "kind": "dir",
            "dir": src_root.to_string_lossy(),
            "hardlinked": linked.into_inner(),
        }),
        commit: None,
        transferred: 0,
        reused,
    })
}

fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}

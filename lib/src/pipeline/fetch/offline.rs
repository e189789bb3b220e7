//! `--offline`, and a hub that cannot be reached: the files of a revision
//! already in the Hugging Face cache, checked against their blob names.

use std::fs;

use super::client::{is_git_oid, is_sha256};
use super::download::sha256_file;
use super::hf_cache::RepoCache;
use super::part;
use super::{parallel, safe_relative, FetchError, FetchOptions, Fetched, Filter, Units};
use crate::fsutil::FsError;

/// `--offline`: the files of the cached snapshot of `revision`.
pub(crate) fn offline(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    let cache_dir = opts
        .hf_cache
        .clone()
        .unwrap_or_else(super::hf_cache::default_hub_cache);
    let cache = RepoCache::new(&cache_dir, repo);
    let commit = cache.read_ref(revision).ok_or_else(|| {
        FetchError::Offline(format!(
            "{repo}@{revision}: --offline but {} has no such revision; fetch once without --offline (or point --hf-home at the cache that has it)",
            cache.root.display()
        ))
    })?;
    let files: Vec<(String, std::path::PathBuf)> = cache
        .snapshot_files(&commit)?
        .into_iter()
        .filter(|(r, _)| safe_relative(r) && !super::reserved(opts, r) && filter.wants(r))
        .collect();
    if files.is_empty() {
        return Err(FetchError::Offline(format!(
            "{repo}@{revision}: --offline but the cached snapshot {} holds no matching files",
            cache.snapshot(&commit).display()
        )));
    }
    for (rel, p) in &files {
        if rel.ends_with(".safetensors") {
            super::local::validate_safetensors(p)?;
        }
    }
    let bar = crate::cli::bytes_bar(0, "from cache", true);
    let names: Vec<String> = files.iter().map(|(r, _)| r.clone()).collect();
    let todo: Vec<_> = files
        .into_iter()
        .filter(|(r, _)| !units.is_done(r))
        .collect();
    let reused = names.len();
    parallel(todo, opts.concurrency, units, |(rel, src)| {
        let target = units.out.join(&rel);
        // Blobs are named by their sha256 (LFS files): check it.
        let canon = src.canonicalize().map_err(|e| FsError::io(&src, e))?;
        let blob = canon
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let got = if is_sha256(&blob) {
            Some(sha256_file(&canon)?)
        } else if is_git_oid(&blob) {
            Some(part::git_blob_sha1(&canon)?)
        } else {
            None
        };
        if let Some(got) = got.filter(|g| *g != blob.to_ascii_lowercase()) {
            return Err(FetchError::Checksum {
                file: rel.clone(),
                reason: format!(
                    "cached blob {} hashes to {got}: the cache is damaged; delete that blob and fetch without --offline",
                    canon.display()
                ),
            });
        }
        units.claim(&rel)?;
        // With the cache in use the checkpoint links into the snapshot;
        // with --no-hf-cache it gets files of its own (hardlinks or copies).
        let h = if opts.hf_cache.is_some() {
            cache.point(&target, &commit, &rel)?;
            crate::fsutil::blake3_file(&canon)?.to_hex().to_string()
        } else {
            super::local::link_or_copy(&canon, &target, &bar)?.0
        };
        let size = fs::metadata(&target)
            .map_err(|e| FsError::io(&target, e))?
            .len();
        units.done(&rel, size, Some(h))
    })?;
    Ok(Fetched {
        files: names,
        details: serde_json::json!({
            "kind": "hub",
            "repo": repo,
            "revision": revision,
            "commit": commit,
            "offline": true,
            "cache": cache.root.to_string_lossy(),
        }),
        commit: Some(commit),
        transferred: 0,
        reused,
    })
}

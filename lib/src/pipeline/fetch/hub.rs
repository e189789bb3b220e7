//! The Hugging Face hub (or a mirror) over plain HTTP(S), with our own
//! client (hf-hub 0.5 breaks on CDN-served large files and 1.0 dropped
//! resume; see `../shared/docs/research/crates.md`, beside the repository).
//!
//! Protocol, as huggingface.co serves it:
//!
//! 1. `GET {endpoint}/api/models/{repo}/revision/{rev}`: JSON with `sha` (the
//!    commit, pinned in the record) and `siblings[].rfilename`;
//! 2. `GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=1`: entries
//!    with `path`, `size`, `oid` (the git blob id) and, for LFS files,
//!    `lfs.oid` (sha256) and `lfs.size` (paginated with a
//!    `Link: <...>; rel="next"` header);
//! 3. `GET {endpoint}/{repo}/resolve/{commit}/{path}`: the bytes, often via a
//!    redirect to a CDN; `X-Linked-Etag` (or `ETag`) carries the sha256 of
//!    LFS files. Redirects are followed by hand so the token is never sent
//!    to another host.
//!
//! Each file downloads into `<file>.part` with a record beside it
//! ([`super::part`]). It resumes with `Range` after a dropped connection, a
//! stall (read timeout), a 5xx or a 429 (exponential backoff; the retry
//! budget is refilled whenever a retry made progress), a kill, or a rerun.
//! Every resume sends `If-Range` with the server's `ETag`, so a file that
//! changed on the server restarts instead of being spliced, and asks again
//! for the last 64 KiB before the resume point, compared with the `.part`:
//! a damaged tail drops back to the last recorded chunk that still agrees,
//! never to zero. LFS files are checked against their sha256, other files
//! against their git blob id, before the rename to the final name. A
//! mismatch keeps the `.part` and fails with one line naming the file; the
//! next run repairs it: it fetches the file again chunk by chunk, rewrites
//! only the chunks that differ (an interrupted repair continues at its
//! cursor) and checks the whole hash again.

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::api::RemoteFile;
use super::client::HubClient;
use super::download::download;
use super::hf_cache::RepoCache;
use super::progress::Bars;
use super::{
    check_disk, parallel, safe_relative, with_suffix, FetchError, FetchOptions, Fetched, Filter,
    Units,
};

/// What every file download of one fetch shares.
pub(crate) struct Ctx<'a> {
    pub client: &'a HubClient,
    pub opts: &'a FetchOptions,
    pub repo: &'a str,
    pub commit: &'a str,
    pub units: &'a Units,
    /// The HF cache folder of the repo, when the cache is used.
    pub cache: Option<RepoCache>,
    pub bars: Bars,
}

impl Ctx<'_> {
    /// `repo@commit: label`, for messages.
    pub fn what(&self, label: &str) -> String {
        format!("{}@{}: {label}", self.repo, self.commit)
    }
}

/// Fetches `repo@revision` into `units.out`: resolve the commit, list its
/// files, plan (sizes, free space), download, record.
pub(crate) fn fetch(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    if opts.offline {
        return super::offline::offline(opts, repo, revision, filter, units);
    }
    let client = HubClient::new(opts);
    let (commit, siblings) = match client.revision(repo, revision) {
        Ok(r) => r,
        Err(e) => {
            cached_instead(opts, repo, revision, e)?;
            return super::offline::offline(opts, repo, revision, filter, units);
        }
    };
    tracing::info!("{repo}@{revision} is commit {commit}");
    let files = list(opts, &client, repo, revision, &commit, siblings, filter)?;
    let (total, todo) = plan(opts, repo, revision, &files, units)?;
    let ctx = Ctx {
        client: &client,
        opts,
        repo,
        commit: &commit,
        units,
        cache: opts.hf_cache.as_ref().map(|c| RepoCache::new(c, repo)),
        bars: Bars::new(total, repo.rsplit('/').next().unwrap_or(repo), opts.quiet),
    };
    let done = download_all(&ctx, &files, todo, total)?;
    if let Some(c) = &ctx.cache {
        c.write_ref(revision, &commit)?;
    }
    Ok(Fetched {
        files: files.iter().map(|f| f.path.clone()).collect(),
        details: serde_json::json!({
            "kind": "hub",
            "repo": repo,
            "revision": revision,
            "commit": commit,
            "endpoint": client.endpoint,
            "files": done.listed,
        }),
        commit: Some(commit.clone()),
        transferred: done.transferred,
        reused: done.reused,
    })
}

/// When the hub cannot be reached, a revision already in the HF cache is
/// used as it is, as huggingface_hub does: `Ok` says so; any other failure
/// is returned.
fn cached_instead(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    e: FetchError,
) -> Result<(), FetchError> {
    if !matches!(e, FetchError::Http { .. }) {
        return Err(e);
    }
    let cached = opts
        .hf_cache
        .as_ref()
        .map(|c| RepoCache::new(c, repo))
        .filter(|c| c.read_ref(revision).is_some());
    let Some(c) = cached else { return Err(e) };
    tracing::warn!(
        "{}; using the snapshot of {repo}@{revision} already in {}",
        crate::cli::one_line(&e),
        c.root.display()
    );
    Ok(())
}

/// The files of `commit` to fetch: the tree listing (or the revision's
/// names on hubs without one), every name checked, filtered.
fn list(
    opts: &FetchOptions,
    client: &HubClient,
    repo: &str,
    revision: &str,
    commit: &str,
    siblings: Vec<String>,
    filter: &Filter,
) -> Result<Vec<RemoteFile>, FetchError> {
    let listing = match client.tree(repo, commit)? {
        Some(l) => l,
        None => siblings
            .into_iter()
            .map(|path| RemoteFile {
                path,
                size: None,
                sha256: None,
                oid: None,
            })
            .collect(),
    };
    for f in &listing {
        if !safe_relative(&f.path) || super::reserved(opts, &f.path) {
            return Err(FetchError::UnsafeName {
                repo: repo.into(),
                name: f.path.clone(),
            });
        }
    }
    // A published cache is recognised by its manifest (beside an index):
    // fetched as a cache only against the hash its publisher shared.
    let has = |n: &str| listing.iter().any(|f| f.path == n);
    if has(crate::verify::MANIFEST_NAME) && has(crate::cache::format::INDEX_FILE) {
        return Err(FetchError::Usage(format!(
            "{repo}@{revision} is a published roundhouse cache ({} and {}): fetch it with --expect HASH, the manifest hash its publisher shared",
            crate::verify::MANIFEST_NAME,
            crate::cache::format::INDEX_FILE
        )));
    }
    let files: Vec<RemoteFile> = listing
        .into_iter()
        .filter(|f| filter.wants(&f.path))
        .collect();
    if files.is_empty() {
        return Err(FetchError::Usage(format!(
            "{repo}@{revision}: no files to fetch (the repo is empty or --include/--exclude matched nothing)"
        )));
    }
    Ok(files)
}

/// The total size (a sum that overflows is refused, not wrapped: sizes
/// come from the hub) and the files still to do, after checking that what
/// is left fits on the disk.
fn plan(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    files: &[RemoteFile],
    units: &Units,
) -> Result<(u64, Vec<RemoteFile>), FetchError> {
    let total: u64 = files
        .iter()
        .filter_map(|f| f.size)
        .try_fold(0u64, |a, b| a.checked_add(b))
        .ok_or_else(|| FetchError::Http {
            what: format!("{repo}@{revision}"),
            reason: "the listing's file sizes add up to more than 2^64 bytes; refusing it".into(),
        })?;
    let todo: Vec<RemoteFile> = files
        .iter()
        .filter(|f| !units.is_done(&f.path) || opts.force)
        .cloned()
        .collect();
    let need: u64 = todo
        .iter()
        .filter_map(|f| {
            let have = fs::metadata(with_suffix(&units.out.join(&f.path), ".part"))
                .map(|m| m.len())
                .unwrap_or(0);
            f.size.map(|s| s.saturating_sub(have))
        })
        .fold(0u64, u64::saturating_add);
    check_disk(&units.out, need)?;
    Ok((total, todo))
}

/// What the downloads of one fetch did.
struct Done {
    transferred: u64,
    reused: usize,
    /// Size and sha256 of every file, for the record.
    listed: BTreeMap<String, serde_json::Value>,
}

/// Downloads (or reuses) the files still to do, `opts.concurrency` at once.
fn download_all(
    ctx: &Ctx,
    files: &[RemoteFile],
    todo: Vec<RemoteFile>,
    total: u64,
) -> Result<Done, FetchError> {
    let left = todo
        .iter()
        .filter_map(|f| f.size)
        .fold(0, u64::saturating_add);
    ctx.bars.overall.inc(total.saturating_sub(left));
    let transferred = AtomicU64::new(0);
    let reused = AtomicUsize::new(files.len() - todo.len());
    let hashes = Mutex::new(BTreeMap::new());
    parallel(todo, ctx.opts.concurrency, ctx.units, |f| {
        let r = download(ctx, &f)?;
        transferred.fetch_add(r.transferred, Ordering::Relaxed);
        if r.reused {
            reused.fetch_add(1, Ordering::Relaxed);
        }
        hashes.lock().expect("lock").insert(
            f.path.clone(),
            serde_json::json!({"size": r.size, "sha256": r.sha256}),
        );
        Ok(())
    })?;
    ctx.bars.overall.finish_and_clear();
    let mut listed = hashes.into_inner().expect("lock");
    for f in files {
        listed
            .entry(f.path.clone())
            .or_insert_with(|| serde_json::json!({"size": f.size, "sha256": f.sha256}));
    }
    Ok(Done {
        transferred: transferred.into_inner(),
        reused: reused.into_inner(),
        listed,
    })
}

#[cfg(test)]
mod tests {
    use super::super::client::{clean_etag, encode_path, join_location, next_link, origin};

    #[test]
    fn urls_and_headers() {
        assert_eq!(
            join_location("http://a:1/x/resolve/c/f", "/cdn/z?x=1"),
            "http://a:1/cdn/z?x=1"
        );
        assert_eq!(
            join_location("http://a:1/x/y", "https://cdn/z"),
            "https://cdn/z"
        );
        assert_eq!(join_location("http://a/x/y", "z"), "http://a/x/z");
        assert_eq!(origin("https://h.co/a/b"), "https://h.co");
        assert_eq!(encode_path("a b/c+d.json"), "a%20b/c%2Bd.json");
        assert_eq!(
            next_link("<https://h/api/x?cursor=abc>; rel=\"next\"").as_deref(),
            Some("https://h/api/x?cursor=abc")
        );
        assert_eq!(clean_etag("W/\"abc\""), "abc");
    }
}

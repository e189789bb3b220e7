//! Published verified caches: a cache repacked once, written with its
//! manifest (`rh-verify write`), and put on the hub (`hf:ORG/REPO`) or any
//! static HTTP server (`https://host/path/`) is fetched ready to serve,
//! with no repack:
//!
//! 1. the manifest (`manifest.blake3.json`) is downloaded first and its
//!    BLAKE3 compared with `--expect` (the hash the publisher shared)
//!    before anything in it is believed; then its paths, sizes and chunk
//!    values are checked (no `..` or absolute paths, no overflowing sizes,
//!    chunk values that combine to each file's hash) and the total is
//!    checked against the free space;
//! 2. every file is fetched into `<file>.part` one manifest chunk at a time
//!    (HTTP Range), and each chunk is hashed as it arrives and compared with
//!    the manifest: a chunk damaged on the way is fetched again alone, a cut
//!    connection resumes at the chunk, and a rerun re-checks the chunks
//!    already on disk and fetches only those missing or damaged;
//! 3. data files land first, `index.rhc` after them and the manifest last,
//!    each renamed into place after it is complete, so the directory is
//!    never a cache whose index describes other data.
//!
//! The fetch record says `kind: cache` with the manifest hash; rh-repack
//! then records that it had nothing to do, and why ([`skip_repack`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use blake3::hazmat::HasherExt;
use indicatif::ProgressBar;

use super::client::{backoff, encode_path, Fail, HubClient};
use super::progress::{bar_warn, Bars};
use super::{
    check_disk, ensure_parent, parallel, reserved, safe_relative, with_suffix, FetchError,
    FetchOptions, Fetched, Units,
};
use crate::fsutil::{self, FolioWriter, FsError};
use crate::verify::hash::{chunk_count, file_root, parse_hex};
use crate::verify::{FileEntry, Manifest, MANIFEST_NAME};

/// The largest manifest read (a cache has a few dozen files; a manifest
/// of a 43 GB cache in 64 MiB chunks is well under 1 MiB).
const MAX_MANIFEST: u64 = 64 << 20;

/// The cache index, fetched after the data files it describes.
const INDEX: &str = crate::cache::format::INDEX_FILE;

/// `fetch` record `details.kind` of a published cache.
pub const KIND: &str = crate::cache::published::KIND;

/// Checks an `--expect` value: 64 hex digits (returned lowercase).
pub fn parse_expect(s: &str) -> Result<String, FetchError> {
    let s = s.trim().to_ascii_lowercase();
    if parse_hex(&s).is_none() {
        return Err(FetchError::Usage(format!(
            "--expect `{s}`: not a BLAKE3 hash (64 hex digits, as `rh-verify` prints the manifest hash)"
        )));
    }
    Ok(s)
}

/// Where the files of a published cache are.
pub(crate) enum Origin {
    /// A static HTTP server: `base` ends with `/`.
    Url(String),
    /// A hub repo at a pinned commit.
    Hub {
        /// `OWNER/NAME`.
        repo: String,
        /// The commit.
        commit: String,
    },
}

impl Origin {
    fn url(&self, client: &HubClient, path: &str) -> String {
        match self {
            Origin::Url(base) => format!("{base}{}", encode_path(path)),
            Origin::Hub { repo, commit } => client.resolve_url(repo, commit, path),
        }
    }

    /// `https://host/path/` or `ORG/REPO@commit`, for messages.
    fn name(&self) -> String {
        match self {
            Origin::Url(base) => base.clone(),
            Origin::Hub { repo, commit } => format!("{repo}@{commit}"),
        }
    }
}

/// `https://host/path/` (or the manifest's own URL) as the base URL of a
/// published cache, ending with `/`.
pub fn base_url(s: &str) -> Option<String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))?;
    if rest.is_empty() || rest.starts_with('/') || s.chars().any(|c| c.is_whitespace()) {
        return None;
    }
    let s = s.strip_suffix(MANIFEST_NAME).unwrap_or(s);
    Some(if s.ends_with('/') {
        s.to_string()
    } else {
        format!("{s}/")
    })
}

/// `https://host/path/`: the published cache there.
pub(crate) fn fetch_url(
    opts: &FetchOptions,
    base: &str,
    expect: &str,
    units: &Units,
) -> Result<Fetched, FetchError> {
    // The HF token never goes to another server.
    let client = HubClient::new(&FetchOptions {
        endpoint: base.to_string(),
        token: None,
        ..opts.clone()
    });
    fetch(opts, &client, Origin::Url(base.to_string()), expect, units)
}

/// `hf:ORG/REPO --expect HASH`: the published cache in a hub repo, which
/// must hold a manifest.
pub(crate) fn fetch_hub(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    expect: &str,
    units: &Units,
) -> Result<Fetched, FetchError> {
    let client = HubClient::new(opts);
    let (commit, siblings) = client.revision(repo, revision)?;
    let names: Vec<String> = match client.tree(repo, &commit)? {
        Some(files) => files.into_iter().map(|f| f.path).collect(),
        None => siblings,
    };
    if !names.iter().any(|n| n == MANIFEST_NAME) {
        return Err(FetchError::Usage(format!(
            "{repo}@{revision}: no {MANIFEST_NAME}, so not a published cache; drop --expect to fetch it as a checkpoint"
        )));
    }
    tracing::info!("{repo}@{revision} is commit {commit}, a published cache");
    let origin = Origin::Hub {
        repo: repo.to_string(),
        commit: commit.clone(),
    };
    let mut fetched = fetch(opts, &client, origin, expect, units)?;
    fetched.commit = Some(commit.clone());
    if let Some(d) = fetched.details.as_object_mut() {
        d.insert("repo".into(), repo.into());
        d.insert("revision".into(), revision.into());
        d.insert("commit".into(), commit.into());
    }
    Ok(fetched)
}

/// What every file of one published fetch shares.
struct Ctx<'a> {
    client: &'a HubClient,
    origin: &'a Origin,
    units: &'a Units,
    chunk: u64,
    bars: Bars,
    transferred: AtomicU64,
    refetched: AtomicUsize,
}

impl Ctx<'_> {
    fn what(&self, path: &str) -> String {
        format!("{}: {path}", self.origin.name())
    }
}

fn fetch(
    opts: &FetchOptions,
    client: &HubClient,
    origin: Origin,
    expect: &str,
    units: &Units,
) -> Result<Fetched, FetchError> {
    let (manifest, bytes) = fetch_manifest(opts, client, &origin, expect)?;
    let total = check_sizes(&manifest, &origin)?;
    check_disk(&units.out, still_needed(&manifest, &units.out))?;
    check_chunks(&manifest, &origin)?;
    retire_stale(&manifest, &bytes, units)?;
    let ctx = Ctx {
        client,
        origin: &origin,
        units,
        chunk: manifest.chunk_size,
        bars: Bars::new(total, "published cache", opts.quiet),
        transferred: AtomicU64::new(0),
        refetched: AtomicUsize::new(0),
    };
    // Data first, the index after the data it describes, the manifest last.
    let (index, data): (Vec<&FileEntry>, Vec<&FileEntry>) =
        manifest.files.iter().partition(|f| f.path == INDEX);
    let reused = AtomicUsize::new(0);
    for phase in [data, index] {
        parallel(phase, opts.concurrency, units, |e| {
            if fetch_file(&ctx, e)? {
                reused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?;
    }
    ctx.bars.overall.finish_and_clear();
    let manifest_path = units.out.join(MANIFEST_NAME);
    fsutil::write_atomic(&manifest_path, &bytes)?;
    units.done(
        MANIFEST_NAME,
        bytes.len() as u64,
        Some(blake3::hash(&bytes).to_hex().to_string()),
    )?;
    let mut files: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    files.push(MANIFEST_NAME.to_string());
    Ok(Fetched {
        files,
        details: serde_json::json!({
            "kind": KIND,
            "source": origin.name(),
            "manifest_blake3": expect,
            "chunk_size": manifest.chunk_size,
            "chunks_fetched_again": ctx.refetched.load(Ordering::Relaxed),
        }),
        commit: None,
        transferred: ctx.transferred.load(Ordering::Relaxed),
        reused: reused.into_inner(),
    })
}

/// Downloads the manifest and checks it: its BLAKE3 against `expect`
/// before anything else, then its content.
fn fetch_manifest(
    opts: &FetchOptions,
    client: &HubClient,
    origin: &Origin,
    expect: &str,
) -> Result<(Manifest, Vec<u8>), FetchError> {
    let url = origin.url(client, MANIFEST_NAME);
    let what = origin.name();
    let (resp, _) = client.get_retrying(&url, &format!("{what}: {MANIFEST_NAME}"), &what)?;
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(MAX_MANIFEST + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::Http {
            what: url.clone(),
            reason: format!("reading the manifest: {e}"),
        })?;
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(FetchError::Invalid(format!(
            "{url}: larger than {} MiB; not a cache manifest",
            MAX_MANIFEST >> 20
        )));
    }
    let found = blake3::hash(&bytes).to_hex().to_string();
    if found != expect {
        return Err(FetchError::Checksum {
            file: url,
            reason: format!(
                "manifest blake3 is {found}, expected {expect}: this is not the cache that was shared; nothing was downloaded"
            ),
        });
    }
    let m = Manifest::parse(&bytes, Path::new(&url))
        .map_err(|e| FetchError::Invalid(crate::cli::one_line(&e)))?;
    for f in &m.files {
        if !safe_relative(&f.path) || reserved(opts, &f.path) {
            return Err(FetchError::UnsafeName {
                repo: what.clone(),
                name: f.path.clone(),
            });
        }
    }
    Ok((m, bytes))
}

/// Each file's chunk values combine to its BLAKE3 (so every chunk checked
/// on arrival means the whole file is the one listed).
fn check_chunks(m: &Manifest, origin: &Origin) -> Result<(), FetchError> {
    for f in &m.files {
        let cvs: Vec<[u8; 32]> = f.chunks.iter().filter_map(|c| parse_hex(c)).collect();
        if file_root(&cvs, f.size, m.chunk_size).to_hex().as_str() != f.blake3 {
            return Err(FetchError::Invalid(format!(
                "{}{MANIFEST_NAME}: `{}`: its chunk values do not combine to its blake3; the manifest is inconsistent",
                origin.name(),
                f.path
            )));
        }
    }
    Ok(())
}

/// The total size, refusing sizes whose sum overflows.
fn check_sizes(m: &Manifest, origin: &Origin) -> Result<u64, FetchError> {
    m.files
        .iter()
        .try_fold(0u64, |a, f| a.checked_add(f.size))
        .ok_or_else(|| {
            FetchError::Invalid(format!(
                "{}: {MANIFEST_NAME}: the file sizes add up to more than 2^64 bytes; refusing it",
                origin.name()
            ))
        })
}

/// Bytes still to write: what is not on disk yet (a `.part` or a file
/// already in place counts as far as it goes).
fn still_needed(m: &Manifest, out: &Path) -> u64 {
    m.files
        .iter()
        .map(|f| {
            let at = out.join(&f.path);
            let have = [at.clone(), with_suffix(&at, ".part")]
                .iter()
                .filter_map(|p| fs::symlink_metadata(p).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .max()
                .unwrap_or(0);
            f.size.saturating_sub(have)
        })
        .fold(0, u64::saturating_add)
}

/// Before any data file is replaced: a manifest or index already in the
/// directory that is not the published one goes, so the directory never
/// claims to be a cache it is not while files change under it.
fn retire_stale(m: &Manifest, bytes: &[u8], units: &Units) -> Result<(), FetchError> {
    let old_manifest = units.out.join(MANIFEST_NAME);
    if fs::symlink_metadata(&old_manifest).is_ok()
        && fsutil::read_regular(&old_manifest).ok().as_deref() != Some(bytes)
    {
        units.claim(MANIFEST_NAME)?;
        remove(&old_manifest)?;
    }
    let Some(want) = m.files.iter().find(|f| f.path == INDEX) else {
        return Ok(());
    };
    let old_index = units.out.join(INDEX);
    if let Ok(meta) = fs::symlink_metadata(&old_index) {
        let same = meta.is_file()
            && meta.len() == want.size
            && fsutil::blake3_file(&old_index).is_ok_and(|h| h.to_hex().as_str() == want.blake3);
        if !same {
            units.claim(INDEX)?;
            remove(&old_index)?;
        }
    }
    Ok(())
}

fn remove(p: &Path) -> Result<(), FetchError> {
    fs::remove_file(p).map_err(|e| FsError::io(p, e))?;
    if let Some(d) = p.parent() {
        fsutil::sync_dir(d)?;
    }
    Ok(())
}

/// Byte range `[start, end)` of chunk `i` (saturating: a chunk size near
/// 2^64 cannot overflow).
fn chunk_range(size: u64, chunk: u64, i: u64) -> (u64, u64) {
    let start = i.saturating_mul(chunk);
    (start, start.saturating_add(chunk).min(size))
}

/// The manifest's value of chunk `i` for bytes `[start, ..)`: BLAKE3's
/// chaining value of that subtree, or the root hash for a one-chunk file
/// (as [`crate::verify::hash`] defines them).
struct ChunkHasher {
    h: blake3::Hasher,
    root: bool,
}

impl ChunkHasher {
    fn new(size: u64, chunk: u64, start: u64) -> ChunkHasher {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start);
        ChunkHasher {
            h,
            root: size <= chunk,
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.h.update(b);
    }
    fn finish(&self) -> [u8; 32] {
        if self.root {
            *self.h.finalize().as_bytes()
        } else {
            self.h.finalize_non_root()
        }
    }
}

/// One chunk's fate after a request.
enum ChunkFail {
    /// Worth another try (a cut connection, a 5xx, a damaged chunk).
    Retry(Fail),
    /// The server contradicts the manifest (sizes) or cannot serve ranges.
    Fatal(FetchError),
}

/// Fetches (or keeps) one file; returns true when it was already complete.
fn fetch_file(ctx: &Ctx, e: &FileEntry) -> Result<bool, FetchError> {
    let units = ctx.units;
    let final_path = units.out.join(&e.path);
    let part = with_suffix(&final_path, ".part");
    ensure_parent(&final_path)?;
    let cvs: Vec<[u8; 32]> = e.chunks.iter().filter_map(|c| parse_hex(c)).collect();
    // A file already in place (a run killed before recording it, or a file
    // damaged since): kept when every chunk matches, else its good chunks
    // are kept and only the others fetched.
    if let Ok(m) = fs::symlink_metadata(&final_path) {
        if m.is_file() && m.len() == e.size && bad_chunks(&final_path, e, ctx.chunk)? == 0 {
            ctx.bars.overall.inc(e.size);
            units.done(&e.path, e.size, Some(e.blake3.clone()))?;
            return Ok(true);
        }
        units.claim(&e.path)?;
        if m.is_file() {
            fs::rename(&final_path, &part).map_err(|err| FsError::io(&final_path, err))?;
        } else {
            // Never written through: a link or anything else is replaced.
            remove(&final_path)?;
        }
    } else {
        units.claim(&e.path)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(|err| FsError::io(&part, err))?;
    let have = file
        .metadata()
        .map_err(|err| FsError::io(&part, err))?
        .len();
    if have > e.size {
        file.set_len(e.size)
            .map_err(|err| FsError::io(&part, err))?;
    }
    let bar = ctx.bars.file_bar(&e.path, e.size);
    let url = ctx.origin.url(ctx.client, &e.path);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..chunk_count(e.size, ctx.chunk) {
        if units.aborted() {
            return Err(FetchError::Aborted);
        }
        let (a, b) = chunk_range(e.size, ctx.chunk, i);
        let on_disk = have >= b
            && local_chunk(&file, &part, e.size, ctx.chunk, a, b, &mut buf)? == cvs[i as usize];
        if !on_disk {
            fetch_chunk(
                ctx,
                &file,
                &part,
                &url,
                e,
                i,
                &cvs[i as usize],
                &bar,
                &mut buf,
            )?;
        }
        bar.set_position(b);
        ctx.bars.overall.inc(b - a);
    }
    file.sync_all().map_err(|err| FsError::io(&part, err))?;
    drop(file);
    ctx.bars.remove(&bar);
    fsutil::commit_temp(&part, &final_path)?;
    units.done(&e.path, e.size, Some(e.blake3.clone()))?;
    Ok(false)
}

/// Chunks of `path` that do not match the manifest.
fn bad_chunks(path: &Path, e: &FileEntry, chunk: u64) -> Result<usize, FetchError> {
    let file = File::open(path).map_err(|err| FsError::io(path, err))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bad = 0;
    for (i, want) in e.chunks.iter().enumerate() {
        let (a, b) = chunk_range(e.size, chunk, i as u64);
        let got = local_chunk(&file, path, e.size, chunk, a, b, &mut buf)?;
        if parse_hex(want) != Some(got) {
            bad += 1;
        }
    }
    Ok(bad)
}

/// The manifest value of bytes `[a, b)` of a local file.
fn local_chunk(
    file: &File,
    path: &Path,
    size: u64,
    chunk: u64,
    a: u64,
    b: u64,
    buf: &mut [u8],
) -> Result<[u8; 32], FetchError> {
    let mut h = ChunkHasher::new(size, chunk, a);
    let mut pos = a;
    while pos < b {
        let want = ((b - pos) as usize).min(buf.len());
        let n = file
            .read_at(&mut buf[..want], pos)
            .map_err(|err| FsError::io(path, err))?;
        if n == 0 {
            break; // Short: cannot match.
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finish())
}

/// Fetches chunk `i` until it matches the manifest, within the retries.
#[allow(clippy::too_many_arguments)]
fn fetch_chunk(
    ctx: &Ctx,
    file: &File,
    part: &Path,
    url: &str,
    e: &FileEntry,
    i: u64,
    want: &[u8; 32],
    bar: &ProgressBar,
    buf: &mut [u8],
) -> Result<(), FetchError> {
    let (a, b) = chunk_range(e.size, ctx.chunk, i);
    let mut attempt = 0u32;
    loop {
        bar.set_position(a);
        let fail = match get_chunk(ctx, file, part, url, e, a, b, bar, buf) {
            Ok(got) if got == *want => return Ok(()),
            Ok(_) => {
                ctx.refetched.fetch_add(1, Ordering::Relaxed);
                bar_warn!(ctx.bars,
                    "{}: chunk {i} (bytes {a}-{}) does not match the manifest (damaged on the way); fetching that chunk again",
                    e.path,
                    b - 1
                );
                None
            }
            Err(ChunkFail::Fatal(err)) => return Err(err),
            Err(ChunkFail::Retry(f)) => Some(f),
        };
        if ctx.units.aborted() {
            return Err(FetchError::Aborted);
        }
        if attempt >= ctx.client.retries {
            return Err(match fail {
                None => FetchError::Checksum {
                    file: ctx.what(&e.path),
                    reason: format!(
                        "chunk {i} (bytes {a}-{}) still differs from the manifest after {} tries: the server does not hold the published bytes; the chunks that matched are kept in {}, rerun to try again",
                        b - 1,
                        attempt + 1,
                        part.display()
                    ),
                },
                Some(f) => {
                    let mut err = ctx.client.map_fail(f, url, &ctx.what(&e.path), &ctx.origin.name(), attempt);
                    if let FetchError::Http { reason, .. } = &mut err {
                        reason.push_str(&format!(
                            "; the chunks before byte {a} are kept in {}, rerun to resume",
                            part.display()
                        ));
                    }
                    err
                }
            });
        }
        let wait = fail
            .as_ref()
            .map(|f| f.wait(attempt))
            .unwrap_or_else(|| backoff(0));
        if let Some(f) = &fail {
            bar_warn!(
                ctx.bars,
                "{}: {}; fetching chunk {i} again in {wait:?}",
                e.path,
                f.describe()
            );
        }
        std::thread::sleep(wait);
        attempt += 1;
    }
}

/// One Range request for bytes `[a, b)`, written into the `.part` at `a`
/// and hashed on the way; returns the chunk's manifest value.
#[allow(clippy::too_many_arguments)]
fn get_chunk(
    ctx: &Ctx,
    file: &File,
    part: &Path,
    url: &str,
    e: &FileEntry,
    a: u64,
    b: u64,
    bar: &ProgressBar,
    buf: &mut [u8],
) -> Result<[u8; 32], ChunkFail> {
    let (resp, _) = ctx
        .client
        .get(url, Some((a, Some(b - 1))), None)
        .map_err(ChunkFail::Retry)?;
    let lie = |reason: String| {
        ChunkFail::Fatal(FetchError::Http {
            what: ctx.what(&e.path),
            reason,
        })
    };
    match resp.status() {
        206 => {
            let cr = resp.header("Content-Range").unwrap_or("");
            let total = cr.rsplit('/').next().and_then(|t| t.trim().parse::<u64>().ok());
            if total.is_some_and(|t| t != e.size) {
                return Err(lie(format!(
                    "the server says the file has {} bytes (Content-Range `{cr}`), the manifest {}: not the published file",
                    total.unwrap_or(0),
                    e.size
                )));
            }
            if !cr.starts_with(&format!("bytes {a}-{}/", b - 1)) {
                return Err(ChunkFail::Retry(Fail::Transport(format!(
                    "asked for bytes {a}-{} but got Content-Range `{cr}`",
                    b - 1
                ))));
            }
        }
        // A whole-file reply is usable for the first chunk only.
        200 if a == 0 => {
            if let Some(len) = resp.header("Content-Length").and_then(|l| l.trim().parse::<u64>().ok()) {
                if len != e.size {
                    return Err(lie(format!(
                        "the server sends {len} bytes, the manifest lists {}: not the published file",
                        e.size
                    )));
                }
            }
        }
        200 => {
            return Err(lie(format!(
                "the server ignores HTTP Range requests (it sent the whole file for bytes {a}-{}); a published cache needs a server that honours them",
                b - 1
            )))
        }
        s => {
            let body = if s == 404 { String::new() } else { "unexpected status".into() };
            return Err(ChunkFail::Retry(Fail::Status(s, body, None)));
        }
    }
    let mut h = ChunkHasher::new(e.size, ctx.chunk, a);
    let mut rd = resp.into_reader();
    let mut pos = a;
    // Through 2 MiB-aligned blocks, so the fresh cache maps on 2 MiB pages.
    let fatal = |err| ChunkFail::Fatal(FsError::io(part, err).into());
    let mut out = FolioWriter::new(fsutil::WriteAt::new(file, a), a);
    while pos < b {
        let want = ((b - pos) as usize).min(buf.len());
        let n = match rd.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(ChunkFail::Retry(Fail::Transport(format!(
                    "connection broke at byte {pos}"
                ))))
            }
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(ChunkFail::Retry(Fail::Transport(format!(
                    "connection broke at byte {pos}: {err}"
                ))))
            }
        };
        out.write_all(&buf[..n]).map_err(fatal)?;
        h.update(&buf[..n]);
        pos += n as u64;
        ctx.transferred.fetch_add(n as u64, Ordering::Relaxed);
        bar.set_position(pos);
    }
    out.flush().map_err(fatal)?;
    Ok(h.finish())
}

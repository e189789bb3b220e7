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

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::hf_cache::RepoCache;
use super::part::{self, PartMeta, Progress, Repair, OVERLAP};
use super::{
    check_disk, ensure_parent, parallel, safe_relative, with_suffix, FetchError, FetchOptions,
    Fetched, Filter, Units,
};
use crate::fsutil::{self, FsError};

/// A warning drawn above the progress bars instead of through them.
macro_rules! bar_warn {
    ($multi:expr, $($arg:tt)*) => {
        $multi.suspend(|| tracing::warn!($($arg)*))
    };
}

/// One file of a hub repo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes, when the listing gave it.
    pub size: Option<u64>,
    /// sha256 of LFS files.
    pub sha256: Option<String>,
    /// Git blob id.
    pub oid: Option<String>,
}

/// How a request failed.
enum Fail {
    /// An HTTP status (with a short body excerpt).
    Status(u16, String, Option<Duration>),
    /// The connection failed or broke.
    Transport(String),
    /// The remote file is not the one the `.part` holds bytes of (its
    /// validator changed): the file must start over.
    Changed(String),
    /// The bytes `[start, at)` asked again before the resume point differ
    /// from the `.part`'s.
    Overlap {
        /// First byte compared.
        start: u64,
        /// The resume point.
        at: u64,
    },
}

impl Fail {
    /// How long to wait before retry number `attempt`: the server's
    /// Retry-After when it sent one, else exponential backoff.
    fn wait(&self, attempt: u32) -> Duration {
        match self {
            Fail::Status(_, _, Some(d)) => *d,
            _ => backoff(attempt),
        }
    }
    fn retryable(&self) -> bool {
        match self {
            Fail::Status(s, _, _) => *s >= 500 || *s == 429 || *s == 408,
            Fail::Transport(_) | Fail::Changed(_) | Fail::Overlap { .. } => true,
        }
    }
    fn describe(&self) -> String {
        match self {
            Fail::Status(s, body, _) if body.is_empty() => format!("HTTP {s}"),
            Fail::Status(s, body, _) => format!("HTTP {s}: {body}"),
            Fail::Transport(t) | Fail::Changed(t) => t.clone(),
            Fail::Overlap { start, at } => {
                format!("bytes {start}-{} differ from the server's", at - 1)
            }
        }
    }
}

/// A small hub client.
pub struct HubClient {
    agent: ureq::Agent,
    /// The hub base URL, without a trailing slash.
    pub endpoint: String,
    token: Option<String>,
    retries: u32,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn clean_etag(s: &str) -> String {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `Location` resolved against the URL it came from.
fn join_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    if loc.starts_with('/') {
        format!("{}{loc}", &base[..host_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{loc}", &base[..dir_end])
    }
}

fn origin(url: &str) -> &str {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(url.len());
    &url[..end]
}

/// Percent-encodes a path segment list (keeps `/`).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((250u64 << attempt.min(6)).min(15_000))
}

impl HubClient {
    /// A client for `opts.endpoint` with its token, timeouts and retries.
    pub fn new(opts: &FetchOptions) -> HubClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(opts.read_timeout)
            .redirects(0)
            .user_agent(concat!("roundhouse/", env!("CARGO_PKG_VERSION")))
            .build();
        HubClient {
            agent,
            endpoint: opts.endpoint.trim_end_matches('/').to_string(),
            token: opts.token.clone(),
            retries: opts.retries,
        }
    }

    /// One GET, following redirects by hand (the token only goes to the
    /// hub's own origin). `range` asks for bytes `start..=end` (`end` `None`:
    /// to the end of the file); `if_range` is sent with it. Returns the final
    /// response and the headers of the first one (where the hub puts
    /// `X-Linked-Etag` and `X-Repo-Commit`).
    fn get(
        &self,
        url: &str,
        range: Option<(u64, Option<u64>)>,
        if_range: Option<&str>,
    ) -> Result<(ureq::Response, Vec<(String, String)>), Fail> {
        let hub_origin = origin(&self.endpoint).to_string();
        let mut url = url.to_string();
        let mut first: Option<Vec<(String, String)>> = None;
        for _ in 0..8 {
            let mut req = self.agent.get(&url).set("Accept-Encoding", "identity");
            if let Some((start, end)) = range {
                let end = end.map(|e| e.to_string()).unwrap_or_default();
                req = req.set("Range", &format!("bytes={start}-{end}"));
                if let Some(v) = if_range {
                    req = req.set("If-Range", v);
                }
            }
            if let Some(t) = &self.token {
                if origin(&url) == hub_origin {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, r)) => {
                    let retry_after = r
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(60)));
                    let mut body = String::new();
                    let _ = r.into_reader().take(300).read_to_string(&mut body);
                    let body: String = body.chars().filter(|c| !c.is_control()).take(160).collect();
                    return Err(Fail::Status(code, body, retry_after));
                }
                Err(ureq::Error::Transport(t)) => return Err(Fail::Transport(t.to_string())),
            };
            if first.is_none() {
                first = Some(
                    resp.headers_names()
                        .into_iter()
                        .filter_map(|n| {
                            resp.header(&n)
                                .map(|v| (n.to_ascii_lowercase(), v.to_string()))
                        })
                        .collect(),
                );
            }
            if (300..400).contains(&resp.status()) {
                let loc = resp.header("Location").ok_or_else(|| {
                    Fail::Transport(format!("HTTP {} without a Location header", resp.status()))
                })?;
                url = join_location(&url, loc);
                continue;
            }
            return Ok((resp, first.unwrap_or_default()));
        }
        Err(Fail::Transport("too many redirects".into()))
    }

    /// GET with retries on transient failures, mapping final failures.
    fn get_retrying(
        &self,
        url: &str,
        what: &str,
        repo: &str,
    ) -> Result<(ureq::Response, Vec<(String, String)>), FetchError> {
        let mut attempt = 0;
        loop {
            match self.get(url, None, None) {
                Ok(r) => return Ok(r),
                Err(f) if f.retryable() && attempt < self.retries => {
                    let wait = f.wait(attempt);
                    tracing::warn!("{what}: {}; retrying in {wait:?}", f.describe());
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(f) => return Err(self.map_fail(f, url, what, repo, attempt)),
            }
        }
    }

    fn map_fail(&self, f: Fail, url: &str, what: &str, repo: &str, attempts: u32) -> FetchError {
        match f {
            Fail::Status(s @ (401 | 403), _, _) => FetchError::Auth {
                repo: repo.to_string(),
                status: s,
                url: url.to_string(),
                hint: if self.token.is_some() {
                    "the token in HF_TOKEN (or the HF token file) was not accepted: check it has access to this repo (gated repos need their licence accepted on the hub)".into()
                } else {
                    "the repo is gated or private: set HF_TOKEN to a token with access (https://huggingface.co/settings/tokens), or log in with `huggingface-cli login`".into()
                },
            },
            Fail::Status(404, _, _) => FetchError::NotFound {
                what: what.to_string(),
                endpoint: self.endpoint.clone(),
            },
            f => FetchError::Http {
                what: what.to_string(),
                reason: if attempts > 0 {
                    format!("{} (after {} retries)", f.describe(), attempts)
                } else {
                    f.describe()
                },
            },
        }
    }

    fn json(
        &self,
        url: &str,
        what: &str,
        repo: &str,
    ) -> Result<(serde_json::Value, Option<String>), FetchError> {
        let (resp, _) = self.get_retrying(url, what, repo)?;
        let link = resp.header("Link").map(str::to_string);
        let mut body = Vec::new();
        resp.into_reader()
            .take(256 << 20)
            .read_to_end(&mut body)
            .map_err(|e| FetchError::Http {
                what: what.into(),
                reason: format!("reading the reply: {e}"),
            })?;
        let v = serde_json::from_slice(&body).map_err(|e| FetchError::Http {
            what: what.into(),
            reason: format!("the hub's reply is not the expected JSON ({e}) at {url}"),
        })?;
        Ok((v, link))
    }

    /// Resolves `revision` to a commit; returns it and the sibling names.
    pub fn revision(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<(String, Vec<String>), FetchError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            encode_path(revision).replace('/', "%2F")
        );
        let what = format!("{repo}@{revision}");
        let (v, _) = self.json(&url, &what, repo)?;
        let sha = v["sha"]
            .as_str()
            .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| FetchError::Http {
                what: what.clone(),
                reason: format!("the hub's reply from {url} has no 40-hex `sha`"),
            })?
            .to_string();
        let siblings = v["siblings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((sha, siblings))
    }

    /// Lists the files of `commit` with sizes and hashes (following pages).
    /// Returns `None` when the hub has no tree API (some mirrors).
    pub fn tree(&self, repo: &str, commit: &str) -> Result<Option<Vec<RemoteFile>>, FetchError> {
        let mut url = format!(
            "{}/api/models/{repo}/tree/{commit}?recursive=1&expand=false",
            self.endpoint
        );
        let what = format!("{repo}@{commit} (file list)");
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let (v, link) = match self.json(&url, &what, repo) {
                Ok(x) => x,
                Err(FetchError::NotFound { .. }) if out.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            let arr = v.as_array().ok_or_else(|| FetchError::Http {
                what: what.clone(),
                reason: format!("the hub's reply from {url} is not a JSON array"),
            })?;
            for e in arr {
                if e["type"].as_str().is_some_and(|t| t != "file") {
                    continue;
                }
                let Some(path) = e["path"].as_str() else {
                    continue;
                };
                let lfs = &e["lfs"];
                out.push(RemoteFile {
                    path: path.to_string(),
                    size: lfs["size"].as_u64().or_else(|| e["size"].as_u64()),
                    sha256: lfs["oid"]
                        .as_str()
                        .or_else(|| lfs["sha256"].as_str())
                        .map(|s| s.trim_start_matches("sha256:").to_ascii_lowercase())
                        .filter(|s| is_sha256(s)),
                    oid: e["oid"].as_str().map(str::to_string),
                });
            }
            match link.as_deref().and_then(next_link) {
                Some(next) => url = join_location(&url, &next),
                None => break,
            }
        }
        Ok(Some(out))
    }

    fn resolve_url(&self, repo: &str, commit: &str, path: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            encode_path(path)
        )
    }
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (u, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            u.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// sha256 + blake3 of everything in the `.part` so far.
struct Hashes {
    sha: Sha256,
    b3: blake3::Hasher,
    len: u64,
}

impl Hashes {
    fn new() -> Self {
        Hashes {
            sha: Sha256::new(),
            b3: blake3::Hasher::new(),
            len: 0,
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.sha.update(b);
        self.b3.update(b);
        self.len += b.len() as u64;
    }
    /// Hashes an existing file from the start.
    fn of_file(path: &Path, bar: &indicatif::ProgressBar) -> Result<Hashes, FsError> {
        let mut h = Hashes::new();
        crate::fsutil::read_chunks(path, |b| {
            h.update(b);
            bar.inc(b.len() as u64);
        })?;
        Ok(h)
    }
}

/// What downloading one file did.
struct FileResult {
    transferred: u64,
    reused: bool,
    sha256: Option<String>,
    size: u64,
}

struct Ctx<'a> {
    client: &'a HubClient,
    opts: &'a FetchOptions,
    repo: &'a str,
    commit: &'a str,
    units: &'a Units,
    cache: Option<RepoCache>,
    /// All bars (hidden when stderr is not a terminal, or `-q`).
    multi: MultiProgress,
    /// The overall bar.
    bar: ProgressBar,
    /// Whether bars are hidden.
    hidden: bool,
}

impl Ctx<'_> {
    /// A bar for one file, above the overall bar (removed when done).
    fn file_bar(&self, path: &str, len: u64) -> ProgressBar {
        if self.hidden {
            return ProgressBar::hidden();
        }
        let b = self.multi.insert_before(&self.bar, ProgressBar::new(len));
        b.set_style(bar_style());
        b.set_message(short_name(path, NAME_WIDTH));
        b
    }

    fn what(&self, label: &str) -> String {
        format!("{}@{}: {label}", self.repo, self.commit)
    }
}

/// Width of the name column of the bars.
const NAME_WIDTH: usize = 32;

/// The style of the file bars and of the overall bar under them (the same
/// columns as [`crate::cli::bytes_bar`], with a wider name).
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("static template")
    .progress_chars("=> ")
}

/// `path` in at most `n` characters: without `.safetensors` when that is
/// enough, else its end (shard numbers are what tells bars apart).
fn short_name(path: &str, n: usize) -> String {
    let count = path.chars().count();
    if count <= n {
        return path.to_string();
    }
    if let Some(stem) = path.strip_suffix(".safetensors") {
        if stem.chars().count() <= n {
            return stem.to_string();
        }
    }
    let tail: String = path.chars().skip(count - (n - 1)).collect();
    format!("…{tail}")
}

/// Fetches `repo@revision` into `units.out`.
pub(crate) fn fetch(
    opts: &FetchOptions,
    repo: &str,
    revision: &str,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    if opts.offline {
        return offline(opts, repo, revision, filter, units);
    }
    let client = HubClient::new(opts);
    let (commit, siblings) = client.revision(repo, revision)?;
    tracing::info!("{repo}@{revision} is commit {commit}");
    let listing = match client.tree(repo, &commit)? {
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
    let files: Vec<RemoteFile> = listing
        .into_iter()
        .filter(|f| filter.wants(&f.path))
        .collect();
    if files.is_empty() {
        return Err(FetchError::Usage(format!(
            "{repo}@{revision}: no files to fetch (the repo is empty or --include/--exclude matched nothing)"
        )));
    }
    let cache = opts.hf_cache.as_ref().map(|c| RepoCache::new(c, repo));
    // Sizes come from the hub: a sum that overflows is refused, not wrapped.
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
    let hidden = opts.quiet || !crate::cli::stderr_is_tty();
    let multi = if hidden {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let bar = multi.add(crate::cli::bytes_bar(
        total,
        repo.rsplit('/').next().unwrap_or(repo),
        opts.quiet,
    ));
    bar.set_style(bar_style());
    let ctx = Ctx {
        client: &client,
        opts,
        repo,
        commit: &commit,
        units,
        cache,
        multi,
        bar,
        hidden,
    };
    ctx.bar.inc(
        total.saturating_sub(
            todo.iter()
                .filter_map(|f| f.size)
                .fold(0, u64::saturating_add),
        ),
    );
    let transferred = AtomicU64::new(0);
    let reused = AtomicUsize::new(files.len() - todo.len());
    let hashes = std::sync::Mutex::new(std::collections::BTreeMap::new());
    parallel(todo, opts.concurrency, units, |f| {
        let r = download(&ctx, &f)?;
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
    ctx.bar.finish_and_clear();
    if let Some(c) = &ctx.cache {
        c.write_ref(revision, &commit)?;
    }
    let mut listed = hashes.into_inner().expect("lock");
    for f in &files {
        listed
            .entry(f.path.clone())
            .or_insert_with(|| serde_json::json!({"size": f.size, "sha256": f.sha256}));
    }
    Ok(Fetched {
        files: files.iter().map(|f| f.path.clone()).collect(),
        details: serde_json::json!({
            "kind": "hub",
            "repo": repo,
            "revision": revision,
            "commit": commit,
            "endpoint": client.endpoint,
            "files": listed,
        }),
        commit: Some(commit.clone()),
        transferred: transferred.into_inner(),
        reused: reused.into_inner(),
    })
}

fn sha256_file(path: &Path) -> Result<String, FsError> {
    let h = Hashes::of_file(path, &ProgressBar::hidden())?;
    Ok(format!("{:x}", h.sha.finalize()))
}

/// The strong validator of a reply, exactly as received (a weak one cannot
/// be used with `If-Range`).
fn strong_etag(resp: &ureq::Response) -> Option<String> {
    resp.header("ETag")
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with("W/"))
        .map(str::to_string)
}

/// Reads until `buf` is full or the body ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8], at: u64) -> Result<usize, Fail> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Fail::Transport(format!(
                    "connection broke at byte {}: {e}",
                    at + got as u64
                )))
            }
        }
    }
    Ok(got)
}

fn is_git_oid(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Downloads (or reuses) one file.
fn download(ctx: &Ctx, f: &RemoteFile) -> Result<FileResult, FetchError> {
    let final_path = ctx.units.out.join(&f.path);
    let part = with_suffix(&final_path, ".part");
    ensure_parent(&final_path)?;
    if ctx.opts.force {
        let _ = fs::remove_file(&part);
        PartMeta::remove(&part);
    } else if let Some(done) = reuse_existing(ctx, f, &final_path)? {
        // A verified copy is in place: an old partial one is of no use.
        let _ = fs::remove_file(&part);
        PartMeta::remove(&part);
        return Ok(done);
    }
    ctx.units.claim(&f.path)?;
    let fresh = || PartMeta::new(f.sha256.clone(), f.oid.clone(), f.size, ctx.opts.chunk_size);
    let meta = match PartMeta::load(&part) {
        Some(_) if !part.exists() => fresh(),
        Some(mut m) if m.same_file(&f.sha256, &f.oid, f.size) => {
            m.sha256 = m.sha256.or_else(|| f.sha256.clone());
            m.oid = m.oid.or_else(|| f.oid.clone());
            m.size = m.size.or(f.size);
            m
        }
        Some(_) => {
            tracing::warn!(
                "{}: partial download of another version of {}; starting it over",
                part.display(),
                f.path
            );
            let _ = fs::remove_file(&part);
            fresh()
        }
        None => fresh(),
    };
    // What an earlier run learned from the reply headers when the listing
    // had no hashes or sizes.
    let expected_sha = f.sha256.clone().or_else(|| meta.sha256.clone());
    let expected_size = f.size.or(meta.size);
    let mut dl = Dl {
        ctx,
        f,
        label: &f.path,
        url: ctx.client.resolve_url(ctx.repo, ctx.commit, &f.path),
        part,
        final_path,
        meta,
        bar: ctx.file_bar(&f.path, expected_size.unwrap_or(0)),
        expected_sha,
        expected_size,
        transferred: 0,
        counted: 0,
        repaired: None,
    };
    let r = dl.run();
    dl.bar.finish_and_clear();
    ctx.multi.remove(&dl.bar);
    r
}

/// One file's download: its `.part`, the record beside it, the bars.
struct Dl<'c, 'a> {
    ctx: &'c Ctx<'a>,
    f: &'c RemoteFile,
    label: &'c str,
    url: String,
    part: PathBuf,
    final_path: PathBuf,
    meta: PartMeta,
    bar: ProgressBar,
    expected_sha: Option<String>,
    expected_size: Option<u64>,
    /// Body bytes received by this run.
    transferred: u64,
    /// Bytes of this file credited to the overall bar.
    counted: u64,
    /// Set by a repair pass, for the final message.
    repaired: Option<Repair>,
}

/// How a repair pass ended.
enum Step {
    Done(FileResult),
    /// The remote file changed: download it from the start.
    Restart,
}

impl Dl<'_, '_> {
    /// Credits the overall bar with this file's `len` bytes on disk.
    fn credit(&mut self, len: u64) {
        let bar = &self.ctx.bar;
        if len >= self.counted {
            bar.inc(len - self.counted);
        } else {
            bar.set_position(bar.position().saturating_sub(self.counted - len));
        }
        self.counted = len;
        if let Some(s) = self.expected_size {
            self.bar.set_length(s);
        }
        self.bar.set_position(len);
    }

    fn save_meta(&self) -> Result<(), FetchError> {
        self.meta.save(&self.part)?;
        Ok(())
    }

    /// Cuts the `.part` to `len` bytes and forgets chunks past it.
    fn cut(&mut self, len: u64) -> Result<(), FetchError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.part)
            .map_err(|e| FsError::io(&self.part, e))?;
        file.set_len(len).map_err(|e| FsError::io(&self.part, e))?;
        file.sync_all().map_err(|e| FsError::io(&self.part, e))?;
        let keep = (len / self.meta.chunk_size) as usize;
        self.meta.chunks.truncate(keep);
        if len == 0 {
            self.meta.etag = None;
        }
        self.meta.repair = None;
        self.save_meta()?;
        self.credit(len);
        Ok(())
    }

    fn gave_up(&self, reason: impl Into<String>) -> FetchError {
        FetchError::Http {
            what: self.ctx.what(self.label),
            reason: reason.into(),
        }
    }

    fn run(&mut self) -> Result<FileResult, FetchError> {
        let ctx = self.ctx;
        let label = self.label;
        // Hashes of the `.part` when they are known without reading it.
        let mut state: Option<Progress> = None;
        // Chunks on disk past the recorded ones, recorded once the overlap
        // check confirms the tail.
        let mut pending: Vec<String> = Vec::new();
        let mut attempt = 0u32;
        let mut overlap_failed_at: Option<u64> = None;
        loop {
            if ctx.units.aborted() {
                return Err(FetchError::Aborted);
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.part)
                .map_err(|e| FsError::io(&self.part, e))?;
            let have = file
                .metadata()
                .map_err(|e| FsError::io(&self.part, e))?
                .len();
            if self.expected_size.is_some_and(|s| have > s) {
                bar_warn!(
                    self.ctx.multi,
                    "{label}: partial file is longer than the file; restarting it"
                );
                drop(file);
                self.cut(0)?;
                state = None;
                continue;
            }
            let mut prog = match state.take() {
                Some(p) if p.len == have => p,
                _ => {
                    let before = self.meta.chunks.len();
                    let s = part::scan(&self.part, &mut self.meta, &ProgressBar::hidden())?;
                    if self.meta.chunks.len() != before {
                        self.save_meta()?;
                    }
                    pending = s.pending;
                    s.progress
                }
            };
            self.credit(prog.len);
            let complete = prog.len > 0 && Some(prog.len) == self.expected_size;
            if self.meta.repair.is_some() {
                if complete {
                    drop(file);
                    match self.repair(prog)? {
                        Step::Done(r) => return Ok(r),
                        Step::Restart => {
                            pending.clear();
                            continue;
                        }
                    }
                }
                // Not complete (cut since): a plain resume.
                self.meta.repair = None;
                self.save_meta()?;
            }
            if complete {
                drop(file);
                return self.finish(prog);
            }
            let mut progressed = false;
            let outcome = self.transfer(&mut file, &mut prog, &mut pending, &mut progressed);
            if progressed {
                // Bytes kept: the retry budget starts again.
                attempt = 0;
            }
            match outcome {
                Ok(()) => {
                    if self.expected_size.is_some_and(|s| prog.len < s) {
                        // The body ended early without an error: resume.
                        state = Some(prog);
                        if attempt >= ctx.client.retries {
                            return Err(
                                self.gave_up("the connection keeps ending early; rerun to resume")
                            );
                        }
                        attempt += 1;
                        continue;
                    }
                    file.sync_all().map_err(|e| FsError::io(&self.part, e))?;
                    drop(file);
                    return self.finish(prog);
                }
                Err(Fail::Status(416, _, _)) => {
                    // Our partial file does not fit the remote one: start over.
                    bar_warn!(
                        self.ctx.multi,
                        "{label}: the server refused the resume range; restarting the file"
                    );
                    drop(file);
                    self.cut(0)?;
                    pending.clear();
                    if attempt >= ctx.client.retries {
                        return Err(
                            self.gave_up("the server keeps refusing the resume range (HTTP 416)")
                        );
                    }
                    attempt += 1;
                }
                Err(Fail::Changed(why)) => {
                    bar_warn!(self.ctx.multi, "{label}: {why}; starting the file over");
                    drop(file);
                    self.cut(0)?;
                    pending.clear();
                    if attempt >= ctx.client.retries {
                        return Err(self.gave_up(format!("{why} (again and again)")));
                    }
                    attempt += 1;
                }
                Err(Fail::Overlap { start, at }) => {
                    // The end of the `.part` is not what the server has (a
                    // torn or zeroed tail after a crash): go back to the last
                    // recorded chunk, which the scan found intact. If that
                    // boundary was tried already, the server's bytes changed
                    // under the same ETag: nothing before can be trusted.
                    let mut back = self.meta.recorded_len().min(at);
                    if overlap_failed_at == Some(back) {
                        back = 0;
                    }
                    overlap_failed_at = Some(back);
                    bar_warn!(self.ctx.multi,
                        "{label}: bytes {start}-{} of the partial file differ from the server's (a damaged end, e.g. after a crash); keeping the {back} bytes before the last chunk boundary that agrees",
                        at - 1
                    );
                    drop(file);
                    self.cut(back)?;
                    pending.clear();
                    if attempt >= ctx.client.retries {
                        return Err(self
                            .gave_up("the server's bytes keep disagreeing with the partial file"));
                    }
                    attempt += 1;
                }
                Err(fail) => {
                    let _ = file.sync_all();
                    state = Some(prog);
                    if ctx.units.aborted() {
                        return Err(FetchError::Aborted);
                    }
                    if fail.retryable() && attempt < ctx.client.retries {
                        let wait = fail.wait(attempt);
                        bar_warn!(
                            self.ctx.multi,
                            "{label}: {}; resuming in {wait:?}",
                            fail.describe()
                        );
                        std::thread::sleep(wait);
                        attempt += 1;
                        continue;
                    }
                    let kept = fs::metadata(&self.part).map(|m| m.len()).unwrap_or(0);
                    let mut e =
                        ctx.client
                            .map_fail(fail, &self.url, &ctx.what(label), ctx.repo, attempt);
                    if let FetchError::Http { reason, .. } = &mut e {
                        reason.push_str(&format!(
                            "; {kept} bytes kept in {}, rerun to resume",
                            self.part.display()
                        ));
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One request: resumes at `prog.len` (asking again for up to 64 KiB
    /// before it, compared with the `.part`) and appends the body.
    fn transfer(
        &mut self,
        file: &mut File,
        prog: &mut Progress,
        pending: &mut Vec<String>,
        progressed: &mut bool,
    ) -> Result<(), Fail> {
        let label = self.label;
        let have = prog.len;
        let ov = have.min(OVERLAP);
        let start = have - ov;
        let if_range = if have > 0 {
            self.meta.etag.clone()
        } else {
            None
        };
        let range = (have > 0).then_some((start, None));
        let (resp, first) = self.ctx.client.get(&self.url, range, if_range.as_deref())?;
        let header = |n: &str| first.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        if self.expected_sha.is_none() {
            self.expected_sha = header("x-linked-etag")
                .or_else(|| header("etag"))
                .map(clean_etag)
                .map(|s| s.to_ascii_lowercase())
                .filter(|s| is_sha256(s));
        }
        if self.expected_size.is_none() {
            self.expected_size = header("x-linked-size").and_then(|s| s.trim().parse().ok());
        }
        let etag = strong_etag(&resp);
        let status = resp.status();
        match status {
            206 => {
                let cr = resp.header("Content-Range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {start}-")) {
                    return Err(Fail::Transport(format!(
                        "asked for bytes {start}- but got Content-Range `{cr}`"
                    )));
                }
                if self.expected_size.is_none() {
                    self.expected_size = cr.rsplit('/').next().and_then(|s| s.parse().ok());
                }
                if let (Some(old), Some(new)) = (&self.meta.etag, &etag) {
                    if old != new {
                        // A server that ignores If-Range: do not splice.
                        return Err(Fail::Changed(format!(
                            "the file changed on the server (ETag {old} -> {new})"
                        )));
                    }
                }
            }
            200 => {
                if have > 0 {
                    match (&if_range, &etag) {
                        (Some(old), Some(new)) if old != new => bar_warn!(self.ctx.multi,
                            "{label}: the file changed on the server (ETag {old} -> {new}), so it sent the whole file (If-Range); starting over"
                        ),
                        _ => bar_warn!(self.ctx.multi,
                            "{label}: the server ignored the Range request; restarting the file"
                        ),
                    }
                    file.set_len(0)
                        .map_err(|e| Fail::Transport(format!("{}: {e}", self.part.display())))?;
                    *prog = Progress::new(self.meta.chunk_size);
                    self.meta.chunks.clear();
                    self.meta.repair = None;
                    pending.clear();
                    self.credit(0);
                }
                if self.expected_size.is_none() {
                    self.expected_size = resp.header("Content-Length").and_then(|s| s.parse().ok());
                }
            }
            s => return Err(Fail::Status(s, "unexpected status".into(), None)),
        }
        let mut r = resp.into_reader();
        if status == 206 && ov > 0 {
            let mut remote = vec![0u8; ov as usize];
            let got = read_full(&mut r, &mut remote, start)?;
            self.transferred += got as u64;
            if got < remote.len() {
                return Err(Fail::Transport(format!(
                    "connection broke at byte {}",
                    start + got as u64
                )));
            }
            let mut local = vec![0u8; ov as usize];
            file.read_exact_at(&mut local, start)
                .map_err(|e| Fail::Transport(format!("{}: {e}", self.part.display())))?;
            if local != remote {
                return Err(Fail::Overlap { start, at: have });
            }
        }
        // The server agrees with the tail: keep its validator, and record
        // the chunks read back from disk.
        let mut dirty = false;
        if etag.is_some() && etag != self.meta.etag {
            self.meta.etag = etag;
            dirty = true;
        }
        if self.meta.sha256.is_none() && self.expected_sha.is_some() {
            self.meta.sha256 = self.expected_sha.clone();
            dirty = true;
        }
        if self.meta.size.is_none() && self.expected_size.is_some() {
            self.meta.size = self.expected_size;
            dirty = true;
        }
        if !pending.is_empty() {
            if self.meta.chunks.len() as u64 + pending.len() as u64 == have / self.meta.chunk_size {
                self.meta.chunks.append(pending);
            }
            pending.clear();
            dirty = true;
        }
        if dirty {
            self.meta
                .save(&self.part)
                .map_err(|e| Fail::Transport(e.to_string()))?;
        }
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if self.ctx.units.aborted() {
                return Err(Fail::Transport("aborted".into()));
            }
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Fail::Transport(format!(
                        "connection broke after {} bytes: {e}",
                        prog.len
                    )))
                }
            };
            file.write_all(&buf[..n])
                .map_err(|e| Fail::Transport(format!("writing {}: {e}", self.part.display())))?;
            let (meta, part) = (&mut self.meta, &self.part);
            prog.update(&buf[..n], |i, h| {
                // Durable bytes first, then the record that describes them.
                if i as usize == meta.chunks.len() {
                    file.sync_data()
                        .map_err(|e| Fail::Transport(format!("{}: {e}", part.display())))?;
                    meta.chunks.push(h);
                    meta.save(part)
                        .map_err(|e| Fail::Transport(e.to_string()))?;
                }
                Ok(())
            })?;
            self.transferred += n as u64;
            self.credit(prog.len);
            *progressed = true;
        }
        Ok(())
    }

    /// Compares the complete `.part` with the server's bytes chunk by chunk
    /// from the record's repair cursor, rewriting only what differs, then
    /// checks the whole file again.
    fn repair(&mut self, prog: Progress) -> Result<Step, FetchError> {
        let ctx = self.ctx;
        let label = self.label;
        let size = prog.len;
        let cs = self.meta.chunk_size;
        let n = size.div_ceil(cs);
        let mut r = self.meta.repair.clone().unwrap_or_default();
        if r.cursor == 0 && r.downloaded == 0 {
            bar_warn!(self.ctx.multi,
                "{label}: repairing {}: comparing it with the hub's bytes in {} chunks, rewriting the ones that differ",
                self.part.display(),
                n
            );
        } else {
            bar_warn!(
                self.ctx.multi,
                "{label}: continuing the repair at chunk {}/{n} (byte {})",
                r.cursor,
                r.cursor * cs
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.part)
            .map_err(|e| FsError::io(&self.part, e))?;
        self.bar
            .set_message(short_name(&format!("repair {label}"), NAME_WIDTH));
        self.bar.set_length(size);
        self.bar.set_position((r.cursor * cs).min(size));
        let mut attempt = 0u32;
        while r.cursor < n {
            if ctx.units.aborted() {
                return Err(FetchError::Aborted);
            }
            let a = r.cursor * cs;
            let b = (a + cs).min(size);
            let mut progressed = false;
            match self.compare_range(&file, a, b, &mut r, &mut progressed) {
                Ok(()) => {
                    file.sync_data().map_err(|e| FsError::io(&self.part, e))?;
                    r.cursor += 1;
                    self.meta.repair = Some(r.clone());
                    self.save_meta()?;
                    attempt = 0;
                }
                Err(Fail::Changed(why)) => {
                    bar_warn!(
                        self.ctx.multi,
                        "{label}: {why}; the repair cannot use it: starting the file over"
                    );
                    drop(file);
                    self.cut(0)?;
                    return Ok(Step::Restart);
                }
                Err(fail) => {
                    if progressed {
                        attempt = 0;
                    }
                    self.meta.repair = Some(r.clone());
                    self.save_meta()?;
                    if ctx.units.aborted() {
                        return Err(FetchError::Aborted);
                    }
                    if fail.retryable() && attempt < ctx.client.retries {
                        let wait = fail.wait(attempt);
                        bar_warn!(
                            self.ctx.multi,
                            "{label}: repair: {}; retrying chunk {} in {wait:?}",
                            fail.describe(),
                            r.cursor
                        );
                        std::thread::sleep(wait);
                        attempt += 1;
                        continue;
                    }
                    let mut e =
                        ctx.client
                            .map_fail(fail, &self.url, &ctx.what(label), ctx.repo, attempt);
                    if let FetchError::Http { reason, .. } = &mut e {
                        reason.push_str(&format!(
                            "; the repair of {} continues at byte {} on rerun",
                            self.part.display(),
                            r.cursor * cs
                        ));
                    }
                    return Err(e);
                }
            }
        }
        drop(file);
        // Hash the repaired file again and record its chunks.
        self.meta.chunks.clear();
        let s = part::scan(&self.part, &mut self.meta, &ProgressBar::hidden())?;
        self.meta.chunks = s.pending;
        if r.differed.is_empty() {
            bar_warn!(self.ctx.multi,
                "{label}: repair compared all {n} chunks ({} downloaded) and found no byte that differs",
                crate::cli::human_bytes(r.downloaded)
            );
        } else {
            bar_warn!(self.ctx.multi,
                "{label}: repair rewrote {} in {} that differed from the hub's ({} downloaded to compare)",
                crate::cli::human_bytes(r.differing_bytes()),
                r.describe(),
                crate::cli::human_bytes(r.downloaded)
            );
        }
        self.meta.repair = None;
        self.repaired = Some(r);
        self.finish(s.progress).map(Step::Done)
    }

    /// Fetches bytes `[a, b)` and compares them with the `.part`, writing
    /// the ones that differ in place.
    fn compare_range(
        &mut self,
        file: &File,
        a: u64,
        b: u64,
        r: &mut Repair,
        progressed: &mut bool,
    ) -> Result<(), Fail> {
        let (resp, _) =
            self.ctx
                .client
                .get(&self.url, Some((a, Some(b - 1))), self.meta.etag.as_deref())?;
        let etag = strong_etag(&resp);
        match resp.status() {
            206 => {
                let cr = resp.header("Content-Range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {a}-{}/", b - 1)) {
                    return Err(Fail::Transport(format!(
                        "asked for bytes {a}-{} but got Content-Range `{cr}`",
                        b - 1
                    )));
                }
                if let (Some(old), Some(new)) = (&self.meta.etag, &etag) {
                    if old != new {
                        return Err(Fail::Changed(format!(
                            "the file changed on the server (ETag {old} -> {new})"
                        )));
                    }
                }
            }
            200 => {
                return Err(Fail::Changed(format!(
                    "the server sent the whole file instead of bytes {a}-{} (ETag {} -> {})",
                    b - 1,
                    self.meta.etag.as_deref().unwrap_or("none"),
                    etag.as_deref().unwrap_or("none")
                )))
            }
            s => return Err(Fail::Status(s, "unexpected status".into(), None)),
        }
        let mut rd = resp.into_reader();
        let mut remote = vec![0u8; 1 << 20];
        let mut local = vec![0u8; 1 << 20];
        let mut pos = a;
        while pos < b {
            let want = ((b - pos) as usize).min(remote.len());
            let got = read_full(&mut rd, &mut remote[..want], pos)?;
            if got == 0 {
                return Err(Fail::Transport(format!("connection broke at byte {pos}")));
            }
            let io = |e: std::io::Error| Fail::Transport(format!("{}: {e}", self.part.display()));
            file.read_exact_at(&mut local[..got], pos).map_err(io)?;
            let (rs, ls) = (&remote[..got], &local[..got]);
            if rs != ls {
                let first = rs.iter().zip(ls).position(|(x, y)| x != y).unwrap_or(0);
                let last = rs
                    .iter()
                    .zip(ls)
                    .rposition(|(x, y)| x != y)
                    .unwrap_or(first);
                file.write_all_at(&rs[first..=last], pos + first as u64)
                    .map_err(io)?;
                r.add_diff(pos + first as u64, pos + last as u64 + 1);
            }
            pos += got as u64;
            r.downloaded += got as u64;
            self.transferred += got as u64;
            self.bar.set_position(pos);
            *progressed = true;
        }
        Ok(())
    }

    /// Verifies the complete `.part` and renames it into place; on a
    /// mismatch keeps it, marked for repair by the next run.
    fn finish(&mut self, prog: Progress) -> Result<FileResult, FetchError> {
        let ctx = self.ctx;
        let label = self.label.to_string();
        if let Some(s) = self.expected_size {
            if prog.len != s {
                let _ = fs::remove_file(&self.part);
                PartMeta::remove(&self.part);
                return Err(FetchError::Checksum {
                    file: label,
                    reason: format!(
                        "size mismatch: the hub says {s} bytes, got {}; the partial download was deleted, rerun to fetch it again",
                        prog.len
                    ),
                });
            }
        }
        let got = prog.sha_hex();
        let mismatch = if let Some(want) = &self.expected_sha {
            (&got != want).then(|| {
                format!("sha256 mismatch: the hub says {want}, the downloaded bytes hash to {got}")
            })
        } else if let Some(oid) = self.f.oid.as_deref().filter(|o| is_git_oid(o)) {
            let g = part::git_blob_sha1(&self.part)?;
            (g != oid.to_ascii_lowercase()).then(|| {
                format!(
                    "git blob id mismatch: the hub says {oid}, the downloaded bytes hash to {g}"
                )
            })
        } else {
            None
        };
        if let Some(what) = mismatch {
            self.meta.repair = Some(Repair::default());
            self.save_meta()?;
            let next = match &self.repaired {
                Some(r) => format!(
                    " even after a repair pass compared every chunk with the hub ({} differed): the hub serves bytes that do not match its own hash; kept {}, a rerun compares again",
                    r.describe(),
                    self.part.display()
                ),
                None => format!(
                    "; kept {} ({}): rerun to repair it (it is compared with the hub chunk by chunk and only differing chunks are rewritten)",
                    self.part.display(),
                    crate::cli::human_bytes(prog.len)
                ),
            };
            return Err(FetchError::Checksum {
                file: label,
                reason: format!("{what}{next}"),
            });
        }
        if label.ends_with(".safetensors") {
            super::local::validate_safetensors(&self.part)?;
        }
        fsutil::commit_temp(&self.part, &self.final_path)?;
        PartMeta::remove(&self.part);
        let blob_id = self.expected_sha.clone().or_else(|| self.f.oid.clone());
        if let (Some(c), Some(id)) = (&ctx.cache, blob_id) {
            c.store(&self.final_path, &id, ctx.commit, &label)?;
        }
        ctx.units.done(
            &label,
            prog.len,
            Some(prog.b3.finalize().to_hex().to_string()),
        )?;
        Ok(FileResult {
            transferred: self.transferred,
            reused: false,
            sha256: self.expected_sha.as_ref().map(|_| got),
            size: prog.len,
        })
    }
}

/// A file already in the output dir (from a run killed before recording
/// it) or in the HF cache: used when its hash matches the hub's (sha256 for
/// LFS files, the git blob id for others).
fn reuse_existing(
    ctx: &Ctx,
    f: &RemoteFile,
    final_path: &Path,
) -> Result<Option<FileResult>, FetchError> {
    let key = match (&f.sha256, &f.oid) {
        (Some(sha), _) => sha.clone(),
        (None, Some(oid)) if is_git_oid(oid) => oid.to_ascii_lowercase(),
        _ => return Ok(None),
    };
    let mut candidates = vec![final_path.to_path_buf()];
    if let Some(c) = &ctx.cache {
        if let Some(b) = c.find_blob(&key, f.size) {
            candidates.push(b);
        }
    }
    for cand in candidates {
        let Ok(m) = fs::metadata(&cand) else { continue };
        if f.size.is_some_and(|s| s != m.len()) {
            continue;
        }
        let h = Hashes::of_file(&cand, &ProgressBar::hidden())?;
        let got = if f.sha256.is_some() {
            format!("{:x}", h.sha.clone().finalize())
        } else {
            part::git_blob_sha1(&cand)?
        };
        if got != key {
            tracing::warn!(
                "{}: existing copy has the wrong hash; downloading",
                cand.display()
            );
            continue;
        }
        if cand != final_path {
            ctx.units.claim(&f.path)?;
            super::local::link_or_copy(&cand, final_path, &ProgressBar::hidden())?;
            tracing::info!("{}: reused from the HF cache", f.path);
        }
        if let Some(c) = &ctx.cache {
            c.store(final_path, &key, ctx.commit, &f.path)?;
        }
        ctx.bar.inc(m.len());
        ctx.units
            .done(&f.path, m.len(), Some(h.b3.finalize().to_hex().to_string()))?;
        return Ok(Some(FileResult {
            transferred: 0,
            reused: true,
            sha256: f.sha256.clone(),
            size: m.len(),
        }));
    }
    Ok(None)
}

/// `--offline`: the files of the cached snapshot of `revision`.
fn offline(
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
        let (h, _) = super::local::link_or_copy(&canon, &target, &bar)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            short_name("model-00001-of-00041.safetensors", 32),
            "model-00001-of-00041.safetensors"
        );
        assert_eq!(
            short_name("model_extra_tensors_mtp.safetensors", 32),
            "model_extra_tensors_mtp"
        );
        assert_eq!(short_name("abcdefghij", 5), "…ghij");
    }
}

//! The Hugging Face hub (or a mirror) over plain HTTP(S), with our own
//! client (hf-hub 0.5 breaks on CDN-served large files and 1.0 dropped
//! resume; see `docs/research/crates.md`).
//!
//! Protocol, as huggingface.co serves it:
//!
//! 1. `GET {endpoint}/api/models/{repo}/revision/{rev}`: JSON with `sha` (the
//!    commit, pinned in the record) and `siblings[].rfilename`;
//! 2. `GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=1`: entries
//!    with `path`, `size`, `oid` and, for LFS files, `lfs.oid` (sha256) and
//!    `lfs.size` (paginated with a `Link: <...>; rel="next"` header);
//! 3. `GET {endpoint}/{repo}/resolve/{commit}/{path}`: the bytes, often via a
//!    redirect to a CDN; `X-Linked-Etag` (or `ETag`) carries the sha256 of
//!    LFS files. Redirects are followed by hand so the token is never sent
//!    to another host.
//!
//! Each file downloads into `<file>.part`, resumes with `Range: bytes=N-`
//! after a dropped connection, a stall (read timeout), a 5xx or a 429
//! (exponential backoff; the retry budget is refilled whenever a retry made
//! progress), a kill, or a rerun; a `200` reply to a Range request restarts
//! the file. The sha256 is checked before the rename: a mismatch deletes the
//! `.part` and fails with one line naming the file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::hf_cache::RepoCache;
use super::{
    check_disk, ensure_parent, parallel, safe_relative, with_suffix, FetchError, FetchOptions,
    Fetched, Filter, Units,
};
use crate::fsutil::{self, FsError};

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
}

impl Fail {
    fn retryable(&self) -> bool {
        match self {
            Fail::Status(s, _, _) => *s >= 500 || *s == 429 || *s == 408,
            Fail::Transport(_) => true,
        }
    }
    fn describe(&self) -> String {
        match self {
            Fail::Status(s, body, _) if body.is_empty() => format!("HTTP {s}"),
            Fail::Status(s, body, _) => format!("HTTP {s}: {body}"),
            Fail::Transport(t) => t.clone(),
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
    /// hub's own origin). Returns the final response and the headers of the
    /// first one (where the hub puts `X-Linked-Etag` and `X-Repo-Commit`).
    fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> Result<(ureq::Response, Vec<(String, String)>), Fail> {
        let hub_origin = origin(&self.endpoint).to_string();
        let mut url = url.to_string();
        let mut first: Option<Vec<(String, String)>> = None;
        for _ in 0..8 {
            let mut req = self.agent.get(&url).set("Accept-Encoding", "identity");
            if range_from > 0 {
                req = req.set("Range", &format!("bytes={range_from}-"));
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
            match self.get(url, 0) {
                Ok(r) => return Ok(r),
                Err(f) if f.retryable() && attempt < self.retries => {
                    let wait = match &f {
                        Fail::Status(_, _, Some(d)) => *d,
                        _ => backoff(attempt),
                    };
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
        let mut f = File::open(path).map_err(|e| FsError::io(path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| FsError::io(path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            bar.inc(n as u64);
        }
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
    bar: indicatif::ProgressBar,
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
        if !safe_relative(&f.path) {
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
    let total: u64 = files.iter().filter_map(|f| f.size).sum();
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
        .sum();
    check_disk(&units.out, need)?;
    let ctx = Ctx {
        client: &client,
        opts,
        repo,
        commit: &commit,
        units,
        cache,
        bar: crate::cli::bytes_bar(total, repo.rsplit('/').next().unwrap_or(repo), opts.quiet),
    };
    ctx.bar
        .inc(total.saturating_sub(todo.iter().filter_map(|f| f.size).sum()));
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
    let h = Hashes::of_file(path, &indicatif::ProgressBar::hidden())?;
    Ok(format!("{:x}", h.sha.finalize()))
}

/// Downloads (or reuses) one file.
fn download(ctx: &Ctx, f: &RemoteFile) -> Result<FileResult, FetchError> {
    let final_path = ctx.units.out.join(&f.path);
    let part = with_suffix(&final_path, ".part");
    let label = f.path.as_str();
    ensure_parent(&final_path)?;
    if ctx.opts.force {
        let _ = fs::remove_file(&part);
    } else if let Some(done) = reuse_existing(ctx, f, &final_path)? {
        return Ok(done);
    }
    let url = ctx.client.resolve_url(ctx.repo, ctx.commit, &f.path);
    let mut hashes: Option<Hashes> = None;
    let mut expected_sha = f.sha256.clone();
    let mut expected_size = f.size;
    let mut attempt = 0u32;
    let mut transferred = 0u64;
    loop {
        if ctx.units.aborted() {
            return Err(FetchError::Aborted);
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&part)
            .map_err(|e| FsError::io(&part, e))?;
        let mut have = file.metadata().map_err(|e| FsError::io(&part, e))?.len();
        if expected_size.is_some_and(|s| have > s) {
            tracing::warn!("{label}: partial file is longer than the file; restarting it");
            file.set_len(0).map_err(|e| FsError::io(&part, e))?;
            have = 0;
            hashes = None;
        }
        let mut h = match hashes.take() {
            Some(h) if h.len == have => h,
            _ => Hashes::of_file(&part, &ctx.bar)?,
        };
        if have > 0 && Some(have) == expected_size {
            // Complete already (killed between the last byte and the rename).
            return finish(
                ctx,
                f,
                &part,
                &final_path,
                h,
                expected_sha,
                expected_size,
                transferred,
            );
        }
        let mut progressed = false;
        let outcome = (|| -> Result<(), Fail> {
            let (resp, first) = ctx.client.get(&url, have)?;
            let header = |n: &str| first.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
            if expected_sha.is_none() {
                expected_sha = header("x-linked-etag")
                    .or_else(|| header("etag"))
                    .map(clean_etag)
                    .map(|s| s.to_ascii_lowercase())
                    .filter(|s| is_sha256(s));
            }
            if expected_size.is_none() {
                expected_size = header("x-linked-size").and_then(|s| s.trim().parse().ok());
            }
            match resp.status() {
                206 => {
                    let cr = resp.header("Content-Range").unwrap_or("");
                    if !cr.starts_with(&format!("bytes {have}-")) {
                        return Err(Fail::Transport(format!(
                            "asked for bytes {have}- but got Content-Range `{cr}`"
                        )));
                    }
                    if expected_size.is_none() {
                        expected_size = cr.rsplit('/').next().and_then(|s| s.parse().ok());
                    }
                }
                200 => {
                    if have > 0 {
                        tracing::warn!(
                            "{label}: the server ignored the Range request; restarting the file"
                        );
                        file.set_len(0)
                            .map_err(|e| Fail::Transport(e.to_string()))?;
                        ctx.bar
                            .set_position(ctx.bar.position().saturating_sub(have));
                        h = Hashes::new();
                    }
                    if expected_size.is_none() {
                        expected_size = resp.header("Content-Length").and_then(|s| s.parse().ok());
                    }
                }
                s => return Err(Fail::Status(s, "unexpected status".into(), None)),
            }
            let mut r = resp.into_reader();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                if ctx.units.aborted() {
                    return Err(Fail::Transport("aborted".into()));
                }
                let n = match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(Fail::Transport(format!(
                            "connection broke after {} bytes: {e}",
                            h.len
                        )))
                    }
                };
                file.write_all(&buf[..n])
                    .map_err(|e| Fail::Transport(format!("writing {}: {e}", part.display())))?;
                h.update(&buf[..n]);
                transferred += n as u64;
                ctx.bar.inc(n as u64);
                progressed = true;
            }
            Ok(())
        })();
        if progressed {
            // Bytes kept: the retry budget starts again.
            attempt = 0;
        }
        match outcome {
            Ok(_) => {
                if expected_size.is_some_and(|s| h.len < s) {
                    // The body ended early without an error: resume.
                    hashes = Some(h);
                    if attempt >= ctx.client.retries {
                        return Err(FetchError::Http {
                            what: format!("{}@{}: {label}", ctx.repo, ctx.commit),
                            reason: "the connection keeps ending early; rerun to resume".into(),
                        });
                    }
                    attempt += 1;
                    continue;
                }
                file.sync_all().map_err(|e| FsError::io(&part, e))?;
                drop(file);
                return finish(
                    ctx,
                    f,
                    &part,
                    &final_path,
                    h,
                    expected_sha,
                    expected_size,
                    transferred,
                );
            }
            Err(Fail::Status(416, _, _)) => {
                // Our partial file does not fit the remote one: start over.
                tracing::warn!("{label}: the server refused the resume range; restarting the file");
                drop(file);
                let _ = fs::remove_file(&part);
                hashes = None;
                if attempt >= ctx.client.retries {
                    return Err(FetchError::Http {
                        what: format!("{}@{}: {label}", ctx.repo, ctx.commit),
                        reason: "the server keeps refusing the resume range (HTTP 416)".into(),
                    });
                }
                attempt += 1;
            }
            Err(fail) => {
                let _ = file.sync_all();
                hashes = Some(h);
                if ctx.units.aborted() {
                    return Err(FetchError::Aborted);
                }
                if fail.retryable() && attempt < ctx.client.retries {
                    let wait = match &fail {
                        Fail::Status(_, _, Some(d)) => *d,
                        _ => backoff(attempt),
                    };
                    tracing::warn!("{label}: {}; resuming in {wait:?}", fail.describe());
                    std::thread::sleep(wait);
                    attempt += 1;
                    continue;
                }
                let kept = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                let mut e = ctx.client.map_fail(
                    fail,
                    &url,
                    &format!("{}@{}: {label}", ctx.repo, ctx.commit),
                    ctx.repo,
                    attempt,
                );
                if let FetchError::Http { reason, .. } = &mut e {
                    reason.push_str(&format!(
                        "; {kept} bytes kept in {}, rerun to resume",
                        part.display()
                    ));
                }
                return Err(e);
            }
        }
    }
}

/// A file already in the output dir (from a run killed before recording
/// it) or in the HF cache: used when its hash matches the hub's.
fn reuse_existing(
    ctx: &Ctx,
    f: &RemoteFile,
    final_path: &Path,
) -> Result<Option<FileResult>, FetchError> {
    let Some(sha) = &f.sha256 else {
        return Ok(None);
    };
    let mut candidates = vec![final_path.to_path_buf()];
    if let Some(c) = &ctx.cache {
        if let Some(b) = c.find_blob(sha, f.size) {
            candidates.push(b);
        }
    }
    for cand in candidates {
        let Ok(m) = fs::metadata(&cand) else { continue };
        if f.size.is_some_and(|s| s != m.len()) {
            continue;
        }
        let h = Hashes::of_file(&cand, &indicatif::ProgressBar::hidden())?;
        let got = format!("{:x}", h.sha.clone().finalize());
        if &got != sha {
            tracing::warn!(
                "{}: existing copy has the wrong sha256; downloading",
                cand.display()
            );
            continue;
        }
        if cand != final_path {
            super::local::link_or_copy(&cand, final_path, &indicatif::ProgressBar::hidden())?;
            tracing::info!("{}: reused from the HF cache", f.path);
        }
        if let Some(c) = &ctx.cache {
            c.store(final_path, sha, ctx.commit, &f.path)?;
        }
        ctx.bar.inc(m.len());
        ctx.units
            .done(&f.path, m.len(), Some(h.b3.finalize().to_hex().to_string()))?;
        return Ok(Some(FileResult {
            transferred: 0,
            reused: true,
            sha256: Some(got),
            size: m.len(),
        }));
    }
    Ok(None)
}

/// Verifies a complete `.part` and renames it into place.
#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &Ctx,
    f: &RemoteFile,
    part: &Path,
    final_path: &Path,
    h: Hashes,
    expected_sha: Option<String>,
    expected_size: Option<u64>,
    transferred: u64,
) -> Result<FileResult, FetchError> {
    let label = f.path.clone();
    if let Some(s) = expected_size {
        if h.len != s {
            let _ = fs::remove_file(part);
            return Err(FetchError::Checksum {
                file: label,
                reason: format!("size mismatch: the hub says {s} bytes, got {}", h.len),
            });
        }
    }
    let got = format!("{:x}", h.sha.finalize());
    if let Some(want) = &expected_sha {
        if &got != want {
            let _ = fs::remove_file(part);
            return Err(FetchError::Checksum {
                file: label,
                reason: format!(
                    "sha256 mismatch: the hub says {want}, downloaded bytes hash to {got}"
                ),
            });
        }
    }
    if f.path.ends_with(".safetensors") {
        super::local::validate_safetensors(part)?;
    }
    fsutil::commit_temp(part, final_path)?;
    let blob_id = expected_sha.clone().or_else(|| f.oid.clone());
    if let (Some(c), Some(id)) = (&ctx.cache, blob_id) {
        c.store(final_path, &id, ctx.commit, &f.path)?;
    }
    ctx.units
        .done(&f.path, h.len, Some(h.b3.finalize().to_hex().to_string()))?;
    Ok(FileResult {
        transferred,
        reused: false,
        sha256: expected_sha.map(|_| got),
        size: h.len,
    })
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
        .filter(|(r, _)| safe_relative(r) && filter.wants(r))
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
        if is_sha256(&blob) {
            let got = sha256_file(&canon)?;
            if got != blob {
                return Err(FetchError::Checksum {
                    file: rel.clone(),
                    reason: format!("cached blob {} hashes to {got}", canon.display()),
                });
            }
        }
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
    }
}

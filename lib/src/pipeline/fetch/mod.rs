//! `rh-fetch`: get a checkpoint into the work dir, resumably and verified.
//!
//! Sources ([`Source::parse`]):
//!
//! * `synthetic:tiny`, `synthetic:qwen3-next-80b`: generated locally by
//!   [`crate::synthetic`], each shard streamed to a temp file, fsynced and
//!   renamed ([`synthetic`]);
//! * `dir:PATH` or an existing directory: a local checkpoint (or a snapshot
//!   in the Hugging Face cache), hardlinked or copied after its safetensors
//!   headers are validated ([`local`]);
//! * `hf:OWNER/NAME[@REV]` or plain `OWNER/NAME`: the Hugging Face hub (or a
//!   mirror at `--endpoint`), over our own HTTP client with Range and
//!   If-Range resume, retries, sha256 (LFS) and git blob id checks, and a
//!   chunk-by-chunk repair of a file that fails them ([`hub`], [`part`]);
//!   stored in the standard Hugging Face cache, which the checkpoint links
//!   into, and taken from it without a transfer when already there
//!   ([`hf_cache`]; `rh-fetch` makes it the default, `--no-hf-cache` keeps
//!   plain files).
//!
//! * `https://host/path/` (or `hf:OWNER/NAME` with `--expect`): a published
//!   verified cache, checked against the manifest hash given with
//!   `--expect`, every chunk as it arrives ([`published`]); the pipeline
//!   then has nothing to repack.
//!
//! Each file is a unit of the `fetch` stage record ([`crate::stage`]): a
//! killed run resumes where it stopped, a finished one is "up to date".

pub mod api;
pub mod client;
pub mod download;
pub mod hf_cache;
pub mod hub;
pub mod local;
pub mod offline;
pub mod part;
mod progress;
pub mod published;
pub mod synthetic;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::cli::{Classify, Exit};
use crate::fsutil::FsError;
use crate::stage::{self, Output, Plan, StageError, StageRun};

/// The stage name in records.
pub const STAGE: &str = "fetch";

/// The default hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Errors of `rh-fetch`; each message is one line naming the file or repo.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source string is not understood.
    #[error("source `{0}` not understood: use hf:OWNER/NAME[@REVISION], OWNER/NAME, dir:PATH, https://HOST/PATH/ (a published cache), synthetic:tiny or synthetic:qwen3-next-80b")]
    BadSource(String),
    /// A flag or manifest value is wrong.
    #[error("{0}")]
    Usage(String),
    /// The synthetic generator refused its settings.
    #[error(transparent)]
    Synthetic(#[from] crate::synthetic::SyntheticError),
    /// The stage record could not be read or written.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A file operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A local checkpoint file is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The hub refused access.
    #[error("{repo}: the hub refused access (HTTP {status}) to {url}: {hint}")]
    Auth {
        /// The repo.
        repo: String,
        /// 401 or 403.
        status: u16,
        /// The URL refused.
        url: String,
        /// What to do about it.
        hint: String,
    },
    /// Repo, revision or file not found.
    #[error("{what}: not found on {endpoint} (HTTP 404); check the repo name, the revision and the file name")]
    NotFound {
        /// `repo@revision` or `repo@revision: file`.
        what: String,
        /// The hub.
        endpoint: String,
    },
    /// An HTTP exchange failed for good (after retries where they apply).
    #[error("{what}: {reason}")]
    Http {
        /// What was being fetched.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Downloaded or cached bytes do not match the hub's hash or size
    /// (`reason` says what was kept and what a rerun does).
    #[error("{file}: {reason}")]
    Checksum {
        /// The file.
        file: String,
        /// What did not match.
        reason: String,
    },
    /// A name from the hub would escape the output directory.
    #[error("{repo}: refusing file name `{name}` from the hub (absolute, `..` or otherwise escaping the output directory)")]
    UnsafeName {
        /// The repo.
        repo: String,
        /// The name.
        name: String,
    },
    /// `--offline` and the files are not cached.
    #[error("{0}")]
    Offline(String),
    /// Not enough free disk space.
    #[error("{dir}: needs {need} more but only {free} is free; free some space or pass --out on another disk")]
    Disk {
        /// The output directory.
        dir: PathBuf,
        /// Bytes still to write (human readable).
        need: String,
        /// Bytes free (human readable).
        free: String,
    },
    /// Another worker failed; this one stopped early (never shown alone).
    #[error("stopped because another download failed")]
    Aborted,
}

impl Classify for FetchError {
    fn exit(&self) -> Exit {
        match self {
            FetchError::BadSource(_) | FetchError::Usage(_) => Exit::Usage,
            FetchError::Synthetic(e) => e.exit(),
            FetchError::Stage(e) => e.exit(),
            FetchError::Checksum { .. } => Exit::VerifyFailed,
            _ => Exit::Failure,
        }
    }
}

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A generated checkpoint of a preset.
    Synthetic(String),
    /// A local checkpoint directory.
    Local(PathBuf),
    /// A published cache on a static HTTP server (base URL ending in `/`).
    Url(String),
    /// A hub repo, with the revision given in the source (`@REV`), if any.
    Hub {
        /// `OWNER/NAME`.
        repo: String,
        /// Branch, tag or commit from `@REV`.
        revision: Option<String>,
    },
}

fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Source {
    /// Parses a source string. A plain string names a local directory when
    /// one exists at that path, else a hub repo `OWNER/NAME[@REV]`.
    pub fn parse(s: &str) -> Result<Source, FetchError> {
        let bad = || FetchError::BadSource(s.to_string());
        if let Some(p) = s.strip_prefix("synthetic:") {
            return Ok(Source::Synthetic(p.to_string()));
        }
        if let Some(p) = s.strip_prefix("dir:") {
            if p.is_empty() {
                return Err(bad());
            }
            return Ok(Source::Local(PathBuf::from(p)));
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return published::base_url(s).map(Source::Url).ok_or_else(bad);
        }
        let hub = if let Some(r) = s.strip_prefix("hf:") {
            r
        } else if Path::new(s).is_dir() {
            return Ok(Source::Local(PathBuf::from(s)));
        } else {
            s
        };
        let (repo, revision) = match hub.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err(bad()),
            None => (hub, None),
        };
        let mut parts = repo.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(n), None) if valid_repo_part(o) && valid_repo_part(n) => {
                Ok(Source::Hub {
                    repo: repo.to_string(),
                    revision,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// Everything `rh-fetch` needs, after flags and manifest are merged.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The source string ([`Source::parse`]).
    pub source: String,
    /// Revision from `--revision` or `[model] revision` (`@REV` in the
    /// source is used when this is `None`; default `main`).
    pub revision: Option<String>,
    /// Where the stage record goes (`<work_dir>/stages/fetch.json`).
    pub work_dir: PathBuf,
    /// The checkpoint directory to produce.
    pub out: PathBuf,
    /// Glob patterns of files to fetch (empty: all).
    pub include: Vec<String>,
    /// Glob patterns of files to skip.
    pub exclude: Vec<String>,
    /// Files transferred at once.
    pub concurrency: usize,
    /// Use only what is cached (hub sources).
    pub offline: bool,
    /// Synthetic: layer count.
    pub layers: Option<usize>,
    /// Synthetic: routed experts per layer.
    pub experts: Option<usize>,
    /// Synthetic: seed.
    pub seed: u64,
    /// The hub's base URL.
    pub endpoint: String,
    /// Bearer token for the hub.
    pub token: Option<String>,
    /// The HF hub cache directory (`.../huggingface/hub`) that hub sources
    /// reuse files from, store downloads in and link the checkpoint into
    /// (`None`: the checkpoint gets its own copies, and `--offline` reads
    /// the default cache).
    pub hf_cache: Option<PathBuf>,
    /// Redo everything.
    pub force: bool,
    /// Hide progress bars.
    pub quiet: bool,
    /// Retries of a failing request (reset whenever a retry made progress).
    pub retries: u32,
    /// A read that stalls this long counts as a dropped connection.
    pub read_timeout: Duration,
    /// Chunk size of the received-bytes record and of repairs (default
    /// [`part::DEFAULT_CHUNK`]; a `.part` keeps the size it was started with).
    pub chunk_size: u64,
    /// The manifest hash of a published cache (`--expect`): makes an `hf:`
    /// source a published cache, and is required for `https://` sources.
    pub expect: Option<String>,
    /// Where a published cache goes (the pipeline's cache directory);
    /// `None`: `out`.
    pub cache_out: Option<PathBuf>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            source: crate::pipeline::DEFAULT_SOURCE.to_string(),
            revision: None,
            work_dir: PathBuf::from("work"),
            out: PathBuf::from("work/checkpoint"),
            include: Vec::new(),
            exclude: Vec::new(),
            concurrency: 4,
            offline: false,
            layers: None,
            experts: None,
            seed: 0,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            hf_cache: None,
            force: false,
            quiet: false,
            retries: 6,
            read_timeout: Duration::from_secs(60),
            chunk_size: part::DEFAULT_CHUNK,
            expect: None,
            cache_out: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FetchSummary {
    /// True when nothing had to be done.
    pub up_to_date: bool,
    /// The source string.
    pub source: String,
    /// The checkpoint directory.
    pub out_dir: PathBuf,
    /// The pinned hub commit, for hub sources.
    pub commit: Option<String>,
    /// Files in the checkpoint.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// Bytes downloaded or generated by this run.
    pub transferred: u64,
    /// Files taken from the HF cache, a local dir, or an earlier run.
    pub reused: usize,
    /// The manifest hash, when the source was a published cache.
    pub published: Option<String>,
}

impl FetchSummary {
    /// The summary as one JSON object (for `--json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("summary serializes")
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        let commit = self
            .commit
            .as_deref()
            .map(|c| format!(" (commit {c})"))
            .unwrap_or_default();
        let ready = self
            .published
            .as_deref()
            .map(|h| format!("; a published cache, every chunk checked against manifest {h}: ready to serve, nothing to repack"))
            .unwrap_or_default();
        if self.up_to_date {
            format!(
                "up to date: {} files, {} in {}{commit}{ready} (--force to fetch again)",
                self.files,
                crate::cli::human_bytes(self.bytes),
                self.out_dir.display()
            )
        } else {
            format!(
                "fetched {}: {} files, {} in {}{commit}; {} transferred, {} files reused{ready}",
                self.source,
                self.files,
                crate::cli::human_bytes(self.bytes),
                self.out_dir.display(),
                crate::cli::human_bytes(self.transferred),
                self.reused
            )
        }
    }
}

/// Include/exclude glob filter over relative file paths.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl Filter {
    /// Compiles the patterns; a bad pattern is a usage error.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, FetchError> {
        let compile = |v: &[String]| {
            v.iter()
                .map(|p| {
                    glob::Pattern::new(p)
                        .map_err(|e| FetchError::Usage(format!("bad glob pattern `{p}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Filter {
            include: compile(include)?,
            exclude: compile(exclude)?,
        })
    }

    /// Whether `path` (relative, `/`-separated) is wanted. A pattern matches
    /// the whole path or, when it has no `/`, the file name alone.
    pub fn wants(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        let hit =
            |p: &glob::Pattern| p.matches(path) || (!p.as_str().contains('/') && p.matches(name));
        (self.include.is_empty() || self.include.iter().any(hit)) && !self.exclude.iter().any(hit)
    }
}

/// Checks that a relative file name from a remote or a listing stays inside
/// the output directory: no absolute paths, `..`, empty parts or backslashes.
pub fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && !name.contains('\0')
        && !name.ends_with(".part")
        && !name.ends_with(".part.meta")
        && !name.ends_with(".tmp")
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
}

/// The stage record shared by workers: completed units, saved atomically.
pub(crate) struct Units {
    run: Mutex<StageRun>,
    /// The checkpoint directory.
    pub out: PathBuf,
    /// Set when a worker failed, so others stop.
    pub abort: AtomicBool,
    /// Files in `out` that earlier runs of this stage wrote (so may be
    /// replaced); anything else in the way is refused unless `force`.
    owned: std::collections::BTreeSet<String>,
    force: bool,
}

impl Units {
    fn new(
        run: StageRun,
        out: PathBuf,
        owned: std::collections::BTreeSet<String>,
        force: bool,
    ) -> Self {
        Units {
            run: Mutex::new(run),
            out,
            abort: AtomicBool::new(false),
            owned,
            force,
        }
    }

    /// Checks that `rel` may be written: nothing is there, or a file an
    /// earlier run of this stage wrote, or `--force` was given. A user's
    /// own file in the way is refused, naming it.
    pub fn claim(&self, rel: &str) -> Result<(), FetchError> {
        let target = self.out.join(rel);
        if self.force || self.owned.contains(rel) {
            return Ok(());
        }
        match std::fs::symlink_metadata(&target) {
            Err(_) => Ok(()),
            Ok(_) => Err(FsError::NotOurs {
                path: target,
                what: "already exists and was not written by rh-fetch".into(),
            }
            .into()),
        }
    }

    /// Whether `path` was completed by this or an interrupted run and is
    /// still on disk with its recorded size.
    pub fn is_done(&self, path: &str) -> bool {
        self.run.lock().expect("record lock").is_done(path)
    }

    /// Records a completed file.
    pub fn done(&self, path: &str, size: u64, blake3: Option<String>) -> Result<(), FetchError> {
        self.run.lock().expect("record lock").unit_done(
            path,
            Output {
                path: path.to_string(),
                size,
                blake3,
            },
        )?;
        Ok(())
    }

    /// Whether another worker failed.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// What a source's fetch returns for the record.
pub(crate) struct Fetched {
    /// Files, relative to the output dir, in order.
    pub files: Vec<String>,
    /// Stage-specific details.
    pub details: serde_json::Value,
    /// Pinned commit (hub).
    pub commit: Option<String>,
    /// Bytes transferred by this run.
    pub transferred: u64,
    /// Files reused rather than transferred.
    pub reused: usize,
}

/// [`fsutil::parallel`] over the fetch workers: a failure sets
/// `units.abort`, and a real error wins over another worker's `Aborted`.
pub(crate) fn parallel<T: Send>(
    items: Vec<T>,
    n: usize,
    units: &Units,
    f: impl Fn(T) -> Result<(), FetchError> + Sync,
) -> Result<(), FetchError> {
    crate::fsutil::parallel(
        items,
        n,
        &units.abort,
        |e| matches!(e, FetchError::Aborted),
        f,
    )
}

/// Moved to [`crate::fsutil::free_bytes`]; kept for callers not yet updated.
pub use crate::fsutil::free_bytes;
pub(crate) use crate::fsutil::HashingWriter;

/// Fails early when `need` more bytes will not fit under `dir`.
pub(crate) fn check_disk(dir: &Path, need: u64) -> Result<(), FetchError> {
    if let Some(free) = free_bytes(dir) {
        if need > free {
            return Err(FetchError::Disk {
                dir: dir.to_path_buf(),
                need: crate::cli::human_bytes(need),
                free: crate::cli::human_bytes(free),
            });
        }
    }
    Ok(())
}

fn fingerprint(opts: &FetchOptions, src: &Source) -> String {
    let mut fp = stage::Fingerprint::new();
    fp.add("out", opts.out.to_string_lossy().as_bytes());
    fp.add("include", opts.include.join("\n"));
    fp.add("exclude", opts.exclude.join("\n"));
    match src {
        Source::Synthetic(p) => {
            fp.add("synthetic", p);
            fp.add("layers", format!("{:?}", opts.layers));
            if let Some(e) = opts.experts {
                // Only when set, so existing checkpoints stay up to date.
                fp.add("experts", e.to_string());
            }
            fp.add("seed", opts.seed.to_string());
        }
        Source::Local(d) => {
            let d = d.canonicalize().unwrap_or_else(|_| d.clone());
            fp.add("dir", d.to_string_lossy().as_bytes());
        }
        Source::Url(base) => {
            fp.add("url", base);
        }
        Source::Hub { repo, revision } => {
            fp.add("repo", repo);
            fp.add("revision", hub_revision(opts, revision));
            fp.add("endpoint", opts.endpoint.trim_end_matches('/'));
        }
    }
    if let Some(h) = &opts.expect {
        // Only when set, so existing checkpoints stay up to date.
        fp.add("expect", h);
    }
    fp.finish()
}

fn hub_revision(opts: &FetchOptions, from_source: &Option<String>) -> String {
    opts.revision
        .clone()
        .or_else(|| from_source.clone())
        .unwrap_or_else(|| "main".to_string())
}

/// Runs the fetch stage: up to date, resumed, or from scratch.
pub fn run(opts: &FetchOptions) -> Result<FetchSummary, FetchError> {
    let src = Source::parse(&opts.source)?;
    let expect = published_expect(opts, &src)?;
    // A published cache goes where the pipeline wants its cache.
    let cache_opts;
    let opts = match (&expect, &opts.cache_out) {
        (Some(_), Some(dir)) => {
            cache_opts = FetchOptions {
                out: dir.clone(),
                ..opts.clone()
            };
            &cache_opts
        }
        _ => opts,
    };
    let filter = Filter::new(&opts.include, &opts.exclude)?;
    check_settings(opts, &src)?;
    let mut inputs = BTreeMap::new();
    inputs.insert("source".to_string(), opts.source.clone());
    if let Source::Hub { revision, .. } = &src {
        inputs.insert("revision".into(), hub_revision(opts, revision));
        inputs.insert("endpoint".into(), opts.endpoint.clone());
    }
    // A second writer of this directory stops here, naming the first.
    let _lock = crate::fsutil::DirLock::exclusive(&opts.out, "rh-fetch")?;
    let owned = owned_files(&opts.work_dir, &opts.out);
    let fp = fingerprint(opts, &src);
    let mut run = match stage::plan(&opts.work_dir, STAGE, &fp, &opts.out, inputs, opts.force)? {
        Plan::UpToDate(rec) => return Ok(up_to_date(opts, &rec)),
        Plan::Run(run) => run,
    };
    if run.resumed {
        tracing::info!(
            "resuming an interrupted fetch ({} files already done)",
            run.record.units_done.len()
        );
    }
    crate::fsutil::ensure_writable_dir(&opts.out)?;
    // Carried in the running record, so an interrupted run of other
    // settings does not forget what earlier runs wrote.
    run.record.details = serde_json::json!({ "owned": owned });
    let units = Units::new(run, opts.out.clone(), owned, opts.force);
    let fetched = fetch_source(opts, &src, expect.as_deref(), &filter, &units)?;
    record(opts, units, fetched)
}

/// Settings that cannot work, refused before the disk is touched.
fn check_settings(opts: &FetchOptions, src: &Source) -> Result<(), FetchError> {
    if opts.concurrency == 0 {
        return Err(FetchError::Usage("--concurrency must be at least 1".into()));
    }
    if opts.chunk_size < part::OVERLAP {
        return Err(FetchError::Usage(format!(
            "--chunk-size must be at least {} bytes",
            part::OVERLAP
        )));
    }
    if let Source::Synthetic(p) = src {
        crate::synthetic::Spec::preset_with(p, opts.layers, opts.experts, opts.seed)?;
    }
    Ok(())
}

/// The summary of a stage that had nothing to do.
fn up_to_date(opts: &FetchOptions, rec: &stage::StageRecord) -> FetchSummary {
    FetchSummary {
        up_to_date: true,
        source: opts.source.clone(),
        out_dir: opts.out.clone(),
        commit: rec
            .details
            .get("commit")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        files: rec.outputs.len(),
        bytes: rec.outputs.iter().map(|o| o.size).sum(),
        transferred: 0,
        reused: rec.outputs.len(),
        published: published_hash(&rec.details),
    }
}

/// Runs the source's fetch into `units.out`.
fn fetch_source(
    opts: &FetchOptions,
    src: &Source,
    expect: Option<&str>,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    match (src, expect) {
        (Source::Synthetic(p), _) => synthetic::fetch(opts, p, filter, units),
        (Source::Local(d), _) => local::fetch(opts, d, filter, units),
        (Source::Url(base), Some(h)) => published::fetch_url(opts, base, h, units),
        (Source::Url(_), None) => unreachable!("checked by published_expect"),
        (Source::Hub { repo, revision }, Some(h)) => {
            published::fetch_hub(opts, repo, &hub_revision(opts, revision), h, units)
        }
        (Source::Hub { repo, revision }, None) => {
            hub::fetch(opts, repo, &hub_revision(opts, revision), filter, units)
        }
    }
}

/// Completes the stage record: every file as recorded, with its identity
/// as written (so repack can trust the recorded hash exactly as long as
/// the file is not replaced or rewritten).
fn record(opts: &FetchOptions, units: Units, fetched: Fetched) -> Result<FetchSummary, FetchError> {
    let run = units.run.into_inner().expect("record lock");
    let outputs: Vec<Output> = fetched
        .files
        .iter()
        .map(|f| {
            run.unit(f).cloned().ok_or_else(|| {
                FetchError::Invalid(format!("{f}: finished but not recorded (internal error)"))
            })
        })
        .collect::<Result<_, _>>()?;
    let bytes = outputs.iter().map(|o| o.size).sum();
    let files = outputs.len();
    let mut details = fetched.details;
    let identity: serde_json::Map<String, serde_json::Value> = outputs
        .iter()
        .filter_map(|o| {
            let m = std::fs::metadata(opts.out.join(&o.path)).ok()?;
            Some((o.path.clone(), crate::stage::file_identity(&m).into()))
        })
        .collect();
    if let Some(obj) = details.as_object_mut() {
        obj.insert("identity".into(), identity.into());
    }
    let published = published_hash(&details);
    run.finish(outputs, details)?;
    Ok(FetchSummary {
        up_to_date: false,
        source: opts.source.clone(),
        out_dir: opts.out.clone(),
        published,
        commit: fetched.commit,
        files,
        bytes,
        transferred: fetched.transferred,
        reused: fetched.reused,
    })
}

/// `--expect` checked against the source: required for `https://`, allowed
/// for `hf:` (a published cache in a hub repo), refused elsewhere; a
/// published cache is fetched whole, so filters are refused too.
fn published_expect(opts: &FetchOptions, src: &Source) -> Result<Option<String>, FetchError> {
    let expect = opts
        .expect
        .as_deref()
        .map(published::parse_expect)
        .transpose()?;
    match (src, &expect) {
        (Source::Url(base), None) => {
            return Err(FetchError::Usage(format!(
                "{base}: a published cache is fetched with --expect HASH (the manifest hash its publisher shared)"
            )))
        }
        (Source::Synthetic(_) | Source::Local(_), Some(_)) => {
            return Err(FetchError::Usage(
                "--expect applies to published caches (hf:ORG/REPO or https://HOST/PATH/)".into(),
            ))
        }
        _ => {}
    }
    if expect.is_some() && !(opts.include.is_empty() && opts.exclude.is_empty()) {
        return Err(FetchError::Usage(
            "--include/--exclude do not apply to a published cache: every file of it is needed"
                .into(),
        ));
    }
    Ok(expect)
}

/// The manifest hash recorded by a published-cache fetch.
fn published_hash(details: &serde_json::Value) -> Option<String> {
    (details.get("kind").and_then(|k| k.as_str()) == Some(published::KIND))
        .then(|| details.get("manifest_blake3")?.as_str().map(str::to_string))
        .flatten()
}

/// Files of `out` that the fetch stage's record says it wrote.
fn owned_files(work_dir: &Path, out: &Path) -> std::collections::BTreeSet<String> {
    let Ok(Some(rec)) = stage::read_record(work_dir, STAGE) else {
        return Default::default();
    };
    if Path::new(&rec.output_dir) != out {
        return Default::default();
    }
    let mut owned: std::collections::BTreeSet<String> = rec
        .units_done
        .values()
        .chain(&rec.outputs)
        .map(|o| o.path.clone())
        .collect();
    if let Some(v) = rec.details.get("owned").and_then(|v| v.as_array()) {
        owned.extend(v.iter().filter_map(|s| s.as_str().map(str::to_string)));
    }
    owned
}

/// Whether a name from a listing would land in the tool's own state: the
/// stage records under the work dir (`<out>/.rh/stages` when only --out is
/// given) or our lock and temporary files. (Only the records: with the
/// pipeline's layout the output itself lies under the work dir.)
pub(crate) fn reserved(opts: &FetchOptions, name: &str) -> bool {
    let first = name.split('/').next().unwrap_or(name);
    first == ".rh"
        || name.split('/').any(|p| p.starts_with(".roundhouse-"))
        || opts
            .out
            .join(name)
            .starts_with(opts.work_dir.join("stages"))
}

/// Creates the parent directories of `out/rel`.
pub(crate) fn ensure_parent(path: &Path) -> Result<(), FetchError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| FsError::io(d, e))?;
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("synthetic:tiny").unwrap(),
            Source::Synthetic("tiny".into())
        );
        assert_eq!(
            Source::parse("hf:Intel/Qwen3-Next@v1.0").unwrap(),
            Source::Hub {
                repo: "Intel/Qwen3-Next".into(),
                revision: Some("v1.0".into())
            }
        );
        assert_eq!(
            Source::parse("owner/name").unwrap(),
            Source::Hub {
                repo: "owner/name".into(),
                revision: None
            }
        );
        assert_eq!(
            Source::parse("dir:/x/y").unwrap(),
            Source::Local("/x/y".into())
        );
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            Source::parse(tmp.path().to_str().unwrap()).unwrap(),
            Source::Local(tmp.path().into())
        );
        for bad in ["hf:a", "a/b/c", "hf:../x", "hf:a/b@", "", "hf:a/b c"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filter_globs() {
        let f = Filter::new(&["*.json".into(), "model-*".into()], &["*mtp*".into()]).unwrap();
        assert!(f.wants("config.json"));
        assert!(f.wants("model-00001-of-00002.safetensors"));
        assert!(!f.wants("model_extra_tensors_mtp.safetensors"));
        assert!(!f.wants("README.md"));
        assert!(f.wants("sub/x.json"));
        assert!(Filter::new(&["[".into()], &[]).is_err());
        assert!(Filter::default().wants("anything"));
    }

    #[test]
    fn reserved_names_are_the_records_and_our_files_only() {
        // The pipeline's layout: the checkpoint lies under the work dir.
        let mut o = FetchOptions::default();
        assert!(!reserved(&o, "config.json"));
        assert!(reserved(&o, ".roundhouse-lock"));
        o.out = "ck".into();
        o.work_dir = "ck/state".into();
        assert!(reserved(&o, "state/stages/fetch.json"));
        assert!(!reserved(&o, "state/other.json"));
        assert!(reserved(&o, ".rh/x"));
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "",
            "a\\b",
            "./a",
            "x.part",
            "x.part.meta",
        ] {
            assert!(!safe_relative(bad), "{bad}");
        }
        for good in ["config.json", "sub/dir/model.safetensors", "a..b"] {
            assert!(safe_relative(good), "{good}");
        }
    }
}

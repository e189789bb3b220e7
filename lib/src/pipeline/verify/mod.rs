//! `rh-verify`: a BLAKE3 manifest for a directory of files (the repacked
//! cache), checked in parallel and located to the damaged chunk, plus a
//! portable `tar.zst` bundle verified while it is unpacked.
//!
//! `DIR/manifest.blake3.json` lists every other file with its size, its
//! whole-file BLAKE3 (the same as `b3sum`) and one value per chunk
//! ([`hash`] explains how they relate). The manifest's own BLAKE3 is the
//! one hash a person shares out of band (`--expect`).

pub mod hash;
pub mod pack;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::cli::{self, human_bytes, Classify, Exit};
use crate::fsutil::{self, FsError};
use crate::pipeline::{defaults, Pipeline};
use crate::stage::{self, Fingerprint, Output, Plan, Stage, StageError};

use hash::{chunk_count, chunk_range, file_root, hash_jobs, hex, parse_hex, Hashed, Job};

/// File name of the manifest inside the checked directory.
pub const MANIFEST_NAME: &str = "manifest.blake3.json";
/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;
/// Default chunk size: 64 MiB.
pub const DEFAULT_CHUNK: u64 = 64 << 20;

/// Errors of verification; mismatches exit with code 3.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Crash-safe write failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Stage record trouble.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// No manifest where one is needed.
    #[error("{0}: no manifest; create one with `rh-verify write {1}`")]
    NoManifest(PathBuf, PathBuf),
    /// The manifest itself is malformed.
    #[error("{path}: bad manifest: {reason}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data does not match the manifest (first problem, and how many more).
    #[error("{first}{}", if *.more > 0 { format!(" (and {} more problem(s); -v lists them)", .more) } else { String::new() })]
    Mismatch {
        /// The first problem, naming file and chunk.
        first: String,
        /// Further problems.
        more: usize,
    },
    /// The manifest's own hash is not the one expected.
    #[error("{path}: manifest blake3 is {found}, expected {expected}: this is not the cache that was shared")]
    Expect {
        /// The manifest.
        path: PathBuf,
        /// Its hash.
        found: String,
        /// `--expect`.
        expected: String,
    },
    /// A file changed size while it was read.
    #[error("{path}: {reason}")]
    Changed {
        /// The file.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// A bundle that is not a valid, complete bundle.
    #[error("{path}: {reason}")]
    BadBundle {
        /// The bundle.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Bad arguments to a library call (a chunk size that is not a power of two, ...).
    #[error("{0}")]
    Usage(String),
    /// The directory holds a cache that does not open with full validation
    /// (no manifest is written for it).
    #[error("{0}; no manifest written (rerun rh-repack)")]
    Cache(crate::cache::CacheError),
}

impl VerifyError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VerifyError::Io {
            path: path.into(),
            source,
        }
    }
}

impl Classify for VerifyError {
    fn exit(&self) -> Exit {
        match self {
            VerifyError::Io { .. } | VerifyError::Fs(_) | VerifyError::NoManifest(..) => {
                Exit::Failure
            }
            VerifyError::Stage(e) => e.exit(),
            VerifyError::Usage(_) => Exit::Usage,
            VerifyError::Cache(e) => e.exit(),
            _ => Exit::VerifyFailed,
        }
    }
}

/// One file in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file (hex), as `b3sum` prints it.
    pub blake3: String,
    /// One value per chunk (hex).
    pub chunks: Vec<String>,
}

/// `manifest.blake3.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Always `blake3`.
    pub algorithm: String,
    /// Chunk size in bytes (a power of two, at least 1 KiB).
    pub chunk_size: u64,
    /// Every file but the manifest, sorted by path.
    pub files: Vec<FileEntry>,
}

/// A manifest path that would reach outside the directory.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("path `{path}` {why}")]
pub struct UnsafePath {
    /// The path as listed.
    pub path: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Refuses paths that are empty, absolute, contain `..` or `.` parts, or
/// name the manifest itself.
pub fn safe_relative(p: &str) -> Result<(), UnsafePath> {
    let unsafe_path = |why| {
        Err(UnsafePath {
            path: p.to_string(),
            why,
        })
    };
    if p.is_empty() || p.starts_with('/') || p.contains('\\') || p.contains('\0') {
        return unsafe_path("is not a plain relative path");
    }
    let escapes = Path::new(p)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
        || p.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if escapes {
        return unsafe_path("escapes the directory");
    }
    if p == MANIFEST_NAME {
        return unsafe_path("is the manifest itself");
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest, VerifyError> {
        let bad = |reason: String| VerifyError::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let found = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
        if found != MANIFEST_FORMAT as u64 {
            return Err(bad(format!(
                "format {found}, this tool reads {MANIFEST_FORMAT}"
            )));
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        if m.algorithm != "blake3" {
            return Err(bad(format!("algorithm `{}` is not blake3", m.algorithm)));
        }
        if m.chunk_size < 1024 || !m.chunk_size.is_power_of_two() {
            return Err(bad(format!(
                "chunk_size {} is not a power of two >= 1024",
                m.chunk_size
            )));
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            safe_relative(&f.path).map_err(|e| bad(e.to_string()))?;
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("`{}` is listed twice", f.path)));
            }
            if parse_hex(&f.blake3).is_none() || f.chunks.iter().any(|c| parse_hex(c).is_none()) {
                return Err(bad(format!("`{}`: a hash is not 64 hex digits", f.path)));
            }
            let want = chunk_count(f.size, m.chunk_size);
            if f.chunks.len() as u64 != want {
                return Err(bad(format!(
                    "`{}`: {} chunk hashes for {} bytes, expected {want}",
                    f.path,
                    f.chunks.len(),
                    f.size
                )));
            }
        }
        Ok(m)
    }

    /// Reads `DIR/manifest.blake3.json`, with its own hash.
    pub fn load(dir: &Path) -> Result<(Manifest, blake3::Hash), VerifyError> {
        let path = dir.join(MANIFEST_NAME);
        let bytes = match fsutil::read_regular(&path) {
            Ok(b) => b,
            Err(e) if fsutil::is_not_found(&e) => {
                return Err(VerifyError::NoManifest(path, dir.to_path_buf()))
            }
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::parse(&bytes, &path)?;
        Ok((m, blake3::hash(&bytes)))
    }

    /// The bytes written to disk (pretty JSON, files sorted: the same
    /// files give the same bytes and so the same manifest hash).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("manifest serializes");
        b.push(b'\n');
        b
    }

    /// Total bytes of the listed files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Most entries a listing visits (a cache has a handful of files).
const MAX_ENTRIES: usize = 100_000;

/// Every regular file under `dir` except the manifest, temporary files
/// (`*.tmp`) and our lock, as sorted `/`-separated relative paths with
/// sizes. Symlinks to files are followed; symlinks to directories are not
/// (they would lead out of the tree, or round in a loop), and the walk is
/// bounded in depth and entries.
pub fn list_files(dir: &Path) -> Result<Vec<(String, u64)>, VerifyError> {
    fn walk(
        root: &Path,
        rel: &str,
        out: &mut Vec<(String, u64)>,
        depth: usize,
        seen: &mut usize,
    ) -> Result<(), VerifyError> {
        let d = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        if depth > 16 {
            return Err(VerifyError::Usage(format!(
                "{}: directories nested more than 16 deep",
                d.display()
            )));
        }
        let rd = std::fs::read_dir(&d).map_err(|e| VerifyError::io(&d, e))?;
        for e in rd {
            let e = e.map_err(|e| VerifyError::io(&d, e))?;
            *seen += 1;
            if *seen > MAX_ENTRIES {
                return Err(VerifyError::Usage(format!(
                    "{}: more than {MAX_ENTRIES} entries; not a cache directory",
                    root.display()
                )));
            }
            let name = e.file_name().to_string_lossy().into_owned();
            // Our lock file and unpack staging area are not content.
            if name.starts_with(".roundhouse-") {
                continue;
            }
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let link = std::fs::symlink_metadata(e.path())
                .map_err(|err| VerifyError::io(e.path(), err))?;
            if link.is_dir() {
                walk(root, &r, out, depth + 1, seen)?;
                continue;
            }
            let meta = if link.file_type().is_symlink() {
                match std::fs::metadata(e.path()) {
                    Ok(m) if m.is_dir() => {
                        tracing::warn!(
                            "{}: a link to a directory; not followed",
                            e.path().display()
                        );
                        continue;
                    }
                    Ok(m) => m,
                    Err(err) => return Err(VerifyError::io(e.path(), err)),
                }
            } else {
                link
            };
            if meta.is_file() && r != MANIFEST_NAME && !name.ends_with(".tmp") {
                out.push((r, meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out, 0, &mut 0)?;
    out.sort();
    Ok(out)
}

/// A manifest is only written for a directory that, when it holds a cache
/// (`index.rhc`), opens with full validation: header, index, every data
/// file's length and header against the index. Damage is reported (exit
/// 3) rather than blessed with a manifest.
fn require_valid_cache(dir: &Path) -> Result<(), VerifyError> {
    if crate::cache::is_cache(dir) {
        crate::cache::Cache::open_unlocked(dir).map_err(VerifyError::Cache)?;
    }
    Ok(())
}

/// Progress reporting for the hashing passes.
fn bar(total: u64, msg: &str, quiet: bool) -> indicatif::ProgressBar {
    cli::bytes_bar(total, msg, quiet)
}

/// Outcome of writing or checking.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// `write`, `check` or `quick`.
    pub mode: String,
    /// The directory.
    pub dir: PathBuf,
    /// Files in the manifest.
    pub files: usize,
    /// Bytes of those files.
    pub bytes: u64,
    /// Bytes actually hashed by this run.
    pub hashed_bytes: u64,
    /// Files skipped because an interrupted run already did them.
    pub resumed_files: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Hashed bytes per second, GB/s.
    pub gbs: f64,
    /// BLAKE3 of the manifest file.
    pub manifest_blake3: String,
    /// Files present but not in the manifest (not an error).
    pub unlisted: Vec<String>,
}

impl Summary {
    /// The result line.
    pub fn line(&self) -> String {
        let what = match self.mode.as_str() {
            "write" => format!("wrote {}", self.dir.join(MANIFEST_NAME).display()),
            "quick" => "OK (quick: sizes, first and last chunks)".to_string(),
            _ => "OK".to_string(),
        };
        let resumed = if self.resumed_files > 0 {
            format!(", {} file(s) done by an earlier run", self.resumed_files)
        } else {
            String::new()
        };
        format!(
            "verify: {what}: {} files, {}; hashed {} in {:.2} s ({:.2} GB/s){resumed}; manifest blake3 {}",
            self.files,
            human_bytes(self.bytes),
            human_bytes(self.hashed_bytes),
            self.seconds,
            self.gbs,
            self.manifest_blake3
        )
    }
}

/// Hooks for resumable runs: which files to skip, and what to do when a
/// file is finished (record it as a stage unit).
pub struct Resume<'a> {
    /// Entries already done (write: hashed; check: verified), by path.
    pub done: BTreeMap<String, FileEntry>,
    /// Called once per finished file.
    pub on_file: &'a (dyn Fn(&FileEntry) -> Result<(), VerifyError> + Sync),
}

impl Resume<'_> {
    fn none() -> Resume<'static> {
        Resume {
            done: BTreeMap::new(),
            on_file: &|_| Ok(()),
        }
    }
}

/// Writes `DIR/manifest.blake3.json` for every file in `dir`.
pub fn write_manifest(
    dir: &Path,
    chunk_size: u64,
    quiet: bool,
) -> Result<(Manifest, Summary), VerifyError> {
    if !dir.is_dir() {
        return Err(VerifyError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let _lock = fsutil::DirLock::exclusive(dir, "rh-verify")?;
    require_valid_cache(dir)?;
    write_manifest_resumable(dir, chunk_size, quiet, &Resume::none())
}

/// [`write_manifest`] that reuses entries hashed by an interrupted run
/// (when the file still has the recorded size) and reports each finished
/// file.
pub fn write_manifest_resumable(
    dir: &Path,
    chunk_size: u64,
    quiet: bool,
    resume: &Resume,
) -> Result<(Manifest, Summary), VerifyError> {
    if chunk_size < 1024 || !chunk_size.is_power_of_two() {
        return Err(VerifyError::Usage(format!(
            "chunk size {chunk_size} must be a power of two of at least 1024 bytes"
        )));
    }
    if !dir.is_dir() {
        return Err(VerifyError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let t = Instant::now();
    let files = list_files(dir)?;
    let mut entries: Vec<Option<FileEntry>> = vec![None; files.len()];
    let mut jobs = Vec::new();
    let mut job_file = Vec::new();
    let mut resumed = 0;
    for (i, (p, size)) in files.iter().enumerate() {
        match resume.done.get(p) {
            Some(e)
                if e.size == *size && e.chunks.len() as u64 == chunk_count(*size, chunk_size) =>
            {
                entries[i] = Some(e.clone());
                resumed += 1;
            }
            _ => {
                jobs.push(Job {
                    path: p.clone(),
                    size: *size,
                    chunks: (0..chunk_count(*size, chunk_size)).collect(),
                });
                job_file.push(i);
            }
        }
    }
    let to_hash: u64 = jobs.iter().map(|j| j.size).sum();
    let pb = bar(to_hash, "hashing", quiet);
    let results = Mutex::new(entries);
    hash_jobs(dir, &jobs, chunk_size, &|n| pb.inc(n), &|h| {
        let job = &jobs[h.job];
        let cvs: Vec<[u8; 32]> = h.cvs.iter().map(|c| c.1).collect();
        let e = FileEntry {
            path: job.path.clone(),
            size: job.size,
            blake3: file_root(&cvs, job.size, chunk_size).to_hex().to_string(),
            chunks: cvs.iter().map(hex).collect(),
        };
        (resume.on_file)(&e)?;
        results.lock().expect("not poisoned")[job_file[h.job]] = Some(e);
        Ok(())
    })?;
    pb.finish_and_clear();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        algorithm: "blake3".into(),
        chunk_size,
        files: results
            .into_inner()
            .expect("not poisoned")
            .into_iter()
            .map(|e| e.expect("every file hashed"))
            .collect(),
    };
    let bytes = manifest.to_bytes();
    fsutil::write_atomic(&dir.join(MANIFEST_NAME), &bytes)?;
    let secs = t.elapsed().as_secs_f64();
    let summary = Summary {
        mode: "write".into(),
        dir: dir.to_path_buf(),
        files: manifest.files.len(),
        bytes: manifest.total_bytes(),
        hashed_bytes: to_hash,
        resumed_files: resumed,
        seconds: secs,
        gbs: to_hash as f64 / secs.max(1e-9) / 1e9,
        manifest_blake3: blake3::hash(&bytes).to_hex().to_string(),
        unlisted: Vec::new(),
    };
    Ok((manifest, summary))
}

/// How to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Sizes plus the first and last chunk of each file only.
    pub quick: bool,
    /// The manifest hash the directory must have.
    pub expect: Option<String>,
    /// No progress bar.
    pub quiet: bool,
}

/// Checks `dir` against its manifest. Every problem is logged; the error
/// names the first (file and chunk with its byte range) and counts the rest.
pub fn check(dir: &Path, o: &CheckOptions) -> Result<Summary, VerifyError> {
    let _lock = fsutil::DirLock::shared(dir)?;
    check_resumable(dir, o, &Resume::none())
}

/// [`check`] that skips files an interrupted run already verified (when
/// their size still matches) and reports each verified file: the expected
/// hash, then sizes, then the chunks, then files the manifest does not list.
pub fn check_resumable(
    dir: &Path,
    o: &CheckOptions,
    resume: &Resume,
) -> Result<Summary, VerifyError> {
    let t = Instant::now();
    let (m, mhash) = Manifest::load(dir)?;
    let mhex = mhash.to_hex().to_string();
    if let Some(exp) = &o.expect {
        if !exp.trim().eq_ignore_ascii_case(&mhex) {
            return Err(VerifyError::Expect {
                path: dir.join(MANIFEST_NAME),
                found: mhex,
                expected: exp.trim().to_string(),
            });
        }
    }
    let plan = plan_checks(dir, &m, o.quick, resume)?;
    let to_hash = plan.bytes_to_hash(m.chunk_size);
    let mut problems = plan.problems;
    problems.extend(hash_and_compare(
        dir,
        &m,
        o,
        resume,
        &plan.jobs,
        &plan.job_entry,
        to_hash,
    )?);
    problems.sort_by_key(|p| (p.file, p.chunk));
    for p in &problems {
        tracing::info!("{}", p.message);
    }
    if let Some(first) = problems.first() {
        return Err(VerifyError::Mismatch {
            first: first.message.clone(),
            more: problems.len() - 1,
        });
    }
    let unlisted = unlisted_files(dir, &m)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Summary {
        mode: if o.quick { "quick" } else { "check" }.into(),
        dir: dir.to_path_buf(),
        files: m.files.len(),
        bytes: m.total_bytes(),
        hashed_bytes: to_hash,
        resumed_files: plan.resumed,
        seconds: secs,
        gbs: to_hash as f64 / secs.max(1e-9) / 1e9,
        manifest_blake3: mhex,
        unlisted,
    })
}

/// One thing wrong with a listed file, ordered by file then chunk.
struct Problem {
    /// The file's position in the manifest.
    file: usize,
    /// The chunk (0 for the whole file, `u64::MAX` for the file hash).
    chunk: u64,
    message: String,
}

/// What a check will hash, and what the sizes already showed.
struct CheckPlan {
    jobs: Vec<Job>,
    /// The manifest entry of each job.
    job_entry: Vec<usize>,
    /// Files an interrupted run verified.
    resumed: usize,
    problems: Vec<Problem>,
}

impl CheckPlan {
    fn bytes_to_hash(&self, chunk: u64) -> u64 {
        self.jobs
            .iter()
            .flat_map(|j| j.chunks.iter().map(move |&c| chunk_range(j.size, chunk, c)))
            .map(|(s, e)| e - s)
            .sum()
    }
}

/// Checks each listed file's presence and size, and plans the chunks to
/// hash (all of them, or the first and last with `quick`) for the others.
fn plan_checks(
    dir: &Path,
    m: &Manifest,
    quick: bool,
    resume: &Resume,
) -> Result<CheckPlan, VerifyError> {
    let mut plan = CheckPlan {
        jobs: Vec::new(),
        job_entry: Vec::new(),
        resumed: 0,
        problems: Vec::new(),
    };
    for (i, f) in m.files.iter().enumerate() {
        if let Some(message) = size_problem(&dir.join(&f.path), f.size)? {
            plan.problems.push(Problem {
                file: i,
                chunk: 0,
                message,
            });
            continue;
        }
        if resume.done.get(&f.path).is_some_and(|d| d == f) {
            plan.resumed += 1;
            continue;
        }
        let n = chunk_count(f.size, m.chunk_size);
        let chunks: Vec<u64> = if quick {
            let mut c = vec![0, n.saturating_sub(1)];
            c.dedup();
            c.retain(|&x| x < n);
            c
        } else {
            (0..n).collect()
        };
        plan.jobs.push(Job {
            path: f.path.clone(),
            size: f.size,
            chunks,
        });
        plan.job_entry.push(i);
    }
    Ok(plan)
}

/// What is wrong with the file at `p` before any hashing (not there, not a
/// file, another size than the manifest's), or `None`.
fn size_problem(p: &Path, want: u64) -> Result<Option<String>, VerifyError> {
    let size = match std::fs::metadata(p) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Ok(Some(format!("{}: not a regular file", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(format!(
                "{}: missing (listed in the manifest)",
                p.display()
            )))
        }
        Err(e) => return Err(VerifyError::io(p, e)),
    };
    if size == want {
        return Ok(None);
    }
    let what = if size < want { "truncated" } else { "too long" };
    Ok(Some(format!(
        "{}: {what}: {size} bytes, the manifest says {want}",
        p.display()
    )))
}

/// Hashes the planned chunks and compares them (and, on a full check, each
/// file's root hash) with the manifest; a file found good is reported to
/// `resume`.
fn hash_and_compare(
    dir: &Path,
    m: &Manifest,
    o: &CheckOptions,
    resume: &Resume,
    jobs: &[Job],
    job_entry: &[usize],
    to_hash: u64,
) -> Result<Vec<Problem>, VerifyError> {
    let pb = bar(
        to_hash,
        if o.quick { "quick check" } else { "checking" },
        o.quiet,
    );
    let found = Mutex::new(Vec::new());
    hash_jobs(dir, jobs, m.chunk_size, &|n| pb.inc(n), &|h| {
        let i = job_entry[h.job];
        let f = &m.files[i];
        let bad = compare_file(dir, i, f, &h, m.chunk_size, o.quick);
        if bad.is_empty() {
            if !o.quick {
                (resume.on_file)(f)?;
            }
        } else {
            found.lock().expect("not poisoned").extend(bad);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(found.into_inner().expect("not poisoned"))
}

/// The chunks of file `i` whose values differ from the manifest's, and on a
/// full check a root hash that does not match.
fn compare_file(
    dir: &Path,
    i: usize,
    f: &FileEntry,
    h: &Hashed,
    chunk: u64,
    quick: bool,
) -> Vec<Problem> {
    let mut bad = Vec::new();
    for (c, cv) in &h.cvs {
        if hex(cv) != f.chunks[*c as usize] {
            let (s, e) = chunk_range(f.size, chunk, *c);
            bad.push(Problem {
                file: i,
                chunk: *c,
                message: format!(
                    "{}: chunk {c} (bytes {s}..{e}) does not match the manifest",
                    dir.join(&f.path).display()
                ),
            });
        }
    }
    if bad.is_empty() && !quick {
        let cvs: Vec<[u8; 32]> = h.cvs.iter().map(|c| c.1).collect();
        if file_root(&cvs, f.size, chunk).to_hex().as_str() != f.blake3 {
            bad.push(Problem {
                file: i,
                chunk: u64::MAX,
                message: format!(
                    "{}: file hash does not match the manifest (manifest inconsistent)",
                    dir.join(&f.path).display()
                ),
            });
        }
    }
    bad
}

/// Files in `dir` the manifest does not list (a warning each, not an error).
fn unlisted_files(dir: &Path, m: &Manifest) -> Result<Vec<String>, VerifyError> {
    let listed: BTreeSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    let unlisted: Vec<String> = list_files(dir)?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !listed.contains(p.as_str()))
        .collect();
    for u in &unlisted {
        tracing::warn!("{}: not in the manifest (ignored)", dir.join(u).display());
    }
    Ok(unlisted)
}

/// Settings of the pipeline stage (manifest values with flags applied).
#[derive(Clone, Debug, Default)]
pub struct StageOptions {
    /// Directory to verify (default: `[verify] cache`, else repack's output).
    pub dir: Option<PathBuf>,
    /// `--expect`.
    pub expect: Option<String>,
    /// `--quick`.
    pub quick: bool,
    /// `--force`.
    pub force: bool,
    /// No progress bar.
    pub quiet: bool,
}

/// What rh-verify's flags say for the pipeline stage; `None` / `false`
/// leaves the manifest's value.
#[derive(Clone, Debug, Default)]
pub struct VerifyFlags {
    /// `--cache`.
    pub cache: Option<PathBuf>,
    /// `--expect`.
    pub expect: Option<String>,
    /// `--quick` (can only turn it on).
    pub quick: bool,
    /// `--force`.
    pub force: bool,
    /// `-q`.
    pub quiet: bool,
}

impl StageOptions {
    /// The stage's settings, resolved once: a flag wins over the manifest's
    /// `[verify]` table, which wins over the defaults
    /// ([`defaults::VERIFY_QUICK`]; the directory defaults to repack's
    /// output when the stage runs).
    pub fn resolve(flags: &VerifyFlags, p: &Pipeline) -> StageOptions {
        StageOptions {
            dir: flags
                .cache
                .clone()
                .or_else(|| p.verify.cache.as_ref().map(|c| p.path(c))),
            expect: flags.expect.clone().or_else(|| p.verify.expect.clone()),
            quick: flags.quick || p.verify.quick.unwrap_or(defaults::VERIFY_QUICK),
            force: flags.force,
            quiet: flags.quiet,
        }
    }

    /// The manifest's `[verify]` table (no flags).
    pub fn from_pipeline(p: &Pipeline) -> StageOptions {
        StageOptions::resolve(&VerifyFlags::default(), p)
    }
}

/// What the pipeline stage did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    /// Nothing was redone.
    pub up_to_date: bool,
    /// The run's summary (absent when up to date).
    pub summary: Option<Summary>,
    /// The manifest's hash.
    pub manifest_blake3: String,
    /// The directory.
    pub dir: PathBuf,
}

const PARTIAL: &str = "verify.partial.json";

/// What the verify record's `details` hold.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyDetails {
    /// The manifest's hash.
    pub manifest_blake3: String,
    /// `write`, `check` or `quick`.
    pub mode: String,
    /// Files listed.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes hashed by this run.
    pub hashed_bytes: u64,
    /// Seconds.
    pub seconds: f64,
    /// Hashing rate, GB/s.
    pub gbs: f64,
}

/// The verify stage: requires repack complete, writes the manifest of the
/// cache when it has none, else checks the cache against it. Units are
/// files, so a killed run resumes where it stopped.
pub fn run_stage(p: &Pipeline, o: &StageOptions) -> Result<StageReport, VerifyError> {
    let work = p.work_dir();
    let repack = stage::require_complete(&work, Stage::Repack)?;
    let dir = o.dir.clone().unwrap_or_else(|| p.cache_dir());
    let manifest_path = dir.join(MANIFEST_NAME);
    let writing = std::fs::symlink_metadata(&manifest_path).is_err();
    let _lock = lock_for(&dir, writing)?;
    let mut fp = Fingerprint::new();
    fp.add_record(&repack)
        .add("dir", dir.to_string_lossy().as_bytes())
        .add("quick", o.quick.to_string())
        .add("expect", o.expect.clone().unwrap_or_default());
    let mut inputs = BTreeMap::new();
    inputs.insert("cache".to_string(), dir.display().to_string());
    let run = match stage::plan(&work, Stage::Verify, &fp.finish(), &dir, inputs, o.force)? {
        Plan::UpToDate(rec) => {
            let d: VerifyDetails = rec.details_as(&work)?;
            return Ok(StageReport {
                up_to_date: true,
                summary: None,
                manifest_blake3: d.manifest_blake3,
                dir,
            });
        }
        Plan::Run(run) => run,
    };
    let partial_path = work.join("stages").join(PARTIAL);
    let done = if writing {
        hashed_before(&run, &partial_path)
    } else if !o.quick {
        verified_before(&run, &dir)
    } else {
        BTreeMap::new()
    };
    let run = Mutex::new(run);
    let partial = Mutex::new(done.values().cloned().collect::<Vec<FileEntry>>());
    let on_file = |e: &FileEntry| -> Result<(), VerifyError> {
        if writing {
            let mut v = partial.lock().expect("not poisoned");
            v.push(e.clone());
            fsutil::write_atomic(
                &partial_path,
                &serde_json::to_vec(&*v).expect("entries serialize"),
            )?;
        }
        run.lock().expect("not poisoned").unit_done(
            &e.path,
            Output {
                path: e.path.clone(),
                size: e.size,
                blake3: Some(e.blake3.clone()),
            },
        )?;
        Ok(())
    };
    let resume = Resume {
        done,
        on_file: &on_file,
    };
    let summary = if writing {
        let (_, s) = write_manifest_resumable(&dir, DEFAULT_CHUNK, o.quiet, &resume)?;
        if let Some(exp) = &o.expect {
            if !exp.trim().eq_ignore_ascii_case(&s.manifest_blake3) {
                return Err(VerifyError::Expect {
                    path: manifest_path,
                    found: s.manifest_blake3,
                    expected: exp.trim().to_string(),
                });
            }
        }
        s
    } else {
        let check = CheckOptions {
            quick: o.quick,
            expect: o.expect.clone(),
            quiet: o.quiet,
        };
        check_resumable(&dir, &check, &resume)?
    };
    let _ = std::fs::remove_file(&partial_path);
    let run = run.into_inner().expect("not poisoned");
    finish_record(run, &manifest_path, &summary)?;
    Ok(StageReport {
        up_to_date: false,
        manifest_blake3: summary.manifest_blake3.clone(),
        summary: Some(summary),
        dir,
    })
}

/// Writing the manifest excludes everyone (and needs a valid cache);
/// checking excludes writers.
fn lock_for(dir: &Path, writing: bool) -> Result<fsutil::DirLock, VerifyError> {
    if !writing {
        return Ok(fsutil::DirLock::shared(dir)?);
    }
    if !dir.is_dir() {
        return Err(VerifyError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let l = fsutil::DirLock::exclusive(dir, "rh-verify")?;
    require_valid_cache(dir)?;
    Ok(l)
}

/// Writing: the entries an interrupted run hashed (kept beside the record)
/// whose unit is still valid.
fn hashed_before(run: &stage::StageRun, partial_path: &Path) -> BTreeMap<String, FileEntry> {
    let mut done = BTreeMap::new();
    if let Ok(b) = std::fs::read(partial_path) {
        if let Ok(v) = serde_json::from_slice::<Vec<FileEntry>>(&b) {
            for e in v {
                if run.is_done(&e.path) {
                    done.insert(e.path.clone(), e);
                }
            }
        }
    }
    done
}

/// Checking: the files an interrupted run verified; the manifest entry
/// itself is the reference, so entries are rebuilt from it.
fn verified_before(run: &stage::StageRun, dir: &Path) -> BTreeMap<String, FileEntry> {
    let mut done = BTreeMap::new();
    if let Ok((m, _)) = Manifest::load(dir) {
        for f in m.files {
            if run
                .unit(&f.path)
                .is_some_and(|u| u.size == f.size && u.blake3.as_deref() == Some(f.blake3.as_str()))
                && run.is_done(&f.path)
            {
                done.insert(f.path.clone(), f);
            }
        }
    }
    done
}

/// Completes the record: the manifest as output, the summary as details.
fn finish_record(
    run: stage::StageRun,
    manifest_path: &Path,
    summary: &Summary,
) -> Result<(), VerifyError> {
    let size = std::fs::metadata(manifest_path)
        .map_err(|e| VerifyError::io(manifest_path, e))?
        .len();
    let details = VerifyDetails {
        manifest_blake3: summary.manifest_blake3.clone(),
        mode: summary.mode.clone(),
        files: summary.files,
        bytes: summary.bytes,
        hashed_bytes: summary.hashed_bytes,
        seconds: summary.seconds,
        gbs: summary.gbs,
    };
    run.finish(
        vec![Output {
            path: MANIFEST_NAME.into(),
            size,
            blake3: Some(summary.manifest_blake3.clone()),
        }],
        details,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.path().join("big.bin"), &big).unwrap();
        std::fs::write(d.path().join("sub/small.txt"), b"hello").unwrap();
        std::fs::write(d.path().join("empty"), b"").unwrap();
        d
    }

    #[test]
    fn write_then_check_then_damage() {
        let d = tree();
        let (m, s) = write_manifest(d.path(), 1024, true).unwrap();
        assert_eq!(m.files.len(), 3);
        assert_eq!(m.files[0].path, "big.bin");
        assert_eq!(m.files[0].chunks.len(), 10);
        assert_eq!(
            m.files[0].blake3,
            crate::fsutil::blake3_file(&d.path().join("big.bin"))
                .unwrap()
                .to_hex()
                .to_string()
        );
        let ok = check(d.path(), &CheckOptions::default()).unwrap();
        assert_eq!(ok.manifest_blake3, s.manifest_blake3);

        // Flip one byte in chunk 4.
        let p = d.path().join("big.bin");
        let mut b = std::fs::read(&p).unwrap();
        b[4 * 1024 + 17] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = check(d.path(), &CheckOptions::default()).unwrap_err();
        assert_eq!(e.exit(), Exit::VerifyFailed);
        let msg = e.to_string();
        assert!(
            msg.contains("big.bin") && msg.contains("chunk 4 (bytes 4096..5120)"),
            "{msg}"
        );
        // Quick does not read chunk 4.
        check(
            d.path(),
            &CheckOptions {
                quick: true,
                ..Default::default()
            },
        )
        .unwrap();

        // Expect a different hash.
        let e = check(
            d.path(),
            &CheckOptions {
                expect: Some("00".repeat(32)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("expected 0000"), "{e}");
    }

    #[test]
    fn manifest_validation() {
        let p = Path::new("m.json");
        let bad = |s: &str| Manifest::parse(s.as_bytes(), p).unwrap_err().to_string();
        assert!(bad("{").contains("invalid JSON"));
        assert!(bad(r#"{"format":2}"#).contains("format 2"));
        let h = "0".repeat(64);
        let f = |path: &str, size: u64, n: usize| {
            format!(
                r#"{{"format":1,"algorithm":"blake3","chunk_size":1024,"files":[{{"path":"{path}","size":{size},"blake3":"{h}","chunks":[{}]}}]}}"#,
                vec![format!("\"{h}\""); n].join(",")
            )
        };
        assert!(Manifest::parse(f("a/b", 2000, 2).as_bytes(), p).is_ok());
        assert!(bad(&f("../x", 1, 1)).contains("escapes"));
        assert!(bad(&f("/etc/passwd", 1, 1)).contains("not a plain relative"));
        assert!(bad(&f("a", 2000, 1)).contains("expected 2"));
        assert!(bad(&f(MANIFEST_NAME, 1, 1)).contains("manifest itself"));
    }
}

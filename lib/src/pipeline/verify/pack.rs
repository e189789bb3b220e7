//! Portable bundles: `tar` inside `zstd`, streamed, manifest first, one
//! zstd frame per tar member so an interrupted pack resumes per file.
//!
//! `pack` re-hashes every file as it streams it in and refuses to finish a
//! bundle of data that no longer matches the manifest. `unpack` reads the
//! manifest first, accepts only the files it lists (so no path can escape
//! the target), verifies every chunk as it arrives, writes each file to a
//! temporary name and renames it only once it is complete and verified,
//! and writes the manifest last. Files already in place with the right
//! hash are kept (a resumed unpack rewrites nothing that is good).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use blake3::hazmat::HasherExt;
use serde::{Deserialize, Serialize};

use super::hash::{chunk_count, file_root, hex};
use super::{Manifest, VerifyError, MANIFEST_NAME};
use crate::cli::{self, human_bytes};
use crate::fsutil;

/// Result of pack or unpack.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackSummary {
    /// The bundle.
    pub bundle: PathBuf,
    /// The directory.
    pub dir: PathBuf,
    /// Files (without the manifest).
    pub files: usize,
    /// Bytes of those files.
    pub bytes: u64,
    /// Size of the bundle.
    pub bundle_bytes: u64,
    /// Files that were already in place and verified (unpack only).
    pub kept: usize,
    /// Seconds.
    pub seconds: f64,
    /// Manifest hash.
    pub manifest_blake3: String,
}

impl PackSummary {
    /// The result line.
    pub fn line(&self, verb: &str) -> String {
        let kept = if self.kept > 0 {
            format!(", {} already in place", self.kept)
        } else {
            String::new()
        };
        format!(
            "verify: {verb} {} files, {} <-> {} bundle {} (ratio {:.3}) in {:.2} s{kept}; manifest blake3 {}",
            self.files,
            human_bytes(self.bytes),
            human_bytes(self.bundle_bytes),
            self.bundle.display(),
            self.bytes as f64 / self.bundle_bytes.max(1) as f64,
            self.seconds,
            self.manifest_blake3
        )
    }
}

/// Streams a file's bytes while computing its chunk values, so the data
/// can be checked against the manifest on the fly.
struct ChunkHasher {
    chunk: u64,
    size: u64,
    pos: u64,
    hasher: blake3::Hasher,
    cvs: Vec<[u8; 32]>,
}

impl ChunkHasher {
    fn new(size: u64, chunk: u64) -> Self {
        ChunkHasher {
            chunk,
            size,
            pos: 0,
            hasher: blake3::Hasher::new(),
            cvs: Vec::new(),
        }
    }

    /// Feeds bytes; returns the indices of chunks completed by them.
    fn update(&mut self, mut data: &[u8]) -> Vec<usize> {
        let mut done = Vec::new();
        while !data.is_empty() {
            let chunk_end = ((self.pos / self.chunk) + 1) * self.chunk;
            let take = ((chunk_end - self.pos) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if self.pos == chunk_end || self.pos == self.size {
                let cv = if self.size <= self.chunk {
                    *self.hasher.finalize().as_bytes()
                } else {
                    self.hasher.finalize_non_root()
                };
                self.cvs.push(cv);
                done.push(self.cvs.len() - 1);
                self.hasher = blake3::Hasher::new();
                if self.pos < self.size {
                    self.hasher.set_input_offset(self.pos);
                }
            }
        }
        done
    }
}

fn check_chunks(
    h: &ChunkHasher,
    done: &[usize],
    entry: &super::FileEntry,
    where_: &str,
) -> Result<(), VerifyError> {
    for &c in done {
        if c >= entry.chunks.len() || hex(&h.cvs[c]) != entry.chunks[c] {
            let (s, e) = super::hash::chunk_range(entry.size, h.chunk, c as u64);
            return Err(VerifyError::Mismatch {
                first: format!(
                    "{where_}: `{}` chunk {c} (bytes {s}..{e}) does not match the manifest; run `rh-verify check` on it",
                    entry.path
                ),
                more: 0,
            });
        }
    }
    Ok(())
}

/// Where a pack stopped: written beside the temporary bundle after every
/// member, so a rerun with the same manifest and level continues there.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct PackProgress {
    /// blake3 of the manifest being packed.
    manifest_blake3: String,
    /// zstd level.
    level: i32,
    /// Members complete (the manifest is member 0).
    members: usize,
    /// Bytes of the temporary bundle holding exactly those members.
    offset: u64,
}

fn progress_path(tmp: &Path) -> PathBuf {
    let mut name = tmp
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".progress");
    tmp.with_file_name(name)
}

/// The tar header blocks (with a GNU long-name entry when the path needs
/// one) of a regular file of `size` bytes: what `tar::Builder` writes
/// before the data.
fn tar_header(path: &str, size: u64) -> io::Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    let mut b = tar::Builder::new(Vec::new());
    // The builder writes the header, then copies the (empty) data and pads
    // nothing: its buffer holds the header blocks alone.
    b.append_data(&mut h, path, io::empty())?;
    Ok(b.get_ref().clone())
}

/// Packs `dir` (which must have a manifest) into a `tar.zst` bundle at
/// `out`, written to a temporary name and renamed when complete.
///
/// Each tar member is its own zstd frame (concatenated frames decode as one
/// stream, so the bundle is a plain `tar.zst`), and after each the bundle
/// is synced and its length recorded beside it: a pack that was killed or
/// failed continues from the last complete member when run again with the
/// same manifest and level, and gives the same bytes as an uninterrupted
/// run.
pub fn pack(dir: &Path, out: &Path, level: i32, quiet: bool) -> Result<PackSummary, VerifyError> {
    let t = Instant::now();
    let _lock = fsutil::DirLock::shared(dir)?;
    let (m, mhash) = Manifest::load(dir)?;
    let manifest_bytes = std::fs::read(dir.join(MANIFEST_NAME))
        .map_err(|e| VerifyError::io(dir.join(MANIFEST_NAME), e))?;
    let pb = cli::bytes_bar(m.total_bytes(), "packing", quiet);
    let tmp = fsutil::temp_path(out);
    let prog_path = progress_path(&tmp);
    let done = pack_resume_point(&prog_path, &tmp, mhash.to_hex().to_string(), level);
    if done.members > 0 {
        tracing::info!(
            "{}: continuing a pack after {} of {} members ({})",
            tmp.display(),
            done.members,
            m.files.len() + 1,
            human_bytes(done.offset)
        );
        let skipped: u64 = m.files.iter().take(done.members - 1).map(|e| e.size).sum();
        pb.inc(skipped);
    }
    let bundle = Bundle {
        dir,
        m: &m,
        manifest_bytes: &manifest_bytes,
        tmp: &tmp,
        prog_path: &prog_path,
        level,
        pb: &pb,
    };
    let result = bundle.write_members(done);
    pb.finish_and_clear();
    // A failed pack keeps its temporary bundle and progress (never at the
    // final name) for the rerun to continue from.
    result?;
    fsutil::commit_temp(&tmp, out)?;
    let _ = std::fs::remove_file(&prog_path);
    let bundle_bytes = std::fs::metadata(out)
        .map_err(|e| VerifyError::io(out, e))?
        .len();
    Ok(PackSummary {
        bundle: out.to_path_buf(),
        dir: dir.to_path_buf(),
        files: m.files.len(),
        bytes: m.total_bytes(),
        bundle_bytes,
        kept: 0,
        seconds: t.elapsed().as_secs_f64(),
        manifest_blake3: mhash.to_hex().to_string(),
    })
}

/// Where a pack resumes: a previous run's progress counts only for the same
/// manifest and level, and only while the temporary bundle still holds its
/// bytes; otherwise from the start.
fn pack_resume_point(
    prog_path: &Path,
    tmp: &Path,
    manifest_blake3: String,
    level: i32,
) -> PackProgress {
    let fresh = PackProgress {
        manifest_blake3,
        level,
        members: 0,
        offset: 0,
    };
    match std::fs::read(prog_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PackProgress>(&b).ok())
    {
        Some(p) => {
            let have = std::fs::metadata(tmp).map(|md| md.len()).unwrap_or(0);
            if p.manifest_blake3 == fresh.manifest_blake3 && p.level == level && have >= p.offset {
                p
            } else {
                fresh
            }
        }
        None => fresh,
    }
}

/// A bundle being written: one zstd frame per tar member (the manifest
/// first, then every listed file), each made durable and recorded in the
/// progress file before the next.
struct Bundle<'a> {
    dir: &'a Path,
    m: &'a Manifest,
    manifest_bytes: &'a [u8],
    tmp: &'a Path,
    prog_path: &'a Path,
    level: i32,
    pb: &'a indicatif::ProgressBar,
}

impl Bundle<'_> {
    /// Writes the members after `done`, recording each.
    fn write_members(&self, mut done: PackProgress) -> Result<(), VerifyError> {
        let tmp = self.tmp;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(tmp)
            .map_err(|e| VerifyError::io(tmp, e))?;
        f.set_len(done.offset)
            .map_err(|e| VerifyError::io(tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.seek(io::SeekFrom::Start(done.offset))
            .map_err(|e| VerifyError::io(tmp, e))?;
        let total = self.m.files.len() + 1;
        for i in done.members..total {
            let mut enc = zstd::stream::Encoder::new(&mut w, self.level)
                .map_err(|e| VerifyError::io(tmp, e))?;
            enc.include_checksum(true)
                .map_err(|e| VerifyError::io(tmp, e))?;
            let size = if i == 0 {
                let head = tar_header(MANIFEST_NAME, self.manifest_bytes.len() as u64)
                    .map_err(|e| VerifyError::io(tmp, e))?;
                enc.write_all(&head)
                    .and_then(|_| enc.write_all(self.manifest_bytes))
                    .map_err(|e| VerifyError::io(tmp, e))?;
                self.manifest_bytes.len() as u64
            } else {
                self.write_file(&mut enc, &self.m.files[i - 1])?
            };
            // Pad the data to a whole block; the last member also carries
            // the two zero blocks that end a tar archive.
            let mut pad = ((512 - size % 512) % 512) as usize;
            if i + 1 == total {
                pad += 1024;
            }
            enc.write_all(&vec![0u8; pad])
                .map_err(|e| VerifyError::io(tmp, e))?;
            enc.finish().map_err(|e| VerifyError::io(tmp, e))?;
            w.flush().map_err(|e| VerifyError::io(tmp, e))?;
            w.get_ref()
                .sync_data()
                .map_err(|e| VerifyError::io(tmp, e))?;
            done.members = i + 1;
            done.offset = w.stream_position().map_err(|e| VerifyError::io(tmp, e))?;
            let bytes = serde_json::to_vec(&done).expect("progress serializes");
            fsutil::write_atomic(self.prog_path, &bytes).map_err(VerifyError::from)?;
        }
        w.get_ref()
            .sync_all()
            .map_err(|e| VerifyError::io(tmp, e))?;
        Ok(())
    }

    /// Writes one listed file's tar header and bytes, checking them against
    /// the manifest as they stream; returns its size.
    fn write_file(
        &self,
        enc: &mut impl Write,
        entry: &super::FileEntry,
    ) -> Result<u64, VerifyError> {
        let p = self.dir.join(&entry.path);
        let file = File::open(&p).map_err(|e| VerifyError::io(&p, e))?;
        let len = file.metadata().map_err(|e| VerifyError::io(&p, e))?.len();
        if len != entry.size {
            return Err(VerifyError::Mismatch {
                first: format!(
                    "{}: {len} bytes, the manifest says {}; run `rh-verify check` first",
                    p.display(),
                    entry.size
                ),
                more: 0,
            });
        }
        let head = tar_header(&entry.path, entry.size)
            .map_err(|e| VerifyError::io(&p, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        enc.write_all(&head)
            .map_err(|e| VerifyError::io(self.tmp, e))?;
        let mut reader = HashingReader {
            inner: file.take(entry.size),
            h: ChunkHasher::new(entry.size, self.m.chunk_size),
            entry,
            err: None,
            pb: self.pb,
            label: self.dir.display().to_string(),
            path: p.clone(),
        };
        let r = io::copy(&mut reader, enc);
        if let Some(e) = reader.err.take() {
            return Err(e);
        }
        // Read errors were taken above; what is left failed writing.
        r.map_err(|e| VerifyError::io(self.tmp, e))?;
        if reader.h.pos != entry.size {
            return Err(VerifyError::Changed {
                path: p,
                reason: "changed size while it was packed".into(),
            });
        }
        Ok(entry.size)
    }
}

/// A reader that checks each chunk against the manifest as it passes.
struct HashingReader<'a, R> {
    inner: R,
    h: ChunkHasher,
    entry: &'a super::FileEntry,
    err: Option<VerifyError>,
    pb: &'a indicatif::ProgressBar,
    label: String,
    /// The file being read, for read errors.
    path: PathBuf,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                // Remembered so the error names the input, not the bundle.
                self.err = Some(VerifyError::io(
                    &self.path,
                    io::Error::new(e.kind(), e.to_string()),
                ));
                return Err(e);
            }
        };
        let done = self.h.update(&buf[..n]);
        self.pb.inc(n as u64);
        if let Err(e) = check_chunks(&self.h, &done, self.entry, &self.label) {
            let msg = e.to_string();
            self.err = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(n)
    }
}

fn bad_bundle(path: &Path, reason: impl Into<String>) -> VerifyError {
    VerifyError::BadBundle {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where unpack stages verified files beside the target, under the same
/// relative paths, until the whole bundle has verified.
pub const STAGING_DIR: &str = ".roundhouse-unpack";

/// Refuses to write `out/rel` through a symlink: any existing ancestor of
/// it under `out` that is a link (to a directory elsewhere) is refused,
/// naming it.
fn no_links_on_the_way(out: &Path, rel: &str) -> Result<(), VerifyError> {
    let mut p = out.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(fsutil::FsError::NotOurs {
                    path: p,
                    what: "is a symlink; unpack does not write through links".into(),
                }
                .into())
            }
            Ok(m) if !m.is_dir() => {
                return Err(fsutil::FsError::NotOurs {
                    path: p,
                    what: "is in the way of a directory of the bundle".into(),
                }
                .into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `path` is a regular file (not a link) with this size and hash.
fn verified_at(path: &Path, entry: &super::FileEntry) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|md| md.is_file() && md.len() == entry.size)
        && fsutil::blake3_file(path)
            .map(|h| h.to_hex().as_str() == entry.blake3)
            .unwrap_or(false)
}

/// Unpacks a bundle into `out`, verifying every chunk against the bundled
/// manifest (and the manifest against `expect`, when given).
///
/// The bundle is committed as a whole: every file is written and verified
/// in a staging directory beside the target (`out/.roundhouse-unpack`),
/// and only when the whole bundle has verified are the files renamed into
/// place, the index after the data files and the manifest last. Until
/// then whatever `out` held (an older cache) is untouched and usable. A
/// failed or killed unpack keeps the files it had verified in staging, so
/// a rerun does not transfer them again.
pub fn unpack(
    bundle: &Path,
    out: &Path,
    expect: Option<&str>,
    quiet: bool,
) -> Result<PackSummary, VerifyError> {
    let t = Instant::now();
    let f = fsutil::open_regular(bundle)?;
    let bundle_bytes = f.metadata().map_err(|e| VerifyError::io(bundle, e))?.len();
    let dec = zstd::stream::Decoder::with_buffer(BufReader::with_capacity(1 << 20, f))
        .map_err(|e| VerifyError::io(bundle, e))?;
    let mut ar = tar::Archive::new(dec);
    let mut entries = ar
        .entries()
        .map_err(|e| bad_bundle(bundle, format!("not a tar.zst bundle: {e}")))?;
    let corrupt = |e: io::Error| bad_bundle(bundle, format!("truncated or corrupt: {e}"));

    // The manifest comes first.
    let first = entries
        .next()
        .ok_or_else(|| bad_bundle(bundle, "empty bundle"))?
        .map_err(corrupt)?;
    let (mbytes, m, mhex) = read_bundled_manifest(bundle, first, expect)?;
    let _lock = fsutil::DirLock::exclusive(out, "rh-verify unpack")?;
    for f in &m.files {
        no_links_on_the_way(out, &f.path)?;
    }
    let staging = make_staging(out)?;
    let mut pending: BTreeMap<&str, &super::FileEntry> =
        m.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let pb = cli::bytes_bar(m.total_bytes(), "unpacking", quiet);
    let mut kept = 0;
    // Files to rename from staging into place once everything verified.
    let mut staged: Vec<&str> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for e in entries {
        let mut e = e.map_err(corrupt)?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let Some(entry) = pending.remove(name.as_str()) else {
            return Err(bad_bundle(
                bundle,
                format!("entry `{name}` is not in the bundled manifest (or is listed twice); refusing it"),
            ));
        };
        if e.header().entry_type() != tar::EntryType::Regular || e.size() != entry.size {
            return Err(bad_bundle(
                bundle,
                format!(
                    "entry `{name}` is {:?} of {} bytes; the manifest says a file of {}",
                    e.header().entry_type(),
                    e.size(),
                    entry.size
                ),
            ));
        }
        let target = out.join(&entry.path);
        let stage_path = staging.join(&entry.path);
        // Resume: a file already in place, or staged by an earlier run,
        // with the right hash is kept.
        let in_place = verified_at(&target, entry);
        let in_staging = !in_place && verified_at(&stage_path, entry);
        if in_place || in_staging {
            io::copy(&mut e, &mut io::sink()).map_err(corrupt)?;
            pb.inc(entry.size);
            kept += 1;
            if in_staging {
                staged.push(entry.path.as_str());
            }
            continue;
        }
        let unpacking = Unpacking {
            bundle,
            chunk_size: m.chunk_size,
            pb: &pb,
        };
        unpacking.stage_entry(&mut e, entry, &stage_path, &mut buf)?;
        staged.push(entry.path.as_str());
    }
    pb.finish_and_clear();
    if let Some((first, _)) = pending.iter().next() {
        return Err(bad_bundle(
            bundle,
            format!(
                "truncated: {} file(s) of the manifest are not in the bundle (first: `{first}`)",
                pending.len()
            ),
        ));
    }
    commit_staged(out, &staging, &staged, &mbytes)?;
    Ok(PackSummary {
        bundle: bundle.to_path_buf(),
        dir: out.to_path_buf(),
        files: m.files.len(),
        bytes: m.total_bytes(),
        bundle_bytes,
        kept,
        seconds: t.elapsed().as_secs_f64(),
        manifest_blake3: mhex,
    })
}

/// The bundle's first entry, which must be the manifest: its bytes, parsed,
/// and its hash (checked against `expect`).
fn read_bundled_manifest<R: Read>(
    bundle: &Path,
    mut first: tar::Entry<'_, R>,
    expect: Option<&str>,
) -> Result<(Vec<u8>, Manifest, String), VerifyError> {
    let name = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if name != MANIFEST_NAME {
        return Err(bad_bundle(
            bundle,
            format!("first entry is `{name}`, not {MANIFEST_NAME}: not a roundhouse bundle"),
        ));
    }
    if first.size() > 256 << 20 {
        return Err(bad_bundle(bundle, "manifest entry is implausibly large"));
    }
    let mut mbytes = Vec::new();
    first
        .read_to_end(&mut mbytes)
        .map_err(|e| bad_bundle(bundle, format!("truncated or corrupt: {e}")))?;
    let m = Manifest::parse(&mbytes, &bundle.join(MANIFEST_NAME))?;
    let mhex = blake3::hash(&mbytes).to_hex().to_string();
    if let Some(exp) = expect {
        if !exp.trim().eq_ignore_ascii_case(&mhex) {
            return Err(VerifyError::Expect {
                path: bundle.to_path_buf(),
                found: mhex,
                expected: exp.trim().to_string(),
            });
        }
    }
    Ok((mbytes, m, mhex))
}

/// The staging directory under `out` (created; refused when something else
/// has its name).
fn make_staging(out: &Path) -> Result<PathBuf, VerifyError> {
    let staging = out.join(STAGING_DIR);
    match std::fs::symlink_metadata(&staging) {
        Ok(md) if !md.is_dir() => {
            return Err(fsutil::FsError::NotOurs {
                path: staging,
                what: "is not the staging directory unpack makes".into(),
            }
            .into())
        }
        _ => std::fs::create_dir_all(&staging).map_err(|e| VerifyError::io(&staging, e))?,
    }
    Ok(staging)
}

/// What staging one entry needs of the unpack.
struct Unpacking<'a> {
    bundle: &'a Path,
    chunk_size: u64,
    pb: &'a indicatif::ProgressBar,
}

impl Unpacking<'_> {
    /// Streams one entry into a temporary beside `stage_path`, checking
    /// every chunk and the file hash against the manifest as it goes, then
    /// renames it into staging; a failure leaves no temporary.
    fn stage_entry<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        entry: &super::FileEntry,
        stage_path: &Path,
        buf: &mut [u8],
    ) -> Result<(), VerifyError> {
        if let Some(parent) = stage_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| VerifyError::io(parent, e))?;
        }
        let tmp = fsutil::temp_path(stage_path);
        if let Err(err) = self.write_checked(e, entry, &tmp, buf) {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        fsutil::commit_temp(&tmp, stage_path)?;
        Ok(())
    }

    fn write_checked<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        entry: &super::FileEntry,
        tmp: &Path,
        buf: &mut [u8],
    ) -> Result<(), VerifyError> {
        let bundle = self.bundle;
        let name = &entry.path;
        let mut h = ChunkHasher::new(entry.size, self.chunk_size);
        // 2 MiB-aligned writes: the unpacked cache maps on 2 MiB pages.
        let mut w = crate::fsutil::FolioWriter::new(
            File::create(tmp).map_err(|e| VerifyError::io(tmp, e))?,
            0,
        );
        loop {
            let n = e
                .read(buf)
                .map_err(|e| bad_bundle(bundle, format!("truncated or corrupt: {e}")))?;
            if n == 0 {
                break;
            }
            let done = h.update(&buf[..n]);
            check_chunks(&h, &done, entry, &bundle.display().to_string())?;
            w.write_all(&buf[..n])
                .map_err(|e| VerifyError::io(tmp, e))?;
            self.pb.inc(n as u64);
        }
        if h.pos != entry.size {
            return Err(bad_bundle(bundle, format!("entry `{name}` ends early")));
        }
        if file_root(&h.cvs, entry.size, self.chunk_size)
            .to_hex()
            .as_str()
            != entry.blake3
            || h.cvs.len() as u64 != chunk_count(entry.size, self.chunk_size)
        {
            return Err(VerifyError::Mismatch {
                first: format!(
                    "{}: `{name}` file hash does not match the manifest",
                    bundle.display()
                ),
                more: 0,
            });
        }
        let f = w.into_inner().map_err(|e| VerifyError::io(tmp, e))?;
        f.sync_all().map_err(|e| VerifyError::io(tmp, e))?;
        Ok(())
    }
}

/// Swaps the verified staged files into `out`: the old manifest and (when
/// a new one is staged) the old index go first, so a crash in the middle
/// never leaves an old index or manifest describing new data; then the
/// data files, then the index, then the manifest.
fn commit_staged(
    out: &Path,
    staging: &Path,
    staged: &[&str],
    manifest: &[u8],
) -> Result<(), VerifyError> {
    let index = crate::cache::INDEX_FILE;
    let remove = |p: &Path| match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VerifyError::io(p, e)),
        _ => Ok(()),
    };
    remove(&out.join(MANIFEST_NAME))?;
    if staged.contains(&index) {
        remove(&out.join(index))?;
    }
    fsutil::sync_dir(out)?;
    let mut order: Vec<&str> = staged.iter().copied().filter(|p| *p != index).collect();
    if staged.contains(&index) {
        order.push(index);
    }
    for rel in order {
        let target = out.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| VerifyError::io(parent, e))?;
        }
        std::fs::rename(staging.join(rel), &target).map_err(|e| VerifyError::io(&target, e))?;
        fsutil::sync_dir(target.parent().unwrap_or(out))?;
    }
    fsutil::write_atomic(&out.join(MANIFEST_NAME), manifest)?;
    let _ = std::fs::remove_dir_all(staging);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hasher_matches_plain_blake3() {
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 31) as u8).collect();
        for (size, chunk) in [
            (9000usize, 1024u64),
            (1000, 1024),
            (1024, 1024),
            (2048, 1024),
            (0, 1024),
        ] {
            let mut h = ChunkHasher::new(size as u64, chunk);
            for piece in data[..size].chunks(700) {
                h.update(piece);
            }
            assert_eq!(h.cvs.len() as u64, chunk_count(size as u64, chunk));
            assert_eq!(
                file_root(&h.cvs, size as u64, chunk),
                blake3::hash(&data[..size])
            );
        }
    }
}

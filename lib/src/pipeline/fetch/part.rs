//! What rh-fetch knows about a partial download, kept beside it in
//! `<file>.part.meta` (JSON, written atomically).
//!
//! The hub publishes only a whole-file sha256, so single bytes cannot be
//! verified while they arrive. To never throw away good bytes:
//!
//! * the validator (`ETag`) of the server that sent the bytes is kept and
//!   sent back as `If-Range` on every resume, so a file that changed on the
//!   server comes back whole (`200`) instead of being spliced onto old bytes;
//! * every completed chunk (16 MiB by default) of what was received is
//!   recorded by its blake3, after the bytes are fsynced, so a resume can
//!   tell which prefix of the `.part` is still what was received and drop
//!   back to the last chunk boundary that agrees instead of to zero;
//! * a `.part` whose whole-file hash does not match is kept with a
//!   [`Repair`] cursor: the next run compares it with the hub chunk by chunk
//!   and rewrites only the chunks that differ, continuing where an
//!   interrupted repair stopped.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{with_suffix, FetchError};
use crate::fsutil::{self, FsError};

/// Default chunk size for chunk hashes and repair ranges.
pub const DEFAULT_CHUNK: u64 = 16 << 20;

/// Bytes before the resume point that are fetched again and compared with
/// the `.part` on every resume (catches a torn or zeroed tail after a crash).
pub const OVERLAP: u64 = 64 << 10;

/// A repair in progress: the `.part` is complete but did not hash right.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Repair {
    /// Chunks before this index have been compared (and fixed).
    pub cursor: u64,
    /// Byte ranges `[start, end)` found different so far.
    pub differed: Vec<(u64, u64)>,
    /// Bytes downloaded by the repair so far.
    pub downloaded: u64,
}

impl Repair {
    /// Records that bytes `[start, end)` differed, merging adjacent ranges.
    pub fn add_diff(&mut self, start: u64, end: u64) {
        if let Some(last) = self.differed.last_mut() {
            if last.1 >= start {
                last.1 = last.1.max(end);
                return;
            }
        }
        self.differed.push((start, end));
    }

    /// `bytes a-b, c-d` (inclusive ends, as HTTP writes ranges).
    pub fn describe(&self) -> String {
        if self.differed.is_empty() {
            return "no bytes".into();
        }
        let mut parts: Vec<String> = self
            .differed
            .iter()
            .take(20)
            .map(|(a, b)| format!("{a}-{}", b - 1))
            .collect();
        if self.differed.len() > 20 {
            parts.push(format!("and {} more ranges", self.differed.len() - 20));
        }
        format!("bytes {}", parts.join(", "))
    }

    /// Total bytes in the differing ranges.
    pub fn differing_bytes(&self) -> u64 {
        self.differed.iter().map(|(a, b)| b - a).sum()
    }
}

/// The `<file>.part.meta` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartMeta {
    /// Format version.
    pub version: u32,
    /// The sha256 the hub gave for the file, when it gave one.
    pub sha256: Option<String>,
    /// The git blob id the hub gave for the file.
    pub oid: Option<String>,
    /// The file size the hub gave.
    pub size: Option<u64>,
    /// The strong `ETag` of the server that sent the bytes (sent back as
    /// `If-Range`), exactly as it was received.
    pub etag: Option<String>,
    /// Chunk size of `chunks` and of repairs.
    pub chunk_size: u64,
    /// blake3 of each complete chunk received, in order; always describes a
    /// prefix of the `.part` that was fsynced before it was recorded.
    pub chunks: Vec<String>,
    /// Set when the complete `.part` failed verification.
    pub repair: Option<Repair>,
}

/// `<file>.part.meta` for a `<file>.part`.
pub fn meta_path(part: &Path) -> PathBuf {
    with_suffix(part, ".meta")
}

impl PartMeta {
    /// A fresh record for a file with these expectations.
    pub fn new(sha256: Option<String>, oid: Option<String>, size: Option<u64>, chunk: u64) -> Self {
        PartMeta {
            version: 1,
            sha256,
            oid,
            size,
            etag: None,
            chunk_size: chunk,
            chunks: Vec::new(),
            repair: None,
        }
    }

    /// Loads the record beside `part`, if there is a readable one.
    pub fn load(part: &Path) -> Option<PartMeta> {
        let p = meta_path(part);
        let bytes = std::fs::read(&p).ok()?;
        match serde_json::from_slice::<PartMeta>(&bytes) {
            Ok(m) if m.version == 1 && m.chunk_size > 0 => Some(m),
            _ => {
                tracing::warn!("{}: unreadable, ignoring it", p.display());
                None
            }
        }
    }

    /// Writes the record beside `part` (temp + fsync + rename).
    pub fn save(&self, part: &Path) -> Result<(), FsError> {
        let json = serde_json::to_vec_pretty(self).expect("meta serializes");
        fsutil::write_atomic(&meta_path(part), &json)
    }

    /// Removes the record beside `part`.
    pub fn remove(part: &Path) {
        let _ = std::fs::remove_file(meta_path(part));
    }

    /// Bytes covered by recorded chunks.
    pub fn recorded_len(&self) -> u64 {
        self.chunks.len() as u64 * self.chunk_size
    }

    /// Whether this record describes the same remote file as `other`
    /// (same hash and size where both know them).
    pub fn same_file(
        &self,
        sha256: &Option<String>,
        oid: &Option<String>,
        size: Option<u64>,
    ) -> bool {
        let agree = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        agree(&self.sha256, sha256)
            && (sha256.is_some() || agree(&self.oid, oid))
            && match (self.size, size) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Running hashes of a prefix of a file: whole-file sha256 and blake3, and
/// the blake3 of the current (incomplete) chunk.
#[derive(Clone)]
pub struct Progress {
    /// sha256 of bytes `[0, len)`.
    pub sha: Sha256,
    /// blake3 of bytes `[0, len)` (recorded in the stage record).
    pub b3: blake3::Hasher,
    /// blake3 of bytes `[len - len % chunk, len)`.
    pub chunk: blake3::Hasher,
    /// Bytes hashed.
    pub len: u64,
    /// Chunk size.
    pub chunk_size: u64,
}

impl Progress {
    /// Hashes of nothing.
    pub fn new(chunk_size: u64) -> Self {
        Progress {
            sha: Sha256::new(),
            b3: blake3::Hasher::new(),
            chunk: blake3::Hasher::new(),
            len: 0,
            chunk_size,
        }
    }

    /// Adds bytes; calls `on_chunk(index, blake3 hex)` for every chunk that
    /// they complete.
    pub fn update<E>(
        &mut self,
        mut b: &[u8],
        mut on_chunk: impl FnMut(u64, String) -> Result<(), E>,
    ) -> Result<(), E> {
        while !b.is_empty() {
            let room = self.chunk_size - self.len % self.chunk_size;
            let n = (room as usize).min(b.len());
            self.sha.update(&b[..n]);
            self.b3.update(&b[..n]);
            self.chunk.update(&b[..n]);
            self.len += n as u64;
            b = &b[n..];
            if self.len.is_multiple_of(self.chunk_size) {
                let h = std::mem::take(&mut self.chunk)
                    .finalize()
                    .to_hex()
                    .to_string();
                on_chunk(self.len / self.chunk_size - 1, h)?;
            }
        }
        Ok(())
    }

    /// The sha256 hex of what was hashed.
    pub fn sha_hex(&self) -> String {
        format!("{:x}", self.sha.clone().finalize())
    }
}

/// What [`scan`] found in a `.part`.
pub struct Scan {
    /// Hashes of the prefix kept.
    pub progress: Progress,
    /// Hashes at the last recorded chunk boundary (to drop back to it).
    pub at_recorded: Progress,
    /// Chunk hashes of complete chunks after the recorded ones (to record
    /// once the tail is confirmed by the overlap check).
    pub pending: Vec<String>,
    /// Index of the first recorded chunk that no longer matches, if any
    /// (the file was cut there).
    pub bad_chunk: Option<u64>,
}

/// Re-hashes a `.part` from the start, checking the chunks recorded in
/// `meta`. At the first recorded chunk whose bytes changed, the file is cut
/// at that chunk's start (and `meta.chunks` shortened): what follows cannot
/// be trusted. `bar` advances by the bytes read.
pub fn scan(
    part: &Path,
    meta: &mut PartMeta,
    bar: &indicatif::ProgressBar,
) -> Result<Scan, FetchError> {
    let cs = meta.chunk_size;
    let mut p = Progress::new(cs);
    let mut at_recorded = p.clone();
    let mut pending = Vec::new();
    let mut bad: Option<u64> = None;
    let mut f = File::open(part).map_err(|e| FsError::io(part, e))?;
    let mut buf = vec![0u8; 1 << 20];
    'read: loop {
        let n = f.read(&mut buf).map_err(|e| FsError::io(part, e))?;
        if n == 0 {
            break;
        }
        let recorded = &meta.chunks;
        let mut stop = false;
        // Feed up to chunk boundaries so the recorded snapshot is exact.
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let room = cs - p.len % cs;
            let k = (room as usize).min(rest.len());
            p.update::<()>(&rest[..k], |i, h| {
                match recorded.get(i as usize) {
                    Some(want) if *want == h => {}
                    Some(_) => {
                        bad = Some(i);
                        stop = true;
                    }
                    None => pending.push(h),
                }
                Ok(())
            })
            .expect("infallible");
            rest = &rest[k..];
            if stop {
                break 'read;
            }
            if p.len.is_multiple_of(cs) && p.len / cs == recorded.len() as u64 {
                at_recorded = p.clone();
            }
        }
        bar.inc(n as u64);
    }
    if p.len < meta.recorded_len() && bad.is_none() {
        // Shorter than what was recorded (cut by hand or a crash).
        bad = Some(p.len / cs);
    }
    if let Some(i) = bad {
        let keep = i * cs;
        tracing::warn!(
            "{}: chunk {i} (from byte {keep}) no longer holds what was received; keeping the {keep} bytes before it",
            part.display()
        );
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(part)
            .map_err(|e| FsError::io(part, e))?;
        file.set_len(keep).map_err(|e| FsError::io(part, e))?;
        file.sync_all().map_err(|e| FsError::io(part, e))?;
        meta.chunks.truncate(i as usize);
        if at_recorded.len != keep {
            // Recompute the prefix (rare: only after damage on disk).
            let mut s = scan(part, meta, &indicatif::ProgressBar::hidden())?;
            s.bad_chunk = Some(i);
            return Ok(s);
        }
        return Ok(Scan {
            progress: at_recorded.clone(),
            at_recorded,
            pending: Vec::new(),
            bad_chunk: Some(i),
        });
    }
    Ok(Scan {
        progress: p,
        at_recorded,
        pending,
        bad_chunk: None,
    })
}

/// The git blob id (sha1 of `blob <len>\0<content>`) of a file, as the
/// hub's tree API gives it for files not stored in LFS.
pub fn git_blob_sha1(path: &Path) -> Result<String, FsError> {
    use sha1::Sha1;
    let len = std::fs::metadata(path)
        .map_err(|e| FsError::io(path, e))?
        .len();
    let mut h = Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    crate::fsutil::read_chunks(path, |b| h.update(b))?;
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_id_matches_git() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_sha1(&p).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn chunks_are_reported_at_boundaries_and_scan_cuts_at_a_changed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join("x.part");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&part, &data).unwrap();
        let mut meta = PartMeta::new(None, None, None, 1000);
        let mut p = Progress::new(1000);
        let mut got = Vec::new();
        // Uneven pieces across boundaries.
        for piece in data.chunks(777) {
            p.update::<()>(piece, |i, h| {
                got.push((i, h));
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(got.len(), 10);
        assert!(got.iter().enumerate().all(|(k, (i, _))| k as u64 == *i));
        meta.chunks = got.iter().take(6).map(|(_, h)| h.clone()).collect();
        let hidden = indicatif::ProgressBar::hidden();
        let s = scan(&part, &mut meta, &hidden).unwrap();
        assert_eq!(s.progress.len, 10_000);
        assert_eq!(s.at_recorded.len, 6000);
        assert_eq!(s.pending.len(), 4);
        assert!(s.bad_chunk.is_none());
        assert_eq!(s.progress.sha_hex(), format!("{:x}", Sha256::digest(&data)));

        // Damage chunk 3 on disk: the file is cut at byte 3000.
        let mut bad = data.clone();
        bad[3500] ^= 1;
        std::fs::write(&part, &bad).unwrap();
        let s = scan(&part, &mut meta, &hidden).unwrap();
        assert_eq!(s.bad_chunk, Some(3));
        assert_eq!(s.progress.len, 3000);
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 3000);
        assert_eq!(meta.chunks.len(), 3);
        assert_eq!(
            s.progress.sha_hex(),
            format!("{:x}", Sha256::digest(&data[..3000]))
        );
    }

    #[test]
    fn repair_ranges_merge_and_describe() {
        let mut r = Repair::default();
        r.add_diff(10, 20);
        r.add_diff(20, 30);
        r.add_diff(100, 101);
        assert_eq!(r.differed, vec![(10, 30), (100, 101)]);
        assert_eq!(r.describe(), "bytes 10-29, 100-100");
        assert_eq!(r.differing_bytes(), 21);
    }
}

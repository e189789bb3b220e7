//! The repacked weight cache (`docs/cache-format.md`): a header-checked,
//! rkyv-indexed set of data files whose payloads are already in the kernel
//! layout, so the engine maps them and reads weights in place.
//!
//! * [`format`]: headers, the archived [`format::Index`], validation;
//! * [`write`]: `rh-repack` (checkpoint -> cache, streaming and resumable);
//! * [`read`]: [`Cache`], a [`crate::weights::WeightSource`] over the mapped files.

pub mod format;
pub mod published;
pub mod read;
pub mod write;

use std::path::{Path, PathBuf};

use crate::cli::{Classify, Exit};
use crate::fsutil::FsError;
use crate::stage::StageError;

pub use format::{Index, FORMAT_VERSION, INDEX_FILE};
pub use read::Cache;
pub use write::{repack, RepackFlags, RepackOptions, RepackOutcome};

/// Errors reading or writing a cache; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] FsError),
    /// A header, index or data file is damaged or inconsistent.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A cache written in another format version.
    #[error(
        "{path}: cache format version {found}, this tool reads version {}; rerun rh-repack",
        FORMAT_VERSION
    )]
    Version {
        /// The index file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The directory has no cache index.
    #[error("{0}: not a roundhouse cache (no {INDEX_FILE}); run rh-repack first")]
    NotACache(PathBuf),
    /// The input checkpoint cannot be repacked.
    #[error("{0}")]
    Input(String),
    /// A stage-record problem (including a predecessor not finished).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// Not enough free disk space for the cache (checked before writing).
    #[error("{dir}: repack needs {need} more but only {free} is free; free some space, choose another cache directory, or pass --no-space-check")]
    Disk {
        /// The cache directory.
        dir: PathBuf,
        /// Bytes still to write (human readable).
        need: String,
        /// Bytes free (human readable).
        free: String,
    },
    /// The run was stopped by the test hook.
    #[error("stopped after {0} tensor groups (RH_REPACK_ABORT_AFTER_UNITS)")]
    Stopped(usize),
}

impl CacheError {
    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> CacheError {
        CacheError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl Classify for CacheError {
    fn exit(&self) -> Exit {
        match self {
            CacheError::Corrupt { .. } | CacheError::Version { .. } => Exit::VerifyFailed,
            CacheError::Stage(e) => e.exit(),
            _ => Exit::Failure,
        }
    }
}

/// Whether `dir` claims to hold a cache: its index file exists (cheap;
/// [`Cache::open`] does the full validation, so a damaged index, a wrong
/// magic included, is reported as such rather than the directory being
/// taken for a checkpoint).
pub fn is_cache(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(INDEX_FILE)).is_ok()
}

/// Whether the file at `path` starts with `magic` (a file roundhouse wrote).
pub(crate) fn has_magic(path: &Path, magic: &[u8]) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; magic.len()];
    crate::fsutil::open_regular(path)
        .ok()
        .is_some_and(|mut f| f.read_exact(&mut head).is_ok() && head == magic)
}

#[cfg(test)]
mod tests;

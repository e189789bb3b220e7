//! Expert usage counts kept in the work directory
//! (`WORK/expert-usage.json`), so the hot set survives a restart and is
//! read first. The file is a hint: one that is missing, damaged, or from
//! another cache is reported with a warning and counting starts fresh; it
//! never makes a run fail. It is written crash-safely (temp file, fsync,
//! rename), so a crash leaves the old or the new file, never half of one.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's name in the work directory.
pub const USAGE_FILE: &str = "expert-usage.json";

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct UsageFile {
    format: u32,
    /// The cache's index hash: counts of another cache are not used.
    cache: String,
    /// `counts[layer][expert]`: times the router chose it.
    counts: Vec<Vec<u64>>,
}

/// Reads the counts for a cache of `layers` x `experts`; `None` (after a
/// warning, unless the file is simply absent) when unusable.
pub fn load(path: &Path, cache: &str, layers: usize, experts: usize) -> Option<Vec<Vec<u64>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "{}: cannot read expert usage ({e}); starting fresh",
                path.display()
            );
            return None;
        }
    };
    let why = match serde_json::from_slice::<UsageFile>(&bytes) {
        Err(e) => format!("not a usage file ({e})"),
        Ok(f) if f.format != FORMAT => format!("format {} (expected {FORMAT})", f.format),
        Ok(f) if f.cache != cache => "written for another cache".to_string(),
        Ok(f) if f.counts.len() != layers || f.counts.iter().any(|l| l.len() != experts) => {
            format!("shape differs from the model's {layers} x {experts}")
        }
        Ok(f) => return Some(f.counts),
    };
    tracing::warn!(
        "{}: expert usage ignored: {why}; starting fresh",
        path.display()
    );
    None
}

/// Why the counts were not saved (the pager warns and goes on).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The counts did not serialize.
    #[error("{0}")]
    Json(serde_json::Error),
    /// The file could not be written.
    #[error("{}", crate::cli::one_line(.0))]
    Write(crate::fsutil::FsError),
}

/// Writes the counts crash-safely.
pub fn save(path: &Path, cache: &str, counts: &[Vec<u64>]) -> Result<(), SaveError> {
    let f = UsageFile {
        format: FORMAT,
        cache: cache.to_string(),
        counts: counts.to_vec(),
    };
    let bytes = serde_json::to_vec(&f).map_err(SaveError::Json)?;
    crate::fsutil::write_atomic(path, &bytes).map_err(SaveError::Write)
}

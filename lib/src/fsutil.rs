//! Crash-safe file writing: write to a temporary file beside the target,
//! fsync it, rename it over the target, then fsync the directory.
//!
//! A reader therefore sees either the old file or the complete new one,
//! never a half-written file where a good one stood.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Errors from crash-safe file operations; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl FsError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        FsError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The temporary name used while `target` is being written.
pub fn temp_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    target.with_file_name(name)
}

/// Writes `bytes` to `target` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomic_with(target, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], but the content is produced by `fill` writing into
/// the temporary file. If `fill` fails the temporary file is removed and the
/// target is left untouched.
pub fn write_atomic_with(
    target: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), FsError> {
    if let Some(dir) = target.parent() {
        if !dir.as_os_str().is_empty() {
            fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
        }
    }
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        Ok::<_, io::Error>(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FsError::io(&tmp, e));
    }
    commit_temp(&tmp, target)
}

/// Renames a fully written and fsynced temporary file over `target` and
/// syncs the directory so the rename itself survives a crash.
pub fn commit_temp(tmp: &Path, target: &Path) -> Result<(), FsError> {
    fs::rename(tmp, target).map_err(|e| FsError::io(target, e))?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Fsyncs a directory (a no-op where directories cannot be opened).
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

/// Checks that `dir` exists (creating it) and that a file can be created in
/// it, so a stage fails before doing work rather than after.
pub fn ensure_writable_dir(dir: &Path) -> Result<(), FsError> {
    fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
    let probe = dir.join(".roundhouse-write-probe");
    File::create(&probe).map_err(|e| FsError::io(dir, e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Feeds a file's contents to `f`, 1 MiB at a time (files of any size).
pub fn read_chunks(path: &Path, mut f: impl FnMut(&[u8])) -> Result<(), FsError> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| FsError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => f(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::io(path, e)),
        }
    }
}

/// blake3 of a file's contents, read through a buffer (files of any size).
pub fn blake3_file(path: &Path) -> Result<blake3::Hash, FsError> {
    let mut hasher = blake3::Hasher::new();
    let f = File::open(path).map_err(|e| FsError::io(path, e))?;
    hasher.update_reader(f).map_err(|e| FsError::io(path, e))?;
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.json");
        write_atomic(&target, b"good").unwrap();
        let err = write_atomic_with(&target, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"good");
        assert!(!temp_path(&target).exists());
    }
}

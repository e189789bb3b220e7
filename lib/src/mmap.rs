//! The one place files are memory-mapped.
//!
//! Soundness: a file mapping is only sound while nobody truncates or rewrites
//! the file. Roundhouse never modifies a file in place (every writer goes
//! through [`crate::fsutil`]: temp file + rename, so a mapped inode is never
//! changed), maps read-only, and callers check every length recorded in a
//! header or index against the mapped length before slicing. A file changed
//! behind our back by another program is outside what we can guard against;
//! `rh-verify --quick` checks sizes before mapping to catch truncation early.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::fsutil::FsError;

/// A read-only mapping of a whole file. Empty files give an empty mapping
/// (mmap of length 0 is an error on Linux).
#[derive(Debug)]
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Arc<MappedFile>, FsError> {
        let f = File::open(path).map_err(|e| FsError::io(path, e))?;
        let len = f.metadata().map_err(|e| FsError::io(path, e))?.len();
        if len == 0 {
            return Ok(Arc::new(MappedFile { map: None }));
        }
        // SAFETY: read-only map of a file that roundhouse never modifies in
        // place (see module docs); lengths are validated before use.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| FsError::io(path, e))?;
        Ok(Arc::new(MappedFile { map: Some(map) }))
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Advises the kernel about the access pattern of a byte range.
    pub fn advise_willneed(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(memmap2::Advice::WillNeed);
        }
    }

    /// The underlying map (for madvise/mlock by the strategy).
    pub fn raw(&self) -> Option<&memmap2::Mmap> {
        self.map.as_ref()
    }
}

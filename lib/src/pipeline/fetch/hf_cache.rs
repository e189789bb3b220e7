//! The Hugging Face hub cache layout, shared with Python's
//! `huggingface_hub` and other HF tools:
//!
//! ```text
//! <hub cache>/models--OWNER--NAME/
//!     blobs/<sha256 for LFS files, git blob id otherwise>
//!     snapshots/<commit>/<path>  -> ../../blobs/<hash> (relative symlink)
//!     refs/<revision>            (file holding the commit)
//! ```
//!
//! It is the default home of `hf:` downloads, as for every HF tool: rh-fetch
//! *reuses* blobs already there (from `huggingface-cli`, transformers or an
//! earlier run; checked against the hub's sha256 or git blob id before use,
//! so a damaged cache is never trusted), *stores* what it downloads as a
//! blob with its snapshot link (so transformers finds it), and makes each
//! file of the checkpoint directory a symlink to the snapshot entry
//! ([`RepoCache::point`]) instead of a second copy. `--no-hf-cache` keeps
//! plain files in the checkpoint directory instead.
//!
//! The links are the layout's own: a snapshot entry is a relative link
//! `../../blobs/<hash>` (one more `..` per subfolder), a checkpoint entry an
//! absolute link to the snapshot entry. Walks of a checkpoint follow such
//! file links ([`super::local::list`]) but never links to directories.

use std::fs;
use std::path::{Path, PathBuf};

use super::{with_suffix, FetchError};
use crate::fsutil::{self, FsError};

/// The hub cache directory: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`,
/// else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn default_hub_cache() -> PathBuf {
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return PathBuf::from(v);
        }
    }
    hf_home().join("hub")
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(v) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    if let Some(v) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(v).join("huggingface");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("huggingface")
}

/// The token: `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else
/// `$HF_HOME/token` (where `huggingface-cli login` writes it).
pub fn token_from_env() -> Option<String> {
    token_with_home(None)
}

/// Like [`token_from_env`], with `home` (e.g. `--hf-home`) in place of
/// `HF_HOME` for the token file.
pub fn token_with_home(home: Option<&Path>) -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Some(t);
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            home.map(Path::to_path_buf)
                .unwrap_or_else(hf_home)
                .join("token")
        });
    let t = fs::read_to_string(path).ok()?;
    let t = t.trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// One repo's folder in the hub cache.
#[derive(Clone, Debug)]
pub struct RepoCache {
    /// `<hub cache>/models--OWNER--NAME`.
    pub root: PathBuf,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl RepoCache {
    /// The folder of `repo` (`OWNER/NAME`) under the hub cache `cache`.
    /// A relative `cache` is taken from the current directory, so the
    /// checkpoint's links into it stay valid from anywhere.
    pub fn new(cache: &Path, repo: &str) -> RepoCache {
        let cache = if cache.is_absolute() {
            cache.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(cache))
                .unwrap_or_else(|_| cache.to_path_buf())
        };
        RepoCache {
            root: cache.join(format!("models--{}", repo.replace('/', "--"))),
        }
    }

    /// Where the blob with this hash lives (whether or not it exists).
    pub fn blob(&self, hash: &str) -> PathBuf {
        self.root.join("blobs").join(hash)
    }

    /// A blob that exists with the expected size.
    pub fn find_blob(&self, hash: &str, size: Option<u64>) -> Option<PathBuf> {
        if !(is_hex(hash, 64) || is_hex(hash, 40)) {
            return None;
        }
        let p = self.blob(hash);
        let m = fs::metadata(&p).ok()?;
        (m.is_file() && size.is_none_or(|s| s == m.len())).then_some(p)
    }

    /// The commit a revision points to: the revision itself when it is a
    /// commit, else the content of `refs/<revision>`.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        if is_hex(revision, 40) {
            return Some(revision.to_string());
        }
        let r = fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let r = r.trim().to_string();
        is_hex(&r, 40).then_some(r)
    }

    /// Records that `revision` points to `commit` (skipped when the revision
    /// is the commit itself, as huggingface_hub does).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), FetchError> {
        if revision == commit || !super::safe_relative(revision) {
            return Ok(());
        }
        fsutil::write_atomic(&self.root.join("refs").join(revision), commit.as_bytes())?;
        Ok(())
    }

    /// The snapshot folder of a commit.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// Stores the finished file `file` as blob `hash` (a hardlink, or a copy
    /// across filesystems) and links `snapshots/<commit>/<rel>` to it.
    pub fn store(
        &self,
        file: &Path,
        hash: &str,
        commit: &str,
        rel: &str,
    ) -> Result<(), FetchError> {
        // Hardlink the file itself, not a link that leads to it.
        let file = file.canonicalize().map_err(|e| FsError::io(file, e))?;
        self.put_blob(&file, hash, false)?;
        self.link_snapshot(hash, commit, rel)
    }

    /// Moves the verified download `file` into the cache as blob `hash` (a
    /// rename, or a copy across filesystems), links the snapshot entry to
    /// it, and points `checkpoint_file` at that entry. Each step is atomic,
    /// and a crash between them leaves a blob the next run finds and checks.
    pub fn adopt(
        &self,
        file: &Path,
        hash: &str,
        commit: &str,
        rel: &str,
        checkpoint_file: &Path,
    ) -> Result<(), FetchError> {
        self.put_blob(file, hash, true)?;
        self.link_snapshot(hash, commit, rel)?;
        self.point(checkpoint_file, commit, rel)
    }

    /// Puts the verified `file` in place as blob `hash`: renamed when
    /// `take` (the file is ours to move), else hardlinked; copied (temp
    /// name, fsync, rename) when the cache is on another filesystem. A blob
    /// already there under that name is replaced unless it is `file`
    /// itself: it was not checked, and may be damaged.
    fn put_blob(&self, file: &Path, hash: &str, take: bool) -> Result<(), FetchError> {
        use std::os::unix::fs::MetadataExt;
        let blob = self.blob(hash);
        if let (Ok(a), Ok(b)) = (fs::metadata(file), fs::metadata(&blob)) {
            if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
                return Ok(());
            }
        }
        super::ensure_parent(&blob)?;
        if take && fs::rename(file, &blob).is_ok() {
            fsutil::sync_dir(blob.parent().expect("blob has a folder"))?;
            return Ok(());
        }
        let tmp = with_suffix(&blob, ".incomplete");
        let _ = fs::remove_file(&tmp);
        if fs::hard_link(file, &tmp).is_err() {
            fs::copy(file, &tmp).map_err(|e| FsError::io(&tmp, e))?;
            fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| FsError::io(&tmp, e))?;
        }
        fsutil::commit_temp(&tmp, &blob)?;
        if take {
            let _ = fs::remove_file(file);
        }
        Ok(())
    }

    /// Links `snapshots/<commit>/<rel>` to blob `hash`, relatively, as
    /// huggingface_hub does.
    fn link_snapshot(&self, hash: &str, commit: &str, rel: &str) -> Result<(), FetchError> {
        let link = self.snapshot(commit).join(rel);
        super::ensure_parent(&link)?;
        let depth = rel.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth + 2 {
            target.push("..");
        }
        target.push("blobs");
        target.push(hash);
        replace_with_link(&link, &target)
    }

    /// Makes `checkpoint_file` a symlink to the snapshot entry of `rel` (an
    /// absolute path), replacing whatever directory entry is there without
    /// writing through it.
    pub fn point(&self, checkpoint_file: &Path, commit: &str, rel: &str) -> Result<(), FetchError> {
        let target = self.snapshot(commit).join(rel);
        super::ensure_parent(checkpoint_file)?;
        replace_with_link(checkpoint_file, &target)
    }

    /// The files of a cached snapshot (relative path, resolved file), for
    /// `--offline`.
    pub fn snapshot_files(&self, commit: &str) -> Result<Vec<(String, PathBuf)>, FetchError> {
        let dir = self.snapshot(commit);
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        super::local::list(&dir)
    }
}

/// Puts a symlink to `target` at `link` (a temp link renamed over it, so
/// the entry is never missing and nothing is written through an old link).
fn replace_with_link(link: &Path, target: &Path) -> Result<(), FetchError> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let tmp = with_suffix(link, ".tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| FsError::io(&tmp, e))?;
    fs::rename(&tmp, link).map_err(|e| FsError::io(link, e))?;
    if let Some(d) = link.parent() {
        fsutil::sync_dir(d)?;
    }
    Ok(())
}

/// Whether `path` (resolved) is a blob of a repo folder in a hub cache:
/// `.../models--OWNER--NAME/blobs/<hash>`, what snapshot entries and the
/// checkpoint links made by rh-fetch lead to.
pub fn is_blob_path(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let blobs = path.parent();
    let repo = blobs.and_then(Path::parent);
    name.is_some_and(|n| is_hex(&n, 64) || is_hex(&n, 40))
        && blobs
            .and_then(Path::file_name)
            .is_some_and(|b| b == "blobs")
        && repo
            .and_then(Path::file_name)
            .is_some_and(|r| r.to_string_lossy().starts_with("models--"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_makes_blob_snapshot_link_and_ref() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("file");
        fs::write(&f, b"hello").unwrap();
        let c = RepoCache::new(&tmp.path().join("hub"), "o/n");
        let commit = "a".repeat(40);
        let hash = "b".repeat(64);
        c.store(&f, &hash, &commit, "sub/x.bin").unwrap();
        c.write_ref("main", &commit).unwrap();
        let link = tmp
            .path()
            .join("hub/models--o--n/snapshots")
            .join(&commit)
            .join("sub/x.bin");
        assert_eq!(
            fs::read_link(&link).unwrap(),
            PathBuf::from("../../../blobs").join(&hash)
        );
        assert_eq!(fs::read(&link).unwrap(), b"hello");
        assert_eq!(c.read_ref("main").unwrap(), commit);
        assert!(c.find_blob(&hash, Some(5)).is_some());
        assert!(c.find_blob(&hash, Some(6)).is_none());
        let files = c.snapshot_files(&commit).unwrap();
        assert_eq!(files[0].0, "sub/x.bin");
    }
}

//! The two libc calls the probe needs (`getrlimit`, `statvfs`), kept in
//! one small module so the unsafe code is easy to audit.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Free space where the work goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The directory measured (the work dir, or its nearest existing parent).
    pub path: PathBuf,
    /// Bytes available to this user.
    pub free: u64,
    /// Size of the filesystem.
    pub total: u64,
}

/// `RLIMIT_MEMLOCK` soft limit in bytes (`None` = unlimited or unknown).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
        Some(r.rlim_cur as u64)
    }
}

/// Free and total bytes of the filesystem holding `dir` (or its nearest
/// existing ancestor, since the work dir may not exist yet).
pub fn disk_free(dir: &Path) -> Option<Disk> {
    let mut p = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_path_buf()
    };
    while !p.exists() {
        match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => p = q.to_path_buf(),
            _ => {
                p = PathBuf::from(".");
                break;
            }
        }
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct for which all-zero bytes are valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some(Disk {
        path: p,
        free: s.f_bavail as u64 * frsize,
        total: s.f_blocks as u64 * frsize,
    })
}

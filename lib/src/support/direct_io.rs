//! Reading expert bytes from a cache's data files, and pinning ranges of a
//! mapping: the only system calls of the expert cache.
//!
//! Reads use `O_DIRECT` where the file system allows it, so the page cache
//! does not keep a second copy of what the expert cache holds (and, under
//! a cgroup memory limit, is not charged for it). `O_DIRECT` needs the
//! file offset, the length and the buffer address aligned to the device's
//! block; [`DIRECT_ALIGN`] (4 KiB) covers every common device. Where
//! `O_DIRECT` is refused (tmpfs, some network file systems) reads go
//! through the page cache and the pages are dropped right after
//! (`posix_fadvise(DONTNEED)`, a hint).
//!
//! Everything here is safe Rust except four libc calls, each sound for the
//! reason given at the call: `posix_fadvise` (a hint on our own descriptor,
//! no memory involved), `madvise(WILLNEED)` and `mlock` on ranges of a
//! live, read-only mapping we hold (neither changes the contents or
//! validity of the memory), and `setpriority` on the calling thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Sets the calling thread's nice value to `nice` (Linux keeps one per
/// thread), best effort: lowering it below 0 needs `CAP_SYS_NICE` or an
/// `RLIMIT_NICE` that allows it, and a refusal leaves the thread as it
/// was. Returns whether it was applied.
///
/// The expert cache's I/O threads sleep in `pread` almost all the time;
/// when one wakes to start or finish a read while the compute threads
/// hold every core, the scheduler may make it wait a slice (0.5-2 ms,
/// measured on a 2-core VM) and the layer waiting for the read with it.
pub fn set_thread_nice(nice: i32) -> bool {
    // Sound: no memory is passed; `who = 0` names the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}

/// Alignment of offsets, lengths and buffers for direct reads.
pub const DIRECT_ALIGN: usize = 4096;

/// A data file opened for positioned reads.
pub struct DataFile {
    path: PathBuf,
    direct: Option<File>,
    buffered: File,
    /// Set once a direct read has been refused: later reads go buffered.
    direct_refused: AtomicBool,
}

impl DataFile {
    /// Opens `path` for reading, with `O_DIRECT` when the file system
    /// accepts it.
    pub fn open(path: &Path) -> io::Result<DataFile> {
        let buffered = File::open(path)?;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(DataFile {
            path: path.to_path_buf(),
            direct,
            buffered,
            direct_refused: AtomicBool::new(false),
        })
    }

    /// The file's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && !self.direct_refused.load(Ordering::Relaxed)
    }

    /// Fills `buf` from `offset`; bytes past the end of the file are left
    /// as they are, but at least `need` bytes must be read. `offset`,
    /// `buf.len()` and `buf`'s address are multiples of [`DIRECT_ALIGN`]
    /// (asserted: the caller lays out its buffers that way).
    pub fn read_at(&self, buf: &mut [u8], offset: u64, need: usize) -> io::Result<()> {
        assert!(
            offset.is_multiple_of(DIRECT_ALIGN as u64)
                && buf.len().is_multiple_of(DIRECT_ALIGN)
                && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN),
            "direct reads are block-aligned"
        );
        if let (Some(f), false) = (&self.direct, self.direct_refused.load(Ordering::Relaxed)) {
            match read_full(f, buf, offset, need) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        read_full(&self.buffered, buf, offset, need)?;
        // SAFETY: a hint on a descriptor we own; no memory is touched.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.buffered),
                offset as libc::off_t,
                buf.len() as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the file ends; fewer than `need` bytes is
/// an error (the file is shorter than the index says).
fn read_full(f: &File, buf: &mut [u8], offset: u64, need: usize) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if done < need {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read {done} of {need} bytes at offset {offset}"),
        ));
    }
    Ok(())
}

/// The page-aligned span covering `offset..offset + len` of `bytes`.
fn page_span(bytes: &[u8], offset: usize, len: usize) -> Option<(*mut libc::c_void, usize)> {
    let end = offset.checked_add(len)?.min(bytes.len());
    if offset >= end {
        return None;
    }
    let page = DIRECT_ALIGN;
    let start = bytes.as_ptr() as usize + offset;
    let aligned = start & !(page - 1);
    let stop = bytes.as_ptr() as usize + end;
    Some((aligned as *mut libc::c_void, stop - aligned))
}

/// Asks the kernel to read `len` bytes at `offset` of a mapping ahead.
pub fn advise_willneed(bytes: &[u8], offset: usize, len: usize) {
    if let Some((p, n)) = page_span(bytes, offset, len) {
        // SAFETY: `p..p+n` lies within the live mapping `bytes` (rounded
        // down to its page, which the mapping also covers since mappings
        // start on a page); WILLNEED only schedules reads.
        unsafe { libc::madvise(p, n, libc::MADV_WILLNEED) };
    }
}

/// Tells the kernel that `len` bytes at `offset` of a mapping are read at
/// random: a fault reads its own page, without read-around.
pub fn advise_random(bytes: &[u8], offset: usize, len: usize) {
    if let Some((p, n)) = page_span(bytes, offset, len) {
        // SAFETY: as in `advise_willneed`; RANDOM only changes how much a
        // fault reads ahead, never what the pages hold.
        unsafe { libc::madvise(p, n, libc::MADV_RANDOM) };
    }
}

/// Pins `len` bytes at `offset` of a mapping in RAM.
pub fn lock(bytes: &[u8], offset: usize, len: usize) -> io::Result<()> {
    if let Some((p, n)) = page_span(bytes, offset, len) {
        // SAFETY: as in `advise_willneed`; mlock faults the pages in and
        // keeps them resident, without changing what they hold. The pages
        // are unlocked when the mapping is unmapped.
        if unsafe { libc::mlock(p, n) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A buffer whose slice `[base..]` starts on a [`DIRECT_ALIGN`] boundary.
pub fn aligned_base(buf: &[u8]) -> usize {
    (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN
}

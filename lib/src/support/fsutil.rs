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
    /// Another process holds the lock on a directory this stage needs.
    #[error("{dir}: in use by {holder}; wait for it to finish or stop it, then run again")]
    Locked {
        /// The locked directory.
        dir: PathBuf,
        /// Who holds it (`rh-repack (pid 1234)`, or a reader).
        holder: String,
    },
    /// A file this stage would replace was not written by it.
    #[error("{path}: {what}; refusing to replace it (move it away, or pass --force to overwrite)")]
    NotOurs {
        /// The file in the way.
        path: PathBuf,
        /// Why it is not ours.
        what: String,
    },
    /// A path that must be a regular file is something else (a FIFO, a
    /// device, a directory), which reading could hang on or misread.
    #[error("{path}: {kind}, expected a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
}

impl crate::cli::Classify for FsError {}

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

/// Opens `path` for reading only if it is a regular file (following
/// symlinks). The open itself does not block on a FIFO (`O_NONBLOCK`, then
/// `fstat` on the open descriptor, so nothing can be swapped in between),
/// and a FIFO, socket, device or directory is refused naming the path.
pub fn open_regular(path: &Path) -> Result<File, FsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| FsError::io(path, e))?;
    let m = f.metadata().map_err(|e| FsError::io(path, e))?;
    check_regular(path, &m)?;
    // Regular files ignore O_NONBLOCK; clear it anyway so later reads are
    // ordinary blocking reads whatever the filesystem.
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Refuses metadata that is not a regular file.
pub fn check_regular(path: &Path, m: &fs::Metadata) -> Result<(), FsError> {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(FsError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

/// Reads a whole regular file ([`open_regular`]); `NotFound` keeps its kind
/// so callers can tell a missing file apart.
pub fn read_regular(path: &Path) -> Result<Vec<u8>, FsError> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| FsError::io(path, e))?;
    Ok(v)
}

/// Whether an error is "file not found".
pub fn is_not_found(e: &FsError) -> bool {
    matches!(e, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
}

/// The lock file every stage locks in a directory it reads or writes.
/// Hidden and prefixed `.roundhouse-`, which listings and manifests skip.
pub const LOCK_FILE: &str = ".roundhouse-lock";

/// An advisory `flock` on a directory's [`LOCK_FILE`]: exclusive for the
/// stage writing the directory, shared for readers. The kernel drops it
/// when the process dies (even by `kill -9`), so a lock is never stale.
/// Released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: Option<File>,
}

fn flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn open_lock_file(dir: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    if write {
        o.write(true).create(true).truncate(false).mode(0o644);
    }
    o.open(dir.join(LOCK_FILE))
}

/// Who holds a lock we could not take: the writer named in the file when a
/// shared lock is refused too, else readers. A writer writes its pid just
/// after taking the lock, so an empty file or the pid of a process that is
/// gone (a writer killed earlier) is read again for a moment.
fn holder(dir: &Path) -> String {
    let Ok(f) = open_lock_file(dir, false) else {
        return "another process".into();
    };
    if flock(&f, libc::LOCK_SH).unwrap_or(false) {
        return "a reader (rh-serve, rh-bench or rh-verify check)".into();
    }
    let mut last = String::from("another writer");
    for _ in 0..50 {
        let mut text = String::new();
        {
            use std::io::{Read, Seek};
            let _ = (&f).seek(io::SeekFrom::Start(0));
            let _ = (&f).take(64).read_to_string(&mut text);
        }
        let mut it = text.split_whitespace();
        if let (Some(pid), Some(who)) = (it.next(), it.next()) {
            last = format!("{who} (pid {pid})");
            // SAFETY: kill with signal 0 only checks that the pid exists.
            let alive = pid
                .parse::<libc::pid_t>()
                .is_ok_and(|p| p > 0 && unsafe { libc::kill(p, 0) } == 0);
            if alive {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    last
}

impl DirLock {
    /// Takes the exclusive lock of `dir` (created if missing) for `who`
    /// (the binary's name), or fails at once naming the holder. The pid
    /// and `who` are written into the lock file for that message.
    pub fn exclusive(dir: &Path, who: &str) -> Result<DirLock, FsError> {
        fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let f = open_lock_file(dir, true).map_err(|e| FsError::io(&lock_path, e))?;
        if !flock(&f, libc::LOCK_EX).map_err(|e| FsError::io(&lock_path, e))? {
            return Err(FsError::Locked {
                dir: dir.to_path_buf(),
                holder: holder(dir),
            });
        }
        let note = format!("{} {who}\n", std::process::id());
        let _ = f.set_len(0);
        let _ = std::os::unix::fs::FileExt::write_all_at(&f, note.as_bytes(), 0);
        Ok(DirLock { _file: Some(f) })
    }

    /// Takes a shared lock of `dir` for a reader, or fails at once naming
    /// the writer holding it. Where there is no lock file, no writer of
    /// ours has used the directory: no lock is taken.
    pub fn shared(dir: &Path) -> Result<DirLock, FsError> {
        let lock_path = dir.join(LOCK_FILE);
        // Never created by a reader: a directory no writer of ours has
        // locked (a checkpoint in the HF cache, a read-only cache) is left
        // as it is.
        let f = match open_lock_file(dir, false) {
            Ok(f) => f,
            Err(_) => return Ok(DirLock { _file: None }),
        };
        if !flock(&f, libc::LOCK_SH).map_err(|e| FsError::io(&lock_path, e))? {
            return Err(FsError::Locked {
                dir: dir.to_path_buf(),
                holder: holder(dir),
            });
        }
        Ok(DirLock { _file: Some(f) })
    }
}

/// Runs `f` over `items` on up to `n` threads. The first error sets `stop`
/// (workers check it before each item, and long jobs may poll it) and is
/// returned; an error for which `secondary` is true (a worker that only
/// stopped because another failed) is replaced by a real one.
pub fn parallel<T: Send, E: Send>(
    items: Vec<T>,
    n: usize,
    stop: &std::sync::atomic::AtomicBool,
    secondary: impl Fn(&E) -> bool + Sync,
    f: impl Fn(T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    let queue = Mutex::new(items.into_iter());
    let first_err: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..n.max(1) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Some(item) = queue.lock().expect("queue lock").next() else {
                    return;
                };
                if let Err(e) = f(item) {
                    stop.store(true, Ordering::Relaxed);
                    let mut slot = first_err.lock().expect("error lock");
                    let replace = match &*slot {
                        None => true,
                        Some(old) => secondary(old) && !secondary(&e),
                    };
                    if replace {
                        *slot = Some(e);
                    }
                    return;
                }
            });
        }
    });
    match first_err.into_inner().expect("error lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A writer that hashes (blake3) what passes through and advances a
/// progress bar.
pub struct HashingWriter<'a, W: Write> {
    /// The inner writer.
    pub inner: W,
    /// blake3 of everything written.
    pub blake3: blake3::Hasher,
    /// Bytes written.
    pub written: u64,
    bar: &'a indicatif::ProgressBar,
}

impl<'a, W: Write> HashingWriter<'a, W> {
    /// Wraps `inner`, advancing `bar` by the bytes written.
    pub fn new(inner: W, bar: &'a indicatif::ProgressBar) -> Self {
        HashingWriter {
            inner,
            blake3: blake3::Hasher::new(),
            written: 0,
            bar,
        }
    }
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.blake3.update(&buf[..n]);
        self.written += n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes per write of a [`FolioWriter`]: one 2 MiB huge page.
pub const FOLIO_BYTES: usize = 2 << 20;

/// A buffered writer for files that are later mapped and streamed whole
/// (the cache's data files): it writes in whole 2 MiB blocks at 2
/// MiB-aligned file offsets.
///
/// Why: Linux (6.x, ext4 and XFS with large folios) sizes the page cache's
/// folios by the writes that create them, and only a 2 MiB folio at an
/// aligned offset is mapped by one 2 MiB page table entry. A file written
/// through a 64 KiB buffer stays on 4 KiB folios for as long as it stays
/// cached, so right after `rh-repack` every weight read of a decode paid a
/// TLB miss per 4 KiB (measured here: a fresh cache 19% on 2 MiB pages,
/// the same bytes written in aligned 2 MiB blocks 100%). Elsewhere it is
/// an ordinary buffered writer.
///
/// [`FolioWriter::flush`] writes a partial block (a durable point for the
/// caller's fsync); writing then resumes in blocks that end on the next
/// boundary.
pub struct FolioWriter<W: Write = File> {
    file: W,
    buf: Vec<u8>,
    /// File offset of `buf[0]`: where the file's cursor stands.
    at: u64,
}

impl<W: Write> FolioWriter<W> {
    /// Wraps `file`, whose cursor stands at offset `at`.
    pub fn new(file: W, at: u64) -> Self {
        FolioWriter {
            file,
            buf: Vec::with_capacity(FOLIO_BYTES),
            at,
        }
    }

    /// The offset the next byte goes to.
    pub fn position(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    /// The file (for a second handle that fsyncs).
    pub fn get_ref(&self) -> &W {
        &self.file
    }

    /// Writes what is buffered and returns the file.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.write_buffer()?;
        Ok(self.file)
    }

    /// Bytes from `at` to the end of its 2 MiB block.
    fn block_len(&self) -> usize {
        let block = FOLIO_BYTES as u64;
        ((self.at / block + 1) * block - self.at) as usize
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes all of `bytes`.
    fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let aligned = self.at % FOLIO_BYTES as u64 == 0;
            if self.buf.is_empty() && aligned && bytes.len() >= FOLIO_BYTES {
                // Whole blocks go straight from the caller's slice.
                let n = bytes.len() / FOLIO_BYTES * FOLIO_BYTES;
                self.file.write_all(&bytes[..n])?;
                self.at += n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let block = self.block_len();
            let n = (block - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == block {
                self.write_buffer()?;
            }
        }
        Ok(())
    }

    /// Copies up to `len` bytes of `src` (from its cursor) into the file,
    /// reading straight into the block buffer; returns the bytes copied
    /// (fewer only when `src` ends first).
    pub fn copy_from(&mut self, src: &mut impl io::Read, len: u64) -> io::Result<u64> {
        let mut left = len;
        while left > 0 {
            let block = self.block_len();
            let have = self.buf.len();
            let want = ((block - have) as u64).min(left) as usize;
            self.buf.resize(have + want, 0);
            let n = loop {
                match src.read(&mut self.buf[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(e);
                }
            };
            self.buf.truncate(have + n);
            if n == 0 {
                break;
            }
            left -= n as u64;
            if self.buf.len() == block {
                self.write_buffer()?;
            }
        }
        Ok(len - left)
    }
}

impl<W: Write> Write for FolioWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.put(bytes)?;
        Ok(bytes.len())
    }
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes)
    }
    /// Writes the partial block (the caller fsyncs after).
    fn flush(&mut self) -> io::Result<()> {
        self.write_buffer()
    }
}

/// A [`Write`] that writes a file by position (`pwrite`), from `at` on:
/// for a [`FolioWriter`] over a file other writers share by offset (the
/// published-cache download's ranges).
pub struct WriteAt<'a> {
    file: &'a File,
    at: u64,
}

impl<'a> WriteAt<'a> {
    /// Writes `file` from offset `at`.
    pub fn new(file: &'a File, at: u64) -> Self {
        WriteAt { file, at }
    }
}

impl Write for WriteAt<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.write_at(bytes, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Free bytes on the filesystem holding `dir` (None where unknown).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write the inner writer sees: (offset, length).
    #[derive(Default)]
    struct Writes {
        data: Vec<u8>,
        calls: Vec<(u64, usize)>,
    }
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.calls.push((self.data.len() as u64, b.len()));
            self.data.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn folio_writer_writes_whole_aligned_blocks_between_flushes() {
        const B: usize = FOLIO_BYTES;
        let start = 4096u64;
        let mut w = FolioWriter::new(
            Writes {
                data: vec![7u8; start as usize],
                calls: Vec::new(),
            },
            start,
        );
        let mut expect = vec![7u8; start as usize];
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        let mut flushes = Vec::new();
        for step in 0..60 {
            let len = match step % 5 {
                0 => next(64),
                1 => next(3 * B),
                2 => B + next(B),
                _ => next(200_000),
            };
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + step) as u8).collect();
            if step % 4 == 3 {
                let got = w.copy_from(&mut &bytes[..], len as u64 + 10).unwrap();
                assert_eq!(got, len as u64, "copy stops where the source ends");
            } else {
                w.write_all(&bytes).unwrap();
            }
            expect.extend_from_slice(&bytes);
            assert_eq!(w.position(), expect.len() as u64);
            if step % 13 == 12 {
                w.flush().unwrap();
                flushes.push(w.position());
            }
        }
        let end = w.position();
        let inner = w.into_inner().unwrap();
        assert_eq!(inner.data, expect, "bytes in order");
        for &(off, len) in &inner.calls {
            let stop = off + len as u64;
            let ends_on_boundary = stop % B as u64 == 0;
            let is_flush = flushes.contains(&stop) || stop == end;
            assert!(
                ends_on_boundary || is_flush,
                "write [{off}, {stop}) ends off a 2 MiB boundary without a flush"
            );
            if off % B as u64 == 0 && !is_flush {
                assert_eq!(len % B, 0, "an aligned write at {off} of {len} bytes");
            }
        }
        assert!(inner.calls.len() > 10);
    }

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

    #[test]
    fn locks_exclude_writers_and_name_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let w = DirLock::exclusive(dir.path(), "rh-test").unwrap();
        let e = DirLock::exclusive(dir.path(), "rh-other")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("rh-test (pid {})", std::process::id())),
            "{e}"
        );
        assert!(DirLock::shared(dir.path()).is_err());
        drop(w);
        let r1 = DirLock::shared(dir.path()).unwrap();
        let _r2 = DirLock::shared(dir.path()).unwrap();
        let e = DirLock::exclusive(dir.path(), "rh-other")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a reader"), "{e}");
        drop(r1);
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_regular(&p).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }
}

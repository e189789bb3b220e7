//! The one place files are memory-mapped.
//!
//! Soundness: a file mapping is only sound while nobody truncates or rewrites
//! the file. Roundhouse never modifies a file in place (every writer goes
//! through [`crate::fsutil`]: temp file + rename, so a mapped inode is never
//! changed), its writers hold an exclusive [`crate::fsutil::DirLock`] that
//! readers' shared locks exclude, it maps read-only, and callers check every
//! length recorded in a header or index against the mapped length before
//! slicing. Another program may still truncate a mapped file; touching a
//! page past the new end raises SIGBUS. [`sigbus`] turns that into one line
//! naming the file and exit code 3 instead of a "Bus error" crash.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::fsutil::FsError;

/// A read-only mapping of a whole file. Empty files give an empty mapping
/// (mmap of length 0 is an error on Linux).
#[derive(Debug)]
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
    slot: Option<usize>,
}

impl MappedFile {
    /// Maps `path` read-only (a regular file only: a FIFO or device is
    /// refused, never waited on).
    pub fn open(path: &Path) -> Result<Arc<MappedFile>, FsError> {
        let f: File = crate::fsutil::open_regular(path)?;
        let len = f.metadata().map_err(|e| FsError::io(path, e))?.len();
        if len == 0 {
            return Ok(Arc::new(MappedFile {
                map: None,
                slot: None,
            }));
        }
        // SAFETY: read-only map of a file that roundhouse never modifies in
        // place (see module docs); lengths are validated before use.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| FsError::io(path, e))?;
        let slot = sigbus::register(map.as_ptr() as usize, map.len(), path);
        Ok(Arc::new(MappedFile {
            map: Some(map),
            slot,
        }))
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

    /// Lets go of `len` bytes at `offset` that nothing will read through
    /// this mapping again (they were copied elsewhere): unlocks the whole
    /// pages inside the range and drops them from this process's mapping,
    /// so they count as reclaimable page cache, not as locked resident
    /// memory. Pages shared with a neighbouring range are left alone.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let Some(m) = &self.map {
            const PAGE: usize = 4096;
            let base = m.as_ptr() as usize;
            let end = offset.saturating_add(len).min(m.len());
            let start = (base + offset.min(end)).next_multiple_of(PAGE);
            let stop = (base + end) / PAGE * PAGE;
            if stop > start {
                let (p, n) = (start as *mut libc::c_void, stop - start);
                // SAFETY: `start..stop` lies inside the live mapping `m`
                // (clamped to its length above). munlock only unpins;
                // MADV_DONTNEED on a read-only file mapping only unmaps the
                // pages: a later read faults them back from the file with
                // the same contents, so no `&[u8]` into the mapping ever
                // sees different bytes.
                unsafe {
                    libc::munlock(p, n);
                    libc::madvise(p, n, libc::MADV_DONTNEED);
                }
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    /// The underlying map (for madvise/mlock by the strategy).
    pub fn raw(&self) -> Option<&memmap2::Mmap> {
        self.map.as_ref()
    }

    /// Asks the kernel to map this file on 2 MiB pages (`huge`) or never
    /// on them (4 KiB pages, for measurements). A file whose page cache
    /// holds 2 MiB folios (ext4 and XFS since Linux 6.16 read files into
    /// them) is then mapped with one page-table entry per 2 MiB, and a
    /// fault on a range not yet cached reads 2 MiB folios so it can be.
    /// Why: the routed experts are read from this mapping, and under a
    /// hypervisor each 4 KiB page costs a nested page walk (the copies of
    /// the per-token weights are on huge pages for the same reason; see
    /// `model::reads_every_token`).
    pub fn advise_page_size(&self, huge: bool) {
        #[cfg(target_os = "linux")]
        if let Some(m) = &self.map {
            let advice = if huge {
                memmap2::Advice::HugePage
            } else {
                memmap2::Advice::NoHugePage
            };
            // A refusal (THP compiled out) leaves 4 KiB pages: nothing to report.
            let _ = m.advise(advice);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = huge;
    }
}

/// How much of some mappings is in RAM, and how much of that is mapped on
/// 2 MiB pages (`/proc/self/smaps`: `Rss`, `FilePmdMapped`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappedPages {
    /// Bytes of the mappings resident in this process.
    pub resident: u64,
    /// Of those, bytes mapped by 2 MiB page-table entries.
    pub huge: u64,
}

/// [`MappedPages`] over `maps`; `None` where `/proc/self/smaps` cannot be
/// read (not Linux) or no mapping is live.
pub fn mapped_pages(maps: &[Arc<MappedFile>]) -> Option<MappedPages> {
    let ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter_map(|m| m.map.as_ref())
        .map(|m| (m.as_ptr() as u64, m.as_ptr() as u64 + m.len() as u64))
        .collect();
    if ranges.is_empty() {
        return None;
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(pages_in(&smaps, &ranges))
}

/// Sums `Rss` and `FilePmdMapped` of the `smaps` entries overlapping any of
/// `ranges` (start, end).
fn pages_in(smaps: &str, ranges: &[(u64, u64)]) -> MappedPages {
    let [resident, huge] = smaps_sums(smaps, ranges, ["Rss:", "FilePmdMapped:"]);
    MappedPages { resident, huge }
}

/// Bytes of each of `fields` (e.g. `"Rss:"`, `"AnonHugePages:"`, in KiB in
/// the file) summed over the `/proc/self/smaps` entries (`smaps`, its text)
/// whose address range overlaps any of `ranges` (start, end).
pub fn smaps_sums<const N: usize>(
    smaps: &str,
    ranges: &[(u64, u64)],
    fields: [&str; N],
) -> [u64; N] {
    let mut out = [0u64; N];
    let mut inside = false;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = ranges.iter().any(|&(lo, hi)| a < hi && b > lo);
                continue;
            }
        }
        if let Some(i) = fields.iter().position(|f| *f == first).filter(|_| inside) {
            out[i] += it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) << 10;
        }
    }
    out
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn pages_in_sums_only_the_overlapping_mappings() {
        let smaps = "\
7f0000000000-7f0000400000 r--s 00000000 fd:00 12 /cache/data-00001.rhd
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
Rss:                   4 kB
FilePmdMapped:         0 kB
7f1000000000-7f1000200000 r--s 00000000 fd:00 13 /cache/data-00002.rhd
Rss:                1024 kB
FilePmdMapped:         0 kB
";
        let ranges = [
            (0x7f00_0000_0000, 0x7f00_0040_0000),
            (0x7f10_0000_0000, 0x7f10_0020_0000),
        ];
        let p = pages_in(smaps, &ranges);
        assert_eq!(p.resident, (4096 + 1024) << 10);
        assert_eq!(p.huge, 2048 << 10);
        assert_eq!(pages_in(smaps, &[(0x10, 0x20)]), MappedPages::default());
    }

    #[test]
    fn a_mapped_file_reports_its_resident_pages() {
        let dir = std::env::temp_dir().join(format!("rh-mapped-pages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let m = MappedFile::open(&path).unwrap();
        m.advise_page_size(true);
        let sum: u64 = m.bytes().iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(sum, 7 * 256);
        if let Some(p) = mapped_pages(std::slice::from_ref(&m)) {
            assert!(p.resident >= 4096 && p.resident <= 1 << 20, "{p:?}");
            assert!(p.huge <= p.resident);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Unregistered before the fields drop, i.e. before the unmap.
        if let Some(s) = self.slot {
            sigbus::unregister(s);
        }
    }
}

/// SIGBUS on a mapped file: a table of mapped ranges and a handler that
/// names the file whose range holds the faulting address.
///
/// Why the handler is sound: it only reads atomics of a static table,
/// calls `write(2)` on bytes that are never freed (each name is leaked when
/// registered), and `_exit(2)` or `sigaction(2)`, all async-signal-safe.
/// A slot's name and length are stored before its start address is
/// published (release/acquire), and a slot is cleared before its mapping is
/// unmapped, so the handler never reads a half-written entry or reports a
/// range that is no longer ours. A fault outside every range is not ours:
/// the handler reinstates the previous disposition and returns, the access
/// faults again and is handled exactly as it would have been without us.
pub mod sigbus {
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    const SLOTS: usize = 4096;

    struct Slot {
        start: AtomicUsize,
        len: AtomicUsize,
        msg: AtomicPtr<u8>,
        msg_len: AtomicUsize,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY: Slot = Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        msg: AtomicPtr::new(std::ptr::null_mut()),
        msg_len: AtomicUsize::new(0),
    };
    static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
    /// Serializes writers of the table (the handler only reads).
    static CLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

    struct Prev(libc::sigaction);
    // SAFETY: a plain C struct of integers and function pointers, written
    // once before the handler is installed and only read afterwards.
    unsafe impl Sync for Prev {}
    unsafe impl Send for Prev {}
    static PREV: OnceLock<Prev> = OnceLock::new();

    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        for s in TABLE.iter() {
            let start = s.start.load(Ordering::Acquire);
            if start != 0 && addr >= start && addr - start < s.len.load(Ordering::Acquire) {
                let p = s.msg.load(Ordering::Acquire);
                let n = s.msg_len.load(Ordering::Acquire);
                // SAFETY: `p..p+n` is a leaked, never-freed allocation;
                // write and _exit are async-signal-safe.
                unsafe {
                    libc::write(2, p as *const libc::c_void, n);
                    libc::_exit(3);
                }
            }
        }
        if let Some(prev) = PREV.get() {
            // SAFETY: reinstating the disposition saved at install time.
            unsafe { libc::sigaction(libc::SIGBUS, &prev.0, std::ptr::null_mut()) };
        }
    }

    fn install() {
        PREV.get_or_init(|| {
            // SAFETY: sigaction with zeroed, then filled, structs we own.
            unsafe {
                let mut prev: libc::sigaction = std::mem::zeroed();
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigbus as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(libc::SIGBUS, &act, &mut prev);
                Prev(prev)
            }
        });
    }

    /// Records a mapped range; returns its slot (None when the table is
    /// full: that mapping then faults as it would without us).
    pub(super) fn register(start: usize, len: usize, path: &Path) -> Option<usize> {
        install();
        let msg = format!(
            "error: {}: the file was truncated or changed while it was mapped (by another program); stopping\n",
            path.display()
        );
        let _g = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
        let i = TABLE
            .iter()
            .position(|s| s.start.load(Ordering::Acquire) == 0)?;
        let leaked: &'static mut [u8] = Box::leak(msg.into_bytes().into_boxed_slice());
        let s = &TABLE[i];
        s.msg_len.store(leaked.len(), Ordering::Release);
        s.msg.store(leaked.as_mut_ptr(), Ordering::Release);
        s.len.store(len, Ordering::Release);
        s.start.store(start, Ordering::Release);
        Some(i)
    }

    /// Clears a slot (before its range is unmapped).
    pub(super) fn unregister(i: usize) {
        let _g = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
        TABLE[i].start.store(0, Ordering::Release);
    }
}

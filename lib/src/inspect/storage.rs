//! The read speed of the disk holding the model: sequential (loading a cold
//! cache) and random reads of expert size (paging experts under a RAM
//! budget). Measured on the model's own files with `O_DIRECT`, so the page
//! cache neither helps nor keeps what was read; where `O_DIRECT` is refused
//! the figure is marked as possibly served from the page cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::experts::io::{aligned_base, DataFile, DIRECT_ALIGN};

/// Measured read speeds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StorageSpeed {
    /// Sequential reads of 8 MiB, one at a time, GB/s.
    pub sequential_gbs: f64,
    /// Random reads of `random_block` bytes, one at a time, GB/s.
    pub random_qd1_gbs: f64,
    /// Random reads of `random_block` bytes, `queue_depth` at a time (as
    /// the expert cache issues them), GB/s.
    pub random_gbs: f64,
    /// Bytes per random read.
    pub random_block: u64,
    /// Reads in flight for `random_gbs`.
    pub queue_depth: usize,
    /// Whether the reads bypassed the page cache.
    pub direct: bool,
    /// Bytes of the files read from.
    pub file_bytes: u64,
}

/// The largest regular files of `dir` (data files of a cache, shards of a
/// checkpoint), biggest first.
pub fn model_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = std::fs::metadata(e.path()).ok()?;
            (m.is_file() && m.len() >= 64 << 20).then(|| (e.path(), m.len()))
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1));
    v
}

/// A SplitMix64 step (offsets need not be cryptographic).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Measures the files of `dir`: about `seconds` in all, split over the
/// three tests. `None` when the directory holds no file of 64 MiB or more.
pub fn measure(
    dir: &Path,
    random_block: usize,
    queue_depth: usize,
    seconds: f64,
) -> Option<StorageSpeed> {
    let files: Vec<(DataFile, u64)> = model_files(dir)
        .into_iter()
        .filter_map(|(p, n)| Some((DataFile::open(&p).ok()?, n)))
        .collect();
    if files.is_empty() {
        return None;
    }
    let block = random_block.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
    let budget = Duration::from_secs_f64(seconds.max(0.3) / 3.0);
    let seq = sequential(&files[0], budget);
    let qd1 = random(&files, block, 1, budget);
    let qd = random(&files, block, queue_depth.max(1), budget);
    Some(StorageSpeed {
        sequential_gbs: seq,
        random_qd1_gbs: qd1,
        random_gbs: qd,
        random_block: block as u64,
        queue_depth: queue_depth.max(1),
        direct: files.iter().all(|(f, _)| f.is_direct()),
        file_bytes: files.iter().map(|(_, n)| n).sum(),
    })
}

/// Sequential 8 MiB reads from a random starting point of the file.
fn sequential((file, len): &(DataFile, u64), budget: Duration) -> f64 {
    let chunk = 8usize << 20;
    let mut buf = vec![0u8; chunk + DIRECT_ALIGN];
    let base = aligned_base(&buf);
    let dst = &mut buf[base..base + chunk];
    let blocks = (len / chunk as u64).max(1);
    let mut state = Instant::now().elapsed().as_nanos() as u64 ^ 0x5EED;
    let mut at = next(&mut state) % blocks;
    let (t0, mut bytes) = (Instant::now(), 0u64);
    while t0.elapsed() < budget {
        if file.read_at(dst, at * chunk as u64, 0).is_err() {
            break;
        }
        bytes += chunk as u64;
        at = (at + 1) % blocks;
    }
    bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9
}

/// `depth` threads each reading `block` bytes at random aligned offsets.
fn random(files: &[(DataFile, u64)], block: usize, depth: usize, budget: Duration) -> f64 {
    let bytes = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..depth {
            let bytes = &bytes;
            s.spawn(move || {
                let mut buf = vec![0u8; block + DIRECT_ALIGN];
                let base = aligned_base(&buf);
                let dst = &mut buf[base..base + block];
                let mut state =
                    (t as u64 + 1) * 0x1234_5678_9ABC_DEF1 ^ t0.elapsed().as_nanos() as u64;
                while t0.elapsed() < budget {
                    let (f, len) = &files[(next(&mut state) % files.len() as u64) as usize];
                    let slots = (len / DIRECT_ALIGN as u64)
                        .saturating_sub(block as u64 / DIRECT_ALIGN as u64)
                        .max(1);
                    let off = next(&mut state) % slots * DIRECT_ALIGN as u64;
                    if f.read_at(dst, off, 0).is_err() {
                        break;
                    }
                    bytes.fetch_add(block as u64, Ordering::Relaxed);
                }
            });
        }
    });
    bytes.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9
}

/// Seconds to read `bytes` sequentially at `speed`.
pub fn cold_load_s(bytes: u64, speed: &StorageSpeed) -> Option<f64> {
    (speed.sequential_gbs > 0.0).then(|| bytes as f64 / (speed.sequential_gbs * 1e9))
}

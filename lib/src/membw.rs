//! A STREAM-like memory read-bandwidth probe: sum a buffer much larger than
//! the caches, single-threaded and on every thread, and report GB/s. Kernel
//! benchmarks quote their effective bandwidth against this figure, and
//! inspect uses it to predict decode speed.

use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Measured read bandwidth.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Bandwidth {
    /// GB/s (1e9 bytes) reading with one thread.
    pub single_thread_gbs: f64,
    /// GB/s reading with all rayon threads.
    pub all_threads_gbs: f64,
    /// Threads used for the second figure.
    pub threads: usize,
    /// Buffer size in bytes.
    pub buffer_bytes: usize,
}

fn sum_words(words: &[u64]) -> u64 {
    // Four independent accumulators so the loop is bound by loads, not by
    // the add latency chain; the compiler vectorises this.
    let mut acc = [0u64; 4];
    for c in words.chunks_exact(4) {
        acc[0] = acc[0].wrapping_add(c[0]);
        acc[1] = acc[1].wrapping_add(c[1]);
        acc[2] = acc[2].wrapping_add(c[2]);
        acc[3] = acc[3].wrapping_add(c[3]);
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}

fn best_rate(words: &[u64], budget: Duration, parallel: bool) -> f64 {
    let bytes = std::mem::size_of_val(words) as f64;
    let start = Instant::now();
    let mut best = 0f64;
    let mut sink = 0u64;
    loop {
        let t = Instant::now();
        let s = if parallel {
            words
                .par_chunks(1 << 16)
                .map(sum_words)
                .reduce(|| 0, u64::wrapping_add)
        } else {
            sum_words(words)
        };
        sink = sink.wrapping_add(s);
        let dt = t.elapsed().as_secs_f64();
        best = best.max(bytes / dt / 1e9);
        if start.elapsed() >= budget {
            break;
        }
    }
    std::hint::black_box(sink);
    best
}

/// Measures read bandwidth over a `buffer_bytes` buffer, spending about
/// `seconds` in total. Use a buffer several times the last-level cache
/// (256 MiB or more) for a DRAM figure.
pub fn measure(buffer_bytes: usize, seconds: f64) -> Bandwidth {
    let n = (buffer_bytes / 8).max(4096);
    // Touch every page (and give the pages non-zero content, so no
    // zero-page sharing flatters the figure).
    let words: Vec<u64> = (0..n as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let half = Duration::from_secs_f64(seconds.max(0.02) / 2.0);
    let single = best_rate(&words, half, false);
    let all = best_rate(&words, half, true);
    Bandwidth {
        single_thread_gbs: single,
        all_threads_gbs: all,
        threads: rayon::current_num_threads(),
        buffer_bytes: n * 8,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_probe_reports_positive_rates() {
        let b = super::measure(1 << 20, 0.05);
        assert!(b.single_thread_gbs > 0.0 && b.all_threads_gbs > 0.0);
        assert_eq!(b.buffer_bytes, 1 << 20);
    }
}

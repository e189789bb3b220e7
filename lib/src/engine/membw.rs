//! The memory read-bandwidth probe: what this machine can actually stream
//! from DRAM, which `rh-inspect` predicts decode speed from and
//! `rh-bench kernels` / `rh-bench` quote kernels and decode against.
//!
//! A plain single-stream sum under-reads the bus (one core's hardware
//! prefetcher keeps too few lines in flight), so a kernel that prefetches
//! would appear to beat it. The probe therefore tries several read loops
//! ([`Method`]) -- one or four interleaved streams per thread, with no
//! software prefetch, prefetching into L1 ahead of the loads, or with the
//! non-temporal hint -- each on one thread and on every thread (the threads
//! taking contiguous parts of a buffer they touched first), and
//! reports the best pass of the best loop. No kernel reading weights once
//! should beat that figure by more than noise. The buffer asks for
//! transparent huge pages (where the kernel offers them), as lm_head's copy
//! does: on 4 KiB pages the page walks, not the memory, set the rate.
//!
//! The SIMD loops (AVX2) live in the small `x86` module below; elsewhere,
//! or without AVX2, a portable u64 sum runs.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Measured read bandwidth.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Bandwidth {
    /// GB/s (1e9 bytes) reading with one thread (best loop).
    pub single_thread_gbs: f64,
    /// GB/s reading with all rayon threads (best loop): the attainable
    /// read bandwidth "% of bandwidth" is computed from.
    pub all_threads_gbs: f64,
    /// Threads used for the second figure.
    pub threads: usize,
    /// Buffer size in bytes.
    pub buffer_bytes: usize,
}

/// A read loop the probe tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Portable: a u64 sum (what the compiler vectorises), one stream.
    Plain,
    /// 256-bit loads, one stream per thread, no software prefetch.
    Simd,
    /// 256-bit loads with `prefetcht0` [`PREFETCH_AHEAD`] bytes ahead.
    SimdPrefetch,
    /// 256-bit loads with `prefetchnta` [`PREFETCH_AHEAD`] bytes ahead.
    SimdPrefetchNta,
    /// Four interleaved streams per thread (four quarters of its part),
    /// `prefetcht0` ahead of each: how a matvec reads several rows.
    SimdFourStreams,
}

impl Method {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Plain => "plain",
            Method::Simd => "simd",
            Method::SimdPrefetch => "simd+prefetch",
            Method::SimdPrefetchNta => "simd+prefetchnta",
            Method::SimdFourStreams => "simd-4-streams+prefetch",
        }
    }

    /// The loops this CPU runs.
    pub fn available() -> Vec<Method> {
        let mut v = vec![Method::Plain];
        if x86::have_avx2() {
            v.extend([
                Method::Simd,
                Method::SimdPrefetch,
                Method::SimdPrefetchNta,
                Method::SimdFourStreams,
            ]);
        }
        v
    }
}

/// Contiguous parts of the buffer per thread in a parallel pass.
const PARTS_PER_THREAD: usize = 4;

/// Bytes ahead of the loads that the prefetching loops hint.
pub const PREFETCH_AHEAD: usize = 2048;

/// One method's best rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MethodRate {
    /// The loop.
    pub method: Method,
    /// Best GB/s on one thread.
    pub single_thread_gbs: f64,
    /// Best GB/s on all threads.
    pub all_threads_gbs: f64,
}

/// Sums `words` with `method` (a value to keep the reads alive).
fn read_words(words: &[u64], method: Method) -> u64 {
    match method {
        Method::Plain => sum_words(words),
        m => x86::read(words, m).unwrap_or_else(|| sum_words(words)),
    }
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
    let tail = words.chunks_exact(4).remainder();
    acc.iter().chain(tail).fold(0, |a, b| a.wrapping_add(*b))
}

/// One timed pass over `parts` (one per thread when `parallel`), in GB/s.
fn pass(parts: &[&[u64]], method: Method, parallel: bool) -> (f64, u64) {
    let bytes: usize = parts.iter().map(|p| std::mem::size_of_val(*p)).sum();
    let t = Instant::now();
    let s = if parallel {
        // Contiguous parts, as matvec tasks read their rows.
        parts
            .par_iter()
            .with_max_len(1)
            .map(|p| read_words(p, method))
            .reduce(|| 0, u64::wrapping_add)
    } else {
        parts.iter().map(|p| read_words(p, method)).sum()
    };
    (bytes as f64 / t.elapsed().as_secs_f64() / 1e9, s)
}

/// Measures read bandwidth over a `buffer_bytes` buffer, spending about
/// `seconds` in total: every available [`Method`] on one thread and on
/// all threads, best pass of the best method. Use a buffer several times
/// the last-level cache (512 MiB or more) for a DRAM figure.
pub fn measure(buffer_bytes: usize, seconds: f64) -> Bandwidth {
    let (b, _) = measure_methods(buffer_bytes, seconds);
    b
}

/// [`measure`], also returning each method's best rates.
pub fn measure_methods(buffer_bytes: usize, seconds: f64) -> (Bandwidth, Vec<MethodRate>) {
    let threads = rayon::current_num_threads().max(1);
    // PARTS_PER_THREAD contiguous parts per thread, as a matvec splits its
    // rows: a thread slowed by other work hands parts to the others
    // instead of holding the whole pass back. Whole 4 KiB pages per part.
    let page_words = 512;
    let nparts = threads * PARTS_PER_THREAD;
    let n = (buffer_bytes / 8).max(page_words * nparts);
    let per = n.div_ceil(nparts).div_ceil(page_words) * page_words;
    let n = per * nparts;
    // Each part is written on the pool that reads it (first touch puts its
    // pages near the threads), with non-zero content so no shared zero page
    // flatters the figure.
    // On huge pages where the kernel offers them: with 4 KiB pages every
    // 4 KiB read costs a TLB miss, which under a hypervisor's nested page
    // tables held a stream to half of what the same loop reads from 2 MiB
    // pages; the probe reports what the memory can deliver, not what 4 KiB
    // page walks allow.
    let mut words = vec![0u64; n];
    crate::tensor::advise_huge(bytemuck::cast_slice_mut(&mut words));
    words
        .par_chunks_mut(per)
        .with_max_len(1)
        .enumerate()
        .for_each(|(ci, c)| {
            for (i, w) in c.iter_mut().enumerate() {
                *w = ((ci * per + i) as u64).wrapping_mul(0x9E37_79B9);
            }
        });
    let parts: Vec<&[u64]> = words.chunks(per).collect();
    // The single-thread figure reads a quarter of the buffer (at least a
    // thread's share) instead of all of it: same DRAM, less time.
    let one: Vec<&[u64]> = vec![&words[..(per * PARTS_PER_THREAD).max(n / 4).min(n)]];
    let methods = Method::available();
    let budget = Duration::from_secs_f64(seconds.max(0.02));
    let start = Instant::now();
    let mut rates: Vec<MethodRate> = methods
        .iter()
        .map(|&method| MethodRate {
            method,
            single_thread_gbs: 0.0,
            all_threads_gbs: 0.0,
        })
        .collect();
    let mut sink = 0u64;
    // Round-robin over the methods, so a burst of load from elsewhere
    // hurts them alike; at least one round.
    let mut round = 0;
    loop {
        for r in rates.iter_mut() {
            let (g, s) = pass(&parts, r.method, true);
            r.all_threads_gbs = r.all_threads_gbs.max(g);
            sink = sink.wrapping_add(s);
            // One thread every other round: it matters less (nothing runs
            // decode on one thread) and costs more time per byte.
            if round % 2 == 0 {
                let (g, s) = pass(&one, r.method, false);
                r.single_thread_gbs = r.single_thread_gbs.max(g);
                sink = sink.wrapping_add(s);
            }
        }
        round += 1;
        if start.elapsed() >= budget {
            break;
        }
    }
    std::hint::black_box(sink);
    let best = |f: fn(&MethodRate) -> f64| rates.iter().map(f).fold(0f64, f64::max);
    (
        Bandwidth {
            single_thread_gbs: best(|r| r.single_thread_gbs),
            all_threads_gbs: best(|r| r.all_threads_gbs),
            threads,
            buffer_bytes: n * 8,
        },
        rates,
    )
}

/// The AVX2 read loops. Sound because each loop runs only after
/// `is_x86_feature_detected!("avx2")` said yes, reads only inside the
/// slice it is given (whole 128-byte steps, then the tail word by word),
/// and prefetches, which never fault, may point past it.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Method, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    pub(super) fn have_avx2() -> bool {
        is_x86_feature_detected!("avx2")
    }

    /// `None` when the CPU lacks AVX2.
    pub(super) fn read(words: &[u64], m: Method) -> Option<u64> {
        if !have_avx2() {
            return None;
        }
        // SAFETY: AVX2 checked above; the loops stay inside `words`.
        Some(unsafe {
            match m {
                Method::Simd => stream::<0>(words),
                Method::SimdPrefetch => stream::<1>(words),
                Method::SimdPrefetchNta => stream::<2>(words),
                _ => four_streams(words),
            }
        })
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn fold(v: __m256i) -> u64 {
        let mut a = [0u64; 4];
        _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, v);
        a.iter().fold(0, |s, x| s.wrapping_add(*x))
    }

    /// 128 bytes per step into four accumulators; `PF` 0 none, 1 T0, 2 NTA.
    #[target_feature(enable = "avx2")]
    unsafe fn stream<const PF: u8>(words: &[u64]) -> u64 {
        let p = words.as_ptr() as *const u8;
        let len = words.len() * 8;
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut o = 0;
        while o + 128 <= len {
            match PF {
                1 => {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o + PREFETCH_AHEAD) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(
                        p.wrapping_add(o + 64 + PREFETCH_AHEAD) as *const i8
                    );
                }
                2 => {
                    _mm_prefetch::<_MM_HINT_NTA>(p.wrapping_add(o + PREFETCH_AHEAD) as *const i8);
                    _mm_prefetch::<_MM_HINT_NTA>(
                        p.wrapping_add(o + 64 + PREFETCH_AHEAD) as *const i8
                    );
                }
                _ => {}
            }
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(o + 32 * j) as *const __m256i));
            }
            o += 128;
        }
        let mut s = fold(_mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        ));
        for w in &words[o / 8..] {
            s = s.wrapping_add(*w);
        }
        s
    }

    /// Four quarters of `words` read side by side, 64 bytes of each per
    /// step, each prefetched ahead.
    #[target_feature(enable = "avx2")]
    unsafe fn four_streams(words: &[u64]) -> u64 {
        let q = words.len() / 4 / 16 * 16; // words per quarter, whole 128 B
        let base = words.as_ptr() as *const u8;
        let qb = q * 8;
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut o = 0;
        while o + 64 <= qb {
            for (j, a) in acc.iter_mut().enumerate() {
                let p = base.add(j * qb + o);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD) as *const i8);
                let v = _mm256_add_epi64(
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(32) as *const __m256i),
                );
                *a = _mm256_add_epi64(*a, v);
            }
            o += 64;
        }
        let mut s = fold(_mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        ));
        for w in &words[4 * q..] {
            s = s.wrapping_add(*w);
        }
        s
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::Method;
    pub(super) fn have_avx2() -> bool {
        false
    }
    pub(super) fn read(_: &[u64], _: Method) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_probe_reports_positive_rates() {
        let b = measure(1 << 20, 0.05);
        assert!(b.single_thread_gbs > 0.0 && b.all_threads_gbs > 0.0);
        assert!(b.buffer_bytes >= 1 << 20);
    }

    #[test]
    fn every_loop_reads_every_word() {
        // Odd lengths leave tails for every loop.
        for n in [0usize, 3, 16, 100, 4099, 40_001] {
            let words: Vec<u64> = (0..n as u64).map(|i| i * 7 + 1).collect();
            let want = words.iter().fold(0u64, |a, b| a.wrapping_add(*b));
            for m in Method::available() {
                assert_eq!(read_words(&words, m), want, "{} over {n} words", m.name());
            }
        }
    }

    #[test]
    fn every_method_is_measured() {
        let (b, rates) = measure_methods(2 << 20, 0.02);
        assert_eq!(rates.len(), Method::available().len());
        let best = rates.iter().map(|r| r.all_threads_gbs).fold(0f64, f64::max);
        assert_eq!(b.all_threads_gbs, best);
        assert!(rates.iter().all(|r| r.single_thread_gbs > 0.0));
    }
}

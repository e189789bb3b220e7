//! The memory read-bandwidth probe: what this machine can actually stream
//! from DRAM, which `rh-inspect` predicts decode speed from and
//! `rh-bench kernels` / `rh-bench` quote kernels and decode against.
//!
//! A plain single-stream sum under-reads the bus (one core's hardware
//! prefetcher keeps too few lines in flight), so a kernel that prefetches
//! would appear to beat it. The probe therefore tries several read loops
//! ([`Method`]) -- one or four interleaved streams per thread, with no
//! software prefetch, prefetching into L1 ahead of the loads, or with the
//! non-temporal hint -- each on one thread and on every thread (each
//! thread reading its own contiguous part of a buffer it touched first),
//! and reports the best loop. No kernel reading weights once should beat
//! that figure by more than noise. The buffer asks for transparent huge
//! pages (where the kernel offers them), as lm_head's copy does: on 4 KiB
//! pages the page walks, not the memory, set the rate; the report says
//! how much of the buffer got them.
//!
//! Each figure is a high quantile of many short timed windows rather than
//! the best of a few whole passes: on a machine shared with other work a
//! whole pass over a 1 GiB buffer is rarely left alone by the scheduler,
//! and how many passes were found the figure swung by a factor of two
//! from run to run. A window is a few MiB per thread with the threads
//! starting it together, timed from the first start to the last end.
//!
//! The SIMD loops (AVX2) live in the small `x86` module below; elsewhere,
//! or without AVX2, a portable u64 sum runs.

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Bytes ahead of the loads that the prefetching loops hint.
pub const PREFETCH_AHEAD: usize = 2048;

/// One method's best rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MethodRate {
    /// The loop.
    pub method: Method,
    /// GB/s on one thread ([`QUANTILE`] of the windows).
    pub single_thread_gbs: f64,
    /// GB/s on all threads ([`QUANTILE`] of the windows).
    pub all_threads_gbs: f64,
    /// The median window on all threads: far below `all_threads_gbs`, the
    /// machine was busy with something else.
    pub all_threads_median_gbs: f64,
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

/// Bytes each thread reads in one timed window: long against the few
/// hundred nanoseconds by which the threads' starts differ, short against
/// a scheduler's time slice, so a window that another process interrupts
/// is an outlier to drop rather than a dent in every figure.
pub const WINDOW_BYTES: usize = 8 << 20;

/// Windows each thread reads per fork-join of the pool.
const WINDOWS_PER_ROUND: usize = 8;

/// Which quantile of the windows' rates a figure reports: high enough to
/// skip the windows another process slowed, low enough that one odd
/// window does not set it.
pub const QUANTILE: f64 = 0.9;

/// A barrier the pool's threads spin on between windows (a sleeping
/// barrier's wake-up would take longer than the skew it removes); it
/// yields now and then so a descheduled partner gets the core back.
struct SpinBarrier {
    arrived: AtomicUsize,
    generation: AtomicUsize,
    n: usize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier {
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            n,
        }
    }

    fn wait(&self) {
        let g = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == g {
            std::hint::spin_loop();
            spins += 1;
            if spins & 4095 == 0 {
                std::thread::yield_now();
            }
        }
    }
}

/// Rates (GB/s) of `windows` windows read by every thread of the pool at
/// once, starting at window `first` of each thread's part: each
/// window's rate is all the bytes the threads read over the time from the
/// first thread's start to the last thread's end.
fn parallel_windows(
    parts: &[&[u64]],
    method: Method,
    first: usize,
    windows: usize,
) -> (Vec<f64>, u64) {
    let threads = parts.len();
    let barrier = SpinBarrier::new(threads);
    let per_window = window_words(8 * parts.iter().map(|p| p.len()).sum::<usize>(), threads);
    let spans: Vec<(Vec<(Instant, Instant)>, u64)> = rayon::broadcast(|ctx| {
        let part = parts[ctx.index() % threads];
        let n = (part.len() / per_window).max(1);
        let mut out = Vec::with_capacity(windows);
        let mut sink = 0u64;
        for w in 0..windows {
            let i = (first + w) % n;
            let win = &part[i * per_window..((i + 1) * per_window).min(part.len())];
            barrier.wait();
            let t0 = Instant::now();
            sink = sink.wrapping_add(read_words(win, method));
            out.push((t0, Instant::now()));
        }
        (out, sink)
    });
    let bytes = (threads * per_window * 8) as f64;
    let rates = (0..windows)
        .map(|w| {
            let start = spans.iter().map(|(s, _)| s[w].0).min().expect("a thread");
            let end = spans.iter().map(|(s, _)| s[w].1).max().expect("a thread");
            bytes / (end - start).as_secs_f64().max(1e-9) / 1e9
        })
        .collect();
    (rates, spans.iter().fold(0, |a, (_, s)| a.wrapping_add(*s)))
}

/// Rates (GB/s) of `WINDOWS_PER_ROUND` windows read by this thread alone.
fn single_windows(
    part: &[u64],
    per_window: usize,
    method: Method,
    first: usize,
) -> (Vec<f64>, u64) {
    let n = (part.len() / per_window).max(1);
    let mut sink = 0u64;
    let rates = (0..WINDOWS_PER_ROUND)
        .map(|w| {
            let i = (first + w) % n;
            let win = &part[i * per_window..((i + 1) * per_window).min(part.len())];
            let t = Instant::now();
            sink = sink.wrapping_add(read_words(win, method));
            (win.len() * 8) as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9
        })
        .collect();
    (rates, sink)
}

/// Words per window: [`WINDOW_BYTES`], or less so that each thread's part
/// of a small buffer holds four windows (a whole number of 4 KiB pages).
fn window_words(buffer_bytes: usize, threads: usize) -> usize {
    (WINDOW_BYTES / 8).min((buffer_bytes / 8 / threads / 4 / 512 * 512).max(512))
}

/// The `q` quantile of `v` (0 for none).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Measures read bandwidth over a `buffer_bytes` buffer, spending about
/// `seconds` in total: every available [`Method`] on one thread and on
/// all threads, the [`QUANTILE`] of the best method's windows. Use a
/// buffer several times the last-level cache (512 MiB or more) for a DRAM
/// figure.
pub fn measure(buffer_bytes: usize, seconds: f64) -> Bandwidth {
    measure_report(buffer_bytes, seconds).bandwidth
}

/// [`measure`], also returning each method's rates.
pub fn measure_methods(buffer_bytes: usize, seconds: f64) -> (Bandwidth, Vec<MethodRate>) {
    let r = measure_report(buffer_bytes, seconds);
    (r.bandwidth, r.methods)
}

/// Everything one probe found.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The figures (the best method's [`QUANTILE`]).
    pub bandwidth: Bandwidth,
    /// Each method's figures.
    pub methods: Vec<MethodRate>,
    /// Windows timed on all threads, over all methods.
    pub windows: usize,
    /// Share of the buffer the kernel backed with huge pages (`None`
    /// where that cannot be read).
    pub huge_page_share: Option<f64>,
}

/// [`measure`] with the details: the buffer is split into one contiguous
/// part per thread, written first by the thread that reads it; every
/// round, each method reads [`WINDOWS_PER_ROUND`] windows of
/// [`WINDOW_BYTES`] per thread, all threads starting each window together
/// (one thread alone every other round), walking through the parts so
/// every window comes from DRAM, not from a cache. A window's rate counts
/// from the first thread's start to the last thread's end, so a thread
/// that lags makes it slower, never faster.
pub fn measure_report(buffer_bytes: usize, seconds: f64) -> ProbeReport {
    Probe::new(buffer_bytes).run(seconds)
}

/// A probe's buffer, kept so that the probe can run again later: a
/// virtual machine's read bandwidth moves with what the host does (here
/// one run read 37 GB/s and the next, seconds later, 63), so a figure
/// taken once can sit far below what a kernel then reads. Benchmarks probe
/// before and after (or between) their measurements and keep the best:
/// what the machine showed it can stream.
pub struct Probe {
    words: Vec<u64>,
    /// Words per thread's part.
    per: usize,
    per_window: usize,
    huge_page_share: Option<f64>,
}

impl Probe {
    /// Allocates and fills a buffer of about `buffer_bytes` (see
    /// [`measure_report`]).
    pub fn new(buffer_bytes: usize) -> Probe {
        let threads = rayon::current_num_threads().max(1);
        // At least four windows per part (small buffers: tests).
        let per_window = window_words(buffer_bytes, threads);
        // Whole windows per part, at least one.
        let n = (buffer_bytes / 8).max(per_window * threads);
        let per = n.div_ceil(threads).div_ceil(per_window) * per_window;
        let n = per * threads;
        // On huge pages where the kernel offers them: with 4 KiB pages every
        // 4 KiB read costs a TLB miss, which under a hypervisor's nested page
        // tables held a stream to half of what the same loop reads from 2 MiB
        // pages; the probe reports what the memory can deliver, not what 4 KiB
        // page walks allow. Non-zero content, so no shared zero page flatters
        // the figure; each part written on the thread that reads it.
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
        let huge_page_share = huge_page_share(bytemuck::cast_slice(&words));
        Probe {
            words,
            per,
            per_window,
            huge_page_share,
        }
    }

    /// Measures for about `seconds` (see [`measure_report`]).
    pub fn run(&self, seconds: f64) -> ProbeReport {
        let (per, per_window) = (self.per, self.per_window);
        let parts: Vec<&[u64]> = self.words.chunks(per).collect();
        let threads = parts.len();
        let methods = Method::available();
        let budget = Duration::from_secs_f64(seconds.max(0.02));
        let start = Instant::now();
        let mut all: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
        let mut one: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
        let mut sink = 0u64;
        // Warm-up (page tables, clock frequency): a round of one window per
        // method, not counted.
        for &m in &methods {
            let (_, s) = parallel_windows(&parts, m, 0, 1);
            sink = sink.wrapping_add(s);
        }
        // Round-robin over the methods, so a burst of load from elsewhere
        // hurts them alike; at least one round.
        let mut round = 0;
        let mut first = 1;
        loop {
            for (mi, &m) in methods.iter().enumerate() {
                let (r, s) = parallel_windows(&parts, m, first, WINDOWS_PER_ROUND);
                sink = sink.wrapping_add(s);
                all[mi].extend(r);
                // One thread every other round: nothing runs decode on one
                // thread, and it costs more time per byte.
                if round % 2 == 0 {
                    let (r, s) = single_windows(parts[0], per_window, m, first);
                    sink = sink.wrapping_add(s);
                    one[mi].extend(r);
                }
                first += WINDOWS_PER_ROUND;
            }
            round += 1;
            if start.elapsed() >= budget {
                break;
            }
        }
        std::hint::black_box(sink);
        let rates: Vec<MethodRate> = methods
            .iter()
            .enumerate()
            .map(|(mi, &method)| MethodRate {
                method,
                single_thread_gbs: quantile(&one[mi], QUANTILE),
                all_threads_gbs: quantile(&all[mi], QUANTILE),
                all_threads_median_gbs: quantile(&all[mi], 0.5),
            })
            .collect();
        let best = |f: fn(&MethodRate) -> f64| rates.iter().map(f).fold(0f64, f64::max);
        ProbeReport {
            bandwidth: Bandwidth {
                single_thread_gbs: best(|r| r.single_thread_gbs),
                all_threads_gbs: best(|r| r.all_threads_gbs),
                threads,
                buffer_bytes: self.words.len() * 8,
            },
            windows: all.iter().map(Vec::len).sum(),
            methods: rates,
            huge_page_share: self.huge_page_share,
        }
    }
}

/// The better of two probes of the same machine (each figure its best).
pub fn best_of(a: Bandwidth, b: Bandwidth) -> Bandwidth {
    Bandwidth {
        single_thread_gbs: a.single_thread_gbs.max(b.single_thread_gbs),
        all_threads_gbs: a.all_threads_gbs.max(b.all_threads_gbs),
        ..a
    }
}

/// The share of `buf` that the kernel backs with transparent huge pages,
/// from `/proc/self/smaps` (the mappings overlapping `buf`); `None` where
/// that file cannot be read.
pub fn huge_page_share(buf: &[u8]) -> Option<f64> {
    if buf.is_empty() {
        return None;
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let (lo, hi) = (buf.as_ptr() as u64, buf.as_ptr() as u64 + buf.len() as u64);
    let [huge] = crate::mmap::smaps_sums(&smaps, &[(lo, hi)], ["AnonHugePages:"]);
    Some((huge as f64 / buf.len() as f64).min(1.0))
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
        let r = measure_report(2 << 20, 0.02);
        assert_eq!(r.methods.len(), Method::available().len());
        let best = r
            .methods
            .iter()
            .map(|m| m.all_threads_gbs)
            .fold(0f64, f64::max);
        assert_eq!(r.bandwidth.all_threads_gbs, best);
        assert!(r.methods.iter().all(|m| m.single_thread_gbs > 0.0));
        assert!(r
            .methods
            .iter()
            .all(|m| m.all_threads_median_gbs <= m.all_threads_gbs));
        // A counted round at least, every method, every window.
        assert!(r.windows >= WINDOWS_PER_ROUND * r.methods.len());
    }

    #[test]
    fn a_probe_runs_again_on_its_buffer_and_the_best_is_kept() {
        let probe = Probe::new(4 << 20);
        let a = probe.run(0.02).bandwidth;
        let b = probe.run(0.02).bandwidth;
        assert!(a.all_threads_gbs > 0.0 && b.all_threads_gbs > 0.0);
        assert_eq!(a.buffer_bytes, b.buffer_bytes);
        let best = best_of(a, b);
        assert_eq!(
            best.all_threads_gbs,
            a.all_threads_gbs.max(b.all_threads_gbs)
        );
        assert_eq!(
            best.single_thread_gbs,
            a.single_thread_gbs.max(b.single_thread_gbs)
        );
    }

    #[test]
    fn quantile_picks_from_the_sorted_rates() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0, 11.0];
        assert_eq!(quantile(&v, 0.5), 6.0);
        assert_eq!(quantile(&v, 0.9), 10.0);
        assert_eq!(quantile(&v, 1.0), 11.0);
        assert_eq!(quantile(&[], 0.9), 0.0);
    }

    #[test]
    fn huge_page_share_is_a_fraction_of_the_buffer() {
        let mut v = vec![1u8; 8 << 20];
        crate::tensor::advise_huge(&mut v);
        v.iter_mut().step_by(4096).for_each(|b| *b = 2);
        if let Some(s) = huge_page_share(&v) {
            assert!((0.0..=1.0).contains(&s), "{s}");
        }
        assert_eq!(huge_page_share(&[]), None);
    }
}

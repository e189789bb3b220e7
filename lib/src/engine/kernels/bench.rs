//! Kernel benchmarks: effective bandwidth and arithmetic rate of
//! [`matvec`](super::matvec) and [`matmul`](super::matmul) on the real
//! model's shapes, next to the memory read bandwidth ([`crate::membw`]) and an
//! FMA-peak microbenchmark measured in the same run, on the same threads.
//!
//! Matrix-vector figures are "cold": each timed pass walks over enough
//! separate copies of the matrix (at least [`KernelOpts::cold_bytes`]) that
//! the weights come from memory, as they do in decode, where every layer and
//! expert is read once per token. Matrix-matrix figures for up to 64 tokens
//! walk the copies too (a routed expert meets about ten tokens of a prompt
//! and is read from memory); for more tokens they use one cached copy.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::{isa, isas, matmul_isa, matvec_batch_isa, matvec_isa, matvec_path, Isa, Path, Product};
use crate::membw::{self, Bandwidth};
use crate::tensor::{
    advise_huge, AlignedBuf, Bytes, DenseMatrix, FloatType, Matrix, QuantMatrix, Zeros,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct KernelOpts {
    /// Threads (a private rayon pool); `None` uses the current pool.
    pub threads: Option<usize>,
    /// Substrings selecting shapes by name; empty measures every shape.
    pub shapes: Vec<String>,
    /// Time budget of each measurement in seconds (at least one pass runs).
    pub seconds: f64,
    /// Tokens of the matrix-matrix products.
    pub tokens: usize,
    /// Buffer of the memory-bandwidth probe.
    pub membw_bytes: usize,
    /// Bytes of matrix copies a cold matvec pass walks over.
    pub cold_bytes: usize,
    /// Whether to measure matrix-matrix products.
    pub matmul: bool,
}

impl Default for KernelOpts {
    fn default() -> Self {
        KernelOpts {
            threads: None,
            shapes: Vec::new(),
            seconds: 0.5,
            tokens: 512,
            membw_bytes: 1 << 30,
            cold_bytes: 512 << 20,
            matmul: true,
        }
    }
}

/// Weight kind of a benchmark shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WeightKind {
    /// int4, group 128, symmetric.
    Int4,
    /// int8, group 128, symmetric.
    Int8,
    /// bfloat16.
    Bf16,
}

/// A benchmark shape.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    /// Name (what `--shapes` matches).
    pub name: &'static str,
    /// Weight kind.
    pub kind: WeightKind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Whether the matrix-matrix product is measured too.
    pub matmul: bool,
}

/// The shapes measured: Qwen3-Next-80B-A3B's expert, attention and lm_head
/// matrices, and two larger than any cache.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "expert-gate-up",
        kind: WeightKind::Int4,
        rows: 512,
        cols: 2048,
        matmul: true,
    },
    Shape {
        name: "expert-down",
        kind: WeightKind::Int4,
        rows: 2048,
        cols: 512,
        matmul: true,
    },
    Shape {
        name: "qkvz",
        kind: WeightKind::Int8,
        rows: 12288,
        cols: 2048,
        matmul: true,
    },
    Shape {
        name: "q_proj",
        kind: WeightKind::Int8,
        rows: 8192,
        cols: 2048,
        matmul: true,
    },
    Shape {
        name: "lm_head",
        kind: WeightKind::Bf16,
        rows: 151936,
        cols: 2048,
        matmul: true,
    },
    Shape {
        name: "big-int4",
        kind: WeightKind::Int4,
        rows: 16384,
        cols: 16384,
        matmul: false,
    },
    Shape {
        name: "big-int8",
        kind: WeightKind::Int8,
        rows: 16384,
        cols: 16384,
        matmul: false,
    },
];

/// One measured kernel and shape.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    /// Shape name.
    pub shape: String,
    /// Weight kind.
    pub kind: WeightKind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `matvec`, `batch` (matvecs in one parallel region, per matrix) or
    /// `matmul`.
    pub op: &'static str,
    /// Kernel path.
    pub path: &'static str,
    /// Instruction set that ran it ([`Isa::name`]).
    pub isa: &'static str,
    /// Tokens per call.
    pub tokens: usize,
    /// Best seconds per call.
    pub seconds: f64,
    /// Weight bytes read per call / seconds, in GB/s.
    pub gbs: f64,
    /// Effective bandwidth as a share of the measured read bandwidth.
    pub of_bandwidth: f64,
    /// `2 rows cols tokens / seconds`, in GFLOP/s.
    pub gflops: f64,
    /// GFLOP/s as a share of the FMA peak.
    pub of_fma_peak: f64,
    /// Calls timed.
    pub calls: usize,
    /// Share of the weights (first few copies) on huge pages (`None`:
    /// unknown): a kernel reading 4 KiB pages pays a page walk per page.
    pub huge_page_share: Option<f64>,
}

/// Error of a matvec path with quantized activations against the scalar
/// f32 reference.
#[derive(Clone, Debug, Serialize)]
pub struct ActivationError {
    /// Shape name.
    pub shape: String,
    /// The path measured ([`Path::name`]).
    pub path: &'static str,
    /// Instruction set that ran it ([`Isa::name`]).
    pub isa: &'static str,
    /// `‖y − y_ref‖₂ / ‖y_ref‖₂`.
    pub rel_l2: f64,
    /// `max |y − y_ref| / (max y_ref − min y_ref)`: the measure the
    /// engine bounds logits with.
    pub max_over_range: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    /// Instruction set of the SIMD paths.
    pub isa: &'static str,
    /// Threads used.
    pub threads: usize,
    /// Memory read bandwidth on the same threads (the best read loop): the
    /// best of the probes taken before the first shape and after each one.
    pub bandwidth: Bandwidth,
    /// Each probe's all-threads GB/s, in order (the first is the long one
    /// whose read loops `bandwidth_methods` details).
    pub bandwidth_probes: Vec<f64>,
    /// Each read loop of the bandwidth probe: name, GB/s on one thread, on
    /// all threads, and the median window on all threads.
    pub bandwidth_methods: Vec<(&'static str, f64, f64, f64)>,
    /// Windows the probe timed on all threads.
    pub bandwidth_windows: usize,
    /// Share of the probe's buffer on huge pages (`None`: unknown).
    pub bandwidth_huge_page_share: Option<f64>,
    /// FMA peak, GFLOP/s, one thread.
    pub fma_peak_1t_gflops: f64,
    /// FMA peak, GFLOP/s, all threads.
    pub fma_peak_gflops: f64,
    /// Per kernel and shape.
    pub rows: Vec<KernelRow>,
    /// Int16- and int8-activation error per quantized shape.
    pub activation_error: Vec<ActivationError>,
}

/// Runs the benchmarks.
pub fn run(opts: &KernelOpts) -> KernelReport {
    match opts.threads.filter(|&t| t > 0) {
        Some(t) => match rayon::ThreadPoolBuilder::new().num_threads(t).build() {
            Ok(pool) => pool.install(|| run_here(opts)),
            Err(e) => {
                tracing::warn!("thread pool of {t}: {e}; using the global pool");
                run_here(opts)
            }
        },
        None => run_here(opts),
    }
}

fn run_here(opts: &KernelOpts) -> KernelReport {
    let threads = rayon::current_num_threads();
    tracing::info!("memory bandwidth probe ({} MiB)", opts.membw_bytes >> 20);
    let prober = membw::Probe::new(opts.membw_bytes);
    let probe = prober.run((opts.seconds * 4.0).max(1.0));
    let (fma1, fma_all) = fma_peak(opts.seconds.max(0.2));
    let mut rep = KernelReport {
        isa: isa(),
        threads,
        bandwidth: probe.bandwidth,
        bandwidth_probes: vec![probe.bandwidth.all_threads_gbs],
        bandwidth_methods: probe
            .methods
            .iter()
            .map(|m| {
                (
                    m.method.name(),
                    m.single_thread_gbs,
                    m.all_threads_gbs,
                    m.all_threads_median_gbs,
                )
            })
            .collect(),
        bandwidth_windows: probe.windows,
        bandwidth_huge_page_share: probe.huge_page_share,
        fma_peak_1t_gflops: fma1,
        fma_peak_gflops: fma_all,
        rows: Vec::new(),
        activation_error: Vec::new(),
    };
    for shape in SHAPES {
        if !opts.shapes.is_empty() && !opts.shapes.iter().any(|s| shape.name.contains(s.as_str())) {
            continue;
        }
        tracing::info!("shape {} [{}, {}]", shape.name, shape.rows, shape.cols);
        bench_shape(shape, opts, &mut rep);
        // Probe again beside every shape: where the machine's bandwidth
        // moves (a VM whose host is busy), a kernel timed in a fast spell
        // would otherwise beat a probe taken in a slow one.
        let again = prober.run(0.25).bandwidth;
        rep.bandwidth_probes.push(again.all_threads_gbs);
        rep.bandwidth = membw::best_of(rep.bandwidth, again);
    }
    // Every row against the best probe.
    let bw = rep.bandwidth.all_threads_gbs;
    for r in &mut rep.rows {
        r.of_bandwidth = if bw > 0.0 { r.gbs / bw } else { 0.0 };
    }
    rep
}

/// GFLOP/s of a register-resident FMA loop: one thread, then every thread.
pub fn fma_peak(seconds: f64) -> (f64, f64) {
    let iters = 2_000_000u64;
    let flops_per_call = iters as f64 * 10.0 * 8.0 * 2.0;
    let Some(one) = fma_call(iters) else {
        return (0.0, 0.0);
    };
    let mut best1 = flops_per_call / one / 1e9;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds / 2.0 {
        best1 = best1.max(flops_per_call / fma_call(iters).unwrap_or(f64::MAX) / 1e9);
    }
    let mut best_all = 0f64;
    let start = Instant::now();
    loop {
        let t = Instant::now();
        rayon::broadcast(|_| fma_call(iters));
        let dt = t.elapsed().as_secs_f64();
        best_all = best_all.max(flops_per_call * rayon::current_num_threads() as f64 / dt / 1e9);
        if start.elapsed().as_secs_f64() >= seconds / 2.0 {
            break;
        }
    }
    (best1, best_all)
}

/// Seconds of one FMA-loop call on this thread; `None` without SIMD.
fn fma_call(iters: u64) -> Option<f64> {
    let t = Instant::now();
    match super::simd() {
        #[cfg(target_arch = "x86_64")]
        super::Simd::Avx2(a) => std::hint::black_box(a.fma_loop(std::hint::black_box(iters))),
        // Twice the lanes per instruction: half the iterations for the
        // same FLOPs.
        #[cfg(target_arch = "x86_64")]
        super::Simd::Avx512(a) => std::hint::black_box(a.fma_loop(std::hint::black_box(iters / 2))),
        super::Simd::None => return None,
    };
    Some(t.elapsed().as_secs_f64())
}

/// Fills `buf` with pseudo-random bytes (splitmix64), in parallel.
fn fill_random(buf: &mut [u8], seed: u64) {
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut s = seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for w in c.chunks_mut(8) {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let b = z.to_le_bytes();
            w.copy_from_slice(&b[..w.len()]);
        }
    });
}

/// Random 2-byte floats of moderate magnitude (no NaN, infinity or
/// subnormal): the high byte of each element is forced into `[0x3C, 0x3F]`
/// with a random sign, for bf16 `[2^-7, 2)` and for f16 `[1, 2)`-ish values.
fn tame_halves(buf: &mut [u8]) {
    buf.par_chunks_mut(1 << 16).for_each(|c| {
        for h in c.chunks_exact_mut(2) {
            h[1] = (h[1] & 0x80) | 0x3C | (h[1] & 0x03);
        }
    });
}

/// A random matrix of `shape` (scales small and of either sign), on huge
/// pages where it spans whole 2 MiB pages, as the model puts the weights
/// every token reads (`crate::model`; experts are smaller and stay on
/// ordinary pages there and here).
pub fn random_matrix(shape: &Shape, seed: u64) -> Matrix {
    let (rows, cols) = (shape.rows, shape.cols);
    match shape.kind {
        WeightKind::Bf16 => {
            let mut b = AlignedBuf::zeroed(rows * cols * 2);
            advise_huge(b.as_mut_slice());
            fill_random(b.as_mut_slice(), seed);
            tame_halves(b.as_mut_slice());
            Matrix::Dense(DenseMatrix {
                rows,
                cols,
                dtype: FloatType::BF16,
                data: Bytes::owned(b),
            })
        }
        WeightKind::Int4 | WeightKind::Int8 => {
            let bits = if shape.kind == WeightKind::Int4 { 4 } else { 8 };
            let group = 128.min(cols);
            let mut q = AlignedBuf::zeroed(rows * QuantMatrix::packed_row_bytes(cols, bits));
            advise_huge(q.as_mut_slice());
            fill_random(q.as_mut_slice(), seed);
            let ng = cols.div_ceil(group);
            let mut s = AlignedBuf::zeroed(rows * ng * 2);
            fill_random(s.as_mut_slice(), seed ^ 1);
            // f16 with exponent field 0b0_1000 region: about ±[2^-7, 2^-6).
            s.as_mut_slice().par_chunks_mut(1 << 16).for_each(|c| {
                for h in c.chunks_exact_mut(2) {
                    h[1] = (h[1] & 0x80) | 0x20 | (h[1] & 0x03);
                }
            });
            Matrix::Quant(QuantMatrix {
                rows,
                cols,
                bits,
                group_size: group,
                qdata: Bytes::owned(q),
                scales: Bytes::owned(s),
                zeros: Zeros::Symmetric,
            })
        }
    }
}

/// Activations like a transformer's: mostly small, with a few outlier
/// channels (which is what makes per-block int8 quantization lossy).
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut b = vec![0u8; n * 4];
    fill_random(&mut b, seed);
    b.chunks_exact(4)
        .enumerate()
        .map(|(i, c)| {
            let u = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32 / u32::MAX as f32;
            let v = 2.0 * u - 1.0;
            if i % 97 == 13 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

/// Best seconds per call of `f` within `seconds` (one warm-up call first
/// when it is cheap), and the number of timed calls.
fn time_best(seconds: f64, mut f: impl FnMut()) -> (f64, usize) {
    let t = Instant::now();
    f();
    let first = t.elapsed().as_secs_f64();
    if first >= seconds {
        return (first, 1);
    }
    let mut best = first;
    let mut calls = 1;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        calls += 1;
    }
    (best, calls)
}

/// The share of `mats`' weight payloads on huge pages, by bytes.
fn huge_share(mats: &[Matrix]) -> Option<f64> {
    let mut total = 0.0;
    let mut huge = 0.0;
    for m in mats {
        let b = match m {
            Matrix::Dense(d) => d.data.as_slice(),
            Matrix::Quant(q) => q.qdata.as_slice(),
        };
        huge += membw::huge_page_share(b)? * b.len() as f64;
        total += b.len() as f64;
    }
    (total > 0.0).then(|| huge / total)
}

/// Matrices per call of the batched matvec measurement: a routed layer's
/// gates and ups (ten experts).
const DECODE_BATCH: usize = 20;

/// Token counts up to this time matrix-matrix products on weights read
/// from memory (as matvec is), larger ones on one cache-resident matrix.
const COLD_MATMUL_TOKENS: usize = 64;

fn bench_shape(shape: &Shape, opts: &KernelOpts, rep: &mut KernelReport) {
    let one = random_matrix(shape, 42);
    let bytes = one.bytes_read();
    let copies = opts.cold_bytes.div_ceil(bytes).max(1);
    let mut mats = vec![one];
    for c in 1..copies {
        mats.push(random_matrix(shape, 42 + c as u64));
    }
    let (rows, cols) = (shape.rows, shape.cols);
    let huge = huge_share(&mats[..mats.len().min(8)]);
    let x = activations(cols, 7);
    let mut y = vec![0f32; rows];
    let bw = rep.bandwidth.all_threads_gbs;
    let peak = rep.fma_peak_gflops;
    // Int16 activations at every SIMD level (AVX-512 VNNI has its own
    // kernel); int8 and f32 activations and dense weights run the AVX2
    // kernels at either level.
    let levels: Vec<Isa> = isas();
    let best = *levels.last().expect("scalar is always there");
    // The levels above AVX2 run its kernels for these paths too.
    let avx2 = best.min(Isa::Avx2);
    let paths = matvec_paths(shape.kind, best, avx2);
    let row = |op, isa: Isa, path: Path, tokens: usize, secs: f64, calls: usize| {
        let gbs = bytes as f64 / secs / 1e9;
        let gflops = 2.0 * (rows * cols * tokens) as f64 / secs / 1e9;
        KernelRow {
            shape: shape.name.to_string(),
            kind: shape.kind,
            rows,
            cols,
            op,
            path: path.name(),
            isa: isa.name(),
            tokens,
            seconds: secs,
            gbs,
            of_bandwidth: if bw > 0.0 { gbs / bw } else { 0.0 },
            gflops,
            of_fma_peak: if peak > 0.0 { gflops / peak } else { 0.0 },
            calls,
            huge_page_share: huge,
        }
    };
    for &(isa, path) in &paths {
        // One pass = one matvec on every copy.
        let (secs, passes) = time_best(opts.seconds, || {
            for m in &mats {
                matvec_isa(isa, m, &x, &mut y, path);
            }
        });
        let per_call = secs / mats.len() as f64;
        rep.rows
            .push(row("matvec", isa, path, 1, per_call, passes * mats.len()));
        // Routed experts also as decode runs them: a batch per call.
        if shape.name.starts_with("expert") && mats.len() >= DECODE_BATCH {
            let (per_matrix, calls) = time_decode_batch(&mats, &x, rows, isa, path, opts);
            rep.rows.push(row("batch", isa, path, 1, per_matrix, calls));
        }
    }
    // Prefill's few-token products (a routed expert meets about ten
    // tokens) read their weights from memory too, so they walk the copies
    // as matvec does; many tokens reuse one matrix from cache.
    let matmul_mats: Vec<Matrix> = if opts.tokens <= COLD_MATMUL_TOKENS {
        std::mem::take(&mut mats)
    } else {
        mats.truncate(1);
        std::mem::take(&mut mats)
    };
    let w = &matmul_mats[0];
    if shape.kind != WeightKind::Bf16 && rows * cols <= 1 << 26 {
        rep.activation_error
            .extend(activation_errors(shape, w, &x, best, avx2));
    }
    if opts.matmul && shape.matmul && opts.tokens > 1 {
        for (isa, path, secs, calls) in time_matmuls(shape, &matmul_mats, &levels, avx2, opts) {
            rep.rows
                .push(row("matmul", isa, path, opts.tokens, secs, calls));
        }
    }
}

/// Decode runs a layer's experts as one batch of matvecs in one parallel
/// region (`kernels::matvec_batch`): times them that way, DECODE_BATCH
/// matrices per call, as a routed layer's gates and ups are. Returns the
/// seconds per matrix (comparable to a lone matvec) and the matrices run.
fn time_decode_batch(
    mats: &[Matrix],
    x: &[f32],
    rows: usize,
    isa: Isa,
    path: Path,
    opts: &KernelOpts,
) -> (f64, usize) {
    let mut ys = vec![vec![0f32; rows]; DECODE_BATCH];
    let (secs, passes) = time_best(opts.seconds, || {
        for group in mats.chunks_exact(DECODE_BATCH) {
            let mut jobs: Vec<Product> = group
                .iter()
                .zip(ys.iter_mut())
                .map(|(m, y)| Product::new(m, x, y))
                .collect();
            matvec_batch_isa(isa, &mut jobs, path);
        }
    });
    let calls = mats.len() / DECODE_BATCH * DECODE_BATCH;
    (secs / calls as f64, passes * calls)
}

/// Times the many-token products of `opts.tokens` tokens on every copy:
/// for quantized weights the integer tiles of every SIMD level up to the
/// one in use, then the f32 path. Returns (level, path, seconds per call,
/// calls) per measurement.
fn time_matmuls(
    shape: &Shape,
    mats: &[Matrix],
    levels: &[Isa],
    avx2: Isa,
    opts: &KernelOpts,
) -> Vec<(Isa, Path, f64, usize)> {
    let (rows, cols, n) = (shape.rows, shape.cols, opts.tokens);
    let xs = activations(n * cols, 9);
    let mut ys = vec![0f32; n * rows];
    let copies = mats.len();
    let mut timed = |isa: Isa, path: Path| {
        let (secs, passes) = time_best(opts.seconds, || {
            for m in mats {
                matmul_isa(isa, m, &xs, n, &mut ys, path);
            }
        });
        (isa, path, secs / copies as f64, passes * copies)
    };
    let mut out = Vec::new();
    if shape.kind != WeightKind::Bf16 {
        for &isa in levels.iter().rev().filter(|&&i| i != Isa::Scalar) {
            if isa <= super::simd().isa() {
                out.push(timed(isa, Path::SimdInt16));
            }
        }
    }
    // Dense weights: AVX-512 converts each row once for all the tokens
    // (`dense_rows_tokens`), which is what batched decode runs there.
    if shape.kind == WeightKind::Bf16 && n <= super::SMALL_BATCH_TOKENS {
        let best = super::simd().isa();
        if best == Isa::Avx512Vnni {
            out.push(timed(best, Path::SimdF32));
        }
    }
    out.push(timed(avx2, Path::SimdF32));
    out
}

/// The matvec paths measured for a shape: f32 activations for dense
/// weights; for quantized ones int16 (AVX-512 VNNI's own kernel when there),
/// int8 and f32 on the AVX2 kernels.
fn matvec_paths(kind: WeightKind, best: Isa, avx2: Isa) -> Vec<(Isa, Path)> {
    let mut paths: Vec<(Isa, Path)> = Vec::new();
    if kind == WeightKind::Bf16 {
        paths.push((avx2, Path::SimdF32));
    } else {
        // Groups of 128 (see `random_matrix`): every AVX-512 kernel takes them.
        if best == Isa::Avx512Vnni {
            paths.push((Isa::Avx512Vnni, Path::SimdInt16));
        }
        paths.extend([
            (avx2, Path::SimdInt16),
            (avx2, Path::SimdInt8),
            (avx2, Path::SimdF32),
        ]);
    }
    paths
}

/// How far each quantized-activation path's output is from the scalar
/// reference on `w`.
fn activation_errors(
    shape: &Shape,
    w: &Matrix,
    x: &[f32],
    best: Isa,
    avx2: Isa,
) -> Vec<ActivationError> {
    let rows = w.rows();
    let mut yq = vec![0f32; rows];
    let mut yr = vec![0f32; rows];
    matvec_path(w, x, &mut yr, Path::Scalar);
    let den: f64 = yr.iter().map(|b| (*b as f64).powi(2)).sum();
    let (lo, hi) = yr.iter().fold((f64::MAX, f64::MIN), |(l, h), v| {
        (l.min(*v as f64), h.max(*v as f64))
    });
    let mut checks = vec![(avx2, Path::SimdInt16), (avx2, Path::SimdInt8)];
    if best == Isa::Avx512Vnni {
        checks.insert(0, (best, Path::SimdInt16));
    }
    let mut out = Vec::new();
    for (isa, path) in checks {
        matvec_isa(isa, w, x, &mut yq, path);
        let num: f64 = yq
            .iter()
            .zip(&yr)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let maxd = yq
            .iter()
            .zip(&yr)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
        out.push(ActivationError {
            shape: shape.name.to_string(),
            path: path.name(),
            isa: isa.name(),
            rel_l2: (num / den.max(f64::MIN_POSITIVE)).sqrt(),
            max_over_range: maxd / (hi - lo).max(f64::MIN_POSITIVE),
        });
    }
    out
}

impl KernelReport {
    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The report as a text table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let b = &self.bandwidth;
        let mut s = String::new();
        let probes: Vec<String> = self
            .bandwidth_probes
            .iter()
            .map(|g| format!("{g:.1}"))
            .collect();
        let _ = writeln!(
            s,
            "kernels: {} on {} threads; memory read bandwidth {:.2} GB/s ({:.2} on 1 thread, {} MiB buffer; the best of {} probes, first and after each shape: {}); FMA peak {:.1} GFLOP/s ({:.1} on 1 thread)",
            self.isa,
            self.threads,
            b.all_threads_gbs,
            b.single_thread_gbs,
            b.buffer_bytes >> 20,
            probes.len(),
            probes.join(", "),
            self.fma_peak_gflops,
            self.fma_peak_1t_gflops
        );
        let probe: Vec<String> = self
            .bandwidth_methods
            .iter()
            .map(|(n, one, all, median)| format!("{n} {all:.2} ({one:.2}; median {median:.2})"))
            .collect();
        let _ = writeln!(
            s,
            "bandwidth probe, GB/s on {} threads (1 thread; median window on {} threads) per read loop, {:.0}th percentile of {} windows of {} MiB per thread, buffer {} on huge pages: {}",
            self.threads,
            self.threads,
            membw::QUANTILE * 100.0,
            self.bandwidth_windows,
            membw::WINDOW_BYTES >> 20,
            self.bandwidth_huge_page_share
                .map_or("unknown".into(), |h| format!("{:.0}%", h * 100.0)),
            probe.join(", ")
        );
        let _ = writeln!(
            s,
            "{:<15} {:>13} {:<6} {:<11} {:<10} {:>6} {:>10} {:>8} {:>6} {:>9} {:>6} {:>5}",
            "shape",
            "rows x cols",
            "op",
            "isa",
            "path",
            "tokens",
            "ms/call",
            "GB/s",
            "%bw",
            "GFLOP/s",
            "%fma",
            "huge"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<15} {:>13} {:<6} {:<11} {:<10} {:>6} {:>10.3} {:>8.2} {:>5.0}% {:>9.1} {:>5.1}% {:>5}",
                format!("{} {:?}", r.shape, r.kind)
                    .chars()
                    .take(15)
                    .collect::<String>(),
                format!("{}x{}", r.rows, r.cols),
                r.op,
                r.isa,
                r.path,
                r.tokens,
                r.seconds * 1e3,
                r.gbs,
                r.of_bandwidth * 100.0,
                r.gflops,
                r.of_fma_peak * 100.0,
                r.huge_page_share
                    .map_or("?".into(), |h| format!("{:.0}%", h * 100.0))
            );
        }
        if !self.activation_error.is_empty() {
            let _ = writeln!(s, "quantized activations vs scalar f32 reference:");
            for e in &self.activation_error {
                let _ = writeln!(
                    s,
                    "  {:<15} {:<11} {:<10} relative L2 error {:.2e}, max error / output range {:.2e}",
                    e.shape, e.isa, e.path, e.rel_l2, e.max_over_range
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_simd() -> bool {
        isas().len() > 1
    }

    #[test]
    fn tiny_run_reports_every_selected_shape() {
        let opts = KernelOpts {
            threads: Some(2),
            shapes: vec!["expert-gate".into()],
            seconds: 0.01,
            tokens: 4,
            membw_bytes: 1 << 20,
            cold_bytes: 1,
            matmul: true,
        };
        let rep = run(&opts);
        assert_eq!(rep.threads, 2);
        let ops: Vec<_> = rep.rows.iter().map(|r| (r.op, r.isa, r.path)).collect();
        if !have_simd() {
            return;
        }
        let avx2 = Isa::Avx2.name();
        let mut want = vec![
            ("matvec", avx2, "simd-int16"),
            ("matvec", avx2, "simd-int8"),
            ("matvec", avx2, "simd-f32"),
            ("matmul", avx2, "simd-int16"),
            ("matmul", avx2, "simd-f32"),
        ];
        // The matmul rows go from the highest level down.
        if isas().contains(&Isa::AvxVnni) {
            want.insert(3, ("matmul", Isa::AvxVnni.name(), "simd-int16"));
        }
        if isas().contains(&Isa::Avx512Vnni) {
            want.insert(0, ("matvec", Isa::Avx512Vnni.name(), "simd-int16"));
            want.insert(4, ("matmul", Isa::Avx512Vnni.name(), "simd-int16"));
        }
        assert_eq!(ops, want);
        assert!(rep.rows.iter().all(|r| r.gbs > 0.0 && r.seconds > 0.0));
        // Int16 at each level, then int8.
        let errs = &rep.activation_error;
        assert_eq!(
            errs.len(),
            want.iter().filter(|w| w.0 == "matvec").count() - 1
        );
        for e in &errs[..errs.len() - 1] {
            assert_eq!(e.path, "simd-int16");
            assert!(e.max_over_range < 1e-4, "{e:?}");
        }
        assert_eq!(errs[errs.len() - 1].path, "simd-int8");
        assert!(errs[errs.len() - 1].max_over_range < 2e-2);
        assert!(rep.table().contains("expert-gate-up"));
    }
}

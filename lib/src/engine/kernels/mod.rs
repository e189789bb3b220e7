//! Matrix-vector (decode) and matrix-matrix (prefill) products over
//! [`Matrix`] weights, read in place.
//!
//! The public functions choose an implementation at run time ([`Isa`],
//! detected once and cached): on x86_64 CPUs with AVX-512 F/BW and VNNI the
//! int16-activation matvec of the private `avx512` module, with AVX2, FMA
//! and F16C the kernels of the private `avx2` module (which the AVX-512
//! level also uses for everything else), elsewhere the portable [`scalar`]
//! reference, which every faster kernel is tested against. NEON kernels are
//! not written yet: ARM CPUs run the scalar path.
//!
//! Quantized matrix-vector products have three SIMD paths ([`Path`]): f32
//! activations, or activations quantized per 32-element block to int16
//! (f32-grade accuracy) or int8 (as llama.cpp's Q8 dot products do) and
//! multiplied with integer instructions.
//! [`default_path`] picks one; `RH_ACTIVATIONS=f32|int16|int8|scalar` overrides it and
//! `RH_KERNELS=scalar|avx2|avx-vnni` caps the instruction set (`scalar`
//! forces the reference loops), as does strategy.toml's `kernel` through [`limit`]
//! (the lower cap wins); `RH_PREFETCH=<bytes>`
//! sets the software-prefetch distance of the matvec kernels. Matrix-matrix
//! products (prefill) with int16 activations on AVX-512 VNNI transpose
//! each block of 16 quantized weight rows into a tile with one row per
//! vector lane and multiply it with every token in integers (the private
//! `avx512_prefill` module); on the AVX2 level they do the same with tiles
//! of 16 rows of int16 weights and `vpmaddwd` (the private `avx2_prefill`
//! module), and on the AVX-VNNI level ([`Isa::AvxVnni`]: AVX2 plus 256-bit
//! VNNI) the same tiles with `vpdpwssd`; otherwise (dense weights, other paths) they use f32 activations
//! and convert each block of weight rows to f32 once per block of tokens.
//!
//! A few tokens (several sequences decoding together) take the small-batch
//! path instead: each token's matvec over blocks of rows, with each row
//! unpacked (int4/int8: the private `avx512_batch` module on AVX-512 VNNI,
//! `avx2_batch` with int16 activations on AVX2) or converted (dense, in column slices: `avx512_batch`, `avx2_batch`)
//! once for all the tokens; every token gets what its own matvec gives.
//!
//! Decode runs many small independent products per layer; [`matvec_batch`]
//! (and [`matmul_batch`] for code shared with prefill) runs a set of them in
//! one parallel region, so the pool is woken and joined once per set rather
//! than once per product.
//!
//! Invalid matrices (byte lengths that disagree with the shape, input or
//! group sizes that are not multiples of 32) are refused with a panic naming
//! the problem, never computed.

pub mod attn_prefill;
pub mod bench;
pub mod delta_rule;
pub mod isa;
pub mod scalar;
pub mod vector;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_batch;
#[cfg(target_arch = "x86_64")]
mod avx2_prefill;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_batch;
#[cfg(target_arch = "x86_64")]
mod avx512_prefill;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::tensor::Matrix;

pub use isa::Isa;

/// Rows handed to one rayon task by the scalar path.
const ROWS_PER_TASK: usize = 64;

/// The least weight bytes one SIMD matvec task reads: below this rayon's
/// scheduling cost (a few microseconds) would show.
const MIN_TASK_BYTES: usize = 32 << 10;

/// Tasks per thread for matvec: enough to even out a busy core, few enough
/// to keep batch-1 scheduling cheap on 2 to 64 threads.
const TASKS_PER_THREAD: usize = 4;

/// Tokens whose activations one matmul pass keeps in cache while a block of
/// weight rows is converted and multiplied (a multiple of the tile width).
#[cfg(target_arch = "x86_64")]
const TOKENS_PER_PASS: usize = 96;

/// Most tokens a matmul of dense weights runs as matvecs over blocks of
/// rows ([`matmul`]'s small-batch path: a few sequences decoding
/// together). Below this converting each block of weight rows to f32 for
/// the tiles costs more than the tokens reuse: at 4 tokens the BF16
/// lm_head took 4.4x a matvec that way, more than four matvecs.
pub const SMALL_BATCH_TOKENS: usize = 8;

/// The same for quantized weights, whose integer tiles pay off sooner: in
/// a batch of 8 decoding sequences the tiles were faster, and prefill's
/// experts, which meet a few tokens each but run side by side as one task
/// each (`matmul_one_task`), keep the tiles (pp256 lost a fifth of its
/// speed when they took this path). Measured again with the row-once
/// kernels at both levels (thread CPU time of one call, int8 12288x2048
/// and int4 shapes): rows win up to 4 tokens (AVX2 int8 at 4 tokens: 3.8
/// against 4.9 ms), the tiles from 6 (AVX-512 int8 at 8: 5.0 against 6.2),
/// except where the AVX-512 level's wide kernel takes int8 rows in one
/// pass (see [`WIDE_QUANT_TOKENS`]).
pub const SMALL_BATCH_QUANT_TOKENS: usize = 4;

/// Most tokens a split product of int8 weights takes through the rows
/// at the AVX-512 VNNI level ([`small_quant`]): from five on one pass of
/// the wide kernel reads and unpacks each row once for all of them. Thread
/// CPU time of one call on one thread, weights from memory, against the
/// tiles: int8 12288x2048 at 5 tokens 3.0 against 3.9 ms, 6: 3.4 / 4.2,
/// 7: 3.9 / 4.5, 8: 4.4 / 4.5; 2048x4096 at 8: 1.3 / 1.6. The int4 tiles
/// stay ahead at 8 tokens (12288x2048: 3.8 against 4.8 ms).
#[cfg(target_arch = "x86_64")]
pub const WIDE_QUANT_TOKENS: usize = 8;

/// The same at the AVX2 level (int16 activations), whose rows go in
/// passes of four tokens: one call's thread CPU time against the tiles,
/// int8 12288x2048 at 5 tokens 4.0 against 4.6 ms, 6: 4.4 / 4.9, 7: 5.1
/// / 5.2, 8: 5.8-5.9 / 5.5; 8192x2048 and 2048x4096 at 6: 2.9-3.2 /
/// 3.3, 1.5 / 1.6.
#[cfg(target_arch = "x86_64")]
pub const AVX2_ROW_QUANT_TOKENS: usize = 6;

/// Fewest columns an int8 product takes through the wide rows kernel: each
/// row and token ends with a zero-point term and a horizontal sum, which
/// short rows do not amortize (2048x512 at 8 tokens: 0.27 ms against the
/// tiles' 0.21).
#[cfg(target_arch = "x86_64")]
pub const WIDE_MIN_COLS: usize = 1024;

/// Most tokens a quantized matmul run as one task ([`matmul_one_task`]:
/// a routed expert beside the others) takes through the small-batch rows
/// rather than the tiles: at two tokens the row-once kernels took 0.5-0.75x
/// the tiles' thread CPU time (int4 and int8, both levels), at four the
/// AVX-512 level's int4 tiles were as fast, so prefill's experts, which
/// meet more tokens, keep the tiles.
#[cfg(target_arch = "x86_64")]
const ONE_TASK_ROW_TOKENS: usize = 2;

/// Weight bytes of one block of rows in the small-batch path: the block
/// stays in L2 while every token's matvec passes over it, so the weights
/// are read from memory once.
#[cfg(target_arch = "x86_64")]
const SMALL_BATCH_BLOCK_BYTES: usize = 256 << 10;

/// Columns of a matmul panel multiplied at a time (4 rows x 512 f32 = 8 KiB
/// of L1).
#[cfg(target_arch = "x86_64")]
const COLS_PER_SLICE: usize = 512;

/// How a product is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Path {
    /// The portable reference loops.
    Scalar,
    /// SIMD with f32 activations.
    SimdF32,
    /// SIMD with the activations quantized to int8 per 32-element block for
    /// quantized weights (dense weights and matmul use f32 activations).
    SimdInt8,
    /// SIMD with the activations quantized to int16 per 32-element block
    /// for quantized weights (dense weights and matmul use f32 activations).
    SimdInt16,
}

impl Path {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::SimdF32 => "simd-f32",
            Path::SimdInt8 => "simd-int8",
            Path::SimdInt16 => "simd-int16",
        }
    }
}

#[derive(Clone, Copy)]
enum Simd {
    None,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(avx512::Avx512),
}

impl Simd {
    fn isa(self) -> Isa {
        match self {
            Simd::None => Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(a) if a.vnni.is_some() => Isa::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(_) => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(_) => Isa::Avx512Vnni,
        }
    }

    /// The AVX2 kernels, at either SIMD level.
    #[cfg(target_arch = "x86_64")]
    fn avx2(self) -> Option<avx2::Avx2> {
        match self {
            Simd::None => None,
            Simd::Avx2(a) => Some(a),
            Simd::Avx512(a) => Some(a.avx2),
        }
    }
}

/// Every level this CPU runs, lowest first (whatever `RH_KERNELS` says).
fn levels() -> &'static [Simd] {
    static LEVELS: OnceLock<Vec<Simd>> = OnceLock::new();
    LEVELS.get_or_init(|| {
        #[allow(unused_mut)]
        let mut v = vec![Simd::None];
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = avx2::Avx2::detect() {
            v.push(Simd::Avx2(a));
            if let Some(av) = a.with_vnni() {
                v.push(Simd::Avx2(av));
            }
            if let Some(b) = avx512::Avx512::detect(a) {
                v.push(Simd::Avx512(b));
            }
        }
        v
    })
}

/// The cap [`limit`] set (`u8::MAX`: none yet).
static STRATEGY_CAP: AtomicU8 = AtomicU8::new(u8::MAX);

/// The level the public functions use: the highest this CPU runs, capped by
/// `RH_KERNELS` and by [`limit`] (strategy.toml's `kernel`), whichever is
/// lower. Fixed at the first product.
fn simd() -> Simd {
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        let cap = env_cap()
            .unwrap_or(Isa::Avx512Vnni)
            .min(strategy_cap().unwrap_or(Isa::Avx512Vnni));
        let all = levels();
        *all.iter().rev().find(|s| s.isa() <= cap).unwrap_or(&all[0])
    })
}

/// `RH_KERNELS=scalar|avx2|avx512` (anything else: no cap, and a warning).
fn env_cap() -> Option<Isa> {
    let v = crate::env::kernels_cap()?;
    let isa = Isa::parse(&v);
    if isa.is_none() {
        crate::env::kernels_cap_unknown(&v);
    }
    isa
}

fn strategy_cap() -> Option<Isa> {
    Isa::ALL
        .get(STRATEGY_CAP.load(Ordering::Relaxed) as usize)
        .copied()
}

/// Caps the level the kernels run at to `max` (serve and bench pass
/// strategy.toml's `kernel`, so a strategy written for a smaller machine, or
/// edited by hand, is obeyed). `RH_KERNELS` caps too; the lower cap wins.
/// It must come before the first product, which fixes the level: returns
/// the level in use once fixed, which is above `max` only when a product
/// already ran.
pub fn limit(max: Isa) -> Isa {
    STRATEGY_CAP.fetch_min(max as u8, Ordering::Relaxed);
    let now = simd().isa();
    if now > max {
        tracing::warn!(
            "kernels: {} already in use; the cap {} comes too late",
            now.name(),
            max.name()
        );
    }
    now
}

/// The instruction sets this CPU runs, lowest first, whatever
/// `RH_KERNELS` says (benchmarks and tests compare them).
pub fn isas() -> Vec<Isa> {
    levels().iter().map(|s| s.isa()).collect()
}

/// The instruction set the public functions use
/// (`"avx512-vnni"`, `"avx2+fma"` or `"scalar"`).
pub fn isa() -> &'static str {
    simd().isa().name()
}

/// The path [`matvec`] uses: `RH_ACTIVATIONS=f32`, `int16`, `int8` or
/// `scalar` when set, otherwise int16 activations.
///
/// Int16 activations (step `max|x| / 32767` per 32-element block, relative
/// error ~3e-5) are as accurate as f32 ones but let the weights meet them in
/// integer multiply-adds, skipping the per-element int-to-float conversion
/// that holds the f32 path's int4 matvec to about half the read bandwidth.
/// Int8 activations are faster still, but their error, compounded over the
/// layers, breaks the engine's quantized reference bound (7e-2 x logit
/// range on the gs32 fixture against 2e-2 allowed), so they are opt-in.
pub fn default_path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| match crate::env::activations().as_deref() {
        Some("int8") => Path::SimdInt8,
        Some("f32") => Path::SimdF32,
        Some("scalar") => Path::Scalar,
        None | Some("int16") => Path::SimdInt16,
        Some(other) => {
            crate::env::activations_unknown(other);
            Path::SimdInt16
        }
    })
}

/// Panics with a clear message when `w`'s bytes disagree with its shape.
fn validate(w: &Matrix) {
    let res = match w {
        Matrix::Quant(q) => q.check(),
        Matrix::Dense(d) => d.check(),
    };
    if let Err(e) = res {
        panic!(
            "kernels: invalid weight matrix [{}, {}]: {e}",
            w.rows(),
            w.cols()
        );
    }
}

/// `y = W x` for `W` `[rows, cols]`, `x` `[cols]`, `y` `[rows]`.
pub fn matvec(w: &Matrix, x: &[f32], y: &mut [f32]) {
    matvec_path(w, x, y, default_path())
}

/// [`matvec`] on a chosen path (the scalar one when the CPU lacks the SIMD
/// instructions).
pub fn matvec_path(w: &Matrix, x: &[f32], y: &mut [f32], path: Path) {
    matvec_on(simd(), w, x, y, path)
}

/// [`matvec_path`] at a chosen instruction-set level, one of [`isas`]
/// (for benchmarks and tests that compare levels).
pub fn matvec_isa(isa: Isa, w: &Matrix, x: &[f32], y: &mut [f32], path: Path) {
    let s = *levels()
        .iter()
        .find(|s| s.isa() == isa)
        .unwrap_or_else(|| panic!("kernels: {} is not available on this CPU", isa.name()));
    matvec_on(s, w, x, y, path)
}

fn matvec_on(s: Simd, w: &Matrix, x: &[f32], y: &mut [f32], path: Path) {
    assert_eq!(x.len(), w.cols(), "matvec: input length");
    assert_eq!(y.len(), w.rows(), "matvec: output length");
    validate(w);
    match (s, path) {
        (_, Path::Scalar) | (Simd::None, _) => scalar_matvec(w, x, y),
        #[cfg(target_arch = "x86_64")]
        (Simd::Avx512(a), Path::SimdInt16) => match w {
            Matrix::Quant(q) if avx512::Avx512::supports(q.bits, q.group_size) => {
                let v = avx2::QuantView::new(q).expect("validated");
                let act = a.group_act(x, q.bits, q.group_size);
                let rpt = rows_per_task(q.rows, q.row_bytes());
                for_row_chunks(y, rpt, |r0, ys| a.quant_rows(&v, r0, &act, ys));
            }
            _ => avx2_matvec(a.avx2, w, x, y, path),
        },
        #[cfg(target_arch = "x86_64")]
        (s, _) => avx2_matvec(s.avx2().expect("a SIMD level"), w, x, y, path),
    }
}

fn scalar_matvec(w: &Matrix, x: &[f32], y: &mut [f32]) {
    let prep = scalar::Prepared::new(w, x);
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(ci, ys)| {
            let r0 = ci * ROWS_PER_TASK;
            for (i, yr) in ys.iter_mut().enumerate() {
                *yr = scalar::dot_row(w, r0 + i, x, &prep);
            }
        });
}

/// Rows per matvec task: about [`TASKS_PER_THREAD`] tasks per thread, none
/// reading less than [`MIN_TASK_BYTES`].
fn rows_per_task(rows: usize, row_bytes: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (MIN_TASK_BYTES / row_bytes.max(1)).max(1);
    rows.div_ceil(threads * TASKS_PER_THREAD).max(min_rows)
}

/// Runs `f(first_row, outputs)` over chunks of `rpt` rows, inline when one
/// chunk covers everything.
#[cfg(target_arch = "x86_64")]
fn for_row_chunks(y: &mut [f32], rpt: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if y.len() <= rpt {
        f(0, y)
    } else {
        y.par_chunks_mut(rpt)
            .enumerate()
            .for_each(|(i, ys)| f(i * rpt, ys));
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_matvec(a: avx2::Avx2, w: &Matrix, x: &[f32], y: &mut [f32], path: Path) {
    match w {
        Matrix::Quant(q) => {
            let v = avx2::QuantView::new(q).expect("validated");
            let rpt = rows_per_task(q.rows, q.row_bytes());
            if path == Path::SimdInt8 {
                let act = avx2::Q8Act::new(x, q.bits, q.group_size);
                for_row_chunks(y, rpt, |r0, ys| a.quant_rows_q8(&v, r0, &act, ys));
            } else if path == Path::SimdInt16 {
                let act = a.q16_act(x, q.bits, q.group_size);
                for_row_chunks(y, rpt, |r0, ys| a.quant_rows_q16(&v, r0, &act, ys));
            } else {
                let gsum: Vec<f32> = x.chunks(q.group_size).map(|c| c.iter().sum()).collect();
                for_row_chunks(y, rpt, |r0, ys| a.quant_rows_f32(&v, r0, x, &gsum, ys));
            }
        }
        Matrix::Dense(d) => {
            let v = avx2::DenseView::new(d).expect("validated");
            let rpt = rows_per_task(d.rows, d.cols * d.dtype.size());
            for_row_chunks(y, rpt, |r0, ys| a.dense_rows(&v, r0, x, ys));
        }
    }
}

/// One product of a [`matvec_batch`] (`y = w x`) or [`matmul_batch`]
/// (`Y = X wᵀ`).
pub struct Product<'a> {
    /// The weights, `[rows, cols]`.
    pub w: &'a Matrix,
    /// The input, `[cols]` (`[n, cols]` for [`matmul_batch`]).
    pub x: &'a [f32],
    /// The output, `[rows]` (`[n, rows]` for [`matmul_batch`]).
    pub y: &'a mut [f32],
}

impl<'a> Product<'a> {
    /// `y = w x`.
    pub fn new(w: &'a Matrix, x: &'a [f32], y: &'a mut [f32]) -> Self {
        Product { w, x, y }
    }
}

/// Several independent matrix-vector products in one parallel region:
/// every job's rows are cut into tasks and all tasks share one fork-join,
/// instead of one per product (decode runs ~40 small products per layer,
/// and each fork-join wakes the pool and waits for its slowest thread).
/// Jobs that share an input slice share its quantized activations. Each
/// output row is computed exactly as [`matvec`] computes it.
pub fn matvec_batch(jobs: &mut [Product]) {
    matvec_batch_on(simd(), jobs, default_path())
}

/// [`matmul`] of each product over `n` tokens: one parallel region for
/// all of them when `n` is 1 (decode, [`matvec_batch`]), one product after
/// the other otherwise (each already spreads over the threads).
pub fn matmul_batch(products: &mut [Product], n: usize) {
    if n == 1 {
        matvec_batch(products)
    } else {
        for p in products.iter_mut() {
            matmul(p.w, p.x, n, p.y);
        }
    }
}

/// [`matvec_batch`] at a chosen level and path (tests compare them).
pub fn matvec_batch_isa(isa: Isa, jobs: &mut [Product], path: Path) {
    let s = *levels()
        .iter()
        .find(|s| s.isa() == isa)
        .unwrap_or_else(|| panic!("kernels: {} is not available on this CPU", isa.name()));
    matvec_batch_on(s, jobs, path)
}

fn matvec_batch_on(s: Simd, jobs: &mut [Product], path: Path) {
    for j in jobs.iter() {
        assert_eq!(j.x.len(), j.w.cols(), "matvec_batch: input length");
        assert_eq!(j.y.len(), j.w.rows(), "matvec_batch: output length");
        validate(j.w);
    }
    match (s, path) {
        (_, Path::Scalar) | (Simd::None, _) => {
            for j in jobs.iter_mut() {
                scalar_matvec(j.w, j.x, j.y);
            }
        }
        #[cfg(target_arch = "x86_64")]
        _ => batch::run(s, jobs, path),
    }
}

/// The SIMD body of [`matvec_batch`]: activations prepared once per input,
/// then one `par_iter` over every job's row chunks.
#[cfg(target_arch = "x86_64")]
mod batch {
    use rayon::prelude::*;

    use super::{avx2, avx512, Path, Product, Simd, MIN_TASK_BYTES, TASKS_PER_THREAD};
    use crate::tensor::Matrix;

    /// A job's weights as the kernels read them.
    enum View<'a> {
        Q(avx2::QuantView<'a>),
        D(avx2::DenseView<'a>),
    }

    /// A job's activations in the form its kernel takes.
    enum Act {
        Dense,
        F32(Vec<f32>),
        Q8(avx2::Q8Act),
        Q16(avx2::Q16Act),
        Group(avx512::GroupAct),
    }

    /// What decides an activation's form: the input and the weights' kind.
    #[derive(PartialEq)]
    struct Key {
        x: *const f32,
        len: usize,
        quant: Option<(u8, usize)>,
    }

    /// `alone`: the activations go to a one-token kernel (the AVX-512
    /// level's then also wants them split into bytes).
    fn prepare(s: Simd, w: &Matrix, x: &[f32], path: Path, alone: bool) -> Act {
        let a = s.avx2().expect("a SIMD level");
        match w {
            Matrix::Dense(_) => Act::Dense,
            Matrix::Quant(q) => match (s, path) {
                (Simd::Avx512(b), Path::SimdInt16)
                    if avx512::Avx512::supports(q.bits, q.group_size) =>
                {
                    Act::Group(if alone {
                        b.group_act(x, q.bits, q.group_size)
                    } else {
                        b.group_act_tokens(x, q.bits, q.group_size)
                    })
                }
                (_, Path::SimdInt8) => Act::Q8(avx2::Q8Act::new(x, q.bits, q.group_size)),
                (_, Path::SimdInt16) => Act::Q16(a.q16_act(x, q.bits, q.group_size)),
                _ => Act::F32(x.chunks(q.group_size).map(|c| c.iter().sum()).collect()),
            },
        }
    }

    /// Rows `r0..r0 + ys.len()` of one matvec, as [`super::matvec`]
    /// computes them.
    fn row_range(s: Simd, view: &View, act: &Act, x: &[f32], r0: usize, ys: &mut [f32]) {
        let a = s.avx2().expect("a SIMD level");
        match (view, act) {
            (View::D(v), _) => a.dense_rows(v, r0, x, ys),
            (View::Q(v), Act::Group(g)) => match s {
                Simd::Avx512(b) => b.quant_rows(v, r0, g, ys),
                _ => unreachable!("group activations only at the AVX-512 level"),
            },
            (View::Q(v), Act::Q8(q)) => a.quant_rows_q8(v, r0, q, ys),
            (View::Q(v), Act::Q16(q)) => a.quant_rows_q16(v, r0, q, ys),
            (View::Q(v), Act::F32(gsum)) => a.quant_rows_f32(v, r0, x, gsum, ys),
            (View::Q(_), Act::Dense) => unreachable!("dense activations for dense weights"),
        }
    }

    /// [`super::matmul`] of a few tokens (at most
    /// [`super::SMALL_BATCH_TOKENS`]) as one matvec per token over blocks
    /// of rows: each block's weights are read from memory once and stay in
    /// L2 while every token passes over them (on AVX-512 VNNI, and for dense
    /// weights at both levels, each row is unpacked or converted once for
    /// all the tokens). Every output row is computed
    /// exactly as [`super::matvec`] computes it for that token. The blocks
    /// spread over the threads unless `split` is false.
    pub(super) fn tokens(
        s: Simd,
        w: &Matrix,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        path: Path,
        split: bool,
    ) {
        let (rows, cols) = (w.rows(), w.cols());
        let view = match w {
            Matrix::Quant(q) => View::Q(avx2::QuantView::new(q).expect("validated")),
            Matrix::Dense(d) => View::D(avx2::DenseView::new(d).expect("validated")),
        };
        let padded = padded_copy(w, x, n, cols);
        let xs: Vec<&[f32]> = match &padded {
            Some((p, stride)) => p.chunks(*stride).map(|c| &c[..cols]).collect(),
            None => x.chunks_exact(cols).collect(),
        };
        let acts: Vec<Act> = xs
            .iter()
            .map(|xt| prepare(s, w, xt, path, n == 1))
            .collect();
        // The AVX-512 level's group activations, for its many-token kernel.
        let groups: Vec<&avx512::GroupAct> = acts
            .iter()
            .filter_map(|a| match a {
                Act::Group(g) => Some(g),
                _ => None,
            })
            .collect();
        // The int16 activations of the AVX2 kernels, for their many-token
        // kernel (AVX2 level, or weights the AVX-512 kernels do not take).
        let q16s: Vec<&avx2::Q16Act> = acts
            .iter()
            .filter_map(|a| match a {
                Act::Q16(q) => Some(q),
                _ => None,
            })
            .collect();
        let row_bytes = (w.bytes_read() / rows.max(1)).max(1);
        let threads = if split {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let rpt = rows
            .div_ceil(threads * TASKS_PER_THREAD)
            .min(super::SMALL_BATCH_BLOCK_BYTES / row_bytes)
            .max(1);
        let block = |b: usize| -> (usize, Vec<f32>) {
            let r0 = b * rpt;
            let nr = rpt.min(rows - r0);
            // Token-major: each token's outputs of the block are adjacent.
            let mut out = vec![0f32; n * nr];
            match (&view, s) {
                // Weights are unpacked or converted once for all tokens.
                (View::D(v), Simd::Avx512(b)) => b.dense_rows_tokens(v, r0, nr, &xs, &mut out),
                (View::Q(v), Simd::Avx512(b)) if n > 1 && groups.len() == n => {
                    b.quant_rows_tokens(v, r0, nr, &groups, &mut out)
                }
                (View::Q(v), _) if n > 1 && q16s.len() == n => s
                    .avx2()
                    .expect("a SIMD level")
                    .quant_rows_q16_tokens(v, r0, nr, &q16s, &mut out),
                (View::D(v), _) => s
                    .avx2()
                    .expect("a SIMD level")
                    .dense_rows_sliced(v, r0, nr, &xs, &mut out),
                (View::Q(_), _) => {
                    for (t, ot) in out.chunks_exact_mut(nr).enumerate() {
                        row_range(s, &view, &acts[t], xs[t], r0, ot);
                    }
                }
            }
            (r0, out)
        };
        let blocks: Vec<(usize, Vec<f32>)> = if split {
            (0..rows.div_ceil(rpt)).into_par_iter().map(block).collect()
        } else {
            (0..rows.div_ceil(rpt)).map(block).collect()
        };
        for (r0, out) in &blocks {
            let nr = out.len() / n;
            for t in 0..n {
                y[t * rows + r0..t * rows + r0 + nr].copy_from_slice(&out[t * nr..(t + 1) * nr]);
            }
        }
    }

    /// The dense kernels' tokens at a stride of a quarter of a 4 KiB
    /// page past a whole number of pages: tokens whose activations lie a
    /// multiple of 4 KiB apart (2048 columns of f32) share their L1 sets,
    /// so the eight tokens' slices fill those sets' eight ways and the
    /// weights streaming past evict them, while at this stride they spread
    /// over all the sets. `None` for one token or quantized weights (their
    /// activations are copies of their own).
    fn padded_copy(w: &Matrix, x: &[f32], n: usize, cols: usize) -> Option<(Vec<f32>, usize)> {
        if n < 2 || !matches!(w, Matrix::Dense(_)) {
            return None;
        }
        let page = 1024;
        let stride = cols.next_multiple_of(page) + page / 4;
        let mut p = vec![0f32; n * stride];
        for (d, s) in p.chunks_mut(stride).zip(x.chunks_exact(cols)) {
            d[..cols].copy_from_slice(s);
        }
        Some((p, stride))
    }

    pub(super) fn run(s: Simd, jobs: &mut [Product], path: Path) {
        let mut keys: Vec<Key> = Vec::new();
        let mut acts: Vec<Act> = Vec::new();
        let mut act_of: Vec<usize> = Vec::with_capacity(jobs.len());
        let mut views: Vec<View> = Vec::with_capacity(jobs.len());
        for j in jobs.iter() {
            let key = Key {
                x: j.x.as_ptr(),
                len: j.x.len(),
                quant: match j.w {
                    Matrix::Quant(q) => Some((q.bits, q.group_size)),
                    Matrix::Dense(_) => None,
                },
            };
            let i = match keys.iter().position(|k| *k == key) {
                Some(i) => i,
                None => {
                    keys.push(key);
                    acts.push(prepare(s, j.w, j.x, path, true));
                    acts.len() - 1
                }
            };
            act_of.push(i);
            views.push(match j.w {
                Matrix::Quant(q) => View::Q(avx2::QuantView::new(q).expect("validated")),
                Matrix::Dense(d) => View::D(avx2::DenseView::new(d).expect("validated")),
            });
        }
        // Every job's rows in chunks, all in one list of tasks: about
        // TASKS_PER_THREAD tasks per thread over all the bytes, none under
        // MIN_TASK_BYTES, so small matrices go whole to one thread and read
        // as one long stream.
        let total: usize = jobs.iter().map(|j| j.w.bytes_read()).sum();
        let threads = rayon::current_num_threads().max(1);
        let task_bytes = (total / (threads * TASKS_PER_THREAD)).max(MIN_TASK_BYTES);
        let xs: Vec<&[f32]> = jobs.iter().map(|j| j.x).collect();
        let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (ji, j) in jobs.iter_mut().enumerate() {
            let row_bytes = (j.w.bytes_read() / j.w.rows().max(1)).max(1);
            let rpt = (task_bytes / row_bytes).clamp(1, j.w.rows().max(1));
            for (ci, ys) in j.y.chunks_mut(rpt).enumerate() {
                tasks.push((ji, ci * rpt, ys));
            }
        }
        let work = |(ji, r0, ys): (usize, usize, &mut [f32])| {
            row_range(s, &views[ji], &acts[act_of[ji]], xs[ji], r0, ys)
        };
        if tasks.len() == 1 {
            tasks.into_iter().for_each(work);
        } else {
            tasks.into_par_iter().with_max_len(1).for_each(work);
        }
    }
}

/// `Y = X Wᵀ` for `n` tokens: `x` `[n, cols]`, `y` `[n, rows]`.
pub fn matmul(w: &Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_path(w, x, n, y, default_path())
}

/// [`matmul`] on a chosen path. One token goes through [`matvec_path`].
/// Int16 activations on the AVX-512 VNNI and AVX2 levels take quantized
/// weights through the integer tile kernels; everything else computes with f32
/// activations against weight rows converted to f32 once per block of
/// tokens.
pub fn matmul_path(w: &Matrix, x: &[f32], n: usize, y: &mut [f32], path: Path) {
    matmul_split(w, x, n, y, path, true)
}

/// [`matmul`] for callers that already keep every thread busy with
/// products of their own (MoE prefill runs its experts side by side): the
/// AVX-512 tile kernels then walk the rows as one task, so each tile's
/// prefetch of the next runs ahead of the same thread.
pub fn matmul_one_task(w: &Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_split(w, x, n, y, default_path(), false)
}

/// [`matmul_path`] at a chosen instruction-set level, one of [`isas`]
/// (for benchmarks and tests that compare levels).
pub fn matmul_isa(isa: Isa, w: &Matrix, x: &[f32], n: usize, y: &mut [f32], path: Path) {
    let s = *levels()
        .iter()
        .find(|s| s.isa() == isa)
        .unwrap_or_else(|| panic!("kernels: {} is not available on this CPU", isa.name()));
    matmul_on(s, w, x, n, y, path, true)
}

fn matmul_split(w: &Matrix, x: &[f32], n: usize, y: &mut [f32], path: Path, split: bool) {
    matmul_on(simd(), w, x, n, y, path, split)
}

fn matmul_on(s: Simd, w: &Matrix, x: &[f32], n: usize, y: &mut [f32], path: Path, split: bool) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "matmul: input length");
    assert_eq!(y.len(), n * rows, "matmul: output length");
    if n == 0 {
        return;
    }
    // One token as one task (`!split`) goes through the small-batch path
    // below (so do two, see ONE_TASK_ROW_TOKENS), whose blocks then run on
    // this thread: a routed expert that meets a token or two of a decoding
    // batch runs beside the other experts
    // instead of cutting its rows into tasks of its own.
    let scalar = matches!((s, path), (_, Path::Scalar) | (Simd::None, _));
    if n == 1 && (split || scalar) {
        return matvec_on(s, w, x, y, path);
    }
    validate(w);
    #[cfg(target_arch = "x86_64")]
    let small = match w {
        Matrix::Dense(_) => n <= SMALL_BATCH_TOKENS,
        Matrix::Quant(q) => small_quant(s, q, n, path, split),
    };
    if small && !scalar {
        // Matmul keeps f32 activations where decode would take int8 ones
        // (see `Path::SimdInt8`); one token is a decode.
        let path = if path == Path::SimdInt8 && n > 1 {
            Path::SimdF32
        } else {
            path
        };
        return batch::tokens(s, w, x, n, y, path, split);
    }
    match (s, path) {
        (_, Path::Scalar) | (Simd::None, _) => scalar_matmul(w, x, n, y),
        #[cfg(target_arch = "x86_64")]
        (Simd::Avx512(a), Path::SimdInt16) => match w {
            Matrix::Quant(q) => avx512_matmul(a, q, x, n, y, split),
            _ => avx2_matmul(a.avx2, w, x, n, y),
        },
        #[cfg(target_arch = "x86_64")]
        (Simd::Avx2(a), Path::SimdInt16) => match w {
            Matrix::Quant(q) => avx2_tile_matmul(a, q, x, n, y, split),
            _ => avx2_matmul(a, w, x, n, y),
        },
        #[cfg(target_arch = "x86_64")]
        (s, _) => avx2_matmul(s.avx2().expect("a SIMD level"), w, x, n, y),
    }
}

/// Whether a quantized matmul of `n` tokens (more than one) takes the
/// small-batch rows rather than the integer tiles: a few tokens (see
/// [`SMALL_BATCH_QUANT_TOKENS`], [`ONE_TASK_ROW_TOKENS`]), or at the
/// AVX-512 VNNI level with int16 activations up to [`WIDE_QUANT_TOKENS`]
/// (AVX2: [`AVX2_ROW_QUANT_TOKENS`]) split over the threads for int8 rows
/// of at least [`WIDE_MIN_COLS`] (a decoding batch's linears).
#[cfg(target_arch = "x86_64")]
fn small_quant(s: Simd, q: &crate::tensor::QuantMatrix, n: usize, path: Path, split: bool) -> bool {
    if n <= SMALL_BATCH_QUANT_TOKENS {
        return split || n <= ONE_TASK_ROW_TOKENS;
    }
    let most = match s {
        Simd::Avx512(_) if avx512::Avx512::supports(q.bits, q.group_size) => WIDE_QUANT_TOKENS,
        Simd::Avx512(_) | Simd::Avx2(_) => AVX2_ROW_QUANT_TOKENS,
        Simd::None => return false,
    };
    path == Path::SimdInt16 && split && q.bits == 8 && q.cols >= WIDE_MIN_COLS && n <= most
}

fn scalar_matmul(w: &Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let preps: Vec<scalar::Prepared> = (0..n)
        .map(|t| scalar::Prepared::new(w, &x[t * cols..(t + 1) * cols]))
        .collect();
    // Each task owns a block of weight rows and computes them for every token,
    // so each weight row is read once per call.
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let mut out = vec![0f32; (r1 - r0) * n];
            for r in r0..r1 {
                for t in 0..n {
                    out[(r - r0) * n + t] =
                        scalar::dot_row(w, r, &x[t * cols..(t + 1) * cols], &preps[t]);
                }
            }
            (r0, out)
        })
        .collect();
    scatter(&blocks, n, rows, y);
}

/// Writes per-block outputs (`[block rows, n]`) into `y` (`[n, rows]`).
fn scatter(blocks: &[(usize, Vec<f32>)], n: usize, rows: usize, y: &mut [f32]) {
    for (r0, out) in blocks {
        let nr = out.len() / n;
        for i in 0..nr {
            for t in 0..n {
                y[t * rows + r0 + i] = out[i * n + t];
            }
        }
    }
}

/// Rows per matmul task: a multiple of the tile height, small enough that a
/// task's weights stay in the core's cache across token passes.
#[cfg(target_arch = "x86_64")]
fn matmul_rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let r = rows
        .div_ceil(threads * TASKS_PER_THREAD)
        .clamp(avx2::TILE_R, 64);
    r.div_ceil(avx2::TILE_R) * avx2::TILE_R
}

#[cfg(target_arch = "x86_64")]
fn avx2_matmul(a: avx2::Avx2, w: &Matrix, x: &[f32], n: usize, y: &mut [f32]) {
    use avx2::{TILE_R, TILE_T};
    let (rows, cols) = (w.rows(), w.cols());
    enum View<'a> {
        Q(avx2::QuantView<'a>),
        D(avx2::DenseView<'a>),
    }
    let view = match w {
        Matrix::Quant(q) => View::Q(avx2::QuantView::new(q).expect("validated")),
        Matrix::Dense(d) => View::D(avx2::DenseView::new(d).expect("validated")),
    };
    let rpt = matmul_rows_per_task(rows);
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(rpt))
        .into_par_iter()
        .map(|bi| {
            let r0 = bi * rpt;
            let r1 = (r0 + rpt).min(rows);
            let mut out = vec![0f32; (r1 - r0) * n];
            let mut panel = vec![0f32; TILE_R * cols];
            for t0 in (0..n).step_by(TOKENS_PER_PASS) {
                let t1 = (t0 + TOKENS_PER_PASS).min(n);
                for p0 in (r0..r1).step_by(TILE_R) {
                    let nr = TILE_R.min(r1 - p0);
                    // Weight rows to f32 once per pass; the tiles then reuse
                    // them for every token of the pass from L1.
                    for (i, dst) in panel.chunks_exact_mut(cols).take(nr).enumerate() {
                        match &view {
                            View::Q(v) => a.quant_row_f32(v, p0 + i, dst),
                            View::D(v) => a.dense_row_f32(v, p0 + i, dst),
                        }
                    }
                    // Columns in slices that keep the panel's part in L1
                    // while the pass's tokens stream through.
                    for k0 in (0..cols).step_by(COLS_PER_SLICE) {
                        let kl = COLS_PER_SLICE.min(cols - k0);
                        let mut t = t0;
                        while t < t1 {
                            let nt = TILE_T.min(t1 - t);
                            a.tile(
                                &panel[k0..],
                                cols,
                                nr,
                                &x[t * cols + k0..],
                                cols,
                                nt,
                                kl,
                                &mut out[(p0 - r0) * n + t..],
                                n,
                            );
                            t += nt;
                        }
                    }
                }
            }
            (r0, out)
        })
        .collect();
    scatter(&blocks, n, rows, y);
}

/// The output of a tile matmul, shared by its tasks: `y` (`[n, rows]`),
/// of which each task writes only its own rows' columns.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the pointer is only written through by `tile_tasks`' tasks, each
// its own disjoint range of columns (see there).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
impl SharedOut {
    /// `k` values further on (forming the pointer is safe; writing through
    /// it is the caller's to justify).
    fn at(self, k: usize) -> SharedOut {
        SharedOut(self.0.wrapping_add(k))
    }
}

/// Tokens of one block of an integer-tile prefill: each tile multiplies
/// one block's tokens at a time and is re-made for the next block. A
/// 2048-token chunk of a long prompt then meets each tile as pp512 does
/// (2 MiB of activations at 2048 columns per tile, from L3) instead of
/// streaming 8 MiB per tile. Smaller blocks (activations in L2) measured no
/// faster in the multiplies and cost more in re-made tiles (the weights
/// read and transposed again per block).
#[cfg(target_arch = "x86_64")]
const TILE_TOKEN_BLOCK: usize = 512;

/// Runs integer-tile prefill over `rows` output rows: the rows go to tasks
/// of whole tiles (`tile_rows` each; one task unless `split`), each task
/// `run(first_row, rows, out)` writing its rows' columns of `y`
/// (`[n, rows]`, token-major) through `out`, which points at `y[first_row]`.
/// Writing `y` in place spares a block per task, its page faults and the
/// copy into `y` (a tenth of pp512 once).
#[cfg(target_arch = "x86_64")]
fn tile_tasks(
    rows: usize,
    n: usize,
    y: &mut [f32],
    tile_rows: usize,
    split: bool,
    run: impl Fn(usize, usize, SharedOut) + Sync,
) {
    assert_eq!(y.len(), n * rows, "tile_tasks: output length");
    let tiles = rows.div_ceil(tile_rows);
    let tasks = if split {
        rayon::current_num_threads().max(1) * TASKS_PER_THREAD
    } else {
        1
    };
    let tpt = tiles.div_ceil(tasks).max(1);
    let rpt = tpt * tile_rows;
    let base = SharedOut(y.as_mut_ptr());
    let task = |bi: usize| {
        let r0 = bi * rpt;
        // In bounds: r0 < rows.
        run(r0, rpt.min(rows - r0), base.at(r0));
    };
    let count = rows.div_ceil(rpt);
    if count == 1 {
        task(0);
    } else {
        (0..count).into_par_iter().for_each(task);
    }
}

/// One task of a tile matmul: its rows `r0..r0 + nr` of `v`, a tile of up
/// to `tile_rows` at a time, for every token in blocks of
/// [`TILE_TOKEN_BLOCK`]; `load` makes a tile, `multiply` writes it times a
/// block of tokens to `out` (the task's first column of `y`, rows `ldo`
/// apart).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tile_task<T>(
    r0: usize,
    nr: usize,
    n: usize,
    ldo: usize,
    tile_rows: usize,
    out: SharedOut,
    tile: &mut T,
    load: impl Fn(usize, usize, &mut T),
    multiply: impl Fn(&T, std::ops::Range<usize>, *mut f32),
) {
    let tb = TILE_TOKEN_BLOCK;
    for t0 in (0..n).step_by(tb) {
        let t1 = (t0 + tb).min(n);
        for i0 in (0..nr).step_by(tile_rows) {
            load(r0 + i0, tile_rows.min(nr - i0), tile);
            // In bounds: token t0's row of y, column r0 + i0 < rows.
            multiply(tile, t0..t1, out.at(t0 * ldo + i0).0);
        }
    }
}

/// Tiles kept on each thread between matmuls. A prefill makes a tile task
/// for each routed expert's three products (12,000 of them for 512 tokens
/// on the 8-layer bench model), and a fresh tile was a zeroed allocation
/// (32 KiB of weights at 2048 columns) that `tile_load` then rewrote: a
/// memset for nothing. A tile serves any matrix of its shape (its columns
/// and groups); every `tile_load` rewrites the rows it loads and their
/// scales, and a multiply reads only the tile's loaded rows' outputs, as
/// within one task already (the last tile of a task meets the rows left
/// over from the one before).
#[cfg(target_arch = "x86_64")]
struct TilePool;

#[cfg(target_arch = "x86_64")]
type TileStack<T> = std::cell::RefCell<Vec<T>>;

#[cfg(target_arch = "x86_64")]
thread_local! {
    static AVX512_TILES: TileStack<avx512_prefill::Tile> = const { std::cell::RefCell::new(Vec::new()) };
    static AVX2_TILES: TileStack<avx2_prefill::Tile> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
impl TilePool {
    /// Shapes a thread keeps tiles for (a model has a few: its experts'
    /// gate/up and down, its projections).
    const KEEP: usize = 6;

    /// A kept tile that `fits`, else a new one.
    fn take<T: 'static>(
        pool: &'static std::thread::LocalKey<TileStack<T>>,
        fits: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> T {
        let kept = pool.with_borrow_mut(|p| {
            let i = p.iter().position(&fits)?;
            Some(p.swap_remove(i))
        });
        kept.unwrap_or_else(make)
    }

    /// Keeps `tile` for the next task on this thread (the oldest goes
    /// beyond [`TilePool::KEEP`]).
    fn put<T: 'static>(pool: &'static std::thread::LocalKey<TileStack<T>>, tile: T) {
        pool.with_borrow_mut(|p| {
            if p.len() >= Self::KEEP {
                p.remove(0);
            }
            p.push(tile);
        });
    }
}

/// Prefill on the AVX-512 VNNI level: every token's activations quantized
/// to int16 per group, then each task (one unless `split`) transposes its
/// blocks of 16 weight rows into tiles, one at a time, and multiplies each
/// tile with every token (of a block, [`TILE_TOKEN_BLOCK`]) while it sits
/// in L2.
#[cfg(target_arch = "x86_64")]
fn avx512_matmul(
    a: avx512::Avx512,
    q: &crate::tensor::QuantMatrix,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    split: bool,
) {
    use avx512_prefill::{Tile, TILE_ROWS};
    let v = avx2::QuantView::new(q).expect("validated");
    let acts = a.split_acts(x, n, q.cols, q.bits, q.group_size);
    let rows = q.rows;
    tile_tasks(rows, n, y, TILE_ROWS, split, |r0, nr, out| {
        let mut tile = TilePool::take(&AVX512_TILES, |t| t.fits(&v), || Tile::new(&v));
        let load = |r, k, t: &mut Tile| a.tile_load(&v, r, k, t);
        // SAFETY: `out` points at column `r0 + i0` of token `t0`'s row of
        // `y` (`[n, rows]`, checked by `tile_tasks`); a tile writes its
        // rows, inside this task's `r0..r0 + nr`, which no other task
        // touches, for tokens `t0..t1 <= n`.
        let mul = |t: &Tile, ts, o| unsafe { a.tile_multiply(t, &acts, ts, o, rows) };
        tile_task(r0, nr, n, rows, TILE_ROWS, out, &mut tile, load, mul);
        TilePool::put(&AVX512_TILES, tile);
    });
}

/// Prefill on the AVX2 level, as on AVX-512 with tiles of 16 rows of
/// int16 weights multiplied in `vpmaddwd` (the `avx2_prefill` module).
#[cfg(target_arch = "x86_64")]
fn avx2_tile_matmul(
    a: avx2::Avx2,
    q: &crate::tensor::QuantMatrix,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    split: bool,
) {
    use avx2_prefill::{Tile, TILE_ROWS};
    let v = avx2::QuantView::new(q).expect("validated");
    let acts = a.pair_acts(x, n, q.cols, q.bits, q.group_size);
    let rows = q.rows;
    tile_tasks(rows, n, y, TILE_ROWS, split, |r0, nr, out| {
        let mut tile = TilePool::take(&AVX2_TILES, |t| t.fits(&v), || Tile::new(&v));
        let load = |r, k, t: &mut Tile| a.tile_load(&v, r, k, t);
        // SAFETY: as in `avx512_matmul`.
        let mul = |t: &Tile, ts, o| unsafe { a.tile_multiply(t, &acts, ts, o, rows) };
        tile_task(r0, nr, n, rows, TILE_ROWS, out, &mut tile, load, mul);
        TilePool::put(&AVX2_TILES, tile);
    });
}

/// Row `r` of `W` as f32 (embedding lookup), converted in place from the
/// mapped bytes.
pub fn row(w: &Matrix, r: usize, out: &mut [f32]) {
    assert!(r < w.rows(), "row: index {r} out of {} rows", w.rows());
    assert_eq!(out.len(), w.cols(), "row: output length");
    validate(w);
    #[cfg(target_arch = "x86_64")]
    let simd = simd().avx2();
    #[cfg(not(target_arch = "x86_64"))]
    let simd: Option<()> = None;
    match simd {
        #[cfg(target_arch = "x86_64")]
        Some(a) => match w {
            Matrix::Quant(q) => {
                a.quant_row_f32(&avx2::QuantView::new(q).expect("validated"), r, out)
            }
            Matrix::Dense(d) => {
                a.dense_row_f32(&avx2::DenseView::new(d).expect("validated"), r, out)
            }
        },
        _ => scalar::row(w, r, out),
    }
}

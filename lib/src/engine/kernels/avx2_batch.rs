//! AVX2 kernels for a few tokens at once (several sequences decoding
//! together, [`super::matmul`]'s small-batch path): dense weights (the
//! BF16 lm_head above all) and int4/int8 weights with int16 activations.
//!
//! Quantized rows are read and unpacked once and multiplied into up to
//! [`QUANT_PASS`] tokens' accumulators with `vpmaddwd`; more tokens go in
//! further passes over a block of [`QUANT_BLOCK_ROWS`] rows, then in L2.
//! (The small-batch path sends up to 6 tokens of int8 rows of 1024 columns
//! or more here, else at most 4: beyond, the prefill tiles are cheaper.)
//! Every token's result is
//! what its lone `quant_rows_q16` gives, bit for bit: the integer sums per
//! block are exact, and each token's floats see the same conversions and
//! FMAs in the same order as that kernel (`dot_q16_i4_paired` /
//! `dot_q16_row_bits`).
//!
//! Dense weights:
//! Rows go in blocks of [`BLOCK_ROWS`], columns in slices of [`SLICE`]:
//! while a block's slice is in L1, every token passes over it, so each
//! token's activations are read from L1 (a slice of eight tokens' f32
//! activations is 8 KiB) rather than streamed from L2 once per row, which
//! is what a whole row per token cost from three tokens on (each token's
//! activations are 8 KiB on a 2048-column matrix). Every token's result is
//! what its lone `dense_rows` gives, bit for bit: each keeps `dot_dense`'s
//! four 8-lane accumulators, stored between slices, and adds them up in
//! its order. Two rows go together, so each activation vector loaded
//! serves both (loads, not FMAs, were what a row at a time ran out of).
//!
//! Safety: as in the `avx2` module. An [`Avx2`] exists only after its
//! `detect` saw the features on the running CPU; the view was checked
//! against its shape, and the safe wrapper checks row ranges, activation
//! lengths and the output size before any pointer is formed. Only
//! unaligned loads are used.

// Token indices pick both an accumulator and that token's pointer.
#![allow(clippy::needless_range_loop)]
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use crate::kernels::isa::avx2_fn;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::avx2::{
    dense_block_row, f16_at, hsum, load1, load8, prefetch_l2, Avx2, DenseView, Q16Act, QuantView,
    DT_BF16, DT_F16, DT_F32,
};
use crate::tensor::{FloatType, QBLOCK};

/// Most tokens one call takes (the small-batch path's limit).
pub(crate) const MAX_TOKENS: usize = super::SMALL_BATCH_TOKENS;

/// Tokens one pass over a pair of row slices multiplies: one of their four
/// accumulators each for both rows, the two rows' weights and an
/// activation vector take 11 of the 16 vector registers.
const PASS_TOKENS: usize = 4;

/// Rows whose accumulators a block keeps between slices.
const BLOCK_ROWS: usize = 8;

/// Columns of a slice.
const SLICE: usize = 256;

/// Every token's accumulators for every row of a block.
type Acc = [[[MaybeUninit<__m256>; 4]; MAX_TOKENS]; BLOCK_ROWS];

/// Tokens one pass over a quantized row multiplies: their two block
/// accumulators each and the unpacked weights fill the 16 vector
/// registers (the group totals live on the stack, touched once a group).
pub(crate) const QUANT_PASS: usize = 4;

/// Rows of a quantized block: every pass of tokens walks the block's
/// rows, the first from memory, the others from L2 (16 rows of int8 are
/// 32 KiB on 2048 columns), while each pass's activations (four tokens'
/// int16, 16 KiB on 2048 columns) stay in L1. One pass of eight tokens
/// per row would have every row walk 32 KiB of activations, out of L1.
const QUANT_BLOCK_ROWS: usize = 16;

/// Calls `$f::<T>($args)` for the token count `$n` (1 to [`QUANT_PASS`]).
macro_rules! by_pass {
    ($n:expr, $f:ident $(::<$b:literal>)?, $args:expr) => {
        match $n {
            1 => $f::<$($b,)? 1>($args),
            2 => $f::<$($b,)? 2>($args),
            3 => $f::<$($b,)? 3>($args),
            _ => $f::<$($b,)? 4>($args),
        }
    };
}

impl Avx2 {
    /// `out[t * nr + i] = row (r0 + i) · xs[t]` for `nr` rows of a dense
    /// matrix and up to [`MAX_TOKENS`] tokens: what [`Avx2::dense_rows`]
    /// gives each token, bit for bit.
    pub(crate) fn dense_rows_sliced(
        self,
        v: &DenseView,
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        assert!(r0 + nr <= v.rows, "rows out of range");
        assert!(
            !xs.is_empty() && xs.len() <= MAX_TOKENS,
            "1 to {MAX_TOKENS} tokens"
        );
        assert!(xs.iter().all(|x| x.len() == v.cols));
        assert_eq!(out.len(), nr * xs.len());
        let es = v.dtype.size();
        let n = xs.len();
        let mut ptrs = [xs[0].as_ptr(); MAX_TOKENS];
        for (p, x) in ptrs.iter_mut().zip(xs) {
            *p = x.as_ptr();
        }
        for b0 in (0..nr).step_by(BLOCK_ROWS) {
            let rows = BLOCK_ROWS.min(nr - b0);
            let first = (r0 + b0) * v.cols * es;
            let block = v.data[first..first + rows * v.cols * es].as_ptr();
            let mut dots = [[0f32; MAX_TOKENS]; BLOCK_ROWS];
            // SAFETY: `block` holds `rows` rows of `cols` elements of
            // `dtype`, and the first `n` pointers each `cols` floats
            // (asserted); features proven by `self`.
            unsafe {
                let args = (block, rows, &ptrs, n, v.cols, &mut dots);
                match v.dtype {
                    FloatType::BF16 => dense_block::<DT_BF16>(args),
                    FloatType::F16 => dense_block::<DT_F16>(args),
                    FloatType::F32 => dense_block::<DT_F32>(args),
                }
            }
            for (i, d) in dots.iter().take(rows).enumerate() {
                for t in 0..n {
                    out[t * nr + b0 + i] = d[t];
                }
            }
        }
    }
}

impl Avx2 {
    /// `out[t * nr + i] = row (r0 + i) · x_t` for `nr` rows of a quantized
    /// matrix and the tokens whose int16 activations `acts` holds (from
    /// [`Avx2::q16_act`]): what [`Avx2::quant_rows_q16`] gives each token,
    /// bit for bit, with each row read and unpacked once per
    /// [`QUANT_PASS`] tokens.
    pub(crate) fn quant_rows_q16_tokens(
        self,
        v: &QuantView,
        r0: usize,
        nr: usize,
        acts: &[&Q16Act],
        out: &mut [f32],
    ) {
        assert!(r0 + nr <= v.rows, "rows out of range");
        assert!(v.bits == 4 || v.bits == 8, "int4 or int8 weights");
        assert_eq!(out.len(), nr * acts.len());
        let paired = v.bits == 4 && v.group_size % 64 == 0;
        for a in acts {
            assert!(a.xq.len() == v.cols && a.gsum.len() == v.n_groups);
            assert!(a.d.len() == v.cols / QBLOCK && a.d4.len() == 4 * a.d.len());
            assert!(a.group_size == v.group_size && a.paired == paired);
        }
        let n = acts.len();
        assert!(n <= MAX_TOKENS, "at most {MAX_TOKENS} tokens");
        let gsums: Vec<&[f32]> = acts.iter().map(|a| &a.gsum[..]).collect();
        // Each token's two group totals per row of a block, as
        // `dot_q16_*` keeps them in registers (lanes 0..8 and 8..16).
        let mut tot = vec![[0f32; 16]; QUANT_BLOCK_ROWS * n];
        for b0 in (0..nr).step_by(QUANT_BLOCK_ROWS) {
            let rows = QUANT_BLOCK_ROWS.min(nr - b0);
            tot.fill([0f32; 16]);
            let mut t0 = 0;
            while t0 < n {
                let nt = (n - t0).min(QUANT_PASS);
                let pass = &acts[t0..t0 + nt];
                for i in 0..rows {
                    let r = r0 + b0 + i;
                    // The first pass reads the block from memory while it
                    // prefetches the next block into L2 in address order
                    // (row i's bytes map to the next block's row i; a
                    // prefetch never faults, past the end too); later
                    // passes find the block in L2 and hint lines already
                    // there.
                    let pf = if t0 == 0 {
                        v.q.as_ptr().wrapping_add((r + rows) * v.row_bytes)
                    } else {
                        v.q.as_ptr().wrapping_add(r * v.row_bytes)
                    };
                    let tots = &mut tot[i * n + t0..i * n + t0 + nt];
                    // SAFETY: `self` proves AVX2/FMA/F16C; the row is in
                    // range, the groups are the view's, and every
                    // activation's lengths and layout match the view's
                    // checked shape (asserted above); `tots` holds one
                    // entry per token of the pass.
                    unsafe {
                        let args = (v, r, 0, v.n_groups, pf, pass, tots);
                        if paired {
                            by_pass!(nt, dot_i4_paired_tokens, args)
                        } else if v.bits == 4 {
                            by_pass!(nt, dot_bits_tokens::<4>, args)
                        } else {
                            by_pass!(nt, dot_bits_tokens::<8>, args)
                        }
                    }
                }
                t0 += nt;
            }
            for i in 0..rows {
                let r = r0 + b0 + i;
                let mut z = [0f32; MAX_TOKENS];
                self.zero_corrections(v, r, &gsums, &mut z[..n]);
                for t in 0..n {
                    // SAFETY: features proven by `self`.
                    let dot = unsafe { finish(&tot[i * n + t]) };
                    out[t * nr + b0 + i] = dot + z[t];
                }
            }
        }
    }
}

/// The arguments of the quantized kernels: the view, the row, the groups
/// `g0..g1` to multiply, where to prefetch for group `g0`'s first byte
/// (later bytes follow), the pass's activations, and its tokens' group
/// totals (carried from call to call).
type QuantArgs<'a, 'b> = (
    &'a QuantView<'b>,
    usize,
    usize,
    usize,
    *const u8,
    &'a [&'a Q16Act],
    &'a mut [[f32; 16]],
);

avx2_fn! {
/// The two halves of one block's weights widened to i16: elements 0..16
/// and 16..32 (an int4 block's low and high nibbles, an int8 block's two
/// 16-byte halves).
#[inline]
unsafe fn unpack_q16<const BITS: usize>(qp: *const u8) -> (__m256i, __m256i) {
    if BITS == 4 {
        let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(qp as *const __m128i));
        (_mm256_and_si256(w, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(w, 4))
    } else {
        (
            _mm256_cvtepu8_epi16(_mm_loadu_si128(qp as *const __m128i)),
            _mm256_cvtepu8_epi16(_mm_loadu_si128(qp.add(16) as *const __m128i)),
        )
    }
}

/// One block's products with the int16 activations at `xp` as f32 lanes:
/// the block sum `block_q16` gives (exact in i32), converted.
#[inline]
unsafe fn block_f32(w: (__m256i, __m256i), xp: *const i16) -> __m256 {
    let x0 = _mm256_loadu_si256(xp as *const __m256i);
    let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
    _mm256_cvtepi32_ps(_mm256_add_epi32(
        _mm256_madd_epi16(w.0, x0),
        _mm256_madd_epi16(w.1, x1),
    ))
}

/// Token `t`'s group totals from `tot[t]`.
#[inline]
unsafe fn load_tots<const T: usize>(tot: &[[f32; 16]]) -> ([__m256; T], [__m256; T]) {
    (
        std::array::from_fn(|t| _mm256_loadu_ps(tot[t].as_ptr())),
        std::array::from_fn(|t| _mm256_loadu_ps(tot[t].as_ptr().add(8))),
    )
}

#[inline]
unsafe fn store_tots<const T: usize>(tot: &mut [[f32; 16]], tot0: [__m256; T], tot1: [__m256; T]) {
    for t in 0..T {
        _mm256_storeu_ps(tot[t].as_mut_ptr(), tot0[t]);
        _mm256_storeu_ps(tot[t].as_mut_ptr().add(8), tot1[t]);
    }
}

/// The dot product from a token's two group totals, as `dot_q16_*` ends.
unsafe fn finish(tot: &[f32; 16]) -> f32 {
    hsum(_mm256_add_ps(
        _mm256_loadu_ps(tot.as_ptr()),
        _mm256_loadu_ps(tot.as_ptr().add(8)),
    ))
}

/// Groups `g0..g1` of row `r` of an int4 matrix with pair-interleaved
/// activations times `T` tokens, into their group totals: for each token
/// what `dot_q16_i4_paired` does over those groups, step for step (the
/// two block accumulators, swapped after every pair, and the two totals).
unsafe fn dot_i4_paired_tokens<const T: usize>(args: QuantArgs) {
    let (v, r, g0, g1, pf, acts, tot) = args;
    let first = g0 * v.group_size * v.bits as usize / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq: [*const i16; T] = std::array::from_fn(|t| acts[t].xq.as_ptr());
    let d4: [*const f32; T] = std::array::from_fn(|t| acts[t].d4.as_ptr());
    let m = _mm256_set1_epi16(0x0F);
    let (mut tot0, mut tot1) = load_tots::<T>(tot);
    for g in g0..g1 {
        let b0 = g * bpg;
        let b1 = (b0 + bpg).min(nb);
        let mut acc0 = [_mm256_setzero_ps(); T];
        let mut acc1 = [_mm256_setzero_ps(); T];
        let mut b = b0;
        while b + 1 < b1 {
            prefetch_l2(pf.wrapping_add(b * 16 - first));
            let w = _mm256_loadu_si256(qrow.add(b * 16) as *const __m256i);
            let w0 = _mm256_and_si256(w, m);
            let w1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
            let w2 = _mm256_and_si256(_mm256_srli_epi16(w, 8), m);
            let w3 = _mm256_srli_epi16(w, 12);
            for t in 0..T {
                let xp = xq[t].add(b * QBLOCK);
                let p01 = _mm256_add_epi32(
                    _mm256_madd_epi16(w0, _mm256_loadu_si256(xp as *const __m256i)),
                    _mm256_madd_epi16(w1, _mm256_loadu_si256(xp.add(16) as *const __m256i)),
                );
                let p23 = _mm256_add_epi32(
                    _mm256_madd_epi16(w2, _mm256_loadu_si256(xp.add(32) as *const __m256i)),
                    _mm256_madd_epi16(w3, _mm256_loadu_si256(xp.add(48) as *const __m256i)),
                );
                let i = _mm256_cvtepi32_ps(_mm256_add_epi32(p01, p23));
                acc0[t] = _mm256_fmadd_ps(i, _mm256_loadu_ps(d4[t].add(b * 4)), acc0[t]);
            }
            std::mem::swap(&mut acc0, &mut acc1);
            b += 2;
        }
        if b < b1 {
            // The row's last block when the row has an odd number of blocks.
            let w = unpack_q16::<4>(qrow.add(b * 16));
            for t in 0..T {
                let i = block_f32(w, xq[t].add(b * QBLOCK));
                acc0[t] = _mm256_fmadd_ps(i, _mm256_set1_ps(*acts[t].d.as_ptr().add(b)), acc0[t]);
            }
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        for t in 0..T {
            tot0[t] = _mm256_fmadd_ps(s, acc0[t], tot0[t]);
            tot1[t] = _mm256_fmadd_ps(s, acc1[t], tot1[t]);
        }
    }
    store_tots::<T>(tot, tot0, tot1);
}

/// Groups `g0..g1` of row `r` of a `BITS`-bit matrix with plainly stored
/// activations times `T` tokens, into their group totals: for each token
/// what `dot_q16_row_bits` does over those groups, step for step.
unsafe fn dot_bits_tokens<const BITS: usize, const T: usize>(args: QuantArgs) {
    let (v, r, g0, g1, pf, acts, tot) = args;
    let first = g0 * v.group_size * v.bits as usize / 8;
    let bb = QBLOCK * BITS / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq: [*const i16; T] = std::array::from_fn(|t| acts[t].xq.as_ptr());
    let d: [*const f32; T] = std::array::from_fn(|t| acts[t].d.as_ptr());
    let (mut tot0, mut tot1) = load_tots::<T>(tot);
    for g in g0..g1 {
        let mut b = g * bpg;
        let b1 = (b + bpg).min(nb);
        let mut acc0 = [_mm256_setzero_ps(); T];
        let mut acc1 = [_mm256_setzero_ps(); T];
        while b + 1 < b1 {
            prefetch_l2(pf.wrapping_add(b * bb - first));
            let wa = unpack_q16::<BITS>(qrow.add(b * bb));
            let wb = unpack_q16::<BITS>(qrow.add((b + 1) * bb));
            for t in 0..T {
                let p0 = block_f32(wa, xq[t].add(b * QBLOCK));
                let p1 = block_f32(wb, xq[t].add((b + 1) * QBLOCK));
                acc0[t] = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d[t].add(b)), acc0[t]);
                acc1[t] = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(&*d[t].add(b + 1)), acc1[t]);
            }
            b += 2;
        }
        if b < b1 {
            let wa = unpack_q16::<BITS>(qrow.add(b * bb));
            for t in 0..T {
                let p0 = block_f32(wa, xq[t].add(b * QBLOCK));
                acc0[t] = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d[t].add(b)), acc0[t]);
            }
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        for t in 0..T {
            tot0[t] = _mm256_fmadd_ps(s, acc0[t], tot0[t]);
            tot1[t] = _mm256_fmadd_ps(s, acc1[t], tot1[t]);
        }
    }
    store_tots::<T>(tot, tot0, tot1);
}
}

/// The arguments of [`dense_block`]: the first of `rows` contiguous rows,
/// the tokens' activations and their count, the columns, and `dots[i][t]`.
type BlockArgs<'a> = (
    *const u8,
    usize,
    &'a [*const f32; MAX_TOKENS],
    usize,
    usize,
    &'a mut [[f32; MAX_TOKENS]; BLOCK_ROWS],
);

avx2_fn! {
/// `dot_dense` of `rows` rows with `tokens` tokens, slice by slice and, in
/// each slice, two rows at a time in passes of [`PASS_TOKENS`] tokens.
unsafe fn dense_block<const DT: u8>(args: BlockArgs) {
    let (w, rows, xs, tokens, n, dots) = args;
    let es = if DT == DT_F32 { 4 } else { 2 };
    let stride = n * es;
    let n32 = n / 32 * 32;
    // Not zeroed (8 KiB a block of rows, 155 MB a call on the lm_head):
    // the first slice starts its accumulators from zero and writes them.
    let mut acc: Acc = [[[MaybeUninit::uninit(); 4]; MAX_TOKENS]; BLOCK_ROWS];
    let at = |i: usize| dense_block_row(w, i, stride, BLOCK_ROWS);
    let mut k0 = 0;
    while k0 < n32 {
        let k1 = (k0 + SLICE).min(n32);
        let mut i = 0;
        while i < rows {
            let r = if i + 2 <= rows { 2 } else { 1 };
            let (r0, n0) = at(i);
            let (r1, n1) = at(i + r - 1);
            let mut t0 = 0;
            while t0 < tokens {
                let args = (&xs[t0..], (k0, k1), t0 == 0, t0);
                let acc = &mut acc[i..i + r];
                match (r, tokens - t0) {
                    (2, 1) => slice_rows::<DT, 1, 2>([r0, r1], [n0, n1], args, acc),
                    (2, 2) => slice_rows::<DT, 2, 2>([r0, r1], [n0, n1], args, acc),
                    (2, 3) => slice_rows::<DT, 3, 2>([r0, r1], [n0, n1], args, acc),
                    (2, _) => slice_rows::<DT, 4, 2>([r0, r1], [n0, n1], args, acc),
                    (_, 1) => slice_rows::<DT, 1, 1>([r0], [n0], args, acc),
                    (_, 2) => slice_rows::<DT, 2, 1>([r0], [n0], args, acc),
                    (_, 3) => slice_rows::<DT, 3, 1>([r0], [n0], args, acc),
                    _ => slice_rows::<DT, 4, 1>([r0], [n0], args, acc),
                }
                t0 += PASS_TOKENS;
            }
            i += r;
        }
        k0 = k1;
    }
    for (i, ai) in acc.iter().take(rows).enumerate() {
        let row = w.add(i * stride);
        for t in 0..tokens {
            let x = xs[t];
            // SAFETY: with a slice at all (`n32 > 0`), the first wrote
            // every accumulator of rows `..rows` and tokens `..tokens`.
            let [mut a0, a1, a2, a3] = if n32 == 0 {
                [_mm256_setzero_ps(); 4]
            } else {
                ai[t].map(|a| a.assume_init())
            };
            let mut k = n32;
            while k + 8 <= n {
                a0 = _mm256_fmadd_ps(load8::<DT>(row.add(k * es)), _mm256_loadu_ps(x.add(k)), a0);
                k += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            while k < n {
                s += load1::<DT>(row.add(k * es)) * *x.add(k);
                k += 1;
            }
            dots[i][t] = s;
        }
    }
}

/// Columns `k0..k1` (whole 32-column steps) of `R` rows into the
/// accumulators `acc[r][t0 + t]` of `T` tokens (`xs[t]`), one of
/// `dot_dense`'s four accumulators at a time: accumulator `j` sees only
/// columns `k + 8j .. k + 8j + 8` of each step, so walking them one after
/// the other keeps every lane's FMAs in order. Each activation vector
/// loaded serves all `R` rows; the first pass of tokens prefetches where
/// the rows are read next.
#[inline]
unsafe fn slice_rows<const DT: u8, const T: usize, const R: usize>(
    rows: [*const u8; R],
    next: [*const u8; R],
    (xs, (k0, k1), first, t0): (&[*const f32], (usize, usize), bool, usize),
    acc: &mut [[[MaybeUninit<__m256>; 4]; MAX_TOKENS]],
) {
    let es = if DT == DT_F32 { 4 } else { 2 };
    let x: [*const f32; T] = std::array::from_fn(|t| xs[t]);
    for j in 0..4 {
        // The first slice starts from zero (what adding to 0.0 gives);
        // later ones continue what it wrote.
        let mut a: [[__m256; T]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|t| {
                if k0 == 0 {
                    _mm256_setzero_ps()
                } else {
                    acc[r][t0 + t][j].assume_init()
                }
            })
        });
        let mut k = k0;
        while k < k1 {
            if first && j == 0 {
                for r in 0..R {
                    prefetch_l2(next[r].wrapping_add(k * es));
                    if es == 4 {
                        prefetch_l2(next[r].wrapping_add(k * es + 64));
                    }
                }
            }
            let c = k + 8 * j;
            let wv: [__m256; R] = std::array::from_fn(|r| load8::<DT>(rows[r].add(c * es)));
            for t in 0..T {
                let xv = _mm256_loadu_ps(x[t].add(c));
                for r in 0..R {
                    a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
                }
            }
            k += 32;
        }
        for r in 0..R {
            for t in 0..T {
                acc[r][t0 + t][j] = MaybeUninit::new(a[r][t]);
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::tests::{
        activation_bound, assert_close, dense_f32, rand_dense, rand_quant, rand_x, scalar_y,
    };
    use super::*;
    use crate::tensor::Matrix;

    /// Every token count gives each token exactly `dense_rows` (the lone
    /// matvec) and stays within f32 rounding of the scalar reference; on
    /// rows spanning several slices, tails of 8 and of single elements,
    /// and row counts around the block.
    #[test]
    fn sliced_dense_rows_are_each_tokens_rows_and_match_scalar() {
        let Some(a) = Avx2::detect() else { return };
        let mut rng = StdRng::seed_from_u64(61);
        let shapes = [
            (FloatType::BF16, 19usize, 600usize),
            (FloatType::BF16, 8, 2048),
            (FloatType::F16, 9, 517),
            (FloatType::F32, 17, 300),
            (FloatType::BF16, 3, 31),
        ];
        for (case, (dtype, rows, cols)) in shapes.into_iter().enumerate() {
            let d = rand_dense(&mut rng, rows, cols, dtype);
            let v = DenseView::new(&d).unwrap();
            let w = Matrix::Dense(d.clone());
            let wf = dense_f32(&w);
            for n in 1..=MAX_TOKENS {
                let x = rand_x(&mut rng, n * cols);
                let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
                let (r0, nr) = (1, rows - 1);
                let mut got = vec![0f32; n * nr];
                a.dense_rows_sliced(&v, r0, nr, &xs, &mut got);
                for (t, xt) in xs.iter().enumerate() {
                    let got = &got[t * nr..(t + 1) * nr];
                    let what = format!("case {case}: {dtype:?} [{rows}x{cols}] n={n} token {t}");
                    let mut lone = vec![0f32; nr];
                    a.dense_rows(&v, r0, xt, &mut lone);
                    assert!(
                        got.iter()
                            .zip(&lone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: {got:?} vs lone {lone:?}"
                    );
                    let want = scalar_y(&w, xt);
                    let bound = activation_bound(&wf, cols, xt, cols, f32::INFINITY);
                    assert_close(&what, got, &want[r0..], &bound[r0..]);
                }
            }
        }
    }

    /// Many tokens at once give each token exactly its lone
    /// `quant_rows_q16`, and stay within the int16 activations' bound of
    /// the scalar reference; on paired and plain int4 layouts, odd block
    /// counts per group, short last groups, symmetric and per-group zeros,
    /// one and two passes, several column slices and row blocks, and with
    /// a token holding NaN, which only that token's outputs show.
    #[test]
    fn quant_tokens_are_each_tokens_rows_and_match_scalar() {
        let Some(a) = Avx2::detect() else { return };
        let mut rng = StdRng::seed_from_u64(67);
        let shapes = [
            (4u8, 128usize, 512usize),
            (4, 128, 1184),
            (4, 32, 1056),
            (4, 128, 352),
            (4, 96, 352),
            (4, 32, 96),
            (8, 64, 224),
            (8, 128, 2048),
            (8, 32, 96),
        ];
        for (case, (bits, group, cols)) in shapes.into_iter().enumerate() {
            // Over one block of rows, so totals restart per block.
            let rows = 19;
            let m = rand_quant(&mut rng, rows, cols, bits, group, case % 2 == 1);
            let v = QuantView::new(&m).unwrap();
            let w = Matrix::Quant(m.clone());
            let wf = dense_f32(&w);
            for n in [1, 2, 3, 4, 5, 7, 8] {
                let mut x: Vec<f32> = rand_x(&mut rng, n * cols)
                    .iter()
                    .map(|v| v * 50.0)
                    .collect();
                let bad = (n > 2).then(|| n - 2);
                if let Some(t) = bad {
                    x[t * cols + cols / 3] = f32::NAN;
                }
                let acts: Vec<Q16Act> = x
                    .chunks_exact(cols)
                    .map(|xt| a.q16_act(xt, bits, group))
                    .collect();
                let refs: Vec<&Q16Act> = acts.iter().collect();
                let (r0, nr) = (1, rows - 1);
                let mut got = vec![0f32; n * nr];
                a.quant_rows_q16_tokens(&v, r0, nr, &refs, &mut got);
                for (t, xt) in x.chunks_exact(cols).enumerate() {
                    let got = &got[t * nr..(t + 1) * nr];
                    let what =
                        format!("case {case}: {bits}-bit g{group} cols {cols} n={n} token {t}");
                    if bad == Some(t) {
                        assert!(got.iter().all(|v| !v.is_finite()), "{what}: {got:?}");
                        continue;
                    }
                    let mut lone = vec![0f32; nr];
                    a.quant_rows_q16(&v, r0, &acts[t], &mut lone);
                    assert!(
                        got.iter()
                            .zip(&lone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: {got:?} vs lone {lone:?}"
                    );
                    let want = scalar_y(&w, xt);
                    let bound = activation_bound(&wf, cols, xt, group, 65534.0);
                    assert_close(&what, got, &want[r0..], &bound[r0..]);
                }
            }
        }
    }
}

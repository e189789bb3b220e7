//! AVX-512 kernels for a few tokens at once: several sequences decoding
//! together ([`super::matmul`]'s small-batch path). Each weight row is
//! unpacked (int4/int8) or converted (BF16/F16) once and multiplied into
//! every token's accumulators, instead of once per token. Quantized rows
//! take up to four tokens two rows at a time with their group totals in
//! registers; int8 rows take five to eight in one wide pass (totals in
//! memory), so a decoding batch of eight reads and unpacks each row once;
//! at eight tokens the wide pass is compute-bound (each row and token adds
//! a convert and an FMA per group), about as fast as the integer tiles.
//! (More than four tokens of int4 rows go to the tiles, see `matmul`.)
//!
//! Every token's result is what its lone matvec gives, bit for bit: the
//! quantized kernels add the same integer products per weight group (i32
//! sums are exact, so one accumulator per token gives the lane sums two
//! give), then meet the scales in the same f32 order as
//! [`super::avx512`]'s `dot_i4` / `dot_i8`; the dense kernel keeps the AVX2
//! `dot_dense`'s four 8-lane accumulators as two 16-lane halves (lane-wise
//! FMAs round the same) and adds them up in its order.
//!
//! Safety: as in the `avx2` module. An [`Avx512`] exists only after its
//! `detect` saw the features on the running CPU; the views were checked
//! against their shapes, and the safe wrappers check row ranges,
//! activation lengths and output sizes before any pointer is formed. Only
//! unaligned loads are used.

#![allow(unknown_lints, clippy::manual_is_multiple_of)]
// Token indices pick both an accumulator and that token's pointers.
#![allow(clippy::needless_range_loop)]

use crate::kernels::isa::avx512_vnni_fn;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::avx2::{
    dense_block_row, hsum, load1, load8, pf_bytes, prefetch_ahead, prefetch_l2, DenseView,
    QuantView, DT_BF16, DT_F16, DT_F32,
};
use super::avx512::{hi256, Avx512, GroupAct};
use crate::tensor::{FloatType, QBLOCK};

/// Most tokens one pass of these kernels takes (their accumulators fill
/// the 32 vector registers); more tokens go in several passes.
pub(crate) const MAX_TOKENS: usize = 8;

/// Calls `$f::<T>($args)` for the token count `$n` (1 to [`MAX_TOKENS`]).
macro_rules! by_tokens {
    ($n:expr, $f:ident, $($args:expr),*) => {
        match $n {
            1 => $f::<1>($($args),*),
            2 => $f::<2>($($args),*),
            3 => $f::<3>($($args),*),
            4 => $f::<4>($($args),*),
            5 => $f::<5>($($args),*),
            6 => $f::<6>($($args),*),
            7 => $f::<7>($($args),*),
            _ => $f::<8>($($args),*),
        }
    };
}

/// Tokens one pass of the quantized kernels multiplies, two rows at a
/// time: their integer sums and two group totals for both rows take 24 of
/// the 32 vector registers.
const QUANT_PASS: usize = 4;

/// Most tokens whose group totals [`dot_i8_wide`] keeps in registers: at
/// four tokens of two rows, 16 totals beside 8 sums, two weight vectors
/// and an activation; at six, the totals spilled and the call ran 13%
/// slower than with them in memory.
const REGISTER_TOTALS_TOKENS: usize = 4;

/// Groups whose scale products [`scale_products`] forms at once: one
/// vector of 16.
const SCALE_CHUNK: usize = 16;

/// Rows of a block [`Avx512::quant_rows_wide`] multiplies while it
/// prefetches the next into L2 (16 KiB of int8 at 2048 columns).
const WIDE_BLOCK_ROWS: usize = 8;

/// Calls `$f::<T, R>($args)` for the token count `$n` (2 to
/// [`MAX_TOKENS`]) and the row count `$r` (1 or 2).
macro_rules! by_wide {
    ($n:expr, $r:expr, $f:ident, $args:expr) => {
        match ($n, $r) {
            (2, 1) => $f::<2, 1>($args),
            (3, 1) => $f::<3, 1>($args),
            (4, 1) => $f::<4, 1>($args),
            (2, _) => $f::<2, 2>($args),
            (3, _) => $f::<3, 2>($args),
            (4, _) => $f::<4, 2>($args),
            (5, 1) => $f::<5, 1>($args),
            (6, 1) => $f::<6, 1>($args),
            (7, 1) => $f::<7, 1>($args),
            (_, 1) => $f::<8, 1>($args),
            (5, _) => $f::<5, 2>($args),
            (6, _) => $f::<6, 2>($args),
            (7, _) => $f::<7, 2>($args),
            _ => $f::<8, 2>($args),
        }
    };
}

/// Calls `$f::<T, R>($args)` for the token count `$n` (1 to
/// [`QUANT_PASS`]) and the row count `$r` (1 or 2).
macro_rules! by_pass_rows {
    ($n:expr, $r:expr, $f:ident, $($args:expr),*) => {
        match ($n, $r) {
            (1, 1) => $f::<1, 1>($($args),*),
            (2, 1) => $f::<2, 1>($($args),*),
            (3, 1) => $f::<3, 1>($($args),*),
            (_, 1) => $f::<4, 1>($($args),*),
            (1, _) => $f::<1, 2>($($args),*),
            (2, _) => $f::<2, 2>($($args),*),
            (3, _) => $f::<3, 2>($($args),*),
            _ => $f::<4, 2>($($args),*),
        }
    };
}

impl Avx512 {
    /// `out[t * nr + i] = row (r0 + i) · x_t` for `nr` rows of a quantized
    /// matrix and the tokens whose activations `acts` holds (quantized by
    /// [`Avx512::group_act`]): what [`Avx512::quant_rows`] gives each
    /// token, bit for bit.
    pub(crate) fn quant_rows_tokens(
        self,
        v: &QuantView,
        r0: usize,
        nr: usize,
        acts: &[&GroupAct],
        out: &mut [f32],
    ) {
        assert!(r0 + nr <= v.rows, "rows out of range");
        assert!(Self::supports(v.bits, v.group_size));
        assert_eq!(out.len(), nr * acts.len());
        for a in acts {
            assert!(a.bits == v.bits && a.group_size == v.group_size);
            assert!(a.xq.len() == v.cols && a.d.len() == v.n_groups);
            assert!(a.gsum.len() == v.n_groups);
        }
        // Passes over all the rows: up to QUANT_PASS tokens two rows at a
        // time, their activations in L1 while the rows stream past; more
        // in wide passes of up to MAX_TOKENS (a later pass finds the rows
        // in L2).
        let n = acts.len();
        // Int8 rows of 1024 columns or more take the wide pass from two
        // tokens on: one call's thread CPU time, weights from memory, on
        // 12288x2048 at 2 tokens 1.4 against 2.6 ms, at 4 2.3 against
        // 2.9; 2048x4096 at 2 0.45 against 0.7. Int4 and shorter int8
        // rows were as fast or faster in passes of two rows. Int4 rows
        // always go in passes of QUANT_PASS: `matmul` sends more than four
        // tokens of them to the integer tiles, which are faster there.
        let wide = v.bits == 8 && v.cols >= super::WIDE_MIN_COLS;
        let mut t0 = 0;
        while t0 < n {
            // More tokens than a pass of two rows takes go in one wide
            // pass of up to eight, each row read and unpacked once.
            if v.bits == 8 && (n - t0 > QUANT_PASS || (wide && n - t0 > 1)) {
                let nt = (n - t0).min(MAX_TOKENS);
                let o = &mut out[t0 * nr..(t0 + nt) * nr];
                self.quant_rows_wide(v, r0, nr, &acts[t0..t0 + nt], o);
                t0 += nt;
                continue;
            }
            let nt = (n - t0).min(QUANT_PASS);
            let pass = &acts[t0..t0 + nt];
            let gsums: Vec<&[f32]> = pass.iter().map(|a| &a.gsum[..]).collect();
            let mut i = 0;
            while i < nr {
                let rr = if i + 2 <= nr { 2 } else { 1 };
                let r = r0 + i;
                let mut dots = [[0f32; MAX_TOKENS]; 2];
                // SAFETY: `self` proves the features; rows `r..r + rr` are
                // in range and every activation matches the view's checked
                // shape (asserted above).
                unsafe {
                    if v.bits == 4 {
                        by_pass_rows!(nt, rr, dot_i4_tokens, v, r, pass, &mut dots)
                    } else {
                        by_pass_rows!(nt, rr, dot_i8_tokens, v, r, pass, &mut dots)
                    }
                }
                for (k, d) in dots.iter().take(rr).enumerate() {
                    let mut z = [0f32; MAX_TOKENS];
                    self.avx2.zero_corrections(v, r + k, &gsums, &mut z[..nt]);
                    for t in 0..nt {
                        out[(t0 + t) * nr + i + k] = d[t] + z[t];
                    }
                }
                i += rr;
            }
            t0 += nt;
        }
    }

    /// [`Avx512::quant_rows_tokens`] of int8 rows for a pass of two to
    /// eight tokens (five to eight for rows under [`super::WIDE_MIN_COLS`];
    /// `out[t * nr + i]`), each row read and unpacked once for all of them,
    /// two rows at a time: the integer sums then take 16 registers, so the
    /// group totals (32 at eight tokens) live in memory (up to four tokens
    /// keep them in registers, see `dot_i8_wide`). Rows go in blocks of
    /// [`WIDE_BLOCK_ROWS`] while the next block is prefetched into L2.
    fn quant_rows_wide(
        self,
        v: &QuantView,
        r0: usize,
        nr: usize,
        pass: &[&GroupAct],
        out: &mut [f32],
    ) {
        let nt = pass.len();
        assert!(r0 + nr <= v.rows && out.len() == nt * nr);
        assert!(nt > 1 && nt <= MAX_TOKENS && v.bits == 8);
        let mut tot = [[[[0f32; 16]; MAX_TOKENS]; 2]; WIDE_BLOCK_ROWS];
        // Up to four tokens write their totals whole (see `dot_i8_wide`);
        // more add into them, so the block's totals of this pass's tokens
        // start at zero. Filling all eight tokens' 8 KiB per block took
        // 1.3% of a four-stream step.
        let written = nt <= REGISTER_TOTALS_TOKENS;
        let gsums: Vec<&[f32]> = pass.iter().map(|a| &a.gsum[..]).collect();
        for b0 in (0..nr).step_by(WIDE_BLOCK_ROWS) {
            let rows = WIDE_BLOCK_ROWS.min(nr - b0);
            let r = r0 + b0;
            let tot = &mut tot[..rows];
            if !written {
                for half in tot.iter_mut().flat_map(|row| row.iter_mut()) {
                    half[..nt].fill([0f32; 16]);
                }
            }
            // Prefetches never fault, so the next block may lie past the
            // end (the next call's first rows).
            let next = v.q.as_ptr().wrapping_add((r + rows) * v.row_bytes);
            let mut i = 0;
            while i < rows {
                let rr = (rows - i).min(2);
                let pf = next.wrapping_add(i * v.row_bytes);
                // SAFETY: `self` proves the features; rows `r + i ..
                // r + i + rr` are in range (asserted), the totals hold one
                // entry per row, and every activation matches the view's
                // checked shape (asserted by `quant_rows_tokens`).
                unsafe {
                    let args = (v, r + i, pass, pf, &mut tot[i..i + rr]);
                    by_wide!(nt, rr, dot_i8_wide, args)
                }
                i += rr;
            }
            for (i, ti) in tot.iter().enumerate() {
                let mut z = [0f32; MAX_TOKENS];
                self.avx2.zero_corrections(v, r + i, &gsums, &mut z[..nt]);
                for t in 0..nt {
                    // SAFETY: features proven by `self`.
                    out[t * nr + b0 + i] = unsafe { finish_totals(ti, t) } + z[t];
                }
            }
        }
    }

    /// `out[t * nr + i] = row (r0 + i) · xs[t]` for `nr` rows of a dense
    /// matrix: what the AVX2 `dense_rows` gives each token, bit for bit.
    pub(crate) fn dense_rows_tokens(
        self,
        v: &DenseView,
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        assert!(r0 + nr <= v.rows, "rows out of range");
        assert!(xs.iter().all(|x| x.len() == v.cols));
        assert_eq!(out.len(), nr * xs.len());
        let es = v.dtype.size();
        let n = xs.len();
        let mut t0 = 0;
        while t0 < n {
            // Passes of up to six tokens walk each row once (see
            // `slice_rows_both`); seven or eight go in two even passes.
            let nt = match n - t0 {
                left if left <= BOTH_HALVES_TOKENS => left,
                left if left <= 2 * BOTH_HALVES_TOKENS => left.div_ceil(2),
                _ => BOTH_HALVES_TOKENS,
            };
            let mut ptrs = [xs[t0].as_ptr(); MAX_TOKENS];
            for (p, x) in ptrs.iter_mut().zip(&xs[t0..t0 + nt]) {
                *p = x.as_ptr();
            }
            for b0 in (0..nr).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(nr - b0);
                let first = (r0 + b0) * v.cols * es;
                let block = v.data[first..first + rows * v.cols * es].as_ptr();
                let mut dots = [[0f32; MAX_TOKENS]; BLOCK_ROWS];
                // SAFETY: `block` holds `rows` rows of `cols` elements of
                // `dtype`, and the first `nt` pointers each `cols` floats
                // (asserted); features proven by `self`.
                unsafe {
                    let args = (block, rows, &ptrs, v.cols, &mut dots);
                    match v.dtype {
                        FloatType::BF16 => by_tokens!(nt, dense_block_bf16, args),
                        FloatType::F16 => by_tokens!(nt, dense_block_f16, args),
                        FloatType::F32 => by_tokens!(nt, dense_block_f32, args),
                    }
                }
                for (i, d) in dots.iter().take(rows).enumerate() {
                    for t in 0..nt {
                        out[(t0 + t) * nr + b0 + i] = d[t];
                    }
                }
            }
            t0 += nt;
        }
    }
}

avx512_vnni_fn! {
/// Rows `r..r + R` of an int4 matrix times `T` tokens' group-quantized
/// activations, without the zero-point term; `dots[k][t]` is `dot_i4` of
/// row `r + k` for token `t`. Each activation vector loaded serves all `R`
/// rows.
unsafe fn dot_i4_tokens<const T: usize, const R: usize>(
    v: &QuantView,
    r: usize,
    acts: &[&GroupAct],
    dots: &mut [[f32; MAX_TOKENS]; 2],
) {
    let gs = v.group_size;
    let qrow: [*const u8; R] = std::array::from_fn(|k| v.q.as_ptr().add((r + k) * v.row_bytes));
    let srow: [*const u8; R] =
        std::array::from_fn(|k| v.scales.as_ptr().add((r + k) * v.n_groups * 2));
    let xq: [*const i16; T] = std::array::from_fn(|t| acts[t].xq.as_ptr());
    let m = _mm512_set1_epi16(0x0F);
    let pfb = pf_bytes();
    // `tot[h][k][t]`: row k's token t's even (h = 0) and odd groups, as
    // `dot_i4` alternates its two totals.
    let mut tot = [[[_mm512_setzero_ps(); T]; R]; 2];
    let mut sd = [[[0f32; SCALE_CHUNK]; T]; R];
    for g in 0..v.n_groups {
        if g % SCALE_CHUNK == 0 {
            sd = scale_products::<T, R>(&srow, g, (v.n_groups - g).min(SCALE_CHUNK), acts);
        }
        let k0 = g * gs;
        let nb = (gs.min(v.cols - k0)) / QBLOCK;
        let qg: [*const u8; R] = std::array::from_fn(|k| qrow[k].add(k0 / 2));
        let mut acc = [[_mm512_setzero_si512(); T]; R];
        for p in 0..nb / 2 {
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for k in 0..R {
                prefetch_ahead(qg[k].wrapping_add(p * 32), pfb);
                let w =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(qg[k].add(p * 32) as *const __m256i));
                lo[k] = _mm512_and_si512(w, m);
                hi[k] = _mm512_srli_epi16::<4>(w);
            }
            for t in 0..T {
                let x = xq[t].add(k0 + p * 64);
                let xl = _mm512_loadu_si512(x as *const _);
                let xh = _mm512_loadu_si512(x.add(32) as *const _);
                for k in 0..R {
                    acc[k][t] = _mm512_dpwssd_epi32(acc[k][t], lo[k], xl);
                    acc[k][t] = _mm512_dpwssd_epi32(acc[k][t], hi[k], xh);
                }
            }
        }
        if nb % 2 == 1 {
            let b = nb - 1;
            let w: [__m512i; R] = std::array::from_fn(|k| {
                let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(qg[k].add(b * 16) as *const __m128i));
                let lo = _mm256_and_si256(w, _mm256_set1_epi16(0x0F));
                let hi = _mm256_srli_epi16::<4>(w);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            });
            for t in 0..T {
                let x = _mm512_loadu_si512(xq[t].add(k0 + b * QBLOCK) as *const _);
                for k in 0..R {
                    acc[k][t] = _mm512_dpwssd_epi32(acc[k][t], w[k], x);
                }
            }
        }
        scaled_totals::<T, R>(&sd, g % SCALE_CHUNK, &acc, &mut tot[g % 2]);
    }
    finish_dots::<T, R>(&tot, dots);
}

/// Rows `r..r + R` of an int8 matrix times `T` tokens' group-quantized
/// activations, without the zero-point term; `dots[k][t]` is `dot_i8` of
/// row `r + k` for token `t`. Each activation vector loaded serves all `R`
/// rows.
unsafe fn dot_i8_tokens<const T: usize, const R: usize>(
    v: &QuantView,
    r: usize,
    acts: &[&GroupAct],
    dots: &mut [[f32; MAX_TOKENS]; 2],
) {
    let qrow: [*const u8; R] = std::array::from_fn(|k| v.q.as_ptr().add((r + k) * v.row_bytes));
    let srow: [*const u8; R] =
        std::array::from_fn(|k| v.scales.as_ptr().add((r + k) * v.n_groups * 2));
    let xq: [*const i16; T] = std::array::from_fn(|t| acts[t].xq.as_ptr());
    let pfb = pf_bytes();
    let hint = |k: usize, at: usize| prefetch_ahead(qrow[k].wrapping_add(at), pfb);
    let mut tot = [[[_mm512_setzero_ps(); T]; R]; 2];
    let mut sd = [[[0f32; SCALE_CHUNK]; T]; R];
    for g in 0..v.n_groups {
        if g % SCALE_CHUNK == 0 {
            sd = scale_products::<T, R>(&srow, g, (v.n_groups - g).min(SCALE_CHUNK), acts);
        }
        let acc = i8_group_sums::<T, R>(v, g, &qrow, &xq, hint);
        scaled_totals::<T, R>(&sd, g % SCALE_CHUNK, &acc, &mut tot[g % 2]);
    }
    finish_dots::<T, R>(&tot, dots);
}

/// Each row's and token's two group totals added up as `dot_i4` does.
#[inline]
unsafe fn finish_dots<const T: usize, const R: usize>(
    tot: &[[[__m512; T]; R]; 2],
    dots: &mut [[f32; MAX_TOKENS]; 2],
) {
    for k in 0..R {
        for t in 0..T {
            dots[k][t] = _mm512_reduce_add_ps(_mm512_add_ps(tot[0][k][t], tot[1][k][t]));
        }
    }
}

/// Sixteen dense elements of type `DT` at `p` as f32.
#[inline]
unsafe fn load16<const DT: u8>(p: *const u8) -> __m512 {
    match DT {
        DT_F32 => _mm512_loadu_ps(p as *const f32),
        DT_F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i),
        ))),
    }
}

}

/// One row's two group totals per token, `[h][t]` (even and odd groups,
/// as `dot_i4` / `dot_i8` alternate them), for [`Avx512::quant_rows_wide`].
type RowTotals = [[[f32; 16]; MAX_TOKENS]; 2];

/// The arguments of the wide kernels: the view, the first row, the pass's
/// activations, where the first row's bytes map in the block prefetched
/// into L2 (the next rows follow a row apart), and the rows' totals.
type WideArgs<'a, 'b> = (
    &'a QuantView<'b>,
    usize,
    &'a [&'a GroupAct],
    *const u8,
    &'a mut [RowTotals],
);

/// Adds group `$g`'s integer sums `$acc[k][t]`, scaled by row `k`'s scale
/// and token `t`'s (their product `$sd[k][t][$j]`, see
/// [`scale_products`]), to the totals in `$tot`, as `dot_i4` / `dot_i8`
/// do. A macro, so that the sums stay in registers.
macro_rules! wide_totals {
    ($sd:ident, $j:expr, $g:expr, $acc:ident, $tot:ident) => {
        let (j, g) = ($j, $g);
        for k in 0..R {
            for t in 0..T {
                let i = _mm512_cvtepi32_ps($acc[k][t]);
                let p = $tot[k][g % 2][t].as_mut_ptr();
                let s = _mm512_fmadd_ps(i, _mm512_set1_ps($sd[k][t][j]), _mm512_loadu_ps(p));
                _mm512_storeu_ps(p, s);
            }
        }
    };
}

avx512_vnni_fn! {
/// Rows `r..r + R` of an int8 matrix times `T` tokens' group-quantized
/// activations, without the zero-point term, added into `tot[k]` as
/// `dot_i8` adds them (up to [`REGISTER_TOTALS_TOKENS`] tokens written
/// into `tot[k]` instead, from zero). Each weight vector serves all `T` tokens, each
/// activation vector all `R` rows. Up to [`REGISTER_TOTALS_TOKENS`]
/// tokens the totals stay in registers from the first group to the last
/// (even and odd groups in turn), where storing and reloading them after
/// every group of 128 cost 8% of a four-token call; beyond, they no
/// longer fit beside the sums and go through memory.
unsafe fn dot_i8_wide<const T: usize, const R: usize>(args: WideArgs) {
    let (v, r, acts, pf, tot) = args;
    let qrow: [*const u8; R] = std::array::from_fn(|k| v.q.as_ptr().add((r + k) * v.row_bytes));
    let srow: [*const u8; R] =
        std::array::from_fn(|k| v.scales.as_ptr().add((r + k) * v.n_groups * 2));
    let xq: [*const i16; T] = std::array::from_fn(|t| acts[t].xq.as_ptr());
    let ng = v.n_groups;
    let hint = |k: usize, at: usize| prefetch_l2(pf.wrapping_add(k * v.row_bytes + at));
    if T > REGISTER_TOTALS_TOKENS {
        let mut g0 = 0;
        while g0 < ng {
            let n = (ng - g0).min(SCALE_CHUNK);
            let sd = scale_products::<T, R>(&srow, g0, n, acts);
            for j in 0..n {
                let acc = i8_group_sums::<T, R>(v, g0 + j, &qrow, &xq, hint);
                wide_totals!(sd, j, g0 + j, acc, tot);
            }
            g0 += n;
        }
        return;
    }
    // The totals start at zero, as `quant_rows_wide`'s would (adding to
    // 0.0 first rounds the same either way), and are written at the end.
    let mut even: [[__m512; T]; R] = [[_mm512_setzero_ps(); T]; R];
    let mut odd: [[__m512; T]; R] = [[_mm512_setzero_ps(); T]; R];
    let mut g0 = 0;
    while g0 < ng {
        let n = (ng - g0).min(SCALE_CHUNK);
        let sd = scale_products::<T, R>(&srow, g0, n, acts);
        // `g0` is a multiple of SCALE_CHUNK (even), so `j`'s parity is
        // the group's.
        let mut j = 0;
        while j < n {
            let acc = i8_group_sums::<T, R>(v, g0 + j, &qrow, &xq, hint);
            scaled_totals::<T, R>(&sd, j, &acc, &mut even);
            if j + 1 < n {
                let acc = i8_group_sums::<T, R>(v, g0 + j + 1, &qrow, &xq, hint);
                scaled_totals::<T, R>(&sd, j + 1, &acc, &mut odd);
            }
            j += 2;
        }
        g0 += n;
    }
    for k in 0..R {
        for t in 0..T {
            _mm512_storeu_ps(tot[k][0][t].as_mut_ptr(), even[k][t]);
            _mm512_storeu_ps(tot[k][1][t].as_mut_ptr(), odd[k][t]);
        }
    }
}

/// `sd[k][t][j]`: row `k`'s scale times token `t`'s for group `g0 + j`,
/// `j < n` (at most [`SCALE_CHUNK`]), the same product `dot_i4` / `dot_i8`
/// form one group at a time (a lane-wise vector product rounds as the
/// scalar one). Per group that took a scalar conversion, a product and a
/// broadcast for every row and token, a quarter of a four-token call's
/// instructions; these come from memory as broadcast loads.
#[inline]
unsafe fn scale_products<const T: usize, const R: usize>(
    srow: &[*const u8; R],
    g0: usize,
    n: usize,
    acts: &[&GroupAct],
) -> [[[f32; SCALE_CHUNK]; T]; R] {
    debug_assert!(n <= SCALE_CHUNK);
    let mask = (1u32 << n).wrapping_sub(1);
    let d: [__m512; T] = std::array::from_fn(|t| {
        _mm512_maskz_loadu_ps(mask as __mmask16, acts[t].d.as_ptr().add(g0))
    });
    let mut sd = [[[0f32; SCALE_CHUNK]; T]; R];
    for k in 0..R {
        let s16 = _mm512_maskz_loadu_epi16(mask, srow[k].add(2 * g0) as *const i16);
        let s = _mm512_cvtph_ps(_mm512_castsi512_si256(s16));
        for t in 0..T {
            _mm512_storeu_ps(sd[k][t].as_mut_ptr(), _mm512_mul_ps(s, d[t]));
        }
    }
    sd
}

/// Adds a group's integer sums, scaled by the product of the row's and
/// the token's scales (column `j` of [`scale_products`]), to the totals,
/// as `dot_i4` / `dot_i8` do.
#[inline]
unsafe fn scaled_totals<const T: usize, const R: usize>(
    sd: &[[[f32; SCALE_CHUNK]; T]; R],
    j: usize,
    acc: &[[__m512i; T]; R],
    tot: &mut [[__m512; T]; R],
) {
    for k in 0..R {
        for t in 0..T {
            let i = _mm512_cvtepi32_ps(acc[k][t]);
            tot[k][t] = _mm512_fmadd_ps(i, _mm512_set1_ps(sd[k][t][j]), tot[k][t]);
        }
    }
}

/// Group `g`'s integer sums of rows `qrow` (int8, widened to words) and
/// `T` tokens' int16 activations `xq`, `[k][t]`; `hint(k, at)` hints row
/// `k`'s weights ahead of column `at` every other block.
#[inline]
unsafe fn i8_group_sums<const T: usize, const R: usize>(
    v: &QuantView,
    g: usize,
    qrow: &[*const u8; R],
    xq: &[*const i16; T],
    hint: impl Fn(usize, usize),
) -> [[__m512i; T]; R] {
    let gs = v.group_size;
    let k0 = g * gs;
    let nb = (gs.min(v.cols - k0)) / QBLOCK;
    let mut acc = [[_mm512_setzero_si512(); T]; R];
    for b in 0..nb {
        let at = k0 + b * QBLOCK;
        let w: [__m512i; R] = std::array::from_fn(|k| {
            if b % 2 == 0 {
                hint(k, at);
            }
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(qrow[k].add(at) as *const __m256i))
        });
        for t in 0..T {
            let x = _mm512_loadu_si512(xq[t].add(at) as *const _);
            for k in 0..R {
                acc[k][t] = _mm512_dpwssd_epi32(acc[k][t], w[k], x);
            }
        }
    }
    acc
}


/// A row's token `t`: its two group totals added up as `dot_i4` does.
#[inline]
unsafe fn finish_totals(tot: &RowTotals, t: usize) -> f32 {
    let (a, b) = (tot[0][t].as_ptr(), tot[1][t].as_ptr());
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)))
}
}

/// Rows of a dense block [`dense_block`] keeps accumulators for.
const BLOCK_ROWS: usize = 8;

/// Most tokens a pass of [`dense_block`] takes with both halves of each
/// step in one walk ([`slice_rows_both`], two rows at a time).
const BOTH_HALVES_TOKENS: usize = 6;

/// Columns of a [`dense_block`] slice: the slice of eight tokens' f32
/// activations (8 KiB), the block's weights and accumulators stay in L1
/// while the block's rows pass over it. Whole rows at a time would have
/// every row walk all the tokens' activations (8 KiB each), which from
/// four tokens on no longer fit L1 beside the streaming weights.
const SLICE: usize = 256;

/// The arguments of [`dense_block`]: the first of `rows` contiguous rows
/// of `cols` elements, the tokens' activations, and `dots[i][t]`.
type BlockArgs<'a> = (
    *const u8,
    usize,
    &'a [*const f32; MAX_TOKENS],
    usize,
    &'a mut [[f32; MAX_TOKENS]; BLOCK_ROWS],
);

avx512_vnni_fn! {
/// The AVX2 `dot_dense` of `rows` rows with `T` tokens each, column slice
/// by column slice: `a[i][t][0]` holds that kernel's accumulators 0 and 1
/// for row `i` and token `t` (lanes 0..8 and 8..16), `a[i][t][1]` its 2
/// and 3, so every lane sees the same FMAs in the same order; the tail and
/// the final sum follow it step by step.
#[inline]
unsafe fn dense_block<const DT: u8, const T: usize>(args: BlockArgs) {
    let (w, rows, xs, n, dots) = args;
    let es = if DT == DT_F32 { 4 } else { 2 };
    let stride = n * es;
    let n32 = n / 32 * 32;
    // Not zeroed (4 KiB a block of rows at four tokens, 78 MB a call on
    // the lm_head): the first slice starts from zero and writes them.
    let mut acc = [[[MaybeUninit::<__m512>::uninit(); 2]; T]; BLOCK_ROWS];
    let at = |i: usize| dense_block_row(w, i, stride, BLOCK_ROWS);
    let mut k0 = 0;
    while k0 < n32 {
        let k1 = (k0 + SLICE).min(n32);
        let mut i = 0;
        while i + 2 <= rows {
            let ((r0, n0), (r1, n1)) = (at(i), at(i + 1));
            slice_rows::<DT, T, 2>([r0, r1], [n0, n1], xs, (k0, k1), &mut acc[i..i + 2]);
            i += 2;
        }
        if i < rows {
            let (r0, n0) = at(i);
            slice_rows::<DT, T, 1>([r0], [n0], xs, (k0, k1), &mut acc[i..i + 1]);
        }
        k0 = k1;
    }
    for (i, ai) in acc.iter().take(rows).enumerate() {
        let row = w.add(i * stride);
        for t in 0..T {
            let x = xs[t];
            // SAFETY: with a slice at all (`n32 > 0`), the first wrote
            // every accumulator of rows `..rows`.
            let [lo, hi] = if n32 == 0 {
                [_mm512_setzero_ps(); 2]
            } else {
                ai[t].map(|a| a.assume_init())
            };
            let mut a0 = _mm512_castps512_ps256(lo);
            let a1 = hi256(lo);
            let a2 = _mm512_castps512_ps256(hi);
            let a3 = hi256(hi);
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

/// An accumulator at the start of the slice from column `k0`: zero for
/// the first slice (what adding to 0.0 gives), else what the previous
/// slice wrote.
#[inline]
unsafe fn slice_start(a: MaybeUninit<__m512>, k0: usize) -> __m512 {
    if k0 == 0 {
        _mm512_setzero_ps()
    } else {
        // SAFETY: the slice from column 0 wrote it (`dense_block`).
        a.assume_init()
    }
}

/// Columns `k0..k1` (whole 32-column steps) of `R` rows into their `T`
/// tokens' accumulators `acc[r][t]`, one half at a time: half `h` holds
/// `dot_dense`'s accumulators `2h` and `2h + 1`, which see only columns
/// `k + 16h .. k + 16h + 16` of each step, so walking the halves one after
/// the other keeps every lane's FMAs in order. Each activation vector
/// loaded serves all `R` rows, and every row's weights are loaded and
/// converted once. Where both halves' accumulators fit the registers,
/// [`slice_rows_both`] walks the slice once instead.
#[inline]
unsafe fn slice_rows<const DT: u8, const T: usize, const R: usize>(
    rows: [*const u8; R],
    next: [*const u8; R],
    xs: &[*const f32; MAX_TOKENS],
    (k0, k1): (usize, usize),
    acc: &mut [[[MaybeUninit<__m512>; 2]; T]],
) {
    let es = if DT == DT_F32 { 4 } else { 2 };
    if 2 * R * T + 2 * R + 2 <= 32 {
        return slice_rows_both::<DT, T, R>(rows, next, xs, (k0, k1), acc);
    }
    for h in 0..2 {
        let mut a: [[__m512; T]; R] =
            std::array::from_fn(|r| std::array::from_fn(|t| slice_start(acc[r][t][h], k0)));
        let mut k = k0;
        while k < k1 {
            if h == 0 {
                prefetch_next::<R>(next, k * es, es);
            }
            half_step::<DT, T, R>(&rows, xs, k + 16 * h, es, &mut a);
            k += 32;
        }
        for r in 0..R {
            for t in 0..T {
                acc[r][t][h] = MaybeUninit::new(a[r][t]);
            }
        }
    }
}

/// [`slice_rows`] with both halves in one walk, where their accumulators,
/// weights and activations all fit the 32 vector registers (up to six
/// tokens of two rows): each step loads a row's 32 columns once instead of
/// walking the slice twice. Each accumulator still sees its own columns'
/// FMAs in column order, so the sums are the same bits. At four tokens the
/// two walks held the BF16 lm_head to 29.7 GB/s against the one-token
/// matvec's 36 (`rh-bench kernels --shapes lm_head --tokens 4`).
#[inline]
unsafe fn slice_rows_both<const DT: u8, const T: usize, const R: usize>(
    rows: [*const u8; R],
    next: [*const u8; R],
    xs: &[*const f32; MAX_TOKENS],
    (k0, k1): (usize, usize),
    acc: &mut [[[MaybeUninit<__m512>; 2]; T]],
) {
    let es = if DT == DT_F32 { 4 } else { 2 };
    let mut halves: [[[__m512; T]; R]; 2] = std::array::from_fn(|h| {
        std::array::from_fn(|r| std::array::from_fn(|t| slice_start(acc[r][t][h], k0)))
    });
    let mut k = k0;
    while k < k1 {
        prefetch_next::<R>(next, k * es, es);
        for (h, a) in halves.iter_mut().enumerate() {
            half_step::<DT, T, R>(&rows, xs, k + 16 * h, es, a);
        }
        k += 32;
    }
    for r in 0..R {
        for t in 0..T {
            acc[r][t] = [MaybeUninit::new(halves[0][r][t]), MaybeUninit::new(halves[1][r][t])];
        }
    }
}

/// Hints into L2 the bytes at `off` of the rows read next (two lines of
/// f32 weights, `es == 4`, one of 16-bit ones).
#[inline]
unsafe fn prefetch_next<const R: usize>(next: [*const u8; R], off: usize, es: usize) {
    for n in next {
        prefetch_l2(n.wrapping_add(off));
        if es == 4 {
            prefetch_l2(n.wrapping_add(off + 64));
        }
    }
}

/// Columns `c..c + 16` of `R` rows times `T` tokens into `a[r][t]`: each
/// row's 16 weights loaded and converted once, each token's activations
/// once for all the rows.
#[inline]
unsafe fn half_step<const DT: u8, const T: usize, const R: usize>(
    rows: &[*const u8; R],
    xs: &[*const f32; MAX_TOKENS],
    c: usize,
    es: usize,
    a: &mut [[__m512; T]; R],
) {
    let wv: [__m512; R] = std::array::from_fn(|r| load16::<DT>(rows[r].add(c * es)));
    for t in 0..T {
        let x = _mm512_loadu_ps(xs[t].add(c));
        for r in 0..R {
            a[r][t] = _mm512_fmadd_ps(wv[r], x, a[r][t]);
        }
    }
}

unsafe fn dense_block_bf16<const T: usize>(args: BlockArgs) {
    dense_block::<DT_BF16, T>(args)
}

unsafe fn dense_block_f16<const T: usize>(args: BlockArgs) {
    dense_block::<DT_F16, T>(args)
}

unsafe fn dense_block_f32<const T: usize>(args: BlockArgs) {
    dense_block::<DT_F32, T>(args)
}
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::avx2::Avx2;
    use super::super::avx512::ACT_MAX;
    use super::super::tests::{
        activation_bound, assert_close, dense_f32, rand_dense, rand_quant, rand_x, scalar_y,
    };
    use super::*;
    use crate::tensor::Matrix;

    /// The level, or `None` on a CPU without AVX-512 VNNI (nothing to test).
    fn level() -> Option<Avx512> {
        Avx2::detect().and_then(Avx512::detect)
    }

    /// Tokens per call: one pass of each size (two rows at a time up to
    /// four, the wide kernel from five), and two passes (9, 12).
    const TOKENS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12];

    /// Many tokens at once give each token exactly its lone
    /// `quant_rows`, and stay within the int16 activations' bound of the
    /// scalar reference; on groups of an odd number of blocks, short last
    /// groups, symmetric and per-group zeros, and with a token holding NaN,
    /// which only that token's outputs show.
    #[test]
    fn quant_tokens_are_each_tokens_rows_and_match_scalar() {
        let Some(b) = level() else { return };
        let mut rng = StdRng::seed_from_u64(53);
        let shapes = [
            (4u8, 128usize, 512usize),
            (4, 96, 352),
            (4, 32, 96),
            (4, 128, 320),
            (8, 64, 224),
            (8, 128, 2048),
            (8, 32, 96),
        ];
        for (case, (bits, group, cols)) in shapes.into_iter().enumerate() {
            let rows = 13;
            let m = rand_quant(&mut rng, rows, cols, bits, group, case % 2 == 1);
            let v = QuantView::new(&m).unwrap();
            let w = Matrix::Quant(m.clone());
            let wf = dense_f32(&w);
            for (n, (r0, nr)) in TOKENS
                .into_iter()
                .flat_map(|n| [(n, (1, rows - 1)), (n, (0, rows)), (n, (4, 3))])
            {
                let mut x: Vec<f32> = rand_x(&mut rng, n * cols)
                    .iter()
                    .map(|v| v * 50.0)
                    .collect();
                let bad = (n > 2).then_some(1);
                if let Some(t) = bad {
                    x[t * cols + cols / 3] = f32::NAN;
                }
                let acts: Vec<GroupAct> = x
                    .chunks_exact(cols)
                    .map(|xt| b.group_act(xt, bits, group))
                    .collect();
                let refs: Vec<&GroupAct> = acts.iter().collect();
                let mut got = vec![0f32; n * nr];
                b.quant_rows_tokens(&v, r0, nr, &refs, &mut got);
                for (t, xt) in x.chunks_exact(cols).enumerate() {
                    let got = &got[t * nr..(t + 1) * nr];
                    let what =
                        format!("case {case}: {bits}-bit g{group} cols {cols} n={n} token {t}");
                    if bad == Some(t) {
                        assert!(got.iter().all(|v| !v.is_finite()), "{what}: {got:?}");
                        continue;
                    }
                    let mut lone = vec![0f32; nr];
                    b.quant_rows(&v, r0, &acts[t], &mut lone);
                    assert!(
                        got.iter()
                            .zip(&lone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: {got:?} vs lone {lone:?}"
                    );
                    let want = scalar_y(&w, xt);
                    let bound = activation_bound(&wf, cols, xt, group, 2.0 * ACT_MAX);
                    assert_close(&what, got, &want[r0..], &bound[r0..]);
                }
            }
        }
    }

    /// Many tokens at once give each token exactly the AVX2 `dense_rows`
    /// (the lone matvec), and stay within f32 rounding of the scalar
    /// reference; on rows spanning several column slices, tails of 8 and
    /// of single elements, and row counts around the block.
    #[test]
    fn dense_tokens_are_each_tokens_rows_and_match_scalar() {
        let Some(b) = level() else { return };
        let mut rng = StdRng::seed_from_u64(59);
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
            for n in TOKENS {
                let x = rand_x(&mut rng, n * cols);
                let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
                let (r0, nr) = (1, rows - 1);
                let mut got = vec![0f32; n * nr];
                b.dense_rows_tokens(&v, r0, nr, &xs, &mut got);
                for (t, xt) in xs.iter().enumerate() {
                    let got = &got[t * nr..(t + 1) * nr];
                    let what = format!("case {case}: {dtype:?} [{rows}x{cols}] n={n} token {t}");
                    let mut lone = vec![0f32; nr];
                    b.avx2.dense_rows(&v, r0, xt, &mut lone);
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
}

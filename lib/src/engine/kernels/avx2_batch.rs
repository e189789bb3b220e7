//! AVX2 kernels for a few tokens at once (several sequences decoding
//! together, [`super::matmul`]'s small-batch path) on dense weights (the
//! BF16 lm_head above all).
//!
//! Rows go in blocks of [`BLOCK_ROWS`], columns in slices of [`SLICE`]:
//! while a block's slice is in L1, every token passes over it, so each
//! token's activations are read from L1 (a slice of eight tokens' f32
//! activations is 8 KiB) rather than streamed from L2 once per row, which
//! is what a whole row per token cost from three tokens on (each token's
//! activations are 8 KiB on a 2048-column matrix). Every token's result is
//! what its lone `dense_rows` gives, bit for bit: each keeps `dot_dense`'s
//! four 8-lane accumulators, stored between slices, and adds them up in
//! its order.
//!
//! Safety: as in the `avx2` module. An [`Avx2`] exists only after its
//! `detect` saw the features on the running CPU; the view was checked
//! against its shape, and the safe wrapper checks row ranges, activation
//! lengths and the output size before any pointer is formed. Only
//! unaligned loads are used.

// Token indices pick both an accumulator and that token's pointer.
#![allow(clippy::needless_range_loop)]

use crate::kernels::isa::avx2_fn;
use std::arch::x86_64::*;

use super::avx2::{hsum, load1, load8, prefetch, Avx2, DenseView, DT_BF16, DT_F16, DT_F32};
use crate::tensor::FloatType;

/// Most tokens one call takes (the small-batch path's limit).
pub(crate) const MAX_TOKENS: usize = super::SMALL_BATCH_TOKENS;

/// Tokens one pass over a row slice multiplies: their 4 accumulators each
/// and the weights fill the 16 vector registers.
const PASS_TOKENS: usize = 3;

/// Rows whose accumulators a block keeps between slices.
const BLOCK_ROWS: usize = 8;

/// Columns of a slice.
const SLICE: usize = 256;

/// Every token's accumulators for every row of a block.
type Acc = [[[__m256; 4]; MAX_TOKENS]; BLOCK_ROWS];

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
/// each slice, row by row in passes of [`PASS_TOKENS`] tokens.
unsafe fn dense_block<const DT: u8>(args: BlockArgs) {
    let (w, rows, xs, tokens, n, dots) = args;
    let es = if DT == DT_F32 { 4 } else { 2 };
    let stride = n * es;
    let n32 = n / 32 * 32;
    let mut acc: Acc = [[[_mm256_setzero_ps(); 4]; MAX_TOKENS]; BLOCK_ROWS];
    let mut k0 = 0;
    while k0 < n32 {
        let k1 = (k0 + SLICE).min(n32);
        for (i, ai) in acc.iter_mut().take(rows).enumerate() {
            let row = w.add(i * stride);
            // Where this row is read next: its next slice, or after the
            // last one the next block's row (prefetches never fault).
            let next = if k1 < n32 {
                row.wrapping_add(SLICE * es)
            } else {
                row.wrapping_add(BLOCK_ROWS * stride - k0 * es)
            };
            let mut t0 = 0;
            while t0 < tokens {
                let pass = &mut ai[t0..];
                let x = &xs[t0..];
                match tokens - t0 {
                    1 => slice_pass::<DT, 1>(row, next, x, k0, k1, pass, t0 == 0),
                    2 => slice_pass::<DT, 2>(row, next, x, k0, k1, pass, t0 == 0),
                    _ => slice_pass::<DT, 3>(row, next, x, k0, k1, pass, t0 == 0),
                }
                t0 += PASS_TOKENS;
            }
        }
        k0 = k1;
    }
    for (i, ai) in acc.iter().take(rows).enumerate() {
        let row = w.add(i * stride);
        for t in 0..tokens {
            let x = xs[t];
            let [mut a0, a1, a2, a3] = ai[t];
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

/// Columns `k0..k1` of one row into `T` tokens' accumulators; the first
/// pass of a slice prefetches where the row is read next.
#[inline]
unsafe fn slice_pass<const DT: u8, const T: usize>(
    row: *const u8,
    next: *const u8,
    xs: &[*const f32],
    k0: usize,
    k1: usize,
    acc: &mut [[__m256; 4]],
    first: bool,
) {
    let es = if DT == DT_F32 { 4 } else { 2 };
    let mut a: [[__m256; 4]; T] = std::array::from_fn(|t| acc[t]);
    let x: [*const f32; T] = std::array::from_fn(|t| xs[t]);
    let mut k = k0;
    while k < k1 {
        if first {
            prefetch(next.wrapping_add(k * es));
            if es == 4 {
                prefetch(next.wrapping_add(k * es + 64));
            }
        }
        for j in 0..4 {
            let o = k + 8 * j;
            let wv = load8::<DT>(row.add(o * es));
            for t in 0..T {
                a[t][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t].add(o)), a[t][j]);
            }
        }
        k += 32;
    }
    acc[..T].copy_from_slice(&a);
}
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::tests::{
        activation_bound, assert_close, dense_f32, rand_dense, rand_x, scalar_y,
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
}

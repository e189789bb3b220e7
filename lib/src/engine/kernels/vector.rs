//! f32 vector helpers for the model's own loops (attention scores and the
//! weighted sum of values): a dot product and `y += a * x`, on AVX2+FMA
//! when the CPU has it. A plain `iter().sum()` stays scalar, because the
//! compiler may not reorder float additions.

/// `Σ a[i] * b[i]` over the shorter length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if super::simd().avx2().is_some() {
        // SAFETY: `avx2()` is `Some` only when the CPU has AVX2, FMA and F16C;
        // both slices hold at least `n` elements.
        return unsafe { x86::dot(a.as_ptr(), b.as_ptr(), n) };
    }
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

/// `out[j] = a · rows[j]` for four rows `b` (row `j` at `j * stride`,
/// each `a.len()` long): one pass over `a` for four dot products, so each
/// of `a`'s vectors is loaded once per four keys (attention scores).
pub fn dot4(a: &[f32], b: &[f32], stride: usize) -> [f32; 4] {
    let n = a.len();
    assert!(b.len() >= 3 * stride + n, "dot4: rows out of range");
    #[cfg(target_arch = "x86_64")]
    if super::simd().avx2().is_some() {
        // SAFETY: `avx2()` is `Some` only when the CPU has AVX2, FMA and F16C;
        // row `j < 4` spans `b[j * stride..j * stride + n]`, inside `b`
        // (checked above).
        return unsafe { x86::dot4(a.as_ptr(), b.as_ptr(), stride, n) };
    }
    std::array::from_fn(|j| dot(a, &b[j * stride..j * stride + n]))
}

/// `y[i] += alpha * x[i]` over the shorter length.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    #[cfg(target_arch = "x86_64")]
    if super::simd().avx2().is_some() {
        // SAFETY: as in `dot`; `y` is borrowed mutably and holds `n`.
        return unsafe { x86::axpy(alpha, x.as_ptr(), y.as_mut_ptr(), n) };
    }
    for (yi, xi) in y[..n].iter_mut().zip(&x[..n]) {
        *yi += alpha * xi;
    }
}

/// `y[i] = alpha * x[i]` over the shorter length: the first term of a sum
/// that [`axpy`] continues. Writing a fresh buffer before reading it matters:
/// a zeroed allocation read first maps the shared zero page, and the write
/// that follows then costs a second fault and a TLB shootdown to every
/// other core running the process.
pub fn scale(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = alpha * xi;
    }
}

/// `out[j] = Σ_s w[s] * x[s * stride + j]`: a weighted sum of rows `x`
/// (row `s` at `s * stride`, `out.len()` long), added in row order, so it
/// equals [`scale`] by `w[0]` followed by [`axpy`] for each later row. The
/// sums stay in registers instead of going through `out` once per row.
pub fn weighted_rows(w: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    if let Some(last) = w.len().checked_sub(1) {
        assert!(
            x.len() >= last * stride + d,
            "weighted_rows: rows out of range"
        );
    } else {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd().avx2().is_some() {
        // SAFETY: `avx2()` is `Some` only when the CPU has AVX2, FMA and F16C;
        // every row read lies inside `x` (checked above) and `out` holds `d`.
        return unsafe { x86::weighted_rows(w, x.as_ptr(), stride, out.as_mut_ptr(), d) };
    }
    scale(w[0], &x[..d], out);
    for (s, &ws) in w.iter().enumerate().skip(1) {
        axpy(ws, &x[s * stride..s * stride + d], out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::isa::avx2_fn;
    use std::arch::x86_64::*;

    avx2_fn! {
    /// Columns in blocks of four vectors, each block's sums in registers
    /// down all rows; the first row multiplies (as `scale`), the others
    /// fuse (as `axpy`), so the numbers equal that sequence.
    pub(super) unsafe fn weighted_rows(
        w: &[f32],
        x: *const f32,
        stride: usize,
        out: *mut f32,
        d: usize,
    ) {
        let mut j = 0;
        while j + 32 <= d {
            let w0 = _mm256_set1_ps(w[0]);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm256_mul_ps(w0, _mm256_loadu_ps(x.add(j + 8 * v)));
            }
            for (s, &ws) in w.iter().enumerate().skip(1) {
                let wv = _mm256_set1_ps(ws);
                let row = x.add(s * stride + j);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * v)), *a);
                }
            }
            for (v, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(j + 8 * v), *a);
            }
            j += 32;
        }
        while j + 8 <= d {
            let mut a = _mm256_mul_ps(_mm256_set1_ps(w[0]), _mm256_loadu_ps(x.add(j)));
            for (s, &ws) in w.iter().enumerate().skip(1) {
                a = _mm256_fmadd_ps(
                    _mm256_set1_ps(ws),
                    _mm256_loadu_ps(x.add(s * stride + j)),
                    a,
                );
            }
            _mm256_storeu_ps(out.add(j), a);
            j += 8;
        }
        while j < d {
            let mut a = w[0] * *x.add(j);
            for (s, &ws) in w.iter().enumerate().skip(1) {
                a += ws * *x.add(s * stride + j);
            }
            *out.add(j) = a;
            j += 1;
        }
    }

    pub(super) unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                let k = i + 8 * j;
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(k)), _mm256_loadu_ps(b.add(k)), *s);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut r = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        while i < n {
            r += *a.add(i) * *b.add(i);
            i += 1;
        }
        r
    }

    pub(super) unsafe fn dot4(a: *const f32, b: *const f32, stride: usize, n: usize) -> [f32; 4] {
        // Two sums per row: eight independent FMA chains.
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= n {
            let (a0, a1) = (_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(a.add(i + 8)));
            for (j, s) in acc.iter_mut().enumerate() {
                let r = b.add(j * stride + i);
                s[0] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(r), s[0]);
                s[1] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(r.add(8)), s[1]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for (j, s) in acc.iter().enumerate() {
            let v = _mm256_add_ps(s[0], s[1]);
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let mut r = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            for k in i..n {
                r += *a.add(k) * *b.add(j * stride + k);
            }
            out[j] = r;
        }
        out
    }

    pub(super) unsafe fn axpy(alpha: f32, x: *const f32, y: *mut f32, n: usize) {
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i)));
            _mm256_storeu_ps(y.add(i), v);
            i += 8;
        }
        while i < n {
            *y.add(i) += alpha * *x.add(i);
            i += 1;
        }
    }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_rows_equals_scale_then_axpy() {
        for (rows, d, stride) in [
            (1usize, 8usize, 8usize),
            (5, 37, 40),
            (9, 64, 96),
            (3, 5, 7),
        ] {
            let x: Vec<f32> = (0..rows * stride)
                .map(|i| (i as f32 * 0.31).sin())
                .collect();
            let w: Vec<f32> = (0..rows).map(|i| (i as f32 * 0.7).cos()).collect();
            let mut want = vec![0f32; d];
            scale(w[0], &x[..d], &mut want);
            for s in 1..rows {
                axpy(w[s], &x[s * stride..s * stride + d], &mut want);
            }
            let mut got = vec![f32::NAN; d];
            weighted_rows(&w, &x, stride, &mut got);
            assert_eq!(got, want, "rows {rows} d {d}");
        }
    }

    #[test]
    fn dot4_matches_four_dots_on_every_length() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 33, 256] {
            let stride = n + 3;
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..4 * stride).map(|i| (i as f32 * 0.11).cos()).collect();
            let got = dot4(&a, &b, stride);
            for (j, g) in got.iter().enumerate() {
                let want: f64 = (0..n).map(|i| a[i] as f64 * b[j * stride + i] as f64).sum();
                assert!((*g as f64 - want).abs() < 1e-4, "n={n} row {j}");
            }
        }
    }

    #[test]
    fn dot_and_axpy_match_plain_loops_on_every_length() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 256] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "dot n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            let mut z = vec![f32::NAN; n];
            scale(0.5, &a, &mut z);
            assert!(z.iter().zip(&a).all(|(z, a)| *z == 0.5 * a), "scale n={n}");
            for i in 0..n {
                assert!(
                    (y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6,
                    "axpy n={n} i={i}"
                );
            }
        }
    }
}

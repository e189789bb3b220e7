//! Prefill attention's two products over one block of the KV cache, for
//! many query rows at once: scores `S = scale · Q Kᵀ` and weighted sums
//! `O (+)= P V`. Decode attends one row at a time (`vector::dot4`,
//! `vector::weighted_rows`); there each key or value vector loaded feeds
//! one row's FMAs, four chains of them, which left prefill attention
//! latency- and load-bound (a tenth of pp4096). Here a 4-row by 2-key (or
//! 4-row by 16-dim) register block shares every load among 8 independent
//! FMA chains: 6 loads per 8 FMAs instead of 5 per 4.
//!
//! Each function has a scalar reference beside it ([`scores_ref`],
//! [`weighted_ref`]) and a property test against it; the SIMD versions add
//! in a different order, nothing else.

/// `s[r * ss + j] = scale * q_r · k_j` for rows `r < nr` (row `r` of `q` at
/// `r * qs`) and keys `j < nk` (key `j` of `k` at `j * ks`), all `hd` long.
#[allow(clippy::too_many_arguments)]
pub fn scores(
    q: &[f32],
    qs: usize,
    nr: usize,
    k: &[f32],
    ks: usize,
    nk: usize,
    hd: usize,
    scale: f32,
    s: &mut [f32],
    ss: usize,
) {
    if nr == 0 || nk == 0 {
        return;
    }
    assert!(
        q.len() >= (nr - 1) * qs + hd,
        "scores: query rows out of range"
    );
    assert!(k.len() >= (nk - 1) * ks + hd, "scores: keys out of range");
    assert!(s.len() >= (nr - 1) * ss + nk, "scores: output out of range");
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && super::simd().avx2().is_some() {
        // SAFETY: `avx2()` is `Some` only when the CPU has AVX2 and FMA;
        // every row, key and output read or written lies inside its slice
        // (checked above).
        return unsafe {
            x86::scores(
                q.as_ptr(),
                qs,
                nr,
                k.as_ptr(),
                ks,
                nk,
                hd,
                scale,
                s.as_mut_ptr(),
                ss,
            )
        };
    }
    scores_ref(q, qs, nr, k, ks, nk, hd, scale, s, ss)
}

/// The scalar reference of [`scores`].
#[allow(clippy::too_many_arguments)]
pub fn scores_ref(
    q: &[f32],
    qs: usize,
    nr: usize,
    k: &[f32],
    ks: usize,
    nk: usize,
    hd: usize,
    scale: f32,
    s: &mut [f32],
    ss: usize,
) {
    for r in 0..nr {
        let qr = &q[r * qs..r * qs + hd];
        for j in 0..nk {
            let kj = &k[j * ks..j * ks + hd];
            s[r * ss + j] = scale * qr.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// `o[r * os + d] (+)= Σ_j p[r * ps + j] * v[j * vs + d]` for rows `r < nr`,
/// keys `j < nk` and `d < hd`; adds to `o` when `accumulate`, else
/// overwrites it.
#[allow(clippy::too_many_arguments)]
pub fn weighted(
    p: &[f32],
    ps: usize,
    nr: usize,
    v: &[f32],
    vs: usize,
    nk: usize,
    hd: usize,
    o: &mut [f32],
    os: usize,
    accumulate: bool,
) {
    if nr == 0 {
        return;
    }
    assert!(
        o.len() >= (nr - 1) * os + hd,
        "weighted: output out of range"
    );
    if nk == 0 {
        if !accumulate {
            for r in 0..nr {
                o[r * os..r * os + hd].fill(0.0);
            }
        }
        return;
    }
    assert!(
        p.len() >= (nr - 1) * ps + nk,
        "weighted: weights out of range"
    );
    assert!(
        v.len() >= (nk - 1) * vs + hd,
        "weighted: values out of range"
    );
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && super::simd().avx2().is_some() {
        // SAFETY: as in `scores`: the CPU has AVX2 and FMA, and every read
        // and write lies inside its slice (checked above).
        return unsafe {
            x86::weighted(
                p.as_ptr(),
                ps,
                nr,
                v.as_ptr(),
                vs,
                nk,
                hd,
                o.as_mut_ptr(),
                os,
                accumulate,
            )
        };
    }
    weighted_ref(p, ps, nr, v, vs, nk, hd, o, os, accumulate)
}

/// The scalar reference of [`weighted`].
#[allow(clippy::too_many_arguments)]
pub fn weighted_ref(
    p: &[f32],
    ps: usize,
    nr: usize,
    v: &[f32],
    vs: usize,
    nk: usize,
    hd: usize,
    o: &mut [f32],
    os: usize,
    accumulate: bool,
) {
    for r in 0..nr {
        let or = &mut o[r * os..r * os + hd];
        if !accumulate {
            or.fill(0.0);
        }
        for j in 0..nk {
            let w = p[r * ps + j];
            for (od, vd) in or.iter_mut().zip(&v[j * vs..j * vs + hd]) {
                *od += w * vd;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::isa::avx2_fn;
    use std::arch::x86_64::*;

    /// Query rows per register block.
    const R: usize = 4;

    avx2_fn! {
    /// The sum of `v`'s 8 lanes.
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// `NR` rows (at most [`R`]) times `NK` keys (at most 2): `NR * NK`
    /// chains, each `q` and key vector loaded once per 8 dims.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block<const NR: usize, const NK: usize>(
        q: *const f32,
        qs: usize,
        k: *const f32,
        ks: usize,
        hd: usize,
        scale: f32,
        s: *mut f32,
        ss: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NK]; NR];
        let mut d = 0;
        while d < hd {
            let mut kv = [_mm256_setzero_ps(); NK];
            for (j, kj) in kv.iter_mut().enumerate() {
                *kj = _mm256_loadu_ps(k.add(j * ks + d));
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(q.add(r * qs + d));
                for (a, kj) in ar.iter_mut().zip(&kv) {
                    *a = _mm256_fmadd_ps(qv, *kj, *a);
                }
            }
            d += 8;
        }
        for (r, ar) in acc.iter().enumerate() {
            for (j, a) in ar.iter().enumerate() {
                *s.add(r * ss + j) = scale * hsum(*a);
            }
        }
    }

    /// [`super::scores`] for `hd` a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores(
        q: *const f32,
        qs: usize,
        nr: usize,
        k: *const f32,
        ks: usize,
        nk: usize,
        hd: usize,
        scale: f32,
        s: *mut f32,
        ss: usize,
    ) {
        let mut r = 0;
        while r < nr {
            let (qr, sr) = (q.add(r * qs), s.add(r * ss));
            let full = nr - r >= R;
            let mut j = 0;
            while j + 2 <= nk {
                let (kj, sj) = (k.add(j * ks), sr.add(j));
                if full {
                    score_block::<R, 2>(qr, qs, kj, ks, hd, scale, sj, ss);
                } else {
                    for i in 0..nr - r {
                        score_block::<1, 2>(qr.add(i * qs), qs, kj, ks, hd, scale, sj.add(i * ss), ss);
                    }
                }
                j += 2;
            }
            if j < nk {
                let (kj, sj) = (k.add(j * ks), sr.add(j));
                for i in 0..R.min(nr - r) {
                    score_block::<1, 1>(qr.add(i * qs), qs, kj, ks, hd, scale, sj.add(i * ss), ss);
                }
            }
            r += R;
        }
    }

    /// `NR` rows (at most [`R`]) times `NV` vectors of 8 dims (at most 2)
    /// from `d`, down all `nk` keys.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_block<const NR: usize, const NV: usize>(
        p: *const f32,
        ps: usize,
        v: *const f32,
        vs: usize,
        nk: usize,
        o: *mut f32,
        os: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; NR];
        if accumulate {
            for (r, ar) in acc.iter_mut().enumerate() {
                for (c, a) in ar.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(o.add(r * os + 8 * c));
                }
            }
        }
        for j in 0..nk {
            let mut vv = [_mm256_setzero_ps(); NV];
            for (c, vc) in vv.iter_mut().enumerate() {
                *vc = _mm256_loadu_ps(v.add(j * vs + 8 * c));
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*p.add(r * ps + j));
                for (a, vc) in ar.iter_mut().zip(&vv) {
                    *a = _mm256_fmadd_ps(w, *vc, *a);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (c, a) in ar.iter().enumerate() {
                _mm256_storeu_ps(o.add(r * os + 8 * c), *a);
            }
        }
    }

    /// [`super::weighted`] for `hd` a multiple of 8 and `nk >= 1`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted(
        p: *const f32,
        ps: usize,
        nr: usize,
        v: *const f32,
        vs: usize,
        nk: usize,
        hd: usize,
        o: *mut f32,
        os: usize,
        accumulate: bool,
    ) {
        let mut r = 0;
        while r < nr {
            let (pr, or) = (p.add(r * ps), o.add(r * os));
            let rows = R.min(nr - r);
            let mut d = 0;
            while d < hd {
                let two = hd - d >= 16;
                let (vd, od) = (v.add(d), or.add(d));
                match (rows == R, two) {
                    (true, true) => weighted_block::<R, 2>(pr, ps, vd, vs, nk, od, os, accumulate),
                    (true, false) => weighted_block::<R, 1>(pr, ps, vd, vs, nk, od, os, accumulate),
                    (false, _) => {
                        for i in 0..rows {
                            let (pi, oi) = (pr.add(i * ps), od.add(i * os));
                            if two {
                                weighted_block::<1, 2>(pi, ps, vd, vs, nk, oi, os, accumulate);
                            } else {
                                weighted_block::<1, 1>(pi, ps, vd, vs, nk, oi, os, accumulate);
                            }
                        }
                    }
                }
                d += if two { 16 } else { 8 };
            }
            r += R;
        }
    }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * seed).sin()).collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}: element {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn scores_match_the_reference_on_every_block_shape() {
        for (nr, nk, hd) in [(1, 1, 8), (4, 2, 16), (7, 5, 24), (9, 64, 256), (3, 3, 12)] {
            let (qs, ks, ss) = (hd + 3, 2 * hd + 1, nk + 2);
            let q = data(nr * qs, 0.37);
            let k = data(nk * ks, 0.11);
            let mut want = vec![-1f32; nr * ss];
            let mut got = want.clone();
            scores_ref(&q, qs, nr, &k, ks, nk, hd, 0.5, &mut want, ss);
            scores(&q, qs, nr, &k, ks, nk, hd, 0.5, &mut got, ss);
            close(&got, &want, &format!("scores {nr}x{nk}x{hd}"));
            // Outside each row's nk outputs nothing is written.
            for r in 0..nr {
                assert_eq!(&got[r * ss + nk..(r + 1) * ss], &[-1.0, -1.0]);
            }
        }
    }

    #[test]
    fn weighted_sums_match_the_reference_on_every_block_shape() {
        for (nr, nk, hd) in [
            (1, 1, 8),
            (4, 2, 16),
            (7, 5, 24),
            (9, 64, 256),
            (3, 3, 12),
            (5, 0, 8),
        ] {
            let (ps, vs, os) = (nk + 1, hd + 5, hd + 2);
            let p = data(nr * ps, 0.29);
            let v = data(nk.max(1) * vs, 0.13);
            for accumulate in [false, true] {
                let mut want = data(nr * os, 0.7);
                let mut got = want.clone();
                weighted_ref(&p, ps, nr, &v, vs, nk, hd, &mut want, os, accumulate);
                weighted(&p, ps, nr, &v, vs, nk, hd, &mut got, os, accumulate);
                close(
                    &got,
                    &want,
                    &format!("weighted {nr}x{nk}x{hd} {accumulate}"),
                );
            }
        }
    }
}

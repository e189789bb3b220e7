//! Normalisations and small element-wise helpers shared by the layers.

use rayon::prelude::*;

/// Rows one task of [`for_each_row`] takes: a few microseconds of work, so
/// the pool's scheduling does not show.
const ROWS_PER_TASK: usize = 8;

/// Runs `f(row index, row)` over the rows of width `width` of `x`, on the
/// pool's threads when there are several (a prompt's tokens), inline for
/// one (decode). Each row's numbers do not depend on the split.
pub fn for_each_row(x: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    debug_assert_eq!(x.len() % width.max(1), 0);
    if x.len() <= width * ROWS_PER_TASK {
        x.chunks_exact_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        x.par_chunks_mut(width * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, rows)| {
                for (i, r) in rows.chunks_exact_mut(width).enumerate() {
                    f(c * ROWS_PER_TASK + i, r);
                }
            });
    }
}

/// Zero-centred RMSNorm (Gemma style, used for every Qwen3-Next norm except
/// the DeltaNet output norm): `y = x / rms(x) * (1 + w)`, in place, over rows
/// of `w.len()` elements.
pub fn rms_norm_zc(x: &mut [f32], w: &[f32], eps: f32) {
    for_each_row(x, w.len(), |_, row| rms_norm_zc_row(row, w, eps));
}

/// [`rms_norm_zc`] of one row (`w.len()` elements), on this thread.
pub fn rms_norm_zc_row(row: &mut [f32], w: &[f32], eps: f32) {
    let inv = inv_rms(row, eps);
    for (v, wi) in row.iter_mut().zip(w) {
        *v = *v * inv * (1.0 + wi);
    }
}

/// Zero-centred RMSNorm from `x` into `out` (same shapes).
pub fn rms_norm_zc_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_zc(out, w, eps);
}

/// The gated RMSNorm of the DeltaNet output (`Qwen3NextRMSNormGated`), over
/// one head: `x = w * (x / rms(x)) * silu(z)`, with the weight used as stored
/// (no `1 +`).
pub fn rms_norm_gated(x: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), z.len());
    let inv = inv_rms(x, eps);
    for ((v, wi), zi) in x.iter_mut().zip(w).zip(z) {
        *v = wi * (*v * inv) * silu(*zi);
    }
}

/// `1 / sqrt(mean(x²) + eps)`, accumulated in f64 for stability.
#[inline]
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32
}

/// L2 normalisation as FLA/transformers do it: `x * rsqrt(Σx² + eps)`.
pub fn l2_norm(x: &mut [f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = (1.0 / (ss + eps as f64).sqrt()) as f32;
    for v in x {
        *v *= inv;
    }
}

/// SiLU, `x * sigmoid(x)`, on [`exp_poly`]: branch-free, so the loops
/// over a layer's activations vectorize, where libm's `expf` was a call
/// per element (1.7-2.3% of a prefill's forward in `perf`).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_poly(-x))
}

/// `e^x` in plain f32 arithmetic, within 3e-7 relative of the exact value
/// (about two units in the last place; `exp_poly_is_within_two_ulp`):
/// Cephes' `expf`, its range reduction by rounding (a magic-number add,
/// no libm `floor`) and its degree-6 polynomial, `2^n` put together in the
/// exponent bits. `x` is clamped to [-87, 88], where `2^n` stays a normal
/// number, so large negative `x` give ~1e-38 instead of 0 and large
/// positive ones ~1.7e38 instead of infinity; NaN stays NaN.
#[inline]
pub fn exp_poly(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds x * log2(e) to an integer held in the
    // low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts: n * LN2_HI is exact for |n| <= 127.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    // Cephes' 5.0000001201e-1, which is 0.5 in f32.
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // t's bits are those of ROUND plus n; shifted up by 23 with 127 added,
    // the biased exponent of 2^n (ROUND's own bits shift out).
    y * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch's softplus (beta 1, threshold 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// In-place softmax over a slice.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_poly_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((super::exp_poly(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_731;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert!(super::exp_poly(f32::NAN).is_nan());
        assert_eq!(super::exp_poly(0.0), 1.0);
        assert!(super::exp_poly(-1000.0) < 1e-37 && super::exp_poly(-1000.0) > 0.0);
        assert!(super::exp_poly(1000.0).is_finite() && super::exp_poly(1000.0) > 1e38);
        assert!(super::exp_poly(f32::INFINITY) > 1e38);
    }

    #[test]
    fn silu_matches_its_definition_and_keeps_nan() {
        for i in -4000..4000 {
            let x = i as f32 * 0.01;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let got = super::silu(x) as f64;
            assert!(
                (got - want).abs() <= 4e-7 * want.abs().max(1e-30),
                "silu({x}) = {got}, want {want}"
            );
        }
        assert!(super::silu(f32::NAN).is_nan());
        assert_eq!(super::silu(f32::INFINITY), f32::INFINITY);
        assert!(super::silu(-200.0).abs() < 1e-30);
    }

    use super::*;

    #[test]
    fn zero_centred_norm_uses_one_plus_w() {
        let mut x = vec![3.0, 4.0];
        // rms = sqrt(12.5); w = 0 means scale 1.
        rms_norm_zc(&mut x, &[0.0, 1.0], 0.0);
        let r = 12.5f32.sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6);
        assert!((x[1] - 2.0 * 4.0 / r).abs() < 1e-6);
    }

    #[test]
    fn gated_norm_uses_plain_weight_and_silu_gate() {
        let mut x = vec![1.0, -1.0];
        rms_norm_gated(&mut x, &[0.0, 2.0], &[2.0, 1.0], 0.0);
        assert!((x[0] - 0.0).abs() < 1e-6); // silu(0) = 0
        assert!((x[1] - (-1.0 * silu(2.0))).abs() < 1e-6);
    }

    #[test]
    fn l2_and_softplus_and_softmax() {
        let mut v = vec![3.0, 4.0];
        l2_norm(&mut v, 0.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(softplus(30.0), 30.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-6);
        let mut p = vec![1.0, 1.0, 1.0, 1.0];
        softmax(&mut p);
        assert!(p.iter().all(|&x| (x - 0.25).abs() < 1e-6));
    }
}

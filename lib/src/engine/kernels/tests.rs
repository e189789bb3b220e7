//! Property tests: every SIMD kernel against the scalar reference on random
//! shapes, scales (negative ones included), zero kinds, bit widths, dense
//! types and misaligned payloads.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::mmap::MappedFile;
use crate::tensor::{Bytes, DenseMatrix, FloatType, QuantMatrix, Zeros, QBLOCK};

/// Random int4/int8 matrix; scales of either sign, zeros symmetric or per group.
pub(super) fn rand_quant(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    per_group: bool,
) -> QuantMatrix {
    let ng = cols.div_ceil(group);
    let mut q = vec![0u8; rows * QuantMatrix::packed_row_bytes(cols, bits)];
    rng.fill(&mut q[..]);
    let scales: Vec<u8> = (0..rows * ng)
        .flat_map(|_| {
            let s: f32 = rng.gen_range(0.001..0.05) * if rng.gen_bool(0.3) { -1.0 } else { 1.0 };
            half::f16::from_f32(s).to_le_bytes()
        })
        .collect();
    let zeros = if per_group {
        let maxz = (1u16 << bits) - 1;
        let z: Vec<u8> = (0..rows * ng)
            .flat_map(|_| rng.gen_range(0..=maxz).to_le_bytes())
            .collect();
        Zeros::PerGroup(Bytes::copy_from(&z))
    } else {
        Zeros::Symmetric
    };
    QuantMatrix {
        rows,
        cols,
        bits,
        group_size: group,
        qdata: Bytes::copy_from(&q),
        scales: Bytes::copy_from(&scales),
        zeros,
    }
}

pub(super) fn rand_dense(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    dtype: FloatType,
) -> DenseMatrix {
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|_| {
            let v: f32 = rng.gen_range(-1.0..1.0);
            match dtype {
                FloatType::F32 => v.to_le_bytes().to_vec(),
                FloatType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                FloatType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            }
        })
        .collect();
    DenseMatrix {
        rows,
        cols,
        dtype,
        data: Bytes::copy_from(&data),
    }
}

pub(super) fn rand_x(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
}

/// The dequantized matrix, row-major.
pub(super) fn dense_f32(w: &Matrix) -> Vec<f32> {
    let mut out = vec![0f32; w.rows() * w.cols()];
    for (r, o) in out.chunks_exact_mut(w.cols()).enumerate() {
        scalar::row(w, r, o);
    }
    out
}

pub(super) fn scalar_y(w: &Matrix, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; w.rows()];
    scalar_matvec(w, x, &mut y);
    y
}

/// `Σ_k |W[r, k] x[k]|` per row: the scale errors are measured against.
pub(super) fn magnitudes(wf: &[f32], cols: usize, x: &[f32]) -> Vec<f64> {
    wf.chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(w, x)| (w * x).abs() as f64).sum())
        .collect()
}

/// Per-row error bound for activations quantized per `span` elements with
/// half a step of `amax / half_steps`: the f32 path's slack plus
/// `Σ_k |W[r, k]|` times the half step of `k`'s span.
pub(super) fn activation_bound(
    wf: &[f32],
    cols: usize,
    x: &[f32],
    span: usize,
    half_steps: f32,
) -> Vec<f64> {
    let steps: Vec<f32> = x
        .chunks(span)
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())) / half_steps)
        .collect();
    wf.chunks_exact(cols)
        .zip(magnitudes(wf, cols, x))
        .map(|(row, m)| {
            let q: f64 = row
                .iter()
                .enumerate()
                .map(|(k, w)| (w.abs() * steps[k / span]) as f64)
                .sum();
            q * 1.001 + 1e-5 * m + 1e-6
        })
        .collect()
}

pub(super) fn assert_close(what: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    for (r, ((g, w), b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (*g as f64 - *w as f64).abs();
        assert!(
            err <= *b,
            "{what}: row {r}: got {g}, scalar {w}, error {err:e} > bound {b:e}"
        );
    }
}

fn have_simd() -> bool {
    !matches!(simd(), Simd::None)
}

/// The SIMD levels this CPU runs, whatever `RH_KERNELS` says.
fn simd_isas() -> Vec<Isa> {
    isas().into_iter().filter(|i| *i != Isa::Scalar).collect()
}

#[test]
fn quant_matvec_matches_scalar_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..60 {
        let bits = if case % 2 == 0 { 4 } else { 8 };
        let group = [32, 64, 128][case % 3];
        let cols = group * rng.gen_range(1..=4) + if case % 5 == 0 { 32 } else { 0 };
        let rows = rng.gen_range(1..=300);
        let per_group = case % 4 >= 2;
        let w = Matrix::Quant(rand_quant(&mut rng, rows, cols, bits, group, per_group));
        let x = rand_x(&mut rng, cols);
        let want = scalar_y(&w, &x);
        let wf = dense_f32(&w);
        let mags = magnitudes(&wf, cols, &x);
        let label = format!("case {case}: {bits}-bit [{rows}, {cols}] g{group} pg={per_group}");

        let mut y = vec![0f32; rows];
        matvec_path(&w, &x, &mut y, Path::SimdF32);
        let tight: Vec<f64> = mags.iter().map(|m| 1e-5 * m + 1e-6).collect();
        assert_close(&format!("{label} f32"), &y, &want, &tight);

        // Int8 activations: each element moves by at most half a step
        // d_b / 2 = amax_b / 254, so the error is bounded by Σ |W| d_b / 2.
        matvec_path(&w, &x, &mut y, Path::SimdInt8);
        let bound = activation_bound(&wf, cols, &x, QBLOCK, 254.0);
        assert_close(&format!("{label} int8"), &y, &want, &bound);

        // Int16 activations: half a step is amax / 65534 per element, with
        // amax taken per 32-block (AVX2) or per weight group (AVX-512, never
        // smaller), so the bound is the f32 path's plus Σ |W| amax_g / 65534.
        let bound16 = activation_bound(&wf, cols, &x, group, 65534.0);
        for isa in simd_isas() {
            matvec_isa(isa, &w, &x, &mut y, Path::SimdInt16);
            assert_close(&format!("{label} int16 {isa:?}"), &y, &want, &bound16);
        }
    }
}

#[test]
fn int8_activation_error_is_small_relative_to_the_dot_magnitude() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut worst = 0f64;
    for bits in [4u8, 8] {
        let w = Matrix::Quant(rand_quant(&mut rng, 200, 512, bits, 128, false));
        let x = rand_x(&mut rng, 512);
        let want = scalar_y(&w, &x);
        let mags = magnitudes(&dense_f32(&w), 512, &x);
        let mut y = vec![0f32; 200];
        matvec_path(&w, &x, &mut y, Path::SimdInt8);
        for ((g, w), m) in y.iter().zip(&want).zip(&mags) {
            worst = worst.max((*g as f64 - *w as f64).abs() / m);
        }
    }
    // Uniform activations: about 1/254 per element at worst, far less summed.
    assert!(worst < 4e-3, "worst relative error {worst:e}");
}

#[test]
fn int16_activation_error_is_f32_grade() {
    let mut rng = StdRng::seed_from_u64(19);
    let mut worst = 0f64;
    for bits in [4u8, 8] {
        for per_group in [false, true] {
            let w = Matrix::Quant(rand_quant(&mut rng, 200, 512, bits, 128, per_group));
            let x = rand_x(&mut rng, 512);
            let want = scalar_y(&w, &x);
            let mags = magnitudes(&dense_f32(&w), 512, &x);
            for isa in simd_isas() {
                let mut y = vec![0f32; 200];
                matvec_isa(isa, &w, &x, &mut y, Path::SimdInt16);
                for ((g, w), m) in y.iter().zip(&want).zip(&mags) {
                    worst = worst.max((*g as f64 - *w as f64).abs() / m);
                }
            }
        }
    }
    // Half a step is 1/65534 of the block maximum; summed errors cancel.
    assert!(worst < 2e-5, "worst relative error {worst:e}");
}

#[test]
fn dense_matvec_and_rows_match_scalar() {
    let mut rng = StdRng::seed_from_u64(3);
    for case in 0..30 {
        let dtype = [FloatType::F32, FloatType::F16, FloatType::BF16][case % 3];
        let rows = rng.gen_range(1..=300);
        let cols = rng.gen_range(1..=300);
        let w = Matrix::Dense(rand_dense(&mut rng, rows, cols, dtype));
        let x = rand_x(&mut rng, cols);
        let want = scalar_y(&w, &x);
        let mags = magnitudes(&dense_f32(&w), cols, &x);
        let tight: Vec<f64> = mags.iter().map(|m| 1e-5 * m + 1e-6).collect();
        for path in [Path::SimdF32, Path::SimdInt8, Path::SimdInt16] {
            let mut y = vec![0f32; rows];
            matvec_path(&w, &x, &mut y, path);
            assert_close(
                &format!("case {case} {dtype:?} [{rows}, {cols}]"),
                &y,
                &want,
                &tight,
            );
        }
        let r = rng.gen_range(0..rows);
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        row(&w, r, &mut a);
        scalar::row(&w, r, &mut b);
        assert_eq!(a, b, "row {r} of case {case}");
    }
}

#[test]
fn quant_rows_match_scalar() {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..12 {
        let bits = if case % 2 == 0 { 4 } else { 8 };
        let w = Matrix::Quant(rand_quant(
            &mut rng,
            9,
            96,
            bits,
            [32, 64][(case / 2) % 2],
            case >= 6,
        ));
        for r in 0..9 {
            let (mut a, mut b) = (vec![0f32; 96], vec![0f32; 96]);
            row(&w, r, &mut a);
            scalar::row(&w, r, &mut b);
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "case {case} r {r} k {k}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn matmul_matches_scalar_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(9);
    for case in 0..30 {
        let n = [2, 3, 4, 5, 7, 50, 97][case % 7];
        let rows = rng.gen_range(1..=130);
        let dcols = rng.gen_range(1..=100);
        let w = match case % 5 {
            0 => Matrix::Dense(rand_dense(&mut rng, rows, dcols, FloatType::BF16)),
            1 => Matrix::Dense(rand_dense(&mut rng, rows, 64, FloatType::F32)),
            2 => Matrix::Quant(rand_quant(&mut rng, rows, 128, 8, 64, case % 2 == 0)),
            3 => Matrix::Quant(rand_quant(&mut rng, rows, 160, 4, 32, case % 2 == 1)),
            _ => Matrix::Quant(rand_quant(&mut rng, rows, 416, 4, 128, case % 2 == 1)),
        };
        let cols = w.cols();
        let x = rand_x(&mut rng, n * cols);
        let mut want = vec![0f32; n * rows];
        scalar_matmul(&w, &x, n, &mut want);
        let wf = dense_f32(&w);
        let levels = simd_isas().into_iter();
        for (isa, path) in
            levels.flat_map(|i| [Path::SimdF32, Path::SimdInt8, Path::SimdInt16].map(|p| (i, p)))
        {
            let mut y = vec![f32::NAN; n * rows];
            matmul_isa(isa, &w, &x, n, &mut y, path);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                // Int16 activations (integer-tile prefill) add half a step per
                // element, amax_g / 65534 over the weight group.
                let group = match &w {
                    Matrix::Quant(q) if path == Path::SimdInt16 => q.group_size,
                    _ => 0,
                };
                let tight: Vec<f64> = if group > 0 {
                    activation_bound(&wf, cols, xt, group, 65534.0)
                } else {
                    magnitudes(&wf, cols, xt)
                        .iter()
                        .map(|m| 1e-5 * m + 1e-6)
                        .collect()
                };
                assert_close(
                    &format!("case {case} {isa:?} {path:?} n={n} token {t}"),
                    &y[t * rows..(t + 1) * rows],
                    &want[t * rows..(t + 1) * rows],
                    &tight,
                );
            }
        }
    }
}

/// A matrix whose payloads sit at odd offsets of a mapped file.
#[test]
fn misaligned_mapped_payloads_give_the_same_numbers() {
    let mut rng = StdRng::seed_from_u64(13);
    for (bits, per_group) in [(4u8, false), (4, true), (8, false), (8, true)] {
        let m = rand_quant(&mut rng, 37, 256, bits, 64, per_group);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let mut file = vec![0u8; 3];
        let q_off = file.len();
        file.extend_from_slice(m.qdata.as_slice());
        file.push(0);
        let s_off = file.len();
        file.extend_from_slice(m.scales.as_slice());
        file.push(0);
        let z_off = file.len();
        if let Zeros::PerGroup(z) = &m.zeros {
            file.extend_from_slice(z.as_slice());
        }
        std::fs::write(&path, &file).unwrap();
        let f: Arc<MappedFile> = MappedFile::open(&path).unwrap();
        let mapped = QuantMatrix {
            qdata: Bytes::mapped(f.clone(), q_off, m.qdata.len()).unwrap(),
            scales: Bytes::mapped(f.clone(), s_off, m.scales.len()).unwrap(),
            zeros: match &m.zeros {
                Zeros::PerGroup(z) => {
                    Zeros::PerGroup(Bytes::mapped(f.clone(), z_off, z.len()).unwrap())
                }
                Zeros::Symmetric => Zeros::Symmetric,
            },
            ..m.clone()
        };
        assert!(mapped.qdata.as_slice().as_ptr() as usize % 2 == 1);
        let (w0, w1) = (Matrix::Quant(m), Matrix::Quant(mapped));
        let x = rand_x(&mut rng, 256);
        for path in [Path::SimdF32, Path::SimdInt8, Path::SimdInt16] {
            for isa in simd_isas() {
                let (mut a, mut b) = (vec![0f32; 37], vec![0f32; 37]);
                matvec_isa(isa, &w0, &x, &mut a, path);
                matvec_isa(isa, &w1, &x, &mut b, path);
                assert_eq!(a, b, "{bits}-bit per_group={per_group} {path:?} {isa:?}");
            }
        }
        let x2 = rand_x(&mut rng, 256 * 4);
        let (mut a, mut b) = (vec![0f32; 37 * 4], vec![0f32; 37 * 4]);
        matmul(&w0, &x2, 4, &mut a);
        matmul(&w1, &x2, 4, &mut b);
        assert_eq!(a, b);
    }
    // Dense bf16 at an odd offset.
    let d = rand_dense(&mut rng, 5, 77, FloatType::BF16);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.bin");
    let mut file = vec![9u8];
    file.extend_from_slice(d.data.as_slice());
    std::fs::write(&path, &file).unwrap();
    let f = MappedFile::open(&path).unwrap();
    let dm = DenseMatrix {
        data: Bytes::mapped(f, 1, d.data.len()).unwrap(),
        ..d.clone()
    };
    let x = rand_x(&mut rng, 77);
    let (mut a, mut b) = (vec![0f32; 5], vec![0f32; 5]);
    matvec(&Matrix::Dense(d), &x, &mut a);
    matvec(&Matrix::Dense(dm), &x, &mut b);
    assert_eq!(a, b);
}

#[test]
#[should_panic(expected = "invalid weight matrix")]
fn short_payload_is_refused() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut m = rand_quant(&mut rng, 4, 64, 4, 32, false);
    m.qdata = Bytes::copy_from(&m.qdata.as_slice()[..m.qdata.len() - 1]);
    let mut y = vec![0f32; 4];
    matvec(&Matrix::Quant(m), &[0.0; 64], &mut y);
}

#[test]
#[should_panic(expected = "multiples of 32")]
fn group_size_not_a_multiple_of_32_is_refused() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut m = rand_quant(&mut rng, 4, 64, 4, 32, false);
    m.group_size = 48;
    m.scales = Bytes::copy_from(&[0u8; 4 * 2 * 2]);
    let mut y = vec![0f32; 4];
    matvec(&Matrix::Quant(m), &[0.0; 64], &mut y);
}

#[test]
fn simd_is_detected_on_x86_64_with_avx2() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && crate::env::kernels_cap().is_none()
    {
        assert!(have_simd(), "AVX2 present but the SIMD path is off");
    }
    let _ = have_simd();
}

#[test]
fn avx512_vnni_is_detected_when_the_cpu_has_it() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert_eq!(isas().last(), Some(&Isa::Avx512Vnni));
    }
    assert_eq!(isas()[0], Isa::Scalar);
}

#[test]
fn avx_vnni_is_detected_when_the_cpu_runs_it() {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = ["avx2", "fma", "f16c"].into_iter().all(super::isa::cpu_has);
        let vex = std::is_x86_feature_detected!("avxvnni");
        let evex = std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl");
        assert_eq!(isas().contains(&Isa::AvxVnni), avx2 && (vex || evex));
    }
}

/// `(bits, group size, columns)`: the model's shapes, groups of every size
/// the cache allows (partial last groups, groups longer than an i32 lane may
/// add unscaled in some kernels).
const MODEL_SHAPES: [(u8, usize, usize); 10] = [
    (4, 128, 2048),
    (8, 128, 2048),
    (4, 32, 512),
    (8, 32, 544),
    (4, 96, 416),
    (4, 256, 2080),
    (8, 512, 1056),
    (8, 4096, 4096),
    (8, 8192, 8192),
    (4, 8192, 8192),
];

/// Long rows, groups of every size the cache allows, partial last groups
/// and large activations: the AVX-512 path against the AVX2 one and the
/// scalar reference.
#[test]
fn int16_levels_agree_on_model_shapes() {
    let mut rng = StdRng::seed_from_u64(23);
    for (case, (bits, group, cols)) in MODEL_SHAPES.into_iter().enumerate() {
        let w = Matrix::Quant(rand_quant(&mut rng, 33, cols, bits, group, case % 2 == 0));
        let x: Vec<f32> = rand_x(&mut rng, cols).iter().map(|v| v * 300.0).collect();
        let want = scalar_y(&w, &x);
        let mags = magnitudes(&dense_f32(&w), cols, &x);
        for isa in simd_isas() {
            let mut y = vec![0f32; 33];
            matvec_isa(isa, &w, &x, &mut y, Path::SimdInt16);
            for (r, ((g, w), m)) in y.iter().zip(&want).zip(&mags).enumerate() {
                let rel = (*g as f64 - *w as f64).abs() / m;
                assert!(
                    rel < 3e-5,
                    "{bits}-bit g{group} [{cols}] {isa:?} row {r}: {g} vs {w} ({rel:e})"
                );
            }
        }
    }
}

#[test]
fn non_finite_activations_stay_visible() {
    let mut rng = StdRng::seed_from_u64(17);
    for bits in [4u8, 8] {
        let w = Matrix::Quant(rand_quant(&mut rng, 8, 128, bits, 64, false));
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = rand_x(&mut rng, 128);
            x[70] = bad;
            for path in [Path::Scalar, Path::SimdF32, Path::SimdInt8, Path::SimdInt16] {
                for isa in isas() {
                    let mut y = vec![0f32; 8];
                    matvec_isa(isa, &w, &x, &mut y, path);
                    assert!(
                        y.iter().all(|v| !v.is_finite()),
                        "{bits}-bit {path:?} {isa:?} with {bad}: {y:?}"
                    );
                }
            }
        }
    }
}

/// Prefill products on the shapes and group sizes the cache allows: every
/// group size (partial last groups, groups longer than an i32 lane may add
/// unscaled), row counts around the 16- and 8-row tiles, token counts around the
/// tokens of one pass, large activations, and a token holding NaN, whose
/// outputs must show it while the other tokens' stay right; at every level.
#[test]
fn int16_matmul_matches_scalar_on_model_shapes() {
    let mut rng = StdRng::seed_from_u64(29);
    for (case, (bits, group, cols)) in MODEL_SHAPES.into_iter().enumerate() {
        let rows = [1, 15, 16, 17, 33, 50, 9, 40, 3, 18][case];
        let n = [2, 9, 10, 17, 8, 3, 16, 25, 7, 11][case];
        let w = Matrix::Quant(rand_quant(&mut rng, rows, cols, bits, group, case % 2 == 0));
        let mut x: Vec<f32> = rand_x(&mut rng, n * cols)
            .iter()
            .map(|v| v * 300.0)
            .collect();
        let bad = 1;
        x[bad * cols + cols / 2] = f32::NAN;
        let mut want = vec![0f32; n * rows];
        scalar_matmul(&w, &x, n, &mut want);
        let wf = dense_f32(&w);
        for isa in simd_isas() {
            let mut y = vec![0f32; n * rows];
            matmul_isa(isa, &w, &x, n, &mut y, Path::SimdInt16);
            for t in 0..n {
                let got = &y[t * rows..(t + 1) * rows];
                if t == bad {
                    assert!(
                        got.iter().all(|v| !v.is_finite()),
                        "case {case} {isa:?}: {got:?}"
                    );
                    continue;
                }
                let xt = &x[t * cols..(t + 1) * cols];
                assert_close(
                    &format!(
                        "case {case} {isa:?}: {bits}-bit g{group} [{rows}x{cols}] n={n} token {t}"
                    ),
                    got,
                    &want[t * rows..(t + 1) * rows],
                    &activation_bound(&wf, cols, xt, group, 65534.0),
                );
            }
        }
    }
}

/// The AVX-VNNI level's tiles add the same integer products as AVX2's in
/// one instruction instead of two, and scale them in the same order: the
/// same bits, on every model shape (with large activations, where the
/// sums of a flush are largest) and token counts around one pass's.
#[test]
fn avx_vnni_matmul_is_avx2s_bit_for_bit() {
    if !isas().contains(&Isa::AvxVnni) {
        eprintln!("skipped: this CPU runs neither AVX-VNNI nor AVX-512 VNNI with VL");
        return;
    }
    let mut rng = StdRng::seed_from_u64(37);
    for (case, (bits, group, cols)) in MODEL_SHAPES.into_iter().enumerate() {
        let rows = [16, 15, 17, 33, 8, 40, 1, 50, 9, 18][case];
        let n = [6, 12, 5, 13, 8, 7, 30, 3, 11, 9][case];
        let w = Matrix::Quant(rand_quant(&mut rng, rows, cols, bits, group, case % 2 == 1));
        let x: Vec<f32> = rand_x(&mut rng, n * cols).iter().map(|v| v * 1e4).collect();
        let mut want = vec![f32::NAN; n * rows];
        matmul_isa(Isa::Avx2, &w, &x, n, &mut want, Path::SimdInt16);
        let mut got = vec![f32::NAN; n * rows];
        matmul_isa(Isa::AvxVnni, &w, &x, n, &mut got, Path::SimdInt16);
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "case {case}: {bits}-bit g{group} [{rows}x{cols}] n={n}"
        );
    }
}

/// One task or many, a product gives the same numbers.
#[test]
fn one_task_matmul_equals_the_split_one() {
    let mut rng = StdRng::seed_from_u64(31);
    for (bits, group) in [(4u8, 128usize), (8, 32)] {
        let w = Matrix::Quant(rand_quant(&mut rng, 100, 512, bits, group, bits == 8));
        let x = rand_x(&mut rng, 11 * 512);
        let mut a = vec![0f32; 11 * 100];
        let mut b = vec![1f32; 11 * 100];
        matmul(&w, &x, 11, &mut a);
        matmul_one_task(&w, &x, 11, &mut b);
        assert_eq!(a, b, "{bits}-bit");
    }
}

/// Prefill tiles take a long prompt's tokens in blocks (512): each
/// token's outputs
/// are bit for bit what a product of fewer tokens (one block, more than
/// the small-batch path's few) gives, every column of every row written,
/// at every level.
#[test]
fn int16_matmul_in_token_blocks_equals_short_products() {
    let mut rng = StdRng::seed_from_u64(53);
    let (rows, cols, n, part) = (20, 256, 1100, 100);
    for (bits, group) in [(4u8, 128usize), (8, 64)] {
        let w = Matrix::Quant(rand_quant(&mut rng, rows, cols, bits, group, bits == 4));
        let x = rand_x(&mut rng, n * cols);
        for isa in simd_isas() {
            let mut all = vec![f32::NAN; n * rows];
            matmul_isa(isa, &w, &x, n, &mut all, Path::SimdInt16);
            for t0 in (0..n).step_by(part) {
                let k = part.min(n - t0);
                let mut y = vec![f32::NAN; k * rows];
                matmul_isa(
                    isa,
                    &w,
                    &x[t0 * cols..(t0 + k) * cols],
                    k,
                    &mut y,
                    Path::SimdInt16,
                );
                let same = y
                    .iter()
                    .zip(&all[t0 * rows..(t0 + k) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{bits}-bit at {}: tokens {t0}..", isa.name());
            }
        }
    }
}

#[test]
fn batched_matvec_equals_one_at_a_time_bit_for_bit() {
    // Quant and dense jobs mixed, some sharing an input (one activation
    // quantization for them), at every level and path: each output row
    // must be what `matvec_isa` gives for that job alone.
    let mut rng = StdRng::seed_from_u64(91);
    let mats: Vec<Matrix> = vec![
        Matrix::Quant(rand_quant(&mut rng, 37, 256, 4, 128, false)),
        Matrix::Quant(rand_quant(&mut rng, 300, 256, 8, 64, true)),
        Matrix::Dense(rand_dense(&mut rng, 9, 256, FloatType::BF16)),
        Matrix::Quant(rand_quant(&mut rng, 64, 96, 4, 32, true)),
        Matrix::Quant(rand_quant(&mut rng, 1, 256, 4, 256, false)),
    ];
    let xa = rand_x(&mut rng, 256);
    let xb = rand_x(&mut rng, 96);
    let xs: Vec<&[f32]> = vec![&xa, &xa, &xa, &xb, &xa];
    let paths = [Path::SimdInt16, Path::SimdInt8, Path::SimdF32, Path::Scalar];
    for isa in isas() {
        for path in paths {
            let want: Vec<Vec<f32>> = mats
                .iter()
                .zip(&xs)
                .map(|(w, x)| {
                    let mut y = vec![0f32; w.rows()];
                    matvec_isa(isa, w, x, &mut y, path);
                    y
                })
                .collect();
            let mut got: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; w.rows()]).collect();
            let mut jobs: Vec<Product> = mats
                .iter()
                .zip(&xs)
                .zip(&mut got)
                .map(|((w, x), y)| Product::new(w, x, y))
                .collect();
            matvec_batch_isa(isa, &mut jobs, path);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "job {i} at {} on {}", isa.name(), path.name());
            }
        }
    }
}

/// A few tokens (the small-batch path: several sequences decoding
/// together) give each token exactly what its own matvec gives, split over
/// the threads or as one task, at every level, on quantized and dense
/// weights.
#[test]
fn small_batch_matmul_is_each_tokens_matvec_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(47);
    let mats = [
        Matrix::Quant(rand_quant(&mut rng, 300, 512, 4, 128, false)),
        Matrix::Quant(rand_quant(&mut rng, 77, 256, 8, 32, true)),
        // Wide enough for the AVX-512 level's wide rows kernel.
        Matrix::Quant(rand_quant(&mut rng, 45, 1024, 8, 128, false)),
        Matrix::Quant(rand_quant(&mut rng, 19, 1152, 8, 64, true)),
        Matrix::Dense(rand_dense(&mut rng, 129, 101, FloatType::BF16)),
        Matrix::Dense(rand_dense(&mut rng, 40, 64, FloatType::F32)),
        Matrix::Dense(rand_dense(&mut rng, 33, 77, FloatType::F16)),
    ];
    for w in &mats {
        let cols = w.cols();
        for n in [2, 3, 4, 5, 6, 7, super::SMALL_BATCH_TOKENS] {
            let x = rand_x(&mut rng, n * cols);
            for isa in simd_isas() {
                for path in [Path::SimdF32, Path::SimdInt16] {
                    let small = match w {
                        Matrix::Dense(_) => n <= super::SMALL_BATCH_TOKENS,
                        Matrix::Quant(q) => {
                            n <= super::SMALL_BATCH_QUANT_TOKENS
                                || (path == Path::SimdInt16
                                    && q.bits == 8
                                    && q.cols >= super::WIDE_MIN_COLS
                                    && n <= match isa {
                                        Isa::Avx512Vnni => super::WIDE_QUANT_TOKENS,
                                        _ => super::AVX2_ROW_QUANT_TOKENS,
                                    })
                        }
                    };
                    if !small {
                        continue;
                    }
                    let mut y = vec![f32::NAN; n * w.rows()];
                    matmul_isa(isa, w, &x, n, &mut y, path);
                    for t in 0..n {
                        let mut want = vec![0f32; w.rows()];
                        matvec_isa(isa, w, &x[t * cols..(t + 1) * cols], &mut want, path);
                        assert_eq!(
                            &y[t * w.rows()..(t + 1) * w.rows()],
                            &want[..],
                            "{isa:?} {path:?} n={n} token {t}"
                        );
                    }
                }
            }
            if matches!(w, Matrix::Dense(_)) {
                let mut a = vec![0f32; n * w.rows()];
                let mut b = vec![1f32; n * w.rows()];
                matmul(w, &x, n, &mut a);
                matmul_one_task(w, &x, n, &mut b);
                assert_eq!(a, b, "one task vs split, n={n}");
            }
        }
    }
}

//! x86_64 kernels for CPUs with AVX2, FMA and F16C (Haswell and later,
//! Zen and later), chosen at run time.
//!
//! Every `unsafe fn` here is `#[target_feature]`-gated and reads through raw
//! pointers with unaligned loads. Safety rests on two things the safe
//! wrappers on [`Avx2`] establish before calling in:
//!
//! * an [`Avx2`] value exists only after [`Avx2::detect`] saw the features
//!   on the running CPU, so executing the instructions is defined;
//! * the views ([`QuantView`], [`DenseView`]) are built from matrices whose
//!   byte lengths were checked against their shapes, and every wrapper checks
//!   row indices and slice lengths, so every pointer offset stays inside its
//!   slice.
//!
//! Payloads from a mapped file may sit at any address: only unaligned loads
//! (`loadu`, `loadl`) are used.

// `%` rather than `is_multiple_of`, which is newer than the workspace's
// minimum Rust (1.85).
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use crate::kernels::isa::avx2_fn;
use std::arch::x86_64::*;

use super::avx2_prefill::Vnni256;
use crate::tensor::{DenseMatrix, FloatType, LayoutError, QuantMatrix, Zeros, QBLOCK};

/// Proof that the running CPU has AVX2, FMA and F16C; only
/// [`Avx2::detect`] makes one. With `vnni` it also proves the
/// [`Isa::AvxVnni`](super::Isa::AvxVnni) level, whose prefill tiles
/// multiply in VNNI (see [`Avx2::with_vnni`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2 {
    pub(crate) vnni: Option<Vnni256>,
}

impl Avx2 {
    /// `Some` when the CPU supports the instructions these kernels use.
    pub(crate) fn detect() -> Option<Avx2> {
        if let Some(v) = crate::env::prefetch_bytes() {
            PREFETCH_BYTES.store(v, std::sync::atomic::Ordering::Relaxed);
            PREFETCH_SET.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        super::Isa::Avx2.supported().then_some(Avx2 { vnni: None })
    }

    /// This level with the prefill tiles' multiply-adds in VNNI, where the
    /// CPU runs [`Isa::AvxVnni`](super::Isa::AvxVnni).
    pub(crate) fn with_vnni(self) -> Option<Avx2> {
        Vnni256::detect().map(|v| Avx2 { vnni: Some(v) })
    }
}

/// A validated borrow of a [`QuantMatrix`].
pub(crate) struct QuantView<'a> {
    pub(super) q: &'a [u8],
    pub(super) scales: &'a [u8],
    pub(super) zeros: Option<&'a [u8]>,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) bits: u8,
    pub(super) group_size: usize,
    pub(super) n_groups: usize,
    pub(super) row_bytes: usize,
    /// Software-prefetch distance for these weights ([`prefetch_distance`]).
    pub(super) pf: usize,
}

/// A prefill tile's per-group scales, the same at every level: per group,
/// one lane per tile row of the row's scale and of `scale * zero` (zero
/// for lanes past the tile's rows).
pub(crate) struct TileScales {
    /// Per group, `lanes` rows' scales.
    pub(crate) scale: Vec<f32>,
    /// Per group, `lanes` rows' `scale * zero`.
    pub(crate) scale_zero: Vec<f32>,
    lanes: usize,
    /// One row's scales as f32, while loading (kept to spare an
    /// allocation per tile).
    row: Vec<f32>,
}

impl TileScales {
    /// Scales for tiles of `lanes` rows of matrices of `v`'s shape.
    pub(crate) fn new(v: &QuantView, lanes: usize) -> TileScales {
        TileScales {
            scale: vec![0.0; v.n_groups * lanes],
            scale_zero: vec![0.0; v.n_groups * lanes],
            lanes,
            row: vec![0.0; v.n_groups],
        }
    }

    /// Loads rows `r0..r0 + nr` of `v` (lane `i` for row `r0 + i`).
    /// `to_f32` converts one row's f16 scales (its `n_groups`
    /// little-endian values) into the f32 slice it is given: each level
    /// passes its own conversion.
    #[inline]
    pub(crate) fn load(
        &mut self,
        v: &QuantView,
        r0: usize,
        nr: usize,
        to_f32: impl Fn(&[u8], &mut [f32]),
    ) {
        assert!(nr <= self.lanes && self.scale.len() == v.n_groups * self.lanes);
        let ng = v.n_groups;
        self.scale.fill(0.0);
        self.scale_zero.fill(0.0);
        self.row.resize(ng, 0.0);
        for i in 0..nr {
            let at = (r0 + i) * ng;
            to_f32(&v.scales[2 * at..2 * (at + ng)], &mut self.row);
            v.tile_scale_lane(
                r0 + i,
                i,
                &self.row,
                self.lanes,
                &mut self.scale,
                &mut self.scale_zero,
            );
        }
    }
}

impl<'a> QuantView<'a> {
    /// Puts row `r`'s scales (`row`, its groups' f16 scales already in
    /// f32) and their products with its zero points into lane `i` of a
    /// prefill tile's per-group scales: `lanes` values a group in `scale`
    /// and `scale_zero`.
    fn tile_scale_lane(
        &self,
        r: usize,
        i: usize,
        row: &[f32],
        lanes: usize,
        scale: &mut [f32],
        scale_zero: &mut [f32],
    ) {
        let at = r * self.n_groups;
        let groups = scale
            .chunks_exact_mut(lanes)
            .zip(scale_zero.chunks_exact_mut(lanes))
            .zip(row);
        match self.zeros {
            None => {
                let sym = QuantMatrix::symmetric_zero(self.bits) as f32;
                for ((sc, sz), s) in groups {
                    sc[i] = *s;
                    sz[i] = s * sym;
                }
            }
            Some(z) => {
                let zs = z[2 * at..2 * (at + self.n_groups)].chunks_exact(2);
                for (((sc, sz), s), zb) in groups.zip(zs) {
                    sc[i] = *s;
                    sz[i] = s * u16::from_le_bytes([zb[0], zb[1]]) as f32;
                }
            }
        }
    }

    /// The addresses of the whole 64-byte lines of the `n` rows after rows
    /// `r0..r0 + n` (cut at the end of the matrix; empty at its end): what
    /// the prefill tiles prefetch while the tile of rows `r0..r0 + n`
    /// multiplies. Only addresses: nothing is read.
    pub(crate) fn next_rows_lines(&self, r0: usize, n: usize) -> std::ops::Range<usize> {
        let after = (r0 + n) * self.row_bytes;
        let len = self.q.len().saturating_sub(after).min(n * self.row_bytes) / 64 * 64;
        let start = self.q.as_ptr().wrapping_add(after) as usize;
        start..start + len
    }

    /// Checks `m`'s shape and byte lengths.
    pub(crate) fn new(m: &'a QuantMatrix) -> Result<Self, LayoutError> {
        m.check()?;
        Ok(QuantView {
            q: m.qdata.as_slice(),
            scales: m.scales.as_slice(),
            zeros: match &m.zeros {
                Zeros::Symmetric => None,
                Zeros::PerGroup(z) => Some(z.as_slice()),
            },
            rows: m.rows,
            cols: m.cols,
            bits: m.bits,
            group_size: m.group_size,
            n_groups: m.n_groups(),
            row_bytes: m.row_bytes(),
            pf: prefetch_distance(&m.qdata),
        })
    }
}

/// A validated borrow of a [`DenseMatrix`].
pub(crate) struct DenseView<'a> {
    pub(super) data: &'a [u8],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) dtype: FloatType,
    /// Software-prefetch distance for these weights ([`prefetch_distance`]).
    pub(super) pf: usize,
}

impl<'a> DenseView<'a> {
    /// Checks `d`'s byte length.
    pub(crate) fn new(d: &'a DenseMatrix) -> Result<Self, LayoutError> {
        d.check()?;
        Ok(DenseView {
            data: d.data.as_slice(),
            rows: d.rows,
            cols: d.cols,
            dtype: d.dtype,
            pf: prefetch_distance(&d.data),
        })
    }
}

/// Activations quantized to int8 per 32-element block (like llama.cpp's
/// Q8_0): `x[k] ≈ d[k / 32] * xq'[k]`.
///
/// For int4 weights whose groups hold an even number of blocks the bytes are
/// stored pair-interleaved, to match a 32-byte load of two int4 blocks:
/// for blocks `b, b + 1` (`b` even) the 64 bytes are `x_b[0..16]`,
/// `x_{b+1}[0..16]`, `x_b[16..32]`, `x_{b+1}[16..32]`; a last odd block is
/// stored plainly. Otherwise every block is stored plainly.
pub(crate) struct Q8Act {
    xq: Vec<i8>,
    d: Vec<f32>,
    /// `d[b]` repeated four times per block, so two blocks' scales load as
    /// one vector.
    d4: Vec<f32>,
    /// Per weight group: the sum of the dequantized activations,
    /// `Σ_{b in g} d[b] * Σ xq[b]`, for the zero-point correction.
    gsum: Vec<f32>,
    paired: bool,
    group_size: usize,
}

impl Q8Act {
    /// Quantizes `x` (length a multiple of 32) for `bits`-bit weights with
    /// `group_size`.
    pub(crate) fn new(x: &[f32], bits: u8, group_size: usize) -> Q8Act {
        assert!(x.len() % QBLOCK == 0 && group_size % QBLOCK == 0 && group_size > 0);
        let nb = x.len() / QBLOCK;
        let bpg = group_size / QBLOCK;
        let paired = bits == 4 && bpg % 2 == 0;
        let mut xq = vec![0i8; x.len()];
        let mut d = vec![0f32; nb];
        let mut bsum = vec![0f32; nb];
        let mut qs = [0i8; QBLOCK];
        for (b, xs) in x.chunks_exact(QBLOCK).enumerate() {
            // NaN propagates (a plain `max` would drop it).
            let amax = xs.iter().fold(0f32, |m, v| {
                if m.is_nan() || v.is_nan() {
                    f32::NAN
                } else {
                    m.max(v.abs())
                }
            });
            qs = [0; QBLOCK];
            if amax == 0.0 {
                d[b] = 0.0;
            } else if !amax.is_finite() {
                // Non-finite input: keep it visible in the output as NaN.
                d[b] = f32::NAN;
            } else {
                let db = amax / 127.0;
                let inv = 127.0 / amax;
                let mut s = 0i32;
                for (q, v) in qs.iter_mut().zip(xs) {
                    let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    *q = r;
                    s += r as i32;
                }
                d[b] = db;
                bsum[b] = db * s as f32;
            }
            let base = b / 2 * 2 * QBLOCK;
            if paired && (b % 2 == 1 || b + 1 < nb) {
                let h = (b % 2) * 16;
                xq[base + h..base + h + 16].copy_from_slice(&qs[..16]);
                xq[base + 32 + h..base + 32 + h + 16].copy_from_slice(&qs[16..]);
            } else {
                xq[b * QBLOCK..(b + 1) * QBLOCK].copy_from_slice(&qs);
            }
        }
        let _ = qs;
        let d4 = d.iter().flat_map(|v| [*v; 4]).collect();
        let gsum = bsum.chunks(bpg).map(|c| c.iter().sum()).collect();
        Q8Act {
            xq,
            d,
            d4,
            gsum,
            paired,
            group_size,
        }
    }
}

/// Activations quantized to int16 per 32-element block:
/// `x[k] ≈ d[k / 32] * xq'[k]` with `d = max|x| / 32767` (relative step about
/// 3e-5, so the products are as accurate as with f32 activations while the
/// weights meet them in 16-bit integer multiply-adds).
///
/// For int4 weights whose groups hold an even number of blocks, blocks
/// `b, b + 1` (`b` even) are stored permuted to match a 32-byte load of the
/// two weight blocks read as sixteen 16-bit lanes, whose nibbles come out
/// with shifts and masks alone: for `v` in 0..4 and lane `j` in 0..16 the
/// value at `b * 32 + 16 v + j` is element `2 (j % 8) + [0, 16, 1, 17][v]`
/// of block `b + j / 8`. A last odd block, and every block otherwise, is
/// stored plainly.
pub(crate) struct Q16Act {
    pub(super) xq: Vec<i16>,
    pub(super) d: Vec<f32>,
    /// `d[b]` repeated four times per block, so two blocks' scales load as
    /// one vector.
    pub(super) d4: Vec<f32>,
    /// Per weight group: the sum of the dequantized activations,
    /// `Σ_{b in g} d[b] * Σ xq[b]`, for the zero-point correction.
    pub(super) gsum: Vec<f32>,
    pub(super) paired: bool,
    pub(super) group_size: usize,
}

/// Where element `e` of one block of an interleaved pair
/// goes (see [`Q16Act`]): `h` is 0 for block `b`, 1 for block `b + 1`.
fn q16_pair_slot(h: usize, e: usize) -> usize {
    let v = match (e >= 16, e % 2 == 1) {
        (false, false) => 0,
        (true, false) => 1,
        (false, true) => 2,
        (true, true) => 3,
    };
    16 * v + 8 * h + (e % 16) / 2
}

avx2_fn! {
/// Quantizes one block of 32 floats to int16: returns the step and the
/// integer sum; the step is 0 for an all-zero block and NaN for a block
/// with a non-finite value.
#[inline]
unsafe fn quantize_block_i16(xp: *const f32, out: &mut [i16; QBLOCK]) -> (f32, i32) {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    let mut bad = _mm256_setzero_ps();
    let mut v = [_mm256_setzero_ps(); 4];
    for (j, vj) in v.iter_mut().enumerate() {
        *vj = _mm256_loadu_ps(xp.add(8 * j));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vj));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(*vj, *vj));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    if _mm256_movemask_ps(bad) != 0 || !amax.is_finite() {
        *out = [0; QBLOCK];
        return (f32::NAN, 0);
    }
    if amax == 0.0 {
        *out = [0; QBLOCK];
        return (0.0, 0);
    }
    let inv = _mm256_set1_ps(32767.0 / amax);
    let lim = _mm256_set1_ps(32767.0);
    let mut sum = _mm256_setzero_si256();
    for h in 0..2 {
        // Round to nearest; |x * inv| <= 32767 up to rounding, clamped.
        let a = _mm256_cvtps_epi32(_mm256_min_ps(
            lim,
            _mm256_max_ps(
                _mm256_sub_ps(_mm256_setzero_ps(), lim),
                _mm256_mul_ps(v[2 * h], inv),
            ),
        ));
        let b = _mm256_cvtps_epi32(_mm256_min_ps(
            lim,
            _mm256_max_ps(
                _mm256_sub_ps(_mm256_setzero_ps(), lim),
                _mm256_mul_ps(v[2 * h + 1], inv),
            ),
        ));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
        let p = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(a, b));
        _mm256_storeu_si256(out.as_mut_ptr().add(16 * h) as *mut __m256i, p);
    }
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
    (amax / 32767.0, _mm_cvtsi128_si32(s1))
}
}

impl Avx2 {
    /// Quantizes `x` (length a multiple of 32) for `bits`-bit weights with
    /// `group_size`.
    pub(crate) fn q16_act(self, x: &[f32], bits: u8, group_size: usize) -> Q16Act {
        assert!(x.len() % QBLOCK == 0 && group_size % QBLOCK == 0 && group_size > 0);
        let nb = x.len() / QBLOCK;
        let bpg = group_size / QBLOCK;
        let paired = bits == 4 && bpg % 2 == 0;
        let mut xq = vec![0i16; x.len()];
        let mut d = vec![0f32; nb];
        let mut bsum = vec![0f32; nb];
        let mut qs = [0i16; QBLOCK];
        for b in 0..nb {
            // SAFETY: block `b` lies inside `x`; features proven by `self`.
            let (db, s) = unsafe { quantize_block_i16(x.as_ptr().add(b * QBLOCK), &mut qs) };
            d[b] = db;
            bsum[b] = db * s as f32;
            if paired && (b % 2 == 1 || b + 1 < nb) {
                let base = b / 2 * 2 * QBLOCK;
                for (e, q) in qs.iter().enumerate() {
                    xq[base + q16_pair_slot(b % 2, e)] = *q;
                }
            } else {
                xq[b * QBLOCK..(b + 1) * QBLOCK].copy_from_slice(&qs);
            }
        }
        let d4 = d.iter().flat_map(|v| [*v; 4]).collect();
        let gsum = bsum.chunks(bpg).map(|c| c.iter().sum()).collect();
        Q16Act {
            xq,
            d,
            d4,
            gsum,
            paired,
            group_size,
        }
    }
}

// ---------------------------------------------------------------------------
// Safe entry points.

impl Avx2 {
    /// `out[i] = row (r0 + i) · x` with `x` quantized to int8.
    pub(crate) fn quant_rows_q8(self, v: &QuantView, r0: usize, a: &Q8Act, out: &mut [f32]) {
        assert!(r0 + out.len() <= v.rows, "rows out of range");
        assert!(a.xq.len() == v.cols && a.gsum.len() == v.n_groups);
        assert!(
            a.group_size == v.group_size && a.paired == (v.bits == 4 && v.group_size % 64 == 0)
        );
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: `self` proves AVX2/FMA/F16C; the row index is in range
            // and the activation lengths and layout match the view's checked
            // shape.
            *o = unsafe {
                dot_q8_row(v, r0 + i, a) + correction(v, r0 + i, &a.gsum, offset(v.bits))
            };
        }
    }

    /// `out[i] = row (r0 + i) · x` with `x` quantized to int16.
    pub(crate) fn quant_rows_q16(self, v: &QuantView, r0: usize, a: &Q16Act, out: &mut [f32]) {
        assert!(r0 + out.len() <= v.rows, "rows out of range");
        assert!(a.xq.len() == v.cols && a.gsum.len() == v.n_groups);
        assert!(a.d.len() == v.cols / QBLOCK && a.d4.len() == 4 * a.d.len());
        assert!(
            a.group_size == v.group_size && a.paired == (v.bits == 4 && v.group_size % 64 == 0)
        );
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: as in `quant_rows_q8`.
            *o = unsafe {
                let dot = if v.bits == 4 && a.paired {
                    dot_q16_i4_paired(v, r0 + i, a)
                } else if v.bits == 4 {
                    dot_q16_row_bits::<4>(v, r0 + i, a)
                } else {
                    dot_q16_row_bits::<8>(v, r0 + i, a)
                };
                dot + correction(v, r0 + i, &a.gsum, 0.0)
            };
        }
    }

    /// The zero-point term of row `r` for kernels that multiply the stored
    /// unsigned integers as they are: `−Σ_g s_g z_g gsum_g`, with `gsum[g]`
    /// the sum of the activations over group `g`.
    pub(crate) fn zero_correction(self, v: &QuantView, r: usize, gsum: &[f32]) -> f32 {
        assert!(r < v.rows && gsum.len() == v.n_groups);
        // SAFETY: row in range, `gsum` has one value per group, features
        // proven by `self`.
        unsafe { correction(v, r, gsum, 0.0) }
    }

    /// [`Avx2::zero_correction`] of row `r` for several tokens at once
    /// (`out[t]` from `gsums[t]`, at most [`super::SMALL_BATCH_TOKENS`]),
    /// each the same bits: the row's scales and zero points are converted
    /// once for all of them instead of once per token.
    pub(crate) fn zero_corrections(
        self,
        v: &QuantView,
        r: usize,
        gsums: &[&[f32]],
        out: &mut [f32],
    ) {
        assert!(r < v.rows && gsums.len() == out.len());
        assert!(gsums.iter().all(|g| g.len() == v.n_groups));
        // SAFETY: row in range, every `gsums[t]` has one value per group,
        // features proven by `self`.
        unsafe {
            match out.len() {
                0 => {}
                1 => corrections::<1>(v, r, gsums, 0.0, out),
                2 => corrections::<2>(v, r, gsums, 0.0, out),
                3 => corrections::<3>(v, r, gsums, 0.0, out),
                4 => corrections::<4>(v, r, gsums, 0.0, out),
                5 => corrections::<5>(v, r, gsums, 0.0, out),
                6 => corrections::<6>(v, r, gsums, 0.0, out),
                7 => corrections::<7>(v, r, gsums, 0.0, out),
                8 => corrections::<8>(v, r, gsums, 0.0, out),
                n => panic!("zero_corrections: {n} tokens (at most 8)"),
            }
        }
    }

    /// `out[i] = row (r0 + i) · x` with f32 activations; `gsum[g]` is the sum
    /// of `x` over group `g`.
    pub(crate) fn quant_rows_f32(
        self,
        v: &QuantView,
        r0: usize,
        x: &[f32],
        gsum: &[f32],
        out: &mut [f32],
    ) {
        assert!(r0 + out.len() <= v.rows, "rows out of range");
        assert!(x.len() == v.cols && gsum.len() == v.n_groups);
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: as in `quant_rows_q8`.
            *o = unsafe { dot_f32_row(v, r0 + i, x) + correction(v, r0 + i, gsum, 0.0) };
        }
    }

    /// `out[i] = row (r0 + i) · x` for a dense matrix.
    pub(crate) fn dense_rows(self, v: &DenseView, r0: usize, x: &[f32], out: &mut [f32]) {
        assert!(r0 + out.len() <= v.rows, "rows out of range");
        assert!(x.len() == v.cols);
        let es = v.dtype.size();
        for (i, o) in out.iter_mut().enumerate() {
            let r = r0 + i;
            let row = &v.data[r * v.cols * es..(r + 1) * v.cols * es];
            // SAFETY: `row` holds `cols` elements of `dtype` and `x` holds
            // `cols` floats; the CPU features are proven by `self`.
            *o = unsafe {
                match v.dtype {
                    FloatType::F32 => dot_dense::<DT_F32>(row.as_ptr(), x.as_ptr(), v.cols, v.pf),
                    FloatType::F16 => dot_dense::<DT_F16>(row.as_ptr(), x.as_ptr(), v.cols, v.pf),
                    FloatType::BF16 => dot_dense::<DT_BF16>(row.as_ptr(), x.as_ptr(), v.cols, v.pf),
                }
            };
        }
    }

    /// Dequantizes row `r` into `out` (length `cols`).
    pub(crate) fn quant_row_f32(self, v: &QuantView, r: usize, out: &mut [f32]) {
        assert!(r < v.rows && out.len() == v.cols);
        // SAFETY: row in range, `out` has `cols` floats, features proven.
        unsafe { quant_row_to_f32(v, r, out) }
    }

    /// Converts row `r` of a dense matrix into `out` (length `cols`).
    pub(crate) fn dense_row_f32(self, v: &DenseView, r: usize, out: &mut [f32]) {
        assert!(r < v.rows && out.len() == v.cols);
        let es = v.dtype.size();
        let row = &v.data[r * v.cols * es..(r + 1) * v.cols * es];
        // SAFETY: `row` holds `cols` elements, `out` has room for `cols`.
        unsafe {
            match v.dtype {
                FloatType::F32 => convert_dense::<DT_F32>(row.as_ptr(), out.as_mut_ptr(), v.cols),
                FloatType::F16 => convert_dense::<DT_F16>(row.as_ptr(), out.as_mut_ptr(), v.cols),
                FloatType::BF16 => convert_dense::<DT_BF16>(row.as_ptr(), out.as_mut_ptr(), v.cols),
            }
        }
    }

    /// Register-blocked product of `nr <= 4` f32 weight rows (`w`, row
    /// stride `ldw`) with `nt <= 3` tokens (`x`, row stride `ldx`) over `k`
    /// elements, added to `out[r * ldo + t]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tile(
        self,
        w: &[f32],
        ldw: usize,
        nr: usize,
        x: &[f32],
        ldx: usize,
        nt: usize,
        k: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        assert!((1..=TILE_R).contains(&nr) && (1..=TILE_T).contains(&nt));
        assert!(ldw >= k && w.len() >= (nr - 1) * ldw + k);
        assert!(ldx >= k && x.len() >= (nt - 1) * ldx + k);
        assert!(ldo >= nt && out.len() >= (nr - 1) * ldo + nt);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[0f32; TILE_T]; TILE_R];
        // SAFETY: the asserts above bound every row/token read by the tile
        // functions; features proven by `self`.
        unsafe {
            match (nr, nt) {
                (4, 3) => tile_rt::<4, 3>(wp, ldw, xp, ldx, k, &mut acc),
                (4, 2) => tile_rt::<4, 2>(wp, ldw, xp, ldx, k, &mut acc),
                (4, 1) => tile_rt::<4, 1>(wp, ldw, xp, ldx, k, &mut acc),
                (3, 3) => tile_rt::<3, 3>(wp, ldw, xp, ldx, k, &mut acc),
                (3, 2) => tile_rt::<3, 2>(wp, ldw, xp, ldx, k, &mut acc),
                (3, 1) => tile_rt::<3, 1>(wp, ldw, xp, ldx, k, &mut acc),
                (2, 3) => tile_rt::<2, 3>(wp, ldw, xp, ldx, k, &mut acc),
                (2, 2) => tile_rt::<2, 2>(wp, ldw, xp, ldx, k, &mut acc),
                (2, 1) => tile_rt::<2, 1>(wp, ldw, xp, ldx, k, &mut acc),
                (1, 3) => tile_rt::<1, 3>(wp, ldw, xp, ldx, k, &mut acc),
                (1, 2) => tile_rt::<1, 2>(wp, ldw, xp, ldx, k, &mut acc),
                _ => tile_rt::<1, 1>(wp, ldw, xp, ldx, k, &mut acc),
            }
        }
        for (r, accr) in acc.iter().enumerate().take(nr) {
            for (o, a) in out[r * ldo..r * ldo + nt].iter_mut().zip(accr) {
                *o += a;
            }
        }
    }

    /// Floating-point multiply-adds per second of a register-resident FMA
    /// loop on this thread: `iters` iterations of 10 independent 8-wide
    /// FMAs. Returns a value to keep the work alive.
    pub(crate) fn fma_loop(self, iters: u64) -> f32 {
        // SAFETY: features proven by `self`; no memory is touched.
        unsafe { fma_loop(iters) }
    }
}

/// Weight rows per register tile.
pub(crate) const TILE_R: usize = 4;
/// Tokens per register tile.
pub(crate) const TILE_T: usize = 3;

// ---------------------------------------------------------------------------
// Kernels.

pub(super) const DT_F32: u8 = 0;
pub(super) const DT_F16: u8 = 1;
pub(super) const DT_BF16: u8 = 2;

/// How far ahead of the current weight bytes the matvec kernels prefetch:
/// enough lines in flight for one thread to approach the memory bandwidth
/// (4 KiB measured best here against 0.5-8 KiB; `RH_PREFETCH=<bytes>`
/// overrides it for tuning on other machines).
static PREFETCH_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);

pub(super) fn pf_bytes() -> usize {
    PREFETCH_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Weights in owned buffers of at least this many bytes sit on huge pages
/// where the kernel offers them: the model copies every matrix a token
/// reads whole of this size onto them (`crate::model`), the benchmarks'
/// matrices ask for them too.
const HUGE_COPY_BYTES: usize = 2 << 20;

/// The software-prefetch distance for weights in `b`: none (0, the line
/// being read) for a large owned buffer, which the model backs with huge
/// pages, where the hardware prefetcher streams on its own and the hints
/// only cost instructions (lm_head and the int8 linears took 14-15% less
/// CPU time in decode without them); [`pf_bytes`] for mapped file pages
/// and small matrices (routed experts), where the hardware prefetcher
/// stops at every 4 KiB page and the hints carry the stream across.
/// `RH_PREFETCH` sets one distance for all.
pub(super) fn prefetch_distance(b: &crate::tensor::Bytes) -> usize {
    if PREFETCH_SET.load(std::sync::atomic::Ordering::Relaxed) {
        return pf_bytes();
    }
    match b {
        crate::tensor::Bytes::Owned(_) if b.len() >= HUGE_COPY_BYTES => 0,
        _ => pf_bytes(),
    }
}

/// Whether `RH_PREFETCH` set the distance.
static PREFETCH_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A range of cache lines asked for one at a time, spread over a loop's
/// steps (the prefill tiles' next tile, during the current tile's first
/// pass): spread out, the hints never fill the core's queue of misses,
/// as bursts of them did.
pub(super) struct SpreadPrefetch {
    at: *const i8,
    end: *const i8,
}

impl SpreadPrefetch {
    /// The lines of `lines` (addresses), or none when `on` is false.
    pub(super) fn new(lines: &std::ops::Range<usize>, on: bool) -> Self {
        let end = if on { lines.end } else { lines.start };
        SpreadPrefetch {
            at: lines.start as *const i8,
            end: end as *const i8,
        }
    }

    /// Asks for the next line, while any is left.
    #[inline(always)]
    pub(super) fn step(&mut self) {
        if self.at < self.end {
            // SAFETY: a prefetch hint never faults, whatever the address,
            // and SSE is part of every x86-64 CPU.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.at) };
            self.at = self.at.wrapping_add(64);
        }
    }
}

/// Row `i` of a many-token dense block starting at `w` (rows `stride`
/// bytes apart, `block` rows a block), and where that row prefetches from
/// while the block is multiplied: the same row of the next block, at the
/// columns the current slice reads, so every line is asked for one whole
/// block before its use. (Walking the next block in address order instead
/// left its last rows a slice ahead at best: 12-15% slower on one core.
/// Each row's own next slice, eight streams only a slice ahead, read the
/// lm_head at half the lone matvec's speed.) The next block may lie past
/// the matrix: prefetches never fault, and nothing reads through it.
pub(super) fn dense_block_row(
    w: *const u8,
    i: usize,
    stride: usize,
    block: usize,
) -> (*const u8, *const u8) {
    (
        w.wrapping_add(i * stride),
        w.wrapping_add((block + i) * stride),
    )
}

avx2_fn! {
/// Hints the cache line at `p` into L1. Prefetches never fault, so `p` may
/// point past the end of the weights (it is formed with `wrapping_add`).
#[inline]
pub(super) unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
}

/// Hints a quantized weight stream ahead of `p` for the AVX-512 level's
/// kernels, `pfb` bytes being the distance ([`prefetch_distance`]; 0 for
/// weights on huge pages, which get no hints): into L1 `pfb / 2` ahead and
/// into L2 `2 pfb` ahead. Routed experts, read from the cache's mapping,
/// took as long as their arithmetic and their reads added up: one hint
/// into L1 `pfb` ahead kept too few lines in flight for a core to overlap
/// the two. (The AVX2 kernels keep [`prefetch`]: they hint every 16 or 32
/// bytes, and two hints each cost them more than they gained.) Never
/// faults, like [`prefetch`].
#[inline]
pub(super) unsafe fn prefetch_ahead(p: *const u8, pfb: usize) {
    if pfb != 0 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(pfb / 2) as *const i8);
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(2 * pfb) as *const i8);
    }
}

/// Hints the cache line at `p` into L2 only: the batched kernels' next
/// block of weights, a block ahead of its use, which in L1 would crowd out
/// the slice's activations and accumulators. Never faults, like [`prefetch`].
#[inline]
pub(super) unsafe fn prefetch_l2(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
}

#[inline]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The f16 at index `i` of `p` as f32.
#[inline]
pub(super) unsafe fn f16_at(p: *const u8, i: usize) -> f32 {
    let h = u16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// The zero point of group `g` of row `r`.
#[inline]
unsafe fn zero_at(v: &QuantView, r: usize, g: usize) -> f32 {
    match v.zeros {
        None => QuantMatrix::symmetric_zero(v.bits) as f32,
        Some(z) => {
            let i = (r * v.n_groups + g) * 2;
            u16::from_le_bytes([z[i], z[i + 1]]) as f32
        }
    }
}

/// Eight i32 lanes summing to `Σ q[k] * xq[k]` over one int4 block, with
/// `q` read from 16 bytes at `qp` and the activations from 32 at `xp`.
#[inline]
unsafe fn block_i4_q8(qp: *const u8, xp: *const i8) -> __m256i {
    let v = _mm_loadu_si128(qp as *const __m128i);
    // Low nibbles are elements 0..16, high nibbles 16..32: the two halves
    // of the register line up with the activation block.
    let w = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(v, 4), v),
        _mm256_set1_epi8(0x0F),
    );
    let x = _mm256_loadu_si256(xp as *const __m256i);
    // q <= 15 and |x| <= 127: the i16 pair sums cannot saturate.
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// Eight i32 lanes summing to `Σ (q[k] - 128) * xq[k]` over one int8 block.
#[inline]
unsafe fn block_i8_q8(qp: *const u8, xp: *const i8) -> __m256i {
    // q - 128 as i8; maddubs needs an unsigned operand, so take |q - 128|
    // (<= 128) and move the sign onto the activations (|x| <= 127): pair sums
    // stay within 2 * 128 * 127 < 32767.
    let w = _mm256_xor_si256(
        _mm256_loadu_si256(qp as *const __m256i),
        _mm256_set1_epi8(-128),
    );
    let x = _mm256_loadu_si256(xp as *const __m256i);
    let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

#[inline]
unsafe fn block_q8<const BITS: usize>(qp: *const u8, xp: *const i8) -> __m256i {
    if BITS == 4 {
        block_i4_q8(qp, xp)
    } else {
        block_i8_q8(qp, xp)
    }
}
}

/// What the int8 kernels subtract from every weight (they compute with
/// `q - 128` so the values fit a signed byte).
fn offset(bits: u8) -> f32 {
    if bits == 8 {
        128.0
    } else {
        0.0
    }
}

avx2_fn! {
/// The zero-point term of row `r`: `Σ_g s_g (offset − z_g) gsum_g`, where
/// the main kernels computed `Σ_g s_g Σ_k (q_k − offset) x_k`.
unsafe fn correction(v: &QuantView, r: usize, gsum: &[f32], offset: f32) -> f32 {
    let mut out = [0f32];
    corrections::<1>(v, r, &[gsum], offset, &mut out);
    out[0]
}

/// [`correction`] of row `r` for `T` tokens' group sums at once, `out[t]`
/// from `gsums[t]`: the row's scales (and zero points) are converted once
/// for all of them, and each token's sum keeps the one-token order and
/// roundings (eight groups a vector step, the rest one by one after the
/// horizontal sum).
unsafe fn corrections<const T: usize>(
    v: &QuantView,
    r: usize,
    gsums: &[&[f32]],
    offset: f32,
    out: &mut [f32],
) {
    let ng = v.n_groups;
    let srow = v.scales.as_ptr().add(r * ng * 2);
    let gs: [*const f32; T] = std::array::from_fn(|t| gsums[t].as_ptr());
    let zrow = v.zeros.map(|z| z.as_ptr().add(r * ng * 2));
    let k = offset - QuantMatrix::symmetric_zero(v.bits) as f32;
    if zrow.is_none() && k == 0.0 {
        out[..T].fill(0.0);
        return;
    }
    let zero_at = |z: *const u8, g: usize| u16::from_le_bytes([*z.add(2 * g), *z.add(2 * g + 1)]) as f32;
    let off = _mm256_set1_ps(offset);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut g = 0;
    while g + 8 <= ng {
        let s8 = _mm256_cvtph_ps(_mm_loadu_si128(srow.add(2 * g) as *const __m128i));
        let f = match zrow {
            None => s8,
            Some(z) => {
                let z8 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                    z.add(2 * g) as *const __m128i,
                )));
                _mm256_mul_ps(s8, _mm256_sub_ps(off, z8))
            }
        };
        for t in 0..T {
            acc[t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(gs[t].add(g)), acc[t]);
        }
        g += 8;
    }
    for t in 0..T {
        let mut x = hsum(acc[t]);
        for g in g..ng {
            x += match zrow {
                None => f16_at(srow, g) * *gs[t].add(g),
                Some(z) => f16_at(srow, g) * (offset - zero_at(z, g)) * *gs[t].add(g),
            };
        }
        out[t] = if zrow.is_none() { k * x } else { x };
    }
}

/// Row `r` of `v` times int8-quantized activations, without the zero-point
/// term: `Σ_g s_g Σ_k (q_k − offset) x_k`.
unsafe fn dot_q8_row(v: &QuantView, r: usize, a: &Q8Act) -> f32 {
    if v.bits == 4 {
        if a.paired {
            dot_q8_i4_paired(v, r, a)
        } else {
            dot_q8_row_bits::<4>(v, r, a)
        }
    } else {
        dot_q8_row_bits::<8>(v, r, a)
    }
}

/// The int4 kernel on pair-interleaved activations: one 32-byte load covers
/// two blocks, whose low and high nibbles meet activations laid out to match.
#[inline]
unsafe fn dot_q8_i4_paired(v: &QuantView, r: usize, a: &Q8Act) -> f32 {
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let d4 = a.d4.as_ptr();
    let m = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let pfb = v.pf;
    let mut tot0 = _mm256_setzero_ps();
    let mut tot1 = _mm256_setzero_ps();
    for g in 0..v.n_groups {
        let b0 = g * bpg;
        let b1 = (b0 + bpg).min(nb);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut b = b0;
        while b + 1 < b1 {
            prefetch(qrow.wrapping_add(b * 16 + pfb));
            let w = _mm256_loadu_si256(qrow.add(b * 16) as *const __m256i);
            let lo = _mm256_and_si256(w, m);
            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
            let xa = _mm256_loadu_si256(xq.add(b * QBLOCK) as *const __m256i);
            let xb = _mm256_loadu_si256(xq.add(b * QBLOCK + 32) as *const __m256i);
            // Each i16 is at most 2 * 15 * 127 per product pair; the sum of
            // the two stays below 7700.
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
            let i = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc0 = _mm256_fmadd_ps(i, _mm256_loadu_ps(d4.add(b * 4)), acc0);
            std::mem::swap(&mut acc0, &mut acc1);
            b += 2;
        }
        if b < b1 {
            // The row's last block when the row has an odd number of blocks.
            let i = _mm256_cvtepi32_ps(block_i4_q8(qrow.add(b * 16), xq.add(b * QBLOCK)));
            acc0 = _mm256_fmadd_ps(i, _mm256_set1_ps(*a.d.as_ptr().add(b)), acc0);
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        tot0 = _mm256_fmadd_ps(s, acc0, tot0);
        tot1 = _mm256_fmadd_ps(s, acc1, tot1);
    }
    hsum(_mm256_add_ps(tot0, tot1))
}

#[inline]
unsafe fn dot_q8_row_bits<const BITS: usize>(v: &QuantView, r: usize, a: &Q8Act) -> f32 {
    let bb = QBLOCK * BITS / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let d = a.d.as_ptr();
    let pfb = v.pf;
    let mut tot0 = _mm256_setzero_ps();
    let mut tot1 = _mm256_setzero_ps();
    for g in 0..v.n_groups {
        let mut b = g * bpg;
        let b1 = (b + bpg).min(nb);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        while b + 1 < b1 {
            prefetch(qrow.wrapping_add(b * bb + pfb));
            let p0 = _mm256_cvtepi32_ps(block_q8::<BITS>(qrow.add(b * bb), xq.add(b * QBLOCK)));
            let p1 = _mm256_cvtepi32_ps(block_q8::<BITS>(
                qrow.add((b + 1) * bb),
                xq.add((b + 1) * QBLOCK),
            ));
            acc0 = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d.add(b)), acc0);
            acc1 = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(&*d.add(b + 1)), acc1);
            b += 2;
        }
        if b < b1 {
            let p0 = _mm256_cvtepi32_ps(block_q8::<BITS>(qrow.add(b * bb), xq.add(b * QBLOCK)));
            acc0 = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d.add(b)), acc0);
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        tot0 = _mm256_fmadd_ps(s, acc0, tot0);
        tot1 = _mm256_fmadd_ps(s, acc1, tot1);
    }
    hsum(_mm256_add_ps(tot0, tot1))
}

/// Eight i32 lanes summing to `Σ q[k] * xq[k]` over one block of int16
/// activations at `xp`, with the unsigned weights at `qp` widened to i16.
/// Products are at most 255 * 32767, so the four per lane fit an i32.
#[inline]
unsafe fn block_q16<const BITS: usize>(qp: *const u8, xp: *const i16) -> __m256i {
    let x0 = _mm256_loadu_si256(xp as *const __m256i);
    let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
    if BITS == 4 {
        // Each byte widened to an i16: the low nibble is element i, the
        // high one element i + 16, and a 16-bit shift leaves it alone.
        let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(qp as *const __m128i));
        let lo = _mm256_and_si256(w, _mm256_set1_epi16(0x0F));
        let hi = _mm256_srli_epi16(w, 4);
        _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1))
    } else {
        let w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(qp as *const __m128i));
        let w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(qp.add(16) as *const __m128i));
        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
    }
}

/// The int4 kernel on pair-interleaved int16 activations: one 32-byte load
/// covers two blocks; read as sixteen 16-bit lanes, each lane's four nibbles
/// come out with shifts and masks (no cross-lane shuffles) and meet the
/// activations laid out to match.
#[inline]
unsafe fn dot_q16_i4_paired(v: &QuantView, r: usize, a: &Q16Act) -> f32 {
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let d4 = a.d4.as_ptr();
    let m = _mm256_set1_epi16(0x0F);
    let pfb = v.pf;
    let mut tot0 = _mm256_setzero_ps();
    let mut tot1 = _mm256_setzero_ps();
    for g in 0..v.n_groups {
        let b0 = g * bpg;
        let b1 = (b0 + bpg).min(nb);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut b = b0;
        while b + 1 < b1 {
            prefetch(qrow.wrapping_add(b * 16 + pfb));
            let w = _mm256_loadu_si256(qrow.add(b * 16) as *const __m256i);
            let xp = xq.add(b * QBLOCK);
            let w0 = _mm256_and_si256(w, m);
            let w1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
            let w2 = _mm256_and_si256(_mm256_srli_epi16(w, 8), m);
            let w3 = _mm256_srli_epi16(w, 12);
            // Each i32 lane sums 8 products of at most 15 * 32767.
            let p01 = _mm256_add_epi32(
                _mm256_madd_epi16(w0, _mm256_loadu_si256(xp as *const __m256i)),
                _mm256_madd_epi16(w1, _mm256_loadu_si256(xp.add(16) as *const __m256i)),
            );
            let p23 = _mm256_add_epi32(
                _mm256_madd_epi16(w2, _mm256_loadu_si256(xp.add(32) as *const __m256i)),
                _mm256_madd_epi16(w3, _mm256_loadu_si256(xp.add(48) as *const __m256i)),
            );
            let i = _mm256_cvtepi32_ps(_mm256_add_epi32(p01, p23));
            acc0 = _mm256_fmadd_ps(i, _mm256_loadu_ps(d4.add(b * 4)), acc0);
            std::mem::swap(&mut acc0, &mut acc1);
            b += 2;
        }
        if b < b1 {
            // The row's last block when the row has an odd number of blocks.
            let i = _mm256_cvtepi32_ps(block_q16::<4>(qrow.add(b * 16), xq.add(b * QBLOCK)));
            acc0 = _mm256_fmadd_ps(i, _mm256_set1_ps(*a.d.as_ptr().add(b)), acc0);
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        tot0 = _mm256_fmadd_ps(s, acc0, tot0);
        tot1 = _mm256_fmadd_ps(s, acc1, tot1);
    }
    hsum(_mm256_add_ps(tot0, tot1))
}

/// Row `r` of `v` times int16-quantized activations, without the zero-point
/// term: `Σ_g s_g Σ_b d_b Σ_k q_k xq_k`, exact in i32 within a block.
#[inline]
unsafe fn dot_q16_row_bits<const BITS: usize>(v: &QuantView, r: usize, a: &Q16Act) -> f32 {
    let bb = QBLOCK * BITS / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let d = a.d.as_ptr();
    let pfb = v.pf;
    let mut tot0 = _mm256_setzero_ps();
    let mut tot1 = _mm256_setzero_ps();
    for g in 0..v.n_groups {
        let mut b = g * bpg;
        let b1 = (b + bpg).min(nb);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        while b + 1 < b1 {
            prefetch(qrow.wrapping_add(b * bb + pfb));
            let p0 = _mm256_cvtepi32_ps(block_q16::<BITS>(qrow.add(b * bb), xq.add(b * QBLOCK)));
            let p1 = _mm256_cvtepi32_ps(block_q16::<BITS>(
                qrow.add((b + 1) * bb),
                xq.add((b + 1) * QBLOCK),
            ));
            acc0 = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d.add(b)), acc0);
            acc1 = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(&*d.add(b + 1)), acc1);
            b += 2;
        }
        if b < b1 {
            let p0 = _mm256_cvtepi32_ps(block_q16::<BITS>(qrow.add(b * bb), xq.add(b * QBLOCK)));
            acc0 = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(&*d.add(b)), acc0);
        }
        let s = _mm256_set1_ps(f16_at(srow, g));
        tot0 = _mm256_fmadd_ps(s, acc0, tot0);
        tot1 = _mm256_fmadd_ps(s, acc1, tot1);
    }
    hsum(_mm256_add_ps(tot0, tot1))
}

/// The 32 values of one block as four vectors of 8 f32 (elements 0..8,
/// 8..16, 16..24, 24..32).
#[inline]
unsafe fn unpack_block<const BITS: usize>(qp: *const u8) -> [__m256; 4] {
    if BITS == 4 {
        let v = _mm_loadu_si128(qp as *const __m128i);
        let lo = _mm256_cvtepu8_epi32(v);
        let hi = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
        let m = _mm256_set1_epi32(0x0F);
        [
            _mm256_cvtepi32_ps(_mm256_and_si256(lo, m)),
            _mm256_cvtepi32_ps(_mm256_and_si256(hi, m)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)),
        ]
    } else {
        [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(qp as *const __m128i))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                qp.add(8) as *const __m128i
            ))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                qp.add(16) as *const __m128i
            ))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                qp.add(24) as *const __m128i
            ))),
        ]
    }
}

/// Row `r` of `v` times f32 activations, without the zero-point term.
unsafe fn dot_f32_row(v: &QuantView, r: usize, x: &[f32]) -> f32 {
    if v.bits == 4 {
        dot_f32_row_bits::<4>(v, r, x)
    } else {
        dot_f32_row_bits::<8>(v, r, x)
    }
}

#[inline]
unsafe fn dot_f32_row_bits<const BITS: usize>(v: &QuantView, r: usize, x: &[f32]) -> f32 {
    let bb = QBLOCK * BITS / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xp = x.as_ptr();
    let pfb = v.pf;
    let mut tot = _mm256_setzero_ps();
    for g in 0..v.n_groups {
        let s = f16_at(srow, g);
        let b0 = g * bpg;
        let b1 = (b0 + bpg).min(nb);
        let mut a = [_mm256_setzero_ps(); 4];
        for b in b0..b1 {
            prefetch(qrow.wrapping_add(b * bb + pfb));
            let w = unpack_block::<BITS>(qrow.add(b * bb));
            let xb = xp.add(b * QBLOCK);
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb.add(8 * j)), *aj);
            }
        }
        let gacc = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        tot = _mm256_fmadd_ps(_mm256_set1_ps(s), gacc, tot);
    }
    hsum(tot)
}

/// Dequantizes row `r` of `v` into `out` (`cols` floats).
unsafe fn quant_row_to_f32(v: &QuantView, r: usize, out: &mut [f32]) {
    if v.bits == 4 {
        quant_row_to_f32_bits::<4>(v, r, out)
    } else {
        quant_row_to_f32_bits::<8>(v, r, out)
    }
}

#[inline]
unsafe fn quant_row_to_f32_bits<const BITS: usize>(v: &QuantView, r: usize, out: &mut [f32]) {
    let bb = QBLOCK * BITS / 8;
    let nb = v.cols / QBLOCK;
    let bpg = v.group_size / QBLOCK;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let op = out.as_mut_ptr();
    for g in 0..v.n_groups {
        let s = f16_at(srow, g);
        let z = zero_at(v, r, g);
        let sv = _mm256_set1_ps(s);
        let zs = _mm256_set1_ps(-z * s);
        let b0 = g * bpg;
        for b in b0..(b0 + bpg).min(nb) {
            let w = unpack_block::<BITS>(qrow.add(b * bb));
            for (j, wj) in w.iter().enumerate() {
                _mm256_storeu_ps(op.add(b * QBLOCK + 8 * j), _mm256_fmadd_ps(*wj, sv, zs));
            }
        }
    }
}

/// Eight dense elements of type `DT` at `p` as f32.
#[inline]
pub(super) unsafe fn load8<const DT: u8>(p: *const u8) -> __m256 {
    match DT {
        DT_F32 => _mm256_loadu_ps(p as *const f32),
        DT_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        )),
    }
}

/// One dense element of type `DT` at `p` as f32.
#[inline]
pub(super) unsafe fn load1<const DT: u8>(p: *const u8) -> f32 {
    match DT {
        DT_F32 => f32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]),
        DT_F16 => f16_at(p, 0),
        _ => f32::from_bits((u16::from_le_bytes([*p, *p.add(1)]) as u32) << 16),
    }
}

/// `Σ w[k] * x[k]` over `n` elements, `w` of type `DT`.
unsafe fn dot_dense<const DT: u8>(w: *const u8, x: *const f32, n: usize, pfb: usize) -> f32 {
    let es = if DT == DT_F32 { 4 } else { 2 };
    let mut a = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k + 32 <= n {
        prefetch(w.wrapping_add(k * es + pfb));
        for (j, aj) in a.iter_mut().enumerate() {
            let o = k + 8 * j;
            *aj = _mm256_fmadd_ps(load8::<DT>(w.add(o * es)), _mm256_loadu_ps(x.add(o)), *aj);
        }
        k += 32;
    }
    while k + 8 <= n {
        a[0] = _mm256_fmadd_ps(load8::<DT>(w.add(k * es)), _mm256_loadu_ps(x.add(k)), a[0]);
        k += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(a[0], a[1]),
        _mm256_add_ps(a[2], a[3]),
    ));
    while k < n {
        s += load1::<DT>(w.add(k * es)) * *x.add(k);
        k += 1;
    }
    s
}

/// Converts `n` dense elements of type `DT` at `w` to f32 at `out`.
unsafe fn convert_dense<const DT: u8>(w: *const u8, out: *mut f32, n: usize) {
    let es = if DT == DT_F32 { 4 } else { 2 };
    let mut k = 0;
    while k + 8 <= n {
        _mm256_storeu_ps(out.add(k), load8::<DT>(w.add(k * es)));
        k += 8;
    }
    while k < n {
        *out.add(k) = load1::<DT>(w.add(k * es));
        k += 1;
    }
}

/// `acc[r][t] = Σ_k w[r * ldw + k] * x[t * ldx + k]` for an `R x T` tile.
#[inline]
unsafe fn tile_rt<const R: usize, const T: usize>(
    w: *const f32,
    ldw: usize,
    x: *const f32,
    ldx: usize,
    k_len: usize,
    acc_out: &mut [[f32; TILE_T]; TILE_R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let k8 = k_len / 8 * 8;
    let mut k = 0;
    while k < k8 {
        let mut xv = [_mm256_setzero_ps(); T];
        for (t, xt) in xv.iter_mut().enumerate() {
            *xt = _mm256_loadu_ps(x.add(t * ldx + k));
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_ps(w.add(r * ldw + k));
            for (t, a) in accr.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, xv[t], *a);
            }
        }
        k += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum(acc[r][t]);
            for k in k8..k_len {
                s += *w.add(r * ldw + k) * *x.add(t * ldx + k);
            }
            acc_out[r][t] = s;
        }
    }
}

unsafe fn fma_loop(iters: u64) -> f32 {
    let mut a = [_mm256_set1_ps(1.0); 10];
    let m = _mm256_set1_ps(0.999_999);
    let c = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for ai in a.iter_mut() {
            *ai = _mm256_fmadd_ps(*ai, m, c);
        }
    }
    let mut s = _mm256_setzero_ps();
    for ai in a {
        s = _mm256_add_ps(s, ai);
    }
    hsum(s)
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{AlignedBuf, Bytes};

    #[test]
    fn large_owned_weights_skip_the_software_prefetch() {
        if Avx2::detect().is_none() || crate::env::prefetch_bytes().is_some() {
            return;
        }
        let big = Bytes::owned(AlignedBuf::zeroed(HUGE_COPY_BYTES));
        let small = Bytes::owned(AlignedBuf::zeroed(HUGE_COPY_BYTES - 1));
        assert_eq!(prefetch_distance(&big), 0);
        assert_eq!(prefetch_distance(&small), pf_bytes());
        assert!(pf_bytes() > 0);
    }
}

//! x86_64 matvec kernels for CPUs with AVX-512 F/BW and AVX-512 VNNI
//! (Ice Lake, Sapphire Rapids, Zen 4 and later), chosen at run time.
//!
//! Quantized weights meet int16 activations in `vpdpwssd`, which multiplies
//! 32 pairs of 16-bit integers and adds them into 16 i32 lanes in one
//! instruction. Against the AVX2 int16 path this drops the per-block float
//! work: activations are scaled per weight group, so a group's integer
//! products add up exactly in i32 and meet the two scales once. That leaves
//! about six instructions per 64 int4 weights, few enough for two cores to
//! keep up with the memory bus.
//!
//! Zen 4 runs AVX-512 at half width, and there one core's int4 matvec was
//! bound by those instructions, not by memory. For groups of 128 (what
//! AutoRound writes) a token's int16 activations are therefore also split
//! into their low and high bytes, and `vpdpbusd` meets a group's 64 weight
//! bytes (one word permutation away from as stored): twelve vector
//! instructions per 128 weights against fifteen, with the same i32 lane
//! sums, so the same bits (`dot_i4_g128`).
//!
//! Safety: as in the `avx2` module. An [`Avx512`] exists only after
//! [`Avx512::detect`] saw the features on the running CPU; the views were
//! checked against their shapes, and the safe wrappers check row indices and
//! activation lengths before any pointer is formed. Only unaligned loads are
//! used, so payloads mapped at any address are fine.

#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use crate::kernels::isa::avx512_vnni_fn;
use std::arch::x86_64::*;

// `f16_at` and `prefetch_ahead` are the AVX2 level's: their instructions are
// the same at this level, and they inline into these kernels.
use super::avx2::{f16_at, hsum, prefetch_ahead, Avx2, QuantView};
use crate::tensor::QBLOCK;

/// Proof that the running CPU has AVX-512 F, BW and VNNI besides what
/// [`Avx2`] proves; only [`Avx512::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512 {
    /// The AVX2 kernels, for everything these do not cover.
    pub(crate) avx2: Avx2,
}

impl Avx512 {
    /// `Some` when the CPU supports the instructions these kernels use.
    pub(crate) fn detect(avx2: Avx2) -> Option<Avx512> {
        super::Isa::Avx512Vnni
            .supported()
            .then_some(Avx512 { avx2 })
    }

    /// Whether [`Avx512::quant_rows`] takes `bits`-bit weights with
    /// `group_size`: an i32 lane adds `group_size / 16` products of at most
    /// `(2^bits - 1) * 32767`, which must stay below 2^31.
    pub(crate) fn supports(bits: u8, group_size: usize) -> bool {
        match bits {
            4 => group_size <= 1 << 16,
            8 => group_size <= 1 << 12,
            _ => false,
        }
    }
}

/// The largest int16 activation, `256 * 127 + 127`: the prefill kernels
/// split each value into two signed bytes (`x = 256 hi + lo`), and decode
/// uses the same steps so a prompt gives the same numbers either way.
pub(crate) const ACT_MAX: f32 = 32639.0;

/// A cache-line-aligned buffer of int16 values (a multiple of 32): the
/// many-token kernels load every token's activations as whole 64-byte
/// vectors, which at the allocator's 16-byte alignment would each cross a
/// line three times in four.
pub(crate) struct Int16Lines {
    lines: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i16; 32]);

impl Int16Lines {
    fn zeroed(len: usize) -> Self {
        assert!(len % 32 == 0, "whole lines of int16");
        Int16Lines {
            lines: vec![Line([0; 32]); len / 32],
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lines.len() * 32
    }

    pub(super) fn as_ptr(&self) -> *const i16 {
        self.lines.as_ptr() as *const i16
    }

    fn as_mut_ptr(&mut self) -> *mut i16 {
        self.lines.as_mut_ptr() as *mut i16
    }
}

/// Activations quantized to int16 per weight group: `x[k] ≈ d[g] * xq[k]`
/// with `d[g] = max|x| / 32639` ([`ACT_MAX`]) over group `g` (half a step is
/// 1.5e-5 of the group's largest value).
///
/// For int4 weights the blocks of a group pair up, `(b, b + 1)` for even
/// offsets from the group's first block, to match 32 weight bytes widened to
/// 32 16-bit lanes: the pair's 64 values are stored `x_b[0..16]`,
/// `x_{b+1}[0..16]` (meeting the low nibbles), `x_b[16..32]`,
/// `x_{b+1}[16..32]` (the high nibbles). A group's last block when its count
/// is odd, and every int8 block, is stored plainly.
pub(crate) struct GroupAct {
    pub(super) xq: Int16Lines,
    pub(super) d: Vec<f32>,
    /// Per group: `d[g] * Σ xq` over the group, the sum of the dequantized
    /// activations, for the zero-point correction.
    pub(super) gsum: Vec<f32>,
    /// For int4 weights in whole groups of 128: the same integers split
    /// into bytes laid out for [`dot_i4_g128`] ([`byte_planes`]).
    pub(super) planes: Option<Int16Lines>,
    pub(super) bits: u8,
    pub(super) group_size: usize,
}

impl Avx512 {
    /// Quantizes `x` (length a multiple of 32) for `bits`-bit weights with
    /// `group_size` (a multiple of 32); the last group may be short. With
    /// the byte planes [`Avx512::quant_rows`] takes for groups of 128.
    pub(crate) fn group_act(self, x: &[f32], bits: u8, group_size: usize) -> GroupAct {
        let mut act = self.group_act_tokens(x, bits, group_size);
        if bits == 4 && group_size == 128 && x.len() % 128 == 0 {
            let mut planes = Int16Lines::zeroed(x.len());
            // SAFETY: both buffers hold `x.len()` int16 values (a multiple
            // of 128); features proven by `self`.
            unsafe { byte_planes(act.xq.as_ptr(), planes.as_mut_ptr() as *mut u8, x.len()) };
            act.planes = Some(planes);
        }
        act
    }

    /// [`Avx512::group_act`] without the byte planes, for the many-token
    /// kernels, which do not read them.
    pub(crate) fn group_act_tokens(self, x: &[f32], bits: u8, group_size: usize) -> GroupAct {
        assert!(x.len() % QBLOCK == 0 && group_size % QBLOCK == 0 && group_size > 0);
        let ng = x.len().div_ceil(group_size);
        let mut act = GroupAct {
            xq: Int16Lines::zeroed(x.len()),
            d: vec![0.0; ng],
            gsum: vec![0.0; ng],
            planes: None,
            bits,
            group_size,
        };
        for g in 0..ng {
            let k0 = g * group_size;
            let k1 = (k0 + group_size).min(x.len());
            // SAFETY: `k0..k1` lies inside `x` and `act.xq` (same length),
            // is a whole number of 16-element chunks, and the destination
            // slots of `slot` stay inside the group; features proven by
            // `self`.
            let (d, s) = unsafe {
                quantize_group(
                    x.as_ptr().add(k0),
                    k1 - k0,
                    act.xq.as_mut_ptr().add(k0),
                    bits,
                )
            };
            act.d[g] = d;
            act.gsum[g] = d * s as f32;
        }
        act
    }

    /// `out[i] = row (r0 + i) · x` with `x` quantized by
    /// [`Avx512::group_act`].
    pub(crate) fn quant_rows(self, v: &QuantView, r0: usize, a: &GroupAct, out: &mut [f32]) {
        assert!(r0 + out.len() <= v.rows, "rows out of range");
        assert!(Self::supports(v.bits, v.group_size));
        assert!(a.bits == v.bits && a.group_size == v.group_size);
        assert!(a.xq.len() == v.cols && a.d.len() == v.n_groups && a.gsum.len() == v.n_groups);
        let g128 = is_g128(v) && a.planes.is_some();
        // The symmetric zero-point term, as the AVX2 `correction` forms
        // it, from the sum that came with the scales the kernel loaded
        // anyway; else the zero points' own term.
        let finish = |r: usize, dot: f32, t: f32| match v.zeros {
            None => dot + SYMMETRIC_I4_OFFSET * t,
            Some(_) => dot + self.avx2.zero_correction(v, r, &a.gsum),
        };
        let mut start = 0;
        if v.bits == 4 && g128 && v.n_groups == 4 {
            for (c, o4) in out.chunks_exact_mut(4).enumerate() {
                let r = r0 + 4 * c;
                // SAFETY: as below, for rows `r..r + 4` (in range).
                let (dots, ts) = unsafe { dot_i4_g128_rows4(v, r, a) };
                for (k, o) in o4.iter_mut().enumerate() {
                    *o = finish(r + k, dots[k], ts[k]);
                }
            }
            start = out.len() / 4 * 4;
        }
        for (i, o) in out.iter_mut().enumerate().skip(start) {
            let r = r0 + i;
            // SAFETY: `self` proves the features; the row index is in
            // range and the activations match the view's checked shape.
            let dot = unsafe {
                if v.bits == 4 && g128 {
                    let (dot, t) = dot_i4_g128(v, r, a);
                    *o = finish(r, dot, t);
                    continue;
                } else if v.bits == 4 {
                    dot_i4(v, r, a)
                } else {
                    dot_i8(v, r, a)
                }
            };
            *o = dot + self.avx2.zero_correction(v, r, &a.gsum);
        }
    }
}

impl Avx512 {
    /// The 16-wide counterpart of the AVX2 FMA loop: `iters` iterations of
    /// 10 independent 16-wide FMAs (the same FLOPs as the AVX2 loop run
    /// for `2 * iters`). Returns a value to keep the work alive.
    pub(crate) fn fma_loop(self, iters: u64) -> f32 {
        // SAFETY: features proven by `self`; no memory is touched.
        unsafe { fma_loop(iters) }
    }
}

avx512_vnni_fn! {
unsafe fn fma_loop(iters: u64) -> f32 {
    let mut a = [_mm512_set1_ps(1.0); 10];
    let m = _mm512_set1_ps(0.999_999);
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for ai in a.iter_mut() {
            *ai = _mm512_fmadd_ps(*ai, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for ai in a {
        s = _mm512_add_ps(s, ai);
    }
    _mm512_reduce_add_ps(s)
}
}

/// Where element `e` (0..32) of block `j` of a group goes, relative to the
/// group's start, for `bits`-bit weights and a group of `nb` blocks (see
/// [`GroupAct`]).
fn slot(bits: u8, nb: usize, j: usize, e: usize) -> usize {
    if bits != 4 || (j == nb - 1 && nb % 2 == 1) {
        return j * QBLOCK + e;
    }
    let pair = j / 2;
    pair * 2 * QBLOCK + (e / 16) * 32 + (j % 2) * 16 + e % 16
}

avx512_vnni_fn! {
/// Quantizes the `n` floats at `xp` (one group) into `out` in the layout of
/// [`GroupAct`]; returns the step and the integer sum. The step is 0 for an
/// all-zero group and NaN for a group holding a non-finite value (whose
/// integers are then 0, so the NaN reaches the output through the step).
unsafe fn quantize_group(xp: *const f32, n: usize, out: *mut i16, bits: u8) -> (f32, i32) {
    let Some(amax) = group_amax(xp, n) else {
        // Every slot of the group is written below only on the good path.
        std::ptr::write_bytes(out, 0, n);
        return (f32::NAN, 0);
    };
    if amax == 0.0 {
        std::ptr::write_bytes(out, 0, n);
        return (0.0, 0);
    }
    let inv = _mm512_set1_ps(ACT_MAX / amax);
    let nb = n / QBLOCK;
    let mut sum = _mm512_setzero_si512();
    let mut c = 0;
    while c < n {
        // Round to nearest; |x * inv| <= ACT_MAX up to rounding, which
        // rounds back to ACT_MAX.
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp.add(c)), inv));
        sum = _mm512_add_epi32(sum, q);
        let dst = out.add(slot(bits, nb, c / QBLOCK, c % QBLOCK));
        _mm256_storeu_si256(dst as *mut __m256i, _mm512_cvtsepi32_epi16(q));
        c += 16;
    }
    (amax / ACT_MAX, _mm512_reduce_add_epi32(sum))
}

/// The largest `|x|` over the `n` floats at `xp` (a multiple of 16), or
/// `None` when one of them is NaN or infinite.
#[inline]
pub(super) unsafe fn group_amax(xp: *const f32, n: usize) -> Option<f32> {
    let mut amax = _mm512_setzero_ps();
    let mut bad: __mmask16 = 0;
    let mut c = 0;
    while c < n {
        let v = _mm512_loadu_ps(xp.add(c));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        bad |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        c += 16;
    }
    let amax = _mm512_reduce_max_ps(amax);
    (bad == 0 && amax.is_finite()).then_some(amax)
}

/// Splits `n` int16 activations in the int4 layout of [`GroupAct`] (groups
/// of 128, so two pairs of blocks each) into the bytes [`dot_i4_g128`]
/// meets a group's 64 weight bytes with. Byte `i = 16 b + j` of the weights
/// holds elements `j` (low nibble) and `16 + j` (high nibble) of block `b`;
/// per group of 128 the 256 bytes at `out` are, for the low nibbles then
/// the high ones, the 64 elements' low bytes (unsigned) and then their high
/// bytes (signed), each in weight-byte order: `x = 256 hi + lo` exactly.
unsafe fn byte_planes(xq: *const i16, out: *mut u8, n: usize) {
    let mut k = 0;
    while k < n {
        // A pair's 64 values: elements 0..16 of its two blocks, then
        // elements 16..32 of both (see `slot`).
        let x = |o: usize| _mm512_loadu_si512(xq.add(k + o) as *const _);
        let halves = [[x(0), x(64)], [x(32), x(96)]];
        let o = out.add(2 * k);
        for (h, [p0, p1]) in halves.into_iter().enumerate() {
            let base = o.add(128 * h);
            let bytes = |a: __m512i, b: __m512i| {
                let a = _mm512_castsi256_si512(_mm512_cvtepi16_epi8(a));
                pair_words(_mm512_inserti64x4::<1>(a, _mm512_cvtepi16_epi8(b)))
            };
            let lo = bytes(p0, p1);
            let hi = bytes(_mm512_srai_epi16::<8>(p0), _mm512_srai_epi16::<8>(p1));
            _mm512_storeu_si512(base as *mut _, lo);
            _mm512_storeu_si512(base.add(64) as *mut _, hi);
        }
        k += 128;
    }
}

/// Row `r` of an int4 matrix times group-quantized activations, without the
/// zero-point term: `Σ_g s_g d_g Σ_k q_k xq_k`, exact in i32 within a group.
unsafe fn dot_i4(v: &QuantView, r: usize, a: &GroupAct) -> f32 {
    let gs = v.group_size;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let m = _mm512_set1_epi16(0x0F);
    let pfb = v.pf;
    let mut tot0 = _mm512_setzero_ps();
    let mut tot1 = _mm512_setzero_ps();
    for g in 0..v.n_groups {
        let k0 = g * gs;
        let nb = (gs.min(v.cols - k0)) / QBLOCK;
        let qg = qrow.add(k0 / 2);
        let xg = xq.add(k0);
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        for p in 0..nb / 2 {
            prefetch_ahead(qg.wrapping_add(p * 32), pfb);
            // 32 bytes (two blocks) widened to 16-bit lanes: the low nibble
            // of lane j is element j % 16 of block j / 16, the high nibble
            // element 16 + j % 16; a 16-bit shift by 4 leaves the high one.
            let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qg.add(p * 32) as *const __m256i));
            let lo = _mm512_and_si512(w, m);
            let hi = _mm512_srli_epi16::<4>(w);
            let x = xg.add(p * 64);
            acc0 = _mm512_dpwssd_epi32(acc0, lo, _mm512_loadu_si512(x as *const _));
            acc1 = _mm512_dpwssd_epi32(acc1, hi, _mm512_loadu_si512(x.add(32) as *const _));
        }
        if nb % 2 == 1 {
            // A lone block, activations stored plainly: lanes 0..16 take the
            // low nibbles (elements 0..16), lanes 16..32 the high ones.
            let b = nb - 1;
            let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(qg.add(b * 16) as *const __m128i));
            let lo = _mm256_and_si256(w, _mm256_set1_epi16(0x0F));
            let hi = _mm256_srli_epi16::<4>(w);
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let x = _mm512_loadu_si512(xg.add(b * QBLOCK) as *const _);
            acc0 = _mm512_dpwssd_epi32(acc0, w, x);
        }
        let sd = _mm512_set1_ps(f16_at(srow, g) * *a.d.as_ptr().add(g));
        let i = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
        tot0 = _mm512_fmadd_ps(i, sd, tot0);
        std::mem::swap(&mut tot0, &mut tot1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1))
}

/// [`dot_i4`] for groups of 128 (AutoRound's) with every group whole, on
/// the activations' [`byte_planes`]: the same integer sums and the same
/// float steps in the same order, so the same bits, in fewer vector
/// instructions. A group's 64 weight bytes load whole (one word
/// permutation, [`pair_words`], and no widening); their nibbles meet the
/// activations' low bytes (unsigned) and high bytes (signed) in
/// `vpdpbusd`, 64 products an instruction, and `256 hi + lo` puts the two
/// sums together. On Zen 4, whose AVX-512 runs at half width, the kernel
/// was bound by vector instructions, not memory: twelve per 128 weights
/// here against fifteen with the nibbles widened to int16.
unsafe fn dot_i4_g128(v: &QuantView, r: usize, a: &GroupAct) -> (f32, f32) {
    let ng = v.n_groups;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * ng * 2);
    let planes = a.planes.as_ref().expect("byte planes for groups of 128");
    let xb = planes.as_ptr() as *const u8;
    let d = a.d.as_ptr();
    let gsum = a.gsum.as_ptr();
    let pfb = v.pf;
    let group = |g: usize| group_i4_g128(qrow.add(g * 64), xb.add(g * 256), pfb);
    // Even groups add into `tot0`, odd ones into `tot1`, as in `dot_i4`.
    let mut tot0 = _mm512_setzero_ps();
    let mut tot1 = _mm512_setzero_ps();
    let mut sd = [0f32; 16];
    // `Σ_g s_g gsum_g` in `correction`'s order: eight groups at a time,
    // then the rest one by one after the horizontal sum.
    let mut corr = _mm256_setzero_ps();
    let mut g0 = 0;
    while g0 < ng {
        let n = (ng - g0).min(16);
        let mask = (1u32 << n).wrapping_sub(1);
        let s16 = _mm512_maskz_loadu_epi16(mask, srow.add(2 * g0) as *const i16);
        let s = _mm512_cvtph_ps(_mm512_castsi512_si256(s16));
        let dv = _mm512_maskz_loadu_ps(mask as __mmask16, d.add(g0));
        _mm512_storeu_ps(sd.as_mut_ptr(), _mm512_mul_ps(s, dv));
        let halves = [_mm512_castps512_ps256(s), hi256(s)];
        for (h, sh) in halves.into_iter().enumerate().take(n / 8) {
            corr = _mm256_fmadd_ps(sh, _mm256_loadu_ps(gsum.add(g0 + 8 * h)), corr);
        }
        // `g0` is even (chunks of 16), so `j`'s parity is the group's.
        let mut j = 0;
        while j + 2 <= n {
            tot0 = _mm512_fmadd_ps(group(g0 + j), _mm512_set1_ps(sd[j]), tot0);
            tot1 = _mm512_fmadd_ps(group(g0 + j + 1), _mm512_set1_ps(sd[j + 1]), tot1);
            j += 2;
        }
        if j < n {
            tot0 = _mm512_fmadd_ps(group(g0 + j), _mm512_set1_ps(sd[j]), tot0);
        }
        g0 += n;
    }
    let mut t = hsum(corr);
    for g in ng - ng % 8..ng {
        t += f16_at(srow, g) * *gsum.add(g);
    }
    (_mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1)), t)
}

/// [`dot_i4_g128`] of four rows `r..r + 4` of four groups each (512
/// columns: the routed experts' down projections), each row's result the
/// same bits. With four groups a row, a row's scales, their products with
/// the activations' and the zero-point sum (a scalar loop there) cost about
/// as much as its groups' products: here one 32-byte load brings the four
/// rows' 16 scales, one product forms all 16 `s * d`, and the four sums
/// `Σ_g s_g gsum_g` run side by side in the lanes of one vector, in the
/// same order and roundings as the scalar loop (from `0.0`, one group at
/// a time, product then sum). The rows take no software prefetch hints:
/// without them a down projection read from memory on one thread took
/// 0.031-0.032 ms against 0.035 with them (`rh-bench kernels --shapes
/// expert-down --no-matmul --threads 1`; 0.040 before this kernel), where
/// a gate of 2048 columns still needs them (0.039 against 0.031).
unsafe fn dot_i4_g128_rows4(v: &QuantView, r: usize, a: &GroupAct) -> ([f32; 4], [f32; 4]) {
    debug_assert!(v.n_groups == 4 && v.group_size == 128);
    let planes = a.planes.as_ref().expect("byte planes for groups of 128");
    let xb = planes.as_ptr() as *const u8;
    // Lane 4k + g: row r + k, group g.
    let s = _mm512_cvtph_ps(_mm256_loadu_si256(
        v.scales.as_ptr().add(r * 4 * 2) as *const __m256i
    ));
    let sd = _mm512_mul_ps(s, _mm512_broadcast_f32x4(_mm_loadu_ps(a.d.as_ptr())));
    let sg = _mm512_mul_ps(s, _mm512_broadcast_f32x4(_mm_loadu_ps(a.gsum.as_ptr())));
    // Group g's products of the four rows in lanes 0..4.
    let group_lanes = |g: i32| {
        let idx = _mm512_setr_epi32(g, 4 + g, 8 + g, 12 + g, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, sg))
    };
    let mut t = _mm_add_ps(_mm_setzero_ps(), group_lanes(0));
    for g in 1..4 {
        t = _mm_add_ps(t, group_lanes(g));
    }
    let mut ts = [0f32; 4];
    _mm_storeu_ps(ts.as_mut_ptr(), t);
    let mut dots = [0f32; 4];
    for (k, dot) in dots.iter_mut().enumerate() {
        let qrow = v.q.as_ptr().add((r + k) * v.row_bytes);
        let lane = |g: usize| _mm512_permutexvar_ps(_mm512_set1_epi32((4 * k + g) as i32), sd);
        // No software hints: the four rows' 1 KiB run on, and the
        // hardware prefetcher keeps ahead of these rows, which compute
        // longer per byte than long ones (see the doc above).
        let group = |g: usize| group_i4_g128(qrow.add(g * 64), xb.add(g * 256), 0);
        // Even groups into `tot0`, odd ones into `tot1`, as in `dot_i4`.
        let tot0 = _mm512_fmadd_ps(group(0), lane(0), _mm512_setzero_ps());
        let tot1 = _mm512_fmadd_ps(group(1), lane(1), _mm512_setzero_ps());
        let tot0 = _mm512_fmadd_ps(group(2), lane(2), tot0);
        let tot1 = _mm512_fmadd_ps(group(3), lane(3), tot1);
        *dot = _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1));
    }
    (dots, ts)
}

/// Lanes 8..16 of `v`.
#[inline]
pub(super) unsafe fn hi256(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// Word `2L` of the result is word `L` of `v`, word `2L + 1` its word
/// `16 + L`: i32 lane `L` then holds bytes `2L, 2L + 1, 32 + 2L, 33 + 2L`,
/// the bytes whose products lane `L` of [`dot_i4`] adds up (its 32-byte
/// halves widened to words). Same lanes, same integers, so the same floats.
#[inline]
unsafe fn pair_words(v: __m512i) -> __m512i {
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(idx, v)
}

/// One group of 128 for [`dot_i4_g128`]: its 64 bytes of nibbles at `qg`
/// against its 256 activation bytes at `xb`, as converted floats. Every
/// i32 lane adds eight products per sum and stays exact: at most
/// 8 * 15 * 255 for the low bytes and 8 * 15 * 128 * 256 for the high ones.
#[inline]
unsafe fn group_i4_g128(qg: *const u8, xb: *const u8, pfb: usize) -> __m512 {
    prefetch_ahead(qg, pfb);
    let m = _mm512_set1_epi8(0x0F);
    let w = pair_words(_mm512_loadu_si512(qg as *const _));
    let lo_nib = _mm512_and_si512(w, m);
    let hi_nib = _mm512_and_si512(_mm512_srli_epi16::<4>(w), m);
    let x = |o: usize| _mm512_loadu_si512(xb.add(o) as *const _);
    let z = _mm512_setzero_si512();
    // Low bytes (unsigned) against the nibbles (as signed bytes, 0..15);
    // the nibbles (unsigned) against the high bytes (signed).
    let lo = _mm512_dpbusd_epi32(z, x(0), lo_nib);
    let hi = _mm512_dpbusd_epi32(z, lo_nib, x(64));
    let lo = _mm512_dpbusd_epi32(lo, x(128), hi_nib);
    let hi = _mm512_dpbusd_epi32(hi, hi_nib, x(192));
    _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo))
}

/// Row `r` of an int8 matrix times group-quantized activations, without the
/// zero-point term (the unsigned bytes meet the activations as they are;
/// the correction subtracts the zero point).
unsafe fn dot_i8(v: &QuantView, r: usize, a: &GroupAct) -> f32 {
    let gs = v.group_size;
    let qrow = v.q.as_ptr().add(r * v.row_bytes);
    let srow = v.scales.as_ptr().add(r * v.n_groups * 2);
    let xq = a.xq.as_ptr();
    let pfb = v.pf;
    let mut tot0 = _mm512_setzero_ps();
    let mut tot1 = _mm512_setzero_ps();
    for g in 0..v.n_groups {
        let k0 = g * gs;
        let nb = (gs.min(v.cols - k0)) / QBLOCK;
        let qg = qrow.add(k0);
        let xg = xq.add(k0);
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        let mut b = 0;
        while b + 1 < nb {
            prefetch_ahead(qg.wrapping_add(b * QBLOCK), pfb);
            let w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qg.add(b * QBLOCK) as *const __m256i));
            let w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                qg.add((b + 1) * QBLOCK) as *const __m256i
            ));
            let x = xg.add(b * QBLOCK);
            acc0 = _mm512_dpwssd_epi32(acc0, w0, _mm512_loadu_si512(x as *const _));
            acc1 = _mm512_dpwssd_epi32(acc1, w1, _mm512_loadu_si512(x.add(32) as *const _));
            b += 2;
        }
        if b < nb {
            let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qg.add(b * QBLOCK) as *const __m256i));
            let x = _mm512_loadu_si512(xg.add(b * QBLOCK) as *const _);
            acc0 = _mm512_dpwssd_epi32(acc0, w, x);
        }
        let sd = _mm512_set1_ps(f16_at(srow, g) * *a.d.as_ptr().add(g));
        let i = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
        tot0 = _mm512_fmadd_ps(i, sd, tot0);
        std::mem::swap(&mut tot0, &mut tot1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1))
}
}

/// `offset − z` of `correction` for symmetric int4 weights (zero 8).
const SYMMETRIC_I4_OFFSET: f32 = -8.0;

/// Whether `v` takes [`dot_i4_g128`]: groups of 128 (AutoRound's), every
/// group whole.
fn is_g128(v: &QuantView) -> bool {
    v.group_size == 128 && v.cols % 128 == 0
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::rand_quant;
    use super::*;
    use crate::tensor::Zeros;

    /// The many-token rows give every token its lone `quant_rows` bits at
    /// every count up to eight, int4 and int8, symmetric and with zero
    /// points, long (the wide int8 pass from two tokens) and short rows,
    /// group counts past one vector of scale products (16): including the
    /// counts `matmul` never sends here (more than four tokens of int4
    /// rows), which go in passes of four.
    #[test]
    fn many_token_rows_are_each_tokens_lone_rows_bit_for_bit() {
        let Some(b) = Avx2::detect().and_then(Avx512::detect) else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(67);
        for (bits, cols, gs, zeros) in [
            (4, 512, 128, false),
            (4, 1152, 64, true),
            (8, 256, 32, true),
            (8, 2304, 128, false),
            (8, 1152, 64, true),
        ] {
            let m = rand_quant(&mut rng, 21, cols, bits, gs, zeros);
            let v = QuantView::new(&m).unwrap();
            for n in 1..=crate::kernels::SMALL_BATCH_TOKENS {
                let acts: Vec<GroupAct> = (0..n)
                    .map(|_| {
                        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
                        b.group_act(&x, bits, gs)
                    })
                    .collect();
                let refs: Vec<&GroupAct> = acts.iter().collect();
                let (r0, nr) = (1, v.rows - 2);
                let mut got = vec![f32::NAN; n * nr];
                b.quant_rows_tokens(&v, r0, nr, &refs, &mut got);
                for (t, a) in acts.iter().enumerate() {
                    let mut want = vec![0f32; nr];
                    b.quant_rows(&v, r0, a, &mut want);
                    let same = got[t * nr..(t + 1) * nr]
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "int{bits} {cols} cols gs{gs}: {n} tokens, token {t}");
                }
            }
        }
    }

    /// The groups-of-128 kernel gives the generic one's bits on every row:
    /// widths of 1 to 20 groups (a chunk of 16 scales and a short one),
    /// symmetric and per-group zeros, activations at the int16 extremes
    /// (both bytes of `256 hi + lo` at their limits), an all-zero group and
    /// a group holding NaN; and so does the four-row kernel at four groups.
    #[test]
    fn groups_of_128_kernel_is_the_generic_one_bit_for_bit() {
        let Some(b) = Avx2::detect().and_then(Avx512::detect) else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(61);
        for (case, ng) in [1usize, 2, 3, 4, 15, 16, 17, 20].into_iter().enumerate() {
            let cols = ng * 128;
            let m = rand_quant(&mut rng, 9, cols, 4, 128, case % 2 == 1);
            let v = QuantView::new(&m).unwrap();
            assert!(is_g128(&v));
            let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
            // Group 0: the extremes, which quantize to ±ACT_MAX and ±1.
            for (k, xk) in x.iter_mut().take(128).enumerate() {
                *xk = [3.0, -3.0, 3.0 / ACT_MAX, -3.0 / ACT_MAX][k % 4];
            }
            if ng > 2 {
                x[128..256].fill(0.0);
                x[2 * 128 + 77] = f32::NAN;
            }
            let a = b.group_act(&x, 4, 128);
            assert!(a.planes.is_some());
            for r in 0..v.rows {
                // SAFETY: row in range, activations of the view's shape.
                let (want, (got, t)) = unsafe { (dot_i4(&v, r, &a), dot_i4_g128(&v, r, &a)) };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{ng} groups, row {r}: {got} vs {want}"
                );
                if matches!(m.zeros, Zeros::Symmetric) {
                    let want = b.avx2.zero_correction(&v, r, &a.gsum);
                    let got = SYMMETRIC_I4_OFFSET * t;
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{ng} groups, row {r}: zero term"
                    );
                }
            }
            // Four rows at a time (four groups a row): each row's dot and
            // zero-point sum as the one-row kernel's.
            if ng == 4 {
                for r in (0..v.rows - 3).step_by(4) {
                    // SAFETY: rows `r..r + 4` in range, activations as above.
                    let (dots, ts) = unsafe { dot_i4_g128_rows4(&v, r, &a) };
                    for k in 0..4 {
                        // SAFETY: as above.
                        let (want, want_t) = unsafe { dot_i4_g128(&v, r + k, &a) };
                        assert_eq!(dots[k].to_bits(), want.to_bits(), "rows4, row {}", r + k);
                        assert_eq!(
                            ts[k].to_bits(),
                            want_t.to_bits(),
                            "rows4, row {} sum",
                            r + k
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int4_slots_are_a_permutation_of_the_group() {
        for nb in 1..=6 {
            let mut seen = vec![false; nb * 32];
            for j in 0..nb {
                for e in 0..32 {
                    let s = slot(4, nb, j, e);
                    assert!(!seen[s], "slot {s} twice (nb {nb})");
                    seen[s] = true;
                }
            }
        }
        // Elements 0..16 of a pair's two blocks meet the low nibbles.
        assert_eq!(slot(4, 4, 1, 3), 16 + 3);
        assert_eq!(slot(4, 4, 0, 20), 32 + 4);
        assert_eq!(slot(4, 3, 2, 20), 2 * 32 + 20);
        assert_eq!(slot(8, 4, 1, 20), 32 + 20);
    }
}

//! Prefill (matrix-matrix) kernels for AVX-512 VNNI: quantized weights
//! times many tokens' int16 activations, with one weight row per vector
//! lane.
//!
//! A matvec lane holds part of one row's dot product, so every weight group
//! ends with a convert and a scale per (row, token); with 128-element groups
//! that is one extra instruction per two multiply-adds. Here a block of 16
//! rows is first transposed into a tile where each 64-byte vector holds the
//! same four columns of all 16 rows as unsigned bytes (int4 nibbles split
//! into bytes, int8 as stored). A token's activations are int16, split
//! exactly into a high and a low signed byte (`x = 256 hi + lo`); each
//! byte's four columns are broadcast to every lane and `vpdpbusd` adds 64
//! products into the 16 rows' sums, one sum for the high bytes and one for
//! the low. A group's two sums are joined and scaled for 16 rows at once.
//! The tile is built once and then meets every token, up to [`TOKENS`] per
//! pass with all sums in registers.
//!
//! Bytes instead of int16 pairs halve the tile (32 KiB for 2048 columns,
//! inside L1) and its stores, and drop the byte shuffles that widened the
//! weights: building tiles is most of the cost for a routed expert that
//! meets only a few tokens.
//!
//! The order of columns inside a tile follows the packed bytes (an int4
//! byte holds elements `j` and `j + 16` of its block); [`SplitActs`] stores
//! each token's activations in the same order, which a dot product does not
//! notice.
//!
//! Safety: as in the `avx512` module. An [`Avx512`] proves the CPU features;
//! the public functions check shapes, row ranges and activation lengths
//! before any pointer is formed; payload loads are unaligned and masked to
//! the bytes that exist.

#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use crate::kernels::isa::avx512_vnni_fn;
use std::arch::x86_64::*;

use super::avx2::{QuantView, SpreadPrefetch, TileScales};
use super::avx512::{group_amax, Avx512, ACT_MAX};
use crate::tensor::QBLOCK;

/// Weight rows in one tile: one per 32-bit lane of a 512-bit vector.
pub(crate) const TILE_ROWS: usize = 16;

/// The most tokens one pass over a tile takes, each with two i32 sums and
/// an f32 total in registers (24 of the 32).
pub(crate) const TOKENS: usize = 8;

/// Activations of `n` tokens quantized to int16 per weight group, for
/// `bits`-bit weights: `x[k] ≈ d[g] * xq[k]` with `d[g] = max|x| / 32639`
/// over group `g`, kept as the signed bytes of `xq = 256 hi + lo`, in tile
/// column order (see [`slot`]).
pub(crate) struct SplitActs {
    hi: Vec<i8>,
    lo: Vec<i8>,
    d: Vec<f32>,
    /// Per token and group: `d[g] * Σ xq`, for the zero-point term.
    gsum: Vec<f32>,
    n: usize,
    cols: usize,
    n_groups: usize,
    bits: u8,
    group_size: usize,
}

/// The position of element `e` (0..32) inside its block's 32 tile columns:
/// int4 byte `4c + m` of a block holds elements `4c + m` (low nibble) and
/// `16 + 4c + m` (high nibble), and a tile vector takes the low nibbles of
/// bytes `4c..4c + 4`, then the next their high nibbles; int8 keeps the
/// plain order.
// The layout's definition: `quantize_group` moves whole dwords by
// [`PAIR_DWORDS`], which `slots_move_whole_dwords` checks against it.
#[cfg_attr(not(test), allow(dead_code))]
fn slot(bits: u8, e: usize) -> usize {
    if bits != 4 {
        return e;
    }
    let (hi, j) = (e / 16, e % 16);
    4 * (2 * (j / 4) + hi) + j % 4
}

/// Which dword of a block each dword of its int4 tile columns comes from
/// ([`slot`] moves the four bytes of a dword together).
const PAIR_DWORDS: [i32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The most columns whose products one i32 lane may add before it is
/// scaled: `(2^bits - 1) * 32639 * cols` stays below 2^31.
fn flush_cols(bits: u8) -> usize {
    if bits == 4 {
        4096
    } else {
        256
    }
}

/// A block of up to [`TILE_ROWS`] weight rows transposed for [`Avx512::tile_multiply`],
/// with their scales per group. Reused from tile to tile.
pub(crate) struct Tile {
    /// `cols / 4` vectors of 16 lanes, each four unsigned weights of one row.
    w: Vec<u8>,
    /// Per group, 16 rows' scales and `scale * zero`.
    scales: TileScales,
    rows: usize,
    cols: usize,
    n_groups: usize,
    /// The lines of the matrix's next tile (the 16 rows after these),
    /// which the first pass of [`Avx512::tile_multiply`] prefetches.
    next: std::ops::Range<usize>,
}

impl Tile {
    /// An empty tile for matrices of `v`'s shape.
    pub(crate) fn new(v: &QuantView) -> Tile {
        Tile {
            w: vec![0; v.cols * TILE_ROWS],
            scales: TileScales::new(v, TILE_ROWS),
            rows: 0,
            cols: v.cols,
            n_groups: v.n_groups,
            next: 0..0,
        }
    }

    /// Whether this tile can take rows of `v` (the same columns and
    /// groups as the matrix it was made for).
    pub(crate) fn fits(&self, v: &QuantView) -> bool {
        self.cols == v.cols && self.n_groups == v.n_groups
    }
}

impl Avx512 {
    /// Quantizes `n` tokens `x` (`[n, cols]`) for `bits`-bit weights with
    /// `group_size` (both multiples of 32; the last group may be short). A
    /// group holding NaN or infinity gets a NaN step, so the token's outputs
    /// show it.
    pub(crate) fn split_acts(
        self,
        x: &[f32],
        n: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
    ) -> SplitActs {
        assert!(cols % QBLOCK == 0 && group_size % QBLOCK == 0 && group_size > 0);
        assert_eq!(x.len(), n * cols, "split_acts: input length");
        let ng = cols.div_ceil(group_size);
        let mut a = SplitActs {
            hi: vec![0; n * cols],
            lo: vec![0; n * cols],
            d: vec![0.0; n * ng],
            gsum: vec![0.0; n * ng],
            n,
            cols,
            n_groups: ng,
            bits,
            group_size,
        };
        for t in 0..n {
            for g in 0..ng {
                let k0 = t * cols + g * group_size;
                let k1 = t * cols + ((g + 1) * group_size).min(cols);
                // SAFETY: features proven by `self`; the three slices have
                // the same length, a multiple of 32.
                let (d, s) = unsafe {
                    quantize_group(&x[k0..k1], &mut a.hi[k0..k1], &mut a.lo[k0..k1], bits)
                };
                a.d[t * ng + g] = d;
                a.gsum[t * ng + g] = d * s as f32;
            }
        }
        a
    }

    /// Transposes rows `r0..r0 + nr` (`nr` at most [`TILE_ROWS`]) of `v`
    /// into `tile`.
    pub(crate) fn tile_load(self, v: &QuantView, r0: usize, nr: usize, tile: &mut Tile) {
        assert!(
            (1..=TILE_ROWS).contains(&nr) && r0 + nr <= v.rows,
            "rows out of range"
        );
        assert!(tile.cols == v.cols && tile.n_groups == v.n_groups);
        assert!(v.bits == 4 || v.bits == 8);
        tile.rows = nr;
        tile.next = v.next_rows_lines(r0, TILE_ROWS);
        // SAFETY: features proven by `self`; `scales` holds one row's
        // `out.len()` f16 values.
        let to_f32 = |scales: &[u8], out: &mut [f32]| unsafe { f16_to_f32(scales.as_ptr(), out) };
        tile.scales.load(v, r0, nr, to_f32);
        // SAFETY: features proven by `self`; rows `r0..r0 + nr` exist, each
        // `row_bytes` long, and `tile.w` holds `cols * 16` bytes.
        unsafe { transpose_rows(v, r0, nr, tile.w.as_mut_ptr()) }
    }

    /// `out[(t - tokens.start) * ldo + i] = row i of tile · token t` for the
    /// tokens `tokens` of `acts` and the tile's rows `i`.
    ///
    /// # Safety
    /// For every token `t` of `tokens`, `out + (t - tokens.start) * ldo`
    /// must be valid for writes of `tile.rows` values that nothing else
    /// reads or writes during the call (a task's columns of a shared
    /// token-major output).
    pub(crate) unsafe fn tile_multiply(
        self,
        tile: &Tile,
        acts: &SplitActs,
        tokens: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
    ) {
        let (first, n) = (tokens.start, tokens.len());
        assert!(tokens.end <= acts.n, "tile_multiply: tokens out of range");
        assert!(acts.cols == tile.cols && acts.n_groups == tile.n_groups);
        assert!(tile.rows <= ldo);
        // Passes of equal size: ten tokens go as one pass of ten, not
        // eight and two.
        let passes = n.div_ceil(TOKENS).max(1);
        let per_pass = n.div_ceil(passes);
        let mut done = 0;
        while done < n {
            let nt = per_pass.min(n - done);
            let (o, t0) = (out.add(done * ldo), first + done);
            // SAFETY: features proven by `self`; tokens `t0..t0 + nt` exist
            // in `acts` (whose shape matches the tile, checked above) and
            // their output rows are the caller's to write.
            unsafe {
                match nt {
                    12 => tile_tokens::<12>(tile, acts, t0, o, ldo, done == 0),
                    11 => tile_tokens::<11>(tile, acts, t0, o, ldo, done == 0),
                    10 => tile_tokens::<10>(tile, acts, t0, o, ldo, done == 0),
                    9 => tile_tokens::<9>(tile, acts, t0, o, ldo, done == 0),
                    8 => tile_tokens::<8>(tile, acts, t0, o, ldo, done == 0),
                    7 => tile_tokens::<7>(tile, acts, t0, o, ldo, done == 0),
                    6 => tile_tokens::<6>(tile, acts, t0, o, ldo, done == 0),
                    5 => tile_tokens::<5>(tile, acts, t0, o, ldo, done == 0),
                    4 => tile_tokens::<4>(tile, acts, t0, o, ldo, done == 0),
                    3 => tile_tokens::<3>(tile, acts, t0, o, ldo, done == 0),
                    2 => tile_tokens::<2>(tile, acts, t0, o, ldo, done == 0),
                    _ => tile_tokens::<1>(tile, acts, t0, o, ldo, done == 0),
                }
            }
            done += nt;
        }
    }
}

avx512_vnni_fn! {
/// Converts `out.len()` little-endian f16 values at `p` to f32.
unsafe fn f16_to_f32(p: *const u8, out: &mut [f32]) {
    let n = out.len();
    let mut i = 0;
    while i + 16 <= n {
        let h = _mm256_loadu_si256(p.add(2 * i) as *const __m256i);
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        i += 16;
    }
    while i < n {
        let h = u16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]);
        out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
        i += 1;
    }
}

/// Quantizes one group `src` to int16 and writes its bytes to `hi` and
/// `lo` in tile column order; returns the step and the integer sum (step 0
/// for an all-zero group, NaN with zero integers for a group holding a
/// non-finite value).
unsafe fn quantize_group(src: &[f32], hi: &mut [i8], lo: &mut [i8], bits: u8) -> (f32, i32) {
    let n = src.len();
    let xp = src.as_ptr();
    let Some(amax) = group_amax(xp, n) else {
        hi.fill(0);
        lo.fill(0);
        return (f32::NAN, 0);
    };
    if amax == 0.0 {
        hi.fill(0);
        lo.fill(0);
        return (0.0, 0);
    }
    let inv = _mm512_set1_ps(ACT_MAX / amax);
    let (qmin, qmax) = (
        _mm512_set1_epi32(-(ACT_MAX as i32)),
        _mm512_set1_epi32(ACT_MAX as i32),
    );
    let mut sum = _mm512_setzero_si512();
    // `slot` moves whole dwords: int4 tile dword k holds block dword
    // PAIR_DWORDS[k] (see `slots_move_whole_dwords`); int8 keeps its order.
    let order = if bits == 4 {
        _mm256_loadu_si256(PAIR_DWORDS.as_ptr() as *const __m256i)
    } else {
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
    };
    assert!(hi.len() == n && lo.len() == n);
    for b in 0..n / QBLOCK {
        let (mut bh, mut bl) = ([_mm_setzero_si128(); 2], [_mm_setzero_si128(); 2]);
        for h in 0..2 {
            // Round to nearest; the clamp only catches rounding at the edge.
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(
                _mm512_loadu_ps(xp.add(b * QBLOCK + 16 * h)),
                inv,
            ));
            let q = _mm512_min_epi32(_mm512_max_epi32(q, qmin), qmax);
            sum = _mm512_add_epi32(sum, q);
            // hi = round(q / 256) and lo = q - 256 hi, both in -127..=127.
            let qh = _mm512_srai_epi32::<8>(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
            let ql = _mm512_sub_epi32(q, _mm512_slli_epi32::<8>(qh));
            bh[h] = _mm512_cvtepi32_epi8(qh);
            bl[h] = _mm512_cvtepi32_epi8(ql);
        }
        // The block's 32 bytes in tile column order; in bounds: block b
        // lies inside the group, whose length `hi` and `lo` have.
        let tile_order = |x: [__m128i; 2]| {
            let v = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(x[0]), x[1]);
            _mm256_permutevar8x32_epi32(v, order)
        };
        _mm256_storeu_si256(hi.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, tile_order(bh));
        _mm256_storeu_si256(lo.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, tile_order(bl));
    }
    (amax / ACT_MAX, _mm512_reduce_add_epi32(sum))
}

/// Transposes 16 vectors of 16 dwords: on return `r[j]` holds dword `j` of
/// every input, input `i` in lane `i`.
#[inline]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + m], 128-bit lane L: dword 4L + m of inputs 4i..4i + 4.
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for m in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(b[m], b[4 + m]);
        let c1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(b[m], b[4 + m]);
        let d0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(b[8 + m], b[12 + m]);
        let d1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(b[8 + m], b[12 + m]);
        r[m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c0, d0);
        r[8 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c0, d0);
        r[4 + m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c1, d1);
        r[12 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c1, d1);
    }
}

/// Writes rows `r0..r0 + nr` of `v` to `dst` as `cols / 4` vectors, each
/// four unsigned weights (tile columns `4p..4p + 4`) of 16 rows (missing
/// rows zero). Works 64 packed bytes of each row at a time: one 16x16
/// dword transpose, then each dword of 4 bytes is one vector (int8) or
/// splits into its low and its high nibbles (int4).
unsafe fn transpose_rows(v: &QuantView, r0: usize, nr: usize, dst: *mut u8) {
    let bits = v.bits as usize;
    let row_bytes = v.row_bytes;
    let base = v.q.as_ptr().add(r0 * row_bytes);
    let nib = _mm512_set1_epi8(0x0F);
    let mut out = dst as *mut __m512i;
    // The weights come from memory (a routed expert is read once per
    // prompt chunk) sixteen short rows at a time, a pattern the hardware
    // prefetchers barely follow. The multiply of the tile before
    // prefetched these; the first chunks are asked for up front in case no
    // earlier tile did (the first of a task). Prefetches never fault.
    let chunks = row_bytes.div_ceil(64);
    for c in 0..PREFETCH_CHUNKS.min(chunks) {
        for i in 0..nr {
            _mm_prefetch::<_MM_HINT_T0>(base.add(i * row_bytes + c * 64) as *const i8);
        }
    }
    let mut off = 0;
    while off < row_bytes {
        let len = 64.min(row_bytes - off);
        let mask: __mmask64 = if len == 64 { !0 } else { (1u64 << len) - 1 };
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, ri) in r.iter_mut().enumerate().take(nr) {
            *ri = _mm512_maskz_loadu_epi8(mask, base.add(i * row_bytes + off) as *const i8);
        }
        transpose16(&mut r);
        // `len` is a multiple of 16 (one block of int4, half of int8).
        for d in r.iter().take(len / 4) {
            if bits == 4 {
                _mm512_storeu_si512(out as *mut _, _mm512_and_si512(*d, nib));
                _mm512_storeu_si512(
                    out.add(1) as *mut _,
                    _mm512_and_si512(_mm512_srli_epi16::<4>(*d), nib),
                );
                out = out.add(2);
            } else {
                _mm512_storeu_si512(out as *mut _, *d);
                out = out.add(1);
            }
        }
        off += len;
    }
}
}

/// The 64-byte chunks of each row [`transpose_rows`] prefetches before it
/// starts a tile.
const PREFETCH_CHUNKS: usize = 4;

avx512_vnni_fn! {
/// The tile's rows times tokens `t0..t0 + T` of `acts`, written to
/// `out[t * ldo + i]` for `t` in `0..T` and the tile's rows `i`.
unsafe fn tile_tokens<const T: usize>(
    tile: &Tile,
    acts: &SplitActs,
    t0: usize,
    out: *mut f32,
    ldo: usize,
    prefetch: bool,
) {
    let cols = tile.cols;
    let ng = tile.n_groups;
    let gs = acts.group_size;
    let flush = flush_cols(acts.bits);
    let w = tile.w.as_ptr() as *const __m512i;
    let (mut xh, mut xl) = ([std::ptr::null::<i32>(); T], [std::ptr::null::<i32>(); T]);
    for (t, (h, l)) in xh.iter_mut().zip(xl.iter_mut()).enumerate() {
        *h = acts.hi.as_ptr().add((t0 + t) * cols) as *const i32;
        *l = acts.lo.as_ptr().add((t0 + t) * cols) as *const i32;
    }
    let d = acts.d.as_ptr().add(t0 * ng);
    let gsum = acts.gsum.as_ptr().add(t0 * ng);
    // The first pass brings the matrix's next tile toward L1, one line
    // every `stride` vectors (int4: a 16-row tile of `cols` columns is
    // `cols / 8` lines over `cols / 4` vectors), so that its transpose
    // finds it there. Spread out, the reads never fill the core's queue of
    // misses; issued in bursts while transposing (as before), they did,
    // and the transpose's own loads waited behind them.
    let stride = if acts.bits == 4 { 2 } else { 1 };
    let mut pf = SpreadPrefetch::new(&tile.next, prefetch);
    let mut tot = [_mm512_setzero_ps(); T];
    for g in 0..ng {
        let k0 = g * gs;
        let k1 = (k0 + gs).min(cols);
        let sv = _mm512_loadu_ps(tile.scales.scale.as_ptr().add(g * TILE_ROWS));
        let mut c0 = k0;
        while c0 < k1 {
            let c1 = (c0 + flush).min(k1);
            let (mut ah, mut al) = ([_mm512_setzero_si512(); T], [_mm512_setzero_si512(); T]);
            for p in c0 / 4..c1 / 4 {
                if p % stride == 0 {
                    pf.step();
                }
                let wv = _mm512_loadu_si512(w.add(p) as *const _);
                for t in 0..T {
                    ah[t] = _mm512_dpbusd_epi32(ah[t], wv, _mm512_set1_epi32(*xh[t].add(p)));
                    al[t] = _mm512_dpbusd_epi32(al[t], wv, _mm512_set1_epi32(*xl[t].add(p)));
                }
            }
            for t in 0..T {
                // Exact: 256 Σ w hi + Σ w lo = Σ w xq, inside i32 (`flush_cols`).
                let acc = _mm512_add_epi32(_mm512_slli_epi32::<8>(ah[t]), al[t]);
                let sd = _mm512_mul_ps(sv, _mm512_set1_ps(*d.add(t * ng + g)));
                tot[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sd, tot[t]);
            }
            c0 = c1;
        }
        let szv = _mm512_loadu_ps(tile.scales.scale_zero.as_ptr().add(g * TILE_ROWS));
        for (t, tv) in tot.iter_mut().enumerate() {
            *tv = _mm512_fnmadd_ps(szv, _mm512_set1_ps(*gsum.add(t * ng + g)), *tv);
        }
    }
    let keep: __mmask16 = ((1u32 << tile.rows) - 1) as __mmask16;
    for (t, v) in tot.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(t * ldo), keep, *v);
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_puts_input_i_in_lane_i() {
        if Avx512::detect(match super::super::avx2::Avx2::detect() {
            Some(a) => a,
            None => return,
        })
        .is_none()
        {
            return;
        }
        let input: Vec<u32> = (0..256).collect();
        let mut got = [0u32; 256];
        // SAFETY: the features were detected just above; the buffers hold
        // 16 vectors each.
        unsafe {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, ri) in r.iter_mut().enumerate() {
                *ri = _mm512_loadu_si512(input.as_ptr().add(16 * i) as *const _);
            }
            transpose16(&mut r);
            for (j, rj) in r.iter().enumerate() {
                _mm512_storeu_si512(got.as_mut_ptr().add(16 * j) as *mut _, *rj);
            }
        }
        for j in 0..16 {
            for i in 0..16 {
                assert_eq!(got[16 * j + i], input[16 * i + j], "dword {j} of input {i}");
            }
        }
    }

    #[test]
    fn slots_move_whole_dwords() {
        // quantize_group permutes dwords by PAIR_DWORDS in place of `slot`.
        for e in 0..QBLOCK {
            let s = slot(4, e);
            assert_eq!(PAIR_DWORDS[s / 4] as usize, e / 4, "element {e}");
            assert_eq!(s % 4, e % 4, "element {e}");
            assert_eq!(slot(8, e), e);
        }
    }

    #[test]
    fn slots_are_a_permutation_of_the_block() {
        for bits in [4u8, 8] {
            let mut seen = [false; 32];
            for e in 0..32 {
                let s = slot(bits, e);
                assert!(!seen[s], "{bits}-bit slot {s} twice");
                seen[s] = true;
            }
        }
        // Bytes 0..4 of a block: low nibbles are elements 0..4 (slots
        // 0..4), high nibbles 16..20 (slots 4..8); bytes 4..8 follow.
        assert_eq!(slot(4, 1), 1);
        assert_eq!(slot(4, 3), 3);
        assert_eq!(slot(4, 16), 4);
        assert_eq!(slot(4, 19), 7);
        assert_eq!(slot(4, 4), 8);
        assert_eq!(slot(4, 20), 12);
        assert_eq!(slot(8, 20), 20);
    }
}

//! Prefill (matrix-matrix) kernels for AVX2: quantized weights times many
//! tokens' int16 activations in integer multiply-adds, with one weight row
//! per 32-bit vector lane, for CPUs without AVX-512; with AVX-VNNI the
//! same loop adds each pair of products in `vpdpwssd` ([`Vnni256`]).
//!
//! The AVX2 matmul without these converts every block of weight rows to f32
//! and multiplies in FMAs: 8 products per instruction, and the conversion
//! was a third of prefill. Here a block of 16 rows is first transposed into
//! a tile of two halves where each 32-byte vector holds two columns of 8
//! rows as int16 (int4 nibbles and int8 bytes widened while transposing). A token's
//! activations are int16 per weight group (`x ≈ d * xq`, `|xq| <= 32767`);
//! each pair of columns is broadcast to every lane and `vpmaddwd` adds 16
//! exact products into 8 rows' i32 sums; each broadcast feeds both halves. A group's sums are converted
//! and scaled for 8 rows at once, so the per-element work is one multiply-
//! add and one add for 16 products, against one FMA for 8. On the AVX-VNNI
//! level (`vpdpwssd` on 256-bit vectors) the multiply-add and the add are
//! one instruction; the loop is one source compiled for each level
//! (`tile_tokens_fn!`), and its sums are the same bits.
//!
//! Why not unsigned weight bytes against activations split into two signed
//! bytes, as the AVX-512 tiles do with `vpdpbusd`: without VNNI that takes
//! `vpmaddubsw` per byte half plus `vpmaddwd` to widen, the same number of
//! multiplies per product as `vpmaddwd` on int16 pairs, and `vpmaddubsw`
//! saturates for int8 weights (`255 * 127 * 2 > 32767`). Int16 pairs are
//! exact for both widths.
//!
//! The order of columns inside a tile follows the packed bytes (see
//! [`slot`]); [`PairActs`] stores each token's activations in the same
//! order, which a dot product does not notice.
//!
//! Safety: as in the `avx2` module. An [`Avx2`] proves the CPU features;
//! the public functions check shapes, row ranges and activation lengths
//! before any pointer is formed; weight loads are unaligned and never read
//! past a row's bytes.

#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use crate::kernels::isa::{avx2_fn, avx_vnni_evex_fn, avx_vnni_fn};
use std::arch::x86_64::*;

use super::avx2::{Avx2, QuantView, SpreadPrefetch, TileScales};
use crate::tensor::QBLOCK;

/// Weight rows in one half of a tile: one per 32-bit lane of a 256-bit
/// vector.
const HALF: usize = 8;

/// Weight rows in one tile: two halves, whose vectors for the same pair of
/// columns lie side by side. A pass multiplies both halves with its
/// tokens, so each token's broadcast activations feed two `vpmaddwd`
/// (16 rows) instead of one: with 8 rows and 8 tokens a pass loaded 9
/// vectors per 8 multiplies and the loads, not the multiplies, set the
/// pace; 16 rows and 6 tokens load 8 per 12.
pub(crate) const TILE_ROWS: usize = 2 * HALF;

/// The most tokens one pass over a whole tile takes: 12 i32 sums, two
/// weight vectors and a broadcast fill 15 of the 16 registers (the f32
/// totals are kept per group, spilled if need be).
const TOKENS: usize = 6;

/// The most tokens one pass over a half tile (at most 8 rows) takes.
const TOKENS_HALF: usize = 8;

/// The largest int16 activation.
const ACT_MAX: f32 = 32767.0;

/// Activations of `n` tokens quantized to int16 per weight group, for
/// `bits`-bit weights: `x[k] ≈ d[g] * xq[k]` with `d[g] = max|x| / 32767`
/// over group `g`, in tile column order (see [`slot`]), two columns per
/// `i32` (the low half the first).
pub(crate) struct PairActs {
    pairs: Vec<i32>,
    d: Vec<f32>,
    /// Per token and group: `d[g] * Σ xq`, for the zero-point term.
    gsum: Vec<f32>,
    n: usize,
    cols: usize,
    n_groups: usize,
    bits: u8,
    group_size: usize,
}

/// The position of element `e` (0..32) inside its block's 32 tile columns.
///
/// A tile vector comes from one dword (four packed bytes) of each row,
/// masked and shifted into 16-bit halves: bytes 0 and 2 form one pair,
/// bytes 1 and 3 another. An int4 byte `m` of a block holds element `m`
/// (low nibble) and `m + 16` (high nibble), so dword `c` gives four vectors:
/// low nibbles of bytes 0 and 2, their high nibbles, then the same for
/// bytes 1 and 3. Int8 dword `c` gives two vectors: elements `4c, 4c + 2`,
/// then `4c + 1, 4c + 3`.
// The layout's definition: `quantize_group` builds it with vector
// shuffles (`tile_order`), which `tile_order_is_slot` checks against it.
#[cfg_attr(not(test), allow(dead_code))]
fn slot(bits: u8, e: usize) -> usize {
    if bits == 4 {
        let (hi, j) = (e / 16, e % 16);
        let (c, k) = (j / 4, j % 4);
        8 * c + 2 * (2 * (k % 2) + hi) + k / 2
    } else {
        let (c, k) = (e / 4, e % 4);
        4 * c + 2 * (k % 2) + k / 2
    }
}

/// The most columns whose products one i32 lane may add before it is
/// scaled: `(2^bits - 1) * 32767 * cols` stays below 2^31.
fn flush_cols(bits: u8) -> usize {
    if bits == 4 {
        4096
    } else {
        256
    }
}

/// Calls the tile loop `$f::<T, H>` for `$halves` halves and `$nt` tokens
/// (the shapes [`Avx2::tile_multiply`] passes take).
macro_rules! by_shape {
    ($f:ident, $halves:expr, $nt:expr, ($($arg:expr),*)) => {
        match ($halves, $nt) {
            (2, 6) => $f::<6, 2>($($arg),*),
            (2, 5) => $f::<5, 2>($($arg),*),
            (2, 4) => $f::<4, 2>($($arg),*),
            (2, 3) => $f::<3, 2>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (2, _) => $f::<1, 2>($($arg),*),
            (_, 8) => $f::<8, 1>($($arg),*),
            (_, 7) => $f::<7, 1>($($arg),*),
            (_, 6) => $f::<6, 1>($($arg),*),
            (_, 5) => $f::<5, 1>($($arg),*),
            (_, 4) => $f::<4, 1>($($arg),*),
            (_, 3) => $f::<3, 1>($($arg),*),
            (_, 2) => $f::<2, 1>($($arg),*),
            _ => $f::<1, 1>($($arg),*),
        }
    };
}

/// Proof that the CPU runs [`Isa::AvxVnni`](crate::kernels::Isa::AvxVnni),
/// and in which encoding: the tile loop then adds its products with one
/// `vpdpwssd` where AVX2 takes `vpmaddwd` and `vpaddd`. Held by an
/// [`Avx2`] (see [`Avx2::with_vnni`]); everything else at that level runs
/// AVX2's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vnni256 {
    /// AVX-VNNI (`avx_vnni_fn!`).
    Vex,
    /// The AVX-512 VNNI + VL encoding (`avx_vnni_evex_fn!`), where the CPU
    /// has those and not AVX-VNNI.
    Evex,
}

impl Vnni256 {
    /// The encoding this CPU runs, if any.
    pub(crate) fn detect() -> Option<Vnni256> {
        use crate::kernels::isa::cpu_has;
        use crate::kernels::Isa;
        // In the order of `Isa::AvxVnni.encodings()`.
        match Isa::AvxVnni.encoding_on(cpu_has)? {
            0 => Some(Vnni256::Vex),
            _ => Some(Vnni256::Evex),
        }
    }
}

/// A block of up to [`TILE_ROWS`] weight rows transposed for
/// [`Avx2::tile_multiply`], with their scales per group. Reused from tile
/// to tile.
pub(crate) struct Tile {
    /// `cols / 2` pairs of vectors of 8 lanes (rows `0..8`, then
    /// `8..16`), each lane two int16 weights of one row.
    w: Vec<i16>,
    /// Per group, 16 rows' scales and `scale * zero`.
    scales: TileScales,
    rows: usize,
    cols: usize,
    n_groups: usize,
    /// The lines of the matrix's next tile (the 16 rows after these),
    /// which the first pass of [`Avx2::tile_multiply`] prefetches.
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

impl Avx2 {
    /// Quantizes `n` tokens `x` (`[n, cols]`) for `bits`-bit weights with
    /// `group_size` (both multiples of 32; the last group may be short). A
    /// group holding NaN or infinity gets a NaN step, so the token's outputs
    /// show it.
    pub(crate) fn pair_acts(
        self,
        x: &[f32],
        n: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
    ) -> PairActs {
        assert!(cols % QBLOCK == 0 && group_size % QBLOCK == 0 && group_size > 0);
        assert_eq!(x.len(), n * cols, "pair_acts: input length");
        let ng = cols.div_ceil(group_size);
        let mut a = PairActs {
            pairs: vec![0; n * cols / 2],
            d: vec![0.0; n * ng],
            gsum: vec![0.0; n * ng],
            n,
            cols,
            n_groups: ng,
            bits,
            group_size,
        };
        // A pair is two int16 in one i32, the first in the low half: on
        // this little-endian target, the int16 values in order.
        let halves: &mut [i16] = bytemuck::cast_slice_mut(&mut a.pairs[..]);
        for t in 0..n {
            for g in 0..ng {
                let k0 = t * cols + g * group_size;
                let k1 = t * cols + ((g + 1) * group_size).min(cols);
                // SAFETY: features proven by `self`; source and
                // destination have the group's length, a multiple of 32.
                let (d, s) = unsafe { quantize_group(&x[k0..k1], &mut halves[k0..k1], bits) };
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
        assert!(v.scales.len() >= 2 * v.rows * v.n_groups);
        tile.rows = nr;
        tile.next = v.next_rows_lines(r0, TILE_ROWS);
        // SAFETY: features proven by `self`; `scales` holds one row's
        // `out.len()` f16 values.
        let to_f32 = |scales: &[u8], out: &mut [f32]| unsafe { f16_to_f32(scales.as_ptr(), out) };
        tile.scales.load(v, r0, nr, to_f32);
        assert!(v.q.len() >= (r0 + nr) * v.row_bytes);
        assert!(tile.w.len() >= v.cols * TILE_ROWS);
        // SAFETY: features proven by `self`; rows `r0..r0 + nr` exist, each
        // `row_bytes` long (checked above), and `tile.w` holds `cols * 16`
        // int16 values, what `cols` columns of 16 rows become; the second
        // half starts one vector (16 int16) in.
        unsafe {
            transpose_rows(v, r0, nr.min(HALF), tile.w.as_mut_ptr());
            if nr > HALF {
                transpose_rows(v, r0 + HALF, nr - HALF, tile.w.as_mut_ptr().add(16));
            }
        }
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
        acts: &PairActs,
        tokens: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
    ) {
        let (first, n) = (tokens.start, tokens.len());
        assert!(tokens.end <= acts.n, "tile_multiply: tokens out of range");
        assert!(acts.cols == tile.cols && acts.n_groups == tile.n_groups);
        assert!(tile.rows <= ldo);
        let halves = if tile.rows > HALF { 2 } else { 1 };
        // Passes of equal size: ten tokens go as two passes of five, not
        // six and four.
        let most = if halves == 2 { TOKENS } else { TOKENS_HALF };
        let passes = n.div_ceil(most).max(1);
        let per_pass = n.div_ceil(passes);
        let mut done = 0;
        while done < n {
            let nt = per_pass.min(n - done);
            let (o, t0) = (out.add(done * ldo), first + done);
            // SAFETY: features proven by `self`; tokens `t0..t0 + nt` exist
            // in `acts` (whose shape matches the tile, checked above) and
            // their output rows are the caller's to write.
            unsafe {
                match self.vnni {
                    None => by_shape!(tile_tokens, halves, nt, (tile, acts, t0, o, ldo, done == 0)),
                    Some(Vnni256::Vex) => {
                        by_shape!(
                            tile_tokens_vex,
                            halves,
                            nt,
                            (tile, acts, t0, o, ldo, done == 0)
                        )
                    }
                    Some(Vnni256::Evex) => {
                        by_shape!(
                            tile_tokens_evex,
                            halves,
                            nt,
                            (tile, acts, t0, o, ldo, done == 0)
                        )
                    }
                }
            }
            done += nt;
        }
    }
}

avx2_fn! {
/// Converts `out.len()` little-endian f16 values at `p` to f32.
unsafe fn f16_to_f32(p: *const u8, out: &mut [f32]) {
    let n = out.len();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(p.add(2 * i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        let h = u16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]);
        out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
        i += 1;
    }
}

/// Quantizes one group `src` (a multiple of 32 long) to int16 in tile
/// column order into `out` (as long); returns the step and the integer sum
/// (step 0 for an all-zero group, NaN with zero integers for a group
/// holding a non-finite value).
unsafe fn quantize_group(src: &[f32], out: &mut [i16], bits: u8) -> (f32, i32) {
    let n = src.len();
    assert!(n % QBLOCK == 0 && out.len() == n);
    let xp = src.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    let mut bad = _mm256_setzero_ps();
    let mut c = 0;
    while c < n {
        let v = _mm256_loadu_ps(xp.add(c));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        c += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes.iter().fold(0f32, |a, v| a.max(*v));
    if _mm256_movemask_ps(bad) != 0 || !amax.is_finite() {
        out.fill(0);
        return (f32::NAN, 0);
    }
    if amax == 0.0 {
        out.fill(0);
        return (0.0, 0);
    }
    let inv = _mm256_set1_ps(ACT_MAX / amax);
    let lim = _mm256_set1_ps(ACT_MAX);
    let neg = _mm256_set1_ps(-ACT_MAX);
    let mut sum = _mm256_setzero_si256();
    let op = out.as_mut_ptr();
    for b in 0..n / QBLOCK {
        let mut q = [_mm256_setzero_si256(); 4];
        for (h, qh) in q.iter_mut().enumerate() {
            // Round to nearest; the clamp only catches rounding at the edge.
            let v = _mm256_mul_ps(_mm256_loadu_ps(xp.add(b * QBLOCK + 8 * h)), inv);
            *qh = _mm256_cvtps_epi32(_mm256_min_ps(lim, _mm256_max_ps(neg, v)));
            sum = _mm256_add_epi32(sum, *qh);
        }
        // In bounds: block b of the group, whose length `out` has.
        let (lo, hi) = tile_order(bits, q);
        _mm256_storeu_si256(op.add(b * QBLOCK) as *mut __m256i, lo);
        _mm256_storeu_si256(op.add(b * QBLOCK + 16) as *mut __m256i, hi);
    }
    let mut s = [0i32; 8];
    _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, sum);
    (amax / ACT_MAX, s.iter().sum())
}

/// A block's 32 int16 values (`q`, elements `8h..8h + 8` in `q[h]`, each
/// within int16) in tile column order ([`slot`]): elements 0..16 of the
/// result in the first vector, 16..32 in the second.
#[inline]
unsafe fn tile_order(bits: u8, q: [__m256i; 4]) -> (__m256i, __m256i) {
    // Elements 0..16 and 16..32 as int16, in order (the pack works per
    // 128-bit lane; the permutation puts the lanes back in order).
    let a = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(q[0], q[1]));
    let b = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(q[2], q[3]));
    if bits == 4 {
        // Tile dword c takes elements 4c..4c + 4 and 16 + 4c..20 + 4c as
        // [x0, x2, y0, y2, x1, x3, y1, y3]: interleave the two halves,
        // then order the words within each 128-bit lane.
        let words = _mm256_setr_epi8(
            0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, //
            0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
        );
        let lo = _mm256_shuffle_epi8(_mm256_unpacklo_epi16(a, b), words);
        let hi = _mm256_shuffle_epi8(_mm256_unpackhi_epi16(a, b), words);
        (
            _mm256_permute2x128_si256::<0x20>(lo, hi),
            _mm256_permute2x128_si256::<0x31>(lo, hi),
        )
    } else {
        // Each four elements as [x0, x2, x1, x3].
        let words = _mm256_setr_epi8(
            0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, //
            0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
        );
        (_mm256_shuffle_epi8(a, words), _mm256_shuffle_epi8(b, words))
    }
}

/// Transposes 8 vectors of 8 dwords: on return `r[j]` holds dword `j` of
/// every input, input `i` in lane `i`.
#[inline]
unsafe fn transpose8(r: &mut [__m256i; 8]) {
    // t[2i], 128-bit half H: dwords 4H, 4H + 1 of inputs 2i, 2i + 1
    // interleaved; t[2i + 1] the same for dwords 4H + 2, 4H + 3.
    let mut t = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + m], half H: dword 4H + m of inputs 4i..4i + 4.
    let mut u = [_mm256_setzero_si256(); 8];
    for i in 0..2 {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for m in 0..4 {
        r[m] = _mm256_permute2x128_si256::<0x20>(u[m], u[4 + m]);
        r[4 + m] = _mm256_permute2x128_si256::<0x31>(u[m], u[4 + m]);
    }
}

/// Writes rows `r0..r0 + nr` (`nr <= 8`) of `v` to `dst` as `cols / 2`
/// vectors two vectors apart (the other half tile's lie between), each
/// two int16 weights (tile columns `2p, 2p + 1`) of 8 rows (missing rows
/// zero). Works 32 packed bytes of each row at a time: one 8x8 dword
/// transpose, then each dword of 4 bytes splits into two vectors (int8:
/// bytes 0 and 2, bytes 1 and 3) or four (int4: those bytes' low nibbles,
/// then their high nibbles).
unsafe fn transpose_rows(v: &QuantView, r0: usize, nr: usize, dst: *mut i16) {
    let row_bytes = v.row_bytes;
    let base = v.q.as_ptr().add(r0 * row_bytes);
    let int4 = v.bits == 4;
    let mask = _mm256_set1_epi32(if int4 { 0x000F_000F } else { 0x00FF_00FF });
    let mut out = dst as *mut __m256i;
    // The weights come from memory (a routed expert is read once per
    // prompt chunk); the multiply of the tile before prefetched these.
    let mut off = 0;
    while off < row_bytes {
        // A row is a multiple of 16 bytes (one int4 block, half an int8
        // one), so a step is 32 bytes or a last 16.
        let len = 32.min(row_bytes - off);
        let mut r = [_mm256_setzero_si256(); 8];
        for (i, ri) in r.iter_mut().enumerate().take(nr) {
            let p = base.add(i * row_bytes + off);
            *ri = if len == 32 {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_inserti128_si256::<0>(
                    _mm256_setzero_si256(),
                    _mm_loadu_si128(p as *const __m128i),
                )
            };
        }
        transpose8(&mut r);
        for d in r.iter().take(len / 4) {
            if int4 {
                _mm256_storeu_si256(out, _mm256_and_si256(*d, mask));
                _mm256_storeu_si256(
                    out.add(2),
                    _mm256_and_si256(_mm256_srli_epi32::<4>(*d), mask),
                );
                _mm256_storeu_si256(
                    out.add(4),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(*d), mask),
                );
                _mm256_storeu_si256(
                    out.add(6),
                    _mm256_and_si256(_mm256_srli_epi32::<12>(*d), mask),
                );
                out = out.add(8);
            } else {
                _mm256_storeu_si256(out, _mm256_and_si256(*d, mask));
                _mm256_storeu_si256(
                    out.add(2),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(*d), mask),
                );
                out = out.add(4);
            }
        }
        off += len;
    }
}

}

/// `acc + ` the 16 products of `w` and `x` (int16 pairs) added in pairs
/// into 8 i32 lanes: AVX2 multiplies and adds in two instructions, VNNI in
/// one (the sums are the same: a pair's sum fits an i32, see
/// [`flush_cols`]).
macro_rules! multiply_add {
    (madd_add, $acc:expr, $w:expr, $x:expr) => {
        _mm256_add_epi32($acc, _mm256_madd_epi16($w, $x))
    };
    (vex, $acc:expr, $w:expr, $x:expr) => {
        _mm256_dpwssd_avx_epi32($acc, $w, $x)
    };
    (evex, $acc:expr, $w:expr, $x:expr) => {
        _mm256_dpwssd_epi32($acc, $w, $x)
    };
}

/// Defines `$name`, the tile multiply's loop, compiled through the level
/// macro `$level` with [`multiply_add!`]'s `$mac`: one source for every
/// level that runs these tiles.
macro_rules! tile_tokens_fn {
    ($level:ident, $name:ident, $mac:ident) => {
        $level! {
/// The tile's rows (its first `H` halves) times tokens `t0..t0 + T` of
/// `acts`, written to `out[t * ldo + i]` for `t` in `0..T` and the tile's
/// rows `i`.
unsafe fn $name<const T: usize, const H: usize>(
    tile: &Tile,
    acts: &PairActs,
    t0: usize,
    out: *mut f32,
    ldo: usize,
    prefetch: bool,
) {
    let cols = tile.cols;
    let ng = tile.n_groups;
    let gs = acts.group_size;
    let flush = flush_cols(acts.bits);
    let w = tile.w.as_ptr() as *const __m256i;
    let mut xs = [std::ptr::null::<i32>(); T];
    for (t, x) in xs.iter_mut().enumerate() {
        *x = acts.pairs.as_ptr().add((t0 + t) * cols / 2);
    }
    let d = acts.d.as_ptr().add(t0 * ng);
    let gsum = acts.gsum.as_ptr().add(t0 * ng);
    // The first pass brings the matrix's next tile toward L1, one line
    // every `stride` column pairs (int4: a 16-row tile of `cols` columns
    // is `cols / 8` lines over `cols / 2` pairs), so that its transpose
    // finds it there. Spread out, the reads never fill the core's queue of
    // misses; issued in bursts while transposing (as before), they did,
    // and the transpose's own loads waited behind them.
    let stride = if acts.bits == 4 { 4 } else { 2 };
    let mut pf = SpreadPrefetch::new(&tile.next, prefetch);
    let mut tot = [[_mm256_setzero_ps(); T]; H];
    for g in 0..ng {
        let k0 = g * gs;
        let k1 = (k0 + gs).min(cols);
        let mut c0 = k0;
        while c0 < k1 {
            let c1 = (c0 + flush).min(k1);
            let mut acc = [[_mm256_setzero_si256(); T]; H];
            for p in c0 / 2..c1 / 2 {
                if p % stride == 0 {
                    pf.step();
                }
                let mut wv = [_mm256_setzero_si256(); H];
                for (h, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(w.add(2 * p + h));
                }
                for t in 0..T {
                    let xv = _mm256_set1_epi32(*xs[t].add(p));
                    for h in 0..H {
                        acc[h][t] = multiply_add!($mac, acc[h][t], wv[h], xv);
                    }
                }
            }
            for h in 0..H {
                let sv = _mm256_loadu_ps(tile.scales.scale.as_ptr().add(g * TILE_ROWS + HALF * h));
                for t in 0..T {
                    let sd = _mm256_mul_ps(sv, _mm256_set1_ps(*d.add(t * ng + g)));
                    tot[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][t]), sd, tot[h][t]);
                }
            }
            c0 = c1;
        }
        for (h, th) in tot.iter_mut().enumerate() {
            let szv = _mm256_loadu_ps(tile.scales.scale_zero.as_ptr().add(g * TILE_ROWS + HALF * h));
            for (t, tv) in th.iter_mut().enumerate() {
                *tv = _mm256_fnmadd_ps(szv, _mm256_set1_ps(*gsum.add(t * ng + g)), *tv);
            }
        }
    }
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (h, th) in tot.iter().enumerate() {
        let rows = tile.rows.saturating_sub(HALF * h).min(HALF);
        let o = out.add(HALF * h);
        if rows == HALF {
            for (t, v) in th.iter().enumerate() {
                _mm256_storeu_ps(o.add(t * ldo), *v);
            }
        } else {
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows as i32), lanes);
            for (t, v) in th.iter().enumerate() {
                _mm256_maskstore_ps(o.add(t * ldo), keep, *v);
            }
        }
    }
}
}
    };
}

tile_tokens_fn!(avx2_fn, tile_tokens, madd_add);
tile_tokens_fn!(avx_vnni_fn, tile_tokens_vex, vex);
tile_tokens_fn!(avx_vnni_evex_fn, tile_tokens_evex, evex);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose8_puts_input_i_in_lane_i() {
        if Avx2::detect().is_none() {
            return;
        }
        let input: Vec<u32> = (0..64).collect();
        let mut got = [0u32; 64];
        // SAFETY: the features were detected just above; the buffers hold
        // 8 vectors each.
        unsafe {
            let mut r = [_mm256_setzero_si256(); 8];
            for (i, ri) in r.iter_mut().enumerate() {
                *ri = _mm256_loadu_si256(input.as_ptr().add(8 * i) as *const _);
            }
            transpose8(&mut r);
            for (j, rj) in r.iter().enumerate() {
                _mm256_storeu_si256(got.as_mut_ptr().add(8 * j) as *mut _, *rj);
            }
        }
        for j in 0..8 {
            for i in 0..8 {
                assert_eq!(got[8 * j + i], input[8 * i + j], "dword {j} of input {i}");
            }
        }
    }

    #[test]
    fn tile_order_is_slot() {
        if Avx2::detect().is_none() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for bits in [4u8, 8] {
            let mut got = [0i16; QBLOCK];
            // SAFETY: AVX2 detected above; `got` holds the two vectors.
            unsafe {
                let q: [__m256i; 4] = std::array::from_fn(|h| {
                    let e = 8 * h as i32;
                    _mm256_setr_epi32(e, e + 1, e + 2, e + 3, e + 4, e + 5, e + 6, e + 7)
                });
                let (lo, hi) = tile_order(bits, q);
                _mm256_storeu_si256(got.as_mut_ptr() as *mut __m256i, lo);
                _mm256_storeu_si256(got.as_mut_ptr().add(16) as *mut __m256i, hi);
            }
            for e in 0..QBLOCK {
                assert_eq!(got[slot(bits, e)] as usize, e, "bits {bits}, element {e}");
            }
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
        // Int4 dword 0 (bytes 0..4): low nibbles of bytes 0 and 2
        // (elements 0, 2), their high nibbles (16, 18), then bytes 1 and 3
        // (1, 3, 17, 19); dword 1 follows.
        let order: Vec<usize> = (0..8)
            .map(|s| (0..32).find(|&e| slot(4, e) == s).unwrap())
            .collect();
        assert_eq!(order, [0, 2, 16, 18, 1, 3, 17, 19]);
        assert_eq!(slot(4, 4), 8);
        // Int8 dword 1: elements 4, 6, 5, 7.
        let order: Vec<usize> = (4..8)
            .map(|s| (0..32).find(|&e| slot(8, e) == s).unwrap())
            .collect();
        assert_eq!(order, [4, 6, 5, 7]);
    }
}

//! AutoRound `auto_round:auto_gptq` packing, and its lossless conversion to
//! the kernel layout of [`QuantMatrix`].
//!
//! AutoRound (GPTQ v1, `qlinear_torch_zp`) stores for a linear `[out, in]`:
//! * `qweight` i32 `[in * bits / 32, out]`: word `(i, n)` holds, in bits
//!   `[j*bits, (j+1)*bits)`, the value of input `k = i * (32/bits) + j`;
//! * `qzeros` i32 `[ceil(in / G), out * bits / 32]`, packed along the output
//!   dimension, storing `zero - 1` (v1) or `zero` (`packing_format
//!   "auto_round"`, v2);
//! * `scales` f16 `[ceil(in / G), out]`, possibly negative.
//!
//! `W[n, k] = scales[k / G, n] * (q[k, n] - zero[k / G, n])`.

use crate::tensor::{AlignedBuf, Bytes, QuantMatrix, Zeros, QBLOCK};

/// Errors converting AutoRound tensors.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A tensor's byte size does not match the layer's shape.
    #[error("`{tensor}` has {found} bytes, expected {expected} for a {bits}-bit [{out}, {inp}] layer with group size {group}")]
    Size {
        /// Tensor name.
        tensor: String,
        /// Actual bytes.
        found: usize,
        /// Expected bytes.
        expected: usize,
        /// Bits.
        bits: u8,
        /// Out features.
        out: usize,
        /// In features.
        inp: usize,
        /// Group size.
        group: usize,
    },
    /// A shape or setting the kernels do not support.
    #[error("`{tensor}`: {reason}")]
    Unsupported {
        /// Tensor or module name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

/// Raw AutoRound tensors of one linear layer (little-endian bytes).
pub struct AutoRoundTensors<'a> {
    /// Module name, for messages.
    pub module: &'a str,
    /// `qweight` bytes.
    pub qweight: &'a [u8],
    /// `qzeros` bytes.
    pub qzeros: &'a [u8],
    /// `scales` bytes (f16).
    pub scales: &'a [u8],
    /// Output features.
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
    /// Bit width (4 or 8).
    pub bits: u8,
    /// Group size (`-1` / 0 means the whole row).
    pub group_size: usize,
    /// True for GPTQ v1 (`auto_round:auto_gptq`): stored zeros are zero - 1.
    pub zeros_minus_one: bool,
}

fn word(bytes: &[u8], idx: usize) -> u32 {
    u32::from_le_bytes(bytes[idx * 4..idx * 4 + 4].try_into().expect("4 bytes"))
}

impl AutoRoundTensors<'_> {
    fn check_sizes(&self) -> Result<(), QuantError> {
        let (bits, out, inp) = (self.bits, self.out_features, self.in_features);
        let unsupported = |reason: String| QuantError::Unsupported {
            tensor: self.module.to_string(),
            reason,
        };
        if bits != 4 && bits != 8 {
            return Err(unsupported(format!(
                "{bits}-bit weights are not supported (4 or 8)"
            )));
        }
        if inp % QBLOCK != 0 {
            return Err(unsupported(format!(
                "input size {inp} is not a multiple of {QBLOCK}, which the kernel layout needs"
            )));
        }
        if self.group_size % QBLOCK != 0 {
            return Err(unsupported(format!(
                "group size {} is not a multiple of {QBLOCK}, which the kernel layout needs",
                self.group_size
            )));
        }
        let pf = 32 / bits as usize;
        let groups = inp.div_ceil(self.group_size);
        let size = |name: &str, found: usize, expected: usize| {
            if found == expected {
                Ok(())
            } else {
                Err(QuantError::Size {
                    tensor: format!("{}.{name}", self.module),
                    found,
                    expected,
                    bits,
                    out,
                    inp,
                    group: self.group_size,
                })
            }
        };
        size("qweight", self.qweight.len(), inp / pf * out * 4)?;
        size(
            "qzeros",
            self.qzeros.len(),
            groups * (out * bits as usize).div_ceil(32) * 4,
        )?;
        size("scales", self.scales.len(), groups * out * 2)
    }

    /// The value of input `k` for output `n`.
    fn q(&self, k: usize, n: usize) -> u32 {
        let bits = self.bits as usize;
        let pf = 32 / bits;
        (word(self.qweight, (k / pf) * self.out_features + n) >> (bits * (k % pf)))
            & ((1 << bits) - 1)
    }

    /// The zero point of group `g`, output `n` (with the v1 +1 applied).
    fn zero(&self, g: usize, n: usize) -> u32 {
        let bits = self.bits as usize;
        let pf = 32 / bits;
        let words_per_row = (self.out_features * bits).div_ceil(32);
        let stored = (word(self.qzeros, g * words_per_row + n / pf) >> (bits * (n % pf)))
            & ((1 << bits) - 1);
        stored + self.zeros_minus_one as u32
    }

    /// Reference dequantization, straight from AutoRound's formula:
    /// `W[n, k]` as f32, row-major `[out, in]`. For tests and tools.
    pub fn dequantize_reference(&self) -> Result<Vec<f32>, QuantError> {
        self.check_sizes()?;
        let (out, inp) = (self.out_features, self.in_features);
        let mut w = vec![0f32; out * inp];
        for n in 0..out {
            for k in 0..inp {
                let g = k / self.group_size;
                let s = half::f16::from_le_bytes([
                    self.scales[(g * out + n) * 2],
                    self.scales[(g * out + n) * 2 + 1],
                ])
                .to_f32();
                w[n * inp + k] = s * (self.q(k, n) as f32 - self.zero(g, n) as f32);
            }
        }
        Ok(w)
    }

    /// Converts to the kernel layout, losslessly: the same integers, scales
    /// and zero points, only rearranged.
    pub fn to_kernel_layout(&self) -> Result<QuantMatrix, QuantError> {
        self.check_sizes()?;
        let (out, inp, bits) = (self.out_features, self.in_features, self.bits);
        let gs = self.group_size;
        let groups = inp.div_ceil(gs);
        let row_bytes = QuantMatrix::packed_row_bytes(inp, bits);
        let mut qdata = AlignedBuf::zeroed(out * row_bytes);
        repack_qweight(self.qweight, qdata.as_mut_slice(), out, inp, bits);
        let mut scales = AlignedBuf::zeroed(out * groups * 2);
        {
            let s = scales.as_mut_slice();
            for g in 0..groups {
                for n in 0..out {
                    let src = (g * out + n) * 2;
                    let dst = (n * groups + g) * 2;
                    s[dst..dst + 2].copy_from_slice(&self.scales[src..src + 2]);
                }
            }
        }
        let sym = QuantMatrix::symmetric_zero(bits) as u32;
        let mut all_sym = true;
        let mut zeros = AlignedBuf::zeroed(out * groups * 2);
        {
            let z = zeros.as_mut_slice();
            let b = bits as usize;
            let pf = 32 / b;
            let mask = (1u32 << b) - 1;
            let words_per_row = (out * b).div_ceil(32);
            let add = self.zeros_minus_one as u32;
            for g in 0..groups {
                let zrow = &self.qzeros[g * words_per_row * 4..(g + 1) * words_per_row * 4];
                for n in 0..out {
                    let w = word(zrow, n / pf);
                    let v = ((w >> (b * (n % pf))) & mask) + add;
                    all_sym &= v == sym;
                    let dst = (n * groups + g) * 2;
                    z[dst..dst + 2].copy_from_slice(&(v as u16).to_le_bytes());
                }
            }
        }
        Ok(QuantMatrix {
            rows: out,
            cols: inp,
            bits,
            group_size: gs,
            qdata: Bytes::owned(qdata),
            scales: Bytes::owned(scales),
            zeros: if all_sym {
                Zeros::Symmetric
            } else {
                Zeros::PerGroup(Bytes::owned(zeros))
            },
        })
    }
}

/// Spreads the 8 nibbles of `x` into the low nibbles of 8 bytes
/// (nibble `j` to byte `j`).
#[inline(always)]
fn spread_nibbles(x: u32) -> u64 {
    let mut v = x as u64;
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
    (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F
}

/// Re-lays AutoRound `qweight` (`[in * bits / 32, out]` words) into kernel
/// rows (`[out, packed_row_bytes]`), a whole word at a time. Produces the
/// same bytes as setting every element with [`put`].
///
/// int8: word `(i, n)` holds inputs `4i..4i+4` of output `n` in byte
/// order, which is exactly the kernel row's byte order, so this is a
/// transpose of 32-bit words. int4: a kernel block of 32 inputs is 16
/// bytes, byte `j` holding input `j` (low nibble) and `j + 16` (high
/// nibble); its four source words hold inputs 0-7, 8-15, 16-23, 24-31.
fn repack_qweight(qweight: &[u8], q: &mut [u8], out: usize, inp: usize, bits: u8) {
    let row_bytes = QuantMatrix::packed_row_bytes(inp, bits);
    let word_rows = inp * bits as usize / 32;
    debug_assert_eq!(qweight.len(), word_rows * out * 4);
    debug_assert_eq!(q.len(), out * row_bytes);
    // Tiles of outputs keep the source rows' cache lines in use.
    const TILE: usize = 64;
    if bits == 8 {
        for n0 in (0..out).step_by(TILE) {
            let n1 = (n0 + TILE).min(out);
            for i in 0..word_rows {
                let src = &qweight[(i * out + n0) * 4..(i * out + n1) * 4];
                for (t, w) in src.chunks_exact(4).enumerate() {
                    let dst = (n0 + t) * row_bytes + i * 4;
                    q[dst..dst + 4].copy_from_slice(w);
                }
            }
        }
        return;
    }
    for n0 in (0..out).step_by(TILE) {
        let n1 = (n0 + TILE).min(out);
        for blk in 0..word_rows / 4 {
            let r =
                |t: usize| &qweight[((blk * 4 + t) * out + n0) * 4..((blk * 4 + t) * out + n1) * 4];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            for t in 0..n1 - n0 {
                let w = |row: &[u8]| word(row, t);
                let lo = spread_nibbles(w(r0)) | (spread_nibbles(w(r2)) << 4);
                let hi = spread_nibbles(w(r1)) | (spread_nibbles(w(r3)) << 4);
                let dst = (n0 + t) * row_bytes + blk * 16;
                q[dst..dst + 8].copy_from_slice(&lo.to_le_bytes());
                q[dst + 8..dst + 16].copy_from_slice(&hi.to_le_bytes());
            }
        }
    }
}

/// Writes element `k` of a packed row.
#[cfg(test)]
fn put(row: &mut [u8], bits: u8, k: usize, v: u8) {
    if bits == 8 {
        row[k] = v;
    } else {
        let block = k / QBLOCK;
        let i = k % QBLOCK;
        let byte = &mut row[block * 16 + (i % 16)];
        if i < 16 {
            *byte = (*byte & 0xF0) | v;
        } else {
            *byte = (*byte & 0x0F) | (v << 4);
        }
    }
}

// The element readers (`get`, `zero_of`, `scale_of`, `dequantize_row`)
// live with the layout in `tensor`, where the kernels read them; they are
// re-exported here for the format code that has always called them here.
pub use crate::tensor::{dequantize_row, get, scale_of, zero_of};

/// Packs f32 weights `[rows, cols]` by round-to-nearest symmetric group
/// quantization with AutoRound's signed-scale rule. Used by the synthetic
/// generator and tests; real checkpoints arrive already quantized.
///
/// Returns AutoRound-layout `(qweight, qzeros, scales)` bytes.
pub fn autoround_pack_sym(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let groups = cols.div_ceil(group_size);
    let maxq = (1i32 << (bits - 1)) as f32;
    let zero = 1u32 << (bits - 1);
    let pf = 32 / bits as usize;
    let mut scales = vec![half::f16::ZERO; groups * rows];
    let mut q = vec![0u32; rows * cols];
    for n in 0..rows {
        for g in 0..groups {
            let lo = g * group_size;
            let hi = (lo + group_size).min(cols);
            let slice = &w[n * cols + lo..n * cols + hi];
            let wmax = slice.iter().cloned().fold(0f32, f32::max);
            let wmin = slice.iter().cloned().fold(0f32, f32::min);
            // auto-round int_sym: the larger-magnitude extreme maps to -maxq.
            let max_v = if wmax.abs() < wmin.abs() {
                wmin.abs()
            } else {
                -wmax.abs()
            };
            let mut s = max_v / maxq;
            if s == 0.0 {
                s = 1.0;
            }
            let s16 = half::f16::from_f32(s);
            scales[g * rows + n] = s16;
            let s = s16.to_f32();
            for (j, &x) in slice.iter().enumerate() {
                let v = (x / s).round().clamp(-maxq, maxq - 1.0) as i32 + zero as i32;
                q[n * cols + lo + j] = v as u32;
            }
        }
    }
    let mut qweight = Vec::with_capacity(cols / pf * rows * 4);
    for i in 0..cols / pf {
        for n in 0..rows {
            let mut word = 0u32;
            for j in 0..pf {
                word |= q[n * cols + i * pf + j] << (bits as usize * j);
            }
            qweight.extend_from_slice(&word.to_le_bytes());
        }
    }
    let zwords = (rows * bits as usize).div_ceil(32);
    let mut zword = 0u32;
    for j in 0..pf {
        zword |= (zero - 1) << (bits as usize * j);
    }
    let mut qzeros = Vec::with_capacity(groups * zwords * 4);
    for _ in 0..groups * zwords {
        qzeros.extend_from_slice(&zword.to_le_bytes());
    }
    let scales = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    (qweight, qzeros, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn kernel_layout_is_lossless() {
        for (bits, gs, rows, cols) in [
            (4u8, 32, 5, 64),
            (8, 32, 3, 96),
            (4, 128, 7, 256),
            (8, 64, 2, 128),
        ] {
            let mut seed = 7;
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let (qw, qz, sc) = autoround_pack_sym(&w, rows, cols, bits, gs);
            let t = AutoRoundTensors {
                module: "m",
                qweight: &qw,
                qzeros: &qz,
                scales: &sc,
                out_features: rows,
                in_features: cols,
                bits,
                group_size: gs,
                zeros_minus_one: true,
            };
            let reference = t.dequantize_reference().unwrap();
            let m = t.to_kernel_layout().unwrap();
            m.check().unwrap();
            assert!(matches!(m.zeros, Zeros::Symmetric));
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                dequantize_row(&m, r, &mut row);
                assert_eq!(
                    &row[..],
                    &reference[r * cols..(r + 1) * cols],
                    "bits {bits} gs {gs}"
                );
            }
            // Quantization error is bounded by half a step; some scales are negative.
            let negative = (0..rows * cols.div_ceil(gs))
                .any(|i| half::f16::from_le_bytes([sc[i * 2], sc[i * 2 + 1]]).to_f32() < 0.0);
            assert!(negative);
        }
    }

    /// The word-at-a-time re-layout gives exactly the bytes of setting
    /// every element one by one (the original definition).
    #[test]
    fn word_relayout_matches_elementwise() {
        let mut seed = 11u64;
        for (bits, out, inp) in [
            (4u8, 3, 64),
            (4, 70, 96),
            (8, 5, 32),
            (8, 130, 64),
            (4, 1, 32),
        ] {
            let pf = 32 / bits as usize;
            let qw: Vec<u8> = (0..inp / pf * out * 4)
                .map(|_| (lcg(&mut seed).to_bits() >> 7) as u8)
                .collect();
            let rb = QuantMatrix::packed_row_bytes(inp, bits);
            let mut want = vec![0u8; out * rb];
            let mask = (1u32 << bits) - 1;
            for i in 0..inp / pf {
                for n in 0..out {
                    let w = word(&qw, i * out + n);
                    for j in 0..pf {
                        let v = ((w >> (bits as usize * j)) & mask) as u8;
                        put(&mut want[n * rb..(n + 1) * rb], bits, i * pf + j, v);
                    }
                }
            }
            let mut got = vec![0u8; out * rb];
            repack_qweight(&qw, &mut got, out, inp, bits);
            assert_eq!(got, want, "bits {bits} out {out} in {inp}");
        }
    }

    #[test]
    fn wrong_sizes_name_the_tensor() {
        let t = AutoRoundTensors {
            module: "model.layers.0.mlp.experts.1.up_proj",
            qweight: &[0; 12],
            qzeros: &[0; 4],
            scales: &[0; 2],
            out_features: 1,
            in_features: 32,
            bits: 4,
            group_size: 32,
            zeros_minus_one: true,
        };
        let e = t.to_kernel_layout().unwrap_err().to_string();
        assert!(e.contains("up_proj.qweight"), "{e}");
    }
}

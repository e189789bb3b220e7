//! Gated full attention of Qwen3-Next: `q_proj` gives, per head,
//! `[q (head_dim) | gate (head_dim)]`; q and k get a zero-centred RMSNorm
//! over the head, then partial NeoX RoPE on the first `rotary_dim` dims;
//! causal softmax attention with grouped KV heads; the output is multiplied
//! by `sigmoid(gate)` and projected by `o_proj`.

use rayon::prelude::*;

use super::norm::{for_each_row, rms_norm_zc_row, sigmoid};
use super::{load_matrix, load_vector, ModelError};
use crate::config::ModelConfig;
use crate::kernels::{attn_prefill, matmul, matmul_batch, vector, Product};
use crate::scratch::{self, Buf};
use crate::tensor::Matrix;
use crate::weights::WeightSource;

/// The KV cache of one attention layer: normalised, rotated keys and values,
/// `[positions, kv_heads * head_dim]` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// Tokens by which a KV cache's buffers grow: a long context then holds at
/// most this many positions more than it uses, where `Vec`'s doubling could
/// hold half as many again as the context (a memory budget sets the
/// context's states aside, see `experts::reserved_bytes`). The price is a
/// copy of the cache every `KV_GROW_TOKENS` positions: for 8,192 tokens of
/// the real model about 6 GiB of copying over the whole conversation.
pub const KV_GROW_TOKENS: usize = 256;

impl KvCache {
    /// Appends `k` and `v` (whole positions of `row` values each).
    fn append(&mut self, k: &[f32], v: &[f32], row: usize) {
        for (buf, x) in [(&mut self.k, k), (&mut self.v, v)] {
            let need = buf.len() + x.len();
            if need > buf.capacity() {
                let step = KV_GROW_TOKENS * row.max(1);
                buf.reserve_exact(need.div_ceil(step) * step - buf.len());
            }
            buf.extend_from_slice(x);
        }
    }
}

/// The projections of a set of tokens ([`Attention::project`]).
pub struct Projected {
    /// `[n, heads * 2 * head_dim]`: per head `[q | gate]`.
    pub qg: Buf,
    /// `[n, kv_heads * head_dim]`.
    pub k: Vec<f32>,
    /// `[n, kv_heads * head_dim]`.
    pub v: Vec<f32>,
}

/// Rows `t0..t0 + len` of a [`Projected`] (one sequence's tokens).
pub struct ProjectedRows<'a> {
    qg: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl Projected {
    /// The rows `t0..t0 + len` of these `n` tokens.
    pub fn at(&self, n: usize, t0: usize, len: usize) -> ProjectedRows<'_> {
        let (qw, kw) = (self.qg.len() / n.max(1), self.k.len() / n.max(1));
        ProjectedRows {
            qg: &self.qg[t0 * qw..(t0 + len) * qw],
            k: &self.k[t0 * kw..(t0 + len) * kw],
            v: &self.v[t0 * kw..(t0 + len) * kw],
        }
    }
}

/// Prefill attention's tokens per task (their query rows share each block
/// of the KV cache).
const ATTN_TOKENS_PER_TASK: usize = 8;

/// KV cache positions per block (64 keys of 256 dims: 64 KiB, in L2).
const ATTN_KEYS_PER_BLOCK: usize = 64;

/// One gated attention mixer.
pub struct Attention {
    hidden: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f32,
    /// `theta^(-2i/rotary_dim)` for `i < rotary_dim / 2`.
    inv_freq: Vec<f32>,
    q_proj: Matrix,
    k_proj: Matrix,
    v_proj: Matrix,
    o_proj: Matrix,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
}

impl Attention {
    /// Loads layer `prefix` (`model.layers.L.self_attn`).
    pub fn load(w: &dyn WeightSource, c: &ModelConfig, prefix: &str) -> Result<Self, ModelError> {
        let (h, nh, nkv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let rot = c.rotary_dim();
        let theta = c.rope_theta() as f32;
        // As transformers computes it: float32 base ** (arange(0, dim, 2) / dim).
        let inv_freq = (0..rot / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / rot as f32))
            .collect();
        Ok(Attention {
            hidden: h,
            nh,
            nkv,
            hd,
            eps: c.rms_norm_eps as f32,
            inv_freq,
            q_proj: load_matrix(w, &format!("{prefix}.q_proj"), nh * hd * 2, h)?,
            k_proj: load_matrix(w, &format!("{prefix}.k_proj"), nkv * hd, h)?,
            v_proj: load_matrix(w, &format!("{prefix}.v_proj"), nkv * hd, h)?,
            o_proj: load_matrix(w, &format!("{prefix}.o_proj"), h, nh * hd)?,
            q_norm: load_vector(w, &format!("{prefix}.q_norm.weight"), &[hd])?,
            k_norm: load_vector(w, &format!("{prefix}.k_norm.weight"), &[hd])?,
        })
    }

    /// The linear modules.
    pub fn matrices(&self) -> [&Matrix; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// Elements of the small tensors.
    pub fn vector_params(&self) -> usize {
        self.q_norm.len() + self.k_norm.len()
    }

    /// Attends `n` normalised tokens `x` `[n, hidden]` at positions
    /// `pos0..pos0 + n`, appending to `cache`; returns `[n, hidden]`.
    pub fn forward(&self, x: &[f32], n: usize, pos0: usize, cache: &mut KvCache) -> Vec<f32> {
        let qkv = self.project(x, n);
        let o = self.attend(&qkv.at(n, 0, n), pos0, cache);
        self.output(&o, n)
    }

    /// The q (with its gate), k and v projections of `n` tokens (any mix of
    /// sequences: each row is one token's).
    pub fn project(&self, x: &[f32], n: usize) -> Projected {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        // Written whole by the product (see `scratch`).
        let mut qg = scratch::take(n * nh * 2 * hd);
        let mut k = vec![0f32; n * nkv * hd];
        let mut v = vec![0f32; n * nkv * hd];
        matmul_batch(
            &mut [
                Product::new(&self.q_proj, x, &mut qg),
                Product::new(&self.k_proj, x, &mut k),
                Product::new(&self.v_proj, x, &mut v),
            ],
            n,
        );
        Projected { qg, k, v }
    }

    /// `o_proj` of `n` tokens' gated attention outputs `[n, heads * head_dim]`.
    pub fn output(&self, o: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.hidden];
        matmul(&self.o_proj, o, n, &mut y);
        y
    }

    /// The per-sequence part: norms, RoPE, the cache append and gated
    /// attention of consecutive tokens of one sequence at positions
    /// `pos0..`, from their projections; returns `[n, heads * head_dim]`
    /// for [`Attention::output`].
    pub fn attend(&self, p: &ProjectedRows, pos0: usize, cache: &mut KvCache) -> Vec<f32> {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let n = p.k.len() / (nkv * hd);
        let (qg, k, v) = (p.qg, p.k, p.v);
        let mut k = k.to_vec();
        // Both written whole below, head by head (see `scratch`).
        let mut q = scratch::take(n * nh * hd);
        let mut gate = scratch::take(n * nh * hd);
        // Per token: split [q | gate] per head, norm per head, rotate.
        for_each_row(&mut q, nh * hd, |t, qt| {
            for (h, qh) in qt.chunks_exact_mut(hd).enumerate() {
                let i = t * nh + h;
                qh.copy_from_slice(&qg[i * 2 * hd..i * 2 * hd + hd]);
                rms_norm_zc_row(qh, &self.q_norm, self.eps);
            }
            rope(qt, hd, &self.inv_freq, pos0 + t);
        });
        for_each_row(&mut gate, nh * hd, |t, gt| {
            for (h, gh) in gt.chunks_exact_mut(hd).enumerate() {
                let i = t * nh + h;
                gh.copy_from_slice(&qg[i * 2 * hd + hd..(i + 1) * 2 * hd]);
            }
        });
        for_each_row(&mut k, nkv * hd, |t, kt| {
            for kh in kt.chunks_exact_mut(hd) {
                rms_norm_zc_row(kh, &self.k_norm, self.eps);
            }
            rope(kt, hd, &self.inv_freq, pos0 + t);
        });
        cache.append(&k, v, nkv * hd);

        let mut o = vec![0f32; n * nh * hd];
        if n < ATTN_TOKENS_PER_TASK {
            self.attend_per_head(&q, &gate, n, pos0, cache, &mut o);
        } else {
            self.attend_blocked(&q, &gate, pos0, cache, &mut o);
        }
        o
    }

    /// Attention for a few tokens (decode): one task per (token, head),
    /// each reading its KV head's whole cache.
    fn attend_per_head(
        &self,
        q: &[f32],
        gate: &[f32],
        n: usize,
        pos0: usize,
        cache: &KvCache,
        o: &mut [f32],
    ) {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let kvw = nkv * hd;
        let (ck, cv) = (&cache.k, &cache.v);
        debug_assert_eq!(o.len(), n * nh * hd);
        o.par_chunks_mut(hd).enumerate().for_each(|(i, oh)| {
            let (t, h) = (i / nh, i % nh);
            let kvh = h / group;
            let qh = &q[i * hd..(i + 1) * hd];
            let len = pos0 + t + 1;
            let mut scores: Vec<f32> = (0..len)
                .map(|s| {
                    let ks = &ck[s * kvw + kvh * hd..s * kvw + (kvh + 1) * hd];
                    vector::dot(qh, ks) * scale
                })
                .collect();
            super::norm::softmax(&mut scores);
            vector::weighted_rows(&scores, &cv[kvh * hd..], kvw, oh);
            for (oj, gj) in oh.iter_mut().zip(&gate[i * hd..(i + 1) * hd]) {
                *oj *= sigmoid(*gj);
            }
        });
    }

    /// Attention for many tokens (prefill): one task per block of
    /// [`ATTN_TOKENS_PER_TASK`] tokens, which for each KV head gathers its
    /// query rows (the block's tokens times the heads sharing the KV head)
    /// and walks the head's cache in blocks of [`ATTN_KEYS_PER_BLOCK`]
    /// positions, using every block for all those rows while it sits in
    /// L2: scores block by block, a softmax per row, then the weighted sum
    /// of values block by block (`attn_prefill`'s register-blocked
    /// kernels). One task per (token, head) read the whole cache for each:
    /// with 4096 positions that is 8 MiB of keys and values per row, from
    /// memory, and attention became most of pp4096. The per-head path's
    /// arithmetic up to the order of additions; a row's positions past its
    /// own (causal mask) get weight 0.
    fn attend_blocked(&self, q: &[f32], gate: &[f32], pos0: usize, cache: &KvCache, o: &mut [f32]) {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let kvw = nkv * hd;
        let (ck, cv) = (&cache.k, &cache.v);
        let tb = ATTN_TOKENS_PER_TASK;
        o.par_chunks_mut(tb * nh * hd)
            .enumerate()
            .for_each(|(bi, ob)| {
                let t0 = bi * tb;
                let nt = ob.len() / (nh * hd);
                // Longest row of the block: its last token's.
                let width = pos0 + t0 + nt;
                // Row r: token r / group, head kvh * group + r % group; a
                // token's rows for one KV head are adjacent in q and o.
                let rows = nt * group;
                let len = |r: usize| pos0 + t0 + r / group + 1;
                let mut scores = vec![0f32; rows * width];
                let mut qb = vec![0f32; rows * hd];
                let mut ok = vec![0f32; rows * hd];
                for kvh in 0..nkv {
                    for t in 0..nt {
                        let at = ((t0 + t) * nh + kvh * group) * hd;
                        qb[t * group * hd..(t + 1) * group * hd]
                            .copy_from_slice(&q[at..at + group * hd]);
                    }
                    for s0 in (0..width).step_by(ATTN_KEYS_PER_BLOCK) {
                        let nk = ATTN_KEYS_PER_BLOCK.min(width - s0);
                        attn_prefill::scores(
                            &qb,
                            hd,
                            rows,
                            &ck[s0 * kvw + kvh * hd..],
                            kvw,
                            nk,
                            hd,
                            scale,
                            &mut scores[s0..],
                            width,
                        );
                    }
                    for r in 0..rows {
                        let sr = &mut scores[r * width..(r + 1) * width];
                        super::norm::softmax(&mut sr[..len(r)]);
                        sr[len(r)..].fill(0.0);
                    }
                    for s0 in (0..width).step_by(ATTN_KEYS_PER_BLOCK) {
                        let nk = ATTN_KEYS_PER_BLOCK.min(width - s0);
                        attn_prefill::weighted(
                            &scores[s0..],
                            width,
                            rows,
                            &cv[s0 * kvw + kvh * hd..],
                            kvw,
                            nk,
                            hd,
                            &mut ok,
                            hd,
                            s0 > 0,
                        );
                    }
                    for t in 0..nt {
                        let at = (t * nh + kvh * group) * hd;
                        ob[at..at + group * hd]
                            .copy_from_slice(&ok[t * group * hd..(t + 1) * group * hd]);
                    }
                }
                for (j, oh) in ob.chunks_exact_mut(hd).enumerate() {
                    let g = &gate[(t0 * nh + j) * hd..][..hd];
                    for (oj, gj) in oh.iter_mut().zip(g) {
                        *oj *= sigmoid(*gj);
                    }
                }
            });
    }
}

/// Rotates the first `2 * inv_freq.len()` dims of each `hd`-sized head in
/// `x` to absolute position `pos`, NeoX style (pairs `(i, i + rot/2)`);
/// the remaining dims pass through.
pub fn rope(x: &mut [f32], hd: usize, inv_freq: &[f32], pos: usize) {
    let half = inv_freq.len();
    // One angle per frequency, shared by every head of the token.
    let angles: Vec<(f32, f32)> = inv_freq
        .iter()
        .map(|f| (f * pos as f32).sin_cos())
        .collect();
    for head in x.chunks_exact_mut(hd) {
        for (i, &(sin, cos)) in angles.iter().enumerate() {
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * cos - x2 * sin;
            head[i + half] = x2 * cos + x1 * sin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rope;

    #[test]
    fn rope_rotates_half_pairs_and_passes_the_rest() {
        let inv = [1.0f32, 0.5];
        let orig = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut x = orig.clone();
        rope(&mut x, 6, &inv, 0);
        assert_eq!(x, orig, "position 0 is the identity");
        rope(&mut x, 6, &inv, 3);
        for h in 0..2 {
            let (o, r) = (&orig[h * 6..h * 6 + 6], &x[h * 6..h * 6 + 6]);
            assert_eq!(&r[4..], &o[4..], "dims past rotary_dim pass through");
            // pair (0, 2) rotated by 3 rad, pair (1, 3) by 1.5 rad
            let (s, c) = 3f32.sin_cos();
            assert!((r[0] - (o[0] * c - o[2] * s)).abs() < 1e-6);
            assert!((r[2] - (o[2] * c + o[0] * s)).abs() < 1e-6);
            let (s, c) = 1.5f32.sin_cos();
            assert!((r[1] - (o[1] * c - o[3] * s)).abs() < 1e-6);
        }
    }
}

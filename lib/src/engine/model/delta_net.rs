//! Gated DeltaNet (the linear-attention mixer of Qwen3-Next).
//!
//! Per token: the fused `in_proj_qkvz` / `in_proj_ba` projections are split
//! per key-head group (`[q | k | v (r heads) | z (r heads)]` and
//! `[b (r) | a (r)]`, `r = value heads / key heads`), q, k and v go through a
//! causal depthwise conv with SiLU (the last `K - 1` inputs are the rolling
//! conv state), q and k are L2-normalised (q also scaled by `dk^-0.5`),
//! `beta = sigmoid(b)`, `g = -exp(A_log) * softplus(a + dt_bias)`, and each
//! value head runs the delta rule on its `[dk, dv]` state:
//!
//! ```text
//! S = S * exp(g);  d = beta * (v - Sᵀk);  S = S + k ⊗ d;  o = Sᵀq
//! ```
//!
//! then a gated RMSNorm with `z` and `out_proj`. Prefill runs the same
//! recurrence token by token after batched projections, so prefill and
//! decode give the same numbers (the recurrence itself is
//! `kernels::delta_rule`, one pass over the state per token).

use rayon::prelude::*;

use super::norm::{for_each_row, l2_norm, rms_norm_gated, sigmoid, silu, softplus};
use super::{load_matrix, load_vector, ModelError};
use crate::config::ModelConfig;
use crate::kernels::delta_rule::{delta_rule, DeltaToken};
use crate::kernels::{matmul, matmul_batch, Product};
use crate::scratch::{self, Buf};
use crate::tensor::Matrix;
use crate::weights::WeightSource;

/// Epsilon of the in-kernel q/k L2 norm (FLA's value, independent of the config).
const L2_EPS: f32 = 1e-6;

/// Dimensions of one DeltaNet layer, all from the config.
#[derive(Clone, Copy, Debug)]
pub struct DeltaDims {
    /// Residual width.
    pub hidden: usize,
    /// Key heads.
    pub nk: usize,
    /// Value heads.
    pub nv: usize,
    /// Key head size.
    pub dk: usize,
    /// Value head size.
    pub dv: usize,
    /// Conv kernel width.
    pub kernel: usize,
}

impl DeltaDims {
    /// From the model config.
    pub fn new(c: &ModelConfig) -> DeltaDims {
        DeltaDims {
            hidden: c.hidden_size,
            nk: c.linear_num_key_heads,
            nv: c.linear_num_value_heads,
            dk: c.linear_key_head_dim,
            dv: c.linear_value_head_dim,
            kernel: c.linear_conv_kernel_dim,
        }
    }
    /// Value heads per key head.
    pub fn ratio(&self) -> usize {
        self.nv / self.nk
    }
    /// `nk * dk`.
    pub fn key_dim(&self) -> usize {
        self.nk * self.dk
    }
    /// `nv * dv`.
    pub fn value_dim(&self) -> usize {
        self.nv * self.dv
    }
    /// Channels through the conv (q, k, v).
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    /// Rows of `in_proj_qkvz`.
    pub fn qkvz_rows(&self) -> usize {
        2 * self.key_dim() + 2 * self.value_dim()
    }
}

/// Per-sequence state of one DeltaNet layer.
#[derive(Clone, Debug)]
pub struct DeltaState {
    /// The last `K - 1` conv inputs, oldest first, `[K - 1, conv_dim]`.
    pub conv: Vec<f32>,
    /// Recurrent state per value head, `[nv, dk, dv]`.
    pub ssm: Vec<f32>,
}

/// One Gated DeltaNet mixer.
pub struct DeltaNet {
    dims: DeltaDims,
    eps: f32,
    in_proj_qkvz: Matrix,
    in_proj_ba: Matrix,
    out_proj: Matrix,
    /// `[K, conv_dim]`: tap `j` of every channel together, so a token's
    /// conv is K vector multiply-adds over its channels.
    conv_w: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `-exp(A_log)`.
    a_neg: Vec<f32>,
    norm_w: Vec<f32>,
}

impl DeltaNet {
    /// Loads layer `prefix` (`model.layers.L.linear_attn`).
    pub fn load(w: &dyn WeightSource, c: &ModelConfig, prefix: &str) -> Result<Self, ModelError> {
        let d = DeltaDims::new(c);
        let a_log = load_vector(w, &format!("{prefix}.A_log"), &[d.nv])?;
        Ok(DeltaNet {
            dims: d,
            eps: c.rms_norm_eps as f32,
            in_proj_qkvz: load_matrix(
                w,
                &format!("{prefix}.in_proj_qkvz"),
                d.qkvz_rows(),
                d.hidden,
            )?,
            in_proj_ba: load_matrix(w, &format!("{prefix}.in_proj_ba"), 2 * d.nv, d.hidden)?,
            out_proj: load_matrix(w, &format!("{prefix}.out_proj"), d.hidden, d.value_dim())?,
            conv_w: transpose(
                &load_vector(
                    w,
                    &format!("{prefix}.conv1d.weight"),
                    &[d.conv_dim(), 1, d.kernel],
                )?,
                d.conv_dim(),
                d.kernel,
            ),
            dt_bias: load_vector(w, &format!("{prefix}.dt_bias"), &[d.nv])?,
            a_neg: a_log.iter().map(|v| -v.exp()).collect(),
            norm_w: load_vector(w, &format!("{prefix}.norm.weight"), &[d.dv])?,
        })
    }

    /// The linear modules (for byte and parameter counts).
    pub fn matrices(&self) -> [&Matrix; 3] {
        [&self.in_proj_qkvz, &self.in_proj_ba, &self.out_proj]
    }

    /// Elements of the small tensors.
    pub fn vector_params(&self) -> usize {
        self.conv_w.len() + self.dt_bias.len() + self.a_neg.len() + self.norm_w.len()
    }

    /// A zero state.
    pub fn new_state(&self) -> DeltaState {
        let d = &self.dims;
        DeltaState {
            conv: vec![0.0; (d.kernel - 1) * d.conv_dim()],
            ssm: vec![0.0; d.nv * d.dk * d.dv],
        }
    }

    /// Mixes `n` normalised tokens `x` `[n, hidden]`, continuing `st`;
    /// returns `[n, hidden]`.
    pub fn forward(&self, x: &[f32], n: usize, st: &mut DeltaState) -> Vec<f32> {
        let (qkvz, ba) = self.project(x, n);
        let o = self.mix(&qkvz, &ba, n, st);
        self.output(&o, n)
    }

    /// The input projections of `n` tokens (any mix of sequences: each row
    /// is one token's): `([n, qkvz rows], [n, 2 * nv])`.
    pub fn project(&self, x: &[f32], n: usize) -> (Buf, Vec<f32>) {
        let d = self.dims;
        // Written whole by the product (see `scratch`).
        let mut qkvz = scratch::take(n * d.qkvz_rows());
        let mut ba = vec![0f32; n * 2 * d.nv];
        matmul_batch(
            &mut [
                Product::new(&self.in_proj_qkvz, x, &mut qkvz),
                Product::new(&self.in_proj_ba, x, &mut ba),
            ],
            n,
        );
        (qkvz, ba)
    }

    /// `out_proj` of `n` tokens' gated outputs `o` `[n, nv * dv]`.
    pub fn output(&self, o: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.dims.hidden];
        matmul(&self.out_proj, o, n, &mut y);
        y
    }

    /// The per-sequence part: conv, norms, the delta rule and the gated
    /// norm of `n` consecutive tokens of one sequence, from their
    /// projections ([`DeltaNet::project`]), continuing `st`; returns the
    /// gated outputs `[n, nv * dv]` that [`DeltaNet::output`] projects.
    pub fn mix(&self, qkvz: &[f32], ba: &[f32], n: usize, st: &mut DeltaState) -> Vec<f32> {
        let d = self.dims;
        let (kd, vd, cd) = (d.key_dim(), d.value_dim(), d.conv_dim());
        let r = d.ratio();
        let rows = d.qkvz_rows();
        debug_assert_eq!(qkvz.len(), n * rows);
        debug_assert_eq!(ba.len(), n * 2 * d.nv);

        // Split per key-head group into conv input [q | k | v], b and a (z
        // is read where it lies, below).
        let blk = 2 * d.dk + 2 * r * d.dv;
        let rv = r * d.dv;
        // Written whole: each row's q, k and v parts cover its cd columns.
        let mut mixed = scratch::take(n * cd);
        for_each_row(&mut mixed, cd, |t, m| {
            for g in 0..d.nk {
                let s = &qkvz[t * rows + g * blk..t * rows + (g + 1) * blk];
                m[g * d.dk..(g + 1) * d.dk].copy_from_slice(&s[..d.dk]);
                m[kd + g * d.dk..kd + (g + 1) * d.dk].copy_from_slice(&s[d.dk..2 * d.dk]);
                m[2 * kd + g * rv..2 * kd + (g + 1) * rv]
                    .copy_from_slice(&s[2 * d.dk..2 * d.dk + rv]);
            }
        });
        let mut b = vec![0f32; n * d.nv];
        let mut a = vec![0f32; n * d.nv];
        for t in 0..n {
            for g in 0..d.nk {
                let bas = &ba[t * 2 * d.nv + g * 2 * r..t * 2 * d.nv + (g + 1) * 2 * r];
                for j in 0..r {
                    b[t * d.nv + g * r + j] = bas[j];
                    a[t * d.nv + g * r + j] = bas[r + j];
                }
            }
        }

        // Causal depthwise conv + SiLU over the state's K-1 inputs then these.
        let mut conv = self.conv(&mixed, n, st);

        // q, k: L2 norm per key head; q scaled by dk^-0.5. In place in the
        // conv's output (its rows are [q | k | v]), which nothing else
        // reads: copies of them were 8 MiB a layer per 512 tokens.
        let scale = 1.0 / (d.dk as f32).sqrt();
        for_each_row(&mut conv, cd, |_, row| {
            for h in row[..kd].chunks_exact_mut(d.dk) {
                l2_norm(h, L2_EPS);
                for v in h.iter_mut() {
                    *v *= scale;
                }
            }
            for h in row[kd..2 * kd].chunks_exact_mut(d.dk) {
                l2_norm(h, L2_EPS);
            }
        });

        // Delta rule per value head (heads are independent).
        let heads: Vec<Vec<f32>> = st
            .ssm
            .par_chunks_mut(d.dk * d.dv)
            .enumerate()
            .map(|(h, s)| {
                let kh = h / r;
                let mut out = vec![0f32; n * d.dv];
                let token = |t: usize| DeltaToken {
                    q: &conv[t * cd + kh * d.dk..t * cd + (kh + 1) * d.dk],
                    k: &conv[t * cd + kd + kh * d.dk..t * cd + kd + (kh + 1) * d.dk],
                    v: &conv[t * cd + 2 * kd + h * d.dv..t * cd + 2 * kd + (h + 1) * d.dv],
                    beta: sigmoid(b[t * d.nv + h]),
                    decay: (self.a_neg[h] * softplus(a[t * d.nv + h] + self.dt_bias[h])).exp(),
                };
                delta_rule(s, d.dk, d.dv, n, token, &mut out);
                out
            })
            .collect();

        // Gated RMSNorm per head, then out_proj.
        let mut o = vec![0f32; n * vd];
        for_each_row(&mut o, vd, |t, ot| {
            for (h, ho) in heads.iter().enumerate() {
                let dst = &mut ot[h * d.dv..(h + 1) * d.dv];
                dst.copy_from_slice(&ho[t * d.dv..(t + 1) * d.dv]);
                // z of head h: part h % r of its key-head group's z,
                // read where the projection put it.
                let zg = t * rows + (h / r) * blk + 2 * d.dk + rv + (h % r) * d.dv;
                let zt = &qkvz[zg..zg + d.dv];
                rms_norm_gated(dst, zt, &self.norm_w, self.eps);
            }
        });
        o
    }

    /// The causal conv with SiLU; updates the conv state to the last K-1 inputs.
    fn conv(&self, mixed: &[f32], n: usize, st: &mut DeltaState) -> Buf {
        let d = self.dims;
        let (cd, kk) = (d.conv_dim(), d.kernel);
        let hist = kk - 1;
        // Input row s for s in -(K-1)..n: state row K-1+s when negative.
        let conv_state = &st.conv;
        let input = |s: isize| -> &[f32] {
            if s < 0 {
                let r = (hist as isize + s) as usize;
                &conv_state[r * cd..(r + 1) * cd]
            } else {
                &mixed[s as usize * cd..(s as usize + 1) * cd]
            }
        };
        // Written whole: the first tap writes every element.
        let mut out = scratch::take(n * cd);
        for_each_row(&mut out, cd, |t, o| {
            for j in 0..kk {
                let src = input(t as isize - hist as isize + j as isize);
                let w = &self.conv_w[j * cd..(j + 1) * cd];
                // The first tap writes (see `vector::scale` on why).
                if j == 0 {
                    for ((oc, wc), xc) in o.iter_mut().zip(w).zip(src) {
                        *oc = wc * xc;
                    }
                } else {
                    for ((oc, wc), xc) in o.iter_mut().zip(w).zip(src) {
                        *oc += wc * xc;
                    }
                }
            }
            for v in o.iter_mut() {
                *v = silu(*v);
            }
        });
        // New state: the last K-1 of (old state ++ mixed).
        let mut next = vec![0f32; hist * cd];
        for i in 0..hist {
            next[i * cd..(i + 1) * cd]
                .copy_from_slice(input(n as isize - hist as isize + i as isize));
        }
        st.conv = next;
        out
    }
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

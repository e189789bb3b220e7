//! The Qwen3-Next layer stack: pre-norm decoder layers
//! (`x += mixer(norm(x)); x += moe(norm(x))`), each mixer a Gated DeltaNet
//! or gated attention per `layer_types` / `full_attention_interval`, then the
//! final zero-centred norm and lm_head.

use rayon::prelude::*;

use super::attention::{Attention, KvCache};
use super::delta_net::DeltaNet;
use super::moe::Moe;
use super::norm::rms_norm_zc;
use super::{load_vector, LayerState, Model, ModelError, State};
use crate::config::{LayerType, ModelConfig};
use crate::kernels::{matmul, row};
use crate::tensor::Matrix;
use crate::weights::WeightSource;

/// A layer's token mixer.
pub enum Mixer {
    /// Gated DeltaNet.
    Linear(DeltaNet),
    /// Gated softmax attention.
    Full(Attention),
}

/// One decoder layer.
pub struct Layer {
    eps: f32,
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    /// The token mixer.
    pub mixer: Mixer,
    /// The MoE block.
    pub moe: Moe,
}

impl Layer {
    /// Loads layer `i`.
    pub fn load(w: &dyn WeightSource, c: &ModelConfig, i: usize) -> Result<Layer, ModelError> {
        let p = format!("model.layers.{i}");
        let h = c.hidden_size;
        let mixer = match c.layer_type(i) {
            LayerType::LinearAttention => {
                Mixer::Linear(DeltaNet::load(w, c, &format!("{p}.linear_attn"))?)
            }
            LayerType::FullAttention => {
                Mixer::Full(Attention::load(w, c, &format!("{p}.self_attn"))?)
            }
        };
        Ok(Layer {
            eps: c.rms_norm_eps as f32,
            input_norm: load_vector(w, &format!("{p}.input_layernorm.weight"), &[h])?,
            post_norm: load_vector(w, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            mixer,
            moe: Moe::load(w, c, &format!("{p}.mlp"))?,
        })
    }

    /// A fresh state for this layer.
    pub fn new_state(&self) -> LayerState {
        match &self.mixer {
            Mixer::Linear(d) => LayerState::Linear(d.new_state()),
            Mixer::Full(_) => LayerState::Full(KvCache::default()),
        }
    }

    /// Every linear module of the layer.
    pub fn matrices(&self) -> Vec<&Matrix> {
        let mut v: Vec<&Matrix> = match &self.mixer {
            Mixer::Linear(d) => d.matrices().to_vec(),
            Mixer::Full(a) => a.matrices().to_vec(),
        };
        v.push(self.moe.router());
        for e in self.moe.experts() {
            v.extend(e.matrices());
        }
        if let Some((e, g)) = self.moe.shared() {
            v.extend(e.matrices());
            v.push(g);
        }
        v
    }

    /// Elements of the small tensors.
    pub fn vector_params(&self) -> usize {
        self.input_norm.len()
            + self.post_norm.len()
            + match &self.mixer {
                Mixer::Linear(d) => d.vector_params(),
                Mixer::Full(a) => a.vector_params(),
            }
    }

    /// Weight bytes one decoded token reads in this layer.
    pub fn bytes_per_token(&self, top_k: usize) -> u64 {
        self.per_token(top_k, |m| m.bytes_read() as u64)
    }

    /// Multiply-adds of the layer's matrices for one token: the same
    /// matrices as [`Layer::bytes_per_token`] counts.
    pub fn macs_per_token(&self, top_k: usize) -> u64 {
        self.per_token(top_k, |m| (m.rows() * m.cols()) as u64)
    }

    /// `f` summed over the matrices one token goes through (routed experts
    /// at the layer's average expert).
    fn per_token(&self, top_k: usize, f: impl Fn(&Matrix) -> u64) -> u64 {
        let mut t: u64 = match &self.mixer {
            Mixer::Linear(d) => d.matrices().iter().map(|m| f(m)).sum(),
            Mixer::Full(a) => a.matrices().iter().map(|m| f(m)).sum(),
        };
        t += f(self.moe.router());
        let experts = self.moe.experts();
        if !experts.is_empty() {
            let all: u64 = experts.iter().flat_map(|e| e.matrices()).map(&f).sum();
            t += all * top_k as u64 / experts.len() as u64;
        }
        if let Some((e, g)) = self.moe.shared() {
            t += e.matrices().iter().map(|m| f(m)).sum::<u64>() + f(g);
        }
        t
    }

    /// Runs the residual stream `x` `[n, hidden]` in place: the tokens of
    /// one or more sequences, `segs[i]` the rows of the sequence whose
    /// layer state is `states[i]`. The projections and the MoE see all `n`
    /// rows as one matrix product (each weight read once); the mixer's
    /// per-sequence part (conv and recurrence, or RoPE, cache and
    /// attention) runs per sequence, side by side on the pool.
    fn forward(&self, x: &mut [f32], segs: &[Segment], states: &mut [&mut LayerState]) {
        let n = x.len() / self.input_norm.len();
        let mut h = x.to_vec();
        rms_norm_zc(&mut h, &self.input_norm, self.eps);
        let y = match &self.mixer {
            Mixer::Linear(d) => {
                let (qkvz, ba) = d.project(&h, n);
                let (qw, bw) = (qkvz.len() / n, ba.len() / n);
                let o = per_sequence(segs, states, |seg, st| match st {
                    LayerState::Linear(s) => d.mix(
                        &qkvz[seg.start * qw..seg.end() * qw],
                        &ba[seg.start * bw..seg.end() * bw],
                        seg.len,
                        s,
                    ),
                    _ => panic!("state does not belong to this model (layer kinds differ)"),
                });
                d.output(&o, n)
            }
            Mixer::Full(a) => {
                let p = a.project(&h, n);
                let o = per_sequence(segs, states, |seg, st| match st {
                    LayerState::Full(kv) => a.attend(&p.at(n, seg.start, seg.len), seg.pos0, kv),
                    _ => panic!("state does not belong to this model (layer kinds differ)"),
                });
                a.output(&o, n)
            }
        };
        for (xi, yi) in x.iter_mut().zip(&y) {
            *xi += yi;
        }
        h.copy_from_slice(x);
        rms_norm_zc(&mut h, &self.post_norm, self.eps);
        let y = self.moe.forward(&h, n);
        for (xi, yi) in x.iter_mut().zip(&y) {
            *xi += yi;
        }
    }
}

/// One sequence's rows in a batched step: rows `start..start + len` of the
/// residual stream, at positions `pos0..pos0 + len` of that sequence.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    start: usize,
    len: usize,
    pos0: usize,
}

impl Segment {
    fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Runs `f` for every sequence (in parallel when there are several) and
/// concatenates the outputs in segment order.
fn per_sequence(
    segs: &[Segment],
    states: &mut [&mut LayerState],
    f: impl Fn(&Segment, &mut LayerState) -> Vec<f32> + Sync + Send,
) -> Vec<f32> {
    if segs.len() == 1 {
        return f(&segs[0], states[0]);
    }
    let parts: Vec<Vec<f32>> = segs
        .par_iter()
        .zip(states.par_iter_mut())
        .map(|(seg, st)| f(seg, st))
        .collect();
    parts.concat()
}

/// Which logits a forward call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Logits {
    /// None (an inner chunk of a long prefill).
    None,
    /// The last position's.
    Last,
    /// Every position's.
    All,
}

/// One sequence's part of [`forward`]: its state, the tokens to feed after
/// it, and which logits it wants.
pub(super) struct Step<'a> {
    pub state: &'a mut State,
    pub ids: &'a [u32],
    pub want: Logits,
}

/// Runs every step's ids through the model after its state, all in one
/// pass over the weights, returning each step's logits as `want` asks
/// (`[rows, vocab]`, empty for [`Logits::None`]). Ids are already checked.
pub(super) fn forward(model: &Model, steps: &mut [Step]) -> Vec<Vec<f32>> {
    let (embed, layers, norm, lm_head) = model.parts();
    let c = model.config();
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    let mut segs = Vec::with_capacity(steps.len());
    let mut n = 0;
    for s in steps.iter() {
        assert_eq!(
            s.state.layers.len(),
            layers.len(),
            "state does not belong to this model"
        );
        segs.push(Segment {
            start: n,
            len: s.ids.len(),
            pos0: s.state.pos,
        });
        n += s.ids.len();
    }
    let mut x = vec![0f32; n * h];
    for (t, &id) in steps.iter().flat_map(|s| s.ids).enumerate() {
        row(embed, id as usize, &mut x[t * h..(t + 1) * h]);
    }
    for (li, layer) in layers.iter().enumerate() {
        let mut states: Vec<&mut LayerState> =
            steps.iter_mut().map(|s| &mut s.state.layers[li]).collect();
        layer.forward(&mut x, &segs, &mut states);
    }
    for s in steps.iter_mut() {
        s.state.pos += s.ids.len();
    }
    // The rows whose logits are wanted, all through lm_head at once.
    let rows: Vec<(usize, usize)> = steps
        .iter()
        .zip(&segs)
        .map(|(s, g)| match s.want {
            Logits::None => (g.end(), 0),
            Logits::Last => (g.end() - 1, 1),
            Logits::All => (g.start, g.len),
        })
        .collect();
    let m: usize = rows.iter().map(|r| r.1).sum();
    if m == 0 {
        return vec![Vec::new(); steps.len()];
    }
    let mut last = Vec::with_capacity(m * h);
    for &(r0, len) in &rows {
        last.extend_from_slice(&x[r0 * h..(r0 + len) * h]);
    }
    rms_norm_zc(&mut last, norm, c.rms_norm_eps as f32);
    let mut logits = vec![0f32; m * vocab];
    matmul(lm_head, &last, m, &mut logits);
    if steps.len() == 1 {
        return vec![logits];
    }
    let mut out = Vec::with_capacity(steps.len());
    let mut at = 0;
    for &(_, len) in &rows {
        out.push(logits[at * vocab..(at + len) * vocab].to_vec());
        at += len;
    }
    out
}

//! The Qwen3-Next layer stack: pre-norm decoder layers
//! (`x += mixer(norm(x)); x += moe(norm(x))`), each mixer a Gated DeltaNet
//! or gated attention per `layer_types` / `full_attention_interval`, then the
//! final zero-centred norm and lm_head.

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

    /// Runs `n` tokens of the residual stream `x` `[n, hidden]` in place.
    fn forward(&self, x: &mut [f32], n: usize, pos0: usize, st: &mut LayerState) {
        let mut h = x.to_vec();
        rms_norm_zc(&mut h, &self.input_norm, self.eps);
        let y = match (&self.mixer, st) {
            (Mixer::Linear(d), LayerState::Linear(s)) => d.forward(&h, n, s),
            (Mixer::Full(a), LayerState::Full(kv)) => a.forward(&h, n, pos0, kv),
            _ => panic!("state does not belong to this model (layer kinds differ)"),
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

/// Runs `ids` through the model after `state`, returning the logits `want`
/// asks for. Ids are already checked.
pub(super) fn forward(model: &Model, state: &mut State, ids: &[u32], want: Logits) -> Vec<f32> {
    let (embed, layers, norm, lm_head) = model.parts();
    let c = model.config();
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    assert_eq!(
        state.layers.len(),
        layers.len(),
        "state does not belong to this model"
    );
    let n = ids.len();
    let mut x = vec![0f32; n * h];
    for (t, &id) in ids.iter().enumerate() {
        row(embed, id as usize, &mut x[t * h..(t + 1) * h]);
    }
    for (layer, st) in layers.iter().zip(state.layers.iter_mut()) {
        layer.forward(&mut x, n, state.pos, st);
    }
    state.pos += n;
    let first = match want {
        Logits::None => return Vec::new(),
        Logits::Last => n - 1,
        Logits::All => 0,
    };
    let m = n - first;
    let mut last = x[first * h..].to_vec();
    rms_norm_zc(&mut last, norm, c.rms_norm_eps as f32);
    let mut logits = vec![0f32; m * vocab];
    matmul(lm_head, &last, m, &mut logits);
    logits
}

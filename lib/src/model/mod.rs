//! THROWAWAY engine shim for the serve branch: the contract of
//! /work/engine-api.md with a toy forward pass (logits are a deterministic
//! function of the last id and the position). The engine branch replaces
//! this file; nothing outside it depends on its internals.

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::weights::{WeightError, WeightSource};

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A weight could not be read.
    #[error(transparent)]
    Weight(#[from] WeightError),
}

impl crate::cli::Classify for ModelError {}

/// A loaded model (shim).
pub struct Model {
    weights: Arc<dyn WeightSource>,
    config: ModelConfig,
}

/// Per-sequence state (shim: the ids consumed).
#[derive(Clone)]
pub struct State {
    ids: Vec<u32>,
}

impl State {
    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.ids.len()
    }
}

impl Model {
    /// Loads the model (shim: checks the embedding exists).
    pub fn load(weights: Arc<dyn WeightSource>) -> Result<Model, ModelError> {
        let config = weights.config().clone();
        weights.matrix("model.embed_tokens", config.vocab_size, config.hidden_size)?;
        Ok(Model { weights, config })
    }
    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The weight source.
    pub fn weights(&self) -> &Arc<dyn WeightSource> {
        &self.weights
    }
    /// A fresh state.
    pub fn new_state(&self) -> State {
        State { ids: Vec::new() }
    }
    /// Toy logits of the last position.
    pub fn forward(&self, state: &mut State, ids: &[u32]) -> Vec<f32> {
        let all = self.forward_all(state, ids);
        all[all.len() - self.config.vocab_size..].to_vec()
    }
    /// Toy logits of every position.
    pub fn forward_all(&self, state: &mut State, ids: &[u32]) -> Vec<f32> {
        let v = self.config.vocab_size;
        let mut out = vec![0f32; v * ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            state.ids.push(id);
            let h = (id as u64 ^ (state.ids.len() as u64).wrapping_mul(0x9E37_79B9)) % 20_000;
            out[i * v + 200 + h as usize] = 10.0;
        }
        out
    }
    /// Shim: a rough figure.
    pub fn weight_bytes_per_token(&self) -> u64 {
        (self.config.hidden_size * self.config.vocab_size * 2) as u64
    }
    /// Shim: a rough figure.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes_per_token()
    }
    /// Shim: a rough figure.
    pub fn params(&self) -> u64 {
        (self.config.hidden_size * self.config.vocab_size * 2) as u64
    }
}

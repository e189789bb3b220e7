//! THROWAWAY engine shim for the serve branch: the sampler contract of
//! /work/engine-api.md (greedy when temperature is 0, else a simple
//! seeded temperature sample). Replaced by the engine branch.

use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repeat_penalty: f32,
    /// Window of the penalty.
    pub repeat_last_n: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.6,
            top_k: 20,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A sampler (shim).
pub struct Sampler {
    p: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler with `p`.
    pub fn new(p: SamplingParams) -> Sampler {
        let rng = rand::rngs::StdRng::seed_from_u64(p.seed);
        Sampler { p, rng }
    }
    /// Picks a token.
    pub fn sample(&mut self, logits: &mut [f32], _recent: &[u32]) -> u32 {
        let argmax = logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0;
        if self.p.temperature <= 0.0 {
            return argmax as u32;
        }
        let m = logits[argmax];
        let w: Vec<f32> = logits
            .iter()
            .map(|&l| ((l - m) / self.p.temperature).exp())
            .collect();
        let total: f32 = w.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (i, x) in w.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return i as u32;
            }
        }
        argmax as u32
    }
}

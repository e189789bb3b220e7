//! Choosing the next token from logits: greedy, or temperature sampling with
//! top-k, top-p (nucleus), min-p and a repetition penalty, from a seeded RNG
//! so a run is reproducible.
//!
//! The order follows transformers' logits processors: repetition penalty,
//! temperature, top-k, top-p, min-p, then a draw from what is left.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or less) means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to
    /// at least `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` x the most likely one; 0 = off.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this; 1 = off.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Qwen3's recommended thinking-mode settings.
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

impl SamplingParams {
    /// Greedy decoding (argmax), no penalty.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Refuses settings that make sampling meaningless: NaN or infinite
    /// values, `top_p`/`min_p` outside 0..=1, a penalty that is not
    /// positive. The error names the setting.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let checks = [
            ("temperature", self.temperature, f32::MIN, f32::MAX),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            (
                "repeat_penalty",
                self.repeat_penalty,
                f32::MIN_POSITIVE,
                f32::MAX,
            ),
        ];
        for (name, v, lo, hi) in checks {
            if !v.is_finite() || v < lo || v > hi {
                let range = if hi == 1.0 {
                    "a number from 0 to 1"
                } else if lo > 0.0 {
                    "a finite number above 0"
                } else {
                    "a finite number"
                };
                return Err(SamplingError {
                    name,
                    value: v,
                    range,
                });
            }
        }
        Ok(())
    }
}

/// A sampling setting that makes sampling meaningless (see
/// [`SamplingParams::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{name} {value}: must be {range}")]
pub struct SamplingError {
    /// The setting, e.g. `top_p`.
    pub name: &'static str,
    /// The value given.
    pub value: f32,
    /// What it must be, e.g. `a number from 0 to 1`.
    pub range: &'static str,
}

/// Draws tokens according to [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler seeded with `p.seed`.
    pub fn new(p: SamplingParams) -> Sampler {
        let rng = StdRng::seed_from_u64(p.seed);
        Sampler { params: p, rng }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` (one per vocabulary entry) is modified
    /// in place by the penalty; `recent` is the sequence so far (its last
    /// `repeat_last_n` tokens are penalised).
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: no logits");
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let start = recent.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &recent[start..] {
                let i = t as usize;
                if i < logits.len() && seen.insert(i) {
                    let l = &mut logits[i];
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        // NaN never reaches here through validated settings; should one
        // slip through, it decodes greedily rather than from NaN weights.
        if p.temperature.is_nan() || p.temperature <= 0.0 || p.temperature.is_infinite() {
            return argmax(logits) as u32;
        }
        // Candidates, most likely first (top-k first when set: a partial sort).
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_by(by_logit);
        // Probabilities at the temperature.
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        // Top-p: the shortest prefix reaching top_p.
        let mut keep = probs.len();
        if p.top_p < 1.0 && p.top_p.is_finite() {
            let mut cum = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        // Min-p: relative to the most likely token.
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let probs = &probs[..keep];
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (i, &q) in probs.iter().enumerate() {
            if r < q {
                return idx[i];
            }
            r -= q;
        }
        idx[keep - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 0.5, 2.9, -1.0, 2.0, 0.0, 1.5]
    }

    fn counts(p: SamplingParams, n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut c = vec![0; logits().len()];
        for _ in 0..n {
            c[s.sample(&mut logits(), &[]) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut logits(), &[]), 1);
        let mut l = vec![-5.0, -2.0, -3.0];
        assert_eq!(s.sample(&mut l, &[7, 8]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let p = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..p.clone() });
            (0..64)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let c = counts(
            SamplingParams {
                temperature: 2.0,
                top_k: 1,
                top_p: 1.0,
                ..Default::default()
            },
            200,
        );
        assert_eq!(c[1], 200);
    }

    #[test]
    fn top_k_keeps_only_k() {
        let c = counts(
            SamplingParams {
                temperature: 5.0,
                top_k: 3,
                top_p: 1.0,
                ..Default::default()
            },
            2000,
        );
        // tokens 1 (3.0), 3 (2.9), 5 (2.0)
        for (i, &n) in c.iter().enumerate() {
            assert_eq!(n > 0, [1, 3, 5].contains(&i), "{c:?}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // At temperature 1: p(1) ≈ 0.35, p(3) ≈ 0.32, p(5) ≈ 0.13, ...
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.6,
                ..Default::default()
            },
            2000,
        );
        for (i, &n) in c.iter().enumerate() {
            assert_eq!(n > 0, [1, 3].contains(&i), "top-p {c:?}");
        }
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.3,
                ..Default::default()
            },
            2000,
        );
        // p(5)/p(1) = e^-1 ≈ 0.37 stays; p(7)/p(1) = e^-1.5 ≈ 0.22 goes.
        for (i, &n) in c.iter().enumerate() {
            assert_eq!(n > 0, [1, 3, 5].contains(&i), "min-p {c:?}");
        }
    }

    #[test]
    fn repetition_penalty_demotes_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..Default::default()
        });
        let mut l = logits();
        // token 1 (3.0 -> 1.5) and 3 (2.9 -> 1.45) penalised: 5 (2.0) wins.
        assert_eq!(s.sample(&mut l, &[1, 3]), 5);
        assert_eq!(l[1], 1.5);
        // outside the window: no penalty.
        let mut l = logits();
        assert_eq!(s.sample(&mut l, &[1, 4, 4]), 1);
        // negative logits get more negative
        let mut l = vec![-1.0, -2.0];
        assert_eq!(s.sample(&mut l, &[0]), 0);
        assert_eq!(l[0], -2.0);
    }
}

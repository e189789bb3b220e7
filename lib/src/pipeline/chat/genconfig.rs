//! `generation_config.json`: the sampling defaults and end-of-sequence ids a
//! model ships with.

use serde_json::Value;

use super::ChatError;
use crate::sample::SamplingParams;

/// What `generation_config.json` says (every field optional).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// `do_sample`; `false` means greedy.
    pub do_sample: Option<bool>,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `eos_token_id` (a number or a list).
    pub eos_token_ids: Vec<u32>,
    /// `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl GenerationConfig {
    /// Parses the file's bytes; `dir` names the model in messages.
    pub fn parse(bytes: &[u8], dir: &str) -> Result<GenerationConfig, ChatError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| ChatError::BadFile {
            dir: dir.to_string(),
            file: "generation_config.json".into(),
            reason: e.to_string(),
        })?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let u = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        Ok(GenerationConfig {
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_k: u("top_k"),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            eos_token_ids: ids(v.get("eos_token_id")),
            max_new_tokens: u("max_new_tokens"),
        })
    }

    /// Sampling parameters: the engine's defaults overridden by this file
    /// (`do_sample: false` means greedy, as in transformers).
    pub fn sampling(&self) -> SamplingParams {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        if let Some(x) = self.top_p {
            p.top_p = x;
        }
        if let Some(x) = self.min_p {
            p.min_p = x;
        }
        if let Some(x) = self.repetition_penalty {
            p.repeat_penalty = x;
        }
        if self.do_sample == Some(false) {
            p.temperature = 0.0;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_generation_config() {
        let g = GenerationConfig::parse(
            br#"{"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": true,
                "temperature": 0.6, "top_k": 20, "top_p": 0.95}"#,
            "m",
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![151645, 151643]);
        let p = g.sampling();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 20, 0.95));
        let greedy =
            GenerationConfig::parse(br#"{"do_sample": false, "eos_token_id": 2}"#, "m").unwrap();
        assert_eq!(greedy.sampling().temperature, 0.0);
        assert_eq!(greedy.eos_token_ids, vec![2]);
        let e = GenerationConfig::parse(b"{", "mdir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mdir/generation_config.json"), "{e}");
    }
}

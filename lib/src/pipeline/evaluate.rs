//! Measuring the engine: logits over given ids (prefill or step-by-step
//! decode) written as safetensors, and perplexity over a text file the way
//! llama-perplexity computes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::{Classify, Exit};
use crate::fsutil::{write_atomic, FsError};
use crate::model::{Model, ModelError};
use crate::weights::{WeightError, WeightSource};

/// Errors of the measuring modes.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The model could not be opened.
    #[error(transparent)]
    Open(#[from] crate::open::OpenError),
    /// The model's weights could not be read.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The model could not be loaded or fed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Writing the output failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The cache fails the quick check against its manifest.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// A `--ids` list that does not parse.
    #[error("--ids: `{0}` is not a token id (expected comma-separated integers)")]
    BadId(String),
    /// The model carries no tokenizer.json.
    #[error("{0}: no tokenizer.json next to the model")]
    NoTokenizer(String),
    /// tokenizer.json does not load or encode.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// Model path.
        path: String,
        /// The tokenizer's message.
        reason: String,
    },
    /// The text file cannot be read.
    #[error("{path}: cannot read text: {source}")]
    ReadText {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Too little text for one context window.
    #[error("{path}: {tokens} tokens is fewer than one context of {ctx} (pass a smaller --ctx or a longer text)")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Tokens in the file.
        tokens: usize,
        /// The context.
        ctx: usize,
    },
    /// A context too small to score anything.
    #[error("--ctx {0}: must be at least 4")]
    BadCtx(usize),
    /// Serialising safetensors failed.
    #[error("{path}: cannot serialise logits: {reason}")]
    Serialize {
        /// Output file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Classify for EvalError {
    fn exit(&self) -> Exit {
        match self {
            EvalError::Model(e) => e.exit(),
            EvalError::Verify(e) => e.exit(),
            EvalError::Open(e) => e.exit(),
            EvalError::Weights(e) => e.exit(),
            EvalError::BadId(_) | EvalError::BadCtx(_) => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

// The one opener, re-exported where serve and bench have always called it.
pub use crate::open::open_weights;

/// Opens and loads a model directory.
pub fn open_model(dir: &Path) -> Result<Model, EvalError> {
    Ok(Model::load(open_weights(dir)?)?)
}

/// Parses `1,2,3` into ids.
pub fn parse_ids(s: &str) -> Result<Vec<u32>, EvalError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| EvalError::BadId(p.to_string()))
        })
        .collect()
}

/// Logits at every position of `ids`, `[ids.len(), vocab]`: one prefill, or
/// with `step` one decode call per token.
pub fn logits(model: &Model, ids: &[u32], step: bool) -> Result<Vec<f32>, EvalError> {
    model.check_ids(ids)?;
    let mut st = model.new_state();
    if step {
        let mut out = Vec::with_capacity(ids.len() * model.config().vocab_size);
        for &id in ids {
            out.extend(model.forward(&mut st, &[id]));
        }
        Ok(out)
    } else {
        Ok(model.forward_all(&mut st, ids))
    }
}

/// Writes `logits` as tensor `logits`, F32 `[rows, vocab]`, atomically.
pub fn write_logits(path: &Path, logits: &[f32], vocab: usize) -> Result<(), EvalError> {
    let rows = logits.len() / vocab;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ser = |reason: String| EvalError::Serialize {
        path: path.to_path_buf(),
        reason,
    };
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, vocab], &bytes)
            .map_err(|e| ser(e.to_string()))?;
    let meta: Option<HashMap<String, String>> = None;
    let out = safetensors::tensor::serialize([("logits", view)], &meta)
        .map_err(|e| ser(e.to_string()))?;
    write_atomic(path, &out)?;
    Ok(())
}

/// Tokenizes a text file with the model's tokenizer.json (no special tokens added).
pub fn tokenize_file(weights: &dyn WeightSource, text: &Path) -> Result<Vec<u32>, EvalError> {
    let json = weights
        .aux_file("tokenizer.json")
        .ok_or_else(|| EvalError::NoTokenizer(weights.path()))?;
    let tok = tokenizers::Tokenizer::from_bytes(&json).map_err(|e| EvalError::Tokenizer {
        path: weights.path(),
        reason: e.to_string(),
    })?;
    let s = std::fs::read_to_string(text).map_err(|source| EvalError::ReadText {
        path: text.to_path_buf(),
        source,
    })?;
    let enc = tok.encode(s, false).map_err(|e| EvalError::Tokenizer {
        path: weights.path(),
        reason: e.to_string(),
    })?;
    Ok(enc.get_ids().to_vec())
}

/// A perplexity measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    /// `exp(mean negative log-likelihood)`.
    pub ppl: f64,
    /// Its standard error (llama-perplexity's estimate).
    pub ppl_err: f64,
    /// Mean negative log-likelihood (nats per token).
    pub nll: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Tokens in the text.
    pub tokens_total: usize,
    /// Context size per chunk.
    pub ctx: usize,
    /// Cumulative perplexity after each chunk (llama's `[1]x,[2]y,...`).
    pub per_chunk: Vec<f64>,
}

/// Tokens per forward call when scoring (bounds the logits held at once).
const SCORE_BATCH: usize = 64;

/// Perplexity over `tokens` like llama-perplexity: the text is cut into
/// chunks of `ctx` tokens, each evaluated from a fresh state, and only the
/// second half of each chunk is scored (the first half is context).
/// `max_chunks` limits the chunks (0 = all). `on_chunk` sees the cumulative
/// perplexity after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    max_chunks: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, EvalError> {
    if ctx < 4 {
        return Err(EvalError::BadCtx(ctx));
    }
    model.check_ids(tokens)?;
    let vocab = model.config().vocab_size;
    let mut n_chunks = tokens.len() / ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut per_chunk = Vec::new();
    for c in 0..n_chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        let mut st = model.new_state();
        model.forward(&mut st, &chunk[..first]);
        // Logits at positions first..ctx-2 predict tokens first+1..ctx-1.
        let mut j = first;
        while j < ctx - 1 {
            let end = (j + SCORE_BATCH).min(ctx - 1);
            let lg = model.forward_all(&mut st, &chunk[j..end]);
            for (r, row) in lg.chunks_exact(vocab).enumerate() {
                let target = chunk[j + r + 1] as usize;
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                let v = lse - row[target] as f64;
                nll += v;
                nll2 += v * v;
                count += 1;
            }
            j = end;
        }
        let ppl = (nll / count as f64).exp();
        per_chunk.push(ppl);
        on_chunk(c, ppl);
    }
    let mean = nll / count.max(1) as f64;
    let ppl = mean.exp();
    let var = nll2 / count.max(1) as f64 - mean * mean;
    let ppl_err = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_err,
        nll: mean,
        tokens_scored: count,
        tokens_total: tokens.len(),
        ctx,
        per_chunk,
    })
}

/// [`perplexity`] over a text file, tokenized with the model's tokenizer.
pub fn perplexity_of_file(
    model: &Model,
    text: &Path,
    ctx: usize,
    max_chunks: usize,
    on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, EvalError> {
    let tokens = tokenize_file(model.weights().as_ref(), text)?;
    if tokens.len() < ctx {
        return Err(EvalError::TooShort {
            path: text.to_path_buf(),
            tokens: tokens.len(),
            ctx,
        });
    }
    perplexity(model, &tokens, ctx, max_chunks, on_chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        open_model(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/gs32/quant"),
        )
        .unwrap()
    }

    #[test]
    fn ids_parse_and_reject_garbage() {
        assert_eq!(parse_ids("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(matches!(parse_ids("1,x"), Err(EvalError::BadId(s)) if s == "x"));
    }

    #[test]
    fn perplexity_scores_the_second_half_of_each_chunk() {
        let m = model();
        let toks: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 512).collect();
        let p = perplexity(&m, &toks, 16, 0, |_, _| {}).unwrap();
        assert_eq!(p.per_chunk.len(), 2);
        assert_eq!(p.tokens_scored, 2 * 7);
        // Direct: full prefill of each chunk, positions 8..14 predict 9..15.
        let mut nll = 0f64;
        for c in 0..2 {
            let ch = &toks[c * 16..(c + 1) * 16];
            let lg = logits(&m, ch, false).unwrap();
            for j in 8..15 {
                let row = &lg[j * 512..(j + 1) * 512];
                let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                nll += lse - row[ch[j + 1] as usize] as f64;
            }
        }
        let want = (nll / 14.0).exp();
        assert!((p.ppl - want).abs() / want < 1e-4, "{} vs {want}", p.ppl);
        assert!(p.ppl_err > 0.0);
        assert!(matches!(
            perplexity(&m, &toks, 2, 0, |_, _| {}),
            Err(EvalError::BadCtx(2))
        ));
    }

    #[test]
    fn logits_file_round_trips() {
        let m = model();
        let ids = [3u32, 1, 4, 1, 5];
        let lg = logits(&m, &ids, true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("l.safetensors");
        write_logits(&f, &lg, 512).unwrap();
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        assert_eq!(t.shape(), &[5, 512]);
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let back: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, lg);
        assert!(matches!(
            logits(&m, &[1, 999], false),
            Err(EvalError::Model(ModelError::TokenOutOfRange {
                id: 999,
                ..
            }))
        ));
    }
}

//! How many bytes the model has, and how many a decoded token reads.
//!
//! Decode reads every dense weight once per token (attention, shared
//! expert, router, norms, `lm_head`), one row of `embed_tokens`, and only
//! `num_experts_per_tok / num_experts` of the routed experts; the MTP block
//! is not used. The figures come, best first, from the checkpoint's
//! `config.json` and safetensors headers (only the headers are read), from
//! the repacked cache's index (its tensor table and the `config.json` it
//! carries; the data files are not read), or from the published numbers of
//! the default model.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::cli::{Classify, Exit};

/// Qwen3-Next-80B-A3B AutoRound int4-mixed: tensor bytes of the indexed
/// shards (../shared/docs/research/qwen3-next-architecture.md, beside the repository).
pub const PRESET_TOTAL_BYTES: u64 = 43_243_415_040;
/// Its weight bytes read per decoded token (../shared/docs/research/peers.md §4.1, beside the repository).
pub const PRESET_PER_TOKEN_BYTES: u64 = 3_240_000_000;
/// Its routed-expert bytes (512 experts x 48 layers; 10 read per token
/// make 0.785 GB of the per-token figure).
pub const PRESET_EXPERT_BYTES: u64 = 40_166_000_000;
/// Its BF16 token embedding, 151,936 x 2,048 (not tied to the lm_head).
pub const PRESET_EMBED_BYTES: u64 = 151_936 * 2_048 * 2;

/// Errors reading the model's sizes.
#[derive(Debug, thiserror::Error)]
pub enum SizesError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A header or config is not what it should be.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Classify for SizesError {
    fn exit(&self) -> Exit {
        Exit::Failure
    }
}

/// Where the size figures came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// Counted from the checkpoint's safetensors headers and config.json.
    Checkpoint,
    /// Counted from the cache's index (or, when it cannot be read, its file
    /// sizes with the preset's per-token share; the note says which).
    Cache,
    /// The published figures of the default model.
    Preset,
}

/// The model's byte counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSizes {
    /// Where the figures came from.
    pub source: SizeSource,
    /// The directory read, if any.
    pub path: Option<PathBuf>,
    /// One line saying how the figures were obtained.
    pub note: String,
    /// Weight bytes the engine maps (everything but the MTP block).
    pub total_bytes: u64,
    /// Weight bytes read per decoded token.
    pub per_token_bytes: u64,
    /// Routed-expert bytes (the part that can stay on the CPU when the
    /// rest goes to a GPU).
    pub expert_bytes: u64,
    /// MTP (multi-token prediction) bytes, not used for decode.
    pub mtp_bytes: u64,
    /// Bytes of the token embedding when a token reads one row of it (0
    /// when the lm_head is tied to it): a memory budget does not keep
    /// them resident.
    #[serde(default)]
    pub row_read_bytes: u64,
    /// Tensors counted (0 when not counted).
    pub tensors: usize,
}

impl ModelSizes {
    /// The preset figures for the default model.
    pub fn preset() -> ModelSizes {
        ModelSizes {
            source: SizeSource::Preset,
            path: None,
            note: "preset figures of Qwen3-Next-80B-A3B AutoRound int4-mixed \
                   (no checkpoint or cache yet: run rh-fetch for exact numbers)"
                .into(),
            total_bytes: PRESET_TOTAL_BYTES,
            per_token_bytes: PRESET_PER_TOKEN_BYTES,
            expert_bytes: PRESET_EXPERT_BYTES,
            mtp_bytes: 0,
            row_read_bytes: PRESET_EMBED_BYTES,
            tensors: 0,
        }
    }

    /// Bytes other than routed experts (attention, shared experts,
    /// embeddings, lm_head): what "attention on GPU" places there.
    pub fn dense_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.expert_bytes)
    }

    /// Counts a checkpoint directory: `config.json` for the expert routing
    /// and the safetensors headers for the tensor sizes. Reads only the
    /// headers, never tensor data.
    pub fn from_checkpoint(dir: &Path) -> Result<ModelSizes, SizesError> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read(&cfg_path).map_err(|source| SizesError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let files = Checkpoint::list_files(dir).map_err(|e| SizesError::Format {
            path: dir.to_path_buf(),
            reason: crate::cli::one_line(&e),
        })?;
        let mut tensors = Vec::new();
        for f in &files {
            tensors.extend(header_tensors(f)?);
        }
        let counted = Counted::new(&cfg_text, &cfg_path, tensors)?;
        let note = format!(
            "counted from {} safetensors header(s) and config.json ({})",
            files.len(),
            counted.routing()
        );
        Ok(counted.sizes(SizeSource::Checkpoint, dir, note))
    }

    /// Counts a cache directory from its index: the tensor table (every
    /// tensor's name, shape and spans) and the `config.json` it carries.
    /// Reads only `index.rhc`, never the data files. A cache whose index
    /// cannot be read is estimated from its file sizes and the preset
    /// model's proportions instead (the note says why); loading it will
    /// report the error.
    pub fn from_cache(dir: &Path) -> Result<ModelSizes, SizesError> {
        let (_, index) = match crate::formats::cache::read::read_index(dir) {
            Ok(i) => i,
            Err(e) => return Self::scaled_from_files(dir, &crate::cli::one_line(&e)),
        };
        let cfg_path = dir.join(crate::formats::cache::INDEX_FILE);
        let tensors = index.tensors.iter().map(|t| {
            let bytes = t.spans().iter().map(|s| s.len).sum::<u64>();
            let rows = t.shape.first().copied().unwrap_or(1);
            (t.name.clone(), rows, bytes)
        });
        let counted = Counted::new(&index.config_json, &cfg_path, tensors.collect())?;
        let note = format!(
            "counted from the cache index ({} tensors; {})",
            index.tensors.len(),
            counted.routing()
        );
        Ok(counted.sizes(SizeSource::Cache, dir, note))
    }

    /// The cache's total file size, with the per-token and expert shares of
    /// the preset model: for a cache whose index cannot be read (`why`).
    fn scaled_from_files(dir: &Path, why: &str) -> Result<ModelSizes, SizesError> {
        let total = dir_bytes(dir)?;
        let scale = |x: u64| (total as f64 * x as f64 / PRESET_TOTAL_BYTES as f64) as u64;
        Ok(ModelSizes {
            source: SizeSource::Cache,
            path: Some(dir.to_path_buf()),
            note: format!(
                "cache file sizes, per-token share estimated from the preset model's proportions (index not read: {why})"
            ),
            total_bytes: total,
            per_token_bytes: scale(PRESET_PER_TOKEN_BYTES),
            expert_bytes: scale(PRESET_EXPERT_BYTES),
            mtp_bytes: 0,
            row_read_bytes: scale(PRESET_EMBED_BYTES),
            tensors: 0,
        })
    }
}

/// A model's tensors sorted into what decode reads, from `(name, first
/// dimension, bytes)` and its `config.json` (the same for a checkpoint's
/// safetensors headers and a cache's index).
struct Counted {
    dense: u64,
    expert: u64,
    mtp: u64,
    embed: u64,
    embed_rows: u64,
    has_lm_head: bool,
    tied: bool,
    experts: u64,
    per_tok: u64,
    tensors: usize,
}

impl Counted {
    fn new(
        cfg_text: &[u8],
        cfg_path: &Path,
        tensors: Vec<(String, u64, u64)>,
    ) -> Result<Counted, SizesError> {
        let cfg: serde_json::Value =
            serde_json::from_slice(cfg_text).map_err(|e| SizesError::Format {
                path: cfg_path.to_path_buf(),
                reason: format!("invalid config.json: {e}"),
            })?;
        let get = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
        let experts = get("num_experts").unwrap_or(0);
        let per_tok = get("num_experts_per_tok").unwrap_or(0);
        if experts > 0 && (per_tok == 0 || per_tok > experts) {
            return Err(SizesError::Format {
                path: cfg_path.to_path_buf(),
                reason: format!("num_experts_per_tok {per_tok} does not fit num_experts {experts}"),
            });
        }
        let mut c = Counted {
            dense: 0,
            expert: 0,
            mtp: 0,
            embed: 0,
            embed_rows: 1,
            has_lm_head: false,
            tied: cfg
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            experts,
            per_tok,
            tensors: tensors.len(),
        };
        for (name, rows, bytes) in tensors {
            if name.starts_with("mtp.") || name.contains(".mtp.") {
                c.mtp += bytes;
            } else if name.contains(".mlp.experts.") {
                c.expert += bytes;
            } else if name.contains("embed_tokens") {
                c.embed += bytes;
                c.embed_rows = rows.max(1);
            } else {
                c.has_lm_head |= name.contains("lm_head");
                c.dense += bytes;
            }
        }
        Ok(c)
    }

    /// `k of n experts per token`, for the notes.
    fn routing(&self) -> String {
        format!("{} of {} experts per token", self.per_tok, self.experts)
    }

    fn sizes(&self, source: SizeSource, dir: &Path, note: String) -> ModelSizes {
        let mut per_token = self.dense + self.embed / self.embed_rows;
        let mut row_read = self.embed;
        if self.tied && !self.has_lm_head {
            per_token += self.embed; // lm_head reads the whole shared matrix
            row_read = 0;
        }
        // Only num_experts_per_tok of num_experts routed experts are read.
        per_token += (self.expert * self.per_tok)
            .checked_div(self.experts)
            .unwrap_or(self.expert);
        ModelSizes {
            source,
            path: Some(dir.to_path_buf()),
            note,
            total_bytes: self.dense + self.expert + self.embed,
            per_token_bytes: per_token,
            expert_bytes: self.expert,
            mtp_bytes: self.mtp,
            row_read_bytes: row_read,
            tensors: self.tensors,
        }
    }
}

/// `(name, first dimension, bytes)` of every tensor in a safetensors file,
/// from its header alone, each checked against the file's length.
pub fn header_tensors(path: &Path) -> Result<Vec<(String, u64, u64)>, SizesError> {
    let io = |source| SizesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fmt = |reason: String| SizesError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|_| {
        fmt(format!(
            "truncated safetensors file ({file_len} bytes, no header)"
        ))
    })?;
    let n = u64::from_le_bytes(len8);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(fmt(format!(
            "safetensors header claims {n} bytes but the file has {file_len}; truncated or not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| fmt(format!("invalid safetensors header: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        if e < s || e as u64 > data_len {
            return Err(fmt(format!(
                "tensor `{name}` spans bytes {s}..{e} but the data section has {data_len}; the file is truncated"
            )));
        }
        let rows = info.shape.first().copied().unwrap_or(1) as u64;
        out.push((name, rows, (e - s) as u64));
    }
    Ok(out)
}

fn dir_bytes(dir: &Path) -> Result<u64, SizesError> {
    let mut total = 0;
    let rd = std::fs::read_dir(dir).map_err(|source| SizesError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let ft = match e.file_type() {
            Ok(t) => t,
            Err(_) => continue,
        };
        if ft.is_dir() {
            total += dir_bytes(&e.path())?;
        } else if ft.is_file() || ft.is_symlink() {
            // A file linked from elsewhere (a snapshot's blobs) counts as
            // its target; a link to a directory or nowhere does not.
            total += std::fs::metadata(e.path())
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len());
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, usize)]) {
        // (name, shape, bytes) as U8 tensors.
        let mut meta = serde_json::Map::new();
        let mut off = 0;
        for (name, shape, bytes) in tensors {
            meta.insert(
                name.to_string(),
                serde_json::json!({"dtype": "U8", "shape": shape, "data_offsets": [off, off + bytes]}),
            );
            off += bytes;
        }
        let h = serde_json::to_vec(&meta).unwrap();
        let mut buf = (h.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(&h);
        buf.resize(buf.len() + off, 0);
        std::fs::write(path, buf).unwrap();
    }

    #[test]
    fn checkpoint_counts_active_bytes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"num_experts": 4, "num_experts_per_tok": 1}"#,
        )
        .unwrap();
        write_st(
            &d.path().join("model.safetensors"),
            &[
                ("model.embed_tokens.weight", vec![10, 10], 100),
                ("model.layers.0.self_attn.q_proj.weight", vec![50], 50),
                (
                    "model.layers.0.mlp.experts.0.up_proj.qweight",
                    vec![100],
                    100,
                ),
                (
                    "model.layers.0.mlp.experts.1.up_proj.qweight",
                    vec![100],
                    100,
                ),
                (
                    "model.layers.0.mlp.experts.2.up_proj.qweight",
                    vec![100],
                    100,
                ),
                (
                    "model.layers.0.mlp.experts.3.up_proj.qweight",
                    vec![100],
                    100,
                ),
                ("lm_head.weight", vec![10, 10], 100),
                ("mtp.fc.weight", vec![7], 7),
            ],
        );
        let s = ModelSizes::from_checkpoint(d.path()).unwrap();
        assert_eq!(s.source, SizeSource::Checkpoint);
        assert_eq!(s.total_bytes, 100 + 50 + 400 + 100);
        assert_eq!(s.expert_bytes, 400);
        assert_eq!(s.mtp_bytes, 7);
        // one embedding row (10) + q_proj (50) + lm_head (100) + 1/4 of experts
        assert_eq!(s.per_token_bytes, 10 + 50 + 100 + 100);
        assert_eq!(s.tensors, 8);
        // Read a row a token, so a memory budget does not keep it.
        assert_eq!(s.row_read_bytes, 100);
        // Tied without an lm_head: every token reads the embedding whole.
        std::fs::write(
            d.path().join("config.json"),
            r#"{"num_experts": 4, "num_experts_per_tok": 1, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        write_st(
            &d.path().join("model.safetensors"),
            &[
                ("model.embed_tokens.weight", vec![10, 10], 100),
                ("model.layers.0.self_attn.q_proj.weight", vec![50], 50),
            ],
        );
        let tied = ModelSizes::from_checkpoint(d.path()).unwrap();
        assert_eq!(tied.row_read_bytes, 0);
        assert_eq!(tied.per_token_bytes, 10 + 50 + 100);
    }

    #[test]
    fn truncated_shard_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        let p = d.path().join("model.safetensors");
        write_st(&p, &[("a", vec![100], 100)]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = ModelSizes::from_checkpoint(d.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }

    /// A tiny synthetic checkpoint (2 layers, 8 experts, top-2) in
    /// `dir/checkpoint`, repacked into `dir/cache`.
    fn tiny_checkpoint_and_cache(dir: &Path) -> (PathBuf, PathBuf) {
        let (ck, cache) = (dir.join("checkpoint"), dir.join("cache"));
        std::fs::create_dir_all(&ck).unwrap();
        crate::synthetic::write_test_checkpoint("tiny", 2, 7, &ck);
        crate::cache::repack(&crate::cache::write::test_options(&ck, &cache, dir)).unwrap();
        (ck, cache)
    }

    #[test]
    fn cache_is_counted_from_its_index() {
        let d = tempfile::tempdir().unwrap();
        let (ck, cache) = tiny_checkpoint_and_cache(d.path());
        let c = ModelSizes::from_cache(&cache).unwrap();
        assert_eq!(c.source, SizeSource::Cache);
        assert!(c.note.contains("cache index"), "{}", c.note);
        assert!(c.tensors > 0 && c.expert_bytes > 0);
        // What the engine itself counts for a token, matrices only (the
        // index adds the norms and the recurrence's small vectors).
        let model = crate::model::Model::load(crate::open::open_weights(&cache).unwrap()).unwrap();
        let engine = model.weight_bytes_per_token();
        assert!(
            c.per_token_bytes >= engine && c.per_token_bytes < engine + engine / 20,
            "index {} against the engine's {engine}",
            c.per_token_bytes
        );
        // The checkpoint's counts agree: the same experts (repack drops
        // only unused quantization metadata) and the same embedding.
        let k = ModelSizes::from_checkpoint(&ck).unwrap();
        assert_eq!(c.row_read_bytes, k.row_read_bytes);
        assert!(c.expert_bytes <= k.expert_bytes && c.expert_bytes > k.expert_bytes / 10 * 9);
        // A token reads every other weight, one embedding row and top-k of
        // the experts.
        let cfg = model.config();
        let (k, n) = (cfg.num_experts_per_tok as u64, cfg.num_experts as u64);
        assert_eq!(
            c.per_token_bytes,
            c.dense_bytes() - c.row_read_bytes
                + c.row_read_bytes / cfg.vocab_size as u64
                + c.expert_bytes * k / n
        );
    }

    #[test]
    fn unreadable_cache_index_falls_back_to_file_sizes() {
        let d = tempfile::tempdir().unwrap();
        let (_, cache) = tiny_checkpoint_and_cache(d.path());
        let index = cache.join(crate::cache::INDEX_FILE);
        let mut bytes = std::fs::read(&index).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        std::fs::write(&index, bytes).unwrap();
        let c = ModelSizes::from_cache(&cache).unwrap();
        assert_eq!(c.tensors, 0);
        assert!(c.note.contains("index not read"), "{}", c.note);
        assert!(c.total_bytes > 0);
        // Data files linked from elsewhere count as their targets.
        let linked = d.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        for e in std::fs::read_dir(&cache).unwrap().flatten() {
            std::os::unix::fs::symlink(e.path(), linked.join(e.file_name())).unwrap();
        }
        let l = ModelSizes::from_cache(&linked).unwrap();
        assert_eq!(l.total_bytes, c.total_bytes);
    }

    #[test]
    fn preset_is_self_consistent() {
        let p = ModelSizes::preset();
        let dense_read = p.per_token_bytes - p.expert_bytes * 10 / 512;
        assert!(dense_read < p.dense_bytes(), "per-token dense within dense");
        assert!(p.per_token_bytes < p.total_bytes / 10);
    }
}

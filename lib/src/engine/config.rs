//! The model's `config.json` (HF `Qwen3NextConfig`), every dimension read
//! from the file; nothing sized for the 80B model is hard-coded.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::{Classify, Exit};

/// Errors reading or checking a model config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read model config: {source}")]
    Read {
        /// config.json.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// JSON syntax or a missing/mistyped key.
    #[error("{path}: invalid model config: {reason}")]
    Parse {
        /// config.json.
        path: PathBuf,
        /// serde's message.
        reason: String,
    },
    /// Not a model this engine runs.
    #[error("{path}: unsupported model_type `{found}` (roundhouse runs `qwen3_next`)")]
    ModelType {
        /// config.json.
        path: PathBuf,
        /// What it says.
        found: String,
    },
    /// Dimensions that contradict each other.
    #[error("{path}: inconsistent config: {reason}")]
    Inconsistent {
        /// config.json.
        path: PathBuf,
        /// Which keys disagree.
        reason: String,
    },
}

impl Classify for ConfigError {
    fn exit(&self) -> Exit {
        Exit::Failure
    }
}

/// Largest value any single dimension of `config.json` may have.
pub const MAX_DIM: usize = 1 << 24;

/// The kind of token mixer a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Gated DeltaNet (linear attention).
    LinearAttention,
    /// Gated softmax attention with a KV cache.
    FullAttention,
}

/// Per-module overrides in `quantization_config.extra_config`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleQuant {
    /// Bit width; 16 or more means unquantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// Group size (-1: whole row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
    /// Symmetric quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sym: Option<bool>,
    /// `int` or `fp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
}

/// `quantization_config` as AutoRound writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// `auto-round` (also accepted: `intel/auto-round`, `gptq`).
    pub quant_method: String,
    /// Default bit width.
    pub bits: u32,
    /// Default group size.
    pub group_size: i64,
    /// Symmetric.
    #[serde(default = "yes")]
    pub sym: bool,
    /// `int`.
    #[serde(default)]
    pub data_type: Option<String>,
    /// `auto_round:auto_gptq` (GPTQ v1 zeros) or `auto_round` (v2 zeros).
    #[serde(default)]
    pub packing_format: Option<String>,
    /// Per-module overrides: exact names or regular expressions.
    #[serde(default)]
    pub extra_config: BTreeMap<String, ModuleQuant>,
    /// Everything else AutoRound records (versions, iters, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// The precision of one linear module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Stored as a float tensor `<module>.weight`.
    Float,
    /// Stored as AutoRound `qweight/qzeros/scales`.
    Int {
        /// 2, 4 or 8.
        bits: u32,
        /// Group size along the input dimension (-1 = whole row).
        group_size: i64,
        /// Symmetric.
        sym: bool,
    },
}

impl QuantizationConfig {
    /// The precision of `module` (e.g. `model.layers.0.mlp.experts.3.up_proj`):
    /// an exact `extra_config` entry first, then regex entries, then the
    /// global default. Entries with bits >= 16 or `data_type` "fp" are float.
    pub fn precision(&self, module: &str) -> Precision {
        let entry = self.extra_config.get(module).or_else(|| {
            self.extra_config.iter().find_map(|(k, v)| {
                let looks_regex = k.contains(['*', '^', '$', '[', '(', '\\', '+', '?']);
                if !looks_regex {
                    return None;
                }
                let re = regex::Regex::new(&format!("^(?:{k})$")).ok()?;
                re.is_match(module).then_some(v)
            })
        });
        let bits = entry.and_then(|e| e.bits).unwrap_or(self.bits);
        let float_dtype = entry
            .and_then(|e| e.data_type.as_deref())
            .map(|d| d.starts_with("fp") || d.starts_with("float"))
            .unwrap_or(false);
        if bits >= 16 || float_dtype {
            return Precision::Float;
        }
        Precision::Int {
            bits,
            group_size: entry.and_then(|e| e.group_size).unwrap_or(self.group_size),
            sym: entry.and_then(|e| e.sym).unwrap_or(self.sym),
        }
    }

    /// Whether zeros are stored GPTQ-v1 style (stored = zero - 1).
    pub fn zeros_minus_one(&self) -> bool {
        match self.packing_format.as_deref() {
            Some("auto_round") => false,
            _ => true,
        }
    }
}

/// `config.json` of a `qwen3_next` model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Must be `qwen3_next`.
    pub model_type: String,
    /// e.g. `["Qwen3NextForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Full-attention query heads.
    pub num_attention_heads: usize,
    /// Full-attention key/value heads.
    pub num_key_value_heads: usize,
    /// Full-attention head size.
    pub head_dim: usize,
    /// Gated DeltaNet key heads.
    pub linear_num_key_heads: usize,
    /// Gated DeltaNet value heads.
    pub linear_num_value_heads: usize,
    /// Gated DeltaNet key head size.
    pub linear_key_head_dim: usize,
    /// Gated DeltaNet value head size.
    pub linear_value_head_dim: usize,
    /// Causal conv kernel width.
    pub linear_conv_kernel_dim: usize,
    /// Routed experts per layer.
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Routed expert hidden size.
    pub moe_intermediate_size: usize,
    /// Shared expert hidden size.
    pub shared_expert_intermediate_size: usize,
    /// Dense MLP size (unused when every layer is MoE).
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Vocabulary rows of embed_tokens and lm_head.
    pub vocab_size: usize,
    /// RoPE base (older configs; newer ones use `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5 style `{rope_theta, rope_type, partial_rotary_factor}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Fraction of head_dim rotated.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// lm_head shares embed_tokens.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Every n-th layer is MoE.
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    /// Layers with a dense MLP instead of MoE.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Every n-th layer is full attention (when `layer_types` is absent).
    #[serde(default = "four")]
    pub full_attention_interval: usize,
    /// Explicit per-layer mixer kinds.
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    /// Renormalise the top-k router weights.
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    /// Must be `silu`.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// AutoRound settings when the checkpoint is quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    /// Keys this engine does not use, kept for round-tripping.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    262144
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn silu() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = crate::fsutil::read_regular(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: match e {
                crate::fsutil::FsError::Io { source, .. } => source,
                crate::fsutil::FsError::NotRegular { kind, .. } => {
                    std::io::Error::other(format!("{kind}, expected a regular file"))
                }
                other => std::io::Error::other(other.to_string()),
            },
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config JSON; `path` is used in messages.
    pub fn from_json(text: &[u8], path: &Path) -> Result<ModelConfig, ConfigError> {
        // model_type first, so a config of another model gets that error
        // rather than a missing-key one.
        let v: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if mt != "qwen3_next" {
            return Err(ConfigError::ModelType {
                path: path.to_path_buf(),
                found: mt.to_string(),
            });
        }
        let cfg: ModelConfig = serde_json::from_value(v).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks that the dimensions agree with each other: sizes first (so no
    /// later arithmetic wraps), then how they relate, then the quantization.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Inconsistent {
            path: path.to_path_buf(),
            reason,
        };
        self.check_sizes(&bad)?;
        self.check_relations(&bad)?;
        self.check_quantization(&bad)
    }

    /// Every size positive where it must be and none above [`MAX_DIM`].
    fn check_sizes(&self, bad: &dyn Fn(String) -> ConfigError) -> Result<(), ConfigError> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("vocab_size", self.vocab_size),
            ("full_attention_interval", self.full_attention_interval),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(bad(format!("`{k}` must be positive")));
            }
        }
        // Bounds before any arithmetic: every size the engine allocates is
        // a product of a few of these, which must not wrap.
        let bounded = nonzero.iter().copied().chain([
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
            ),
            ("intermediate_size", self.intermediate_size.unwrap_or(0)),
            ("max_position_embeddings", self.max_position_embeddings),
        ]);
        for (k, v) in bounded {
            if v > MAX_DIM {
                return Err(bad(format!("`{k}` is {v}, more than {MAX_DIM}")));
            }
        }
        Ok(())
    }

    /// Head counts that divide, top-k within the experts, one layer type
    /// per layer, a usable rotary dimension, and the supported activation
    /// and MLP layout.
    fn check_relations(&self, bad: &dyn Fn(String) -> ConfigError) -> Result<(), ConfigError> {
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.linear_num_value_heads % self.linear_num_key_heads != 0 {
            return Err(bad(format!(
                "linear_num_value_heads ({}) is not a multiple of linear_num_key_heads ({})",
                self.linear_num_value_heads, self.linear_num_key_heads
            )));
        }
        if self.num_experts_per_tok > self.num_experts {
            return Err(bad(format!(
                "num_experts_per_tok ({}) exceeds num_experts ({})",
                self.num_experts_per_tok, self.num_experts
            )));
        }
        if let Some(lt) = &self.layer_types {
            if lt.len() != self.num_hidden_layers {
                return Err(bad(format!(
                    "layer_types has {} entries but num_hidden_layers is {}",
                    lt.len(),
                    self.num_hidden_layers
                )));
            }
        }
        let rot = self.rotary_dim();
        if rot == 0 || rot > self.head_dim || rot % 2 != 0 {
            return Err(bad(format!(
                "partial_rotary_factor gives rotary dim {rot}, which must be even and in 2..=head_dim ({})",
                self.head_dim
            )));
        }
        if self.hidden_act != "silu" {
            return Err(bad(format!(
                "hidden_act `{}` (only silu is supported)",
                self.hidden_act
            )));
        }
        if !self.mlp_only_layers.is_empty() || self.decoder_sparse_step != 1 {
            return Err(bad(
                "dense MLP layers (mlp_only_layers / decoder_sparse_step != 1) are not supported"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A quantization method, width and packing the repacker reads.
    fn check_quantization(&self, bad: &dyn Fn(String) -> ConfigError) -> Result<(), ConfigError> {
        if let Some(q) = &self.quantization_config {
            let ok_method = matches!(
                q.quant_method.as_str(),
                "auto-round" | "intel/auto-round" | "gptq"
            );
            if !ok_method {
                return Err(bad(format!(
                    "quantization_config.quant_method `{}` is not supported (auto-round or gptq)",
                    q.quant_method
                )));
            }
            if ![2, 4, 8].contains(&q.bits) && q.bits < 16 {
                return Err(bad(format!(
                    "quantization_config.bits {} is not supported (2, 4, 8)",
                    q.bits
                )));
            }
            if let Some(pf) = &q.packing_format {
                if !matches!(
                    pf.as_str(),
                    "auto_round:auto_gptq" | "auto_round" | "auto_gptq" | "gptq"
                ) {
                    return Err(bad(format!(
                        "quantization_config.packing_format `{pf}` is not supported (auto_round:auto_gptq)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks the dimensions against the shapes of the tensors a source
    /// actually holds (`shape_of` gives a tensor's shape by full name), so
    /// an absurd or wrong value is refused by the first stage that reads
    /// the checkpoint, naming the field, before anything is allocated from
    /// it. Tensors that are absent are left for the loader to report.
    pub fn check_shapes(
        &self,
        shape_of: &dyn Fn(&str) -> Option<Vec<u64>>,
        path: &Path,
    ) -> Result<(), ConfigError> {
        let c = ShapeCheck { shape_of, path };
        self.check_embedding_and_depth(&c)?;
        self.check_full_attention(&c)?;
        self.check_linear_attention(&c)?;
        self.check_moe(&c)
    }

    /// `vocab_size` and `hidden_size` against the embedding and a norm;
    /// `num_hidden_layers` against the layers present.
    fn check_embedding_and_depth(&self, c: &ShapeCheck<'_>) -> Result<(), ConfigError> {
        let embed = "model.embed_tokens.weight";
        if let Some(s) = (c.shape_of)(embed).filter(|s| s.len() == 2) {
            c.dim("vocab_size", self.vocab_size, embed.into(), s[0])?;
            c.dim("hidden_size", self.hidden_size, embed.into(), s[1])?;
        }
        let last = self.num_hidden_layers - 1;
        c.vector(
            "hidden_size",
            self.hidden_size,
            format!("model.layers.{last}.input_layernorm.weight"),
        )?;
        if (c.shape_of)(&format!("model.layers.{}.input_layernorm.weight", last + 1)).is_some() {
            return Err(ConfigError::Inconsistent {
                path: c.path.to_path_buf(),
                reason: format!(
                    "`num_hidden_layers` is {} but the weights have a layer {}",
                    self.num_hidden_layers,
                    last + 1
                ),
            });
        }
        Ok(())
    }

    /// Heads and head size against the first full-attention layer.
    fn check_full_attention(&self, c: &ShapeCheck<'_>) -> Result<(), ConfigError> {
        let full =
            (0..self.num_hidden_layers).find(|&i| self.layer_type(i) == LayerType::FullAttention);
        let Some(i) = full else {
            return Ok(());
        };
        let p = format!("model.layers.{i}.self_attn");
        c.vector("head_dim", self.head_dim, format!("{p}.q_norm.weight"))?;
        if let Some((t, r)) = c.rows(&format!("{p}.q_proj")) {
            c.dim(
                "num_attention_heads",
                self.num_attention_heads * self.head_dim * 2,
                t,
                r,
            )?;
        }
        if let Some((t, r)) = c.rows(&format!("{p}.k_proj")) {
            c.dim(
                "num_key_value_heads",
                self.num_key_value_heads * self.head_dim,
                t,
                r,
            )?;
        }
        Ok(())
    }

    /// The DeltaNet sizes against the first linear-attention layer.
    fn check_linear_attention(&self, c: &ShapeCheck<'_>) -> Result<(), ConfigError> {
        let linear =
            (0..self.num_hidden_layers).find(|&i| self.layer_type(i) == LayerType::LinearAttention);
        let Some(i) = linear else {
            return Ok(());
        };
        let p = format!("model.layers.{i}.linear_attn");
        c.vector(
            "linear_num_value_heads",
            self.linear_num_value_heads,
            format!("{p}.A_log"),
        )?;
        c.vector(
            "linear_value_head_dim",
            self.linear_value_head_dim,
            format!("{p}.norm.weight"),
        )?;
        let conv = format!("{p}.conv1d.weight");
        if let Some(s) = (c.shape_of)(&conv) {
            let want = [
                self.conv_dim() as u64,
                1,
                self.linear_conv_kernel_dim as u64,
            ];
            if s != want {
                return c.mismatch(
                    "linear_key_head_dim/linear_conv_kernel_dim",
                    want[0],
                    &conv,
                    &s,
                );
            }
        }
        Ok(())
    }

    /// Experts and their sizes against layer 0's MoE block.
    fn check_moe(&self, c: &ShapeCheck<'_>) -> Result<(), ConfigError> {
        let p = "model.layers.0.mlp";
        if let Some((t, r)) = c.rows(&format!("{p}.gate")) {
            c.dim("num_experts", self.num_experts, t, r)?;
        }
        if let Some((t, r)) = c.rows(&format!("{p}.experts.0.gate_proj")) {
            c.dim("moe_intermediate_size", self.moe_intermediate_size, t, r)?;
        }
        if let Some((t, r)) = c.rows(&format!("{p}.shared_expert.gate_proj")) {
            c.dim(
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                t,
                r,
            )?;
        }
        Ok(())
    }

    /// The mixer kind of layer `i`.
    pub fn layer_type(&self, i: usize) -> LayerType {
        match &self.layer_types {
            Some(lt) => lt[i],
            None if (i + 1) % self.full_attention_interval == 0 => LayerType::FullAttention,
            None => LayerType::LinearAttention,
        }
    }

    /// RoPE base.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10_000_000.0)
    }

    /// Fraction of head_dim that is rotated.
    pub fn partial_rotary(&self) -> f64 {
        self.partial_rotary_factor
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("partial_rotary_factor"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(0.25)
    }

    /// Rotated dimensions per head: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary()) as usize
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Width of the DeltaNet key projection (heads x dim).
    pub fn linear_key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }

    /// Width of the DeltaNet value projection (heads x dim).
    pub fn linear_value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// Channels through the causal conv: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.linear_key_dim() + self.linear_value_dim()
    }

    /// Bytes one sequence's state holds at `tokens` of context, as
    /// `State::bytes` counts them: every DeltaNet layer's conv and
    /// recurrent state (a fixed size) and every full-attention layer's
    /// keys and values (f32, a token at a time).
    pub fn state_bytes(&self, tokens: usize) -> u64 {
        let linear = (self.linear_conv_kernel_dim.saturating_sub(1) * self.conv_dim()
            + self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim)
            as u64;
        let kv_per_token = (2 * self.num_key_value_heads * self.head_dim) as u64;
        (0..self.num_hidden_layers)
            .map(|i| match self.layer_type(i) {
                LayerType::LinearAttention => linear,
                LayerType::FullAttention => kv_per_token.saturating_mul(tokens as u64),
            })
            .fold(0u64, |a, b| a.saturating_add(b))
            .saturating_mul(4)
    }

    /// Precision of a linear module (float when the checkpoint is unquantized).
    pub fn precision(&self, module: &str) -> Precision {
        match &self.quantization_config {
            Some(q) => q.precision(module),
            None => Precision::Float,
        }
    }
}

/// `ModelConfig::check_shapes`'s view of a source: tensor shapes by name,
/// and the file its errors name.
struct ShapeCheck<'a> {
    shape_of: &'a dyn Fn(&str) -> Option<Vec<u64>>,
    path: &'a Path,
}

impl ShapeCheck<'_> {
    /// Rows of a linear module: quantized entry (cache), `.weight`
    /// (dense), or AutoRound `.qweight` `[in*bits/32, out]`; with the
    /// tensor they were read from.
    fn rows(&self, m: &str) -> Option<(String, u64)> {
        if let Some(s) = (self.shape_of)(m).filter(|s| s.len() == 2) {
            return Some((m.to_string(), s[0]));
        }
        let w = format!("{m}.weight");
        if let Some(s) = (self.shape_of)(&w).filter(|s| !s.is_empty()) {
            return Some((w, s[0]));
        }
        let q = format!("{m}.qweight");
        (self.shape_of)(&q)
            .filter(|s| s.len() == 2)
            .map(|s| (q, s[1]))
    }

    /// The error naming the field, its value and the tensor's shape.
    fn mismatch(
        &self,
        field: &str,
        value: u64,
        tensor: &str,
        found: &dyn std::fmt::Debug,
    ) -> Result<(), ConfigError> {
        Err(ConfigError::Inconsistent {
            path: self.path.to_path_buf(),
            reason: format!("`{field}` gives {value} but tensor `{tensor}` has shape {found:?}"),
        })
    }

    /// One dimension `got` of `tensor` must equal the field's `want`.
    fn dim(&self, field: &str, want: usize, tensor: String, got: u64) -> Result<(), ConfigError> {
        if want as u64 != got {
            self.mismatch(field, want as u64, &tensor, &[got])
        } else {
            Ok(())
        }
    }

    /// A 1-D tensor, when present, must have the field's length.
    fn vector(&self, field: &str, want: usize, name: String) -> Result<(), ConfigError> {
        match (self.shape_of)(&name) {
            Some(s) if s != [want as u64] => self.mismatch(field, want as u64, &name, &s),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "qwen3_next", "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "vocab_size": 512, "rope_theta": 1e7,
            "partial_rotary_factor": 0.25, "full_attention_interval": 2,
            "quantization_config": {"quant_method": "auto-round", "bits": 4, "group_size": 32,
              "sym": true, "packing_format": "auto_round:auto_gptq",
              "extra_config": {"model.layers.0.mlp.gate": {"bits": 16, "data_type": "fp"},
                               ".*shared_expert\\..*": {"bits": 8}}}
        })
    }

    #[test]
    fn layer_types_and_precision() {
        let c = ModelConfig::from_json(base().to_string().as_bytes(), Path::new("c.json")).unwrap();
        assert_eq!(c.layer_type(0), LayerType::LinearAttention);
        assert_eq!(c.layer_type(1), LayerType::FullAttention);
        assert_eq!(c.rotary_dim(), 8);
        assert_eq!(c.precision("model.layers.0.mlp.gate"), Precision::Float);
        assert_eq!(
            c.precision("model.layers.1.mlp.shared_expert.up_proj"),
            Precision::Int {
                bits: 8,
                group_size: 32,
                sym: true
            }
        );
        assert_eq!(
            c.precision("model.layers.1.mlp.experts.3.up_proj"),
            Precision::Int {
                bits: 4,
                group_size: 32,
                sym: true
            }
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let mut v = base();
        v["model_type"] = "llama".into();
        let e = ModelConfig::from_json(v.to_string().as_bytes(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("llama"));
        let mut v = base();
        v["linear_num_value_heads"] = 3.into();
        let e = ModelConfig::from_json(v.to_string().as_bytes(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("linear_num_value_heads"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(v.to_string().as_bytes(), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }
}

//! Generated Qwen3-Next checkpoints in the exact layout of Intel's AutoRound
//! "int4-mixed" release: routed experts int4, other linears int8, router and
//! shared-expert gate 16-bit, everything else BF16, `auto_round:auto_gptq`
//! packing, sharded safetensors with an index, plus the real Qwen3 tokenizer
//! and chat template.
//!
//! * `synthetic:tiny`: a small model for the demo and tests (~80 MB, most of
//!   it the 151,936-row embedding and lm_head).
//! * `synthetic:qwen3-next-80b`: the real model's shapes (hidden 2048, 512
//!   experts, vocab 151,936); `layers` picks how many of its 48 layers.
//!
//! * `PRESET,zipf=S` (e.g. `synthetic:qwen3-next-80b,zipf=0.6`): skewed
//!   expert popularity, so an expert cache can be measured; see
//!   [`Spec::zipf`]. Without it routing is close to uniform, the worst case
//!   for caching.
//!
//! Weights are random but deterministic: each tensor has its own generator
//! seeded from `(seed, name)`, so files are byte-identical across runs and a
//! resumed run rewrites a shard exactly. Shards are written streaming, a
//! megabyte at a time, so memory stays small whatever the model size.

use serde_json::json;
use std::io::{self, Write};
use std::path::Path;

use crate::assets;

/// Errors from the generator.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// Unknown preset name.
    #[error("unknown synthetic model `{0}` (known: tiny, qwen3-next-80b, each optionally with `,zipf=S`, 0 < S <= 4)")]
    UnknownPreset(String),
    /// Bad expert count.
    #[error("synthetic:{preset}: --experts must be between {min} (experts per token) and {max}, got {got}")]
    Experts {
        /// Preset.
        preset: String,
        /// Smallest allowed (the preset's experts per token).
        min: usize,
        /// Largest allowed (the preset's expert count).
        max: usize,
        /// Given.
        got: usize,
    },
    /// Bad layer count.
    #[error("synthetic:{preset}: --layers must be between 1 and {max}, got {got}")]
    Layers {
        /// Preset.
        preset: String,
        /// Largest allowed.
        max: usize,
        /// Given.
        got: usize,
    },
}

impl crate::cli::Classify for SyntheticError {
    fn exit(&self) -> crate::cli::Exit {
        crate::cli::Exit::Usage
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Preset name.
    pub preset: String,
    /// config.json (without quantization_config, added by [`Spec::config_json`]).
    pub config: serde_json::Value,
    /// AutoRound group size.
    pub group_size: usize,
    /// Largest shard in bytes (a tensor bigger than this gets its own shard).
    pub shard_bytes: u64,
    /// Generator seed.
    pub seed: u64,
    /// Zipf exponent of expert popularity (`PRESET,zipf=S`), `None` for
    /// near-uniform routing. How: every token's embedding carries a constant
    /// in hidden dimension 0 (half of its energy, like the "massive
    /// activation" dimensions of trained models), and column 0 of each
    /// layer's router turns it into a per-expert logit bias
    /// `-c ln(rank)`, ranks drawn per layer from the seed. With the
    /// router's other logits about N(0, 0.7^2) and top-10 of 512,
    /// `c = 0.3 S` makes the selection frequency fall about as `rank^-S`
    /// (simulated; the measured law is quoted in docs/performance.md).
    /// 0.6 is the suggested value: a fifth of the experts then take about
    /// half of a layer's routings, the order of skew reported for
    /// fine-grained MoE models on one workload.
    pub zipf: Option<f32>,
}

/// How a tensor's bytes are produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Fill {
    /// BF16 uniform in `[-a, a]` around `center`.
    Bf16 {
        /// Centre.
        center: f32,
        /// Half-width.
        a: f32,
    },
    /// Like `Bf16`, but column 0 of row `r` holds `col0[r]` (one value for
    /// every row when it has one element): the skewed-routing feature.
    Bf16Col0 {
        /// Centre.
        center: f32,
        /// Half-width.
        a: f32,
        /// Column 0, per row (or one value for all rows).
        col0: Vec<f32>,
    },
    /// AutoRound qweight: uniformly random packed integers.
    QWeight,
    /// AutoRound qzeros of a symmetric layer (stored zero - 1 everywhere).
    QZeros {
        /// Bits.
        bits: u32,
    },
    /// f16 scales of magnitude about `mag`, random sign.
    Scales {
        /// Typical magnitude.
        mag: f32,
    },
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype name (`BF16`, `I32`, `F16`).
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// Content.
    pub fill: Fill,
}

impl Planned {
    /// A BF16 tensor uniform in `center ± a`.
    fn bf16(name: String, shape: Vec<usize>, center: f32, a: f32) -> Planned {
        Planned {
            name,
            dtype: "BF16",
            shape,
            fill: Fill::Bf16 { center, a },
        }
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        let el = if self.dtype == "I32" { 4 } else { 2 };
        self.shape.iter().product::<usize>() as u64 * el
    }
}

fn usize_of(v: &serde_json::Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("preset has {k}")) as usize
}

impl Spec {
    /// A preset with an optional layer count; `name` may end in
    /// `,zipf=S` (skewed routing, [`Spec::zipf`]).
    pub fn preset(name: &str, layers: Option<usize>, seed: u64) -> Result<Spec, SyntheticError> {
        let full_name = name;
        let (name, zipf) = match name.split_once(',') {
            Some((base, opt)) => {
                let s = opt
                    .strip_prefix("zipf=")
                    .and_then(|v| v.parse::<f32>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 4.0)
                    .ok_or_else(|| SyntheticError::UnknownPreset(full_name.to_string()))?;
                (base, Some(s))
            }
            None => (name, None),
        };
        let (config, group_size, shard_bytes, max_layers) = match name {
            "tiny" => (
                json!({
                    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
                    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 64,
                    "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "num_experts": 8,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                    "shared_expert_intermediate_size": 128, "intermediate_size": 512,
                    "vocab_size": 151936, "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
                    "max_position_embeddings": 262144, "full_attention_interval": 4,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true,
                    "hidden_act": "silu", "attention_bias": false, "rope_scaling": null,
                    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
                    "router_aux_loss_coef": 0.001, "output_router_logits": false,
                    "use_sliding_window": false, "use_cache": true
                }),
                128,
                32 << 20,
                64,
            ),
            "qwen3-next-80b" => (
                json!({
                    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
                    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
                    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
                    "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512,
                    "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                    "shared_expert_intermediate_size": 512, "intermediate_size": 5120,
                    "vocab_size": 151936, "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
                    "max_position_embeddings": 262144, "full_attention_interval": 4,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true,
                    "hidden_act": "silu", "attention_bias": false, "rope_scaling": null,
                    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
                    "router_aux_loss_coef": 0.001, "output_router_logits": false,
                    "use_sliding_window": false, "use_cache": true
                }),
                128,
                2 << 30,
                48,
            ),
            other => return Err(SyntheticError::UnknownPreset(other.to_string())),
        };
        let mut config = config;
        if let Some(n) = layers {
            if n == 0 || n > max_layers {
                return Err(SyntheticError::Layers {
                    preset: name.into(),
                    max: max_layers,
                    got: n,
                });
            }
            config["num_hidden_layers"] = n.into();
        }
        Ok(Spec {
            preset: full_name.to_string(),
            config,
            group_size,
            shard_bytes,
            seed,
            zipf,
        })
    }

    /// Keeps `experts` routed experts per layer instead of the preset's
    /// (the router shrinks with them; top-k and every expert's shape stay):
    /// `qwen3-next-80b` with all 48 layers and 64 experts reads what the
    /// real model reads per token while fitting in a desktop's RAM.
    pub fn with_experts(mut self, experts: usize) -> Result<Spec, SyntheticError> {
        let (min, max) = (self.dim("num_experts_per_tok"), self.dim("num_experts"));
        if experts < min || experts > max {
            return Err(SyntheticError::Experts {
                preset: self.preset,
                min,
                max,
                got: experts,
            });
        }
        self.config["num_experts"] = experts.into();
        Ok(self)
    }

    /// [`Spec::preset`], then [`Spec::with_experts`] when `experts` is given.
    pub fn preset_with(
        name: &str,
        layers: Option<usize>,
        experts: Option<usize>,
        seed: u64,
    ) -> Result<Spec, SyntheticError> {
        let spec = Spec::preset(name, layers, seed)?;
        match experts {
            Some(e) => spec.with_experts(e),
            None => Ok(spec),
        }
    }

    fn dim(&self, k: &str) -> usize {
        usize_of(&self.config, k)
    }

    fn is_full_attention(&self, layer: usize) -> bool {
        (layer + 1) % self.dim("full_attention_interval") == 0
    }

    /// Linear modules with their `[out, in]` and bits (4, 8, or 16 = BF16).
    pub fn linears(&self) -> Vec<(String, usize, usize, u32)> {
        let h = self.dim("hidden_size");
        let (nk, nv) = (
            self.dim("linear_num_key_heads"),
            self.dim("linear_num_value_heads"),
        );
        let (dk, dv) = (
            self.dim("linear_key_head_dim"),
            self.dim("linear_value_head_dim"),
        );
        let (nh, nkv, hd) = (
            self.dim("num_attention_heads"),
            self.dim("num_key_value_heads"),
            self.dim("head_dim"),
        );
        let (e, mi, si) = (
            self.dim("num_experts"),
            self.dim("moe_intermediate_size"),
            self.dim("shared_expert_intermediate_size"),
        );
        let mut v = Vec::new();
        for l in 0..self.dim("num_hidden_layers") {
            let p = format!("model.layers.{l}");
            if self.is_full_attention(l) {
                v.push((format!("{p}.self_attn.q_proj"), nh * hd * 2, h, 8));
                v.push((format!("{p}.self_attn.k_proj"), nkv * hd, h, 8));
                v.push((format!("{p}.self_attn.v_proj"), nkv * hd, h, 8));
                v.push((format!("{p}.self_attn.o_proj"), h, nh * hd, 8));
            } else {
                v.push((
                    format!("{p}.linear_attn.in_proj_qkvz"),
                    2 * nk * dk + 2 * nv * dv,
                    h,
                    8,
                ));
                v.push((format!("{p}.linear_attn.in_proj_ba"), 2 * nv, h, 8));
                v.push((format!("{p}.linear_attn.out_proj"), h, nv * dv, 8));
            }
            v.push((format!("{p}.mlp.gate"), e, h, 16));
            for x in 0..e {
                v.push((format!("{p}.mlp.experts.{x}.gate_proj"), mi, h, 4));
                v.push((format!("{p}.mlp.experts.{x}.up_proj"), mi, h, 4));
                v.push((format!("{p}.mlp.experts.{x}.down_proj"), h, mi, 4));
            }
            v.push((format!("{p}.mlp.shared_expert.gate_proj"), si, h, 8));
            v.push((format!("{p}.mlp.shared_expert.up_proj"), si, h, 8));
            v.push((format!("{p}.mlp.shared_expert.down_proj"), h, si, 8));
            v.push((format!("{p}.mlp.shared_expert_gate"), 1, h, 16));
        }
        v
    }

    /// config.json including `quantization_config` as AutoRound writes it.
    pub fn config_json(&self) -> serde_json::Value {
        let mut extra = serde_json::Map::new();
        for (name, _, _, bits) in self.linears() {
            match bits {
                8 => {
                    extra.insert(name, json!({"bits": 8, "data_type": "int", "group_size": self.group_size, "sym": true}));
                }
                16 => {
                    extra.insert(name, json!({"bits": 16, "data_type": "fp"}));
                }
                _ => {}
            }
        }
        let mut c = self.config.clone();
        c["quantization_config"] = json!({
            "quant_method": "auto-round", "bits": 4, "group_size": self.group_size, "sym": true,
            "data_type": "int", "packing_format": "auto_round:auto_gptq",
            "autoround_version": "0.7.0", "iters": 0, "low_gpu_mem_usage": true,
            "extra_config": extra,
        });
        c["transformers_version"] = "4.57.0.dev0".into();
        c
    }

    /// Every tensor, in file order.
    pub fn plan(&self) -> Vec<Planned> {
        let h = self.dim("hidden_size");
        let vocab = self.dim("vocab_size");
        let mut out = vec![self.embedding()];
        let linears = self.linears();
        for l in 0..self.dim("num_hidden_layers") {
            out.extend(self.layer_vectors(l));
            let prefix = format!("model.layers.{l}.");
            for (name, o, i, bits) in linears.iter().filter(|x| x.0.starts_with(&prefix)) {
                out.extend(self.linear(l, name, *o, *i, *bits));
            }
        }
        out.push(Planned::bf16("model.norm.weight".into(), vec![h], 0.0, 0.1));
        out.push(Planned::bf16(
            "lm_head.weight".into(),
            vec![vocab, h],
            0.0,
            (3.0 / h as f32).sqrt(),
        ));
        out
    }

    /// The token embedding; under `zipf`, half of every embedding's energy
    /// in dimension 0 (the others are uniform in [-1, 1], variance 1/3).
    fn embedding(&self) -> Planned {
        let h = self.dim("hidden_size");
        let vocab = self.dim("vocab_size");
        let name = "model.embed_tokens.weight".to_string();
        match self.zipf {
            Some(_) => Planned {
                name,
                dtype: "BF16",
                shape: vec![vocab, h],
                fill: Fill::Bf16Col0 {
                    center: 0.0,
                    a: 1.0,
                    col0: vec![((h - 1) as f32 / 3.0).sqrt()],
                },
            },
            None => Planned::bf16(name, vec![vocab, h], 0.0, 1.0),
        }
    }

    /// Layer `l`'s norms and its mixer's small BF16 tensors (q/k norms of
    /// full attention; conv, dt_bias, A_log and norm of DeltaNet).
    fn layer_vectors(&self, l: usize) -> Vec<Planned> {
        let h = self.dim("hidden_size");
        let p = format!("model.layers.{l}");
        let bf16 = Planned::bf16;
        let mut out = vec![
            bf16(format!("{p}.input_layernorm.weight"), vec![h], 0.0, 0.1),
            bf16(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.0,
                0.1,
            ),
        ];
        if self.is_full_attention(l) {
            let hd = self.dim("head_dim");
            out.push(bf16(
                format!("{p}.self_attn.q_norm.weight"),
                vec![hd],
                0.0,
                0.1,
            ));
            out.push(bf16(
                format!("{p}.self_attn.k_norm.weight"),
                vec![hd],
                0.0,
                0.1,
            ));
            return out;
        }
        let (nv, dv) = (
            self.dim("linear_num_value_heads"),
            self.dim("linear_value_head_dim"),
        );
        let conv_dim =
            2 * self.dim("linear_num_key_heads") * self.dim("linear_key_head_dim") + nv * dv;
        let k = self.dim("linear_conv_kernel_dim");
        out.push(bf16(
            format!("{p}.linear_attn.conv1d.weight"),
            vec![conv_dim, 1, k],
            0.0,
            0.5,
        ));
        out.push(bf16(format!("{p}.linear_attn.dt_bias"), vec![nv], 0.0, 1.0));
        // A_log = log(A) with A in about [1, 16].
        out.push(bf16(format!("{p}.linear_attn.A_log"), vec![nv], 1.4, 1.4));
        out.push(bf16(
            format!("{p}.linear_attn.norm.weight"),
            vec![dv],
            1.0,
            0.1,
        ));
        out
    }

    /// One linear module of layer `l` (`o` x `i`): the router under `zipf`
    /// with its bias column, 16-bit ones as BF16, else AutoRound's
    /// qweight, qzeros and scales at `bits`.
    fn linear(&self, l: usize, name: &str, o: usize, i: usize, bits: u32) -> Vec<Planned> {
        if let (Some(zipf), true) = (self.zipf, name.ends_with(".mlp.gate")) {
            return vec![Planned {
                name: format!("{name}.weight"),
                dtype: "BF16",
                shape: vec![o, i],
                fill: Fill::Bf16Col0 {
                    center: 0.0,
                    a: (3.0 / i as f32).sqrt(),
                    col0: self.router_bias_column(l, o, zipf),
                },
            }];
        }
        if bits == 16 {
            return vec![Planned::bf16(
                format!("{name}.weight"),
                vec![o, i],
                0.0,
                (3.0 / i as f32).sqrt(),
            )];
        }
        let g = i.div_ceil(self.group_size);
        let pf = 32 / bits as usize;
        // Uniform integers in [-2^(b-1), 2^(b-1)) have std ~2^(b-1)/sqrt(3);
        // pick the scale so weights have std ~1/sqrt(in).
        let mag = 3f32.sqrt() / ((1u32 << (bits - 1)) as f32 * (i as f32).sqrt());
        vec![
            Planned {
                name: format!("{name}.qweight"),
                dtype: "I32",
                shape: vec![i / pf, o],
                fill: Fill::QWeight,
            },
            Planned {
                name: format!("{name}.qzeros"),
                dtype: "I32",
                shape: vec![g, (o * bits as usize).div_ceil(32)],
                fill: Fill::QZeros { bits },
            },
            Planned {
                name: format!("{name}.scales"),
                dtype: "F16",
                shape: vec![g, o],
                fill: Fill::Scales { mag },
            },
        ]
    }

    /// Column 0 of layer `layer`'s router under skewed routing: the logit
    /// bias `-0.3 zipf ln(rank)` of each expert divided by dimension 0 of a
    /// normalised hidden state (about `sqrt(hidden / 2)`), ranks a
    /// seeded permutation per layer.
    fn router_bias_column(&self, layer: usize, experts: usize, zipf: f32) -> Vec<f32> {
        let h = self.dim("hidden_size") as f32;
        let mut rank: Vec<usize> = (0..experts).collect();
        let mut rng = SplitMix::for_tensor(self.seed, &format!("zipf-ranks:{layer}"));
        for i in (1..experts).rev() {
            rank.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let x0 = (h / 2.0).sqrt();
        rank.iter()
            .map(|&r| -0.3 * zipf * ((r + 1) as f32).ln() / x0)
            .collect()
    }

    /// Splits the plan into shards of at most `shard_bytes` (Intel's naming).
    pub fn shards(&self) -> Vec<(String, Vec<Planned>)> {
        let mut groups: Vec<Vec<Planned>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in self.plan() {
            if size > 0 && size + t.bytes() > self.shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            size += t.bytes();
            groups.last_mut().expect("non-empty").push(t);
        }
        let n = groups.len();
        groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| (format!("model-{:05}-of-{:05}.safetensors", i + 1, n), g))
            .collect()
    }

    /// Small files written before the shards: config, generation config,
    /// quantization config, tokenizer, chat template, index.
    pub fn metadata_files(&self) -> Vec<(String, Vec<u8>)> {
        let config = self.config_json();
        let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (file, tensors) in self.shards() {
            for t in tensors {
                total += t.bytes();
                weight_map.insert(t.name, file.clone().into());
            }
        }
        vec![
            ("config.json".into(), pretty(&config)),
            (
                "quantization_config.json".into(),
                pretty(&config["quantization_config"]),
            ),
            (
                "generation_config.json".into(),
                pretty(
                    &json!({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "do_sample": true, "temperature": 0.6, "top_k": 20,
                    "top_p": 0.95, "transformers_version": "4.57.0.dev0"}),
                ),
            ),
            ("tokenizer.json".into(), assets::qwen3_tokenizer_json()),
            (
                "tokenizer_config.json".into(),
                pretty(&assets::qwen3_tokenizer_config(
                    assets::QWEN3_THINKING_CHAT_TEMPLATE,
                )),
            ),
            (
                "chat_template.jinja".into(),
                assets::QWEN3_THINKING_CHAT_TEMPLATE.as_bytes().to_vec(),
            ),
            (
                "model.safetensors.index.json".into(),
                pretty(&json!({"metadata": {"total_size": total}, "weight_map": weight_map})),
            ),
        ]
    }
}

/// A small, fast, seedable generator (SplitMix64); quality is ample for
/// random weights and it is stable across platforms and versions.
struct SplitMix(u64);

impl SplitMix {
    fn for_tensor(seed: u64, name: &str) -> SplitMix {
        let h = blake3::hash(format!("{seed}:{name}").as_bytes());
        SplitMix(u64::from_le_bytes(
            h.as_bytes()[..8].try_into().expect("8 bytes"),
        ))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The safetensors header for `tensors` (padded to 8 bytes as the reference
/// writer does), with `__metadata__` `{"format": "pt"}`.
pub fn safetensors_header(tensors: &[Planned]) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for t in tensors {
        m.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.bytes()]}),
        );
        off += t.bytes();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(m)).expect("json");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}

/// Streams one tensor's bytes into `w`, a chunk at a time.
pub fn write_tensor(w: &mut impl Write, t: &Planned, seed: u64) -> io::Result<()> {
    let mut rng = SplitMix::for_tensor(seed, &t.name);
    let total = t.bytes() as usize;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut done = 0;
    while done < total {
        let n = (total - done).min(1 << 20);
        buf.clear();
        match &t.fill {
            Fill::Bf16 { center, a } => {
                for _ in 0..n / 2 {
                    let v = center + a * rng.unit();
                    buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
            Fill::Bf16Col0 { center, a, col0 } => {
                let cols = t.shape.last().copied().unwrap_or(1).max(1);
                for k in 0..n / 2 {
                    let el = done / 2 + k;
                    // The generator advances for every element, so the
                    // other columns match the unskewed tensor's.
                    let mut v = center + a * rng.unit();
                    if el % cols == 0 {
                        let row = el / cols;
                        v = col0[if col0.len() == 1 {
                            0
                        } else {
                            row.min(col0.len() - 1)
                        }];
                    }
                    buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
            Fill::QWeight => {
                for _ in 0..n / 8 {
                    buf.extend_from_slice(&rng.next().to_le_bytes());
                }
                for _ in 0..(n % 8) / 4 {
                    buf.extend_from_slice(&(rng.next() as u32).to_le_bytes());
                }
            }
            Fill::QZeros { bits } => {
                let zero_minus_one = (1u32 << (bits - 1)) - 1;
                let mut word = 0u32;
                for j in 0..32 / bits {
                    word |= zero_minus_one << (bits * j);
                }
                for _ in 0..n / 4 {
                    buf.extend_from_slice(&word.to_le_bytes());
                }
            }
            Fill::Scales { mag } => {
                for _ in 0..n / 2 {
                    let u = rng.unit();
                    // magnitude in [0.5, 1.5) x mag, sign random (AutoRound keeps signs)
                    let v = mag
                        * (1.0 + 0.5 * u.abs() * 2.0 - 0.5)
                        * if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
                    buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
        }
        w.write_all(&buf)?;
        done += n;
    }
    Ok(())
}

/// Tests: writes `preset`'s checkpoint with `layers` layers (weights and
/// config from `seed`) into the directory `dir`.
#[cfg(test)]
pub(crate) fn write_test_checkpoint(preset: &str, layers: usize, seed: u64, dir: &Path) {
    let spec = Spec::preset(preset, Some(layers), seed).unwrap();
    for (name, bytes) in spec.metadata_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (file, tensors) in spec.shards() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(file)).unwrap());
        write_shard(&mut f, &tensors, seed).unwrap();
    }
}

/// Writes one shard (header + tensors) into `w`.
pub fn write_shard(w: &mut impl Write, tensors: &[Planned], seed: u64) -> io::Result<()> {
    w.write_all(&safetensors_header(tensors))?;
    for t in tensors {
        write_tensor(w, t, seed)?;
    }
    Ok(())
}

/// Total bytes the checkpoint will take (for disk-space checks).
pub fn total_bytes(spec: &Spec) -> u64 {
    spec.shards()
        .iter()
        .map(|(_, ts)| {
            safetensors_header(ts).len() as u64 + ts.iter().map(Planned::bytes).sum::<u64>()
        })
        .sum()
}

/// True when `path` looks like a directory we generated before.
pub fn is_generated(path: &Path) -> bool {
    path.join("config.json").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::config::Precision;
    use crate::weights::WeightSource;

    #[test]
    fn tiny_checkpoint_opens_and_matches_autoround_layout() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::preset("tiny", Some(2), 0).unwrap();
        for (name, bytes) in spec.metadata_files() {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        for (file, tensors) in spec.shards() {
            let mut f =
                std::io::BufWriter::new(std::fs::File::create(dir.path().join(file)).unwrap());
            write_shard(&mut f, &tensors, 0).unwrap();
        }
        let ck = Checkpoint::open(dir.path()).unwrap();
        let c = ck.config().clone();
        assert_eq!(c.num_hidden_layers, 2);
        assert_eq!(
            c.precision("model.layers.0.mlp.experts.0.up_proj"),
            Precision::Int {
                bits: 4,
                group_size: 128,
                sym: true
            }
        );
        assert_eq!(c.precision("model.layers.0.mlp.gate"), Precision::Float);
        let m = ck
            .matrix("model.layers.0.linear_attn.in_proj_qkvz", 768, 128)
            .unwrap();
        assert!(matches!(m, crate::tensor::Matrix::Quant(ref q) if q.bits == 8));
        let m = ck
            .matrix("model.layers.1.mlp.experts.3.down_proj", 128, 128)
            .unwrap();
        assert!(matches!(m, crate::tensor::Matrix::Quant(ref q) if q.bits == 4));
        // Determinism: the same spec gives the same bytes.
        let (_, ts) = &spec.shards()[1];
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_shard(&mut a, &ts[..3], 0).unwrap();
        write_shard(&mut b, &ts[..3], 0).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn fewer_experts_keep_every_shape_and_top_k() {
        let full = Spec::preset("qwen3-next-80b", Some(48), 0).unwrap();
        let spec = Spec::preset_with("qwen3-next-80b", Some(48), Some(64), 0).unwrap();
        let c = spec.config_json();
        assert_eq!(c["num_experts"], 64);
        assert_eq!(c["num_experts_per_tok"], 10);
        assert_eq!(c["num_hidden_layers"], 48);
        let shapes = |s: &Spec| -> std::collections::BTreeMap<String, (usize, usize, u32)> {
            s.linears()
                .into_iter()
                .map(|(n, r, k, b)| (n, (r, k, b)))
                .collect()
        };
        let (a, b) = (shapes(&full), shapes(&spec));
        // Every kept module has the real model's shape; the router has one
        // row per kept expert; experts 64.. are gone.
        for (name, shape) in &b {
            if name.ends_with(".mlp.gate") {
                assert_eq!(shape.0, 64, "{name}");
            } else {
                assert_eq!(a.get(name), Some(shape), "{name}");
            }
        }
        assert!(b.contains_key("model.layers.47.mlp.experts.63.down_proj"));
        assert!(!b.contains_key("model.layers.0.mlp.experts.64.up_proj"));
        for bad in [9, 513] {
            let e = Spec::preset_with("qwen3-next-80b", None, Some(bad), 0).unwrap_err();
            assert!(
                e.to_string().contains("--experts must be between 10"),
                "{e}"
            );
        }
    }
}

//! Where the engine gets its weights: a [`WeightSource`] hands out matrices
//! in the kernel layout and small tensors as f32, checking names, shapes and
//! dtypes. The safetensors checkpoint ([`crate::checkpoint`]) and the
//! repacked cache both implement it, so model code does not care which.
//! This module is the interface only and imports neither; opening a
//! directory as one or the other is [`crate::open::open_weights`].

use crate::cli::{Classify, Exit};
use crate::config::ModelConfig;
use crate::tensor::Matrix;

/// Locking mapped weights in RAM was refused (e.g. by RLIMIT_MEMLOCK).
/// The model still runs, unlocked, so callers warn rather than fail.
#[derive(Debug, thiserror::Error)]
#[error("{dir}: {what} refused: {source}")]
pub struct LockRefused {
    /// The model directory, as displayed.
    pub dir: String,
    /// What was locked: `mlock`, or `mlock of the resident weights`.
    pub what: &'static str,
    /// The kernel's answer.
    pub source: std::io::Error,
}

/// Errors fetching a weight; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// Not in the checkpoint.
    #[error("{source_path}: tensor `{tensor}` is missing")]
    Missing {
        /// Tensor name.
        tensor: String,
        /// Checkpoint or cache path.
        source_path: String,
    },
    /// Present with the wrong shape.
    #[error("{source_path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        tensor: String,
        /// Checkpoint or cache path.
        source_path: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What is stored.
        found: Vec<usize>,
    },
    /// An element type the engine cannot use there.
    #[error("{source_path}: tensor `{tensor}` has dtype {dtype}, expected {expected}")]
    Dtype {
        /// Tensor name.
        tensor: String,
        /// Checkpoint or cache path.
        source_path: String,
        /// What is stored.
        dtype: String,
        /// What is accepted.
        expected: String,
    },
    /// Quantized tensors that cannot be used.
    #[error("{source_path}: {reason}")]
    Quant {
        /// Checkpoint or cache path.
        source_path: String,
        /// The conversion's message (names the tensor).
        reason: String,
    },
    /// The checkpoint itself is unreadable. (A cache that does not open is
    /// [`crate::open::OpenError::Cache`], with the cache's own error.)
    #[error("{0}")]
    Format(String),
}

impl Classify for WeightError {
    fn exit(&self) -> Exit {
        Exit::Failure
    }
}

/// Supplies a model's weights.
pub trait WeightSource: Send + Sync {
    /// The model's config.
    fn config(&self) -> &ModelConfig;

    /// Where the weights come from (for messages).
    fn path(&self) -> String;

    /// The weight of linear module `module` (e.g.
    /// `model.layers.0.linear_attn.in_proj_qkvz`, `lm_head`,
    /// `model.embed_tokens`) as a `[rows, cols]` matrix: quantized when the
    /// source stores it quantized, dense otherwise.
    fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError>;

    /// A small tensor by full name (norm weights, conv1d, A_log, dt_bias) as
    /// f32, checked against `shape`.
    fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError>;

    /// Whether a tensor or module exists (e.g. optional MTP weights).
    fn contains(&self, name: &str) -> bool;

    /// A non-weight file that travels with the model, by its name in a hub
    /// repository (`tokenizer.json`, `tokenizer_config.json`,
    /// `generation_config.json`, `chat_template.jinja`): read from the
    /// checkpoint directory, or from the cache index. `None` when absent.
    fn aux_file(&self, name: &str) -> Option<Vec<u8>>;

    /// Applies inspect's memory decision to mapped weights: `populate`
    /// asks the kernel to read them ahead (madvise WILLNEED), `lock` pins
    /// them in RAM (mlock). Sources that own their bytes do nothing.
    /// Returns why when locking was refused (e.g. RLIMIT_MEMLOCK).
    fn residency(&self, populate: bool, lock: bool) -> Result<(), LockRefused> {
        let _ = (populate, lock);
        Ok(())
    }

    /// Asks for the source's mapped files on 2 MiB pages (`huge`), or on
    /// 4 KiB pages only; sources without mappings, or whose routed experts
    /// are read into buffers of their own (the expert cache), do nothing.
    fn map_pages(&self, huge: bool) {
        let _ = huge;
    }

    /// How much of the source's mapped files is resident and how much of
    /// that on 2 MiB pages; `None` for sources that map nothing.
    fn mapped_pages(&self) -> Option<crate::mmap::MappedPages> {
        None
    }

    /// The source as `Any`, for the engine to recognise a source it made
    /// itself (the expert cache's `model::experts::PagedCache`) without
    /// this interface naming engine types. `None` for every other source.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// The non-weight files a model directory may carry, in the order a
/// consumer should look for them.
pub const AUX_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

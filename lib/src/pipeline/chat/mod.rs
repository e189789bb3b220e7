//! Chat on top of the engine: the model's tokenizer with streaming
//! detokenization ([`tokenizer`]), its chat template rendered as
//! transformers does ([`template`]), sampling defaults from
//! `generation_config.json` ([`genconfig`]), and a multi-turn
//! [`session::Conversation`] that keeps the model state between turns so a
//! second turn never re-reads the history.

pub mod genconfig;
pub mod session;
pub mod template;
pub mod tokenizer;

use crate::cli::{Classify, Exit};

pub use genconfig::GenerationConfig;
pub use session::{ChatModel, Conversation, Event, GenOptions, StopReason, TurnResult, TurnStats};
pub use template::{ChatTemplate, Message, RenderExtras};
pub use tokenizer::{ChatTokenizer, Detokenizer};

/// Errors of the chat layer; each names the model directory or file.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model directory has no `tokenizer.json`.
    #[error("{dir}: no tokenizer.json in the model directory (copy the model's tokenizer.json there, or re-run rh-fetch)")]
    MissingTokenizer {
        /// Model directory or cache.
        dir: String,
    },
    /// `tokenizer.json` does not parse.
    #[error("{dir}/tokenizer.json: cannot load tokenizer: {reason}")]
    BadTokenizer {
        /// Model directory or cache.
        dir: String,
        /// The tokenizers crate's message.
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// A JSON side file (tokenizer_config.json, generation_config.json) is malformed.
    #[error("{dir}/{file}: {reason}")]
    BadFile {
        /// Model directory or cache.
        dir: String,
        /// File name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The chat template does not compile.
    #[error("{origin}: chat template does not compile: {reason}")]
    TemplateSyntax {
        /// Where the template came from.
        origin: String,
        /// minijinja's message.
        reason: String,
    },
    /// The chat template failed while rendering.
    #[error("{origin}: chat template failed to render: {reason}")]
    TemplateRender {
        /// Where the template came from.
        origin: String,
        /// minijinja's message.
        reason: String,
    },
    /// The prompt does not fit in the context.
    #[error("prompt is {prompt} tokens but only {free} of the {ctx_size}-token context are free (use a shorter prompt, /reset, or a larger --ctx-size)")]
    PromptTooLong {
        /// Tokens this turn would feed.
        prompt: usize,
        /// Context tokens still free.
        free: usize,
        /// The context size.
        ctx_size: usize,
    },
    /// The model failed to load.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

impl Classify for ChatError {
    fn exit(&self) -> Exit {
        Exit::Failure
    }
}

//! The logic behind `rh-serve --listen`, free of any HTTP stack: the
//! engine thread that owns the model and runs requests from a FIFO queue
//! ([`engine`]), prompt reuse across requests for a hybrid model
//! ([`prefix_cache`]), and what generated text becomes in an OpenAI answer:
//! stop strings, the reasoning split and tool calls ([`output`]). The
//! binary maps HTTP onto these.

pub mod engine;
pub mod output;
pub mod prefix_cache;
mod sequence;

pub use engine::{
    Engine, EngineConfig, EngineMetrics, Event, Failure, Finish, GenRequest, Job, LoadFailed,
    ModelInfo, Prompt, Rejected, Sink, Summary,
};
pub use output::{ChatOutput, Delta, ToolCall, ToolCallParser};
pub use prefix_cache::PrefixCache;

//! Roundhouse: Qwen3-Next AutoRound checkpoints from the hub to a chat
//! prompt on a CPU.
//!
//! The library holds everything; the `rh-*` binaries parse flags and call
//! into it. ARCHITECTURE.md at the repository root is the reading path.
//! The modules sit in four directories, bottom up; each keeps its
//! top-level path (`roundhouse::kernels`, `crate::cache`) through the
//! re-exports below:
//!
//! * [`support`] (lib/src/support/): [`cli`] (exit codes, logs, progress),
//!   [`fsutil`] (crash-safe writes), [`mmap`] (the one unsafe mapping),
//!   [`direct_io`] (aligned positioned reads that bypass the page cache),
//!   [`env`](mod@env) (every environment variable read);
//! * [`engine`] (lib/src/engine/): [`tensor`] (the weight layouts kernels
//!   read, and their element readers), [`kernels`] (matvec/matmul per
//!   instruction set, with a scalar reference; [`kernels::Isa`] is the one
//!   instruction-set type), [`config`] (`config.json`), [`weights`] (the
//!   weight-source interface the formats implement), [`model`] (the
//!   Qwen3-Next forward pass, and [`model::experts`], the expert cache that
//!   pages routed experts under a RAM budget), [`sample`] (token choice),
//!   [`membw`] (memory-bandwidth probe);
//! * [`formats`] (lib/src/formats/): [`quant`] (AutoRound packing),
//!   [`checkpoint`] (safetensors), [`cache`] (the repacked, mmap-ready
//!   cache), [`open`] (the one opener: cache or checkpoint, checked),
//!   [`synthetic`] (generated demo and benchmark checkpoints), [`assets`]
//!   (the bundled tokenizer and template);
//! * [`pipeline`] (lib/src/pipeline/): the manifest (`pipeline.toml`,
//!   [`pipeline::defaults`], setting errors), [`stage`] (resumable stage
//!   records, [`stage::Stage`]), the stages [`fetch`], [`inspect`],
//!   [`verify`] (and [`cache::write`] for repack), [`chat`] (tokenizer,
//!   template, multi-turn conversation), [`serve`] (the engine thread,
//!   prompt reuse and answer shaping behind `rh-serve --listen`),
//!   [`evaluate`] (logits and perplexity), [`speedbench`] (pp/tg runs).

pub mod engine;
pub mod formats;
pub mod pipeline;
pub mod support;

pub use engine::config;
pub use engine::kernels;
pub use engine::membw;
pub use engine::model;
pub use engine::sample;
pub use engine::scratch;
pub use engine::tensor;
pub use engine::weights;
pub use formats::assets;
pub use formats::cache;
pub use formats::checkpoint;
pub use formats::open;
pub use formats::quant;
pub use formats::synthetic;
pub use pipeline::chat;
pub use pipeline::evaluate;
pub use pipeline::fetch;
pub use pipeline::inspect;
pub use pipeline::serve;
pub use pipeline::speedbench;
pub use pipeline::stage;
pub use pipeline::verify;
pub use support::cli;
pub use support::direct_io;
pub use support::env;
pub use support::fsutil;
pub use support::heap;
pub use support::mmap;

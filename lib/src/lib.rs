//! Roundhouse: Qwen3-Next AutoRound checkpoints from the hub to a chat
//! prompt on a CPU.
//!
//! The library holds everything; the `rh-*` binaries parse flags and call
//! into it. ARCHITECTURE.md at the repository root is the reading path.
//! Modules by concern, bottom up:
//!
//! * compute: [`kernels`] (matvec/matmul per instruction set, with a scalar
//!   reference; [`kernels::Isa`] is the one instruction-set type), [`tensor`]
//!   (the weight layouts kernels read, and their element readers),
//!   [`membw`] (memory-bandwidth probe), [`direct_io`] (aligned
//!   positioned reads that bypass the page cache);
//! * model formats: [`config`] (`config.json`), [`quant`] (AutoRound
//!   packing), [`checkpoint`] (safetensors), [`cache`] (the repacked,
//!   mmap-ready cache), [`weights`] (the weight-source interface both
//!   implement), [`open`] (the one opener: cache or checkpoint, checked),
//!   [`synthetic`] (generated demo and benchmark checkpoints), [`assets`]
//!   (the bundled tokenizer and template);
//! * engine: [`model`] (the Qwen3-Next forward pass, and
//!   [`model::experts`], the expert cache that pages routed experts under a
//!   RAM budget), [`sample`] (token
//!   choice), [`chat`] (tokenizer, template, multi-turn conversation),
//!   [`evaluate`] (logits and perplexity), [`speedbench`] (pp/tg runs),
//!   [`serve`] (the engine thread, prompt reuse and answer shaping behind
//!   `rh-serve --listen`);
//! * pipeline stages: [`fetch`], [`inspect`], [`verify`] (and
//!   [`cache::write`] for repack);
//! * plumbing: [`cli`] (exit codes, logs, progress), [`pipeline`]
//!   (`pipeline.toml`, the documented defaults, setting errors), [`env`]
//!   (every environment variable read), [`stage`] (resumable checkpoint
//!   records, [`stage::Stage`]),
//!   [`fsutil`] (crash-safe writes), [`mmap`] (the one unsafe mapping).

pub mod assets;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod direct_io;
pub mod env;
pub mod evaluate;
pub mod fetch;
pub mod fsutil;
pub mod inspect;
pub mod kernels;
pub mod membw;
pub mod mmap;
pub mod model;
pub mod open;
pub mod pipeline;
pub mod quant;
pub mod sample;
pub mod serve;
pub mod speedbench;
pub mod stage;
pub mod synthetic;
pub mod tensor;
pub mod verify;
pub mod weights;

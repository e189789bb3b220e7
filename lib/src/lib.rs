//! Roundhouse: Qwen3-Next AutoRound checkpoints from the hub to a chat
//! prompt on a CPU.
//!
//! The library holds everything; the `rh-*` binaries parse flags and call
//! into it. Modules by concern:
//!
//! * pipeline plumbing: [`cli`] (exit codes, logs, progress), [`pipeline`]
//!   (`pipeline.toml`), [`stage`] (resumable checkpoint records),
//!   [`fsutil`] (crash-safe writes), [`mmap`] (the one unsafe mapping);
//! * model formats: [`config`] (`config.json`), [`checkpoint`] (safetensors),
//!   [`quant`] (AutoRound packing), [`tensor`] (kernel layouts),
//!   [`weights`] (the weight-source abstraction), [`synthetic`] (generated
//!   demo and benchmark checkpoints), [`assets`] (the bundled tokenizer);
//! * compute: [`kernels`].

pub mod assets;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod evaluate;
pub mod fetch;
pub mod fsutil;
pub mod inspect;
pub mod kernels;
pub mod membw;
pub mod mmap;
pub mod model;
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

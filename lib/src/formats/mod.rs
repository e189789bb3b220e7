//! Model files on disk: AutoRound packing (`quant`), safetensors checkpoints
//! (`checkpoint`), the repacked mmap-ready cache (`cache`), the one opener
//! (`open`), generated checkpoints (`synthetic`) and the bundled tokenizer
//! and template (`assets`).
//!
//! Each module keeps its top-level path (`crate::NAME`): lib.rs
//! re-exports it. scripts/group-modules.sh made this layout.

pub mod assets;
pub mod cache;
pub mod checkpoint;
pub mod open;
pub mod quant;
pub mod synthetic;

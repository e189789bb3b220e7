//! The stages `pipeline.toml` chains and what they drive: the manifest
//! itself (this module: `Pipeline`, `defaults`), stage records (`stage`),
//! `fetch`, `inspect`, `verify`, chat (`chat`), the HTTP engine thread
//! (`serve`), logits and perplexity (`evaluate`) and pp/tg runs
//! (`speedbench`).
//!
//! Each module keeps its top-level path (`crate::NAME`): lib.rs
//! re-exports it. scripts/group-modules.sh made this layout.
//!
//! The manifest (`pipeline.toml`: [`Pipeline`], [`defaults`], setting
//! errors) is `manifest.rs`; its items are this module's.

mod manifest;
pub use manifest::*;

pub mod chat;
pub mod evaluate;
pub mod fetch;
pub mod inspect;
pub mod serve;
pub mod speedbench;
pub mod stage;
pub mod verify;

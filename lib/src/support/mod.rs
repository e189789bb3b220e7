//! Plumbing every other group uses: exit codes and one-line errors (`cli`),
//! crash-safe writes (`fsutil`), the one unsafe file mapping (`mmap`),
//! aligned reads that bypass the page cache (`direct_io`), every
//! environment variable read (`env`), and the heap settings for the
//! model's large transient buffers (`heap`).
//!
//! Each module keeps its top-level path (`crate::NAME`): lib.rs
//! re-exports it. scripts/group-modules.sh made this layout.

pub mod cli;
pub mod direct_io;
pub mod env;
pub mod fsutil;
pub mod heap;
pub mod mmap;

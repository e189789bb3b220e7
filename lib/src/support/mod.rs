//! Plumbing every other group uses: exit codes and one-line errors (`cli`),
//! crash-safe writes (`fsutil`), the one unsafe file mapping (`mmap`),
//! aligned reads that bypass the page cache (`direct_io`), and every
//! environment variable read (`env`).
//!
//! Each module keeps its top-level path (`crate::NAME`): lib.rs
//! re-exports it. scripts/group-modules.sh made this layout.

pub mod cli;
pub mod direct_io;
pub mod env;
pub mod fsutil;
pub mod mmap;

//! Every environment variable the library reads, named and parsed here and
//! nowhere else, so one page lists what can change a run from outside its
//! flags and manifest.
//!
//! | variable | read by | effect |
//! |---|---|---|
//! | `RH_KERNELS` | [`crate::kernels`] | caps the instruction set (`scalar`, `avx2`, `avx512`); strategy.toml's `kernel` caps too, the lower wins |
//! | `RH_ACTIVATIONS` | [`crate::kernels`] | the matvec activation path (`f32`, `int16`, `int8`, `scalar`) |
//! | `RH_PREFETCH` | [`crate::kernels`] | software-prefetch distance in bytes |
//! | `RH_REPACK_ABORT_AFTER_UNITS` | `rh-repack` | test hook: stop as if killed after N tensor groups |
//! | `RH_EXPERT_IO_THREADS` | [`crate::model::experts`] | reads in flight in the expert cache (default 16, 1-256), for measurements |
//! | `RH_EXPERT_PREDICT_EXTRA` | [`crate::model::experts`] | experts read ahead per predicted layer beyond its top-k (default 0), for measurements |
//! | `RH_EXPERT_PREDICT_DEPTH` | [`crate::model::experts`] | layers predicted ahead, 1 or 2 (default 1), for measurements |
//! | `RH_EXPERT_AHEAD_INFLIGHT` | [`crate::model::experts`] | read-ahead reads in flight at most (default 4), for measurements |
//! | `RH_EXPERT_AHEAD_IDLE` | [`crate::model::experts`] | `1`: read-ahead starts only while no demand read runs (default: beside them), for measurements |
//! | `RH_EXPERT_IO_NICE` | [`crate::model::experts`] | nice value of the expert cache's I/O threads (default 0: left as they are; below 0 where allowed), for measurements |
//! | `RH_EXPERT_PREFAULT` | [`crate::model::experts`] | `0`: the expert cache's buffers are faulted in by the first read into each (default: touched ahead on a low-priority thread), for measurements |
//! | `RH_HUGE_PAGES` | [`crate::model`] | `0`: leave the weights every token reads (all but the embedding and the routed experts) where the source put them instead of copying them onto huge pages, for measurements |
//!
//! Not here: the Hugging Face variables (`HF_HOME`, `HF_TOKEN`, ...), read by
//! `fetch::hf_cache` with the hub's own precedence, `RH_API_KEY`, which
//! rh-serve takes through its `--api-key` flag, and `RUST_LOG`, read by the
//! log setup.

use crate::cli::{Classify, Exit};

/// The instruction-set cap.
pub const RH_KERNELS: &str = "RH_KERNELS";
/// The activation path.
pub const RH_ACTIVATIONS: &str = "RH_ACTIVATIONS";
/// The prefetch distance.
pub const RH_PREFETCH: &str = "RH_PREFETCH";
/// The repack test hook.
pub const RH_REPACK_ABORT_AFTER_UNITS: &str = "RH_REPACK_ABORT_AFTER_UNITS";
/// The expert cache's reads in flight.
pub const RH_EXPERT_IO_THREADS: &str = "RH_EXPERT_IO_THREADS";
/// The expert cache's extra read-ahead per predicted layer.
pub const RH_EXPERT_PREDICT_EXTRA: &str = "RH_EXPERT_PREDICT_EXTRA";
/// Layers the expert cache predicts ahead.
pub const RH_EXPERT_PREDICT_DEPTH: &str = "RH_EXPERT_PREDICT_DEPTH";
/// Read-ahead reads the expert cache keeps in flight at most.
pub const RH_EXPERT_AHEAD_INFLIGHT: &str = "RH_EXPERT_AHEAD_INFLIGHT";
/// Whether expert read-ahead waits for the demand reads to finish.
pub const RH_EXPERT_AHEAD_IDLE: &str = "RH_EXPERT_AHEAD_IDLE";
/// The expert cache's I/O threads' nice value.
pub const RH_EXPERT_IO_NICE: &str = "RH_EXPERT_IO_NICE";
/// Whether the expert cache touches its buffers ahead of use.
pub const RH_EXPERT_PREFAULT: &str = "RH_EXPERT_PREFAULT";
/// Whether the per-token weights are copied onto huge pages.
pub const RH_HUGE_PAGES: &str = "RH_HUGE_PAGES";

/// A variable set to something that cannot be used (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{name}={value} is not {expected}")]
pub struct EnvError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What it must be.
    pub expected: &'static str,
}

impl Classify for EnvError {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

fn text(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `RH_KERNELS`, as set (the kernels parse it; unknown values mean no cap).
pub fn kernels_cap() -> Option<String> {
    text(RH_KERNELS)
}

/// `RH_ACTIVATIONS`, as set (unknown values mean the default path).
pub fn activations() -> Option<String> {
    text(RH_ACTIVATIONS)
}

/// `RH_PREFETCH` in bytes, when set to a number (anything else is ignored,
/// as a tuning knob should be).
pub fn prefetch_bytes() -> Option<usize> {
    text(RH_PREFETCH).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_IO_THREADS`, when set to a number (a tuning knob: anything
/// else is ignored).
pub fn expert_io_threads() -> Option<usize> {
    text(RH_EXPERT_IO_THREADS).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_PREDICT_EXTRA`, when set to a number (a tuning knob).
pub fn expert_predict_extra() -> Option<usize> {
    text(RH_EXPERT_PREDICT_EXTRA).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_PREDICT_DEPTH`, when set to a number (a tuning knob).
pub fn expert_predict_depth() -> Option<usize> {
    text(RH_EXPERT_PREDICT_DEPTH).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_AHEAD_INFLIGHT`, when set to a number (a tuning knob).
pub fn expert_ahead_inflight() -> Option<usize> {
    text(RH_EXPERT_AHEAD_INFLIGHT).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_AHEAD_IDLE`: true only when set to `1` (a knob for
/// measurements).
pub fn expert_ahead_when_idle() -> bool {
    text(RH_EXPERT_AHEAD_IDLE).as_deref() == Some("1")
}

/// `RH_EXPERT_IO_NICE`, when set to a number (a tuning knob).
pub fn expert_io_nice() -> Option<i32> {
    text(RH_EXPERT_IO_NICE).and_then(|v| v.parse().ok())
}

/// `RH_EXPERT_PREFAULT`: false only when set to `0` (a knob for
/// measurements).
pub fn expert_prefault() -> bool {
    text(RH_EXPERT_PREFAULT).as_deref() != Some("0")
}

/// `RH_HUGE_PAGES`: false only when set to `0` (a knob for measurements;
/// anything else keeps the default, on).
pub fn huge_pages() -> bool {
    text(RH_HUGE_PAGES).as_deref() != Some("0")
}

/// `RH_REPACK_ABORT_AFTER_UNITS`, when set; a value that is not a number is
/// an error.
pub fn repack_abort_after_units() -> Result<Option<usize>, EnvError> {
    match text(RH_REPACK_ABORT_AFTER_UNITS) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| EnvError {
            name: RH_REPACK_ABORT_AFTER_UNITS,
            value: v,
            expected: "a number",
        }),
    }
}

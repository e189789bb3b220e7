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
//! | `RH_EXPERT_HUGE_PAGES` | [`crate::model::experts`] | `0`: the expert cache's buffers are separate heap allocations on 4 KiB pages (default: slots of one mapping on 2 MiB pages), for measurements |
//! | `RH_HEAP` | [`crate::heap`] | `0`: leave glibc's heap thresholds at their defaults (default: large transient buffers stay on the heap between layers), for measurements |
//! | `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` | [`crate::heap`] | glibc's own; when any is set, Roundhouse leaves the heap settings to glibc |
//! | `RH_HUGE_PAGES` | [`crate::model`] | `0`: leave the weights every token reads (all but the embedding and the routed experts) where the source put them instead of copying them onto huge pages, and map the cache files on 4 KiB pages only (`MADV_NOHUGEPAGE`; otherwise `MADV_HUGEPAGE`), for measurements |
//!
//! A value a knob cannot use (not a number, out of its range, a switch set
//! to neither `0` nor `1`, an unknown level or path) is ignored with one
//! warning on stderr naming the variable and what it takes; the default
//! applies. Only `RH_REPACK_ABORT_AFTER_UNITS`, a test hook, is an error.
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
/// Whether the expert cache's buffers lie on huge pages.
pub const RH_EXPERT_HUGE_PAGES: &str = "RH_EXPERT_HUGE_PAGES";
/// Whether the heap keeps large transient buffers between layers.
pub const RH_HEAP: &str = "RH_HEAP";
/// glibc's own heap variables ([`malloc_set_by_user`]).
pub const GLIBC_MALLOC_VARS: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];
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

/// Warns once per variable that a knob is set to something it cannot use
/// and is left at its default: a typo (`RH_KERNELS=avx-2`) must not pass
/// silently for the setting it names, least of all in a benchmark.
fn ignored(name: &'static str, value: &str, expected: &str) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static WARNED: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let first = WARNED
        .get_or_init(Default::default)
        .lock()
        .map(|mut w| w.insert(name))
        .unwrap_or(true);
    if first {
        tracing::warn!("{name}={value} is not {expected}; ignored (the default applies)");
    }
}

/// A tuning knob: its number when set to one in `range`; any other value
/// is ignored with a warning ([`ignored`]).
fn number<T>(name: &'static str, range: std::ops::RangeInclusive<T>) -> Option<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    number_in(name, text(name)?, range)
}

fn number_in<T>(name: &'static str, v: String, range: std::ops::RangeInclusive<T>) -> Option<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match v.trim().parse::<T>() {
        Ok(n) if range.contains(&n) => Some(n),
        _ => {
            let expected = format!("a number from {} to {}", range.start(), range.end());
            ignored(name, &v, &expected);
            None
        }
    }
}

/// A switch that is on unless set to `0` (`default_on`), or off unless set
/// to `1`; any value but `0` and `1` is ignored with a warning.
fn switch(name: &'static str, default_on: bool) -> bool {
    switch_of(name, text(name), default_on)
}

fn switch_of(name: &'static str, v: Option<String>, default_on: bool) -> bool {
    match v.as_deref().map(str::trim) {
        None => default_on,
        Some("1") => true,
        Some("0") => false,
        Some(v) => {
            ignored(name, v, "0 or 1");
            default_on
        }
    }
}

/// Called by the kernels when `RH_KERNELS` names no level: warns once (no
/// cap applies).
pub fn kernels_cap_unknown(value: &str) {
    ignored(
        RH_KERNELS,
        value,
        "scalar, avx2, avx-vnni, avx512 or avx512-vnni",
    );
}

/// `RH_ACTIVATIONS`'s value when it names no path (warned once; the
/// default path applies).
pub fn activations_unknown(value: &str) {
    ignored(RH_ACTIVATIONS, value, "f32, int16, int8 or scalar");
}

/// `RH_PREFETCH` in bytes (a tuning knob, 0 to 64 MiB; anything else is
/// ignored with a warning).
pub fn prefetch_bytes() -> Option<usize> {
    number(RH_PREFETCH, 0..=64 << 20)
}

/// `RH_EXPERT_IO_THREADS` (1-256; a tuning knob, see [`number`]).
pub fn expert_io_threads() -> Option<usize> {
    number(RH_EXPERT_IO_THREADS, 1..=256)
}

/// `RH_EXPERT_PREDICT_EXTRA` (0-1024; a tuning knob).
pub fn expert_predict_extra() -> Option<usize> {
    number(RH_EXPERT_PREDICT_EXTRA, 0..=1024)
}

/// `RH_EXPERT_PREDICT_DEPTH` (1 or 2; a tuning knob).
pub fn expert_predict_depth() -> Option<usize> {
    number(RH_EXPERT_PREDICT_DEPTH, 1..=2)
}

/// `RH_EXPERT_AHEAD_INFLIGHT` (1-256; a tuning knob).
pub fn expert_ahead_inflight() -> Option<usize> {
    number(RH_EXPERT_AHEAD_INFLIGHT, 1..=256)
}

/// `RH_EXPERT_AHEAD_IDLE`: true only when set to `1` (a knob for
/// measurements).
pub fn expert_ahead_when_idle() -> bool {
    switch(RH_EXPERT_AHEAD_IDLE, false)
}

/// `RH_EXPERT_IO_NICE` (-20 to 19; a tuning knob).
pub fn expert_io_nice() -> Option<i32> {
    number(RH_EXPERT_IO_NICE, -20..=19)
}

/// `RH_EXPERT_PREFAULT`: false only when set to `0` (a knob for
/// measurements).
pub fn expert_prefault() -> bool {
    switch(RH_EXPERT_PREFAULT, true)
}

/// `RH_EXPERT_HUGE_PAGES`: false only when set to `0` (a knob for
/// measurements).
pub fn expert_huge_pages() -> bool {
    switch(RH_EXPERT_HUGE_PAGES, true)
}

/// `RH_HEAP`: false only when set to `0` (a knob for measurements).
pub fn heap_tuning() -> bool {
    switch(RH_HEAP, true)
}

/// Whether one of glibc's own heap variables is set, whose value glibc
/// has already applied and Roundhouse must not override.
pub fn malloc_set_by_user() -> bool {
    GLIBC_MALLOC_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// `RH_HUGE_PAGES`: false only when set to `0` (a knob for measurements;
/// the default is on).
pub fn huge_pages() -> bool {
    switch(RH_HUGE_PAGES, true)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_take_numbers_in_range_and_ignore_the_rest() {
        let n = |v: &str| number_in(RH_EXPERT_IO_THREADS, v.to_string(), 1usize..=256);
        assert_eq!(n("16"), Some(16));
        assert_eq!(n(" 256 "), Some(256));
        assert_eq!(n("0"), None, "below the range");
        assert_eq!(n("1000"), None, "above the range");
        assert_eq!(n("sixteen"), None);
        assert_eq!(n("-3"), None);
        let nice = |v: &str| number_in(RH_EXPERT_IO_NICE, v.to_string(), -20i32..=19);
        assert_eq!(nice("-10"), Some(-10));
        assert_eq!(nice("20"), None);
    }

    #[test]
    fn switches_take_0_and_1_and_keep_the_default_otherwise() {
        let s = |v: Option<&str>, on| switch_of(RH_HUGE_PAGES, v.map(String::from), on);
        assert!(s(None, true));
        assert!(!s(None, false));
        assert!(!s(Some("0"), true));
        assert!(s(Some("1"), false));
        assert!(s(Some("off"), true), "not 0 or 1: the default");
        assert!(!s(Some("yes"), false), "not 0 or 1: the default");
    }
}

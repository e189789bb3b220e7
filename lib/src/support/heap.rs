//! glibc heap settings for the model's large transient buffers.
//!
//! A prefill chunk allocates buffers of 4-32 MiB in every layer (the
//! projections' outputs, the DeltaNet's conv input and gates, attention
//! scores) and frees them before the next layer. With glibc's defaults
//! such blocks go back to the kernel when freed: blocks above the mmap
//! threshold (128 KiB at first, then raised to the largest block freed so
//! far) are unmapped, and a worker thread's heap is trimmed once its free
//! top passes twice that. The next layer's buffers then fault in fresh
//! zeroed pages: about 17,000 faults per 512-token prompt on the 8-layer
//! bench model, and 4-5% of its prefill time (docs/performance.md,
//! fifteenth session). Fixed thresholds keep those blocks on the heap:
//! blocks under 32 MiB (glibc's largest mmap threshold) come from the
//! heap, and up to 128 MiB of a heap's free top stays mapped for reuse,
//! 64 MiB more taken whenever a heap grows.
//!
//! Bounded: a heap keeps at most its trim threshold free beyond what it
//! holds in use, and decode allocates nothing this large. Settings glibc
//! was given through its own variables (`MALLOC_MMAP_THRESHOLD_`,
//! `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`) stand; `RH_HEAP=0` leaves
//! glibc's defaults, for measurements.

/// Blocks at least this large are mapped on their own (glibc's ceiling
/// for the threshold on 64-bit).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free bytes a heap keeps at its top before it gives them back.
pub const TRIM_THRESHOLD: usize = 128 << 20;
/// Extra bytes taken whenever a heap grows.
pub const TOP_PAD: usize = 64 << 20;

/// Applies the settings above once per process (later calls do nothing);
/// returns whether they were applied.
pub fn tune() -> bool {
    use std::sync::OnceLock;
    static APPLIED: OnceLock<bool> = OnceLock::new();
    *APPLIED.get_or_init(|| {
        if !crate::env::heap_tuning() || crate::env::malloc_set_by_user() {
            return false;
        }
        apply()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    let set = |param: libc::c_int, value: usize| {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and touches no caller memory;
        // glibc serializes it against allocations in other threads.
        unsafe { libc::mallopt(param, value) == 1 }
    };
    set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        & set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        & set(libc::M_TOP_PAD, TOP_PAD)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_every_setting() {
        // mallopt refuses values out of its range (returns 0): these must
        // all be inside it, or tune() would leave a half-applied heap.
        assert!(super::apply());
    }
}

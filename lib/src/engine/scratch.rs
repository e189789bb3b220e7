//! Reused buffers for a long prefill's largest per-layer temporaries.
//!
//! A 2048-token prefill chunk allocates, in every layer, buffers of 32-100
//! MiB that it writes whole and frees before the next layer: the
//! DeltaNet's projections (`qkvz`), its conv input and output, attention's
//! query projection, query and gate. Blocks that large are mapped afresh
//! by glibc on every allocation (its largest mmap threshold is 32 MiB, see
//! `crate::heap`), so each layer faulted in and zeroed them page by page
//! again: ~1.9 million faults and ~6 s of system time for a 4096-token
//! prompt on the 8-layer bench model (docs/performance.md, fifteenth
//! session).
//!
//! [`take`] hands out a [`Buf`] of the length asked whose contents are
//! left over from its last use, initialized but meaningless: **only for
//! buffers the caller writes in full before it reads them** (debug builds
//! fill them with NaN so a read before the write shows). Dropped, a `Buf`
//! goes back to its thread's pool for the next [`take`] there.
//!
//! Bounded: each thread keeps at most [`KEEP`] buffers and [`KEEP_BYTES`]
//! (the longest go first), and [`release`] frees them all; the model calls
//! it on every pool thread after each prefill, so nothing stays between
//! prompts.

use std::cell::RefCell;

/// Buffers a thread keeps at most.
pub const KEEP: usize = 8;
/// Bytes a thread keeps at most.
pub const KEEP_BYTES: usize = 512 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`take`]: the first `len` elements of a vector whose every
/// element is initialized, so it can be handed out again at any length up
/// to the vector's without being written first.
pub struct Buf {
    v: Vec<f32>,
    len: usize,
}

/// A buffer of `len` floats whose values are unspecified (left from an
/// earlier use, or zero where it had to grow): write every element before
/// reading any.
pub fn take(len: usize) -> Buf {
    let kept = POOL.with_borrow_mut(|p| {
        // The shortest kept vector that holds `len`, else the longest
        // (grown below).
        let fit = (0..p.len())
            .filter(|&i| p[i].len() >= len)
            .min_by_key(|&i| p[i].len());
        let i = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].len()))?;
        Some(p.swap_remove(i))
    });
    let mut v = kept.unwrap_or_default();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let mut b = Buf { v, len };
    if cfg!(debug_assertions) {
        b.fill(f32::NAN);
    }
    b
}

/// Frees this thread's kept buffers.
pub fn release() {
    let _ = POOL.try_with(|p| p.borrow_mut().clear());
}

/// Bytes this thread keeps now.
pub fn kept_bytes() -> usize {
    POOL.with_borrow(|p| p.iter().map(|v| v.len() * 4).sum())
}

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        let size = |b: &Vec<f32>| b.len() * 4;
        if v.is_empty() || size(&v) > KEEP_BYTES {
            return;
        }
        // During thread teardown the pool may be gone: then just free.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            p.push(v);
            while p.len() > KEEP || p.iter().map(size).sum::<usize>() > KEEP_BYTES {
                let longest = (0..p.len()).max_by_key(|&i| p[i].len()).unwrap_or(0);
                p.swap_remove(longest);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_at_the_length_asked_and_stay_bounded() {
        let mut a = take(1000);
        assert_eq!(a.len(), 1000);
        a.fill(3.0);
        drop(a);
        let b = take(10);
        assert_eq!(b.len(), 10);
        if !cfg!(debug_assertions) {
            // The same vector, shorter, its old values kept.
            assert!(b.iter().all(|&x| x == 3.0));
        }
        drop(b);
        let c = take(1500);
        assert_eq!(c.len(), 1500);
        drop(c);
        let held: Vec<Buf> = (0..2 * KEEP).map(|_| take(64)).collect();
        drop(held);
        assert!(POOL.with_borrow(|p| p.len()) <= KEEP);
        assert!(kept_bytes() <= KEEP_BYTES);
        release();
        assert_eq!(kept_bytes(), 0);
    }
}

//! Equal slots cut from one anonymous mapping on 2 MiB pages: the expert
//! cache's buffers (`crate::model::experts`).
//!
//! Why: every expert the cache reads is one `O_DIRECT` read, and the kernel
//! pins the destination of such a read page by page. On 4 KiB pages that
//! was 0.16-0.18 ms of system CPU per 1.55 MiB expert, on the I/O threads
//! while a layer waits (docs/performance.md, "paging3"); the expert's
//! matvecs then walk 400 TLB entries instead of one or two. A slot of
//! 1.55 MiB cannot hold a 2 MiB page of its own, and rounding every slot
//! up to 2 MiB would cost a fifth of the experts the budget holds, so the
//! slots lie end to end in one mapping whose huge pages straddle them.
//!
//! Soundness: the mapping lives as long as the arena, and every slot holds
//! an `Arc` of it. [`SlotArena::take`] hands out each slot index once (an
//! atomic counter that stops at the last slot), so no two slots' byte
//! ranges overlap, and every range lies inside the mapping (checked in
//! [`SlotArena::new`]). A slot is not `Clone`, so its bytes are written only
//! through `&mut ArenaSlot`: the same aliasing rules as an owned `Vec`.

// `is_multiple_of` is newer than the workspace's rust-version.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A 2 MiB page.
const HUGE: usize = 2 << 20;

/// One anonymous mapping holding `slots` slots of `stride` bytes, the
/// first at a 2 MiB boundary.
pub struct SlotArena {
    /// Owns the mapping (unmapped on drop).
    _map: memmap2::MmapMut,
    /// The first slot: inside `_map`, 2 MiB-aligned.
    base: *mut u8,
    stride: usize,
    slots: usize,
    next: AtomicUsize,
}

// SAFETY: the arena itself only hands out disjoint ranges (see the module
// comment); the raw pointer is what stops the compiler deriving these.
unsafe impl Send for SlotArena {}
// SAFETY: as above; `take` synchronizes through its atomic counter.
unsafe impl Sync for SlotArena {}

impl SlotArena {
    /// Maps room for `slots` slots of `stride` bytes (a multiple of 4 KiB,
    /// so every slot is page-aligned for `O_DIRECT`) and asks for huge
    /// pages over it. Nothing is touched: pages are backed (zeroed) as they
    /// are first written. `None` when the sizes overflow or the mapping
    /// fails; the caller then uses ordinary heap buffers.
    pub fn new(slots: usize, stride: usize) -> Option<Arc<SlotArena>> {
        if slots == 0 || stride == 0 || stride % 4096 != 0 {
            return None;
        }
        let len = slots.checked_mul(stride)?.checked_add(HUGE)?;
        let mut map = memmap2::MmapOptions::new().len(len).map_anon().ok()?;
        let at = map.as_mut_ptr() as usize;
        let skip = at.next_multiple_of(HUGE) - at;
        if skip + slots * stride > len {
            return None;
        }
        #[cfg(target_os = "linux")]
        {
            // A refusal (THP off or compiled out) leaves 4 KiB pages, which
            // work the same, only slower to pin.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        // `skip` is below 2 MiB and the slots fit after it (checked above).
        let base = map[skip..].as_mut_ptr();
        Some(Arc::new(SlotArena {
            _map: map,
            base,
            stride,
            slots,
            next: AtomicUsize::new(0),
        }))
    }

    /// The next unused slot, or `None` once all have been taken. A slot is
    /// never given back: the cache reuses its buffers itself.
    pub fn take(self: &Arc<Self>) -> Option<ArenaSlot> {
        let i = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                (i < self.slots).then_some(i + 1)
            })
            .ok()?;
        Some(ArenaSlot {
            arena: Arc::clone(self),
            offset: i * self.stride,
        })
    }
}

/// One slot of a [`SlotArena`], owned alone.
pub struct ArenaSlot {
    arena: Arc<SlotArena>,
    offset: usize,
}

impl ArenaSlot {
    /// Length in bytes (the arena's stride).
    pub fn len(&self) -> usize {
        self.arena.stride
    }

    /// Whether empty (never: the arena refuses a zero stride).
    pub fn is_empty(&self) -> bool {
        self.arena.stride == 0
    }

    /// The slot's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `offset..offset + stride` lies inside the mapping, which
        // the `Arc` keeps alive, and no other slot covers it.
        unsafe { std::slice::from_raw_parts(self.arena.base.add(self.offset), self.arena.stride) }
    }

    /// The slot's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` is the only access to the
        // range, since slots are never cloned or handed out twice.
        unsafe {
            std::slice::from_raw_parts_mut(self.arena.base.add(self.offset), self.arena.stride)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_aligned_zeroed_and_run_out() {
        let stride = 3 * 4096 * 133; // not a divisor of 2 MiB
        let arena = SlotArena::new(5, stride).expect("an anonymous mapping");
        let mut slots: Vec<ArenaSlot> = std::iter::from_fn(|| arena.take()).collect();
        assert_eq!(slots.len(), 5, "exactly the slots asked for");
        assert!(arena.take().is_none());
        assert_eq!(slots[0].as_slice().as_ptr() as usize % HUGE, 0);
        for (i, s) in slots.iter_mut().enumerate() {
            assert_eq!(s.len(), stride);
            assert_eq!(s.as_slice().as_ptr() as usize % 4096, 0);
            assert!(
                s.as_slice().iter().all(|&b| b == 0),
                "fresh memory reads zero"
            );
            s.as_mut_slice().fill(i as u8 + 1);
        }
        // Writing one slot changed no other.
        for (i, s) in slots.iter().enumerate() {
            assert!(s.as_slice().iter().all(|&b| b == i as u8 + 1), "slot {i}");
        }
        // Slots outlive the arena handle they came from.
        drop(arena);
        assert_eq!(slots[4].as_slice()[stride - 1], 5);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(SlotArena::new(0, 4096).is_none());
        assert!(SlotArena::new(4, 0).is_none());
        assert!(SlotArena::new(4, 4097).is_none());
        assert!(SlotArena::new(usize::MAX / 2, 4096).is_none());
    }
}

//! The allocators' shared memory: the `PG_ALLOC` map, mmapped (see
//! [`port_guard_common::MAP_ALLOC`] for what it holds and why the bitmap is only a hint).
//!
//! Every process that leases maps the same pages, so a word is updated with one atomic
//! instruction whoever else is allocating: no lock, no syscall. Only [`super::LeaseTable`]
//! uses it, which keeps the order "lease before bit, then the generation".

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use port_guard_common::{
    ALLOC_ALLOCATIONS, ALLOC_BITMAP, ALLOC_BITMAP_WORDS, ALLOC_ENTRIES, ALLOC_EXHAUSTIONS,
    ALLOC_CHARGED, ALLOC_GENERATION, ALLOC_REQUESTS,
};

use crate::shared::SharedWords;

/// `PG_ALLOC` mapped into this process.
pub(super) struct AllocMap {
    /// Keeps the map (its fd) alive as long as the mapping (None: anonymous memory, in tests).
    _map: Option<MapData>,
    words: SharedWords,
}

impl AllocMap {
    /// Maps `map`, which must be the `BPF_F_MMAPABLE` array of [`ALLOC_ENTRIES`] u64 words.
    pub fn new(map: MapData) -> io::Result<AllocMap> {
        let words = SharedWords::map(map.fd().as_fd().as_raw_fd(), ALLOC_ENTRIES as usize)?;
        Ok(AllocMap {
            _map: Some(map),
            words,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        self.words.word(i)
    }

    fn bit(port: u16) -> (usize, u64) {
        (
            ALLOC_BITMAP + usize::from(port) / 64,
            1u64 << (u32::from(port) % 64),
        )
    }

    /// Changes whenever a lease is claimed, handed over or released.
    pub fn generation(&self) -> u64 {
        self.word(ALLOC_GENERATION).load(Ordering::Acquire)
    }

    pub fn bump(&self) {
        self.word(ALLOC_GENERATION).fetch_add(1, Ordering::AcqRel);
    }

    #[cfg(test)]
    fn is_marked(&self, port: u16) -> bool {
        let (w, b) = Self::bit(port);
        self.word(w).load(Ordering::Acquire) & b != 0
    }

    /// Marks `port` leased.
    pub fn mark(&self, port: u16) {
        let (w, b) = Self::bit(port);
        self.word(w).fetch_or(b, Ordering::AcqRel);
    }

    /// Marks `port` unleased.
    pub fn unmark(&self, port: u16) {
        let (w, b) = Self::bit(port);
        self.word(w).fetch_and(!b, Ordering::AcqRel);
    }

    /// The lowest port in `from..=last` not marked leased.
    pub fn first_unmarked(&self, from: u16, last: u16) -> Option<u16> {
        if from > last {
            return None;
        }
        let mut p = u32::from(from);
        let last = u32::from(last);
        while p <= last {
            let word = self
                .word(ALLOC_BITMAP + p as usize / 64)
                .load(Ordering::Acquire);
            // Bits below `p` in this word count as marked.
            let free = !word & (u64::MAX << (p % 64));
            if free != 0 {
                let found = (p & !63) + free.trailing_zeros();
                return (found <= last).then_some(found as u16);
            }
            p = (p & !63) + 64;
        }
        None
    }

    /// Makes the bitmap say what `leased` (a snapshot of the lease map) says. A mark the
    /// snapshot does not explain is cleared only if `still_leased` (a fresh lookup) says no: the
    /// port may have been claimed and marked since the snapshot. A lease made after the
    /// snapshot and not marked yet is marked by its allocator, or by the next allocator that
    /// fails to claim it: the lease map is the authority. Returns (marks cleared, marks added).
    pub fn reconcile(
        &self,
        leased: impl IntoIterator<Item = u16>,
        mut still_leased: impl FnMut(u16) -> bool,
    ) -> (u64, u64) {
        let mut want = vec![0u64; ALLOC_BITMAP_WORDS];
        for p in leased {
            want[usize::from(p) / 64] |= 1u64 << (p % 64);
        }
        let (mut cleared, mut set) = (0u64, 0u64);
        for (i, &w) in want.iter().enumerate() {
            let word = self.word(ALLOC_BITMAP + i);
            let have = word.load(Ordering::Acquire);
            let mut stale = have & !w;
            while stale != 0 {
                let bit = stale.trailing_zeros();
                stale &= stale - 1;
                let port = (i * 64) as u32 + bit;
                if !still_leased(port as u16) {
                    word.fetch_and(!(1u64 << bit), Ordering::AcqRel);
                    cleared += 1;
                }
            }
            let missing = w & !have;
            if missing != 0 {
                word.fetch_or(missing, Ordering::AcqRel);
                set += u64::from(missing.count_ones());
            }
        }
        (cleared, set)
    }

    /// Counts one request that leased `ports` ports, or (0) one refused for want of free ports.
    pub fn record(&self, ports: u64) {
        if ports == 0 {
            self.word(ALLOC_EXHAUSTIONS).fetch_add(1, Ordering::Relaxed);
        } else {
            self.word(ALLOC_ALLOCATIONS)
                .fetch_add(ports, Ordering::Relaxed);
            self.word(ALLOC_REQUESTS).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `n` to counter word `i` (one of the `ALLOC_ENDED_*` totals).
    pub fn add(&self, i: usize, n: u64) {
        debug_assert!(
            i > ALLOC_EXHAUSTIONS && i < ALLOC_BITMAP && i != ALLOC_REQUESTS && i != ALLOC_CHARGED
        );
        self.word(i).fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` off [`ALLOC_CHARGED`]: charges the agent removed from `PG_CHARGES` (the
    /// programs add and take back the rest with atomic adds on the same word).
    pub fn uncount_charges(&self, n: u64) {
        self.word(ALLOC_CHARGED).fetch_sub(n, Ordering::AcqRel);
    }

    /// Counter word `i`.
    pub fn read(&self, i: usize) -> u64 {
        self.word(i).load(Ordering::Relaxed)
    }

    /// What the allocators counted since the guard was first loaded.
    pub fn totals(&self) -> Totals {
        Totals {
            ports: self.word(ALLOC_ALLOCATIONS).load(Ordering::Relaxed),
            requests: self.word(ALLOC_REQUESTS).load(Ordering::Relaxed),
            exhaustions: self.word(ALLOC_EXHAUSTIONS).load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon() -> AllocMap {
        AllocMap {
            _map: None,
            words: SharedWords::map(-1, ALLOC_ENTRIES as usize).unwrap(),
        }
    }

    #[test]
    fn finds_the_lowest_unmarked_port_across_words() {
        let a = anon();
        assert_eq!(a.first_unmarked(49152, 49215), Some(49152));
        for p in 49152..49215 {
            a.mark(p);
        }
        assert_eq!(a.first_unmarked(49152, 49215), Some(49215));
        a.mark(49215);
        assert_eq!(a.first_unmarked(49152, 49215), None);
        a.unmark(49200);
        assert_eq!(a.first_unmarked(49152, 49215), Some(49200));
        assert_eq!(a.first_unmarked(49201, 49215), None);
        // Bits outside the range do not count, on either side.
        assert_eq!(a.first_unmarked(49216, 49300), Some(49216));
        assert_eq!(a.first_unmarked(49100, 49151), Some(49100));
        // Ranges that start and end inside a word, and the ends of the port space.
        assert_eq!(a.first_unmarked(10, 10), Some(10));
        a.mark(10);
        assert_eq!(a.first_unmarked(10, 10), None);
        a.mark(65535);
        assert_eq!(a.first_unmarked(65530, 65535), Some(65530));
        assert_eq!(a.first_unmarked(65535, 65535), None);
        assert_eq!(a.first_unmarked(0, 0), Some(0));
        assert_eq!(a.first_unmarked(5, 4), None);
    }

    #[test]
    fn reconcile_makes_the_bitmap_match_the_leases() {
        let a = anon();
        a.mark(100); // stale: no lease
        a.mark(200); // leased
                     // 300 leased but not marked
        assert_eq!(a.reconcile([200, 300], |_| false), (1, 1));
        assert!(!a.is_marked(100));
        assert!(a.is_marked(200));
        assert!(a.is_marked(300));
        assert_eq!(a.reconcile([200, 300], |_| false), (0, 0));
        // A port claimed after the snapshot keeps its mark.
        a.mark(400);
        assert_eq!(a.reconcile([200, 300], |p| p == 400), (0, 0));
        assert!(a.is_marked(400));
    }

    #[test]
    fn counters_and_generation() {
        let a = anon();
        let g = a.generation();
        a.bump();
        assert_eq!(a.generation(), g + 1);
        a.record(1);
        a.record(3);
        a.record(0);
        assert_eq!(
            a.totals(),
            Totals {
                ports: 4,
                requests: 2,
                exhaustions: 1
            }
        );
        // The counters do not live in the bitmap.
        assert_eq!(a.first_unmarked(0, 63), Some(0));
    }
}

/// The allocators' totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Ports leased (a request for N counts N).
    pub ports: u64,
    /// Requests that got their ports.
    pub requests: u64,
    /// Requests refused for want of free ports.
    pub exhaustions: u64,
}

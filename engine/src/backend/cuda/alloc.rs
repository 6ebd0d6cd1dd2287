//! A caching device allocator: freed buffers go back to size-bucketed free lists and are reused
//! by later allocations of the same bucket, so a training step allocates from the driver only
//! while the cache warms up. All work runs on one stream per device, so a buffer handed back
//! while queued kernels still read it is only reused by work queued after them.
//!
//! Buckets: requests up to 1 MiB round up to a multiple of 512 bytes, larger ones to a multiple
//! of 2 MiB. A request takes the smallest cached block of at least its bucket and at most twice
//! it (up to 1 MiB) or 1.25 times it (larger). A step of fixed shapes finds its exact buckets
//! again; a step on ragged lengths (every micro-batch of real data has its own longest example,
//! so each activation its own size) reuses the blocks of nearby lengths. The buffer sizes of six
//! SmolLM2 training steps on the commonsense data, replayed through both rules, missed the cache
//! about 1,200 times a step with exact reuse of the small buckets (a driver allocation each, every
//! step) and about 30 with reuse up to twice.
//! Statistics count the bytes of the blocks handed out.

use std::collections::BTreeMap;

const SMALL: usize = 1 << 20;
const SMALL_STEP: usize = 512;
const LARGE_STEP: usize = 2 << 20;

/// The bucket size for a request of `bytes`.
pub(crate) fn bucket(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= SMALL {
        bytes.div_ceil(SMALL_STEP) * SMALL_STEP
    } else {
        bytes.div_ceil(LARGE_STEP) * LARGE_STEP
    }
}

/// Free lists and statistics of one device (the driver calls are made by the caller).
#[derive(Debug, Default)]
pub(crate) struct Cache {
    free: BTreeMap<usize, Vec<u64>>,
    /// Bytes held in the free lists.
    pub cached: usize,
    /// Bytes of the blocks handed out and not yet returned.
    pub current: usize,
    /// The largest `current` since the last reset.
    pub peak: usize,
}

impl Cache {
    /// A cached block for `size` (a bucket size) as `(ptr, block size)`, counted as in use.
    pub fn take(&mut self, size: usize) -> Option<(u64, usize)> {
        let hi = if size <= SMALL {
            2 * size
        } else {
            size + size / 4
        };
        let (&cap, list) = self.free.range_mut(size..=hi).next()?;
        let ptr = list.pop()?;
        if list.is_empty() {
            self.free.remove(&cap);
        }
        self.cached -= cap;
        self.note_alloc(cap);
        Some((ptr, cap))
    }

    /// Counts a block fresh from the driver as in use.
    pub fn note_alloc(&mut self, cap: usize) {
        self.current += cap;
        self.peak = self.peak.max(self.current);
    }

    /// Counts a block given back to the driver.
    pub fn note_free(&mut self, cap: usize) {
        self.current = self.current.saturating_sub(cap);
    }

    /// Returns a block to its free list.
    pub fn give_back(&mut self, ptr: u64, cap: usize) {
        self.current = self.current.saturating_sub(cap);
        self.cached += cap;
        self.free.entry(cap).or_default().push(ptr);
    }

    /// Empties the free lists, returning the blocks so that the caller frees them.
    pub fn drain(&mut self) -> Vec<u64> {
        self.cached = 0;
        std::mem::take(&mut self.free)
            .into_values()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_reuse() {
        assert_eq!(bucket(0), 512);
        assert_eq!(bucket(513), 1024);
        assert_eq!(bucket(SMALL + 1), 2 << 20);
        let mut c = Cache::default();
        c.note_alloc(1024);
        c.give_back(7, 1024);
        assert_eq!((c.current, c.cached, c.peak), (0, 1024, 1024));
        // A small request reuses a block up to twice its bucket, not more.
        assert_eq!(c.take(512), Some((7, 1024)));
        c.give_back(7, 1024);
        c.note_alloc(4096);
        c.give_back(8, 4096);
        assert_eq!(c.take(1536), None);
        // The smallest block that fits: the exact bucket when it is cached.
        assert_eq!(c.take(1024), Some((7, 1024)));
        c.give_back(7, 1024);
        assert_eq!(c.take(2048), Some((8, 4096)));
        c.give_back(8, 4096);
        // A large request reuses a block up to 1.25x its size, not more.
        c.note_alloc(10 << 20);
        c.give_back(9, 10 << 20);
        assert_eq!(c.take(8 << 20), Some((9, 10 << 20)));
        c.give_back(9, 10 << 20);
        assert_eq!(c.take(4 << 20), None);
        assert_eq!(c.drain().len(), 3);
        assert_eq!(c.cached, 0);
    }
}

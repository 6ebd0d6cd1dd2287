//! Bytes of the live CPU tensor buffers, current and peak: the CPU's counterpart of the CUDA
//! caching allocator's statistics, so that a bench can read an activation peak on either device
//! ([`crate::memory_stats`]). A buffer counts from the tensor that creates it until the last
//! tensor or tape node viewing it is dropped; views share their buffer's count. Scratch that a
//! kernel allocates and frees inside one call is not a tensor buffer and is not counted (as on
//! the GPU, where a kernel's shared memory is not).

use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The count of one live buffer: its bytes are added on creation and taken off on drop.
#[derive(Debug)]
pub(crate) struct LiveBuffer(usize);

impl LiveBuffer {
    pub(crate) fn new(bytes: usize) -> Self {
        let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(now, Ordering::Relaxed);
        LiveBuffer(bytes)
    }
}

impl Drop for LiveBuffer {
    fn drop(&mut self) {
        CURRENT.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// `(current, peak)` bytes of the live CPU tensor buffers of this process; the peak since the
/// last [`reset_peak_memory`] (or the start).
pub fn memory_stats() -> (usize, usize) {
    let current = CURRENT.load(Ordering::Relaxed);
    (current, PEAK.load(Ordering::Relaxed).max(current))
}

/// Restarts the peak of [`memory_stats`] from the current use.
pub fn reset_peak_memory() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

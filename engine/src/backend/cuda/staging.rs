//! Uploads that do not make the host wait: a small upload's bytes are copied into a page-locked
//! (pinned) ring on the host, and the copy to the device is queued on the device's stream from
//! there. A copy from pageable memory would make the host wait for the whole stream (the driver
//! must finish reading the caller's memory before the call returns, and the caller's slice may
//! go away right after); from the ring it is asynchronous, and the caller's slice is free at once.
//!
//! The ring hands out regions in order and wraps around. Each region queued for a copy keeps an
//! event recorded after its copy; a region is reused only once its event has completed, which,
//! in a training step, is long before the ring comes round again (the step's token ids, masks and
//! labels, and the optimizer's tensor tables: a few hundred KiB against a ring of
//! [`RING_BYTES`]). An upload larger than [`MAX_STAGED`] is not staged (the caller copies it
//! synchronously: model weights, once).

use std::collections::VecDeque;

use cudarc::driver::{result, sys, CudaEvent};

use super::device::CudaDevice;
use crate::Result;

/// Bytes of the pinned ring.
pub(crate) const RING_BYTES: usize = 8 << 20;
/// The largest upload that goes through the ring.
pub(crate) const MAX_STAGED: usize = RING_BYTES / 4;
/// Regions start on this boundary.
const ALIGN: usize = 256;

/// The pinned ring of one device and the regions still in flight.
pub(crate) struct Staging {
    /// Start of the pinned allocation (`RING_BYTES`), null until the first staged upload.
    base: *mut u8,
    /// Where the next region starts.
    head: usize,
    /// Regions `[start, end)` whose copies were queued, oldest first, each with the event
    /// recorded after its copy.
    in_flight: VecDeque<(usize, usize, CudaEvent)>,
}

// SAFETY: the ring is only touched under the device's mutex; the pointer is a pinned host
// allocation owned by this struct, valid from any thread.
unsafe impl Send for Staging {}

impl Default for Staging {
    fn default() -> Self {
        Staging {
            base: std::ptr::null_mut(),
            head: 0,
            in_flight: VecDeque::new(),
        }
    }
}

impl Staging {
    /// Queues the copy of `bytes` to the device address `dst` on `dev`'s stream through the
    /// ring; the caller's bytes may be dropped as soon as this returns. `bytes.len()` must be at
    /// most [`MAX_STAGED`].
    pub(crate) fn upload(&mut self, dev: &CudaDevice, dst: u64, bytes: &[u8]) -> Result<()> {
        debug_assert!(bytes.len() <= MAX_STAGED);
        let op = "upload";
        dev.bind(op)?;
        if self.base.is_null() {
            // SAFETY: a plain pinned host allocation of RING_BYTES, freed in Drop.
            let p = unsafe { result::malloc_host(RING_BYTES, 0) }.map_err(|e| dev.err(op, e))?;
            self.base = p.cast();
        }
        // Copies already done free their regions (and events) without a wait.
        while self
            .in_flight
            .front()
            .is_some_and(|(_, _, ev)| ev.is_complete())
        {
            self.in_flight.pop_front();
        }
        let (start, end, retire) = place(
            self.head,
            bytes.len(),
            RING_BYTES,
            self.in_flight.iter().map(|(s, e, _)| (*s, *e)),
        );
        // The regions the new one reaches: their copies must have read them first.
        let t0 = std::time::Instant::now();
        for (_, _, ev) in self.in_flight.drain(..retire) {
            ev.synchronize().map_err(|e| dev.err(op, e))?;
        }
        // A wait for the GPU like any other.
        super::device::note_wait(t0);
        // SAFETY: `[start, start + len)` lies inside the ring (n <= MAX_STAGED < RING_BYTES and
        // end <= RING_BYTES), no queued copy still reads it (waited for above), and it does not
        // overlap `bytes` (pinned memory of ours).
        let region = unsafe {
            let p = self.base.add(start);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            std::slice::from_raw_parts(p, bytes.len())
        };
        let stream = dev.stream();
        // SAFETY: `dst` holds at least `bytes.len()` bytes (the caller's allocation); the pinned
        // region stays untouched until the event recorded below has completed.
        unsafe { result::memcpy_htod_async(dst, region, stream.cu_stream()) }
            .map_err(|e| dev.err(op, e))?;
        let ev = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| dev.err(op, e))?;
        self.in_flight.push_back((start, end, ev));
        self.head = end;
        Ok(())
    }
}

/// Where a region of `len` bytes goes in a ring of `cap` bytes whose next free byte is `head`,
/// with `in_flight` the regions still queued (oldest first): `(start, end, retire)`, the region
/// (`ALIGN`-rounded, wrapped to the start when it would run past the end) and how many of the
/// oldest regions must be waited for first. Regions are handed out in ring order from `head`, so
/// those the new one reaches are a prefix of `in_flight`: the ones it overlaps and, when it
/// wraps, also those in the tail `[head, cap)` it skips (older than any at the ring's start).
fn place(
    head: usize,
    len: usize,
    cap: usize,
    in_flight: impl Iterator<Item = (usize, usize)>,
) -> (usize, usize, usize) {
    let n = len.div_ceil(ALIGN).max(1) * ALIGN;
    let wraps = head + n > cap;
    let start = if wraps { 0 } else { head };
    let end = start + n;
    let retire = in_flight
        .take_while(|&(s, e)| (s < end && e > start) || (wraps && e > head))
        .count();
    (start, end, retire)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.base.is_null() {
            return;
        }
        // Every queued copy must have read its region before the ring goes.
        for (_, _, ev) in self.in_flight.drain(..) {
            let _ = ev.synchronize();
        }
        // SAFETY: allocated by malloc_host above; no copy reads it any more.
        let _ = unsafe { result::free_host(self.base.cast()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_wrap_and_wait_only_for_what_they_overlap() {
        let cap = 4 * ALIGN;
        // An empty ring: the region starts at the head, rounded up to ALIGN.
        assert_eq!(place(0, 1, cap, std::iter::empty()), (0, ALIGN, 0));
        assert_eq!(place(0, 0, cap, std::iter::empty()), (0, ALIGN, 0));
        // Regions in flight after the head are not waited for.
        let q = [(0, ALIGN), (ALIGN, 2 * ALIGN)];
        assert_eq!(
            place(2 * ALIGN, ALIGN + 1, cap, q.into_iter()),
            (2 * ALIGN, 4 * ALIGN, 0)
        );
        // Past the end: wrap to 0 and wait for the oldest regions it covers, not the rest.
        let q = [(0, ALIGN), (ALIGN, 2 * ALIGN), (2 * ALIGN, 3 * ALIGN)];
        assert_eq!(
            place(3 * ALIGN, 2 * ALIGN, cap, q.into_iter()),
            (0, 2 * ALIGN, 2)
        );
        // The oldest regions lie past the new one: nothing to wait for.
        let q = [(3 * ALIGN, 4 * ALIGN), (0, ALIGN), (ALIGN, 2 * ALIGN)];
        assert_eq!(
            place(2 * ALIGN, ALIGN, cap, q.into_iter()),
            (2 * ALIGN, 3 * ALIGN, 0)
        );
        // Wrapping skips the tail: its regions (the oldest) are waited for along with those
        // at the start that the new region covers.
        let q = [(3 * ALIGN, 4 * ALIGN), (0, ALIGN), (ALIGN, 2 * ALIGN)];
        assert_eq!(
            place(2 * ALIGN, 3 * ALIGN, cap, q.into_iter()),
            (0, 3 * ALIGN, 3)
        );
        let q = [(3 * ALIGN, 4 * ALIGN), (0, ALIGN), (ALIGN, 2 * ALIGN)];
        assert_eq!(
            place(2 * ALIGN, 2 * ALIGN + 1, cap, q.into_iter()),
            (0, 3 * ALIGN, 3)
        );
        let q = [(2 * ALIGN, 3 * ALIGN), (3 * ALIGN, 4 * ALIGN), (0, ALIGN)];
        assert_eq!(
            place(ALIGN, 3 * ALIGN + 1, cap, q.into_iter()),
            (0, 4 * ALIGN, 3)
        );
    }
}

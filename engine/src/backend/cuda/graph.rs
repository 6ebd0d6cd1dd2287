//! CUDA graphs: the GPU work that a closure queues on a device's stream, recorded once
//! ([`capture`]) and replayed with one launch ([`CudaGraphExec::replay`]). A replay runs the
//! recorded kernels on the same addresses with the same arguments, so it costs the host one
//! driver call instead of one per kernel; what changes between replays is the data in the
//! buffers the work reads (write new inputs into them first, e.g. with `Tensor::assign`).
//!
//! While a graph is captured:
//! - every allocation comes from the graph's own pool ([`GraphPool`]). The pool keeps its blocks
//!   for as long as the graph lives, so the addresses recorded in the graph stay the graph's:
//!   nothing allocated outside the graph is ever placed there. Buffers freed during the capture
//!   are reused by later allocations of the same capture, as in eager mode (one stream orders
//!   them). Tensors created during the capture and kept afterwards are the graph's outputs: each
//!   replay writes them again.
//! - an upload is recorded as a copy from page-locked memory that the pool keeps: each replay
//!   copies the same bytes again (right for tables of addresses and other constants).
//! - the host cannot wait for the GPU (a read-back, an upload over the staging ring's limit, the
//!   profile's timed mode): [`super::CudaDevice::synchronize`] fails, and so does the capture.
//!
//! Rules for the caller: no other thread uses the device while a capture runs (its work would be
//! recorded too); every tensor allocated before the capture that the captured work reads or
//! writes must outlive the graph (the graph holds their addresses, not the tensors).

use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaGraph};

use super::alloc::{bucket, Cache};
use super::device::{lock, CudaBuffer, CudaDevice};
use crate::{Error, Result};

/// The device memory of one graph: the blocks it took from the device's allocator during its
/// capture, and the page-locked copies of the uploads it recorded.
pub(crate) struct GraphPool {
    dev: CudaDevice,
    /// Free blocks of the pool, by size (the same reuse rule as the device's cache).
    free: Mutex<Cache>,
    /// Every block the pool took from the device: `(address, size)`.
    blocks: Mutex<Vec<(u64, usize)>>,
    /// Page-locked host copies of the recorded uploads.
    pinned: Mutex<Vec<PinnedHost>>,
}

/// A page-locked host allocation, freed on drop.
struct PinnedHost(*mut std::ffi::c_void);

// SAFETY: a host allocation owned by this value; nothing else frees it.
unsafe impl Send for PinnedHost {}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; the graph that read it is gone (the pool, which
        // owns this, outlives its graph).
        let _ = unsafe { result::free_host(self.0) };
    }
}

impl GraphPool {
    fn new(dev: &CudaDevice) -> Arc<Self> {
        Arc::new(GraphPool {
            dev: dev.clone(),
            free: Mutex::new(Cache::default()),
            blocks: Mutex::new(Vec::new()),
            pinned: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of at least `bytes` bytes from the pool, which takes a new block from the device
    /// when none of its free ones fits.
    pub(crate) fn alloc(
        self: &Arc<Self>,
        dev: &CudaDevice,
        op: &'static str,
        bytes: usize,
    ) -> Result<CudaBuffer> {
        let size = bucket(bytes);
        let taken = lock(&self.free).take(size);
        let (ptr, cap) = match taken {
            Some(block) => block,
            None => {
                let (ptr, cap) = dev.alloc_block(op, bytes)?;
                lock(&self.blocks).push((ptr, cap));
                lock(&self.free).note_alloc(cap);
                (ptr, cap)
            }
        };
        Ok(CudaBuffer {
            ptr,
            bytes: cap,
            dev: dev.0.clone(),
            pool: Some(self.clone()),
        })
    }

    /// A block of the pool freed (its buffer dropped): free for the capture's next allocations.
    pub(crate) fn give_back(&self, ptr: u64, cap: usize) {
        lock(&self.free).give_back(ptr, cap);
    }

    /// Records the copy of `bytes` to the device address `dst`, from a page-locked copy that the
    /// pool keeps for every replay.
    pub(crate) fn upload(&self, dev: &CudaDevice, dst: u64, bytes: &[u8]) -> Result<()> {
        let op = "upload";
        dev.bind(op)?;
        // SAFETY: a plain pinned host allocation of `bytes.len()` bytes (at least 1), owned by
        // the pool from here on.
        let host =
            unsafe { result::malloc_host(bytes.len().max(1), 0) }.map_err(|e| dev.err(op, e))?;
        let host = PinnedHost(host);
        // SAFETY: `host` holds `bytes.len()` bytes of ours, disjoint from `bytes`.
        let copy = unsafe {
            let p = host.0.cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            std::slice::from_raw_parts(p, bytes.len())
        };
        // SAFETY: `dst` holds at least `bytes.len()` bytes (the caller's allocation); `copy`
        // lives as long as the pool, which outlives every replay of the graph.
        unsafe { result::memcpy_htod_async(dst, copy, dev.stream().cu_stream()) }
            .map_err(|e| dev.err(op, e))?;
        lock(&self.pinned).push(host);
        Ok(())
    }
}

impl Drop for GraphPool {
    fn drop(&mut self) {
        // The graph and every buffer of the pool are gone (each held the pool): its blocks go
        // back to the device's cache once the stream has run the work queued on them.
        for (ptr, cap) in lock(&self.blocks).drain(..) {
            self.dev.free_block(ptr, cap);
        }
        // The pinned copies may still be read by a replay in flight (no wait is possible, nor
        // needed for a pool without uploads, during another capture).
        if !lock(&self.pinned).is_empty() {
            let _ = self.dev.synchronize();
            lock(&self.pinned).clear();
        }
    }
}

/// A recorded graph of GPU work, ready to replay.
pub struct CudaGraphExec {
    // Field order: the graph goes before the pool whose memory it uses.
    graph: CudaGraph,
    pool: Arc<GraphPool>,
}

impl std::fmt::Debug for CudaGraphExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraphExec(cuda:{})", self.pool.dev.ordinal())
    }
}

impl CudaGraphExec {
    /// Queues one run of the recorded work on the device's stream (no host wait). With the op
    /// profile on, the replay is timed as one launch, `graph replay`.
    pub fn replay(&self) -> Result<()> {
        let dev = &self.pool.dev;
        super::launch::profiled(dev, "graph replay", || {
            self.graph.launch().map_err(|e| dev.err("graph replay", e))
        })
    }

    /// Bytes of device memory the graph's pool holds (shared with the other graphs of its
    /// [`GraphMemory`], if any).
    pub fn pool_bytes(&self) -> usize {
        lock(&self.pool.blocks).iter().map(|&(_, c)| c).sum()
    }
}

/// Queues one run of each of `graphs` (all of one device), at the same time: each on a stream
/// of its own that first waits for the work queued so far on the device's stream, which then
/// waits for all of them, so that the work queued afterwards sees what they wrote. No host wait.
/// One graph replays on the device's stream, as [`CudaGraphExec::replay`] does.
///
/// Graphs that run together must share no memory they write: give each its own
/// [`GraphMemory`], and record each in a lane of its own ([`crate::set_lane`]: its own dropout
/// key and cuBLAS workspace). The buffers they read (weights, inputs written beforehand) may be
/// shared. With the op profile on, the whole is timed as one launch, `graph replay (together)`.
pub fn replay_together(graphs: &[&CudaGraphExec]) -> Result<()> {
    const OP: &str = "graph replay (together)";
    let Some(first) = graphs.first() else {
        return Ok(());
    };
    let dev = &first.pool.dev;
    if let Some(g) = graphs
        .iter()
        .find(|g| g.pool.dev.ordinal() != dev.ordinal())
    {
        return Err(Error::invalid(
            OP,
            format!(
                "the graphs belong to cuda:{} and cuda:{}",
                dev.ordinal(),
                g.pool.dev.ordinal()
            ),
        ));
    }
    if graphs.len() == 1 {
        return first.replay();
    }
    dev.refuse_wait_in_capture(OP)?;
    let no_timing = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
    super::launch::profiled(dev, OP, || {
        dev.bind(OP)?;
        let main = dev.stream();
        let start = main.record_event(no_timing).map_err(|e| dev.err(OP, e))?;
        let mut done = Vec::with_capacity(graphs.len());
        for (i, g) in graphs.iter().enumerate() {
            let side = dev.side_stream(i)?;
            side.wait(&start).map_err(|e| dev.err(OP, e))?;
            // SAFETY: the executable graph lives while `g` does (the call returns once the
            // launch is queued, and the driver keeps what the queued run needs); `side` is a
            // stream of the graph's context.
            unsafe { result::graph::launch(g.graph.cu_graph_exec(), side.cu_stream()) }
                .map_err(|e| dev.err(OP, e))?;
            done.push(side.record_event(no_timing).map_err(|e| dev.err(OP, e))?);
        }
        for e in &done {
            main.wait(e).map_err(|e| dev.err(OP, e))?;
        }
        Ok(())
    })
}

/// Records the GPU work that `f` queues on `dev` into a graph (see the module's rules) and
/// returns it with `f`'s result; the work itself does not run. A failing `f` or an operation
/// that cannot be recorded ends the capture and returns the error; the device stays usable.
/// Run the work once eagerly first: kernel modules are compiled and loaded on first use, and
/// caches that the work builds lazily should be made outside the graph's pool.
pub fn capture<T>(dev: &CudaDevice, f: impl FnOnce() -> Result<T>) -> Result<(CudaGraphExec, T)> {
    capture_in(dev, &GraphMemory::new(dev), f)
}

/// Device memory that several graphs share: each capture into it ([`capture_in`]) reuses the
/// blocks that the earlier captures freed, so graphs of the same work at different shapes (a
/// training step per sequence-length bucket) hold about the memory of the largest, not the sum.
///
/// Sharing is safe because replays run one after another on the device's one stream, with one
/// rule for the caller: an output of a graph (a tensor it returned) may sit in a block that
/// another graph of the memory uses for its temporaries, so read or copy a graph's outputs
/// before replaying another graph of the same memory.
#[derive(Clone)]
pub struct GraphMemory(Arc<GraphPool>);

impl GraphMemory {
    pub fn new(dev: &CudaDevice) -> GraphMemory {
        GraphMemory(GraphPool::new(dev))
    }
    /// Bytes of device memory held (every block any of its captures took).
    pub fn bytes(&self) -> usize {
        lock(&self.0.blocks).iter().map(|&(_, c)| c).sum()
    }
}

impl std::fmt::Debug for GraphMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GraphMemory(cuda:{}, {} B)",
            self.0.dev.ordinal(),
            self.bytes()
        )
    }
}

/// [`capture`] with the graph's memory taken from `mem`, which other graphs share.
pub fn capture_in<T>(
    dev: &CudaDevice,
    mem: &GraphMemory,
    f: impl FnOnce() -> Result<T>,
) -> Result<(CudaGraphExec, T)> {
    let op = "graph capture";
    if mem.0.dev.ordinal() != dev.ordinal() {
        return Err(Error::invalid(
            op,
            format!(
                "the graph memory belongs to cuda:{}, the capture is on cuda:{}",
                mem.0.dev.ordinal(),
                dev.ordinal()
            ),
        ));
    }
    if dev.is_direct() {
        return Err(Error::invalid(
            op,
            "CUDA graphs need the caching allocator (it is off: MIXLORA_CUDA_NO_CACHE or \
             CudaOptions::caching_allocator)",
        ));
    }
    if dev.capture_pool().is_some() {
        return Err(Error::invalid(
            op,
            "a graph is already being captured on this device",
        ));
    }
    // Work queued before the capture must not be recorded: it is on the stream already, and
    // capturing starts a new sequence on it. The blas handle is made now (it allocates).
    dev.blas()?;
    let pool = mem.0.clone();
    let stream = dev.stream().clone();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| dev.err(op, e))?;
    dev.set_capture_pool(Some(pool.clone()));
    // Ends the capture however `f` ends (a panic too), so that the stream leaves capture mode
    // and allocations go to the cache again.
    struct Ending<'a>(&'a CudaDevice, bool);
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            self.0.set_capture_pool(None);
            if !self.1 {
                let _ = self
                    .0
                    .stream()
                    .end_capture(sys::CUgraphInstantiate_flags(0));
            }
        }
    }
    let mut ending = Ending(dev, false);
    let out = f();
    dev.set_capture_pool(None);
    ending.1 = true;
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    drop(ending);
    let out = out?;
    let graph = match ended {
        Ok(Some(g)) => g,
        Ok(None) => return Err(Error::invalid(op, "the capture recorded no work")),
        Err(e) => return Err(dev.err(op, e)),
    };
    Ok((CudaGraphExec { graph, pool }, out))
}

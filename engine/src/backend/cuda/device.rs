//! `CudaDevice`: one context and one stream per GPU, created on first use and cached per ordinal
//! for the process; its kernel modules (compiled by NVRTC for its architecture), cuBLAS and
//! cuBLASLt handles and caching allocator. The first device to start fixes the process's
//! [`CudaOptions`](crate::CudaOptions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};
use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError,
    LaunchConfig,
};
use cudarc::nvrtc::Ptx;
use kernels::KernelSource;

use super::alloc::{bucket, Cache};
use super::compile::cached_ptx;
use super::graph::GraphPool;
use super::staging::Staging;
use crate::device::fixed_cuda_options;
use crate::{Device, Error, Result};

/// Bytes of the cuBLAS workspace (what NVIDIA advises for Hopper GPUs).
const CUBLAS_WORKSPACE: usize = 32 << 20;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked; the maps stay consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct DeviceInner {
    /// The pinned ring of small uploads (first: it goes before the context it was made in).
    pub(crate) staging: Mutex<Staging>,
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// `sm_XY` of this GPU, the NVRTC target.
    pub(crate) arch: String,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    /// The cuBLASLt handle (the FP8 GEMMs), made on first use.
    blas_lt: Mutex<Option<Arc<BlasLt>>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    cache: Mutex<Cache>,
    /// The pool of the graph being captured, and whether there is one (read on every
    /// allocation without taking the lock).
    capture: Mutex<Option<Arc<GraphPool>>>,
    capturing: std::sync::atomic::AtomicBool,
    /// Without the caching allocator
    /// ([`CudaOptions::caching_allocator`](crate::CudaOptions::caching_allocator) off): every
    /// buffer is its own driver allocation of the exact size, freed when dropped (after the
    /// stream drains).
    direct: bool,
    /// `LANES` × 8 bytes of device memory holding each lane's dropout key
    /// ([`crate::set_dropout_key`], [`crate::set_lane`]), which the dropout kernels read when they
    /// run; allocated with the device, never freed.
    dropout_keys: u64,
    /// The lane of the work queued from now on ([`crate::set_lane`]).
    lane: std::sync::atomic::AtomicUsize,
    /// Each lane's cuBLAS workspace `(address, bytes)`, made when the lane is first used (lane 0's
    /// with the handle); never freed.
    workspaces: Mutex<Vec<Option<(u64, usize)>>>,
    /// Streams of [`super::graph::replay_together`] beside the device's own, made on first use.
    side_streams: Mutex<Vec<Arc<CudaStream>>>,
}

/// A handle to one GPU (cheap to clone).
#[derive(Clone)]
pub struct CudaDevice(pub(crate) Arc<DeviceInner>);

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({}, {})", self.0.ordinal, self.0.arch)
    }
}

fn devices() -> &'static Mutex<HashMap<usize, CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

fn unavailable(ordinal: usize, msg: String) -> Error {
    Error::DeviceUnavailable {
        op: "cuda",
        device: Device::Cuda(ordinal),
        msg,
    }
}

impl CudaDevice {
    /// The device `ordinal`, initialised on first use. Errors (no driver, no such GPU) say so and
    /// suggest `--device cpu`.
    pub fn get(ordinal: usize) -> Result<CudaDevice> {
        let mut map = lock(devices());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Self::create(ordinal)?;
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// The device if it was already initialised (never initialises one).
    pub(crate) fn existing(ordinal: usize) -> Option<CudaDevice> {
        lock(devices()).get(&ordinal).cloned()
    }

    fn create(ordinal: usize) -> Result<CudaDevice> {
        // SAFETY: only tries to dlopen the driver library's candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                ordinal,
                "the NVIDIA driver library (libcuda.so) was not found, so there is no GPU to use; \
                 use --device cpu"
                    .into(),
            ));
        }
        let count = result::init()
            .and_then(|_| CudaContext::device_count())
            .map_err(|e| {
                unavailable(
                    ordinal,
                    format!("the CUDA driver did not start ({e:?}); use --device cpu"),
                )
            })?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(
                ordinal,
                format!(
                    "this machine has {count} CUDA GPU(s); use --device cpu or a lower ordinal"
                ),
            ));
        }
        let err = |what: &str, e: DriverError| {
            unavailable(ordinal, format!("{what} failed ({e:?}); use --device cpu"))
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| err("creating the context", e))?;
        // SAFETY: every buffer is a raw allocation of ours used on this device's single stream,
        // so cudarc's per-slice event tracking has nothing to order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| err("creating a stream", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err("querying the compute capability", e))?;
        // SAFETY: a plain allocation of a u64 per lane on the current context (CudaContext::new
        // binds it), zeroed before any kernel can read it; it lives as long as the process's
        // device.
        let dropout_keys = unsafe {
            let bytes = 8 * crate::LANES;
            let p =
                result::malloc_sync(bytes).map_err(|e| err("allocating the dropout keys", e))?;
            result::memset_d8_sync(p, 0, bytes).map_err(|e| err("zeroing the dropout keys", e))?;
            p
        };
        Ok(CudaDevice(Arc::new(DeviceInner {
            staging: Mutex::new(Staging::default()),
            ordinal,
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            blas: Mutex::new(None),
            blas_lt: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            cache: Mutex::new(Cache::default()),
            capture: Mutex::new(None),
            capturing: std::sync::atomic::AtomicBool::new(false),
            direct: !fixed_cuda_options().caching_allocator,
            dropout_keys,
            lane: std::sync::atomic::AtomicUsize::new(0),
            workspaces: Mutex::new(vec![None; crate::LANES]),
            side_streams: Mutex::new(Vec::new()),
        })))
    }

    pub fn ordinal(&self) -> usize {
        self.0.ordinal
    }
    pub fn device(&self) -> Device {
        Device::Cuda(self.0.ordinal)
    }
    /// The GPU's product name, e.g. `NVIDIA H200` (empty when the driver does not say).
    pub fn name(&self) -> String {
        self.0.ctx.name().unwrap_or_default()
    }
    /// Whether freed buffers go back to the engine's cache (false without the caching allocator:
    /// every buffer is its own driver allocation, freed on drop).
    pub(crate) fn caches_buffers(&self) -> bool {
        !self.0.direct
    }
    /// The NVRTC target of this GPU, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.0.arch
    }
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }

    /// The lane of the work queued from now on ([`crate::set_lane`]).
    pub(crate) fn lane(&self) -> usize {
        self.0.lane.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device address of the current lane's dropout key (a u64), the `key` argument of every
    /// dropout kernel.
    pub(crate) fn dropout_key_ptr(&self) -> u64 {
        self.0.dropout_keys + 8 * self.lane() as u64
    }

    /// Queues the write of the current lane's dropout key ([`crate::set_dropout_key`]): kernels
    /// of the lane queued after this call draw with the new key, those queued before it with the
    /// old one. Refused while a graph is being captured: the write would be recorded with this
    /// key's bytes, and every replay would write them again.
    pub(crate) fn set_dropout_key(&self, key: u64) -> Result<()> {
        if self.0.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::invalid(
                "set_dropout_key",
                "a CUDA graph is being captured on this device: set the key before capturing \
                 or replaying, not inside the capture",
            ));
        }
        let at = self.dropout_key_ptr();
        lock(&self.0.staging).upload(self, at, &key.to_le_bytes())
    }

    /// Makes `lane` (below [`crate::LANES`]) the lane of the work queued from now on: its
    /// dropout key, and its own cuBLAS workspace (made now on its first use). Refused while a
    /// graph is being captured (the capture would mix two lanes' scratch memory).
    pub(crate) fn set_lane(&self, lane: usize) -> Result<()> {
        const OP: &str = "set_lane";
        if lane >= crate::LANES {
            return Err(Error::invalid(
                OP,
                format!(
                    "lane {lane} is out of range (a device has {})",
                    crate::LANES
                ),
            ));
        }
        if self.0.capturing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid(
                OP,
                "a CUDA graph is being captured on this device: choose the lane before capturing",
            ));
        }
        if lane == self.lane() {
            return Ok(());
        }
        // The handle, once made, takes the lane's workspace now (before the lane changes: a
        // failure leaves both as they were); a handle made later takes the lane current then.
        let handle = lock(&self.0.blas).clone();
        if let Some(h) = handle {
            self.use_workspace(&h, lane)?;
        }
        self.0
            .lane
            .store(lane, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Points the cuBLAS handle `h` at `lane`'s workspace, making it first (nothing without the
    /// caching allocator: no graphs, so no workspace of our own).
    fn use_workspace(&self, h: &CudaBlas, lane: usize) -> Result<()> {
        let Some((ws, ws_bytes)) = self.lane_workspace(lane)? else {
            return Ok(());
        };
        // SAFETY: `ws` is a device block of `ws_bytes` bytes that is never freed; the work queued
        // before this call on the device's one stream keeps the workspace it was queued with.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*h.handle(), ws as *mut _, ws_bytes)
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(self.err("cublas workspace", status));
        }
        Ok(())
    }

    /// `lane`'s cuBLAS workspace `(address, bytes)`, made on its first use; `None` without the
    /// caching allocator (no graphs, so no workspace of our own).
    fn lane_workspace(&self, lane: usize) -> Result<Option<(u64, usize)>> {
        if self.0.direct {
            return Ok(None);
        }
        let mut spaces = lock(&self.0.workspaces);
        Ok(Some(match spaces[lane] {
            Some(w) => w,
            None => {
                let w = self.alloc_block("cublas workspace", CUBLAS_WORKSPACE)?;
                spaces[lane] = Some(w);
                w
            }
        }))
    }

    /// The workspace `(address, bytes)` a cuBLASLt call queued now passes (cuBLASLt takes it per
    /// call): the current lane's cuBLAS workspace, which the two libraries share (their work runs
    /// in order on the device's one stream), so that a CUDA graph records the lane's own memory
    /// and an eager call and a recorded one pick the same algorithms; `None` without the caching
    /// allocator (then cuBLASLt runs without a workspace).
    pub(crate) fn lt_workspace(&self) -> Result<Option<(u64, usize)>> {
        self.lane_workspace(self.lane())
    }

    /// The `i`-th stream beside the device's own (made on first use), for graphs replayed
    /// together.
    pub(crate) fn side_stream(&self, i: usize) -> Result<Arc<CudaStream>> {
        let mut side = lock(&self.0.side_streams);
        while side.len() <= i {
            self.bind("side stream")?;
            let s = self
                .0
                .ctx
                .new_stream()
                .map_err(|e| self.err("side stream", e))?;
            side.push(s);
        }
        Ok(side[i].clone())
    }

    /// A typed error for a failed driver call of `op`.
    pub(crate) fn err(&self, op: &'static str, e: impl std::fmt::Debug) -> Error {
        Error::Cuda {
            op,
            device: self.device(),
            msg: format!("{e:?}"),
        }
    }

    /// Makes this device's context current on the calling thread (before raw driver calls).
    pub(crate) fn bind(&self, op: &'static str) -> Result<()> {
        self.0.ctx.bind_to_thread().map_err(|e| self.err(op, e))
    }

    /// Waits for all queued work (the time waited adds to [`host_wait_seconds`]).
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_wait_in_capture("synchronize")?;
        let t0 = std::time::Instant::now();
        let r = self
            .0
            .stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e));
        note_wait(t0);
        r
    }

    /// An error while a CUDA graph is being captured on this device: `op` would make the host
    /// wait for the GPU, which a capture cannot record.
    pub(crate) fn refuse_wait_in_capture(&self, op: &'static str) -> Result<()> {
        if self.0.capturing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid(
                op,
                "the host cannot wait for the GPU (a read-back, a large upload, a timed profile) \
                 while a CUDA graph is being captured",
            ));
        }
        Ok(())
    }

    /// Records a timing event after all the work queued so far on this device's stream; the GPU
    /// time between two of them is [`GpuEvent::elapsed_ms`] (CUDA events: no host wait).
    pub fn record_event(&self) -> Result<GpuEvent> {
        self.0
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map(GpuEvent)
            .map_err(|e| self.err("record_event", e))
    }

    /// Kernel `name` of module `src`, compiling (once per process) and loading (once per device)
    /// the module on first use.
    pub(crate) fn func(&self, src: &'static KernelSource, name: &str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.0.funcs).get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = lock(&self.0.modules);
            match mods.get(src.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = cached_ptx(src, &self.0.arch)?;
                    let m = self
                        .0
                        .ctx
                        .load_module(Ptx::from_src(ptx.as_str()))
                        .map_err(|e| {
                            // A PTX newer than the driver is the usual cause: NVRTC must not be
                            // newer than the CUDA version of the driver.
                            Error::KernelCompile {
                                module: src.name,
                                arch: self.0.arch.clone(),
                                log: format!(
                                    "the driver could not load the PTX ({e:?}); is libnvrtc newer \
                                     than the driver's CUDA version? Point LD_LIBRARY_PATH at an \
                                     NVRTC that matches the driver (e.g. /usr/local/cuda/lib64)"
                                ),
                            }
                        })?;
                    mods.insert(src.name, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).map_err(|_| {
            Error::invalid(
                "cuda",
                format!("kernel {name} is not in module {}", src.name),
            )
        })?;
        lock(&self.0.funcs).insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The cuBLAS handle of this device, bound to its stream.
    pub(crate) fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut b = lock(&self.0.blas);
        if let Some(h) = b.as_ref() {
            return Ok(h.clone());
        }
        self.bind("cublas")?;
        let h = Arc::new(CudaBlas::new(self.0.stream.clone()).map_err(|e| self.err("cublas", e))?);
        // A workspace of our own per lane, for the process's lifetime: cuBLAS then picks the
        // same algorithms whether its calls run eagerly or are recorded into a CUDA graph
        // (without one it uses no workspace while a graph is captured, and may pick others), and
        // graphs of different lanes share none (they may replay at the same time). Not without
        // the caching allocator (no graphs then; compute-sanitizer would report it as leaked).
        self.use_workspace(&h, self.lane())?;
        *b = Some(h.clone());
        Ok(h)
    }

    /// The cuBLASLt handle of this device, made on first use (cuBLASLt takes the stream and the
    /// workspace with each call: [`Self::stream`], [`Self::lt_workspace`]). Errors, instead of
    /// panicking in the loader, when libcublasLt cannot be found.
    pub(crate) fn blas_lt(&self) -> Result<Arc<BlasLt>> {
        let mut b = lock(&self.0.blas_lt);
        if let Some(h) = b.as_ref() {
            return Ok(h.clone());
        }
        // SAFETY: only tries to dlopen the library's candidate names; nothing is called.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(Error::Cuda {
                op: "cublaslt",
                device: self.device(),
                msg: "the cuBLASLt library (libcublasLt.so) was not found; add its folder to \
                      LD_LIBRARY_PATH (e.g. /usr/local/cuda/lib64)"
                    .into(),
            });
        }
        self.bind("cublaslt")?;
        let handle = lt_result::create_handle().map_err(|e| self.err("cublaslt", e))?;
        let h = Arc::new(BlasLt {
            handle,
            _stream: self.0.stream.clone(),
        });
        *b = Some(h.clone());
        Ok(h)
    }

    // ----- memory -------------------------------------------------------------------------------

    /// A buffer of at least `bytes` bytes (uninitialised), from the cache when it can; while a
    /// graph is being captured, from the graph's own pool ([`super::graph`]).
    pub(crate) fn alloc(&self, op: &'static str, bytes: usize) -> Result<CudaBuffer> {
        if let Some(pool) = self.capture_pool() {
            return pool.alloc(self, op, bytes);
        }
        let (ptr, cap) = self.alloc_block(op, bytes)?;
        Ok(CudaBuffer {
            ptr,
            bytes: cap,
            dev: self.0.clone(),
            pool: None,
        })
    }

    /// A block of at least `bytes` bytes from the cache or the driver, counted as in use:
    /// `(address, size)`.
    pub(crate) fn alloc_block(&self, op: &'static str, bytes: usize) -> Result<(u64, usize)> {
        let size = if self.0.direct {
            bytes.max(1)
        } else {
            bucket(bytes)
        };
        let mut cache = lock(&self.0.cache);
        if let Some(block) = cache.take(size).filter(|_| !self.0.direct) {
            return Ok(block);
        }
        self.bind(op)?;
        let t0 = crate::profile::enabled().then(std::time::Instant::now);
        // SAFETY: a plain allocation; the memory is only handed out as a raw device pointer.
        let ptr = match unsafe { result::malloc_sync(size) } {
            Ok(p) => p,
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                // Give the cached blocks back to the driver and try once more.
                self.synchronize()?;
                for p in cache.drain() {
                    // SAFETY: cached blocks are not in use (the stream is idle) and were
                    // allocated by malloc_sync on this context.
                    unsafe { result::free_sync(p) }.map_err(|e| self.err(op, e))?;
                }
                // SAFETY: as above.
                match unsafe { result::malloc_sync(size) } {
                    Ok(p) => p,
                    Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                        let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
                        return Err(Error::OutOfMemory {
                            op,
                            device: self.device(),
                            requested: bytes,
                            free,
                        });
                    }
                    Err(e) => return Err(self.err(op, e)),
                }
            }
            Err(e) => return Err(self.err(op, e)),
        };
        cache.note_alloc(size);
        DRIVER_ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(t0) = t0 {
            crate::profile::record("cuda cuMemAlloc (cache miss)", t0.elapsed());
        }
        Ok((ptr, size))
    }

    /// Returns a block of [`Self::alloc_block`] to the cache.
    pub(crate) fn free_block(&self, ptr: u64, size: usize) {
        lock(&self.0.cache).give_back(ptr, size);
    }

    /// The pool of the graph being captured on this device, if one is.
    pub(crate) fn capture_pool(&self) -> Option<Arc<GraphPool>> {
        if !self.0.capturing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        lock(&self.0.capture).clone()
    }

    /// Starts (`Some`) or ends (`None`) the allocations into a graph's pool.
    pub(crate) fn set_capture_pool(&self, pool: Option<Arc<GraphPool>>) {
        let mut c = lock(&self.0.capture);
        self.0
            .capturing
            .store(pool.is_some(), std::sync::atomic::Ordering::Release);
        *c = pool;
    }

    /// Whether this device is not using its caching allocator (each buffer its own driver
    /// allocation, freed with a wait on drop).
    pub(crate) fn is_direct(&self) -> bool {
        self.0.direct
    }

    /// `(current, peak)` bytes handed out by the allocator.
    pub fn memory_stats(&self) -> (usize, usize) {
        let c = lock(&self.0.cache);
        (c.current, c.peak)
    }
    /// Starts a new peak measurement from the current use.
    pub fn reset_peak(&self) {
        let mut c = lock(&self.0.cache);
        c.peak = c.current;
    }
    /// Bytes held in the allocator's free lists.
    pub fn cached_bytes(&self) -> usize {
        lock(&self.0.cache).cached
    }

    /// The launch shape for one thread per element over `n` elements (grid-stride kernels).
    pub(crate) fn grid(n: usize) -> LaunchConfig {
        const THREADS: usize = 256;
        LaunchConfig {
            grid_dim: (n.div_ceil(THREADS).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block of `threads` per row.
    pub(crate) fn rows(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A cuBLASLt handle ([`CudaDevice::blas_lt`]), destroyed when the last reference goes. It
/// keeps the device's stream (and so its context) alive until then.
pub(crate) struct BlasLt {
    handle: lt_sys::cublasLtHandle_t,
    _stream: Arc<CudaStream>,
}

// SAFETY: a cuBLASLt handle may be used from any thread (cuBLASLt keeps no per-thread state in
// it; its calls take the stream explicitly); the engine queues its calls on the device's stream.
unsafe impl Send for BlasLt {}
// SAFETY: as above; the handle is only read after creation.
unsafe impl Sync for BlasLt {}

impl BlasLt {
    pub(crate) fn handle(&self) -> lt_sys::cublasLtHandle_t {
        self.handle
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: the handle came from cublasLtCreate and is destroyed once, here; an error
        // cannot be returned from a drop.
        let _ = unsafe { lt_result::destroy_handle(self.handle) };
    }
}

/// A point in a device's stream (a CUDA event with timing), from [`CudaDevice::record_event`].
pub struct GpuEvent(CudaEvent);

impl GpuEvent {
    /// Milliseconds of GPU time from `self` to the later event `end`; waits for both.
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        self.0.elapsed_ms(&end.0).map_err(|e| Error::Cuda {
            op: "elapsed_ms",
            device: Device::Cuda(self.0.context().ordinal()),
            msg: format!("{e:?}"),
        })
    }
}

/// A device allocation that goes back to its device's cache when dropped.
pub(crate) struct CudaBuffer {
    pub(crate) ptr: u64,
    /// Size of the block (its bucket), at least what was asked.
    pub(crate) bytes: usize,
    pub(crate) dev: Arc<DeviceInner>,
    /// The graph pool the block belongs to (allocated while a graph was captured); it goes
    /// back there, not to the cache.
    pub(crate) pool: Option<Arc<GraphPool>>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give_back(self.ptr, self.bytes);
            return;
        }
        if !self.dev.direct {
            lock(&self.dev.cache).give_back(self.ptr, self.bytes);
            return;
        }
        // Queued kernels may still use the block: let them finish, then free it. Errors cannot
        // be returned from a drop; a failing stream reports at the next call that waits on it.
        let _ = self.dev.ctx.bind_to_thread();
        let _ = self.dev.stream.synchronize();
        // SAFETY: the block came from malloc_sync on this context and nothing uses it any more
        // (the stream is idle and this was its only handle).
        let _ = unsafe { result::free_sync(self.ptr) };
        lock(&self.dev.cache).note_free(self.bytes);
    }
}

/// Nanoseconds the host has waited for a GPU in [`CudaDevice::synchronize`] (every download,
/// upload too large for the staging ring, and explicit synchronisation) and for the staging
/// ring's copies when it was full, over the process.
static HOST_WAIT_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds the time since `t0`, which the host spent waiting for the GPU, to
/// [`host_wait_seconds`].
pub(crate) fn note_wait(t0: std::time::Instant) {
    let waited = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    HOST_WAIT_NS.fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
}

/// Seconds the host has spent waiting for the GPU since the process started: a training step's
/// wall time less the growth of this is the time the host was busy (issuing work, its own
/// computing).
pub fn host_wait_seconds() -> f64 {
    HOST_WAIT_NS.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

/// Driver allocations (`cuMemAlloc`: the caching allocator missed) over the process.
static DRIVER_ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times the caching allocator has asked the driver for memory since the process
/// started, on every GPU: each is a slow call that the cache exists to avoid, so a steady
/// training loop should add few.
pub fn driver_allocations() -> u64 {
    DRIVER_ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `(current, peak)` bytes of device memory held by the engine's tensors on `device` (0, 0 for
/// the CPU or a GPU not used yet).
pub fn memory_stats(device: Device) -> (usize, usize) {
    match device {
        Device::Cuda(n) => CudaDevice::existing(n).map_or((0, 0), |d| d.memory_stats()),
        Device::Cpu => (0, 0),
    }
}

/// Waits for all the work queued on `device` (nothing to wait for on the CPU or a GPU not used
/// yet): what a host timer must do before it stops the clock.
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cuda(n) => CudaDevice::existing(n).map_or(Ok(()), |d| d.synchronize()),
        Device::Cpu => Ok(()),
    }
}

/// Restarts the peak of [`memory_stats`] from the current use.
pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(n) = device {
        if let Some(d) = CudaDevice::existing(n) {
            d.reset_peak();
        }
    }
}

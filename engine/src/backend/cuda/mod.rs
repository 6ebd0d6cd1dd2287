//! The CUDA backend: cudarc (driver, NVRTC, cuBLAS), loaded at run time. One context and one
//! stream per GPU ([`CudaDevice`]), a caching allocator ([`memory_stats`]), kernel modules of
//! `mixlora-kernels` compiled by NVRTC once per process for the GPU's architecture, cuBLAS for
//! matmul. [`CudaStorage`] implements every primitive op of [`BackendStorage`] with the same
//! semantics as the CPU reference (parity tests: the `gpu` modules of tests/tests/ops/).
//!
//! Differences from the CPU backend, by design: ids and targets are not checked against their
//! range on the host (that would need a device-to-host copy per call); an out-of-range id reads
//! as zero and adds nothing, an out-of-range target gives a NaN loss. Accumulations with atomics
//! (index_add, scatter_add) add in an unspecified order.

pub mod compile;

mod alloc;
pub(crate) mod cross_entropy;
pub(crate) mod device;
pub(crate) mod dropout;
pub(crate) mod elementwise;
pub mod graph;
mod index;
pub(crate) mod launch;
pub(crate) mod layout;
pub(crate) mod matmul;
mod random;
mod reduce;
mod rms_norm;
mod rope;
mod softmax;
mod staging;

use half::bf16;

use crate::backend::cpu::CpuStorage;
use crate::backend::{BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::{DType, Device, Error, Layout, Result};

use device::CudaBuffer;
pub use device::{
    driver_allocations, host_wait_seconds, memory_stats, reset_peak_memory, synchronize,
    CudaDevice, GpuEvent,
};
pub use graph::{capture, capture_in, replay_together, CudaGraphExec, GraphMemory};

/// One flat device buffer of one dtype.
pub struct CudaStorage {
    buf: CudaBuffer,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) dev: CudaDevice,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({} x {}, cuda:{})",
            self.len,
            self.dtype,
            self.dev.ordinal()
        )
    }
}

/// A device pointer to a contiguous copy of a view: the storage itself at the view's offset when
/// the view is already contiguous, else a fresh copy held here.
pub(crate) struct Contig {
    pub ptr: u64,
    _hold: Option<CudaStorage>,
}

impl CudaStorage {
    /// An uninitialised buffer of `len` elements.
    pub(crate) fn alloc(
        dev: &CudaDevice,
        op: &'static str,
        len: usize,
        dtype: DType,
    ) -> Result<Self> {
        let buf = dev.alloc(op, len * dtype.size_in_bytes())?;
        Ok(CudaStorage {
            buf,
            len,
            dtype,
            dev: dev.clone(),
        })
    }

    pub fn cuda_device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Device address of element `i`.
    pub(crate) fn ptr_at(&self, i: usize) -> u64 {
        self.buf.ptr + (i * self.dtype.size_in_bytes()) as u64
    }
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr
    }

    /// Errors unless `other` lives on the same GPU.
    pub(crate) fn same_device(&self, op: &'static str, other: &CudaStorage) -> Result<()> {
        if self.dev.ordinal() != other.dev.ordinal() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device(),
                rhs: other.device(),
            });
        }
        Ok(())
    }

    /// The view `l` as one contiguous run of elements.
    pub(crate) fn contiguous(&self, op: &'static str, l: &Layout) -> Result<Contig> {
        if !l.is_contiguous() {
            return Contig::copy_of(self, op, l);
        }
        check_extent(op, l, self.len)?;
        Ok(Contig {
            ptr: self.ptr_at(l.offset()),
            _hold: None,
        })
    }
}

impl Contig {
    /// A fresh contiguous copy of the view `l` of `s` (its own allocation: 256-byte aligned).
    pub(crate) fn copy_of(s: &CudaStorage, op: &'static str, l: &Layout) -> Result<Contig> {
        check_extent(op, l, s.len)?;
        let c = elementwise::gather_view(s, l)?;
        Ok(Contig {
            ptr: c.ptr(),
            _hold: Some(c),
        })
    }
}

impl CudaStorage {
    /// Uploads a whole host buffer.
    pub fn from_cpu(dev: &CudaDevice, s: &CpuStorage) -> Result<Self> {
        match s {
            CpuStorage::F32(v) => upload(dev, v, DType::F32),
            CpuStorage::BF16(v) => upload(dev, v, DType::BF16),
            CpuStorage::F64(v) => upload(dev, v, DType::F64),
            CpuStorage::U32(v) => upload(dev, v, DType::U32),
        }
    }

    /// Writes a whole host buffer over elements `offset..offset + s.len()` of this one (same
    /// dtype), stream-ordered: kernels queued before it read the old values, later ones the new.
    pub fn write_from_cpu(&mut self, offset: usize, s: &CpuStorage) -> Result<()> {
        const OP: &str = "write_from_cpu";
        let dtype = crate::backend::BackendStorage::dtype(s);
        if dtype != self.dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: self.dtype,
                rhs: dtype,
            });
        }
        let n = crate::backend::BackendStorage::len(s);
        if offset + n > self.len {
            return Err(Error::invalid(
                OP,
                "the data runs past the end of the buffer",
            ));
        }
        let dst = self.ptr() + (offset * dtype.size_in_bytes()) as u64;
        match s {
            CpuStorage::F32(v) => upload_into(&self.dev, dst, v),
            CpuStorage::BF16(v) => upload_into(&self.dev, dst, v),
            CpuStorage::F64(v) => upload_into(&self.dev, dst, v),
            CpuStorage::U32(v) => upload_into(&self.dev, dst, v),
        }
    }

    /// Downloads the view `l` into a contiguous host buffer.
    pub fn to_cpu(&self, l: &Layout) -> Result<CpuStorage> {
        let c = self.contiguous("to_cpu", l)?;
        let n = l.elem_count();
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(download(&self.dev, c.ptr, n)?),
            DType::BF16 => CpuStorage::BF16(download::<bf16>(&self.dev, c.ptr, n)?),
            DType::F64 => CpuStorage::F64(download(&self.dev, c.ptr, n)?),
            DType::U32 => CpuStorage::U32(download(&self.dev, c.ptr, n)?),
        })
    }
}

/// Errors when the view reaches past the buffer.
pub(crate) fn check_extent(op: &'static str, l: &Layout, len: usize) -> Result<()> {
    if l.max_extent() > len {
        return Err(Error::invalid(op, "view exceeds its buffer"));
    }
    Ok(())
}

/// Errors on u32: the op runs on floats only.
/// Errors unless `b` and `c` share `a`'s float dtype and device.
pub(crate) fn check_float3(
    op: &'static str,
    a: &CudaStorage,
    b: &CudaStorage,
    c: &CudaStorage,
) -> Result<()> {
    for o in [b, c] {
        if o.dtype != a.dtype {
            return Err(Error::DTypeMismatch {
                op,
                lhs: a.dtype,
                rhs: o.dtype,
            });
        }
        a.same_device(op, o)?;
    }
    float_only(op, a.dtype)?;
    Ok(())
}

/// Errors unless `s` has dtype `d`.
pub(crate) fn dtype_is(op: &'static str, s: &CudaStorage, d: DType) -> Result<()> {
    if s.dtype != d {
        return Err(Error::DTypeMismatch {
            op,
            lhs: d,
            rhs: s.dtype,
        });
    }
    Ok(())
}

/// Checks the operands of a launcher with three: `x` a float, `b` of dtype `db` and `c` of
/// dtype `dc`, both on `x`'s GPU (both dtypes first, then both devices).
pub(crate) fn check3(
    op: &'static str,
    x: &CudaStorage,
    (b, db): (&CudaStorage, DType),
    (c, dc): (&CudaStorage, DType),
) -> Result<()> {
    float_only(op, x.dtype)?;
    dtype_is(op, b, db)?;
    dtype_is(op, c, dc)?;
    x.same_device(op, b)?;
    x.same_device(op, c)
}

pub(crate) fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype == DType::U32 {
        return Err(Error::UnsupportedDType { op, dtype });
    }
    Ok(())
}

fn upload<T: Copy>(dev: &CudaDevice, data: &[T], dtype: DType) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, "upload", data.len(), dtype)?;
    upload_into(dev, out.ptr(), data)?;
    Ok(out)
}

/// Copies `data` to device memory at `dst` (room for all of it), stream-ordered: through the
/// capture's pool inside a capture, the staging ring when small, else a copy waited for.
fn upload_into<T: Copy>(dev: &CudaDevice, dst: u64, data: &[T]) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let bytes = std::mem::size_of_val(data);
    // SAFETY: `data` is `bytes` initialised bytes (T is a plain number type: f32, bf16, f64,
    // u32), read as bytes only for the copy.
    let raw = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes) };
    if let Some(pool) = dev.capture_pool() {
        return pool.upload(dev, dst, raw);
    }
    if bytes <= staging::MAX_STAGED {
        return device::lock(&dev.0.staging).upload(dev, dst, raw);
    }
    dev.bind("upload")?;
    // SAFETY: `dst` has room for `bytes` bytes (the callers' allocation or bounds check); the
    // copy is queued on the device's stream and waited for before `data` can go away.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, dev.stream().cu_stream()) }
        .map_err(|e| dev.err("upload", e))?;
    dev.synchronize()
}

fn download<T: Copy + Default>(dev: &CudaDevice, ptr: u64, n: usize) -> Result<Vec<T>> {
    dev.refuse_wait_in_capture("download")?;
    let mut out = vec![T::default(); n];
    if n > 0 {
        // The wait for the work queued before, first and counted (host_wait_seconds): a copy
        // into pageable memory would wait inside the driver call, uncounted.
        dev.synchronize()?;
        dev.bind("download")?;
        // SAFETY: `ptr` points at `n` contiguous elements of `T` (a contiguous view checked
        // against its buffer); the copy is waited for before `out` is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out, ptr, dev.stream().cu_stream())
        }
        .map_err(|e| dev.err("download", e))?;
        dev.synchronize()?;
    }
    Ok(out)
}

impl BackendStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn device(&self) -> Device {
        self.dev.device()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn to_f64_vec(&self, l: &Layout) -> Result<Vec<f64>> {
        self.to_cpu(l)?
            .to_f64_vec(&Layout::contiguous(l.shape().clone()))
    }
    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        elementwise::to_dtype(self, l, dtype)
    }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        elementwise::unary(self, l, op)
    }
    fn dropout_apply(&self, l: &Layout, p: f64, seed: u64) -> Result<Self> {
        dropout::dropout_apply(self, l, p, seed)
    }
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self> {
        elementwise::binary(self, l, rhs, rhs_l, op)
    }
    fn cmp(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: CmpOp) -> Result<Self> {
        elementwise::cmp(self, l, rhs, rhs_l, op)
    }
    fn where_cond(
        &self,
        l: &Layout,
        t: &Self,
        t_l: &Layout,
        f: &Self,
        f_l: &Layout,
    ) -> Result<Self> {
        elementwise::where_cond(self, l, t, t_l, f, f_l)
    }
    fn reduce(&self, l: &Layout, dim: usize, op: ReduceOp) -> Result<Self> {
        reduce::reduce(self, l, dim, op)
    }
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self> {
        matmul::matmul(self, l, rhs, rhs_l)
    }
    fn copy_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        elementwise::copy_to_view(self, l, dst, dst_l)
    }
    fn add_to_view(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        elementwise::add_to_view(self, l, dst, dst_l)
    }
    fn index_select(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self> {
        index::index_select(self, l, ids, ids_l, dim)
    }
    fn index_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self> {
        index::index_add(self, l, ids, ids_l, src, src_l, dim)
    }
    fn gather(&self, l: &Layout, ids: &Self, ids_l: &Layout, dim: usize) -> Result<Self> {
        index::gather(self, l, ids, ids_l, dim)
    }
    fn scatter_add(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        src: &Self,
        src_l: &Layout,
        dim: usize,
    ) -> Result<Self> {
        index::scatter_add(self, l, ids, ids_l, src, src_l, dim)
    }
    fn topk_indices(&self, l: &Layout, k: usize) -> Result<Self> {
        index::topk_indices(self, l, k)
    }
    fn softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        softmax::softmax(self, l, false)
    }
    fn log_softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        softmax::softmax(self, l, true)
    }
    fn rms_norm(&self, l: &Layout, w: &Self, w_l: &Layout, eps: f64) -> Result<Self> {
        rms_norm::rms_norm(self, l, w, w_l, eps)
    }
    fn rms_norm_backward(
        &self,
        l: &Layout,
        w: &Self,
        w_l: &Layout,
        g: &Self,
        g_l: &Layout,
        eps: f64,
        need_dw: bool,
    ) -> Result<(Self, Option<Self>)> {
        rms_norm::rms_norm_backward(self, l, w, w_l, g, g_l, eps, need_dw)
    }
    fn rope(
        &self,
        l: &Layout,
        cos: &Self,
        cos_l: &Layout,
        sin: &Self,
        sin_l: &Layout,
        seq_dim: usize,
    ) -> Result<Self> {
        rope::rope(self, l, cos, cos_l, sin, sin_l, seq_dim)
    }
    fn cross_entropy(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self> {
        cross_entropy::cross_entropy(self, l, targets, t_l, ignore_index)
    }
    fn cross_entropy_backward(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        grad_rows: &Self,
        g_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self> {
        cross_entropy::cross_entropy_backward(self, l, targets, t_l, grad_rows, g_l, ignore_index)
    }
    fn causal_softmax(
        &self,
        l: &Layout,
        scale: f64,
        q_offset: usize,
        key_mask: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        softmax::causal_softmax(self, l, scale, q_offset, key_mask)
    }
    fn softmax_backward(&self, l: &Layout, g: &Self, g_l: &Layout, scale: f64) -> Result<Self> {
        softmax::softmax_backward(self, l, g, g_l, scale)
    }
}

//! The CUDA backend: cudarc (driver, NVRTC, cuBLAS), loaded at run time. One context and one
//! stream per GPU ([`CudaDevice`]), a caching allocator ([`memory_stats`]), kernel modules of
//! `mixlora-kernels` compiled by NVRTC once per process for the GPU's architecture, cuBLAS for
//! matmul. [`CudaStorage`] implements every primitive op of [`BackendStorage`] with the same
//! semantics as the CPU reference (parity tests: tests/tests/cuda_parity.rs).
//!
//! Differences from the CPU backend, by design: ids and targets are not checked against their
//! range on the host (that would need a device-to-host copy per call); an out-of-range id reads
//! as zero and adds nothing, an out-of-range target gives a NaN loss. Accumulations with atomics
//! (index_add, scatter_add) add in an unspecified order.

pub mod compile;

mod alloc;
mod attention;
pub(crate) mod device;
pub(crate) mod elementwise;
mod index;
pub(crate) mod launch;
pub(crate) mod layout;
mod loss;
mod loss_chunk;
pub(crate) mod matmul;
mod moe;
mod norm;
mod optim;
pub(crate) mod random;
mod reduce;

use half::bf16;

use crate::backend::cpu::CpuStorage;
use crate::backend::{AdamWGroup, AdamWHyper, BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::{DType, Device, Error, Layout, Result};

use device::CudaBuffer;
pub use device::{memory_stats, reset_peak_memory, synchronize, CudaDevice, GpuEvent};

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
pub(crate) fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype == DType::U32 {
        return Err(Error::UnsupportedDType { op, dtype });
    }
    Ok(())
}

fn upload<T: Copy>(dev: &CudaDevice, data: &[T], dtype: DType) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, "upload", data.len(), dtype)?;
    if !data.is_empty() {
        dev.bind("upload")?;
        // SAFETY: `out` holds at least `data.len()` elements of `T` (same byte size as `dtype`);
        // the copy is queued on the device's stream and waited for before `data` can go away.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(out.ptr(), data, dev.stream().cu_stream())
        }
        .map_err(|e| dev.err("upload", e))?;
        dev.synchronize()?;
    }
    Ok(out)
}

fn download<T: Copy + Default>(dev: &CudaDevice, ptr: u64, n: usize) -> Result<Vec<T>> {
    let mut out = vec![T::default(); n];
    if n > 0 {
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

/// The error of an op this backend does not run yet.
#[allow(dead_code)]
pub(crate) fn not_implemented(op: &'static str, dev: &CudaDevice) -> Error {
    Error::NotImplemented {
        op,
        device: dev.device(),
    }
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
        random::dropout_apply(self, l, p, seed)
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
        reduce::softmax(self, l, false)
    }
    fn log_softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        reduce::softmax(self, l, true)
    }
    fn rms_norm(&self, l: &Layout, w: &Self, w_l: &Layout, eps: f64) -> Result<Self> {
        norm::rms_norm(self, l, w, w_l, eps)
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
        norm::rms_norm_backward(self, l, w, w_l, g, g_l, eps, need_dw)
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
        norm::rope(self, l, cos, cos_l, sin, sin_l, seq_dim)
    }
    fn cross_entropy(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        ignore_index: u32,
    ) -> Result<Self> {
        loss::cross_entropy(self, l, targets, t_l, ignore_index)
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
        loss::cross_entropy_backward(self, l, targets, t_l, grad_rows, g_l, ignore_index)
    }
    fn causal_softmax(
        &self,
        l: &Layout,
        scale: f64,
        q_offset: usize,
        key_mask: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        attention::causal_softmax(self, l, scale, q_offset, key_mask)
    }
    fn softmax_backward(&self, l: &Layout, g: &Self, g_l: &Layout, scale: f64) -> Result<Self> {
        attention::softmax_backward(self, l, g, g_l, scale)
    }
    fn moe_route_topk(&self, l: &Layout, k: usize) -> Result<(Self, Self, Self)> {
        moe::route_topk(self, l, k)
    }
    fn moe_route_topk_backward(
        &self,
        l: &Layout,
        ids: &Self,
        ids_l: &Layout,
        gw: &Self,
        gw_l: &Layout,
        num_experts: usize,
    ) -> Result<Self> {
        moe::route_topk_backward(self, l, ids, ids_l, gw, gw_l, num_experts)
    }
    fn moe_group(&self, l: &Layout, num_experts: usize) -> Result<(Self, Self)> {
        moe::group(self, l, num_experts)
    }
    fn moe_invert_perm(&self, l: &Layout) -> Result<Self> {
        moe::invert_perm(self, l)
    }
    fn moe_permute(
        &self,
        l: &Layout,
        perm: &Self,
        perm_l: &Layout,
        k: usize,
        scale: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        moe::permute(self, l, perm, perm_l, k, scale)
    }
    fn moe_combine(
        &self,
        l: &Layout,
        inv: &Self,
        inv_l: &Layout,
        w: &Self,
        w_l: &Layout,
    ) -> Result<Self> {
        moe::combine(self, l, inv, inv_l, w, w_l)
    }
    fn moe_combine_dw(
        &self,
        l: &Layout,
        inv: &Self,
        inv_l: &Layout,
        g: &Self,
        g_l: &Layout,
        k: usize,
    ) -> Result<Self> {
        moe::combine_dw(self, l, inv, inv_l, g, g_l, k)
    }
    fn grouped_matmul(
        &self,
        l: &Layout,
        w: &Self,
        w_l: &Layout,
        offsets: &Self,
        off_l: &Layout,
        trans_w: bool,
    ) -> Result<Self> {
        moe::grouped_matmul(self, l, w, w_l, offsets, off_l, trans_w)
    }
    fn grouped_matmul_dw(
        &self,
        l: &Layout,
        x: &Self,
        x_l: &Layout,
        offsets: &Self,
        off_l: &Layout,
        num_experts: usize,
    ) -> Result<Self> {
        moe::grouped_matmul_dw(self, l, x, x_l, offsets, off_l, num_experts)
    }
    fn adamw_step(groups: &mut [AdamWGroup<'_, Self>], h: &AdamWHyper) -> Result<()> {
        optim::adamw_step(groups, h)
    }
    fn sum_squares_multi(args: &[(&Self, &Layout)]) -> Result<f64> {
        optim::sum_squares_multi(args)
    }
    fn cross_entropy_chunk_update(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        state: &mut Self,
        v0: usize,
        v_total: usize,
        ignore_index: u32,
    ) -> Result<()> {
        loss_chunk::cross_entropy_chunk_update(
            self,
            l,
            targets,
            t_l,
            state,
            v0,
            v_total,
            ignore_index,
        )
    }
    fn cross_entropy_chunk_backward(
        &self,
        l: &Layout,
        targets: &Self,
        t_l: &Layout,
        lse: &Self,
        lse_l: &Layout,
        grad_rows: &Self,
        g_l: &Layout,
        v0: usize,
        ignore_index: u32,
    ) -> Result<Self> {
        loss_chunk::cross_entropy_chunk_backward(
            self,
            l,
            targets,
            t_l,
            lse,
            lse_l,
            grad_rows,
            g_l,
            v0,
            ignore_index,
        )
    }
}

//! `Storage`: the buffer behind a tensor, one variant per backend. It implements
//! [`BackendStorage`] by dispatching to the backend that holds both operands.

use crate::backend::cpu::{CpuDevice, CpuStorage};
#[cfg(feature = "cuda")]
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::backend::{BackendDevice, BackendStorage, BinaryOp, CmpOp, ReduceOp, UnaryOp};
use crate::{DType, Device, Error, Layout, Result, Shape};

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(CudaStorage),
}

fn mismatch(op: &'static str, a: &Storage, b: &Storage) -> Error {
    Error::DeviceMismatch {
        op,
        lhs: a.device(),
        rhs: b.device(),
    }
}

/// Runs `$e` with `$d` bound to the backend device of `$device`, wrapping the storage it makes.
macro_rules! on_device {
    ($device:expr, $d:ident => $e:expr) => {
        match $device {
            Device::Cpu => {
                let $d = CpuDevice;
                Ok(Storage::Cpu($e?))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let $d = CudaDevice::get(n)?;
                Ok(Storage::Cuda($e?))
            }
            #[allow(unreachable_patterns)]
            d => Err(no_backend(d)),
        }
    };
}

impl Storage {
    pub fn zeros(device: Device, shape: &Shape, dtype: DType) -> Result<Self> {
        Self::full(device, shape, dtype, 0.0)
    }
    /// A contiguous buffer of `shape` that the caller overwrites entirely before reading it
    /// (`BackendDevice::for_overwrite`): no fill on the GPU.
    pub fn for_overwrite(device: Device, shape: &Shape, dtype: DType) -> Result<Self> {
        on_device!(device, d => d.for_overwrite(shape, dtype))
    }
    pub fn full(device: Device, shape: &Shape, dtype: DType, v: f64) -> Result<Self> {
        on_device!(device, d => d.full(shape, dtype, v))
    }
    pub fn upload_f64(device: Device, data: &[f64], dtype: DType) -> Result<Self> {
        on_device!(device, d => d.upload_f64(data, dtype))
    }
    pub fn from_cpu(device: Device, s: CpuStorage) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(s)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Ok(Storage::Cuda(CudaStorage::from_cpu(
                &CudaDevice::get(n)?,
                &s,
            )?)),
            #[allow(unreachable_patterns)]
            d => Err(no_backend(d)),
        }
    }
    /// Writes the host buffer `src` over elements `offset..offset + src.len()` of this storage
    /// (same dtype), in place.
    pub fn write_host(&mut self, offset: usize, src: &CpuStorage) -> Result<()> {
        match self {
            Storage::Cpu(d) => d.write_at(offset, src),
            #[cfg(feature = "cuda")]
            Storage::Cuda(d) => d.write_from_cpu(offset, src),
        }
    }
    pub fn randn(
        device: Device,
        shape: &Shape,
        dtype: DType,
        mean: f64,
        std: f64,
        seed: u64,
    ) -> Result<Self> {
        on_device!(device, d => d.randn(shape, dtype, mean, std, seed))
    }
    pub fn rand_uniform(
        device: Device,
        shape: &Shape,
        dtype: DType,
        lo: f64,
        hi: f64,
        seed: u64,
    ) -> Result<Self> {
        on_device!(device, d => d.rand_uniform(shape, dtype, lo, hi, seed))
    }
    pub fn dropout_mask(
        device: Device,
        shape: &Shape,
        dtype: DType,
        p: f64,
        seed: u64,
    ) -> Result<Self> {
        on_device!(device, d => d.dropout_mask(shape, dtype, p, seed))
    }
    /// The host copy of a CPU storage (None on other devices).
    pub fn as_cpu(&self) -> Option<&CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }
    pub(crate) fn as_cpu_mut(&mut self) -> Option<&mut CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }
    #[cfg(feature = "cuda")]
    pub(crate) fn as_cuda(&self) -> Option<&CudaStorage> {
        match self {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }
    #[cfg(feature = "cuda")]
    pub(crate) fn as_cuda_mut(&mut self) -> Option<&mut CudaStorage> {
        match self {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    /// A contiguous copy of the view `l` on `device` (host <-> GPU, or GPU to GPU through the
    /// host).
    pub fn to_device(&self, l: &Layout, device: Device) -> Result<Self> {
        let host = match self {
            Storage::Cpu(s) => s.to_dtype(l, s.dtype())?,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_cpu(l)?,
        };
        Self::from_cpu(device, host)
    }
}

fn no_backend(device: Device) -> Error {
    Error::DeviceUnavailable {
        op: "storage",
        device,
        msg: "this build has no CUDA backend; use --device cpu".into(),
    }
}

macro_rules! one {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Storage::Cpu($s) => Ok(Storage::Cpu($e?)),
            #[cfg(feature = "cuda")]
            Storage::Cuda($s) => Ok(Storage::Cuda($e?)),
        }
    };
}

macro_rules! two {
    ($op:literal, $self:ident, $rhs:ident, ($a:ident, $b:ident) => $e:expr) => {
        #[allow(unreachable_patterns)]
        match ($self, $rhs) {
            (Storage::Cpu($a), Storage::Cpu($b)) => Ok(Storage::Cpu($e?)),
            #[cfg(feature = "cuda")]
            (Storage::Cuda($a), Storage::Cuda($b)) => Ok(Storage::Cuda($e?)),
            _ => Err(mismatch($op, $self, $rhs)),
        }
    };
}

/// Like `two!` for ops with three storage operands.
macro_rules! three {
    ($op:literal, $x:ident, $y:ident, $z:ident, ($a:ident, $b:ident, $c:ident) => $e:expr) => {
        #[allow(unreachable_patterns)]
        match ($x, $y, $z) {
            (Storage::Cpu($a), Storage::Cpu($b), Storage::Cpu($c)) => Ok(Storage::Cpu($e?)),
            #[cfg(feature = "cuda")]
            (Storage::Cuda($a), Storage::Cuda($b), Storage::Cuda($c)) => Ok(Storage::Cuda($e?)),
            (a, b, _) if a.device() != b.device() => Err(mismatch($op, a, b)),
            (a, _, c) => Err(mismatch($op, a, c)),
        }
    };
}

impl BackendStorage for Storage {
    fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }
    fn device(&self) -> Device {
        match self {
            Storage::Cpu(s) => s.device(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        }
    }
    fn to_f64_vec(&self, l: &Layout) -> Result<Vec<f64>> {
        match self {
            Storage::Cpu(s) => s.to_f64_vec(l),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_f64_vec(l),
        }
    }
    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        one!(self, s => s.to_dtype(l, dtype))
    }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        one!(self, s => s.unary(l, op))
    }
    fn dropout_apply(&self, l: &Layout, p: f64, seed: u64) -> Result<Self> {
        one!(self, s => s.dropout_apply(l, p, seed))
    }
    fn binary(&self, l: &Layout, rhs: &Self, rl: &Layout, op: BinaryOp) -> Result<Self> {
        two!("binary", self, rhs, (a, b) => a.binary(l, b, rl, op))
    }
    fn cmp(&self, l: &Layout, rhs: &Self, rl: &Layout, op: CmpOp) -> Result<Self> {
        two!("cmp", self, rhs, (a, b) => a.cmp(l, b, rl, op))
    }
    fn where_cond(&self, l: &Layout, t: &Self, tl: &Layout, f: &Self, fl: &Layout) -> Result<Self> {
        three!("where_cond", self, t, f, (c, t, f) => c.where_cond(l, t, tl, f, fl))
    }
    fn reduce(&self, l: &Layout, dim: usize, op: ReduceOp) -> Result<Self> {
        one!(self, s => s.reduce(l, dim, op))
    }
    fn matmul(&self, l: &Layout, rhs: &Self, rl: &Layout) -> Result<Self> {
        two!("matmul", self, rhs, (a, b) => a.matmul(l, b, rl))
    }
    fn copy_to_view(&self, l: &Layout, dst: &mut Self, dl: &Layout) -> Result<()> {
        let (sd, dd) = (self.device(), dst.device());
        #[allow(unreachable_patterns)]
        match (self, dst) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.copy_to_view(l, b, dl),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.copy_to_view(l, b, dl),
            _ => Err(Error::DeviceMismatch {
                op: "copy_to_view",
                lhs: sd,
                rhs: dd,
            }),
        }
    }
    fn add_to_view(&self, l: &Layout, dst: &mut Self, dl: &Layout) -> Result<()> {
        let (sd, dd) = (self.device(), dst.device());
        #[allow(unreachable_patterns)]
        match (self, dst) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.add_to_view(l, b, dl),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.add_to_view(l, b, dl),
            _ => Err(Error::DeviceMismatch {
                op: "add_to_view",
                lhs: sd,
                rhs: dd,
            }),
        }
    }
    fn index_select(&self, l: &Layout, ids: &Self, il: &Layout, dim: usize) -> Result<Self> {
        two!("index_select", self, ids, (a, b) => a.index_select(l, b, il, dim))
    }
    fn index_add(
        &self,
        l: &Layout,
        ids: &Self,
        il: &Layout,
        src: &Self,
        sl: &Layout,
        dim: usize,
    ) -> Result<Self> {
        three!("index_add", self, ids, src, (a, i, s) => a.index_add(l, i, il, s, sl, dim))
    }
    fn gather(&self, l: &Layout, ids: &Self, il: &Layout, dim: usize) -> Result<Self> {
        two!("gather", self, ids, (a, b) => a.gather(l, b, il, dim))
    }
    fn scatter_add(
        &self,
        l: &Layout,
        ids: &Self,
        il: &Layout,
        src: &Self,
        sl: &Layout,
        dim: usize,
    ) -> Result<Self> {
        three!("scatter_add", self, ids, src, (a, i, s) => a.scatter_add(l, i, il, s, sl, dim))
    }
    fn topk_indices(&self, l: &Layout, k: usize) -> Result<Self> {
        one!(self, s => s.topk_indices(l, k))
    }
    fn softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        one!(self, s => s.softmax_last_dim(l))
    }
    fn log_softmax_last_dim(&self, l: &Layout) -> Result<Self> {
        one!(self, s => s.log_softmax_last_dim(l))
    }
    fn rms_norm(&self, l: &Layout, w: &Self, wl: &Layout, eps: f64) -> Result<Self> {
        two!("rms_norm", self, w, (a, b) => a.rms_norm(l, b, wl, eps))
    }
    fn rms_norm_backward(
        &self,
        l: &Layout,
        w: &Self,
        wl: &Layout,
        g: &Self,
        gl: &Layout,
        eps: f64,
        need_dw: bool,
    ) -> Result<(Self, Option<Self>)> {
        #[allow(unreachable_patterns)]
        match (self, w, g) {
            (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(g)) => {
                let (dx, dw) = x.rms_norm_backward(l, w, wl, g, gl, eps, need_dw)?;
                Ok((Storage::Cpu(dx), dw.map(Storage::Cpu)))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(w), Storage::Cuda(g)) => {
                let (dx, dw) = x.rms_norm_backward(l, w, wl, g, gl, eps, need_dw)?;
                Ok((Storage::Cuda(dx), dw.map(Storage::Cuda)))
            }
            _ => Err(mismatch("rms_norm_backward", self, g)),
        }
    }
    fn rope(
        &self,
        l: &Layout,
        cos: &Self,
        cl: &Layout,
        sin: &Self,
        sl: &Layout,
        seq_dim: usize,
    ) -> Result<Self> {
        three!("rope", self, cos, sin, (x, c, s) => x.rope(l, c, cl, s, sl, seq_dim))
    }
    fn cross_entropy(&self, l: &Layout, t: &Self, tl: &Layout, ignore: u32) -> Result<Self> {
        two!("cross_entropy", self, t, (a, b) => a.cross_entropy(l, b, tl, ignore))
    }
    fn cross_entropy_backward(
        &self,
        l: &Layout,
        t: &Self,
        tl: &Layout,
        g: &Self,
        gl: &Layout,
        ignore: u32,
    ) -> Result<Self> {
        three!("cross_entropy_backward", self, t, g, (x, t, g) => x.cross_entropy_backward(l, t, tl, g, gl, ignore))
    }
    fn causal_softmax(
        &self,
        l: &Layout,
        scale: f64,
        q_offset: usize,
        key_mask: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        #[allow(unreachable_patterns)]
        match (self, key_mask) {
            (Storage::Cpu(x), None) => {
                Ok(Storage::Cpu(x.causal_softmax(l, scale, q_offset, None)?))
            }
            (Storage::Cpu(x), Some((Storage::Cpu(m), ml))) => Ok(Storage::Cpu(x.causal_softmax(
                l,
                scale,
                q_offset,
                Some((m, ml)),
            )?)),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), None) => {
                Ok(Storage::Cuda(x.causal_softmax(l, scale, q_offset, None)?))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Some((Storage::Cuda(m), ml))) => Ok(Storage::Cuda(
                x.causal_softmax(l, scale, q_offset, Some((m, ml)))?,
            )),
            (_, Some((m, _))) => Err(mismatch("causal_softmax", self, m)),
        }
    }
    fn softmax_backward(&self, l: &Layout, g: &Self, gl: &Layout, scale: f64) -> Result<Self> {
        two!("softmax_backward", self, g, (y, g) => y.softmax_backward(l, g, gl, scale))
    }
}

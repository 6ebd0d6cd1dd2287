//! `Storage`: the buffer behind a tensor, one variant per backend. It implements
//! [`BackendStorage`] by dispatching to the backend that holds both operands.

use crate::backend::cpu::{CpuDevice, CpuStorage};
#[cfg(feature = "cuda")]
use crate::backend::cuda::{CudaDevice, CudaStorage};
use crate::backend::{
    AdamWGroup, AdamWHyper, AdamWSlot, BackendDevice, BackendStorage, BinaryOp, CmpOp, ReduceOp,
    UnaryOp,
};
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
    fn as_cpu_mut(&mut self) -> Option<&mut CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }
    #[cfg(feature = "cuda")]
    fn as_cuda(&self) -> Option<&CudaStorage> {
        match self {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }
    #[cfg(feature = "cuda")]
    fn as_cuda_mut(&mut self) -> Option<&mut CudaStorage> {
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

/// The first of a list of `(storage, layout)` operands (`None` for an empty list), after checking
/// that they all live on its device.
fn one_device<'a>(
    op: &'static str,
    args: &[(&'a Storage, &Layout)],
) -> Result<Option<&'a Storage>> {
    let Some(&(first, _)) = args.first() else {
        return Ok(None);
    };
    if let Some(other) = args.iter().find(|x| x.0.device() != first.device()) {
        return Err(mismatch(op, first, other.0));
    }
    Ok(Some(first))
}

/// The operands that are CPU storages (all of them, after [`one_device`] on a CPU operand).
fn cpu_args<'a>(args: &[(&'a Storage, &'a Layout)]) -> Vec<(&'a CpuStorage, &'a Layout)> {
    args.iter()
        .filter_map(|(s, l)| s.as_cpu().map(|c| (c, *l)))
        .collect()
}

/// The operands that are CUDA storages (all of them, after [`one_device`] on a CUDA operand).
#[cfg(feature = "cuda")]
fn cuda_args<'a>(args: &[(&'a Storage, &'a Layout)]) -> Vec<(&'a CudaStorage, &'a Layout)> {
    args.iter()
        .filter_map(|(s, l)| match s {
            Storage::Cuda(c) => Some((c, *l)),
            _ => None,
        })
        .collect()
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
    fn moe_route_topk(&self, l: &Layout, k: usize) -> Result<(Self, Self, Self)> {
        match self {
            Storage::Cpu(s) => {
                let (p, i, w) = s.moe_route_topk(l, k)?;
                Ok((Storage::Cpu(p), Storage::Cpu(i), Storage::Cpu(w)))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let (p, i, w) = s.moe_route_topk(l, k)?;
                Ok((Storage::Cuda(p), Storage::Cuda(i), Storage::Cuda(w)))
            }
        }
    }
    fn moe_route_topk_backward(
        &self,
        l: &Layout,
        ids: &Self,
        il: &Layout,
        gw: &Self,
        gl: &Layout,
        e: usize,
    ) -> Result<Self> {
        three!("moe_route_topk_backward", self, ids, gw, (w, i, g) => w.moe_route_topk_backward(l, i, il, g, gl, e))
    }
    fn moe_group(&self, l: &Layout, e: usize) -> Result<(Self, Self)> {
        match self {
            Storage::Cpu(s) => {
                let (p, o) = s.moe_group(l, e)?;
                Ok((Storage::Cpu(p), Storage::Cpu(o)))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let (p, o) = s.moe_group(l, e)?;
                Ok((Storage::Cuda(p), Storage::Cuda(o)))
            }
        }
    }
    fn moe_invert_perm(&self, l: &Layout) -> Result<Self> {
        one!(self, s => s.moe_invert_perm(l))
    }
    fn moe_permute(
        &self,
        l: &Layout,
        perm: &Self,
        pl: &Layout,
        k: usize,
        scale: Option<(&Self, &Layout)>,
    ) -> Result<Self> {
        #[allow(unreachable_patterns)]
        match (self, perm, scale) {
            (Storage::Cpu(x), Storage::Cpu(p), None) => {
                Ok(Storage::Cpu(x.moe_permute(l, p, pl, k, None)?))
            }
            (Storage::Cpu(x), Storage::Cpu(p), Some((Storage::Cpu(s), sl))) => {
                Ok(Storage::Cpu(x.moe_permute(l, p, pl, k, Some((s, sl)))?))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(p), None) => {
                Ok(Storage::Cuda(x.moe_permute(l, p, pl, k, None)?))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(p), Some((Storage::Cuda(s), sl))) => {
                Ok(Storage::Cuda(x.moe_permute(l, p, pl, k, Some((s, sl)))?))
            }
            (x, p, _) if x.device() != p.device() => Err(mismatch("moe_permute", x, p)),
            (x, _, Some((s, _))) => Err(mismatch("moe_permute", x, s)),
            (x, p, None) => Err(mismatch("moe_permute", x, p)),
        }
    }
    fn moe_combine(
        &self,
        l: &Layout,
        inv: &Self,
        il: &Layout,
        w: &Self,
        wl: &Layout,
    ) -> Result<Self> {
        three!("moe_combine", self, inv, w, (y, i, w) => y.moe_combine(l, i, il, w, wl))
    }
    fn moe_combine_dw(
        &self,
        l: &Layout,
        inv: &Self,
        il: &Layout,
        g: &Self,
        gl: &Layout,
        k: usize,
    ) -> Result<Self> {
        three!("moe_combine_dw", self, inv, g, (y, i, g) => y.moe_combine_dw(l, i, il, g, gl, k))
    }
    fn grouped_matmul(
        &self,
        l: &Layout,
        w: &Self,
        wl: &Layout,
        off: &Self,
        ol: &Layout,
        trans_w: bool,
    ) -> Result<Self> {
        three!("grouped_matmul", self, w, off, (x, w, o) => x.grouped_matmul(l, w, wl, o, ol, trans_w))
    }
    fn grouped_matmul_dw(
        &self,
        l: &Layout,
        x: &Self,
        xl: &Layout,
        off: &Self,
        ol: &Layout,
        e: usize,
    ) -> Result<Self> {
        three!("grouped_matmul_dw", self, x, off, (g, x, o) => g.grouped_matmul_dw(l, x, xl, o, ol, e))
    }
    fn sum_squares_multi(args: &[(&Self, &Layout)]) -> Result<f64> {
        let Some(first) = one_device("sum_squares_multi", args)? else {
            return Ok(0.0);
        };
        match first {
            Storage::Cpu(_) => CpuStorage::sum_squares_multi(&cpu_args(args)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => CudaStorage::sum_squares_multi(&cuda_args(args)),
        }
    }
    fn adamw_step(groups: &mut [AdamWGroup<'_, Self>], h: &AdamWHyper) -> Result<()> {
        const OP: &str = "adamw_step";
        let Some(first) = groups.first() else {
            return Ok(());
        };
        let dev = first.param.device();
        for g in groups.iter() {
            let slots = g.slots.iter();
            let others = slots.flat_map(|s| [&*s.exp_avg, &*s.exp_avg_sq, s.grad]);
            for other in std::iter::once(&*g.param).chain(others) {
                if other.device() != dev {
                    return Err(Error::DeviceMismatch {
                        op: OP,
                        lhs: dev,
                        rhs: other.device(),
                    });
                }
            }
        }
        match dev {
            Device::Cpu => CpuStorage::adamw_step(
                &mut backend_groups(groups, Storage::as_cpu_mut, Storage::as_cpu)?,
                h,
            ),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => CudaStorage::adamw_step(
                &mut backend_groups(groups, Storage::as_cuda_mut, Storage::as_cuda)?,
                h,
            ),
            #[allow(unreachable_patterns)]
            d => Err(no_backend(d)),
        }
    }
    fn cross_entropy_chunk_update(
        &self,
        l: &Layout,
        t: &Self,
        tl: &Layout,
        state: &mut Self,
        v0: usize,
        v_total: usize,
        ignore: u32,
    ) -> Result<()> {
        let (xd, sd) = (self.device(), state.device());
        #[allow(unreachable_patterns)]
        match (self, t, state) {
            (Storage::Cpu(x), Storage::Cpu(t), Storage::Cpu(s)) => {
                x.cross_entropy_chunk_update(l, t, tl, s, v0, v_total, ignore)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(t), Storage::Cuda(s)) => {
                x.cross_entropy_chunk_update(l, t, tl, s, v0, v_total, ignore)
            }
            (x, t, _) if x.device() != t.device() => {
                Err(mismatch("cross_entropy_chunk_update", x, t))
            }
            _ => Err(Error::DeviceMismatch {
                op: "cross_entropy_chunk_update",
                lhs: xd,
                rhs: sd,
            }),
        }
    }
    fn cross_entropy_chunk_backward(
        &self,
        l: &Layout,
        t: &Self,
        tl: &Layout,
        lse: &Self,
        lse_l: &Layout,
        g: &Self,
        gl: &Layout,
        v0: usize,
        ignore: u32,
    ) -> Result<Self> {
        const OP: &str = "cross_entropy_chunk_backward";
        #[allow(unreachable_patterns)]
        match (self, t, lse, g) {
            (Storage::Cpu(x), Storage::Cpu(t), Storage::Cpu(s), Storage::Cpu(g)) => {
                Ok(Storage::Cpu(x.cross_entropy_chunk_backward(
                    l, t, tl, s, lse_l, g, gl, v0, ignore,
                )?))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(t), Storage::Cuda(s), Storage::Cuda(g)) => {
                Ok(Storage::Cuda(x.cross_entropy_chunk_backward(
                    l, t, tl, s, lse_l, g, gl, v0, ignore,
                )?))
            }
            (x, t, s, g) => {
                let other = [t, s, g]
                    .into_iter()
                    .find(|o| o.device() != x.device())
                    .unwrap_or(t);
                Err(mismatch(OP, x, other))
            }
        }
    }
}

/// The AdamW groups of one backend's storages (`adamw_step` checked that every storage lives on
/// one device), or an error when one of them is of another backend.
fn backend_groups<'s, S>(
    groups: &'s mut [AdamWGroup<'_, Storage>],
    of_mut: impl Fn(&mut Storage) -> Option<&mut S>,
    of: impl Fn(&Storage) -> Option<&S>,
) -> Result<Vec<AdamWGroup<'s, S>>> {
    let mixed = || Error::invalid("adamw_step", "storages on different backends");
    let mut out = Vec::with_capacity(groups.len());
    for g in groups.iter_mut() {
        let param = of_mut(&mut *g.param).ok_or_else(mixed)?;
        let mut slots = Vec::with_capacity(g.slots.len());
        for s in g.slots.iter_mut() {
            slots.push(AdamWSlot {
                param_offset: s.param_offset,
                exp_avg: of_mut(&mut *s.exp_avg).ok_or_else(mixed)?,
                exp_avg_offset: s.exp_avg_offset,
                exp_avg_sq: of_mut(&mut *s.exp_avg_sq).ok_or_else(mixed)?,
                exp_avg_sq_offset: s.exp_avg_sq_offset,
                grad: of(s.grad).ok_or_else(mixed)?,
                grad_offset: s.grad_offset,
                len: s.len,
            });
        }
        out.push(AdamWGroup { param, slots });
    }
    Ok(out)
}

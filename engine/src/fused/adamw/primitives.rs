//! The AdamW unit's backend primitives: the groups and slots of the multi-tensor step (each
//! written in place) and the operands of the multi-tensor sum of squares, and their dispatch to
//! the CPU reference (`cpu.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! The step's operands are not a fixed list of named ones but as many parameters as the model
//! has, grouped by the buffer they live in: [`AdamWGroup`] (a parameter buffer, written) and its
//! [`AdamWSlot`]s (element runs of that buffer, with their moments, written, and gradient, read).
//! [`step`] checks that every storage lives on one device and converts the groups to that
//! backend's storages (`backend_groups`), keeping each mutable borrow exclusive.

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use super::AdamWHyper;
use crate::backend::cpu::CpuStorage;
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaStorage;
use crate::backend::BackendStorage;
use crate::fused::{no_backend, one_device, Operand, OperandField};
use crate::{DType, Device, Error, Result, Storage};

/// The parameters of a fused AdamW step that live in one buffer `param` (f32, bf16 or f64), one
/// slot each: a single tensor, or views of one stacked buffer (a MixLoRA layer's expert LoRAs).
/// The slots' runs of `param` never overlap.
pub struct AdamWGroup<'a, S> {
    pub param: &'a mut S,
    pub slots: Vec<AdamWSlot<'a, S>>,
}

/// One parameter of a fused AdamW step: contiguous runs of `len` elements starting at the given
/// element offsets of its group's parameter buffer, its moments and its gradient. The moments are
/// f32 (f64 for f64 parameters) and belong to this slot alone; the gradient has the parameter's
/// dtype (slots may read one gradient buffer).
pub struct AdamWSlot<'a, S> {
    pub param_offset: usize,
    pub exp_avg: &'a mut S,
    pub exp_avg_offset: usize,
    pub exp_avg_sq: &'a mut S,
    pub exp_avg_sq_offset: usize,
    pub grad: &'a S,
    pub grad_offset: usize,
    pub len: usize,
}

/// One fused AdamW step over every slot of every group, in place: each slot's parameter and
/// moments are read and written once. Moments are f32 (f64 for f64 parameters); the grad has the
/// parameter's dtype. The CPU spreads the elements over threads, the CUDA backend runs one kernel
/// launch for all slots.
///
/// `scale`: `None`, or one f64 element on the same device that replaces `h.grad_scale`, read
/// where it lives (on a GPU by the kernel: the host never waits for it); when it is not finite
/// the step changes nothing.
pub fn step(
    groups: &mut [AdamWGroup<'_, Storage>],
    h: &AdamWHyper,
    scale: Option<Operand<'_, Storage>>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let Some(first) = groups.first() else {
        return Ok(());
    };
    let dev = first.param.device();
    if let Some(s) = &scale {
        if s.s.device() != dev {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: dev,
                rhs: s.s.device(),
            });
        }
        if s.s.dtype() != DType::F64 || s.l.elem_count() != 1 {
            return Err(Error::invalid(
                OP,
                "the gradient scale is not one f64 element",
            ));
        }
    }
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
        Device::Cpu => {
            let mut h = *h;
            if let Some(s) = scale {
                h.grad_scale = match s.cpu(OP)?.s {
                    CpuStorage::F64(v) => v[s.l.offset()],
                    _ => return Err(Error::invalid(OP, "the gradient scale is not f64")),
                };
                if !h.grad_scale.is_finite() {
                    return Ok(());
                }
            }
            let mut groups = backend_groups(groups, Storage::as_cpu_mut, Storage::as_cpu)?;
            crate::profile::timed(|| OP.into(), || cpu::adamw_step(&mut groups, &h))
        }
        #[cfg(feature = "cuda")]
        dev @ Device::Cuda(_) => {
            let at = match scale {
                Some(s) => Some(s.cuda(OP, dev)?.s.ptr_at(s.l.offset())),
                None => None,
            };
            cuda::adamw_step(
                &mut backend_groups(groups, Storage::as_cuda_mut, Storage::as_cuda)?,
                h,
                at,
            )
        }
        #[allow(unreachable_patterns)]
        d => Err(no_backend(OP, d)),
    }
}

/// `Σ_t Σ_i t[i]²` over every tensor (any float dtype, any view, one device), accumulated in f64
/// in chunks of 4096 elements per tensor whose sums are added in order (deterministic), returned
/// on the host; 0 for no tensor. The CUDA backend runs one kernel launch for all tensors.
pub fn sum_squares(tensors: &[Operand<'_, Storage>]) -> Result<f64> {
    const OP: &str = "sum_squares_multi";
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let devices: Vec<Option<Device>> = tensors.iter().map(OperandField::device).collect();
    match one_device(OP, &devices)? {
        Device::Cpu => {
            let ts: Vec<Operand<'_, CpuStorage>> =
                tensors.iter().map(|t| t.cpu(OP)).collect::<Result<_>>()?;
            crate::profile::timed(|| OP.into(), || cpu::sum_squares_multi(&ts))
        }
        #[cfg(feature = "cuda")]
        dev @ Device::Cuda(_) => {
            let ts: Vec<Operand<'_, CudaStorage>> = tensors
                .iter()
                .map(|t| t.cuda(OP, dev))
                .collect::<Result<_>>()?;
            cuda::sum_squares_multi(&ts)
        }
        #[allow(unreachable_patterns)]
        d => Err(no_backend(OP, d)),
    }
}

/// `[norm, factor]` of [`super::clip_norm_factor`] for `tensors` on `device`, as a storage of two
/// f64 there: on the CPU from [`sum_squares`]' value, on a GPU computed by kernels and never
/// read back.
pub fn clip_factor(
    tensors: &[Operand<'_, Storage>],
    max_norm: f64,
    device: Device,
) -> Result<Storage> {
    const OP: &str = "clip_norm_factor";
    let devices: Vec<Option<Device>> = tensors.iter().map(OperandField::device).collect();
    if !tensors.is_empty() {
        let dev = one_device(OP, &devices)?;
        if dev != device {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: device,
                rhs: dev,
            });
        }
    }
    match device {
        Device::Cpu => {
            let norm = sum_squares(tensors)?.sqrt();
            let factor = super::clip_factor_of(norm, max_norm);
            Ok(Storage::Cpu(CpuStorage::F64(vec![norm, factor])))
        }
        #[cfg(feature = "cuda")]
        dev @ Device::Cuda(n) => {
            let ts: Vec<Operand<'_, CudaStorage>> = tensors
                .iter()
                .map(|t| t.cuda(OP, dev))
                .collect::<Result<_>>()?;
            let cuda = crate::backend::cuda::CudaDevice::get(n)?;
            Ok(Storage::Cuda(cuda::clip_factor(&cuda, &ts, max_norm)?))
        }
        #[allow(unreachable_patterns)]
        d => Err(no_backend(OP, d)),
    }
}

/// Adds each `(offset, src)` of `parts` into the contiguous run of `dst` that starts at element
/// `start + offset` (`src`'s element count long, in `src`'s row-major order), in place; the runs
/// never overlap ([`super::add_many_into`] checked them). The CPU adds part by part, the CUDA
/// backend runs one kernel launch for all of them.
pub fn add_many_into(
    dst: &mut Storage,
    start: usize,
    parts: &[(usize, Operand<'_, Storage>)],
) -> Result<()> {
    const OP: &str = "add_many_into";
    let dev = dst.device();
    for (_, p) in parts {
        if p.s.device() != dev {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: dev,
                rhs: p.s.device(),
            });
        }
    }
    match dev {
        Device::Cpu => {
            let parts: Vec<(usize, Operand<'_, CpuStorage>)> = parts
                .iter()
                .map(|&(o, p)| Ok((o, p.cpu(OP)?)))
                .collect::<Result<_>>()?;
            let dst = dst
                .as_cpu_mut()
                .ok_or_else(|| Error::invalid(OP, "storages on different backends"))?;
            crate::profile::timed(|| OP.into(), || cpu::add_many_into(dst, start, &parts))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let parts: Vec<(usize, Operand<'_, CudaStorage>)> = parts
                .iter()
                .map(|&(o, p)| Ok((o, p.cuda(OP, dev)?)))
                .collect::<Result<_>>()?;
            let dst = dst
                .as_cuda_mut()
                .ok_or_else(|| Error::invalid(OP, "storages on different backends"))?;
            cuda::add_many_into(dst, start, &parts)
        }
        #[allow(unreachable_patterns)]
        d => Err(no_backend(OP, d)),
    }
}

/// The AdamW groups of one backend's storages ([`step`] checked that every storage lives on one
/// device), or an error when one of them is of another backend.
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

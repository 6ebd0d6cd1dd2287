//! The AdamW unit: the fused multi-tensor AdamW step ([`adamw_step`]: every parameter, both of
//! its moments and its gradient in one backend call, on CUDA one kernel launch for all of them,
//! updated in place), the multi-tensor sum of squares of the gradient norm
//! ([`sum_of_squares`]) and the multi-tensor add that sums gradients into one buffer
//! ([`add_many_into`]).
//!
//! Files: the groups and slots of the step, the dispatch and the typed conversion of the groups to
//! one backend's storages (`primitives.rs`), the CPU reference (`cpu.rs`), the CUDA launchers
//! (`cuda.rs`) over the kernels of `kernels/src/adamw.cu`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

use std::collections::{HashMap, HashSet};

use self::primitives::{self as prim, AdamWGroup, AdamWSlot};
use crate::autograd::no_grad;
use crate::fused::Operand;
use crate::{Device, Error, Result, Storage, Tensor};

/// One AdamW step (PyTorch's `AdamW`: decoupled weight decay, bias correction with `h.step`, the
/// gradient multiplied by `h.grad_scale` first) over all `params` at once, in place:
/// ```text
/// g = grad · grad_scale
/// p ← p · (1 − lr·wd)
/// m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
/// p ← p − lr/(1 − β1ᵗ) · m / (√(v/(1 − β2ᵗ)) + ε)
/// ```
/// `exp_avg[i]` and `exp_avg_sq[i]` are the moments of `params[i]`: same shape, dtype
/// [`DType::accumulation`] of the parameter. Parameters are f32, bf16 (math in f32, the new value
/// rounded once) or f64; parameters whose `grad()` is `None` are left alone (no decay, no moment
/// update). Parameters and moments must be contiguous and on one device. Parameters may be views
/// of one buffer whose elements do not overlap (the experts' stacked LoRAs of a MixLoRA layer,
/// see [`Tensor::unstack_leaves`]): each is updated in place in that buffer. No moment shares a
/// buffer with anything else. Records nothing on the tape.
pub fn adamw_step(
    params: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
    h: &AdamWHyper,
) -> Result<()> {
    step_checked(params, exp_avg, exp_avg_sq, h, None)
}

/// [`adamw_step`] with the gradient scale read from `scale` (one f64 element, on the parameters'
/// device) in place of `h.grad_scale`: on a GPU the kernel reads it, so a factor that
/// [`clip_norm_factor`] left there is applied without the host waiting for it. When the value
/// is not finite (the gradient norm was NaN or infinite) the step changes nothing: no parameter,
/// no moment.
pub fn adamw_step_scaled(
    params: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
    h: &AdamWHyper,
    scale: &Tensor,
) -> Result<()> {
    step_checked(params, exp_avg, exp_avg_sq, h, Some(scale))
}

/// Checks the step's operands, then runs it (nothing to do when no parameter has a gradient).
fn step_checked(
    params: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
    h: &AdamWHyper,
    scale: Option<&Tensor>,
) -> Result<()> {
    check_counts(params, exp_avg, exp_avg_sq)?;
    let work = checked_work(params, exp_avg, exp_avg_sq)?;
    if work.is_empty() {
        return Ok(());
    }
    step_locked(&work, h, scale)
}

/// The global L2 norm of `tensors` and the factor by which PyTorch's `clip_grad_norm_` scales
/// them, computed on `device` (where the tensors live) without reading anything back: an f64
/// tensor `[2]` there holding `[norm, factor]`. `norm` is `sum_of_squares(tensors).sqrt()` bit
/// for bit; `factor` is `max_norm / (norm + 1e-6)` when `max_norm > 0` and `norm > max_norm`,
/// else 1, and NaN when the norm is not finite, so that [`adamw_step_scaled`] skips the step.
/// Records nothing on the tape.
pub fn clip_norm_factor(tensors: &[&Tensor], max_norm: f64, device: Device) -> Result<Tensor> {
    let s = with_operands(tensors, |args| prim::clip_factor(args, max_norm, device))?;
    Ok(Tensor::from_storage(s, crate::Shape::from([2]), None))
}

/// The clipping factor of a gradient norm (see [`clip_norm_factor`]).
pub(crate) fn clip_factor_of(norm: f64, max_norm: f64) -> f64 {
    if !norm.is_finite() {
        f64::NAN
    } else if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Errors unless every parameter has both moments.
fn check_counts(params: &[Tensor], exp_avg: &[Tensor], exp_avg_sq: &[Tensor]) -> Result<()> {
    if params.len() != exp_avg.len() || params.len() != exp_avg_sq.len() {
        return Err(Error::invalid(
            "adamw_step",
            format!(
                "{} parameters, {} first moments, {} second moments",
                params.len(),
                exp_avg.len(),
                exp_avg_sq.len()
            ),
        ));
    }
    Ok(())
}

/// `(param, m, v, grad)` of every parameter that has a gradient (the gradient contiguous, of the
/// parameter's dtype), after checking every parameter and moment and how they share buffers.
fn checked_work(
    params: &[Tensor],
    exp_avg: &[Tensor],
    exp_avg_sq: &[Tensor],
) -> Result<Vec<[Tensor; 4]>> {
    const OP: &str = "adamw_step";
    let mut work: Vec<[Tensor; 4]> = Vec::with_capacity(params.len());
    let mut moment_buffers = HashSet::new();
    // The element ranges of the parameters in each parameter buffer.
    let mut param_runs: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for ((p, m), v) in params.iter().zip(exp_avg).zip(exp_avg_sq) {
        check_param(p, m, v, params[0].device())?;
        for t in [m, v] {
            if !moment_buffers.insert(t.storage_key()) {
                return Err(shared(t));
            }
        }
        param_runs
            .entry(p.storage_key())
            .or_default()
            .push((p.layout().offset(), p.elem_count()));
        let Some(g) = p.grad() else { continue };
        if g.shape() != p.shape() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: p.shape().clone(),
                rhs: g.shape().clone(),
            });
        }
        // The kernels read a contiguous gradient of the parameter's dtype.
        let g = no_grad(|| g.to_dtype(p.dtype())?.contiguous())?;
        work.push([p.clone(), m.clone(), v.clone(), g]);
    }
    // Views of one parameter buffer must not overlap (each element is updated once), and a
    // moment never lives in a parameter's buffer.
    for (key, runs) in &mut param_runs {
        runs.sort_unstable();
        if runs.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) || moment_buffers.contains(key) {
            let p = params.iter().find(|p| p.storage_key() == *key);
            return Err(p.map_or_else(|| Error::invalid(OP, "overlapping parameters"), shared));
        }
    }
    // A gradient never shares a buffer with what is written (it is read while they are locked).
    if work.iter().any(|w| {
        let k = w[3].storage_key();
        moment_buffers.contains(&k) || param_runs.contains_key(&k)
    }) {
        return Err(Error::invalid(
            OP,
            "a gradient shares its buffer with a parameter or moment",
        ));
    }
    Ok(work)
}

/// Checks a parameter `p` (a float) and its moments `m`, `v` (its shape, its accumulation dtype):
/// all contiguous and on `device`.
fn check_param(p: &Tensor, m: &Tensor, v: &Tensor, device: Device) -> Result<()> {
    const OP: &str = "adamw_step";
    if !p.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op: OP,
            dtype: p.dtype(),
        });
    }
    let md = p.dtype().accumulation();
    for t in [m, v] {
        if t.shape() != p.shape() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: p.shape().clone(),
                rhs: t.shape().clone(),
            });
        }
        if t.dtype() != md {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: md,
                rhs: t.dtype(),
            });
        }
    }
    for t in [p, m, v] {
        if t.device() != device {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: device,
                rhs: t.device(),
            });
        }
        if !t.is_contiguous() {
            return Err(Error::invalid(
                OP,
                format!(
                    "a parameter or moment of shape {} is not contiguous",
                    t.shape()
                ),
            ));
        }
    }
    Ok(())
}

/// Locks the buffers of the checked `work` (each parameter buffer and each moment written, each
/// distinct gradient buffer read, once), describes them as [`AdamWGroup`]s and runs the step.
fn step_locked(work: &[[Tensor; 4]], h: &AdamWHyper, scale: Option<&Tensor>) -> Result<()> {
    const OP: &str = "adamw_step";
    // One group per parameter buffer (in order of first appearance), so that each buffer is
    // locked once; each distinct gradient buffer is read-locked once too.
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        let next = members.len();
        let gi = *group_of.entry(w[0].storage_key()).or_insert(next);
        if gi == next {
            members.push(Vec::new());
        }
        members[gi].push(i);
    }
    let mut grad_of: HashMap<usize, usize> = HashMap::new();
    let mut grad_owner: Vec<usize> = Vec::new(); // a work entry per distinct gradient buffer
    let grad_index: Vec<usize> = work
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let next = grad_owner.len();
            let gi = *grad_of.entry(w[3].storage_key()).or_insert(next);
            if gi == next {
                grad_owner.push(i);
            }
            gi
        })
        .collect();
    let offset = |t: &Tensor| t.layout().offset();
    let mut pw: Vec<_> = members
        .iter()
        .map(|g| work[g[0]][0].storage_mut())
        .collect();
    let mut mw: Vec<_> = work.iter().map(|w| w[1].storage_mut()).collect();
    let mut vw: Vec<_> = work.iter().map(|w| w[2].storage_mut()).collect();
    let gr: Vec<_> = grad_owner.iter().map(|&i| work[i][3].storage()).collect();
    let mut mv: Vec<Option<(&mut Storage, &mut Storage)>> = mw
        .iter_mut()
        .zip(vw.iter_mut())
        .map(|(m, v)| Some((&mut **m, &mut **v)))
        .collect();
    let mut groups: Vec<AdamWGroup<'_, Storage>> = Vec::with_capacity(members.len());
    for (p, idx) in pw.iter_mut().zip(&members) {
        let mut slots = Vec::with_capacity(idx.len());
        for &i in idx {
            let w = &work[i];
            let Some((m, v)) = mv[i].take() else {
                return Err(Error::invalid(OP, "a parameter is listed twice"));
            };
            slots.push(AdamWSlot {
                param_offset: offset(&w[0]),
                exp_avg: m,
                exp_avg_offset: offset(&w[1]),
                exp_avg_sq: v,
                exp_avg_sq_offset: offset(&w[2]),
                grad: &*gr[grad_index[i]],
                grad_offset: offset(&w[3]),
                len: w[0].elem_count(),
            });
        }
        groups.push(AdamWGroup {
            param: &mut **p,
            slots,
        });
    }
    let scale_guard = scale.map(|t| t.storage());
    let scale_arg = scale_guard
        .as_ref()
        .zip(scale)
        .map(|(g, t)| Operand::new(g, t.layout()));
    prim::step(&mut groups, h, scale_arg)
}

/// The error for a parameter or moment `t` that shares its buffer where it may not.
fn shared(t: &Tensor) -> Error {
    Error::invalid(
        "adamw_step",
        format!(
            "a parameter or moment of shape {} shares its buffer with another",
            t.shape()
        ),
    )
}

/// `Σ_t Σ_i t[i]²` over `tensors` (f32, bf16 or f64, any views, one device), on the host in
/// f64: one backend call (one kernel launch on CUDA, whatever the number of tensors), the same
/// result on every run. The squared global norm of a list of gradients. Records nothing on the
/// tape.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    with_operands(tensors, prim::sum_squares)
}

/// Runs `f` on the tensors as read-locked operands.
fn with_operands<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[Operand<'_, Storage>]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage()).collect();
    let args: Vec<Operand<'_, Storage>> = guards
        .iter()
        .zip(tensors)
        .map(|(g, t)| Operand::new(g, t.layout()))
        .collect();
    f(&args)
}

/// Adds each `(offset, src)` of `parts` into `dst` in place: `src`'s elements, in row-major
/// order, onto `dst`'s contiguous run of elements `offset..offset + src.elem_count()` (counted in
/// `dst`'s row-major order), computed as `add` computes them (bf16 in f32, rounded once), so the
/// result equals an [`Tensor::add_assign`] per part bit for bit. Sums many gradients into one
/// flat buffer: one backend call, on CUDA one kernel launch whatever the number of parts.
/// `dst` is contiguous; every `src` has its dtype (f32, bf16 or f64), lies on its device, and
/// does not share its buffer; the runs stay inside `dst` and never overlap. Records nothing on
/// the tape.
pub fn add_many_into(dst: &Tensor, parts: &[(usize, &Tensor)]) -> Result<()> {
    const OP: &str = "add_many_into";
    let Some((start, end)) = dst.layout().contiguous_range() else {
        return Err(Error::invalid(OP, "the destination is not contiguous"));
    };
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(parts.len());
    for &(offset, src) in parts {
        if src.dtype() != dst.dtype() {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: dst.dtype(),
                rhs: src.dtype(),
            });
        }
        if !dst.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: dst.dtype(),
            });
        }
        let run_end = offset + src.elem_count();
        if start + run_end > end {
            return Err(Error::invalid(
                OP,
                format!(
                    "a part of {} elements at offset {offset} runs past the destination's {}",
                    src.elem_count(),
                    end - start
                ),
            ));
        }
        if src.same_storage(dst) {
            return Err(Error::invalid(OP, "a part shares the destination's buffer"));
        }
        runs.push((offset, run_end));
    }
    runs.sort_unstable();
    if runs.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(Error::invalid(OP, "two parts' runs overlap"));
    }
    let guards: Vec<_> = parts.iter().map(|(_, t)| t.storage()).collect();
    let args: Vec<(usize, Operand<'_, Storage>)> = guards
        .iter()
        .zip(parts)
        .map(|(g, &(o, t))| (o, Operand::new(g, t.layout())))
        .collect();
    prim::add_many_into(&mut dst.storage_mut(), start, &args)
}

/// Hyper-parameters of one AdamW step (PyTorch's `AdamW`, decoupled weight decay). `step` is the
/// 1-based count used for bias correction; the gradient is multiplied by `grad_scale` first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_scale: f64,
    pub step: u64,
}

/// The constants of one AdamW step, in the order the update uses them (every backend rounds these
/// f64 values to its math dtype and applies them in the same order, so that f32 results agree
/// with the tensor-op formulation bit for bit on the CPU):
/// ```text
/// g  = grad · scale
/// m  = m · b1 + g · (1 − b1)            v = v · b2 + g² · (1 − b2)
/// p  = p · decay − (m / (√(v · inv_bc2) + eps)) · step_size
/// decay = 1 − lr·wd, inv_bc2 = 1 / (1 − b2ᵗ), step_size = lr / (1 − b1ᵗ)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWCoefficients {
    pub scale: f64,
    pub b1: f64,
    pub one_minus_b1: f64,
    pub b2: f64,
    pub one_minus_b2: f64,
    pub inv_bc2: f64,
    pub eps: f64,
    pub decay: f64,
    pub step_size: f64,
}

impl AdamWHyper {
    pub fn coefficients(&self) -> AdamWCoefficients {
        let t = self.step.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        AdamWCoefficients {
            scale: self.grad_scale,
            b1: self.beta1,
            one_minus_b1: 1.0 - self.beta1,
            b2: self.beta2,
            one_minus_b2: 1.0 - self.beta2,
            inv_bc2: 1.0 / bc2,
            eps: self.eps,
            decay: 1.0 - self.lr * self.weight_decay,
            step_size: self.lr / bc1,
        }
    }
}

//! The fused AdamW step on the CPU: every parameter's elements in chunks spread over threads,
//! each element read and written once (parameter, both moments), the gradient read once.
//!
//! The update follows [`AdamWCoefficients`] operation by operation in the math dtype (f32 for f32
//! and bf16 parameters, f64 for f64), so its results equal those of the same formula written as
//! engine tensor ops bit for bit.

use half::bf16;
use num_traits::Float;
use rayon::prelude::*;

use super::CpuStorage;
use crate::backend::{AdamWCoefficients, AdamWHyper, AdamWSlot, BackendStorage};
use crate::{DType, Error, Result};

/// Elements per task.
const CHUNK: usize = 1 << 14;

/// The coefficients rounded to the math dtype `T`.
#[derive(Clone, Copy)]
struct Coef<T> {
    scale: T,
    b1: T,
    one_minus_b1: T,
    b2: T,
    one_minus_b2: T,
    inv_bc2: T,
    eps: T,
    decay: T,
    step_size: T,
}

impl<T: Float> Coef<T> {
    fn new(k: &AdamWCoefficients) -> Self {
        let c = |x: f64| T::from(x).unwrap_or_else(T::nan);
        Coef {
            scale: c(k.scale),
            b1: c(k.b1),
            one_minus_b1: c(k.one_minus_b1),
            b2: c(k.b2),
            one_minus_b2: c(k.one_minus_b2),
            inv_bc2: c(k.inv_bc2),
            eps: c(k.eps),
            decay: c(k.decay),
            step_size: c(k.step_size),
        }
    }
}

/// One element: returns the new `(p, m, v)`. Each product is written `x·a + 0` because the
/// tensor-op formulation goes through `affine(a, 0)`, whose `+ 0` turns `−0` into `+0`.
#[inline(always)]
fn update<T: Float>(p: T, m: T, v: T, g: T, k: &Coef<T>) -> (T, T, T) {
    let z = T::zero();
    let g = g * k.scale + z;
    let m = (m * k.b1 + z) + (g * k.one_minus_b1 + z);
    let v = (v * k.b2 + z) + ((g * g) * k.one_minus_b2 + z);
    let denom = (v * k.inv_bc2 + z).sqrt() + k.eps;
    let p = (p * k.decay + z) - ((m / denom) * k.step_size + z);
    (p, m, v)
}

/// A parameter element and its math dtype `T`: widened on read, rounded once on write.
trait Elem<T>: Copy + Send + Sync {
    fn widen(self) -> T;
    fn narrow(x: T) -> Self;
}
impl Elem<f32> for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
}
impl Elem<f32> for bf16 {
    fn widen(self) -> f32 {
        f32::from(self)
    }
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Elem<f64> for f64 {
    fn widen(self) -> f64 {
        self
    }
    fn narrow(x: f64) -> Self {
        x
    }
}

/// One task's slices: `((p, m), v), g`.
type Task<'a, P, T> = (((&'a mut [P], &'a mut [T]), &'a mut [T]), &'a [P]);

/// Updates `p`, `m`, `v` with the gradient `g` (the parameter's element type).
fn run<P: Elem<T>, T: Float + Send + Sync>(
    p: &mut [P],
    m: &mut [T],
    v: &mut [T],
    g: &[P],
    k: &Coef<T>,
) {
    let body = |(((p, m), v), g): Task<'_, P, T>| {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let (np, nm, nv) = update(p.widen(), *m, *v, g.widen(), k);
            *p = P::narrow(np);
            *m = nm;
            *v = nv;
        }
    };
    if p.len() <= CHUNK {
        body((((p, m), v), g));
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(body);
}

/// `buf[off..off + len]`, or an error naming the op when it does not fit.
fn range(
    op: &'static str,
    buf_len: usize,
    off: usize,
    len: usize,
) -> Result<std::ops::Range<usize>> {
    match off.checked_add(len) {
        Some(end) if end <= buf_len => Ok(off..end),
        _ => Err(Error::invalid(op, "view exceeds its buffer")),
    }
}

fn one_slot(s: &mut AdamWSlot<'_, CpuStorage>, h: &AdamWCoefficients) -> Result<()> {
    const OP: &str = "adamw_step";
    let n = s.len;
    let pr = range(OP, s.param.len(), s.param_offset, n)?;
    let mr = range(OP, s.exp_avg.len(), s.exp_avg_offset, n)?;
    let vr = range(OP, s.exp_avg_sq.len(), s.exp_avg_sq_offset, n)?;
    let gr = range(OP, s.grad.len(), s.grad_offset, n)?;
    let pd = s.param.dtype();
    let bad = |d: DType| Error::DTypeMismatch {
        op: OP,
        lhs: pd,
        rhs: d,
    };
    match (&mut *s.param, &mut *s.exp_avg, &mut *s.exp_avg_sq, s.grad) {
        (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v), CpuStorage::F32(g)) => {
            let k = Coef::<f32>::new(h);
            run(&mut p[pr], &mut m[mr], &mut v[vr], &g[gr], &k);
        }
        (CpuStorage::BF16(p), CpuStorage::F32(m), CpuStorage::F32(v), CpuStorage::BF16(g)) => {
            let k = Coef::<f32>::new(h);
            run(&mut p[pr], &mut m[mr], &mut v[vr], &g[gr], &k);
        }
        (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v), CpuStorage::F64(g)) => {
            let k = Coef::<f64>::new(h);
            run(&mut p[pr], &mut m[mr], &mut v[vr], &g[gr], &k);
        }
        (CpuStorage::U32(_), ..) => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: DType::U32,
            })
        }
        (_, m, v, g) => {
            let want = if pd == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let wrong = [m.dtype(), v.dtype()]
                .into_iter()
                .find(|&d| d != want)
                .unwrap_or(g.dtype());
            return Err(bad(wrong));
        }
    }
    Ok(())
}

pub(super) fn adamw_step(slots: &mut [AdamWSlot<'_, CpuStorage>], h: &AdamWHyper) -> Result<()> {
    let k = h.coefficients();
    // Small parameters are many: one task per slot, and large ones split further inside `run`.
    slots.par_iter_mut().try_for_each(|s| one_slot(s, &k))
}

/// Elements per partial sum of [`sum_squares_multi`] (`SQ_CHUNK` in optim.cu).
const SQ_CHUNK: usize = 4096;

/// `Σ t[i]²` over every tensor, in f64: per tensor, partial sums over chunks of 4096 elements
/// (threads split the chunks), added in order, as the CUDA kernel does.
pub(crate) fn sum_squares_multi(args: &[(&CpuStorage, &crate::Layout)]) -> Result<f64> {
    const OP: &str = "sum_squares_multi";
    let mut total = 0.0f64;
    for &(s, l) in args {
        let v: Vec<f64> = match s {
            CpuStorage::F64(d) => CpuStorage::gather_view(d, l),
            CpuStorage::F32(_) | CpuStorage::BF16(_) => {
                s.view_f32(OP, l)?.into_iter().map(f64::from).collect()
            }
            other => {
                return Err(Error::UnsupportedDType {
                    op: OP,
                    dtype: other.dtype(),
                })
            }
        };
        let parts: Vec<f64> = v
            .par_chunks(SQ_CHUNK)
            .map(|c| c.iter().map(|x| x * x).sum::<f64>())
            .collect();
        for p in parts {
            total += p;
        }
    }
    Ok(total)
}

//! The AdamW unit's primitives on the CPU, the reference: the fused step, every parameter's
//! elements in chunks spread over threads, each element read and written once (parameter, both
//! moments), the gradient read once; and the multi-tensor sum of squares.
//!
//! The update follows [`AdamWCoefficients`] operation by operation in the math dtype (f32 for f32
//! and bf16 parameters, f64 for f64), so its results equal those of the same formula written as
//! engine tensor ops bit for bit.

use half::bf16;
use num_traits::Float;
use rayon::prelude::*;

use super::primitives::{AdamWGroup, AdamWSlot};
use super::{AdamWCoefficients, AdamWHyper};
use crate::backend::cpu::CpuStorage;
use crate::backend::BackendStorage;
use crate::fused::Operand;
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

/// Typed slices of a CPU buffer.
trait Typed: Sized {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! typed {
    ($t:ty, $variant:ident) => {
        impl Typed for $t {
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
typed!(f32, F32);
typed!(bf16, BF16);
typed!(f64, F64);

/// One parameter's slices `(p, m, v, g)`, in one of the supported dtype combinations.
enum Job<'a> {
    F32(&'a mut [f32], &'a mut [f32], &'a mut [f32], &'a [f32]),
    Bf16(&'a mut [bf16], &'a mut [f32], &'a mut [f32], &'a [bf16]),
    F64(&'a mut [f64], &'a mut [f64], &'a mut [f64], &'a [f64]),
}

/// A [`Job`] variant: its constructor from the slices `(p, m, v, g)`.
type MakeJob<'a, P, T> = fn(&'a mut [P], &'a mut [T], &'a mut [T], &'a [P]) -> Job<'a>;

/// `buf` cut into the runs `(offset, len)`, returned in the order given, or an error when one
/// exceeds the buffer or two overlap.
fn split_runs<'a, T>(buf: &'a mut [T], runs: &[(usize, usize)]) -> Result<Vec<&'a mut [T]>> {
    const OP: &str = "adamw_step";
    let total = buf.len();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by_key(|&i| runs[i].0);
    let mut out: Vec<&'a mut [T]> = runs.iter().map(|_| Default::default()).collect();
    let (mut rest, mut pos) = (buf, 0); // `rest` starts at element `pos` of `buf`
    for i in order {
        let (off, len) = runs[i];
        range(OP, total, off, len)?;
        if off < pos {
            return Err(Error::invalid(OP, "two parameters overlap in their buffer"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - pos);
        let (mine, tail) = tail.split_at_mut(len);
        out[i] = mine;
        (rest, pos) = (tail, off + len);
    }
    Ok(out)
}

/// The jobs of the slots of one parameter buffer `param` (element type `P`, moments `T`); `job`
/// is the [`Job`] variant of that combination.
fn group_jobs<'a, P: Typed, T: Typed>(
    param: &'a mut [P],
    slots: &'a mut [AdamWSlot<'_, CpuStorage>],
    pd: DType,
    job: MakeJob<'a, P, T>,
    jobs: &mut Vec<Job<'a>>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let runs: Vec<(usize, usize)> = slots.iter().map(|s| (s.param_offset, s.len)).collect();
    let parts = split_runs(param, &runs)?;
    for (p, s) in parts.into_iter().zip(slots.iter_mut()) {
        let n = s.len;
        let mr = range(OP, s.exp_avg.len(), s.exp_avg_offset, n)?;
        let vr = range(OP, s.exp_avg_sq.len(), s.exp_avg_sq_offset, n)?;
        let gr = range(OP, s.grad.len(), s.grad_offset, n)?;
        let bad = |d: DType| Error::DTypeMismatch {
            op: OP,
            lhs: pd,
            rhs: d,
        };
        let (md, vd, gd) = (s.exp_avg.dtype(), s.exp_avg_sq.dtype(), s.grad.dtype());
        let m = T::slice_mut(&mut *s.exp_avg).ok_or_else(|| bad(md))?;
        let v = T::slice_mut(&mut *s.exp_avg_sq).ok_or_else(|| bad(vd))?;
        let g = P::slice(s.grad).ok_or_else(|| bad(gd))?;
        jobs.push(job(p, &mut m[mr], &mut v[vr], &g[gr]));
    }
    Ok(())
}

pub(super) fn adamw_step(groups: &mut [AdamWGroup<'_, CpuStorage>], h: &AdamWHyper) -> Result<()> {
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for g in groups.iter_mut() {
        let pd = g.param.dtype();
        match &mut *g.param {
            CpuStorage::F32(p) => group_jobs(p, &mut g.slots, pd, Job::F32, &mut jobs)?,
            CpuStorage::BF16(p) => group_jobs(p, &mut g.slots, pd, Job::Bf16, &mut jobs)?,
            CpuStorage::F64(p) => group_jobs(p, &mut g.slots, pd, Job::F64, &mut jobs)?,
            CpuStorage::U32(_) => {
                return Err(Error::UnsupportedDType {
                    op: "adamw_step",
                    dtype: DType::U32,
                })
            }
        }
    }
    let k = h.coefficients();
    let (k32, k64) = (Coef::<f32>::new(&k), Coef::<f64>::new(&k));
    // Small parameters are many: one task per parameter, and large ones split further in `run`.
    jobs.into_par_iter().for_each(|j| match j {
        Job::F32(p, m, v, g) => run(p, m, v, g, &k32),
        Job::Bf16(p, m, v, g) => run(p, m, v, g, &k32),
        Job::F64(p, m, v, g) => run(p, m, v, g, &k64),
    });
    Ok(())
}

/// Elements per partial sum of [`sum_squares_multi`] (`SQ_CHUNK` in adamw.cu).
const SQ_CHUNK: usize = 4096;

/// `Σ t[i]²` over every tensor, in f64: per tensor, partial sums over chunks of 4096 elements
/// (threads split the chunks), added in order, as the CUDA kernel does.
pub(super) fn sum_squares_multi(args: &[Operand<'_, CpuStorage>]) -> Result<f64> {
    const OP: &str = "sum_squares_multi";
    let mut total = 0.0f64;
    for &Operand { s, l } in args {
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

/// Adds each part's view into the run of `dst` that starts at element `start + offset`, through
/// the backend's in-place add (one rounding, as `add`).
pub(super) fn add_many_into(
    dst: &mut CpuStorage,
    start: usize,
    parts: &[(usize, Operand<'_, CpuStorage>)],
) -> Result<()> {
    for &(offset, Operand { s, l }) in parts {
        let run = crate::Layout::contiguous(l.shape().clone());
        let dl = crate::Layout::new(l.shape().clone(), run.strides().to_vec(), start + offset);
        s.add_to_view(l, dst, &dl)?;
    }
    Ok(())
}

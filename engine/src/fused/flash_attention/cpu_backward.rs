//! Flash attention's backward on the CPU: one rayon task per (batch row, kv head), which owns
//! the gradients of its keys and values and of its group's query heads, so no two tasks write
//! one element. Per key block, for each query head of the group and each query block that can
//! see it, the probabilities are recomputed from the saved log-sum-exp:
//!
//! ```text
//!   P  = exp(scale·q kᵀ − lse)      (0 where invisible)       [nq, nk]
//!   dV += Pᵀ dO
//!   dP = dO vᵀ
//!   dS = scale · P ∘ (dP − D),  D = rowsum(dO ∘ O)              [nq, nk]
//!   dQ += dS k,   dK += dSᵀ q
//! ```

use rayon::prelude::*;

use super::cpu::{mask_vec, mm, Acc, Heads, Visibility, BK, BQ};
use super::primitives::{Dims, FlashBackward, FlashParams};
use crate::backend::cpu::simd::vectorized;
use crate::backend::cpu::CpuStorage;
use crate::{DType, Error, Result};

/// The saved tensors and the incoming gradient, in the compute dtype.
struct Saved<T> {
    x: Heads<T>,
    out: Vec<T>,  // [b, hq, t, d]
    grad: Vec<T>, // [b, hq, t, d]
    lse: Vec<T>,  // [b, hq, t]
}

/// The gradients of one task: `dq` `[g, t, d]` of the group's query heads, `dk`, `dv` `[s, d]`.
struct TaskGrads<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// One task: batch row `bi`, kv head `kvh`.
fn backward_task<T: Acc>(
    dm: &Dims,
    sv: &Saved<T>,
    vis: &Visibility<'_>,
    scale: T,
    (bi, kvh): (usize, usize),
) -> TaskGrads<T> {
    let Dims {
        hq, hkv, t, s, d, ..
    } = *dm;
    let g = dm.group();
    let head = |h: usize| (bi * hq + h) * t; // first row of query head h
    let kh = &sv.x.k[(bi * hkv + kvh) * s * d..][..s * d]; // [s, d]
    let vh = &sv.x.v[(bi * hkv + kvh) * s * d..][..s * d]; // [s, d]
                                                           // D = rowsum(dO ∘ O) per query row of the group: [g, t].
    let dsum: Vec<T> = (0..g * t)
        .map(|r| {
            let row = (head(kvh * g) + r) * d;
            let (o, go) = (&sv.out[row..row + d], &sv.grad[row..row + d]);
            o.iter().zip(go).fold(T::zero(), |a, (&x, &y)| a + x * y)
        })
        .collect();
    let mut tg = TaskGrads {
        dq: vec![T::zero(); g * t * d],
        dk: vec![T::zero(); s * d],
        dv: vec![T::zero(); s * d],
    };
    let mut pb = vec![T::zero(); BQ * BK]; // [nq, nk] probabilities
    let mut db = vec![T::zero(); BQ * BK]; // [nq, nk] dP, then dS
    let kend = vis.limit(t.saturating_sub(1)).min(s);
    for j0 in (0..kend).step_by(BK) {
        let nk = BK.min(kend - j0);
        let (kb, vb) = (&kh[j0 * d..], &vh[j0 * d..]); // [nk, d]
        let keys = vis.keys(bi, j0, nk);
        for hh in 0..g {
            let h = kvh * g + hh;
            for i0 in (0..t).step_by(BQ) {
                let nq = BQ.min(t - i0);
                if !vis.block(bi, (i0, nq), (j0, nk)) {
                    continue;
                }
                let r0 = head(h) + i0;
                let qb = &sv.x.q[r0 * d..(r0 + nq) * d]; // [nq, d]
                let gob = &sv.grad[r0 * d..(r0 + nq) * d]; // [nq, d]
                let lse = &sv.lse[r0..r0 + nq];
                mm([nq, nk, d], &mut pb, nk, false, (qb, d, 1), (kb, 1, d)); // q·kᵀ
                for (i, row) in pb.chunks_mut(nk).take(nq).enumerate() {
                    let sq = vis.query_segment(bi, i0 + i);
                    let lim = vis.limit(i0 + i).saturating_sub(j0).min(nk);
                    let l = lse[i];
                    keys.apply(row, lim, sq, T::zero(), |x| (x * scale - l).fast_exp());
                }
                let dv = &mut tg.dv[j0 * d..];
                mm([nk, d, nq], dv, d, true, (&pb, 1, nk), (gob, d, 1)); // += Pᵀ dO
                mm([nq, nk, d], &mut db, nk, false, (gob, d, 1), (vb, 1, d)); // dO vᵀ
                let drow = &dsum[hh * t + i0..];
                for (i, (dr, pr)) in db.chunks_mut(nk).zip(pb.chunks(nk)).take(nq).enumerate() {
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = scale * pv * (*x - drow[i]);
                    }
                }
                let dq = &mut tg.dq[(hh * t + i0) * d..];
                mm([nq, d, nk], dq, d, true, (&db, nk, 1), (kb, d, 1)); // += dS k
                let dk = &mut tg.dk[j0 * d..];
                mm([nk, d, nq], dk, d, true, (&db, 1, nk), (qb, d, 1)); // += dSᵀ q
            }
        }
    }
    tg
}

fn backward_t<T: Acc>(dm: &Dims, sv: &Saved<T>, vis: &Visibility<'_>, scale: f64) -> [Vec<T>; 3] {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    } = *dm;
    let g = dm.group();
    let scale = T::from_f64(scale);
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..hkv).map(move |h| (bi, h)))
        .collect();
    let grads: Vec<TaskGrads<T>> = tasks
        .par_iter()
        .map(|&task| vectorized(|| backward_task(dm, sv, vis, scale, task)))
        .collect();
    let mut dq = vec![T::zero(); b * t * hq * d]; // [b, t, hq, d]
    let mut dk = vec![T::zero(); b * s * hkv * d]; // [b, s, hkv, d]
    let mut dv = vec![T::zero(); b * s * hkv * d]; // [b, s, hkv, d]
    if d == 0 {
        return [dq, dk, dv];
    }
    for (&(bi, kvh), tg) in tasks.iter().zip(grads) {
        for (r, row) in tg.dq.chunks(d).enumerate() {
            let (hh, i) = (r / t, r % t);
            let at = ((bi * t + i) * hq + kvh * g + hh) * d;
            dq[at..at + d].copy_from_slice(row);
        }
        for (j, (kr, vr)) in tg.dk.chunks(d).zip(tg.dv.chunks(d)).enumerate() {
            let at = ((bi * s + j) * hkv + kvh) * d;
            dk[at..at + d].copy_from_slice(kr);
            dv[at..at + d].copy_from_slice(vr);
        }
    }
    [dq, dk, dv]
}

pub(super) fn backward(
    o: FlashBackward<'_, CpuStorage>,
    p: FlashParams,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    const OP: &str = "flash_attention_backward";
    let (q, k, v, out, grad, lse) = (o.q, o.k, o.v, o.out, o.grad, o.lse);
    let like_q = [out.l, grad.l];
    let mask_l = o.key_mask.map(|m| m.l);
    let dm = Dims::check(OP, [q.l, k.l, v.l], &like_q, Some(lse.l), mask_l, p)?;
    let dt = q.s.dtype_();
    for st in [k.s, v.s, out.s, grad.s] {
        if st.dtype_() != dt {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: dt,
                rhs: st.dtype_(),
            });
        }
    }
    if lse.s.dtype_() != dt.accumulation() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: dt.accumulation(),
            rhs: lse.s.dtype_(),
        });
    }
    let mask = mask_vec(OP, o.key_mask)?;
    let vis = Visibility {
        q_offset: p.q_offset,
        s: dm.s,
        mask: mask.as_deref(),
    };
    fn run<T: Acc>(
        dm: &Dims,
        o: &FlashBackward<'_, CpuStorage>,
        lse: Vec<T>,
        vis: &Visibility<'_>,
        scale: f64,
        dt: DType,
    ) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
        const OP: &str = "flash_attention_backward";
        let sv = Saved {
            x: Heads {
                q: T::gather(OP, o.q.s, o.q.l)?,
                k: T::gather(OP, o.k.s, o.k.l)?,
                v: T::gather(OP, o.v.s, o.v.l)?,
            },
            out: T::gather(OP, o.out.s, o.out.l)?,
            grad: T::gather(OP, o.grad.s, o.grad.l)?,
            lse,
        };
        let [dq, dk, dv] = backward_t(dm, &sv, vis, scale);
        Ok((T::store(dq, dt), T::store(dk, dt), T::store(dv, dt)))
    }
    match dt {
        DType::F32 | DType::BF16 => {
            let l = lse.s.view_f32(OP, lse.l)?;
            run::<f32>(&dm, &o, l, &vis, p.scale, dt)
        }
        DType::F64 => {
            let l = match lse.s {
                CpuStorage::F64(v) => CpuStorage::gather_view(v, lse.l),
                other => {
                    return Err(Error::UnsupportedDType {
                        op: OP,
                        dtype: other.dtype_(),
                    })
                }
            };
            run::<f64>(&dm, &o, l, &vis, p.scale, dt)
        }
        DType::U32 => Err(Error::UnsupportedDType { op: OP, dtype: dt }),
    }
}

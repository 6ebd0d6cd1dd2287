//! The router unit's primitives on the CPU: the reference of the kernels in
//! `kernels/src/moe_route.cu`. f32 and bf16 compute in f32 (bf16 rounded once on write), f64 in
//! f64; every sum runs in a fixed order, like the kernels.

use num_traits::Zero;
use rayon::prelude::*;

use super::primitives::{check_k, RouteTopk, RouteTopkBackward};
use crate::backend::checks::dims2;
use crate::backend::cpu::acc::{by_acc, float_only, store, vec_t};
use crate::backend::cpu::{CpuFloat, CpuStorage, PAR_THRESHOLD};
use crate::backend::BackendStorage;
use crate::{Error, Result};

/// True when `(a, ia)` comes first in top-k order: larger first, NaN largest, ties by index.
fn topk_before<T: CpuFloat>(a: T, ia: usize, b: T, ib: usize) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => ia < ib,
        (true, false) => true,
        (false, true) => false,
        _ if a != b => a > b,
        _ => ia < ib,
    }
}

/// One row of [`route_t`]: softmax of `xr` into `pr`, the top-k ids and renormalised weights.
fn route_row<T: CpuFloat>(xr: &[T], pr: &mut [T], ir: &mut [u32], wr: &mut [T]) {
    let k = ir.len();
    let m = xr.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    for (p, &v) in pr.iter_mut().zip(xr) {
        *p = (v - m).fast_exp();
    }
    let inv = pr.iter().copied().sum::<T>().recip();
    pr.iter_mut().for_each(|p| *p = *p * inv);
    let mut order: Vec<usize> = (0..xr.len()).collect();
    order.sort_by(|&i, &j| {
        if topk_before(pr[i], i, pr[j], j) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    let sum = order[..k].iter().map(|&i| pr[i]).sum::<T>();
    for (j, &i) in order[..k].iter().enumerate() {
        ir[j] = i as u32;
        wr[j] = pr[i] / sum;
    }
}

fn route_t<T: CpuFloat>(x: &[T], n: usize, e: usize, k: usize) -> (Vec<T>, Vec<u32>, Vec<T>) {
    let mut probs = vec![T::zero(); n * e];
    let mut ids = vec![0u32; n * k];
    let mut w = vec![T::zero(); n * k];
    if n == 0 {
        return (probs, ids, w);
    }
    if n * e >= PAR_THRESHOLD {
        x.par_chunks(e)
            .zip(probs.par_chunks_mut(e))
            .zip(ids.par_chunks_mut(k).zip(w.par_chunks_mut(k)))
            .for_each(|((xr, pr), (ir, wr))| route_row(xr, pr, ir, wr));
    } else {
        x.chunks(e)
            .zip(probs.chunks_mut(e))
            .zip(ids.chunks_mut(k).zip(w.chunks_mut(k)))
            .for_each(|((xr, pr), (ir, wr))| route_row(xr, pr, ir, wr));
    }
    (probs, ids, w)
}

pub(super) fn route_topk(
    o: RouteTopk<'_, CpuStorage>,
    k: usize,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    const OP: &str = "moe_route_topk";
    let (s, l) = (o.logits.s, o.logits.l);
    float_only(OP, s)?;
    let (n, e) = dims2(OP, l)?;
    check_k(OP, k, e, l)?;
    let dt = s.dtype();
    by_acc!(dt, T => {
        let x = vec_t::<T>(OP, s, l)?;
        let (p, i, w) = route_t(&x, n, e, k);
        Ok((store(p, dt), CpuStorage::U32(i), store(w, dt)))
    })
}

pub(super) fn route_topk_backward(
    o: RouteTopkBackward<'_, CpuStorage>,
    e: usize,
) -> Result<CpuStorage> {
    const OP: &str = "moe_route_topk_backward";
    let (w, wl, ids, il, gw, gl) = (o.w.s, o.w.l, o.ids.s, o.ids.l, o.gw.s, o.gw.l);
    float_only(OP, w)?;
    let (n, k) = dims2(OP, wl)?;
    if il.dims() != [n, k] || gl.dims() != [n, k] {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: wl.shape().clone(),
            rhs: gl.shape().clone(),
        });
    }
    let ids = ids.view_u32(OP, il)?;
    let dt = w.dtype();
    by_acc!(dt, T => {
        let wv = vec_t::<T>(OP, w, wl)?;
        let gv = vec_t::<T>(OP, gw, gl)?;
        let mut dl = vec![T::zero(); n * e];
        for t in 0..n {
            let r = t * k..(t + 1) * k;
            let dot = wv[r.clone()].iter().zip(&gv[r.clone()]).map(|(&a, &b)| a * b).sum::<T>();
            for j in r {
                let i = ids[j] as usize;
                if i < e {
                    dl[t * e + i] = wv[j] * (gv[j] - dot);
                }
            }
        }
        Ok(store(dl, dt))
    })
}

//! The grouped-expert unit's primitives on the CPU: the reference of the kernels in
//! `kernels/src/moe_grouped.cu`. f32 and bf16 compute in f32 (bf16 rounded once on write), f64
//! in f64. Every sum runs in a fixed order (slot order, row order), like the kernels.

use num_traits::{One, Zero};
use rayon::prelude::*;

use super::primitives::{
    Combine, CombineDw, Group, GroupedMatmul, GroupedMatmulDw, InvertPerm, Permute,
};
use crate::backend::checks::{dims2, shape_mismatch};
use crate::backend::cpu::acc::{by_acc, float_only, store, vec_t};
use crate::backend::cpu::{CpuStorage, PAR_THRESHOLD};
use crate::backend::BackendStorage;
use crate::{Error, Layout, Result};

pub(super) fn group(o: Group<'_, CpuStorage>, e: usize) -> Result<(CpuStorage, CpuStorage)> {
    const OP: &str = "moe_group";
    let (ids, l) = (o.ids.s, o.ids.l);
    let ids = ids.view_u32(OP, l)?;
    let bucket = |id: u32| (id as usize).min(e);
    let mut counts = vec![0u32; e + 2];
    for &id in &ids {
        counts[bucket(id) + 1] += 1;
    }
    for b in 0..=e {
        counts[b + 1] += counts[b];
    }
    let offsets = counts[..=e].to_vec(); // [E+1]: offsets[E] = slots with a valid id
    let mut next = counts;
    let mut perm = vec![0u32; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        let b = bucket(id);
        perm[next[b] as usize] = p as u32;
        next[b] += 1;
    }
    Ok((CpuStorage::U32(perm), CpuStorage::U32(offsets)))
}

pub(super) fn invert_perm(o: InvertPerm<'_, CpuStorage>) -> Result<CpuStorage> {
    let (perm, l) = (o.perm.s, o.perm.l);
    let perm = perm.view_u32("moe_invert_perm", l)?;
    let m = perm.len();
    let mut inv = vec![u32::MAX; m];
    for (q, &p) in perm.iter().enumerate() {
        if (p as usize) < m {
            inv[p as usize] = q as u32;
        }
    }
    Ok(CpuStorage::U32(inv))
}

pub(super) fn permute(o: Permute<'_, CpuStorage>, k: usize) -> Result<CpuStorage> {
    const OP: &str = "moe_permute";
    let (x, l, perm, pl) = (o.x.s, o.x.l, o.perm.s, o.perm.l);
    float_only(OP, x)?;
    let (n, h) = dims2(OP, l)?;
    let perm = perm.view_u32(OP, pl)?;
    let m = perm.len();
    if m != n * k {
        return Err(Error::invalid(
            OP,
            format!("perm of {m} slots for {n} tokens × k = {k}"),
        ));
    }
    let dt = x.dtype();
    by_acc!(dt, T => {
        let xv = vec_t::<T>(OP, x, l)?;
        let sv = match o.scale {
            Some(s) => Some(vec_t::<T>(OP, s.s, s.l)?),
            None => None,
        };
        let mut y = vec![T::zero(); m * h];
        let row = |(q, yr): (usize, &mut [T])| {
            let p = perm[q] as usize;
            if p >= m {
                return;
            }
            let c = sv.as_ref().map_or(T::one(), |s| s[p]);
            let xr = &xv[(p / k) * h..(p / k + 1) * h];
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = c * v;
            }
        };
        if m * h >= PAR_THRESHOLD {
            y.par_chunks_mut(h.max(1)).enumerate().for_each(row);
        } else {
            y.chunks_mut(h.max(1)).enumerate().for_each(row);
        }
        Ok(store(y, dt))
    })
}

pub(super) fn combine(o: Combine<'_, CpuStorage>) -> Result<CpuStorage> {
    const OP: &str = "moe_combine";
    let (y, l, inv, il, w, wl) = (o.y.s, o.y.l, o.inv.s, o.inv.l, o.w.s, o.w.l);
    float_only(OP, y)?;
    let (m, h) = dims2(OP, l)?;
    let (n, k) = dims2(OP, wl)?;
    let inv = inv.view_u32(OP, il)?;
    if m != n * k || inv.len() != m {
        return Err(shape_mismatch(OP, l, wl));
    }
    let dt = y.dtype();
    by_acc!(dt, T => {
        let yv = vec_t::<T>(OP, y, l)?;
        let wv = vec_t::<T>(OP, w, wl)?;
        let mut out = vec![T::zero(); n * h];
        let row = |(t, o): (usize, &mut [T])| {
            for j in 0..k {
                let r = inv[t * k + j] as usize;
                if r >= m {
                    continue;
                }
                let c = wv[t * k + j];
                for (a, &v) in o.iter_mut().zip(&yv[r * h..(r + 1) * h]) {
                    *a += c * v;
                }
            }
        };
        if n * h >= PAR_THRESHOLD {
            out.par_chunks_mut(h.max(1)).enumerate().for_each(row);
        } else {
            out.chunks_mut(h.max(1)).enumerate().for_each(row);
        }
        Ok(store(out, dt))
    })
}

pub(super) fn combine_dw(o: CombineDw<'_, CpuStorage>, k: usize) -> Result<CpuStorage> {
    const OP: &str = "moe_combine_dw";
    let (y, l, inv, il, g, gl) = (o.y.s, o.y.l, o.inv.s, o.inv.l, o.g.s, o.g.l);
    float_only(OP, y)?;
    let (m, h) = dims2(OP, l)?;
    let (n, gh) = dims2(OP, gl)?;
    let inv = inv.view_u32(OP, il)?;
    if m != n * k || gh != h || inv.len() != m {
        return Err(shape_mismatch(OP, l, gl));
    }
    let dt = y.dtype();
    by_acc!(dt, T => {
        let yv = vec_t::<T>(OP, y, l)?;
        let gv = vec_t::<T>(OP, g, gl)?;
        let dw: Vec<T> = (0..m)
            .map(|p| {
                let r = inv[p] as usize;
                if r >= m {
                    return T::zero();
                }
                let t = p / k;
                gv[t * h..(t + 1) * h]
                    .iter()
                    .zip(&yv[r * h..(r + 1) * h])
                    .map(|(&a, &b)| a * b)
                    .sum::<T>()
            })
            .collect();
        Ok(store(dw, dt.accumulation()))
    })
}

/// Offsets `[E+1]` clamped to `[0, m]`; errors when they decrease.
fn segments(op: &'static str, off: &CpuStorage, ol: &Layout, m: usize) -> Result<Vec<usize>> {
    let off = off.view_u32(op, ol)?;
    if off.is_empty() {
        return Err(Error::invalid(op, "offsets need E + 1 ≥ 1 entries"));
    }
    let v: Vec<usize> = off.iter().map(|&o| (o as usize).min(m)).collect();
    if v.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::invalid(op, format!("offsets {off:?} decrease")));
    }
    Ok(v)
}

pub(super) fn grouped_matmul(
    o: GroupedMatmul<'_, CpuStorage>,
    trans_w: bool,
) -> Result<CpuStorage> {
    const OP: &str = "grouped_matmul";
    let (x, l, w, wl, off, ol) = (o.x.s, o.x.l, o.w.s, o.w.l, o.offsets.s, o.offsets.l);
    float_only(OP, x)?;
    if w.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: x.dtype(),
            rhs: w.dtype(),
        });
    }
    let (m, kk) = dims2(OP, l)?;
    let &[e, p, q] = wl.dims() else {
        return Err(Error::RankMismatch {
            op: OP,
            expected: 3,
            shape: wl.shape().clone(),
        });
    };
    let (nn, wk) = if trans_w { (q, p) } else { (p, q) };
    if wk != kk || ol.dims() != [e + 1] {
        return Err(shape_mismatch(OP, l, wl));
    }
    let seg = segments(OP, off, ol, m)?;
    let dt = x.dtype();
    by_acc!(dt, T => {
        let xv = vec_t::<T>(OP, x, l)?;
        let mut wv = vec_t::<T>(OP, w, wl)?;
        if trans_w {
            // [E, K, N] -> [E, N, K], so that every output is a contiguous dot product.
            let mut t = vec![T::zero(); wv.len()];
            for ei in 0..e {
                for a in 0..kk {
                    for b in 0..nn {
                        t[(ei * nn + b) * kk + a] = wv[(ei * kk + a) * nn + b];
                    }
                }
            }
            wv = t;
        }
        let expert_of = |r: usize| (0..e).find(|&ei| r >= seg[ei] && r < seg[ei + 1]);
        let mut y = vec![T::zero(); m * nn];
        let row = |(r, yr): (usize, &mut [T])| {
            let Some(ei) = expert_of(r) else { return };
            let xr = &xv[r * kk..(r + 1) * kk];
            for (c, o) in yr.iter_mut().enumerate() {
                let wr = &wv[(ei * nn + c) * kk..(ei * nn + c + 1) * kk];
                *o = xr.iter().zip(wr).map(|(&a, &b)| a * b).sum::<T>();
            }
        };
        if m * nn * kk >= PAR_THRESHOLD {
            y.par_chunks_mut(nn.max(1)).enumerate().for_each(row);
        } else {
            y.chunks_mut(nn.max(1)).enumerate().for_each(row);
        }
        Ok(store(y, dt))
    })
}

pub(super) fn grouped_matmul_dw(
    o: GroupedMatmulDw<'_, CpuStorage>,
    e: usize,
) -> Result<CpuStorage> {
    const OP: &str = "grouped_matmul_dw";
    let (dy, l, x, xl, off, ol) = (o.dy.s, o.dy.l, o.x.s, o.x.l, o.offsets.s, o.offsets.l);
    float_only(OP, dy)?;
    if x.dtype() != dy.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: dy.dtype(),
            rhs: x.dtype(),
        });
    }
    let (m, nn) = dims2(OP, l)?;
    let (xm, kk) = dims2(OP, xl)?;
    if xm != m || ol.dims() != [e + 1] {
        return Err(shape_mismatch(OP, l, xl));
    }
    let seg = segments(OP, off, ol, m)?;
    let dt = dy.dtype();
    by_acc!(dt, T => {
        let gv = vec_t::<T>(OP, dy, l)?;
        let xv = vec_t::<T>(OP, x, xl)?;
        let mut dw = vec![T::zero(); e * nn * kk];
        // One task per (expert, output row n); rows of the segment summed in order.
        let body = |(i, o): (usize, &mut [T])| {
            let (ei, n) = (i / nn.max(1), i % nn.max(1));
            for r in seg[ei]..seg[ei + 1] {
                let g = gv[r * nn + n];
                for (a, &v) in o.iter_mut().zip(&xv[r * kk..(r + 1) * kk]) {
                    *a += g * v;
                }
            }
        };
        if e * nn * kk >= PAR_THRESHOLD {
            dw.par_chunks_mut(kk.max(1)).enumerate().for_each(body);
        } else {
            dw.chunks_mut(kk.max(1)).enumerate().for_each(body);
        }
        Ok(store(dw, dt))
    })
}

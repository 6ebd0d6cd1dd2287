//! The fused MixLoRA FFN kernels on the CPU: the reference for the CUDA ones.
//!
//! Every kernel runs in the adapter dtype `C` (f64 under an f64 base, else f32): base operands
//! (f32 or bf16) are widened on read and rounded once on write. Per-token kernels split the tokens
//! across threads; per-expert weight-gradient kernels split the rows of each expert's gradient,
//! and each row loops over the expert's slots `perm[offsets[e]..offsets[e+1]]` (no atomics, the
//! same order on every run). Nothing of size `k·T·I` is ever stored: `g`, `u` and `a` of a slot are
//! recomputed from `G`, `U` and the rank-`r` codes wherever they are needed.

use rayon::prelude::*;

use super::{CpuFloat, CpuStorage};
use crate::backend::{BackendStorage, MoeDims};
use crate::{rng, DType, Error, Layout, Result};

/// An element type the fused kernels compute in, with the conversions of their operands.
trait MoeFloat: CpuFloat {
    /// The view of a base operand (this type, or bf16 under f32) or an adapter operand.
    fn read(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<Self>>;
    /// A result in `dtype` (this type, or bf16 under f32).
    fn wrap(v: Vec<Self>, dtype: DType) -> CpuStorage;
}

impl MoeFloat for f32 {
    fn read(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
        match s {
            CpuStorage::F32(_) | CpuStorage::BF16(_) => s.view_f32(op, l),
            s => Err(Error::UnsupportedDType {
                op,
                dtype: s.dtype(),
            }),
        }
    }
    fn wrap(v: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::BF16 => CpuStorage::bf16_from_f32(v),
            _ => CpuStorage::F32(v),
        }
    }
}

impl MoeFloat for f64 {
    fn read(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
        match s {
            CpuStorage::F64(v) => Ok(CpuStorage::gather_view(v, l)),
            s => Err(Error::UnsupportedDType {
                op,
                dtype: s.dtype(),
            }),
        }
    }
    fn wrap(v: Vec<f64>, _dtype: DType) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

type Args<'a> = [(&'a CpuStorage, &'a Layout)];

fn arity(op: &'static str, args: &Args<'_>, n: usize) -> Result<()> {
    if args.len() != n {
        return Err(Error::invalid(
            op,
            format!("{} operands, expected {n}", args.len()),
        ));
    }
    Ok(())
}

fn read_u32(op: &'static str, a: (&CpuStorage, &Layout)) -> Result<Vec<u32>> {
    a.0.view_u32(op, a.1)
}

/// Expert ids, each checked against `E`.
fn read_ids(op: &'static str, a: (&CpuStorage, &Layout), e: usize) -> Result<Vec<u32>> {
    let ids = read_u32(op, a)?;
    if let Some(&bad) = ids.iter().find(|&&x| x as usize >= e) {
        return Err(Error::IndexOutOfRange {
            op,
            index: bad as usize,
            size: e,
        });
    }
    Ok(ids)
}

/// `perm` and `offsets`, checked: offsets non-decreasing from 0 to `T·k`, perm entries `< T·k`.
fn read_groups(
    op: &'static str,
    perm: (&CpuStorage, &Layout),
    offsets: (&CpuStorage, &Layout),
    d: &MoeDims,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (perm, offsets) = (read_u32(op, perm)?, read_u32(op, offsets)?);
    let n = d.t * d.k;
    let ok = perm.len() == n
        && offsets.len() == d.e + 1
        && offsets[0] == 0
        && offsets[d.e] as usize == n
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && perm.iter().all(|&p| (p as usize) < n);
    if !ok {
        return Err(Error::invalid(
            op,
            "perm/offsets are not a grouping of the T·k slots by expert",
        ));
    }
    Ok((perm, offsets))
}

/// Which compute type: the adapter dtype of operand `a`.
fn is_f64(a: (&CpuStorage, &Layout)) -> bool {
    a.0.dtype() == DType::F64
}

#[inline(always)]
fn dot<C: CpuFloat>(a: &[C], b: &[C]) -> C {
    a.iter().zip(b).fold(C::zero(), |s, (&x, &y)| s + x * y)
}

/// The dropout multiplier of element `i` of slot `p` (1 without dropout).
#[inline(always)]
fn keep<C: CpuFloat>(d: &MoeDims, p: usize, i: usize) -> C {
    if d.dropout == 0.0 {
        return C::one();
    }
    if rng::uniform(d.seed, (p * d.i + i) as u64) < d.dropout {
        C::zero()
    } else {
        C::from(1.0 / (1.0 - d.dropout)).unwrap_or_else(C::one)
    }
}

/// The operands shared by the activation kernels, widened to `C`.
struct Act<C> {
    g: Vec<C>,     // [T, I]
    u: Vec<C>,     // [T, I]
    zg: Vec<C>,    // [T, E·r]
    zu: Vec<C>,    // [T, E·r]
    bg: Vec<C>,    // [E, I, r]
    bu: Vec<C>,    // [E, I, r]
    ad: Vec<C>,    // [E, r, I]
    ids: Vec<u32>, // [T, k]
    w: Vec<C>,     // [T, k]
}

impl<C: MoeFloat> Act<C> {
    fn read(op: &'static str, a: &Args<'_>, d: &MoeDims) -> Result<Self> {
        Ok(Act {
            g: C::read(op, a[0].0, a[0].1)?,
            u: C::read(op, a[1].0, a[1].1)?,
            zg: C::read(op, a[2].0, a[2].1)?,
            zu: C::read(op, a[3].0, a[3].1)?,
            bg: C::read(op, a[4].0, a[4].1)?,
            bu: C::read(op, a[5].0, a[5].1)?,
            ad: C::read(op, a[6].0, a[6].1)?,
            ids: read_ids(op, a[7], d.e)?,
            w: C::read(op, a[8].0, a[8].1)?,
        })
    }

    /// `(g, u)` of slot `p = t·k + j` (expert `e`) at column `i`.
    #[inline(always)]
    fn gu(&self, d: &MoeDims, t: usize, e: usize, i: usize, s: C) -> (C, C) {
        let (r, er) = (d.r, d.e * d.r);
        let zg = &self.zg[t * er + e * r..][..r];
        let zu = &self.zu[t * er + e * r..][..r];
        let row = (e * d.i + i) * r;
        let g = self.g[t * d.i + i] + s * dot(&self.bg[row..row + r], zg);
        let u = self.u[t * d.i + i] + s * dot(&self.bu[row..row + r], zu);
        (g, u)
    }
}

#[inline(always)]
fn sigmoid<C: CpuFloat>(x: C) -> C {
    C::one() / (C::one() + (-x).exp())
}

/// Gradients of one slot at one column: `(a, dg, du, m)` from `da_pre = A_d,eᵀ dZ_d` (before the
/// dropout multiplier `m`) and `w_j dĀ`.
#[inline(always)]
fn slot_grads<C: CpuFloat>(g: C, u: C, wda: C, ad_dz: C, m: C) -> (C, C, C) {
    let sg = sigmoid(g);
    let silu = g * sg;
    let a = silu * u;
    let da = wda + m * ad_dz;
    let dg = da * u * sg * (C::one() + g * (C::one() - sg));
    let du = da * silu;
    (a, dg, du)
}

// ----- forward ---------------------------------------------------------------------------

pub(crate) fn act_forward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_act_forward", args, 9)?;
    if is_f64(args[2]) {
        act_forward_t::<f64>(args, d)
    } else {
        act_forward_t::<f32>(args, d)
    }
}

fn act_forward_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_act_forward";
    let x = Act::<C>::read(op, args, d)?;
    let (k, r, ni) = (d.k, d.r, d.i);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    let mut abar = vec![C::zero(); d.t * ni]; // [T, I]
    let mut zd = vec![C::zero(); d.t * k * r]; // [T, k, r]
    abar.par_chunks_mut(ni.max(1))
        .zip(zd.par_chunks_mut((k * r).max(1)))
        .enumerate()
        .for_each(|(t, (abar, zd))| {
            for j in 0..k {
                let p = t * k + j;
                let e = x.ids[p] as usize;
                let wj = x.w[p];
                let zdj = &mut zd[j * r..(j + 1) * r];
                for (i, ab) in abar.iter_mut().enumerate() {
                    let (g, u) = x.gu(d, t, e, i, s);
                    let a = g * sigmoid(g) * u;
                    *ab = *ab + wj * a;
                    let am = a * keep::<C>(d, p, i);
                    for (c, z) in zdj.iter_mut().enumerate() {
                        *z = *z + x.ad[(e * r + c) * ni + i] * am;
                    }
                }
            }
        });
    let base = args[0].0.dtype();
    Ok(vec![C::wrap(abar, base), C::wrap(zd, args[2].0.dtype())])
}

pub(crate) fn down_forward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_down_forward", args, 5)?;
    if is_f64(args[1]) {
        down_forward_t::<f64>(args, d)
    } else {
        down_forward_t::<f32>(args, d)
    }
}

fn down_forward_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_down_forward";
    let mut y = C::read(op, args[0].0, args[0].1)?; // [T, H]
    let zd = C::read(op, args[1].0, args[1].1)?; // [T, k, r]
    let w = C::read(op, args[2].0, args[2].1)?; // [T, k]
    let ids = read_ids(op, args[3], d.e)?; // [T, k]
    let bd = C::read(op, args[4].0, args[4].1)?; // [E, H, r]
    let (k, r, h) = (d.k, d.r, d.h);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    y.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, y)| {
        // The k scaled codes s·w_j·Z_d[t, j] [k, r].
        let sz: Vec<C> = (0..k * r)
            .map(|jc| s * w[t * k + jc / r] * zd[t * k * r + jc])
            .collect();
        for (hh, yv) in y.iter_mut().enumerate() {
            let mut acc = C::zero();
            for j in 0..k {
                let e = ids[t * k + j] as usize;
                acc = acc + dot(&bd[(e * h + hh) * r..][..r], &sz[j * r..(j + 1) * r]);
            }
            *yv = *yv + acc;
        }
    });
    Ok(vec![C::wrap(y, args[0].0.dtype())])
}

// ----- backward --------------------------------------------------------------------------

pub(crate) fn down_backward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_down_backward", args, 5)?;
    if is_f64(args[1]) {
        down_backward_t::<f64>(args, d)
    } else {
        down_backward_t::<f32>(args, d)
    }
}

fn down_backward_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_down_backward";
    let dy = C::read(op, args[0].0, args[0].1)?; // [T, H]
    let zd = C::read(op, args[1].0, args[1].1)?; // [T, k, r]
    let w = C::read(op, args[2].0, args[2].1)?; // [T, k]
    let ids = read_ids(op, args[3], d.e)?; // [T, k]
    let bd = C::read(op, args[4].0, args[4].1)?; // [E, H, r]
    let (k, r, h) = (d.k, d.r, d.h);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    let mut dzd = vec![C::zero(); d.t * k * r]; // [T, k, r]
    let mut dw = vec![C::zero(); d.t * k]; // [T, k]
    dzd.par_chunks_mut((k * r).max(1))
        .zip(dw.par_chunks_mut(k.max(1)))
        .enumerate()
        .for_each(|(t, (dzd, dw))| {
            let dyt = &dy[t * h..(t + 1) * h];
            for j in 0..k {
                let p = t * k + j;
                let e = ids[p] as usize;
                let mut q = vec![C::zero(); r]; // B_d,eᵀ dY[t] [r]
                for (hh, &g) in dyt.iter().enumerate() {
                    for (c, qc) in q.iter_mut().enumerate() {
                        *qc = *qc + bd[(e * h + hh) * r + c] * g;
                    }
                }
                dw[j] = s * dot(&q, &zd[p * r..(p + 1) * r]);
                for (c, qc) in q.iter().enumerate() {
                    dzd[j * r + c] = s * w[p] * *qc;
                }
            }
        });
    let ad = args[1].0.dtype();
    Ok(vec![C::wrap(dzd, ad), C::wrap(dw, ad)])
}

pub(crate) fn act_backward(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_act_backward", args, 11)?;
    if is_f64(args[2]) {
        act_backward_t::<f64>(args, d)
    } else {
        act_backward_t::<f32>(args, d)
    }
}

fn act_backward_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_act_backward";
    let x = Act::<C>::read(op, args, d)?;
    let dabar = C::read(op, args[9].0, args[9].1)?; // [T, I]
    let dzd = C::read(op, args[10].0, args[10].1)?; // [T, k, r]
    let (k, r, ni, er) = (d.k, d.r, d.i, d.e * d.r);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    let mut dg = vec![C::zero(); d.t * ni]; // [T, I]
    let mut du = vec![C::zero(); d.t * ni]; // [T, I]
    let mut dzg = vec![C::zero(); d.t * er]; // [T, E·r]
    let mut dzu = vec![C::zero(); d.t * er]; // [T, E·r]
    let mut dw = vec![C::zero(); d.t * k]; // [T, k]
    dg.par_chunks_mut(ni.max(1))
        .zip(du.par_chunks_mut(ni.max(1)))
        .zip(dzg.par_chunks_mut(er.max(1)))
        .zip(dzu.par_chunks_mut(er.max(1)))
        .zip(dw.par_chunks_mut(k.max(1)))
        .enumerate()
        .for_each(|(t, ((((dg, du), dzg), dzu), dw))| {
            let dat = &dabar[t * ni..(t + 1) * ni];
            for (j, dw) in dw.iter_mut().enumerate() {
                let p = t * k + j;
                let e = x.ids[p] as usize;
                let wj = x.w[p];
                let dz = &dzd[p * r..(p + 1) * r];
                let (dzg, dzu) = (&mut dzg[e * r..(e + 1) * r], &mut dzu[e * r..(e + 1) * r]);
                let mut dwj = C::zero();
                for i in 0..ni {
                    let (g, u) = x.gu(d, t, e, i, s);
                    let ad_dz =
                        (0..r).fold(C::zero(), |a, c| a + x.ad[(e * r + c) * ni + i] * dz[c]);
                    let m = keep::<C>(d, p, i);
                    let (a, dgv, duv) = slot_grads(g, u, wj * dat[i], ad_dz, m);
                    dwj = dwj + dat[i] * a;
                    dg[i] = dg[i] + dgv;
                    du[i] = du[i] + duv;
                    let row = (e * ni + i) * r;
                    for c in 0..r {
                        dzg[c] = dzg[c] + s * x.bg[row + c] * dgv;
                        dzu[c] = dzu[c] + s * x.bu[row + c] * duv;
                    }
                }
                *dw = dwj;
            }
        });
    let (base, ad) = (args[0].0.dtype(), args[2].0.dtype());
    Ok(vec![
        C::wrap(dg, base),
        C::wrap(du, base),
        C::wrap(dzg, ad),
        C::wrap(dzu, ad),
        C::wrap(dw, ad),
    ])
}

pub(crate) fn act_weight_grads(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_act_weight_grads", args, 13)?;
    if is_f64(args[2]) {
        act_weight_grads_t::<f64>(args, d)
    } else {
        act_weight_grads_t::<f32>(args, d)
    }
}

fn act_weight_grads_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_act_weight_grads";
    let x = Act::<C>::read(op, args, d)?;
    let dabar = C::read(op, args[9].0, args[9].1)?; // [T, I]
    let dzd = C::read(op, args[10].0, args[10].1)?; // [T, k, r]
    let (perm, offsets) = read_groups(op, args[11], args[12], d)?;
    let (k, r, ni, er) = (d.k, d.r, d.i, d.e * d.r);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    let mut dbg = vec![C::zero(); d.e * ni * r]; // [E, I, r]
    let mut dbu = vec![C::zero(); d.e * ni * r]; // [E, I, r]
    let mut dad_t = vec![C::zero(); d.e * ni * r]; // [E, I, r], transposed to [E, r, I] below
    dbg.par_chunks_mut(r.max(1))
        .zip(dbu.par_chunks_mut(r.max(1)))
        .zip(dad_t.par_chunks_mut(r.max(1)))
        .enumerate()
        .for_each(|(row, ((dbg, dbu), dad))| {
            let (e, i) = (row / ni, row % ni);
            for &p in &perm[offsets[e] as usize..offsets[e + 1] as usize] {
                let p = p as usize;
                let t = p / k;
                let (g, u) = x.gu(d, t, e, i, s);
                let dz = &dzd[p * r..(p + 1) * r];
                let ad_dz = (0..r).fold(C::zero(), |a, c| a + x.ad[(e * r + c) * ni + i] * dz[c]);
                let m = keep::<C>(d, p, i);
                let (a, dgv, duv) = slot_grads(g, u, x.w[p] * dabar[t * ni + i], ad_dz, m);
                let (zg, zu) = (&x.zg[t * er + e * r..][..r], &x.zu[t * er + e * r..][..r]);
                let am = a * m;
                for c in 0..r {
                    dbg[c] = dbg[c] + s * dgv * zg[c];
                    dbu[c] = dbu[c] + s * duv * zu[c];
                    dad[c] = dad[c] + dz[c] * am;
                }
            }
        });
    let mut dad = vec![C::zero(); d.e * r * ni]; // [E, r, I]
    for e in 0..d.e {
        for i in 0..ni {
            for c in 0..r {
                dad[(e * r + c) * ni + i] = dad_t[(e * ni + i) * r + c];
            }
        }
    }
    let ad = args[2].0.dtype();
    Ok(vec![C::wrap(dbg, ad), C::wrap(dbu, ad), C::wrap(dad, ad)])
}

pub(crate) fn down_weight_grad(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    arity("moe_down_weight_grad", args, 5)?;
    if is_f64(args[1]) {
        down_weight_grad_t::<f64>(args, d)
    } else {
        down_weight_grad_t::<f32>(args, d)
    }
}

fn down_weight_grad_t<C: MoeFloat>(args: &Args<'_>, d: &MoeDims) -> Result<Vec<CpuStorage>> {
    let op = "moe_down_weight_grad";
    let dy = C::read(op, args[0].0, args[0].1)?; // [T, H]
    let zd = C::read(op, args[1].0, args[1].1)?; // [T, k, r]
    let w = C::read(op, args[2].0, args[2].1)?; // [T, k]
    let (perm, offsets) = read_groups(op, args[3], args[4], d)?;
    let (k, r, h) = (d.k, d.r, d.h);
    let s = C::from(d.scale).unwrap_or_else(C::zero);
    let mut dbd = vec![C::zero(); d.e * h * r]; // [E, H, r]
    dbd.par_chunks_mut(r.max(1))
        .enumerate()
        .for_each(|(row, dbd)| {
            let (e, hh) = (row / h, row % h);
            for &p in &perm[offsets[e] as usize..offsets[e + 1] as usize] {
                let p = p as usize;
                let c0 = s * w[p] * dy[(p / k) * h + hh];
                for (c, v) in dbd.iter_mut().enumerate() {
                    *v = *v + c0 * zd[p * r + c];
                }
            }
        });
    Ok(vec![C::wrap(dbd, args[1].0.dtype())])
}

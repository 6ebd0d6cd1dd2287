//! The fused MixLoRA FFN's block-code primitives on the CPU: the reference for the CUDA kernels
//! (block-code layouts and the SwiGLU over the slots; the CUDA op runs its rank-r products as
//! block-code GEMMs). The CPU op itself runs the tile primitives of `cpu_tiles.rs`.
//!
//! Every primitive computes in `C` (f64 under an f64 base, else f32): base operands (f32 or bf16)
//! are widened on read and rounded once on write. Rows (tokens) are split across threads.

use rayon::prelude::*;

use super::primitives::{
    BlockCodes, Blocks, ExpandCodes, GatherCodes, MoeDims, SwigluBackward, SwigluForward,
    SwigluGrads,
};
use crate::backend::cpu::{CpuFloat, CpuStorage};
use crate::backend::BackendStorage;
use crate::fused::Operand;
use crate::{rng, DType, Error, Layout, Result};

/// An operand on the CPU.
pub(super) type Op<'a> = Operand<'a, CpuStorage>;

/// An element type the fused kernels compute in, with the conversions of their operands.
pub(super) trait MoeFloat: CpuFloat {
    /// The view of a base operand (this type, or bf16 under f32) or an adapter operand.
    fn read(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<Vec<Self>>;
    /// A result in `dtype` (this type, or bf16 under f32).
    fn wrap(v: Vec<Self>, dtype: DType) -> CpuStorage;
    /// The whole buffer when it holds this type (borrowed, no copy).
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
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
    fn slice(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
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
    fn slice(s: &CpuStorage) -> Option<&[f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The view of an operand in the compute type `C`.
pub(super) fn read<C: MoeFloat>(op: &'static str, a: Op<'_>) -> Result<Vec<C>> {
    C::read(op, a.s, a.l)
}

/// Expert ids, each checked against `E`.
pub(super) fn read_ids(op: &'static str, a: Op<'_>, e: usize) -> Result<Vec<u32>> {
    let ids = a.s.view_u32(op, a.l)?;
    if let Some(&bad) = ids.iter().find(|&&x| x as usize >= e) {
        return Err(Error::IndexOutOfRange {
            op,
            index: bad as usize,
            size: e,
        });
    }
    Ok(ids)
}

/// Which compute type: the adapter dtype of operand `a`.
pub(super) fn is_f64(a: Op<'_>) -> bool {
    a.s.dtype() == DType::F64
}

/// The dropout multiplier of element `i` of slot `p` (1 without dropout).
#[inline(always)]
fn keep<C: CpuFloat>(d: &MoeDims, p: usize, i: usize) -> C {
    if d.dropout == 0.0 {
        return C::one();
    }
    let p = d.t0 * d.k + p; // the slot among all the op's tokens
    if rng::dropped(
        d.seed,
        (p * d.i + i) as u64,
        rng::dropout_threshold(d.dropout),
    ) {
        C::zero()
    } else {
        C::from(1.0 / (1.0 - d.dropout)).unwrap_or_else(C::one)
    }
}

#[inline(always)]
pub(super) fn sigmoid<C: CpuFloat>(x: C) -> C {
    C::one() / (C::one() + (-x).exp())
}

/// Gradients of one slot at one column: `(a, dg, du, m)` from `da_pre = A_d,eᵀ dZ_d` (before the
/// dropout multiplier `m`) and `w_j dĀ`.
#[inline(always)]
pub(super) fn slot_grads<C: CpuFloat>(g: C, u: C, wda: C, ad_dz: C, m: C) -> (C, C, C) {
    let sg = sigmoid(g);
    let silu = g * sg;
    let a = silu * u;
    let da = wda + m * ad_dz;
    let dg = da * u * sg * (C::one() + g * (C::one() - sg));
    let du = da * silu;
    (a, dg, du)
}

// ----- block codes -------------------------------------------------------------------------

pub(super) fn gather_codes(o: &GatherCodes<'_, CpuStorage>, d: &MoeDims) -> Result<CpuStorage> {
    {
        if is_f64(o.src) {
            gather_codes_t::<f64>(o, d)
        } else {
            gather_codes_t::<f32>(o, d)
        }
    }
}

fn gather_codes_t<C: MoeFloat>(o: &GatherCodes<'_, CpuStorage>, d: &MoeDims) -> Result<CpuStorage> {
    let op = "moe_gather_codes";
    let src = read::<C>(op, o.src)?; // [T·k or T, E·r]
    let ids = read_ids(op, o.ids, d.e)?; // [T, k]
    let (k, r, er) = (d.k, d.r, d.e * d.r);
    let per_slot = match src.len() {
        n if n == d.t * k * er => true,
        n if n == d.t * er => false,
        n => {
            return Err(Error::invalid(
                op,
                format!("{n} source elements, expected [T·k or T, E·r] of {er} columns"),
            ))
        }
    };
    check_len(op, ids.len(), d.t * k)?;
    let mut out = vec![C::zero(); d.t * k * r]; // [T, k, r]
    out.par_chunks_mut(r.max(1)).enumerate().for_each(|(p, o)| {
        let row = if per_slot { p } else { p / k };
        let at = row * er + ids[p] as usize * r;
        o.copy_from_slice(&src[at..at + r]);
    });
    let dtype = if is_f64(o.src) {
        DType::F64
    } else {
        DType::F32
    };
    Ok(C::wrap(out, dtype))
}

pub(super) fn expand_codes(
    o: &ExpandCodes<'_, CpuStorage>,
    d: &MoeDims,
    summed: bool,
) -> Result<CpuStorage> {
    {
        if is_f64(o.codes) {
            expand_codes_t::<f64>(o, d, summed)
        } else {
            expand_codes_t::<f32>(o, d, summed)
        }
    }
}

fn expand_codes_t<C: MoeFloat>(
    o: &ExpandCodes<'_, CpuStorage>,
    d: &MoeDims,
    summed: bool,
) -> Result<CpuStorage> {
    let op = "moe_expand_codes";
    let codes = read::<C>(op, o.codes)?; // [T, k, r]
    let ids = read_ids(op, o.ids, d.e)?; // [T, k]
    let (k, r, er) = (d.k, d.r, d.e * d.r);
    check_len(op, codes.len(), d.t * k * r)?;
    check_len(op, ids.len(), d.t * k)?;
    let rows = if summed { d.t } else { d.t * k };
    let mut out = vec![C::zero(); rows * er];
    out.par_chunks_mut(er.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let slots = if summed {
                row * k..(row + 1) * k
            } else {
                row..row + 1
            };
            for p in slots {
                let e = ids[p] as usize;
                for (c, &v) in codes[p * r..(p + 1) * r].iter().enumerate() {
                    o[e * r + c] = o[e * r + c] + v;
                }
            }
        });
    Ok(C::wrap(out, o.codes.s.dtype()))
}

pub(super) fn block_codes(
    o: &Blocks<'_, CpuStorage>,
    d: &MoeDims,
    how: &BlockCodes,
) -> Result<CpuStorage> {
    block_codes_checked(o, d, how)
}

fn block_codes_checked(
    o: &Blocks<'_, CpuStorage>,
    d: &MoeDims,
    how: &BlockCodes,
) -> Result<CpuStorage> {
    let op = "moe_block_codes";
    if how.summed && o.w.is_some() {
        return Err(Error::invalid(
            op,
            "3 operands: expected src, ids and, per slot only, weights",
        ));
    }
    let wide = is_f64(o.src);
    if wide != (how.dtype == DType::F64) || !how.dtype.is_float() {
        return Err(Error::invalid(
            op,
            format!("{} codes into {}", o.src.s.dtype(), how.dtype),
        ));
    }
    if wide {
        block_codes_t::<f64>(o, d, how)
    } else {
        block_codes_t::<f32>(o, d, how)
    }
}

fn block_codes_t<C: MoeFloat>(
    o: &Blocks<'_, CpuStorage>,
    d: &MoeDims,
    how: &BlockCodes,
) -> Result<CpuStorage> {
    let op = "moe_block_codes";
    let src = read::<C>(op, o.src)?;
    let ids = read_ids(op, o.ids, d.e)?; // [T, k]
    let w = o.w.map(|a| read::<C>(op, a)).transpose()?; // [T, k]
    let (k, r, er) = (d.k, d.r, d.e * d.r);
    let (src_rows, out_rows) = if how.summed {
        (d.t * k, d.t)
    } else {
        (d.t, d.t * k)
    };
    check_len(op, src.len(), src_rows * er)?;
    check_len(op, ids.len(), d.t * k)?;
    if let Some(w) = &w {
        check_len(op, w.len(), d.t * k)?;
    }
    let (s, zero) = (C::from_f64(how.scale), C::zero());
    let mut out = vec![zero; out_rows * er];
    out.par_chunks_mut(er.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            // (the source row, the slot) of each of this row's blocks
            let slots = if how.summed {
                row * k..(row + 1) * k
            } else {
                row..row + 1
            };
            for p in slots {
                let (at, from) = (ids[p] as usize * r, if how.summed { p } else { p / k });
                let f = w.as_ref().map(|w| w[p] * s + zero);
                for c in 0..r {
                    let x = src[from * er + at + c];
                    let v = match f {
                        Some(f) => x * f,
                        None => x * s + zero,
                    };
                    o[at + c] = zero + v;
                }
            }
        });
    Ok(C::wrap(out, how.dtype))
}

pub(super) fn check_len(op: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            op,
            format!("an operand of {got} elements where {want} are expected"),
        ));
    }
    Ok(())
}

// ----- SwiGLU over the slots -------------------------------------------------------------------

/// The SwiGLU operands: `G, U` `[T, I]`, `ΔG, ΔU` `[T·k, I]`, widened to `C`.
struct Swiglu<C> {
    g: Vec<C>,
    u: Vec<C>,
    dg: Vec<C>,
    du: Vec<C>,
}

impl<C: MoeFloat> Swiglu<C> {
    /// Reads `[G, U, ΔG, ΔU]`.
    fn read(op: &'static str, [g, u, dg, du]: [Op<'_>; 4], d: &MoeDims) -> Result<Self> {
        let v = Swiglu {
            g: read(op, g)?,
            u: read(op, u)?,
            dg: read(op, dg)?,
            du: read(op, du)?,
        };
        let (ti, tki) = (d.t * d.i, d.t * d.k * d.i);
        for (n, want) in [
            (v.g.len(), ti),
            (v.u.len(), ti),
            (v.dg.len(), tki),
            (v.du.len(), tki),
        ] {
            check_len(op, n, want)?;
        }
        Ok(v)
    }

    /// `(g, u)` of slot `p = t·k + j` at column `i`.
    #[inline(always)]
    fn gu(&self, d: &MoeDims, t: usize, p: usize, i: usize) -> (C, C) {
        (
            self.g[t * d.i + i] + self.dg[p * d.i + i],
            self.u[t * d.i + i] + self.du[p * d.i + i],
        )
    }
}

pub(super) fn swiglu_forward(
    o: &SwigluForward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<(CpuStorage, CpuStorage)> {
    {
        if is_f64(o.w) {
            swiglu_forward_t::<f64>(o, d)
        } else {
            swiglu_forward_t::<f32>(o, d)
        }
    }
}

fn swiglu_forward_t<C: MoeFloat>(
    o: &SwigluForward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "moe_swiglu_forward";
    let x = Swiglu::<C>::read(op, [o.g, o.u, o.dg, o.du], d)?;
    let w = read::<C>(op, o.w)?; // [T, k]
    check_len(op, w.len(), d.t * d.k)?;
    let (k, ni) = (d.k, d.i);
    let mut abar = vec![C::zero(); d.t * ni]; // [T, I]
    let mut am = vec![C::zero(); d.t * k * ni]; // [T·k, I]
    abar.par_chunks_mut(ni.max(1))
        .zip(am.par_chunks_mut((k * ni).max(1)))
        .enumerate()
        .for_each(|(t, (abar, am))| {
            for j in 0..k {
                let p = t * k + j;
                for (i, ab) in abar.iter_mut().enumerate() {
                    let (g, u) = x.gu(d, t, p, i);
                    let a = g * sigmoid(g) * u;
                    *ab = *ab + w[p] * a;
                    am[j * ni + i] = a * keep::<C>(d, p, i);
                }
            }
        });
    let base = o.g.s.dtype();
    Ok((C::wrap(abar, base), C::wrap(am, base)))
}

pub(super) fn swiglu_backward(
    o: &SwigluBackward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<SwigluGrads<CpuStorage>> {
    {
        if is_f64(o.w) {
            swiglu_backward_t::<f64>(o, d)
        } else {
            swiglu_backward_t::<f32>(o, d)
        }
    }
}

fn swiglu_backward_t<C: MoeFloat>(
    o: &SwigluBackward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<SwigluGrads<CpuStorage>> {
    let op = "moe_swiglu_backward";
    let x = Swiglu::<C>::read(op, [o.g, o.u, o.dg, o.du], d)?;
    let dd = read::<C>(op, o.dd)?; // [T·k, I]
    let dabar = read::<C>(op, o.dabar)?; // [T, I]
    let w = read::<C>(op, o.w)?; // [T, k]
    let (k, ni) = (d.k, d.i);
    check_len(op, dd.len(), d.t * k * ni)?;
    check_len(op, dabar.len(), d.t * ni)?;
    check_len(op, w.len(), d.t * k)?;
    let mut dgu = vec![C::zero(); d.t * 2 * ni]; // [T, 2I]
    let mut dg = vec![C::zero(); d.t * k * ni]; // [T·k, I]
    let mut du = vec![C::zero(); d.t * k * ni];
    let mut am = vec![C::zero(); d.t * k * ni];
    let mut dw = vec![C::zero(); d.t * k]; // [T, k]
    let per_tok = (k * ni).max(1);
    dgu.par_chunks_mut((2 * ni).max(1))
        .zip(dg.par_chunks_mut(per_tok))
        .zip(du.par_chunks_mut(per_tok))
        .zip(am.par_chunks_mut(per_tok))
        .zip(dw.par_chunks_mut(k.max(1)))
        .enumerate()
        .for_each(|(t, ((((dgu, dg), du), am), dw))| {
            let (sdg, sdu) = dgu.split_at_mut(ni);
            for j in 0..k {
                let p = t * k + j;
                let mut dot = C::zero();
                for i in 0..ni {
                    let (g, u) = x.gu(d, t, p, i);
                    let m = keep::<C>(d, p, i);
                    let dab = dabar[t * ni + i];
                    let (a, dgv, duv) = slot_grads(g, u, w[p] * dab, dd[p * ni + i], m);
                    dot = dot + dab * a;
                    sdg[i] = sdg[i] + dgv;
                    sdu[i] = sdu[i] + duv;
                    dg[j * ni + i] = dgv;
                    du[j * ni + i] = duv;
                    am[j * ni + i] = a * m;
                }
                dw[j] = dot;
            }
        });
    let (base, adapter) = (o.g.s.dtype(), o.w.s.dtype());
    Ok(SwigluGrads {
        dgu: C::wrap(dgu, base),
        dg: C::wrap(dg, base),
        du: C::wrap(du, base),
        am: C::wrap(am, base),
        dw: C::wrap(dw, adapter),
    })
}

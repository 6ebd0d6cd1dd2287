//! The code layouts on tensors: the experts' LoRA weights laid out for the block-code GEMMs, and
//! the rank-r codes moved between the slot layout `[T, k, r]` and block codes `[rows, E·r]`
//! (row `(t, j)` or `t` holding each slot's `r` codes in its expert's column block, zeros
//! elsewhere) by the unit's primitives. None of these records a tape node: the op's own backward
//! covers them.

use super::primitives::{self as prim, BlockCodes, MoeDims};
use crate::fused::read;
use crate::{DType, Result, Tensor};

/// The experts' LoRA weights laid out for the block-code GEMMs, in the base dtype.
pub(super) struct LoraLayouts {
    pub b_gate: Tensor, // [I, E·r]
    pub b_up: Tensor,   // [I, E·r]
    pub a_down: Tensor, // [E·r, I]
    pub b_down: Tensor, // [H, E·r]
}

impl LoraLayouts {
    pub fn new(bg: &Tensor, bu: &Tensor, ad: &Tensor, bd: &Tensor, base: DType) -> Result<Self> {
        let (e, r, i) = (ad.dims()[0], ad.dims()[1], ad.dims()[2]);
        Ok(LoraLayouts {
            b_gate: all_experts(bg, base)?,
            b_up: all_experts(bu, base)?,
            a_down: ad.reshape([e * r, i])?.to_dtype(base)?,
            b_down: all_experts(bd, base)?,
        })
    }
}

/// All experts' LoRA A `[E, r, n]` as one `[E·r, n]` matrix in `dtype`.
pub(super) fn all_a(a: &Tensor, dtype: DType) -> Result<Tensor> {
    let (e, r, n) = (a.dims()[0], a.dims()[1], a.dims()[2]);
    a.reshape([e * r, n])?.to_dtype(dtype)
}

/// `[E, n, r]` → `[n, E·r]` (row `c` holds every expert's row `c`) in `dtype`: one pass (the
/// conversion reads the permuted view).
fn all_experts(b: &Tensor, dtype: DType) -> Result<Tensor> {
    let (e, n, r) = (b.dims()[0], b.dims()[1], b.dims()[2]);
    let permuted = b.permute(&[1, 0, 2])?; // [n, E, r] view
    let laid_out = if b.dtype() == dtype {
        permuted.contiguous()?
    } else {
        permuted.to_dtype(dtype)?
    };
    laid_out.reshape([n, e * r])
}

/// `[n, E·r]` → `[E, n, r]`, the inverse of [`all_experts`].
pub(super) fn per_expert(m: &Tensor, e: usize, r: usize, n: usize) -> Result<Tensor> {
    m.reshape([n, e, r])?.permute(&[1, 0, 2])?.contiguous()
}

/// Each slot's `r` codes out of block codes `src` `[T·k or T, E·r]`: `[T, k, r]` adapter.
pub(super) fn gather(src: &Tensor, ids: &Tensor, d: &MoeDims) -> Result<Tensor> {
    let d = MoeDims {
        t: ids.dims()[0],
        ..*d
    };
    let out = read([src, ids], |[src, ids]| {
        prim::gather_codes(prim::GatherCodes { src, ids }, &d)
    })?;
    Ok(Tensor::from_storage(out, [d.t, d.k, d.r], None))
}

/// Per-token block codes `[T, E·r]` of `codes` `[T, k, r]`: the token's slots summed (their
/// blocks are distinct).
pub(super) fn expand_summed(codes: &Tensor, ids: &Tensor, d: &MoeDims) -> Result<Tensor> {
    let out = read([codes, ids], |[codes, ids]| {
        prim::expand_codes(prim::ExpandCodes { codes, ids }, d, true)
    })?;
    Ok(Tensor::from_storage(out, [d.t, d.e * d.r], None))
}

/// `s·Z[t, e_j]` of every slot as block codes `[T·k, E·r]` in `dtype`, from `Z` `[T, E·r]`.
pub(super) fn slot_codes(
    z: &Tensor,
    ids: &Tensor,
    s: f64,
    d: &MoeDims,
    dtype: DType,
) -> Result<Tensor> {
    block_codes(z, ids, None, s, false, d, dtype)
}

/// Scaled block codes in `dtype`, in one backend pass (`moe_block_codes`: the values of gather,
/// affine, mul, expand and conversion): per slot `[T·k, E·r]` from per-token block codes `src`
/// `[T, E·r]`, `s·src[t]` (or with weights `w` `[T, k]`, `(s·w[t, j])·src[t]`) in the slot's
/// block; or (`summed`) per token `[T, E·r]` from per-slot block codes `src` `[T·k, E·r]`, the
/// blocks of a token's slots scaled by `s`.
pub(super) fn block_codes(
    src: &Tensor,
    ids: &Tensor,
    w: Option<&Tensor>,
    s: f64,
    summed: bool,
    d: &MoeDims,
    dtype: DType,
) -> Result<Tensor> {
    let rows = if summed { d.t } else { d.t * d.k };
    let how = BlockCodes {
        scale: s,
        summed,
        dtype,
    };
    let out = match w {
        Some(w) => read([src, ids, w], |[src, ids, w]| {
            prim::block_codes(
                prim::Blocks {
                    src,
                    ids,
                    w: Some(w),
                },
                d,
                &how,
            )
        }),
        None => read([src, ids], |[src, ids]| {
            prim::block_codes(prim::Blocks { src, ids, w: None }, d, &how)
        }),
    }?;
    Ok(Tensor::from_storage(out, [rows, d.e * d.r], None))
}

/// `s·Z[t, e_j]` of every slot, `[T·k, r]` in `dtype`, from `Z` `[T, E·r]`.
pub(super) fn compact_codes(
    z: &Tensor,
    ids: &Tensor,
    s: f64,
    d: &MoeDims,
    dtype: DType,
) -> Result<Tensor> {
    gather(z, ids, d)?
        .affine(s, 0.0)?
        .to_dtype(dtype)?
        .reshape([d.t * d.k, d.r])
}

/// The down-LoRA codes `s·w_j·Z_d[t, j]` as per-token block codes `[T, E·r]` (adapter dtype).
pub(super) fn down_codes(
    zd: &Tensor,
    wts: &Tensor,
    ids: &Tensor,
    s: f64,
    d: &MoeDims,
) -> Result<Tensor> {
    let sw = wts.reshape([d.t, d.k, 1])?.affine(s, 0.0)?;
    expand_summed(&zd.mul(&sw)?, ids, d)
}

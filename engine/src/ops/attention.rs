//! Causal scaled dot-product attention with grouped-query heads, padding masks or packed
//! segments and a query offset (KV-cache decoding): two matmuls around the fused causal,
//! key-masked softmax, so its backward comes from theirs.

use super::{float_only, same_device, same_dtype, u32_only};
use crate::{Error, Result, Tensor};

/// `softmax(q kᵀ / √d) v` over the visible keys (causal, and not padding).
///
/// - `q`: `[b, hq, t, d]`; `k`, `v`: `[b, hkv, s, d]` with `hq` a multiple of `hkv`: kv head `j`
///   serves the `hq / hkv` consecutive query heads `j·hq/hkv ..` (grouped-query attention,
///   without materialising repeated keys).
/// - Query `i` sits at key position `q_offset + i` and sees keys `0 ..= q_offset + i`; with a KV
///   cache, `s = q_offset + t`. `q_offset + t` may not exceed `s`.
/// - `key_mask`: u32 `[b, s]`, 0 for padding (never attended to), else the token's segment: 1
///   for every real token of an unpacked batch, or `1, 2, ..` for the sequences packed into one
///   row, where a query sees only the earlier keys of its own segment (block-diagonal causal
///   attention, [`Tensor::causal_masked_softmax`]).
///
/// The scores go through [`Tensor::causal_masked_softmax`] (scale folded in, no bias tensor):
/// masked keys get weight exactly 0, and a row with no visible key (a left-padding query) gets
/// all-zero weights, hence a zero output and zero gradients rather than NaN; such rows must be
/// left out of the loss. Returns `[b, hq, t, d]`.
///
/// Saved for the backward: `q`, `k`, `v` (each matmul keeps the other operand) and the
/// probabilities `[b, hq, t, s]`; the scores are freed as soon as the softmax has run.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    q_offset: usize,
) -> Result<Tensor> {
    const OP: &str = "causal_attention";
    let [b, hq, hkv, t, s, d] = attention_dims(OP, q, k, v, key_mask, q_offset)?;
    let group = hq / hkv;
    let scale = if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() };
    // Query heads of one kv head are consecutive: fold them into the rows of one product.
    let qg = q.reshape([b, hkv, group * t, d])?; // [b, hkv, g·t, d]
    let scores = qg.matmul(&k.t()?)?.reshape([b, hq, t, s])?; // [b, hq, t, s], unscaled
    let probs = scores.causal_masked_softmax(scale, q_offset, key_mask)?; // [b, hq, t, s]
    let out = probs.reshape([b, hkv, group * t, s])?.matmul(v)?; // [b, hkv, g·t, d]
    out.reshape([b, hq, t, d])
}

/// The checks of an attention op (`causal_attention`, `flash_attention`) on its operands, as
/// [`causal_attention`] documents them; returns `[b, hq, hkv, t, s, d]`.
pub(crate) fn attention_dims(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    q_offset: usize,
) -> Result<[usize; 6]> {
    same_dtype(op, q, k)?;
    same_dtype(op, q, v)?;
    same_device(op, q, k)?;
    same_device(op, q, v)?;
    float_only(op, q)?;
    for x in [q, k, v] {
        if x.rank() != 4 {
            return Err(Error::RankMismatch {
                op,
                expected: 4,
                shape: x.shape().clone(),
            });
        }
    }
    let (b, hq, t, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
    let (hkv, s) = (k.dims()[1], k.dims()[2]);
    if k.dims()[0] != b || k.dims()[3] != d || hkv == 0 || hq % hkv != 0 {
        return Err(Error::ShapeMismatch {
            op,
            lhs: q.shape().clone(),
            rhs: k.shape().clone(),
        });
    }
    if v.shape() != k.shape() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: k.shape().clone(),
            rhs: v.shape().clone(),
        });
    }
    if q_offset + t > s {
        return Err(Error::invalid(
            op,
            format!(
                "{t} queries at offset {q_offset} need at least {} keys, got {s}",
                q_offset + t
            ),
        ));
    }
    if let Some(m) = key_mask {
        u32_only(op, m)?;
        same_device(op, q, m)?;
        if m.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                op,
                lhs: k.shape().clone(),
                rhs: m.shape().clone(),
            });
        }
    }
    Ok([b, hq, hkv, t, s, d])
}

//! Causal scaled dot-product attention with grouped-query heads, padding masks and a query offset
//! (KV-cache decoding). A composite of engine ops, so its backward comes from theirs.

use super::{float_only, same_device, same_dtype, u32_only};
use crate::{DType, Device, Error, Result, Tensor};

/// Additive bias on masked scores: `exp` of it underflows to 0 against any real score, yet it is
/// finite, so a fully masked row stays finite: all its scores get the same bias, and its weights
/// are the softmax of the unmasked scores instead of NaN.
const MASK_BIAS: f64 = -1e9;

/// `[b or 1, 1, t, s]` bias: 0 where query `i` (at key position `q_offset + i`) may see key `j`
/// (`j <= q_offset + i` and, with a mask, `key_mask[b, j] != 0`), `MASK_BIAS` elsewhere.
fn mask_bias(
    dtype: DType,
    device: Device,
    (b, t, s): (usize, usize, usize),
    q_offset: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let qpos = Tensor::arange(q_offset + t, device)?
        .narrow(0, q_offset, t)?
        .reshape([t, 1])?; // [t, 1] u32
    let kpos = Tensor::arange(s, device)?.reshape([1, s])?; // [1, s] u32
    let mut visible = kpos.le(&qpos)?.reshape([1, 1, t, s])?; // [1, 1, t, s] u32 0/1
    if let Some(m) = key_mask {
        let none = Tensor::zeros((), DType::U32, device)?;
        visible = m.reshape([b, 1, 1, s])?.where_cond(&visible, &none)?; // [b, 1, t, s]
    }
    let zero = Tensor::zeros((), dtype, device)?;
    let neg = Tensor::full((), MASK_BIAS, dtype, device)?;
    visible.where_cond(&zero, &neg)
}

/// `softmax(q kᵀ / √d + bias) v` with a causal mask.
///
/// - `q`: `[b, hq, t, d]`; `k`, `v`: `[b, hkv, s, d]` with `hq` a multiple of `hkv`: kv head `j`
///   serves the `hq / hkv` consecutive query heads `j·hq/hkv ..` (grouped-query attention,
///   without materialising repeated keys).
/// - Query `i` sits at key position `q_offset + i` and sees keys `0 ..= q_offset + i`; with a KV
///   cache, `s = q_offset + t`. `q_offset + t` may not exceed `s`.
/// - `key_mask`: u32 `[b, s]`, 1 for a real token, 0 for padding (never attended to).
///
/// Masked scores get a large finite negative bias, so a row with no visible key (a left-padding
/// query) gives a finite, meaningless output rather than NaN; such rows must be left out of the
/// loss. Returns `[b, hq, t, d]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    q_offset: usize,
) -> Result<Tensor> {
    const OP: &str = "causal_attention";
    same_dtype(OP, q, k)?;
    same_dtype(OP, q, v)?;
    same_device(OP, q, k)?;
    same_device(OP, q, v)?;
    float_only(OP, q)?;
    for x in [q, k, v] {
        if x.rank() != 4 {
            return Err(Error::RankMismatch {
                op: OP,
                expected: 4,
                shape: x.shape().clone(),
            });
        }
    }
    let (b, hq, t, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
    let (hkv, s) = (k.dims()[1], k.dims()[2]);
    if k.dims()[0] != b || k.dims()[3] != d || hkv == 0 || hq % hkv != 0 {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: q.shape().clone(),
            rhs: k.shape().clone(),
        });
    }
    if v.shape() != k.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: k.shape().clone(),
            rhs: v.shape().clone(),
        });
    }
    if q_offset + t > s {
        return Err(Error::invalid(
            OP,
            format!(
                "{t} queries at offset {q_offset} need at least {} keys, got {s}",
                q_offset + t
            ),
        ));
    }
    if let Some(m) = key_mask {
        u32_only(OP, m)?;
        same_device(OP, q, m)?;
        if m.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: k.shape().clone(),
                rhs: m.shape().clone(),
            });
        }
    }
    let group = hq / hkv;
    let scale = if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() };
    // Query heads of one kv head are consecutive: fold them into the rows of one product.
    let qs = q.mul_scalar(scale)?.reshape([b, hkv, group * t, d])?; // [b, hkv, g·t, d]
    let scores = qs.matmul(&k.t()?)?.reshape([b, hq, t, s])?; // [b, hq, t, s]
    let bias = mask_bias(q.dtype(), q.device(), (b, t, s), q_offset, key_mask)?; // [b|1, 1, t, s]
    let probs = scores.add(&bias)?.softmax_last_dim()?; // [b, hq, t, s]
    let out = probs.reshape([b, hkv, group * t, s])?.matmul(v)?; // [b, hkv, g·t, d]
    out.reshape([b, hq, t, d])
}

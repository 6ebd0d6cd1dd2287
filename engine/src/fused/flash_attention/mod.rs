//! Flash attention: [`crate::causal_attention`] as one fused op that never materialises the
//! `[b, hq, t, s]` scores or probabilities. The forward runs an online softmax over key blocks
//! and keeps per query row only the log-sum-exp of its visible scores; the backward recomputes
//! the probabilities block by block from it.
//!
//! Files: the primitives' named operands and dispatch (`primitives.rs`), the CPU forward
//! (`cpu.rs`) and backward (`cpu_backward.rs`), the CUDA launchers (`cuda.rs`) over the kernels
//! of `kernels/src/flash_attention.cu`.

mod cpu;
mod cpu_backward;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

use self::primitives::{self as prim, FlashBackward, FlashForward, FlashParams};
use crate::autograd::{no_grad, Input, Node, Output};
use crate::fused::read;
use crate::ops::attention_dims;
use crate::{DType, Device, Layout, Result, Storage, Tensor};

/// Whether the CUDA kernels take operands of `dtype` with head dim `d`: f32 or bf16 (f32
/// accumulation), `d` 64 or 128.
pub fn cuda_supports(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16) && matches!(d, 64 | 128)
}

/// `softmax(q kᵀ / √d) v` over the visible keys, with exactly the semantics of
/// [`crate::causal_attention`] (grouped-query heads without repeated keys, `q_offset` for a KV
/// cache, `key_mask` u32 `[b, s]` with 0 for padding and segment ids `1, 2, ..` for packed rows,
/// zero output and zero gradients on a row with no visible key), computed without the
/// `[b, hq, t, s]` probabilities.
///
/// `q` `[b, hq, t, d]`, `k`, `v` `[b, hkv, s, d]` are read through their strides, so the
/// projections `[B, T, H, D]` viewed as `[B, H, T, D]` need no copy. The result `[b, hq, t, d]`
/// is a view of a buffer laid out `[b, t, hq, d]`, so that `transpose(1, 2)` and the reshape
/// to `[b, t, hq·d]` the output projection reads cost nothing; the gradients of `q`, `k`, `v`
/// are laid out the same way.
///
/// Forward, per query row `i` (scores `x_j = q_i·k_j / √d` of the visible keys `j`):
/// `m = max_j x_j`, `l = Σ_j exp(x_j − m)`, `o_i = Σ_j exp(x_j − m) v_j / l`, accumulated over
/// key blocks with the running `(m, l, o)` rescaled by `exp(m_old − m_new)` (online softmax);
/// `lse_i = m + ln l`, `−∞` (and `o_i = 0`) when no key is visible.
///
/// Backward, with `P_ij = exp(x_ij − lse_i)` recomputed per block (0 where invisible) and
/// `D_i = Σ_e dO_ie O_ie`:
/// `dV_j = Σ_i P_ij dO_i`, `dP_ij = dO_i·v_j`, `dS_ij = P_ij (dP_ij − D_i) / √d`,
/// `dQ_i = Σ_j dS_ij k_j`, `dK_j = Σ_i dS_ij q_i`; `dK` and `dV` of a kv head sum over the
/// query heads of its group. `D_i` equals the composite's `Σ_j P_ij dP_ij` only up to rounding,
/// so where the exact `dQ_i` is 0 (a query that sees a single key) flash gives a rounding-sized
/// value instead of an exact 0.
///
/// Saved for the backward: `q`, `k`, `v`, the output and `lse` `[b, hq, t]` (in the
/// accumulation dtype: f32 for f32 and bf16, f64 for f64), and the key mask.
///
/// On the CPU every float dtype and head dim runs. On a GPU the kernels take f32 and bf16 at
/// head dims 64 and 128 ([`cuda_supports`]); other cases run [`crate::causal_attention`]
/// (the same values, with its memory).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    q_offset: usize,
) -> Result<Tensor> {
    const OP: &str = "flash_attention";
    let [b, hq, _, t, _, d] = attention_dims(OP, q, k, v, key_mask, q_offset)?;
    if matches!(q.device(), Device::Cuda(_)) && !cuda_supports(q.dtype(), d) {
        return crate::causal_attention(q, k, v, key_mask, q_offset);
    }
    let p = FlashParams {
        scale: if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() },
        q_offset,
    };
    let (out, lse) = no_grad(|| match key_mask {
        Some(m) => read([q, k, v, m], |[q, k, v, m]| {
            prim::forward(
                FlashForward {
                    q,
                    k,
                    v,
                    key_mask: Some(m),
                },
                p,
            )
        }),
        None => read([q, k, v], |[q, k, v]| {
            prim::forward(
                FlashForward {
                    q,
                    k,
                    v,
                    key_mask: None,
                },
                p,
            )
        }),
    })?;
    let lse = Tensor::from_storage(lse, [b, hq, t], None); // [b, hq, t]
    let saved_lse = lse.clone();
    let mut inputs = vec![Input::Keep(q), Input::Keep(k), Input::Keep(v)];
    inputs.extend(key_mask.map(Input::Keep));
    let node = Node::record_with(OP, &inputs, Output::Read, move |x, out, g| {
        backward(&x[0], &x[1], &x[2], x.get(3), out, g, &lse, p)
    })
    .map(|n| n.capturing(&[&saved_lse]));
    Ok(bthd_view(out, [b, hq, t, d], node))
}

/// A `[b, h, n, d]` tensor over `st`, a contiguous `[b, n, h, d]` buffer.
fn bthd_view(st: Storage, [b, h, n, d]: [usize; 4], node: Option<Node>) -> Tensor {
    let layout = Layout::contiguous([b, n, h, d]).transpose(1, 2);
    Tensor::from_storage(st, [b, n, h, d], None).view(layout, node)
}

/// The backward of [`flash_attention`]: `[dq, dk, dv]` (each `None` unless its input tracks a
/// gradient) and `None` for the key mask.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    out: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    p: FlashParams,
) -> Result<Vec<Option<Tensor>>> {
    let (qd, kd) = (q.dims(), k.dims());
    let g = g.to_dtype(q.dtype())?;
    let (dq, dk, dv) = match key_mask {
        Some(m) => read([q, k, v, out, &g, lse, m], |[q, k, v, out, grad, lse, m]| {
            let o = FlashBackward {
                q,
                k,
                v,
                out,
                grad,
                lse,
                key_mask: Some(m),
            };
            prim::backward(o, p)
        }),
        None => read([q, k, v, out, &g, lse], |[q, k, v, out, grad, lse]| {
            let o = FlashBackward {
                q,
                k,
                v,
                out,
                grad,
                lse,
                key_mask: None,
            };
            prim::backward(o, p)
        }),
    }?;
    let dims = |x: &[usize]| [x[0], x[1], x[2], x[3]];
    let grad = |t: &Tensor, st: Storage, x: &[usize]| {
        t.tracks_grad().then(|| bthd_view(st, dims(x), None))
    };
    let mut grads = vec![grad(q, dq, qd), grad(k, dk, kd), grad(v, dv, kd)];
    if key_mask.is_some() {
        grads.push(None);
    }
    Ok(grads)
}

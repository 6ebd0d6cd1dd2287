//! Flash attention's backend primitives: their named operands and their dispatch to the CPU
//! (`cpu.rs`, `cpu_backward.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! Shapes: `q` `[b, hq, t, d]`, `k`, `v` `[b, hkv, s, d]` (`hq` a multiple of `hkv`), any
//! strides (the model's `[B, T, H, D]` projections viewed as `[B, H, T, D]` are read in place);
//! `out` and `grad` `[b, hq, t, d]` of the same dtype, any strides; `lse` `[b, hq, t]` in the
//! accumulation dtype ([`DType::accumulation`]: f32 for f32 and bf16, f64 for f64); `key_mask`
//! u32 `[b, s]`, 0 for padding, else the key's segment id.
//!
//! Results are contiguous in the `[b, t, h, d]` order (the order the model's next projection
//! reads), returned to the tensor op, which views them as `[b, h, t, d]`.
//!
//! [`DType::accumulation`]: crate::DType::accumulation

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use crate::fused::{on_backend, operands};
use crate::{Result, Storage};

/// What both primitives are told besides their operands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashParams {
    /// `1/√d` (1 when `d = 0`), applied to the scores `q·k` as [`crate::causal_attention`] does.
    pub scale: f64,
    /// The key position of query 0 (KV-cache decoding); `q_offset + t ≤ s`.
    pub q_offset: usize,
}

operands! {
    /// The forward: `out = softmax(scale·q kᵀ) v` over the visible keys, and each query row's
    /// log-sum-exp of the scaled visible scores.
    pub struct FlashForward {
        q: Operand,           // [b, hq, t, d]
        k: Operand,           // [b, hkv, s, d]
        v: Operand,           // [b, hkv, s, d]
        key_mask: OptOperand, // [b, s] u32
    }
}

operands! {
    /// The backward: the gradients of `q`, `k` and `v` given the gradient `grad` of `out`.
    pub struct FlashBackward {
        q: Operand,           // [b, hq, t, d]
        k: Operand,           // [b, hkv, s, d]
        v: Operand,           // [b, hkv, s, d]
        out: Operand,         // [b, hq, t, d]
        grad: Operand,        // [b, hq, t, d]
        lse: Operand,         // [b, hq, t] accumulation dtype
        key_mask: OptOperand, // [b, s] u32
    }
}

/// `(out, lse)`: `out` contiguous `[b, t, hq, d]` in `q`'s dtype, `lse` contiguous `[b, hq, t]`
/// in the accumulation dtype, `−∞` on a row with no visible key (whose output is 0).
pub fn forward(o: FlashForward<'_, Storage>, p: FlashParams) -> Result<(Storage, Storage)> {
    const OP: &str = "flash_attention";
    on_backend!(OP, o, o => cpu::forward(o, p), cuda::forward(o, p))
}

/// `(dq, dk, dv)`, contiguous `[b, t, hq, d]`, `[b, s, hkv, d]`, `[b, s, hkv, d]` in `q`'s dtype.
pub fn backward(
    o: FlashBackward<'_, Storage>,
    p: FlashParams,
) -> Result<(Storage, Storage, Storage)> {
    const OP: &str = "flash_attention_backward";
    on_backend!(OP, o, o => cpu::backward(o, p), cuda::backward(o, p))
}

/// The sizes of one attention call, checked from the operands' layouts by both backends.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
}

impl Dims {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// Checks the layouts of `q` `[b, hq, t, d]`, `k`, `v` `[b, hkv, s, d]`, the optional
    /// `[b, hq, t, d]` ones (`out`, `grad`), `lse` `[b, hq, t]` and `key_mask` `[b, s]` against
    /// each other and `q_offset + t ≤ s`.
    pub fn check(
        op: &'static str,
        [q, k, v]: [&crate::Layout; 3],
        like_q: &[&crate::Layout],
        lse: Option<&crate::Layout>,
        key_mask: Option<&crate::Layout>,
        p: FlashParams,
    ) -> Result<Dims> {
        let bad = |lhs: &crate::Layout, rhs: &crate::Layout| crate::Error::ShapeMismatch {
            op,
            lhs: lhs.shape().clone(),
            rhs: rhs.shape().clone(),
        };
        if q.dims().len() != 4 || k.dims().len() != 4 {
            return Err(bad(q, k));
        }
        let (qd, kd) = (q.dims(), k.dims());
        let dims = Dims {
            b: qd[0],
            hq: qd[1],
            hkv: kd[1],
            t: qd[2],
            s: kd[2],
            d: qd[3],
        };
        if kd[0] != dims.b || kd[3] != dims.d || dims.hkv == 0 || dims.hq % dims.hkv != 0 {
            return Err(bad(q, k));
        }
        if v.dims() != kd {
            return Err(bad(k, v));
        }
        if let Some(l) = like_q.iter().find(|l| l.dims() != qd) {
            return Err(bad(q, l));
        }
        if let Some(l) = lse.filter(|l| l.dims() != [dims.b, dims.hq, dims.t]) {
            return Err(bad(q, l));
        }
        if let Some(l) = key_mask.filter(|l| l.dims() != [dims.b, dims.s]) {
            return Err(bad(k, l));
        }
        if p.q_offset + dims.t > dims.s {
            return Err(crate::Error::invalid(
                op,
                format!(
                    "{} queries at offset {} need at least {} keys, got {}",
                    dims.t,
                    p.q_offset,
                    p.q_offset + dims.t,
                    dims.s
                ),
            ));
        }
        Ok(dims)
    }
}

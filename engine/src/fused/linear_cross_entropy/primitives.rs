//! The chunked linear cross-entropy's backend primitives: their named operands and their dispatch
//! to the CPU reference (`cpu.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! Shapes: `x` `[n, c]` is one vocabulary chunk of the logits (columns `v0..v0+c` of the full
//! `[n, v_total]` logits), any rank-2 view of a float dtype; `targets` `[n]` u32; `state`
//! `[n, 3]`, `lse` and `grad_rows` `[n]` in the accumulation dtype ([`DType::accumulation`] of
//! the logits': f32 for f32 and bf16, f64 for f64).
//!
//! [`DType::accumulation`]: crate::DType::accumulation

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use crate::fused::{on_backend, operands};
use crate::{Result, Storage};

operands! {
    /// One vocabulary chunk folded into the per-row running statistics `state`, in place.
    pub struct ChunkUpdate {
        x: Operand,        // [n, c] logits
        targets: Operand,  // [n] u32
        state: OperandMut, // [n, 3] accumulation dtype, contiguous
    }
}

operands! {
    /// The gradient `[n, c]` of one vocabulary chunk's logits, in their dtype.
    pub struct ChunkBackward {
        x: Operand,         // [n, c] logits
        targets: Operand,   // [n] u32
        lse: Operand,       // [n] accumulation dtype
        grad_rows: Operand, // [n] accumulation dtype
    }
}

/// One vocabulary chunk of an online log-sum-exp. `state` holds per row `(running max m,
/// running Σ exp(x − m), target logit)` and is updated in place: `m' = max(m, max_j x_j)`,
/// `s' = s·exp(m − m') + Σ_j exp(x_j − m')`, and the target logit is taken when
/// `v0 ≤ t < v0 + c` (and `t ≠ ignore_index`). Start from `(−∞, 0, 0)`; after the last chunk
/// `logsumexp = m + ln s`. A target `≥ v_total` (not ignored) is an error on the CPU and a NaN
/// target logit on the GPU.
pub fn chunk_update(
    o: ChunkUpdate<'_, Storage>,
    v0: usize,
    v_total: usize,
    ignore_index: u32,
) -> Result<()> {
    const OP: &str = "cross_entropy_chunk_update";
    on_backend!(
        OP,
        o,
        o => cpu::chunk_update(o, v0, v_total, ignore_index),
        cuda::chunk_update(o, v0, v_total, ignore_index)
    )
}

/// The gradient of a vocabulary chunk's logits `x` `[n, c]` (columns `v0..v0+c`):
/// `dx[r, j] = (exp(x[r, j] − lse[r]) − [v0 + j == t[r]]) · g[r]`, a zero row where ignored;
/// a contiguous `[n, c]` of the logits' dtype.
pub fn chunk_backward(
    o: ChunkBackward<'_, Storage>,
    v0: usize,
    ignore_index: u32,
) -> Result<Storage> {
    const OP: &str = "cross_entropy_chunk_backward";
    on_backend!(
        OP,
        o,
        o => cpu::chunk_backward(o, v0, ignore_index),
        cuda::chunk_backward(o, v0, ignore_index)
    )
}

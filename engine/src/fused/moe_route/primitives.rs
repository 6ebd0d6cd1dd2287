//! The router unit's backend primitives: their named operands and their dispatch to the CPU
//! reference (`cpu.rs`) or the CUDA launchers (`cuda.rs`).
//!
//! Shapes: `N` tokens, `E` experts, `k` experts per token. Logits, probs, weights and their
//! gradients share one float dtype (computed in f32, f64 for f64); ids are u32.

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use crate::fused::{on_backend, operands};
use crate::{Error, Layout, Result, Storage};

operands! {
    /// `(probs [N, E], ids [N, k] u32, weights [N, k])`: the softmax of each row, its `k` most
    /// probable experts (largest first, ties by lower index, NaN largest) and their
    /// probabilities divided by their sum.
    pub struct RouteTopk {
        logits: Operand, // [N, E] float
    }
}

operands! {
    /// `dlogits` `[N, E]` of the top-k weights: `dl[t, ids[t, j]] = w[t, j] · (gw[t, j] −
    /// Σ_i w[t, i] gw[t, i])`, zero elsewhere (ids ≥ E are skipped).
    pub struct RouteTopkBackward {
        w: Operand,   // [N, k] the weights
        ids: Operand, // [N, k] u32
        gw: Operand,  // [N, k] the weights' gradient, w's dtype
    }
}

pub fn route_topk(o: RouteTopk<'_, Storage>, k: usize) -> Result<(Storage, Storage, Storage)> {
    const OP: &str = "moe_route_topk";
    on_backend!(
        OP,
        o,
        o => cpu::route_topk(o, k),
        cuda::route_topk(o, k)
    )
}

pub fn route_topk_backward(
    o: RouteTopkBackward<'_, Storage>,
    num_experts: usize,
) -> Result<Storage> {
    const OP: &str = "moe_route_topk_backward";
    on_backend!(
        OP,
        o,
        o => cpu::route_topk_backward(o, num_experts),
        cuda::route_topk_backward(o, num_experts)
    )
}

// ----- checks shared by the backends ---------------------------------------------------------

/// Errors unless `1 ≤ k ≤ e` for logits `l` `[n, e]`.
pub(super) fn check_k(op: &'static str, k: usize, e: usize, l: &Layout) -> Result<()> {
    if k == 0 || k > e {
        return Err(Error::invalid(
            op,
            format!("k = {k} must be in 1..={e} for logits {}", l.shape()),
        ));
    }
    Ok(())
}

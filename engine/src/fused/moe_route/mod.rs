//! The router unit: the fused top-k of the MixLoRA router ([`Tensor::moe_route_topk`]), the
//! softmax over the experts, the `k` most probable ones and their renormalised weights in one
//! pass, and its hand-written backward. Nothing is read back to the host.
//!
//! Files: the primitives' named operands and dispatch (`primitives.rs`), the CPU reference
//! (`cpu.rs`), the CUDA launchers (`cuda.rs`) over the kernels of `kernels/src/moe_route.cu`.
//! The maths of the router is in docs/DESIGN.md (section 1, "Router").

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod primitives;

use self::primitives as prim;
use crate::autograd::{Input, Node, Output};
use crate::fused::read;
use crate::ops::float_only;
use crate::{Result, Tensor};

impl Tensor {
    /// Top-k routing of router logits `self` `[N, E]` (f32/bf16/f64) in one fused kernel:
    /// `(probs [N, E], ids [N, k] u32, weights [N, k])` with `probs = softmax(logits)` per row,
    /// `ids` the `k` most probable experts, largest first (ties: lower index first, NaN largest:
    /// the order of [`Tensor::topk`]) and `weights[t, j] = p[t, ids[t, j]] / Σ_i p[t, ids[t, i]]`.
    /// Probs and weights have the logits' dtype (computed in the accumulation dtype).
    ///
    /// Autograd: both `probs` and `weights` are differentiable w.r.t. the logits.
    /// `dlogits = p ⊙ (gp − Σ gp ⊙ p)` from `probs`; the weights are the softmax of the selected
    /// logits, so from `weights` (one fused kernel per row, `moe_route_topk_backward`):
    /// `dlogits[t, ids[t, j]] = w[t, j] · (gw[t, j] − Σ_i w[t, i] gw[t, i])`, zero elsewhere.
    pub fn moe_route_topk(&self, k: usize) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "moe_route_topk";
        float_only(OP, self)?;
        let (n, e) = crate::backend::checks::dims2(OP, self.layout())?;
        prim::check_k(OP, k, e, self.layout())?;
        let (p, i, w) = read([self], |[logits]| {
            prim::route_topk(prim::RouteTopk { logits }, k)
        })?;
        let ids = Tensor::from_storage(i, [n, k], None);
        // Both rules read their own output only, never the logits.
        let logits = [Input::GraphOnly(self)];
        let p_node = Node::record_with("moe_route_topk_probs", &logits, Output::Read, |_, y, g| {
            let dot = g.mul(y)?.sum_keepdim(-1)?;
            Ok(vec![Some(y.mul(&g.sub(&dot)?)?)])
        });
        let probs = Tensor::from_storage(p, [n, e], p_node);
        let ids_c = ids.clone();
        let w_node = Node::record_with(
            "moe_route_topk_weights",
            &logits,
            Output::Read,
            move |_, w, g| {
                let dl = read([w, &ids_c, g], |[w, ids, gw]| {
                    prim::route_topk_backward(prim::RouteTopkBackward { w, ids, gw }, e)
                })?;
                Ok(vec![Some(Tensor::from_storage(dl, [n, e], None))])
            },
        )
        .map(|n| n.capturing(&[&ids]));
        let weights = Tensor::from_storage(w, [n, k], w_node);
        Ok((probs, ids, weights))
    }
}

//! [`MoeImpl::Fused`](super::MoeImpl::Fused): the MixLoRA FFN through the engine's fused op
//! (`engine::moe_ffn`, the `fused` method of docs/DESIGN.md): the top-k routing and the experts'
//! LoRA weights stacked into `[E, ..]` tensors, everything else inside the op.

use engine::{moe_ffn, MoeDropout, MoeFfnOptions, MoeFusedWeights, MoeRouting, Tensor};

use super::lora::LoraLinear;
use super::mixlora::{MixLoraFfn, SharedFfn};
use super::router::RouterOutput;
use crate::error::Result;

/// One projection's LoRA of every expert stacked along a new leading dim (`[E, ..]`), when all
/// experts have it with the same scale and dropout: views of the experts' buffer when their
/// matrices lie back to back in it (as the adapters lay them out), copies otherwise.
fn stack(
    loras: &[Option<&LoraLinear>],
    scale: f64,
    dropout: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut a = Vec::with_capacity(loras.len());
    let mut b = Vec::with_capacity(loras.len());
    for l in loras {
        let Some(l) = l else { return Ok(None) };
        if l.scale != scale || l.dropout != dropout {
            return Ok(None);
        }
        a.push(&l.a); // [r, in]
        b.push(&l.b); // [out, r]
    }
    Ok(Some((engine::stack(&a)?, engine::stack(&b)?))) // [E, r, in], [E, out, r]
}

impl MixLoraFfn {
    /// The fused path for top-`k` routing of `x` `[N, H]`, or `None` when it does not apply (some
    /// expert lacks a LoRA on gate, up or down, or the experts' scales, dropouts or ranks
    /// differ): the caller then runs the naive loop.
    ///
    /// The expert weights are stacked (`engine::stack`: a view when they lie back to back in one
    /// buffer, else `cat`; gradients flow back to each expert either way) once per call.
    /// Dropout (training): one mask per projection shared by all experts for gate and up, and
    /// one per slot for down, so the result equals the naive path's only at dropout 0.
    pub(crate) fn fused(
        &self,
        x: &Tensor,
        w: SharedFfn<'_>,
        route: &RouterOutput,
        k: usize,
        dropout_seed: Option<u64>,
        opts: &MoeFfnOptions,
    ) -> Result<Option<Tensor>> {
        let Some(first) = self.experts.first().and_then(|e| e.gate.as_ref()) else {
            return Ok(None);
        };
        let (scale, p) = (first.scale, first.dropout);
        let gates: Vec<_> = self.experts.iter().map(|e| e.gate.as_ref()).collect();
        let ups: Vec<_> = self.experts.iter().map(|e| e.up.as_ref()).collect();
        let downs: Vec<_> = self.experts.iter().map(|e| e.down.as_ref()).collect();
        let (Some((a_gate, b_gate)), Some((a_up, b_up)), Some((a_down, b_down))) = (
            stack(&gates, scale, p)?,
            stack(&ups, scale, p)?,
            stack(&downs, scale, p)?,
        ) else {
            return Ok(None);
        };
        let r = a_gate.dims()[1];
        if a_up.dims()[1] != r || a_down.dims()[1] != r {
            return Ok(None);
        }
        let (ids, weights) = match &route.topk {
            // The fused router's selection and renormalised weights (in the graph).
            Some((ids, w)) => (ids.clone(), w.clone()),
            None => {
                let (_, ids) = route.probs.detach().topk(k)?; // [N, k] u32
                let weights = route.weights.gather(&ids, 1)?; // [N, k], in the graph
                (ids, weights)
            }
        };
        let weights_ref = MoeFusedWeights {
            w_gate: w.gate,
            w_up: w.up,
            w_down: w.down,
            a_gate: &a_gate,
            b_gate: &b_gate,
            a_up: &a_up,
            b_up: &b_up,
            a_down: &a_down,
            b_down: &b_down,
            scale,
        };
        let routing = MoeRouting {
            ids: &ids,
            weights: &weights,
        };
        let dropout = dropout_seed
            .filter(|_| p > 0.0)
            .map(|seed| MoeDropout { p, seed });
        Ok(Some(moe_ffn(x, &weights_ref, &routing, dropout, opts)?))
    }
}

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

/// Every expert's LoRA of one MixLoRA FFN stacked for the fused path: `A` `[E, r, in]` and `B`
/// `[E, out, r]`, with the scale and dropout they share.
#[derive(Clone, Debug)]
pub struct FusedExperts {
    pub a_gate: Tensor,
    pub b_gate: Tensor,
    pub a_up: Tensor,
    pub b_up: Tensor,
    pub a_down: Tensor,
    pub b_down: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl FusedExperts {
    /// The experts of `ffn` stacked (views of their buffer when they lie back to back in it, as
    /// the adapters lay them out; copies otherwise), or `None` when the fused path does not apply:
    /// some expert lacks a LoRA on gate, up or down, or their scales, dropouts or ranks differ.
    pub fn stack(ffn: &MixLoraFfn) -> Result<Option<FusedExperts>> {
        let Some(first) = ffn.experts.first().and_then(|e| e.gate.as_ref()) else {
            return Ok(None);
        };
        let (scale, p) = (first.scale, first.dropout);
        let gates: Vec<_> = ffn.experts.iter().map(|e| e.gate.as_ref()).collect();
        let ups: Vec<_> = ffn.experts.iter().map(|e| e.up.as_ref()).collect();
        let downs: Vec<_> = ffn.experts.iter().map(|e| e.down.as_ref()).collect();
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
        Ok(Some(FusedExperts {
            a_gate,
            b_gate,
            a_up,
            b_up,
            a_down,
            b_down,
            scale,
            dropout: p,
        }))
    }

    /// [`FusedExperts::stack`] for inference, once: detached, and each `B` a `[E, out, r]` view
    /// of an `[out, E, r]` buffer, the layout of the fused op's block-code GEMMs, so that a
    /// forward pass neither stacks nor lays out any adapter matrix (a copy of the experts' `B`
    /// matrices, whose own buffers stay for the other paths).
    pub fn for_inference(ffn: &MixLoraFfn) -> Result<Option<FusedExperts>> {
        engine::no_grad(|| {
            let Some(s) = Self::stack(ffn)? else {
                return Ok(None);
            };
            // [E, out, r] -> [out, E, r] buffer -> [E, out, r] view of it.
            let laid_out = |b: &Tensor| -> Result<Tensor> {
                Ok(b.permute(&[1, 0, 2])?.contiguous()?.permute(&[1, 0, 2])?)
            };
            Ok(Some(FusedExperts {
                a_gate: s.a_gate.detach(),
                b_gate: laid_out(&s.b_gate.detach())?,
                a_up: s.a_up.detach(),
                b_up: laid_out(&s.b_up.detach())?,
                a_down: s.a_down.detach(),
                b_down: laid_out(&s.b_down.detach())?,
                ..s
            }))
        })
    }
}

impl MixLoraFfn {
    /// The fused path for top-`k` routing of `x` `[N, H]` with the experts stacked in `experts`
    /// (or, when `None`, stacked for this call: a view of their buffer, gradients flow back to
    /// each expert either way); `None` when the fused path does not apply ([`FusedExperts::stack`]):
    /// the caller then runs the naive loop.
    ///
    /// Dropout (training): one mask per projection shared by all experts for gate and up, and
    /// one per slot for down, so the result equals the naive path's only at dropout 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fused(
        &self,
        x: &Tensor,
        w: SharedFfn<'_>,
        route: &RouterOutput,
        k: usize,
        dropout_seed: Option<u64>,
        opts: &MoeFfnOptions,
        experts: Option<&FusedExperts>,
    ) -> Result<Option<Tensor>> {
        let stacked;
        let s = match experts {
            Some(s) => s,
            None => match FusedExperts::stack(self)? {
                Some(s) => {
                    stacked = s;
                    &stacked
                }
                None => return Ok(None),
            },
        };
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
            a_gate: &s.a_gate,
            b_gate: &s.b_gate,
            a_up: &s.a_up,
            b_up: &s.b_up,
            a_down: &s.a_down,
            b_down: &s.b_down,
            scale: s.scale,
        };
        let routing = MoeRouting {
            ids: &ids,
            weights: &weights,
        };
        let p = s.dropout;
        let dropout = dropout_seed
            .filter(|_| p > 0.0)
            .map(|seed| MoeDropout { p, seed });
        Ok(Some(moe_ffn(x, &weights_ref, &routing, dropout, opts)?))
    }
}

//! The MixLoRA FFNs of a shared batch (`shared.rs`) as one call of the fused MoE op
//! (`engine::moe_ffn`), when the segments' adapters agree on what the op takes as one value.
//!
//! With `N` segments whose FFNs each have `E` experts, the op sees `N·E` experts: each of the six
//! stacked expert tensors (`A`/`B` of gate, up, down, [`FusedExperts`]) is the segments' stacks
//! joined along the expert dim (`engine::cat`: gradients flow back to each adapter's own
//! tensors), so segment `s`'s local expert `e` is global expert `s·E + e`. Each segment's router
//! runs on its own packed rows, exactly as in its single run (its probabilities, selection, aux
//! loss and expert loads are the single run's); the top-k ids of all packed rows are then mapped
//! to global ids by one gather from an `[N_real, E]` table whose row of segment `s` holds
//! `s·E .. s·E + E`, so that a token's `k` slots reach only its own adapter's experts. The op
//! then runs once over the packed rows `[N_real, H]` (the shared mode's padding rows are not
//! among them, so they route nowhere); its output is unpacked onto the batch's rows.
//!
//! One call needs one value of: the MoE implementation (`MoeImpl::Fused` with the same options),
//! top-k routing with the same `k`, `E`, the rank, the LoRA scale, the adapter dtype and, when
//! any segment has a dropout seed, the dropout probability; and every expert with a LoRA on each
//! of gate, up and down (what the fused path needs anyway). Otherwise the caller runs each
//! segment's FFN on its own.
//!
//! Dropout: the op draws its masks from one seed. With one segment it is the segment's own
//! (`sub_seed(seed, layer, 4)`, the single run's, so the masks are the single run's); with more,
//! the segments' seeds folded in order (`acc = hash(acc, seed_s)` from the first), a seed of its
//! own for the group. The masks are then not those of the single runs (the shared mode's dropout
//! is equal in distribution, not in draws); segments of which some have a seed and some none
//! run per segment.
//!
//! Cost: the rank-r products of the op are dense over all experts' codes (`[T·k, N·E·r]` block
//! codes), so their FLOPs grow with `N`, while the launches do not; and the op's tile kernels
//! (`MoeKernels::Tiles`, `E·r ≤ 128`) may not serve `N·E·r` where they serve `E·r` (the op then
//! runs its block-code GEMMs).

use engine::{moe_ffn, rng, MoeDropout, MoeFfnOptions, MoeFusedWeights, MoeRouting, Tensor};

use super::shared::SharedBatch;
use crate::adapters::router::RouterOutput;
use crate::adapters::{FusedExperts, LayerAdapters, MixLoraFfn, MlpAdapters, MoeImpl, Routing};
use crate::error::{Error, Result};
use crate::llama::{sub_seed, DecoderLayer};

/// The segments' MoE FFNs of one layer, checked to run as one fused call.
struct Plan<'a> {
    ffns: Vec<&'a MixLoraFfn>,
    experts: Vec<FusedExperts>,
    /// Experts per segment.
    e: usize,
    opts: MoeFfnOptions,
    dropout: Option<MoeDropout>,
}

/// The plan of layer `li` of `g`'s segments with adapters `ads`, or `None` when they cannot run
/// as one call (see the module doc).
fn plan<'a>(g: &SharedBatch, li: usize, ads: &[&'a LayerAdapters]) -> Result<Option<Plan<'a>>> {
    let mut ffns = Vec::with_capacity(ads.len());
    let mut shape = None; // (opts, k, E)
    for (s, ad) in g.segs.iter().zip(ads) {
        let (MoeImpl::Fused(opts), MlpAdapters::MixLora(ffn)) = (s.ctx.moe_impl, &ad.mlp) else {
            return Ok(None);
        };
        let Routing::TopK(k) = ffn.router.routing else {
            return Ok(None);
        };
        let this = (opts, k, ffn.num_experts());
        if *shape.get_or_insert(this) != this {
            return Ok(None);
        }
        ffns.push(ffn);
    }
    let Some((opts, _, e)) = shape else {
        return Ok(None);
    };
    let mut experts = Vec::with_capacity(ffns.len());
    for ffn in &ffns {
        let Some(x) = FusedExperts::stack(ffn)? else {
            return Ok(None);
        };
        experts.push(x);
    }
    let first = &experts[0];
    let agree = experts.iter().all(|x| {
        x.scale == first.scale
            && x.a_gate.dims() == first.a_gate.dims()
            && x.a_gate.dtype() == first.a_gate.dtype()
    });
    if !agree {
        return Ok(None);
    }
    let seeds: Vec<Option<u64>> = (g.segs.iter())
        .map(|s| sub_seed(s.ctx.dropout_seed, li, 4))
        .collect();
    let present: Vec<u64> = seeds.iter().flatten().copied().collect();
    let dropout = if present.is_empty() {
        None // no dropout anywhere: the rates do not matter
    } else if present.len() < seeds.len() || experts.iter().any(|x| x.dropout != first.dropout) {
        return Ok(None); // some segments with dropout and some without, or other rates
    } else if first.dropout == 0.0 {
        None
    } else {
        let seed = (present[1..].iter()).fold(present[0], |acc, &s| rng::hash(acc, s));
        Some(MoeDropout {
            p: first.dropout,
            seed,
        })
    };
    Ok(Some(Plan {
        ffns,
        experts,
        e,
        opts,
        dropout,
    }))
}

/// Joins `parts` along `dim` (the one part itself when there is one).
fn cat(parts: &[&Tensor], dim: isize) -> Result<Tensor> {
    match parts {
        [one] => Ok((*one).clone()),
        _ => Ok(engine::cat(parts, dim)?),
    }
}

/// The MoE FFNs of layer `li` (`layer`'s frozen SwiGLU, the segments' adapters `ads`) on the
/// normed rows `hn` `[M, H]` of `g` as one fused call: the FFN output `[M, H]` (padding rows: a
/// copy of their sequence's last real row's) and each segment's router output; `None` when the
/// segments cannot run as one call (see the module doc).
pub(super) fn grouped_moe(
    g: &SharedBatch,
    li: usize,
    layer: &DecoderLayer,
    ads: &[&LayerAdapters],
    hn: &Tensor,
) -> Result<Option<(Tensor, Vec<Option<RouterOutput>>)>> {
    let Some(p) = plan(g, li, ads)? else {
        return Ok(None);
    };
    let hp = g.pack(hn)?; // [N_real, H]
    let mut routes = Vec::with_capacity(p.ffns.len());
    for (s, ffn) in g.segs.iter().zip(&p.ffns) {
        let rows = hp.narrow(0, s.packed.start, s.packed.len())?; // [B·T_s, H]
        routes.push(ffn.router.route(&rows)?);
    }
    let topk = (routes.iter())
        .map(|r| {
            r.topk.as_ref().ok_or_else(|| {
                Error::Invalid("grouped MoE: a top-k router gave no top-k ids".into())
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let local = cat(&topk.iter().map(|t| &t.0).collect::<Vec<_>>(), 0)?; // [N_real, k] u32
    let weights = cat(&topk.iter().map(|t| &t.1).collect::<Vec<_>>(), 0)?; // [N_real, k]
    let ids = match routes.len() {
        1 => local,
        _ => g.global_expert_ids(p.e)?.gather(&local, 1)?, // [N_real, k] u32
    };
    let stacked = |f: fn(&FusedExperts) -> &Tensor| -> Result<Tensor> {
        cat(&p.experts.iter().map(f).collect::<Vec<_>>(), 0) // [N·E, ..]
    };
    let (a_gate, b_gate) = (stacked(|x| &x.a_gate)?, stacked(|x| &x.b_gate)?);
    let (a_up, b_up) = (stacked(|x| &x.a_up)?, stacked(|x| &x.b_up)?);
    let (a_down, b_down) = (stacked(|x| &x.a_down)?, stacked(|x| &x.b_down)?);
    let w = MoeFusedWeights {
        w_gate: &layer.gate_proj,
        w_up: &layer.up_proj,
        w_down: &layer.down_proj,
        a_gate: &a_gate,
        b_gate: &b_gate,
        a_up: &a_up,
        b_up: &b_up,
        a_down: &a_down,
        b_down: &b_down,
        scale: p.experts[0].scale,
    };
    let routing = MoeRouting {
        ids: &ids,
        weights: &weights,
    };
    let y = moe_ffn(&hp, &w, &routing, p.dropout, &p.opts)?; // [N_real, H]
    Ok(Some((
        g.unpack(&y)?,
        routes.into_iter().map(Some).collect(),
    )))
}

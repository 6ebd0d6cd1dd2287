//! [`GroupMode::Exact`](super::GroupMode::Exact): each segment computes exactly what its adapter
//! computes alone on its micro-batch, bit for bit on the CPU.
//!
//! The hidden states of all segments form one `[N, H]` buffer (`N = Σ B_s·T_s`), each segment's
//! rows contiguous. In each decoder layer the row-wise ops (the RMSNorms, the residual adds) run
//! once over all rows; everything that mixes rows or meets an adapter (the projections with their
//! LoRA, RoPE, attention, the MixLoRA router and experts) runs per segment, on a view of its rows
//! shaped `[B_s, T_s, ..]` as a single run has them.
//!
//! Why the base projections run per segment too: the CPU GEMM (the `gemm` crate) is not row
//! independent. It picks its kernel (a dot-product kernel when `M·N ≤ 256`, a GEMV when `M = 1`)
//! and for `K > 512` its k blocking from the row count `M`, so rows computed in a larger product
//! can differ in the last bits from the same rows computed alone; a product over one segment's
//! rows is the single run's product. [`GroupMode::Shared`](super::GroupMode::Shared) trades that
//! exactness for one pass of the frozen base over all rows (`shared.rs`).

use std::ops::Range;

use engine::{rope_tables, Tensor};

use super::{checkpointed, is_moe, Segment};
use crate::adapters::router::RouterOutput;
use crate::adapters::LayerAdapters;
use crate::error::Result;
use crate::llama::layer::{attention_block, ffn_block, LayerCtx};
use crate::llama::{
    mask_positions, positions_from_mask, train_output, DecoderLayer, HiddenOutput, Llama,
};

/// A segment's rows in the `[N, H]` batch and the context its layers run in.
#[derive(Clone)]
struct SegmentCtx {
    rows: Range<usize>,
    ctx: LayerCtx,
}

impl SegmentCtx {
    /// The segment's rows of `t` `[N, C]`, as `[B, T, C]` (a view).
    fn rows_of(&self, t: &Tensor) -> Result<Tensor> {
        let (b, s) = self.ctx.batch;
        let c = t.dims()[1];
        Ok(t.narrow(0, self.rows.start, self.rows.len())?
            .reshape([b, s, c])?)
    }
}

/// The per-segment results `[B_s, T_s, C]` joined into one `[N, C]` tensor, in segment order.
fn join(parts: &[Tensor]) -> Result<Tensor> {
    let flat = parts
        .iter()
        .map(|p| {
            let c = *p.dims().last().unwrap_or(&0);
            Ok(p.reshape([p.elem_count() / c.max(1), c])?)
        })
        .collect::<Result<Vec<_>>>()?;
    match flat.as_slice() {
        [one] => Ok(one.clone()),
        _ => Ok(engine::cat(&flat.iter().collect::<Vec<_>>(), 0)?),
    }
}

/// One decoder layer over the `[N, H]` rows of all segments: the norms and residual adds over all
/// rows, the attention and FFN blocks per segment with its adapter (`ads[s]`). Returns the new
/// rows and, per segment, its router output in a MoE layer.
fn group_layer(
    segs: &[SegmentCtx],
    li: usize,
    layer: &DecoderLayer,
    ads: &[&LayerAdapters],
    x: &Tensor,
) -> Result<(Tensor, Vec<Option<RouterOutput>>)> {
    let c = &segs[0].ctx.config;
    let hn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?; // [N, H]
    let attn = segs
        .iter()
        .zip(ads)
        .map(|(s, ad)| attention_block(&s.ctx, li, layer, Some(ad), &s.rows_of(&hn)?, None))
        .collect::<Result<Vec<_>>>()?;
    let x = x.add(&join(&attn)?)?;
    let hn = x.rms_norm(&layer.post_attention_layernorm, c.rms_norm_eps)?; // [N, H]
    let (mut ys, mut routes) = (
        Vec::with_capacity(segs.len()),
        Vec::with_capacity(segs.len()),
    );
    for (s, ad) in segs.iter().zip(ads) {
        let (y, route) = ffn_block(&s.ctx, li, layer, Some(ad), &s.rows_of(&hn)?)?;
        ys.push(y);
        routes.push(route);
    }
    Ok((x.add(&join(&ys)?)?, routes))
}

/// The exact grouped forward of the checked `segments` (see the module doc).
pub(super) fn forward(m: &Llama, segments: &[Segment<'_>]) -> Result<Vec<HiddenOutput>> {
    let h = m.config.hidden_size;
    let mut segs = Vec::with_capacity(segments.len());
    let mut embedded = Vec::with_capacity(segments.len());
    let mut row0 = 0;
    for seg in segments {
        let (b, t) = (seg.b, seg.t);
        let positions = match seg.host {
            // From the host's copy of the mask: no read-back, the same values.
            Some(h) => Tensor::from_vec(mask_positions(&h.key_mask, t), [b, t], seg.ids.device())?,
            None => positions_from_mask(b, t, seg.key_mask, 0, seg.ids.device())?,
        };
        let (cos, sin) = rope_tables(&positions, &m.inv_freq)?; // [B, T, D/2]
        segs.push(SegmentCtx {
            rows: row0..row0 + b * t,
            ctx: LayerCtx {
                config: m.config.clone(),
                batch: (b, t),
                cos,
                sin,
                key_mask: seg.key_mask.cloned(),
                past: 0,
                dropout_seed: seg.dropout_seed,
                moe_impl: seg.adapters.moe_impl,
                attention: m.attention,
            },
        });
        embedded.push(m.embed_tokens.embedding(seg.ids)?); // [B, T, H]
        row0 += b * t;
    }
    let mut x = join(&embedded)?; // [N, H]
    let mut routing: Vec<Vec<RouterOutput>> = vec![Vec::new(); segs.len()];
    for (li, layer) in m.layers.iter().enumerate() {
        let ads: Vec<&LayerAdapters> = segments.iter().map(|s| &s.adapters.layers[li]).collect();
        let routes;
        (x, routes) = if m.checkpoint_layers && engine::grad_enabled() {
            let (segs_c, layer_c) = (segs.clone(), layer.clone());
            let ads_c: Vec<LayerAdapters> = ads.iter().map(|a| (*a).clone()).collect();
            let params: Vec<Tensor> = ads.iter().flat_map(|a| a.params()).collect();
            checkpointed(&x, params, is_moe(&ads), move |x| {
                let refs: Vec<&LayerAdapters> = ads_c.iter().collect();
                group_layer(&segs_c, li, &layer_c, &refs, x)
            })?
        } else {
            group_layer(&segs, li, layer, &ads, &x)?
        };
        for (r, out) in routes.into_iter().zip(&mut routing) {
            out.extend(r);
        }
    }
    let hidden = x.rms_norm(&m.norm, m.config.rms_norm_eps)?; // [N, H]
    debug_assert_eq!(hidden.dims(), [row0, h]);
    segs.iter()
        .zip(segments)
        .zip(routing)
        .map(|((s, seg), routing)| {
            let hidden = s.rows_of(&hidden)?; // [B, T, H]
            train_output(Some(seg.adapters), hidden, routing, seg.key_mask)
        })
        .collect()
}

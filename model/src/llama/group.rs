//! Several adapter sets trained together on one frozen base: one forward pass over a batch made
//! of segments, each segment one adapter's micro-batch (docs/DESIGN.md, "Adapter groups").
//!
//! Segment `s` brings its own token ids `[B_s, T_s]` (its own length), key mask and dropout seed,
//! and names the adapter set of the group that applies to its rows. The hidden states of all
//! segments form one `[N, H]` buffer (`N = Σ B_s·T_s`), each segment's rows contiguous. In each
//! decoder layer the row-wise ops (the RMSNorms, the residual adds) run once over all rows;
//! everything that mixes rows or meets an adapter (the projections with their LoRA, RoPE,
//! attention, the MixLoRA router and experts) runs per segment, on a view of its rows shaped
//! `[B_s, T_s, ..]` as a single run has them. So each segment computes exactly what its adapter
//! computes alone on its micro-batch, values and gradients, bit for bit on the CPU
//! (tests/tests/multi_adapter.rs).
//!
//! Why the base projections run per segment too: the CPU GEMM (the `gemm` crate) is not row
//! independent. It picks its kernel (a dot-product kernel when `M·N ≤ 256`, a GEMV when `M = 1`)
//! and for `K > 512` its k blocking from the row count `M`, so rows computed in a larger product
//! can differ in the last bits from the same rows computed alone; a product over one segment's
//! rows is the single run's product. A GPU path, where bit equality with single runs is not asked
//! for, will run each frozen projection once over all rows and the adapters' LoRA deltas as one
//! grouped kernel over the row segments (Punica's SGMV): in [`group_layer`], in place of the
//! per-segment loops.

use std::ops::Range;
use std::sync::Arc;

use engine::{rope_tables, Tensor};

use super::layer::{attention_block, ffn_block, into_engine_error, LayerCtx};
use super::{
    batch_dims, positions_from_mask, train_output, DecoderLayer, ForwardOutput, HiddenOutput, Llama,
};
use crate::adapters::router::RouterOutput;
use crate::adapters::{Adapters, LayerAdapters, MlpAdapters};
use crate::error::{Error, Result};

/// One adapter's micro-batch in a grouped forward ([`Llama::forward_train_group`]).
#[derive(Clone, Debug)]
pub struct GroupSegment {
    /// The adapter set of the group ([`Llama::set_adapter_group`]) that applies to these rows.
    pub adapter: usize,
    /// Token ids `[B, T]` (u32).
    pub ids: Tensor,
    /// `[B, T]` u32, 1 = real token; `None`: no padding.
    pub key_mask: Option<Tensor>,
    /// Seeds the adapter's dropout (a new seed per step); `None`: no dropout.
    pub dropout_seed: Option<u64>,
}

/// A segment's rows in the `[N, H]` batch and the context its layers run in.
#[derive(Clone)]
struct SegmentCtx {
    adapter: usize,
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

/// [`group_layer`] under gradient checkpointing: only its input and outputs are kept, the rest is
/// recomputed in the backward pass (as [`Llama::set_gradient_checkpointing`] does for one
/// adapter set).
fn group_layer_checkpointed(
    segs: &[SegmentCtx],
    li: usize,
    layer: &DecoderLayer,
    ads: &[&LayerAdapters],
    x: &Tensor,
) -> Result<(Tensor, Vec<Option<RouterOutput>>)> {
    let (segs_c, layer_c) = (segs.to_vec(), layer.clone());
    let ads_c: Vec<LayerAdapters> = ads.iter().map(|a| (*a).clone()).collect();
    let block: Arc<engine::CheckpointFn> = Arc::new(move |ins: &[Tensor]| {
        let refs: Vec<&LayerAdapters> = ads_c.iter().collect();
        let (y, routes) =
            group_layer(&segs_c, li, &layer_c, &refs, &ins[0]).map_err(into_engine_error)?;
        let mut outs = vec![y];
        for r in routes.into_iter().flatten() {
            outs.extend([r.probs, r.mask, r.weights]);
        }
        Ok(outs)
    });
    let params: Vec<Tensor> = ads.iter().flat_map(|a| a.params()).collect();
    let outs = engine::checkpoint(std::slice::from_ref(x), &params, block)?;
    let mut outs = outs.into_iter();
    let y = outs.next().expect("the layer's output");
    let routes = ads
        .iter()
        .map(|ad| match ad.mlp {
            MlpAdapters::MixLora(_) => {
                let mut next = || outs.next().expect("3 router outputs per MoE segment");
                let (probs, mask, weights) = (next(), next().detach(), next());
                // The top-k ids and weights serve only the layer's own MoE computation.
                Some(RouterOutput {
                    probs,
                    mask,
                    weights,
                    topk: None,
                })
            }
            MlpAdapters::Lora(_) => None,
        })
        .collect();
    Ok((y, routes))
}

impl Llama {
    /// Attaches the adapter sets that [`Llama::forward_train_group`] trains together (replacing
    /// any group; the adapters of [`Llama::set_adapters`] are left alone). Each set must have
    /// been built for this model's shape.
    pub fn set_adapter_group(&mut self, group: Vec<Adapters>) -> Result<()> {
        self.check_trainable("set_adapter_group")?;
        for (i, a) in group.iter().enumerate() {
            if a.layers.len() != self.layers.len() {
                return Err(Error::Invalid(format!(
                    "set_adapter_group: adapter set {i} has {} layers, the model {}",
                    a.layers.len(),
                    self.layers.len()
                )));
            }
        }
        self.adapter_group = group;
        Ok(())
    }

    /// The adapter sets of the group (empty when none is attached).
    pub fn adapter_group(&self) -> &[Adapters] {
        &self.adapter_group
    }

    /// Detaches the adapter group and returns it.
    pub fn take_adapter_group(&mut self) -> Vec<Adapters> {
        std::mem::take(&mut self.adapter_group)
    }

    /// The training forward of several adapters at once: per segment, what
    /// [`Llama::forward_train`] returns for its adapter set alone on its micro-batch (the same
    /// values, and the same gradients for the adapter's parameters, bit for bit on the CPU).
    /// Each adapter set appears in at most one segment.
    pub fn forward_train_group(&self, segments: &[GroupSegment]) -> Result<Vec<ForwardOutput>> {
        self.forward_train_group_hidden(segments)?
            .into_iter()
            .map(|o| {
                Ok(ForwardOutput {
                    logits: self.logits(&o.hidden)?,
                    aux_loss: o.aux_loss,
                    expert_load: o.expert_load,
                })
            })
            .collect()
    }

    /// [`Llama::forward_train_group`] without the LM head: per segment, what
    /// [`Llama::forward_train_hidden`] returns (hidden states `[B_s, T_s, H]`).
    pub fn forward_train_group_hidden(
        &self,
        segments: &[GroupSegment],
    ) -> Result<Vec<HiddenOutput>> {
        const WHAT: &str = "forward_train_group";
        self.check_trainable(WHAT)?;
        if segments.is_empty() {
            return Err(Error::Invalid(format!("{WHAT}: no segment")));
        }
        let h = self.config.hidden_size;
        let mut segs = Vec::with_capacity(segments.len());
        let mut embedded = Vec::with_capacity(segments.len());
        let mut row0 = 0;
        for (si, seg) in segments.iter().enumerate() {
            let adapters = self.adapter_group.get(seg.adapter).ok_or_else(|| {
                Error::Invalid(format!(
                    "{WHAT}: segment {si} names adapter set {}, the group has {}",
                    seg.adapter,
                    self.adapter_group.len()
                ))
            })?;
            if segments[..si].iter().any(|s| s.adapter == seg.adapter) {
                return Err(Error::Invalid(format!(
                    "{WHAT}: adapter set {} has more than one segment",
                    seg.adapter
                )));
            }
            let (b, t) = batch_dims(&seg.ids)?;
            if b * t == 0 {
                return Err(Error::Invalid(format!("{WHAT}: segment {si} has no token")));
            }
            let positions = positions_from_mask(b, t, seg.key_mask.as_ref(), 0, seg.ids.device())?;
            let (cos, sin) = rope_tables(&positions, &self.inv_freq)?; // [B, T, D/2]
            segs.push(SegmentCtx {
                adapter: seg.adapter,
                rows: row0..row0 + b * t,
                ctx: LayerCtx {
                    config: self.config.clone(),
                    batch: (b, t),
                    cos,
                    sin,
                    key_mask: seg.key_mask.clone(),
                    past: 0,
                    dropout_seed: seg.dropout_seed,
                    moe_impl: adapters.moe_impl,
                },
            });
            embedded.push(self.embed_tokens.embedding(&seg.ids)?); // [B, T, H]
            row0 += b * t;
        }
        let mut x = join(&embedded)?; // [N, H]
        let mut routing: Vec<Vec<RouterOutput>> = vec![Vec::new(); segs.len()];
        for (li, layer) in self.layers.iter().enumerate() {
            let ads: Vec<&LayerAdapters> = segs
                .iter()
                .map(|s| &self.adapter_group[s.adapter].layers[li])
                .collect();
            let routes;
            (x, routes) = if self.checkpoint_layers && engine::grad_enabled() {
                group_layer_checkpointed(&segs, li, layer, &ads, &x)?
            } else {
                group_layer(&segs, li, layer, &ads, &x)?
            };
            for (r, out) in routes.into_iter().zip(&mut routing) {
                out.extend(r);
            }
        }
        let hidden = x.rms_norm(&self.norm, self.config.rms_norm_eps)?; // [N, H]
        debug_assert_eq!(hidden.dims(), [row0, h]);
        segs.iter()
            .zip(routing)
            .map(|(s, routing)| {
                let adapters = &self.adapter_group[s.adapter];
                let hidden = s.rows_of(&hidden)?; // [B, T, H]
                train_output(Some(adapters), hidden, routing, s.ctx.key_mask.as_ref())
            })
            .collect()
    }
}

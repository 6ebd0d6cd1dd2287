//! [`GroupMode::Shared`](super::GroupMode::Shared): the group as one padded batch through the
//! frozen base, so that N adapters issue about the kernels of one run.
//!
//! The segments (all of batch size `B`) are padded on the right to the longest length `T` and
//! stacked into one `[S·B, T]` batch: segment `s` holds rows `s·B .. (s+1)·B` of it, and its
//! padding positions are masked keys (the key mask of the batch is each segment's mask, or ones,
//! followed by zeros). Positions count real tokens as in a single run, so a real token's RoPE
//! position is unchanged. Then, once over all `M = S·B·T` rows: the embedding, both RMSNorms of
//! every layer, every frozen projection, RoPE, the attention (per sequence anyway: padding keys
//! get weight exactly 0, so a real query sees what it sees alone), the residual adds and the final
//! norm. What belongs to an adapter runs grouped (`shared_lora.rs`): each projection's LoRA of
//! every segment in one product of the segments' stacked matrices. MixLoRA FFNs of the fused
//! implementation that agree on its settings run as one fused call over all segments' experts
//! (`shared_moe.rs`); any other MixLoRA FFN (or an FFN in a group that mixes LoRA and MixLoRA
//! adapters) runs per segment on its real rows, shaped `[B, T_s, H]` as in a single run. Either
//! way each segment's router, top-k and load-balance loss are the single run's.
//!
//! Padding rows carry finite values that nothing real reads (masked keys, dropped outputs), and
//! their gradients are exactly zero. "Packed" rows are the real rows only, segment after segment,
//! each segment's in the order of its single run (`[B·T_s]` rows): the per-segment computations
//! and the outputs read them (one gather, identity when nothing is padded).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use engine::{rope_tables, DType, FrozenWeight, Tensor};

use super::super::cache::row_positions;
use super::shared_lora::GroupProj;
use super::shared_moe::grouped_moe;
use super::{checkpointed, is_moe, Segment};
use crate::adapters::router::RouterOutput;
use crate::adapters::LayerAdapters;
use crate::error::Result;
use crate::llama::layer::{attention_with, ffn_block, swiglu_with, LayerCtx};
use crate::llama::{train_output, DecoderLayer, HiddenOutput, Llama};

/// The key of a block-scale matrix ([`SharedBatch::block_scales`]): per segment with a LoRA,
/// `(segment, rank, scale bits)`, and the dtype.
type ScaleKey = (Vec<(usize, usize, u64)>, DType);

/// The group as one padded batch (see the module doc). Cheap to clone: tensors share buffers.
#[derive(Clone)]
pub(super) struct SharedBatch {
    /// The whole batch: `(S·B, T)`, the RoPE tables of the padded positions, the padded key
    /// mask (`None` when no segment has a mask or padding); no dropout seed (each segment has
    /// its own).
    pub(super) ctx: LayerCtx,
    pub(super) segs: Vec<SharedSeg>,
    /// `M = S·B·T`.
    pub(super) rows: usize,
    /// `[N_real]` u32: the padded row of each packed row; `None` when no segment is padded.
    pack: Option<Tensor>,
    /// `[M]` u32: the packed row each padded row reads back (a padding row reads its sequence's
    /// last real row); `None` when no segment is padded.
    unpack: Option<Tensor>,
    /// Block-scale matrices built so far (reused by every layer, and by checkpointed layers
    /// when they run again in the backward pass).
    scales: Arc<Mutex<Vec<(ScaleKey, Tensor)>>>,
    /// Global expert-id tables built so far, by experts per segment
    /// ([`SharedBatch::global_expert_ids`]).
    expert_ids: Arc<Mutex<Vec<(usize, Tensor)>>>,
}

/// One segment of a [`SharedBatch`].
#[derive(Clone)]
pub(super) struct SharedSeg {
    /// The segment as its single run has it: `(B, T_s)`, its own key mask, dropout seed and MoE
    /// implementation (the RoPE tables are the batch's: the FFN reads none).
    pub(super) ctx: LayerCtx,
    /// The segment's packed rows.
    pub(super) packed: Range<usize>,
}

impl SharedBatch {
    /// The batch of `segments` (each of batch size `B`), and its padded ids `[S·B, T]`.
    fn new(m: &Llama, segments: &[Segment<'_>]) -> Result<(SharedBatch, Tensor)> {
        let device = m.device();
        let (s_n, b) = (segments.len(), segments[0].b);
        let t = segments.iter().map(|s| s.t).max().unwrap_or(0);
        let padded = segments.iter().any(|s| s.t < t);
        let any_mask = segments.iter().any(|s| s.key_mask.is_some());
        let (mut ids, mut mask, mut pos) = (Vec::new(), Vec::new(), Vec::new());
        let (mut pack, mut unpack) = (Vec::new(), Vec::new());
        let mut packed = Vec::with_capacity(s_n);
        for (si, seg) in segments.iter().enumerate() {
            let ts = seg.t;
            let (seg_ids, seg_mask) = seg.tokens_on_host()?;
            let p0 = pack.len();
            for r in 0..b {
                let row0 = (si * b + r) * t; // the sequence's first padded row
                let row_mask: Vec<u32> = (0..t)
                    .map(|j| if j < ts { seg_mask[r * ts + j] } else { 0 })
                    .collect();
                // As `positions_from_mask` (restarting in each packed sequence).
                pos.extend(row_positions(&row_mask));
                mask.extend_from_slice(&row_mask);
                for j in 0..t {
                    let real = j < ts;
                    ids.push(if real { seg_ids[r * ts + j] } else { 0 });
                    let packed_row = p0 + r * ts + j.min(ts - 1);
                    unpack.push(packed_row as u32);
                    if real {
                        pack.push((row0 + j) as u32);
                    }
                }
            }
            packed.push(p0..pack.len());
        }
        let sb = s_n * b;
        let u32s = |v: Vec<u32>, shape: Vec<usize>| Tensor::from_vec(v, shape, device);
        let positions = u32s(pos, vec![sb, t])?;
        let (cos, sin) = rope_tables(&positions, &m.inv_freq)?; // [S·B, T, D/2]
        let ctx = LayerCtx {
            config: m.config.clone(),
            batch: (sb, t),
            cos,
            sin,
            key_mask: (padded || any_mask)
                .then(|| u32s(mask, vec![sb, t]))
                .transpose()?,
            past: 0,
            dropout_seed: None,
            moe_impl: Default::default(),
            attention: m.attention,
        };
        let segs = segments
            .iter()
            .zip(packed)
            .map(|(seg, packed)| SharedSeg {
                ctx: LayerCtx {
                    batch: (b, seg.t),
                    key_mask: seg.key_mask.cloned(),
                    dropout_seed: seg.dropout_seed,
                    moe_impl: seg.adapters.moe_impl,
                    ..ctx.clone()
                },
                packed,
            })
            .collect();
        let (pack_len, unpack_len) = (pack.len(), unpack.len());
        let batch = SharedBatch {
            ctx,
            segs,
            rows: sb * t,
            pack: padded.then(|| u32s(pack, vec![pack_len])).transpose()?,
            unpack: padded.then(|| u32s(unpack, vec![unpack_len])).transpose()?,
            scales: Arc::default(),
            expert_ids: Arc::default(),
        };
        Ok((batch, u32s(ids, vec![sb, t])?))
    }

    /// The rows of each segment in the padded batch, `B·T`.
    pub(super) fn seg_rows(&self) -> usize {
        self.rows / self.segs.len()
    }

    /// The packed rows `[N_real, C]` of `t` `[M, C]` (`t` itself when nothing is padded).
    pub(super) fn pack(&self, t: &Tensor) -> Result<Tensor> {
        match &self.pack {
            Some(idx) => Ok(t.index_select(idx, 0)?),
            None => Ok(t.clone()),
        }
    }

    /// The padded rows `[M, C]` of packed rows `t` `[N_real, C]` (padding rows: a copy of their
    /// sequence's last real row).
    pub(super) fn unpack(&self, t: &Tensor) -> Result<Tensor> {
        match &self.unpack {
            Some(idx) => Ok(t.index_select(idx, 0)?),
            None => Ok(t.clone()),
        }
    }

    /// `[M, R]` in `dtype`, `R = Σ r_s` over `loras` `(segment, rank, scale)`: the columns of
    /// segment `s`'s rank-r codes hold its scale on its rows and 0 on every other row, so that
    /// the product of all rows with every segment's stacked `A`, times this, is each row's own
    /// adapter's scaled codes. Built once per forward and key.
    pub(super) fn block_scales(
        &self,
        loras: &[(usize, usize, f64)],
        dtype: DType,
    ) -> Result<Tensor> {
        let key: ScaleKey = (
            loras.iter().map(|&(s, r, c)| (s, r, c.to_bits())).collect(),
            dtype,
        );
        let mut cache = self.scales.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let width: usize = loras.iter().map(|l| l.1).sum();
        let per_seg = self.seg_rows();
        let mut v = Vec::with_capacity(self.rows * width);
        for row in 0..self.rows {
            let seg = row / per_seg;
            for &(s, r, scale) in loras {
                v.extend(std::iter::repeat_n(if s == seg { scale } else { 0.0 }, r));
            }
        }
        let device = self.ctx.cos.device();
        let t = Tensor::from_f64(&v, [self.rows, width], dtype, device)?;
        cache.push((key, t.clone()));
        Ok(t)
    }

    /// `[N_real, e]` u32: on the packed rows of segment `s`, `s·e .. (s+1)·e`, the global ids of
    /// its `e` experts among all segments' (`shared_moe.rs`; a gather of the local top-k ids
    /// from it gives the global ones). Built once per forward and `e`.
    pub(super) fn global_expert_ids(&self, e: usize) -> Result<Tensor> {
        let mut cache = self.expert_ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == e) {
            return Ok(t.clone());
        }
        let rows = self.segs.last().map_or(0, |s| s.packed.end);
        let mut v = Vec::with_capacity(rows * e);
        for (si, s) in self.segs.iter().enumerate() {
            let ids: Vec<u32> = (si * e..(si + 1) * e).map(|g| g as u32).collect();
            for _ in s.packed.clone() {
                v.extend_from_slice(&ids);
            }
        }
        let t = Tensor::from_vec(v, [rows, e], self.ctx.cos.device())?;
        cache.push((e, t.clone()));
        Ok(t)
    }
}

/// One decoder layer over the `[M, H]` rows of the padded batch (see the module doc). Returns
/// the new rows and, per segment, its router output in a MoE layer.
fn shared_layer(
    g: &SharedBatch,
    li: usize,
    layer: &DecoderLayer,
    ads: &[&LayerAdapters],
    x: &Tensor,
) -> Result<(Tensor, Vec<Option<RouterOutput>>)> {
    let c = &g.ctx.config;
    let (sb, t) = g.ctx.batch;
    let h = c.hidden_size;
    let lora = GroupProj::new(g, li, ads);
    let proj = |x: &Tensor, w: &FrozenWeight, j: usize| lora.apply(x, w, j);
    let hn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?; // [M, H]
    let attn = attention_with(&g.ctx, layer, &hn.reshape([sb, t, h])?, None, &proj)?;
    let x = x.add(&attn.reshape([g.rows, h])?)?;
    let hn = x.rms_norm(&layer.post_attention_layernorm, c.rms_norm_eps)?; // [M, H]
    if !is_moe(ads).contains(&true) {
        // Plain LoRA adapters (or none) on the FFN: the SwiGLU once, its LoRA grouped.
        let y = swiglu_with(layer, &hn, &proj)?;
        return Ok((x.add(&y)?, vec![None; ads.len()]));
    }
    // A MoE layer: one fused call for all segments when they agree on its settings, else each
    // segment's FFN on its real rows, as its single run has them.
    if let Some(out) = grouped_moe(g, li, layer, ads, &hn)? {
        let (y, routes) = out;
        return Ok((x.add(&y)?, routes));
    }
    let hp = g.pack(&hn)?; // [N_real, H]
    let (mut ys, mut routes) = (Vec::with_capacity(ads.len()), Vec::with_capacity(ads.len()));
    for (s, ad) in g.segs.iter().zip(ads) {
        let (b, ts) = s.ctx.batch;
        let rows = hp.narrow(0, s.packed.start, s.packed.len())?;
        let (y, route) = ffn_block(&s.ctx, li, layer, Some(ad), &rows.reshape([b, ts, h])?)?;
        ys.push(y.reshape([b * ts, h])?);
        routes.push(route);
    }
    let y = match ys.as_slice() {
        [one] => one.clone(),
        _ => engine::cat(&ys.iter().collect::<Vec<_>>(), 0)?,
    };
    Ok((x.add(&g.unpack(&y)?)?, routes))
}

/// The shared grouped forward of the checked `segments` (all of one batch size).
pub(super) fn forward(m: &Llama, segments: &[Segment<'_>]) -> Result<Vec<HiddenOutput>> {
    let (g, ids) = SharedBatch::new(m, segments)?;
    let h = m.config.hidden_size;
    let mut x = m.embed_tokens.embedding(&ids)?.reshape([g.rows, h])?; // [M, H]
    let mut routing: Vec<Vec<RouterOutput>> = vec![Vec::new(); segments.len()];
    for (li, layer) in m.layers.iter().enumerate() {
        let ads: Vec<&LayerAdapters> = segments.iter().map(|s| &s.adapters.layers[li]).collect();
        let routes;
        (x, routes) = if m.checkpoint_layers && engine::grad_enabled() {
            let (g_c, layer_c) = (g.clone(), layer.clone());
            let ads_c: Vec<LayerAdapters> = ads.iter().map(|a| (*a).clone()).collect();
            let params: Vec<Tensor> = ads.iter().flat_map(|a| a.params()).collect();
            checkpointed(&x, params, is_moe(&ads), move |x| {
                let refs: Vec<&LayerAdapters> = ads_c.iter().collect();
                shared_layer(&g_c, li, &layer_c, &refs, x)
            })?
        } else {
            shared_layer(&g, li, layer, &ads, &x)?
        };
        for (r, out) in routes.into_iter().zip(&mut routing) {
            out.extend(r);
        }
    }
    let hidden = g.pack(&x.rms_norm(&m.norm, m.config.rms_norm_eps)?)?; // [N_real, H]
    g.segs
        .iter()
        .zip(segments)
        .zip(routing)
        .map(|((s, seg), routing)| {
            let (b, ts) = s.ctx.batch;
            let rows = hidden.narrow(0, s.packed.start, s.packed.len())?;
            train_output(
                Some(seg.adapters),
                rows.reshape([b, ts, h])?,
                routing,
                seg.key_mask,
            )
        })
        .collect()
}

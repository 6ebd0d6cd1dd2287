//! Several adapter sets trained together on one frozen base: one forward pass over a batch made
//! of segments, each segment one adapter's micro-batch (docs/DESIGN.md, "Adapter groups").
//!
//! Segment `s` brings its own token ids `[B_s, T_s]` (its own length), key mask and dropout seed,
//! and names the adapter set of the group that applies to its rows. Three ways to compute a group
//! ([`GroupMode`], [`Llama::set_group_mode`]):
//!
//! - [`GroupMode::Exact`] (`exact.rs`, the default): everything that mixes rows or meets an
//!   adapter runs per segment on a view of its rows, so each segment computes exactly what its
//!   adapter computes alone, values and gradients, bit for bit on the CPU
//!   (tests/tests/multi_adapter.rs). N adapters issue N times the kernels of one.
//! - [`GroupMode::Sequential`]: each segment through the whole model with its adapter set alone,
//!   one after another ([`Llama::forward_train_member_hidden_at`]): the values of `Exact`, for a
//!   trainer that runs each segment's backward before the next segment's forward (one adapter's
//!   activations held at a time).
//! - [`GroupMode::Shared`] (`shared.rs`, chosen with [`Llama::set_group_mode`]): the segments (same batch size `B`)
//!   are padded to the longest `T` and form one `[S·B, T]` batch; the embedding, norms, every
//!   frozen projection, RoPE and attention run once over all rows, and only what belongs to an
//!   adapter runs grouped (`shared_lora.rs`: every segment's LoRA of a projection in one product
//!   of stacked matrices; `shared_moe.rs`: fused MixLoRA FFNs that agree on the op's settings in
//!   one call over all segments' experts). The same maths up to rounding
//!   (tests/tests/group_shared.rs); segments of different batch sizes fall back to `Exact`.

mod exact;
mod shared;
mod shared_lora;
mod shared_moe;

use std::sync::Arc;

use engine::Tensor;

use super::{batch_dims, mask_positions, ForwardOutput, HiddenOutput, Llama};
use crate::adapters::router::RouterOutput;
use crate::adapters::{Adapters, LayerAdapters, MlpAdapters};
use crate::error::{Error, Result};
use crate::llama::layer::into_engine_error;

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
    /// The same ids and key mask on the host, when the caller has them: the forward then reads
    /// them instead of the device tensors (each read back is a wait for the GPU, per segment and
    /// micro-batch). `None`: read from `ids` and `key_mask`.
    pub host: Option<HostTokens>,
}

/// Host copies of a segment's token ids and key mask, row-major `[B, T]` (the values of its
/// `ids` and `key_mask`; ones where the segment has no mask): what the grouped forward computes
/// the RoPE positions and, in [`GroupMode::Shared`], its packing tables from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTokens {
    pub ids: Vec<u32>,
    pub key_mask: Vec<u32>,
}

/// How [`Llama::forward_train_group`] computes a group (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// Per segment: each adapter's values and gradients bit for bit those of its single run on
    /// the CPU; N adapters issue N times the kernels of one.
    Exact,
    /// One segment after another, each through the whole model with its adapter set alone
    /// ([`Llama::forward_train_member_hidden_at`]): the values of `Exact`. What it is for: a
    /// trainer that runs each segment's forward and backward before the next segment's holds one
    /// adapter's activations at a time, not all of them (the memory of several adapters on one
    /// base is then their weights, gradients and optimizer state, and one adapter's activations).
    Sequential,
    /// One padded batch through the frozen base, the adapters' LoRA grouped: the same maths up
    /// to rounding, with the kernel count of about one run. Segments of different batch sizes
    /// run `Exact`.
    Shared,
}

/// A checked segment: its adapter set, ids, mask, seed and `(B, T)`.
struct Segment<'a> {
    adapters: &'a Adapters,
    ids: &'a Tensor,
    key_mask: Option<&'a Tensor>,
    dropout_seed: Option<u64>,
    host: Option<&'a HostTokens>,
    b: usize,
    t: usize,
}

impl Segment<'_> {
    /// The segment's ids and key mask (`[B·T]` row-major; ones without a mask), from its host
    /// copies when it has them, else read back from the device.
    fn tokens_on_host(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        if let Some(h) = self.host {
            return Ok((h.ids.clone(), h.key_mask.clone()));
        }
        let mask = match self.key_mask {
            Some(m) => m.to_vec_u32()?,
            None => vec![1; self.b * self.t],
        };
        Ok((self.ids.to_vec_u32()?, mask))
    }
}

/// Per segment, whether its layer is a MoE layer (returns a router output).
fn is_moe(ads: &[&LayerAdapters]) -> Vec<bool> {
    ads.iter()
        .map(|a| matches!(a.mlp, MlpAdapters::MixLora(_)))
        .collect()
}

/// A grouped decoder layer (`x` to the new rows and, per segment, its router output) under
/// gradient checkpointing: only its input and outputs are kept, the rest is recomputed in the
/// backward pass (as [`Llama::set_gradient_checkpointing`] does for one adapter set). `params`:
/// the layer's trainable tensors; `moe[s]`: whether segment `s` returns a router output.
fn checkpointed(
    x: &Tensor,
    params: Vec<Tensor>,
    moe: Vec<bool>,
    layer: impl Fn(&Tensor) -> Result<(Tensor, Vec<Option<RouterOutput>>)> + Send + Sync + 'static,
) -> Result<(Tensor, Vec<Option<RouterOutput>>)> {
    let block: Arc<engine::CheckpointFn> = Arc::new(move |ins: &[Tensor]| {
        let (y, routes) = layer(&ins[0]).map_err(into_engine_error)?;
        let mut outs = vec![y];
        for r in routes.into_iter().flatten() {
            outs.extend([r.probs, r.mask, r.weights, r.logits]);
        }
        Ok(outs)
    });
    let outs = engine::checkpoint(std::slice::from_ref(x), &params, block)?;
    let mut outs = outs.into_iter();
    let y = outs.next().expect("the layer's output");
    let routes = moe
        .into_iter()
        .map(|moe| {
            moe.then(|| {
                let mut next = || outs.next().expect("4 router outputs per MoE segment");
                let (probs, mask, weights, logits) = (next(), next().detach(), next(), next());
                // The top-k ids and weights serve only the layer's own MoE computation.
                RouterOutput {
                    logits,
                    probs,
                    mask,
                    weights,
                    topk: None,
                }
            })
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

    /// Chooses how [`Llama::forward_train_group`] computes a group; `None` restores the default,
    /// [`GroupMode::Exact`] (on every device until the shared mode's speed is measured on a GPU:
    /// it saves launches for LoRA and for fused MixLoRA adapters of one setting, but its grouped
    /// products do more FLOPs, and MixLoRA FFNs it cannot group run per segment).
    pub fn set_group_mode(&mut self, mode: impl Into<Option<GroupMode>>) {
        self.group_mode = mode.into();
    }

    /// How [`Llama::forward_train_group`] computes a group: the mode set, else `Exact`.
    pub fn group_mode(&self) -> GroupMode {
        self.group_mode.unwrap_or(GroupMode::Exact)
    }

    /// The training forward of several adapters at once: per segment, what
    /// [`Llama::forward_train`] returns for its adapter set alone on its micro-batch (in
    /// [`GroupMode::Exact`] the same values, and the same gradients for the adapter's
    /// parameters, bit for bit on the CPU; in [`GroupMode::Shared`] up to rounding). Each
    /// adapter set appears in at most one segment.
    pub fn forward_train_group(&self, segments: &[GroupSegment]) -> Result<Vec<ForwardOutput>> {
        self.forward_train_group_hidden(segments)?
            .into_iter()
            .map(|o| {
                Ok(ForwardOutput {
                    logits: self.logits(&o.hidden)?,
                    aux_loss: o.aux_loss,
                    z_loss: o.z_loss,
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
        let segs = self.check_segments(segments)?;
        let same_b = segs.iter().all(|s| s.b == segs[0].b);
        match self.group_mode() {
            GroupMode::Shared if same_b => shared::forward(self, &segs),
            GroupMode::Sequential => segs
                .iter()
                .zip(segments)
                .map(|(s, g)| {
                    let (_, mask) = s.tokens_on_host()?;
                    let positions =
                        Tensor::from_slice(&mask_positions(&mask, s.t), [s.b, s.t], self.device())?;
                    let seed = s.dropout_seed;
                    self.forward_train_member_hidden_at(
                        g.adapter, s.ids, s.key_mask, &positions, seed,
                    )
                })
                .collect(),
            _ => exact::forward(self, &segs),
        }
    }

    /// The segments checked against the group: each names an attached adapter set, at most once,
    /// and has tokens.
    fn check_segments<'a>(&'a self, segments: &'a [GroupSegment]) -> Result<Vec<Segment<'a>>> {
        const WHAT: &str = "forward_train_group";
        self.check_trainable(WHAT)?;
        if segments.is_empty() {
            return Err(Error::Invalid(format!("{WHAT}: no segment")));
        }
        let mut out = Vec::with_capacity(segments.len());
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
            if let Some(m) = &seg.key_mask {
                if m.dims() != [b, t] {
                    return Err(Error::Invalid(format!(
                        "{WHAT}: segment {si} has ids [{b}, {t}] but a key mask of shape {}",
                        m.shape()
                    )));
                }
            }
            if let Some(h) = &seg.host {
                if h.ids.len() != b * t || h.key_mask.len() != b * t {
                    return Err(Error::Invalid(format!(
                        "{WHAT}: segment {si} has ids [{b}, {t}] but host copies of {} ids and {} \
                         mask values",
                        h.ids.len(),
                        h.key_mask.len()
                    )));
                }
            }
            out.push(Segment {
                adapters,
                ids: &seg.ids,
                key_mask: seg.key_mask.as_ref(),
                dropout_seed: seg.dropout_seed,
                host: seg.host.as_ref(),
                b,
                t,
            });
        }
        Ok(out)
    }
}

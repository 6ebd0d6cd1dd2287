//! One decoder layer of one forward pass: the attention block (RMSNorm, the q/k/v projections with
//! their LoRA, RoPE, causal grouped-query attention over the cached and new positions, the output
//! projection) and the FFN block (the SwiGLU with its LoRA, or the MixLoRA mixture), each with
//! its residual.

use engine::{causal_attention, flash_attention, FrozenWeight, Tensor};

use super::cache::LayerSlot;
use super::{sub_seed, DecoderLayer};
use crate::adapters::router::RouterOutput;
use crate::adapters::{lora_linear, LayerAdapters, MlpAdapters, MoeImpl, SharedFfn};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// How the decoder layers compute attention ([`super::Llama::set_attention_impl`]). Both give
/// the same values and gradients up to rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// [`engine::causal_attention`]: two matmuls around the fused causal, key-masked softmax;
    /// its backward keeps the probabilities `[B, Hq, T, S]`.
    #[default]
    Composite,
    /// [`engine::flash_attention`]: one fused op that keeps only a log-sum-exp per query row
    /// and reads q, k, v through their strides. On a GPU its kernels take head dims 64 and 128
    /// in f32 and bf16 (other cases run the composite); they are compiled in CI but not yet
    /// validated on a GPU, hence opt-in.
    Flash,
}

/// What every decoder layer of one forward pass shares (cheap to clone: tensors share buffers).
#[derive(Clone)]
pub(super) struct LayerCtx {
    pub(super) config: LlamaConfig,
    /// `(B, T)` of the new tokens.
    pub(super) batch: (usize, usize),
    pub(super) cos: Tensor,              // [B, T, D/2]
    pub(super) sin: Tensor,              // [B, T, D/2]
    pub(super) key_mask: Option<Tensor>, // [B, S] u32
    /// Cached positions before the new tokens.
    pub(super) past: usize,
    pub(super) dropout_seed: Option<u64>,
    pub(super) moe_impl: MoeImpl,
    pub(super) attention: AttentionImpl,
}

/// One decoder layer on `x` `[B, T, H]`: attention block and residual, then the SwiGLU (with its
/// LoRA) or the MixLoRA mixture and residual. With a cache slot, the layer's new keys and values
/// are appended to it. Returns the new hidden state and, for a MoE layer, the router's output.
pub(super) fn decoder_layer(
    ctx: &LayerCtx,
    li: usize,
    layer: &DecoderLayer,
    ad: Option<&LayerAdapters>,
    x: &Tensor,
    cache: Option<LayerSlot<'_>>,
) -> Result<(Tensor, Option<RouterOutput>)> {
    let c = &ctx.config;
    let hn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?;
    let x = x.add(&attention_block(ctx, li, layer, ad, &hn, cache)?)?;
    let hn = x.rms_norm(&layer.post_attention_layernorm, c.rms_norm_eps)?; // [B, T, H]
    let (y, route) = ffn_block(ctx, li, layer, ad, &hn)?;
    Ok((x.add(&y)?, route))
}

/// A projection of a layer: `(input [.., in], frozen weight [out, in], adapter slot)` to
/// `[.., out]`, the slot's LoRA included (0..4: q, k, v, o; 4..7: gate, up, down).
pub(super) type Proj<'a> = dyn Fn(&Tensor, &FrozenWeight, usize) -> Result<Tensor> + 'a;

/// The attention block without its residual, on the normed input `hn` `[B, T, H]`: the q/k/v
/// projections with their LoRA, RoPE, causal grouped-query attention (over the cached positions
/// too, whose slot gets the new keys and values), the output projection with its LoRA.
pub(super) fn attention_block(
    ctx: &LayerCtx,
    li: usize,
    layer: &DecoderLayer,
    ad: Option<&LayerAdapters>,
    hn: &Tensor,
    cache: Option<LayerSlot<'_>>,
) -> Result<Tensor> {
    let seed = |slot| sub_seed(ctx.dropout_seed, li, slot);
    let attn_lora = |j: usize| ad.and_then(|a| a.attn[j].as_ref());
    let proj = |x: &Tensor, w: &FrozenWeight, j: usize| lora_linear(x, w, attn_lora(j), seed(j));
    attention_with(ctx, layer, hn, cache, &proj)
}

/// [`attention_block`] with the projections (and their adapters) given by `proj`: the grouped
/// forward's shared mode runs each one over the rows of every adapter at once.
pub(super) fn attention_with(
    ctx: &LayerCtx,
    layer: &DecoderLayer,
    hn: &Tensor,
    cache: Option<LayerSlot<'_>>,
    proj: &Proj<'_>,
) -> Result<Tensor> {
    let c = &ctx.config;
    let (b, t) = ctx.batch;
    let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let heads = |w: &FrozenWeight, j: usize, n: usize| -> Result<Tensor> {
        // [B, T, n·D] -> [B, n, T, D] (a view)
        Ok(proj(hn, w, j)?.reshape([b, t, n, d])?.transpose(1, 2)?)
    };
    let q = heads(&layer.q_proj, 0, nh)?.rope(&ctx.cos, &ctx.sin)?;
    let mut k = heads(&layer.k_proj, 1, nkv)?.rope(&ctx.cos, &ctx.sin)?;
    let mut v = heads(&layer.v_proj, 2, nkv)?;
    if let Some(slot) = cache {
        (k, v) = slot.append(k, v)?;
    }
    let mask = ctx.key_mask.as_ref();
    let attn = match ctx.attention {
        AttentionImpl::Composite => causal_attention(&q, &k, &v, mask, ctx.past)?,
        // A view of a [B, T, Hq, D] buffer: the transpose and reshape below copy nothing.
        AttentionImpl::Flash => flash_attention(&q, &k, &v, mask, ctx.past)?,
    }; // [B, Hq, T, D]
    let attn = attn.transpose(1, 2)?.reshape([b, t, nh * d])?;
    proj(&attn, &layer.o_proj, 3)
}

/// The SwiGLU `down(silu(gate(hn)) ⊙ up(hn))` with the projections (and their LoRA) given by
/// `proj` (slots 4, 5, 6).
pub(super) fn swiglu_with(layer: &DecoderLayer, hn: &Tensor, proj: &Proj<'_>) -> Result<Tensor> {
    let gate = proj(hn, &layer.gate_proj, 4)?;
    let up = proj(hn, &layer.up_proj, 5)?;
    proj(&gate.silu_mul(&up)?, &layer.down_proj, 6)
}

/// The FFN block without its residual, on the normed input `hn` `[B, T, H]`: the SwiGLU with its
/// LoRA, or the MixLoRA mixture (then also the router's output).
pub(super) fn ffn_block(
    ctx: &LayerCtx,
    li: usize,
    layer: &DecoderLayer,
    ad: Option<&LayerAdapters>,
    hn: &Tensor,
) -> Result<(Tensor, Option<RouterOutput>)> {
    let seed = |slot| sub_seed(ctx.dropout_seed, li, slot);
    let ffn = SharedFfn {
        gate: &layer.gate_proj,
        up: &layer.up_proj,
        down: &layer.down_proj,
    };
    match ad.map(|a| &a.mlp) {
        Some(MlpAdapters::MixLora(moe)) => {
            let stacked = ad.and_then(|a| a.fused_inference.as_ref());
            let (y, route) = moe.forward_with(hn, ffn, ctx.moe_impl, seed(4), stacked)?;
            Ok((y, Some(route)))
        }
        mlp => {
            let lora = |j: usize| match mlp {
                Some(MlpAdapters::Lora(l)) => l[j - 4].as_ref(),
                _ => None,
            };
            let proj = |x: &Tensor, w: &FrozenWeight, j: usize| lora_linear(x, w, lora(j), seed(j));
            Ok((swiglu_with(layer, hn, &proj)?, None))
        }
    }
}

/// A model error raised inside an engine callback (a checkpointed layer), as an engine error.
pub(super) fn into_engine_error(e: Error) -> engine::Error {
    match e {
        Error::Engine(e) => e,
        other => engine::Error::invalid("decoder_layer", other.to_string()),
    }
}

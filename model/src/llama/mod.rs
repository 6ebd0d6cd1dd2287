//! The LLaMA decoder: token embedding, `num_hidden_layers` × (RMSNorm → grouped-query attention
//! with RoPE → residual, RMSNorm → SwiGLU → residual), a final RMSNorm and the (possibly tied)
//! LM head. Weights stay frozen; the forward pass works in the dtype they were loaded in.
//!
//! Adapters ([`crate::adapters`]) attach to the projections: LoRA on any of the seven, or MixLoRA
//! (LoRA on q, k, v, o and a mixture of LoRA experts in place of each FFN). Every forward pass
//! uses them; [`Llama::forward_train`] also applies their dropout and returns the router loss.

use std::sync::Arc;

use engine::{rng, rope_tables, DType, Device, FrozenWeight, Tensor};

use crate::adapters::router::{aux_loss, expert_load, token_weights, z_loss, RouterOutput};
use crate::adapters::{AdapterConfig, AdapterInit, Adapters, LayerAdapters, MoeImpl};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::Weights;

mod cache;
mod group;
mod layer;
mod merge;
mod random;

pub use cache::{mask_positions, positions_from_mask, KvCache};
pub use group::{GroupMode, GroupSegment, HostTokens};
pub use layer::AttentionImpl;
use layer::{decoder_layer, into_engine_error, LayerCtx};
pub use merge::MergeReport;
pub use random::RandomInit;

/// One decoder layer's frozen weights. Projections are stored `[out, in]` as in the files.
#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,          // [H]
    pub q_proj: FrozenWeight,             // [Hq·D, H]
    pub k_proj: FrozenWeight,             // [Hkv·D, H]
    pub v_proj: FrozenWeight,             // [Hkv·D, H]
    pub o_proj: FrozenWeight,             // [H, Hq·D]
    pub post_attention_layernorm: Tensor, // [H]
    pub gate_proj: FrozenWeight,          // [I, H]
    pub up_proj: FrozenWeight,            // [I, H]
    pub down_proj: FrozenWeight,          // [H, I]
}

impl DecoderLayer {
    /// The seven projection weights: q, k, v, o, gate, up, down.
    pub fn projections_mut(&mut self) -> [&mut FrozenWeight; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor, // [V, H]
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor, // [H]
    /// `[V, H]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// RoPE inverse frequencies `[D/2]` (llama3 scaling applied), in the model's dtype.
    inv_freq: Tensor,
    /// Attached LoRA / MixLoRA adapters.
    adapters: Option<Adapters>,
    /// Adapter sets trained together on this base, each on its own rows of a batch
    /// ([`Llama::forward_train_group`]); independent of `adapters`.
    adapter_group: Vec<Adapters>,
    /// How the group's forward runs ([`Llama::set_group_mode`]); `None`: the device's default.
    group_mode: Option<GroupMode>,
    /// How attention is computed ([`Llama::set_attention_impl`]).
    attention: AttentionImpl,
    /// Gradient checkpointing: in a training forward, keep only each decoder layer's input and
    /// outputs and recompute the layer in the backward pass.
    checkpoint_layers: bool,
    /// Set by [`Llama::merge_adapters_for_inference`]: the base weights hold LoRA deltas, so
    /// training calls are refused.
    inference_only: bool,
}

/// What [`Llama::forward_train`] returns.
pub struct ForwardOutput {
    /// `[B, T, V]`, in the model's dtype.
    pub logits: Tensor,
    /// The MixLoRA load-balance loss over all MoE layers and real tokens, already multiplied by
    /// `router_aux_loss_coef` (a scalar in the adapter dtype); `None` without MoE layers.
    pub aux_loss: Option<Tensor>,
    /// The router z-loss over all MoE layers and real tokens, already multiplied by the
    /// adapters' `router_z_loss_coef` (a scalar in the adapter dtype); `None` without MoE
    /// layers or with a zero coefficient.
    pub z_loss: Option<Tensor>,
    /// Per MoE layer, `[E]` f32 without gradient: the share of routed (token, slot) pairs each
    /// expert received over the real tokens.
    pub expert_load: Vec<Tensor>,
}

/// What [`Llama::forward_train_hidden`] returns: [`ForwardOutput`] with the final hidden states
/// in place of the logits.
pub struct HiddenOutput {
    /// `[B, T, H]`, after the final norm, in the model's dtype.
    pub hidden: Tensor,
    /// As in [`ForwardOutput::aux_loss`].
    pub aux_loss: Option<Tensor>,
    /// As in [`ForwardOutput::z_loss`].
    pub z_loss: Option<Tensor>,
    /// As in [`ForwardOutput::expert_load`].
    pub expert_load: Vec<Tensor>,
}

/// Options of one forward pass.
#[derive(Clone, Copy, Default)]
struct Pass {
    /// Seeds adapter dropout (training); `None`: no dropout.
    dropout_seed: Option<u64>,
    /// Keep every MoE layer's router output.
    collect_routing: bool,
}

/// The dropout seed of adapter slot `slot` of layer `layer` (0..4 attention, 4..7 FFN / MoE).
fn sub_seed(seed: Option<u64>, layer: usize, slot: usize) -> Option<u64> {
    seed.map(|s| rng::hash(s, (layer * 8 + slot) as u64))
}

/// `x @ wᵀ` for a weight stored `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// RoPE inverse frequencies `theta^(-2i/d)`, with Llama 3 frequency scaling when configured
/// (from `config.json`'s formula, or divided by a GGUF file's per-frequency factors).
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / d as f64))
        .collect();
    let s = match &cfg.rope_scaling {
        None => return base,
        Some(RopeScaling::FreqFactors(f)) => {
            return base.iter().zip(f).map(|(b, f)| b / f).collect();
        }
        Some(RopeScaling::Llama3(s)) => *s,
    };
    let old = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

impl Llama {
    /// Builds the model from loaded weights, checking every tensor's shape against the config.
    pub fn from_weights(config: LlamaConfig, w: &Weights) -> Result<Llama> {
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (hq, hkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            layers.push(DecoderLayer {
                input_layernorm: w.get(&p("input_layernorm.weight"), &[h])?,
                q_proj: w.get(&p("self_attn.q_proj.weight"), &[hq, h])?.into(),
                k_proj: w.get(&p("self_attn.k_proj.weight"), &[hkv, h])?.into(),
                v_proj: w.get(&p("self_attn.v_proj.weight"), &[hkv, h])?.into(),
                o_proj: w.get(&p("self_attn.o_proj.weight"), &[h, hq])?.into(),
                post_attention_layernorm: w.get(&p("post_attention_layernorm.weight"), &[h])?,
                gate_proj: w.get(&p("mlp.gate_proj.weight"), &[i, h])?.into(),
                up_proj: w.get(&p("mlp.up_proj.weight"), &[i, h])?.into(),
                down_proj: w.get(&p("mlp.down_proj.weight"), &[h, i])?.into(),
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(w.get("lm_head.weight", &[c.vocab_size, h])?)
        };
        let inv_freq = Tensor::from_f64(&inv_freq(c), d / 2, w.dtype(), w.device())?;
        Ok(Llama {
            embed_tokens,
            layers,
            norm: w.get("model.norm.weight", &[h])?,
            lm_head,
            inv_freq,
            config,
            adapters: None,
            adapter_group: Vec::new(),
            group_mode: None,
            attention: AttentionImpl::default(),
            checkpoint_layers: false,
            inference_only: false,
        })
    }

    /// Attaches fresh adapters as `cfg` describes (replacing any): trainable variables in f32
    /// (f64 for an f64 base), `A` uniform in `±1/√in`, `B = 0` (so the model's outputs do not
    /// change), routers `N(0, router_init_range)`; seeded.
    pub fn add_adapters(&mut self, cfg: &AdapterConfig, seed: u64) -> Result<()> {
        self.add_adapters_with(cfg, seed, AdapterInit::default())
    }

    /// [`Llama::add_adapters`] with the initialisation options `init`
    /// ([`Adapters::init_with`]).
    pub fn add_adapters_with(
        &mut self,
        cfg: &AdapterConfig,
        seed: u64,
        init: AdapterInit,
    ) -> Result<()> {
        self.check_trainable("add_adapters")?;
        self.adapters = Some(Adapters::init_with(
            cfg,
            &self.config,
            seed,
            self.dtype(),
            self.device(),
            init,
        )?);
        Ok(())
    }

    /// Attaches `adapters` (built for this model's shape), replacing any; refused on an
    /// inference-only model ([`Llama::merge_adapters_for_inference`]).
    pub fn set_adapters(&mut self, adapters: Adapters) -> Result<()> {
        self.check_trainable("set_adapters")?;
        self.adapters = Some(adapters);
        Ok(())
    }

    /// Detaches the adapters and returns them.
    pub fn remove_adapters(&mut self) -> Option<Adapters> {
        self.adapters.take()
    }

    pub fn adapters(&self) -> Option<&Adapters> {
        self.adapters.as_ref()
    }

    pub fn adapter_config(&self) -> Option<&AdapterConfig> {
        self.adapters.as_ref().map(|a| &a.config)
    }

    /// Gradient checkpointing per decoder layer for forwards that record a tape: less activation
    /// memory (one `[B, T, H]` tensor per layer is kept), one more forward of every layer in the
    /// backward pass. Values and gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpoint_layers = on;
    }
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpoint_layers
    }

    /// Chooses how every forward computes attention (default [`AttentionImpl::Composite`]).
    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attention = imp;
    }
    pub fn attention_impl(&self) -> AttentionImpl {
        self.attention
    }

    /// Chooses how MoE FFNs are computed (no-op without MixLoRA adapters).
    pub fn set_moe_impl(&mut self, imp: MoeImpl) {
        if let Some(a) = &mut self.adapters {
            a.moe_impl = imp;
        }
    }

    /// Stores the seven projection weights of every decoder layer in FP8 (e4m3, one scale per
    /// output channel: [`engine::Fp8Weight`]), replacing the dense ones, whose memory is freed
    /// unless something else holds it. The embeddings, norms and LM head stay as they are; the
    /// projections' products then run through FP8 GEMMs in the model's dtype (bf16 on a GPU).
    /// Returns the bytes of the projection weights before and after. Done once: projections
    /// already in FP8 are kept. Refused after [`Llama::merge_adapters_for_inference`] (the
    /// weights then hold merged LoRA deltas, which 3 mantissa bits would lose).
    pub fn quantize_base_fp8(&mut self) -> Result<(usize, usize)> {
        if self.inference_only {
            return Err(Error::Invalid(
                "the base cannot be quantised to FP8 after its adapters were merged into it".into(),
            ));
        }
        const NAMES: [&str; 7] = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        let (mut before, mut after) = (0, 0);
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (w, name) in layer.projections_mut().into_iter().zip(NAMES) {
                before += w.bytes();
                *w = w.to_fp8().map_err(|e| {
                    Error::Invalid(format!("model.layers.{li}.{name}.weight in FP8: {e}"))
                })?;
                after += w.bytes();
            }
        }
        Ok((before, after))
    }

    /// Whether the projection weights are in FP8 ([`Llama::quantize_base_fp8`]).
    pub fn base_is_fp8(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.q_proj.fp8().is_some())
    }

    /// Lays out `W_gate` and `W_up` of every layer as the two row halves of one `[2I, H]` buffer
    /// (each becomes a view of it; values unchanged), so that the fused MoE path computes
    /// `G` and `U` with one GEMM. Done once (layers already laid out are skipped); the old
    /// buffers are freed unless something else holds them.
    pub fn stack_gate_up(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            let (FrozenWeight::Dense(gate), FrozenWeight::Dense(up)) =
                (&layer.gate_proj, &layer.up_proj)
            else {
                continue; // FP8 weights run their own products
            };
            if gate.same_storage(up) {
                continue;
            }
            let i = gate.dims()[0];
            let gu = engine::cat(&[gate, up], 0)?; // [2I, H]
            layer.gate_proj = gu.narrow(0, 0, i)?.into();
            layer.up_proj = gu.narrow(0, i, i)?.into();
        }
        Ok(())
    }

    /// The trainable tensors (the adapters' variables, shared with the model: gradients land on
    /// them and in-place updates reach the model) with their file names. Empty without adapters.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        self.adapters
            .as_ref()
            .map_or_else(Vec::new, Adapters::named_params)
    }

    /// Replaces the adapter tensor `name` by `value` (same shape): `value` itself becomes the
    /// parameter, and gradients land on it. A replaced MixLoRA expert matrix no longer lies in
    /// its layer's stacked buffer, so the MoE paths copy that kind to stack it
    /// ([`Adapters::set_param`]); [`Llama::assign_trainable_param`] keeps the layout.
    pub fn set_trainable_param(&mut self, name: &str, value: Tensor) -> Result<()> {
        self.check_trainable("set_trainable_param")?;
        let config = self.config.clone();
        match &mut self.adapters {
            Some(a) => a.set_param(&config, name, value),
            None => Err(Error::Invalid(format!(
                "set_trainable_param: no adapters attached (asked for {name})"
            ))),
        }
    }

    /// Copies `value` into the adapter tensor `name` in place when shape and dtype match (the
    /// parameter stays the same variable, and a MixLoRA expert matrix a view of its layer's
    /// stacked buffer); otherwise replaces it as [`Llama::set_trainable_param`] does.
    pub fn assign_trainable_param(&mut self, name: &str, value: &Tensor) -> Result<()> {
        self.check_trainable("assign_trainable_param")?;
        let config = self.config.clone();
        match &mut self.adapters {
            Some(a) => a.assign_param(&config, name, value),
            None => Err(Error::Invalid(format!(
                "assign_trainable_param: no adapters attached (asked for {name})"
            ))),
        }
    }

    /// Loads a GGUF file or a Hugging Face folder.
    pub fn load(path: &std::path::Path, dtype: DType, device: Device) -> Result<Llama> {
        let (config, weights) = crate::weights::load(path, dtype, device)?;
        Self::from_weights(config, &weights)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Final hidden states `[B, T, H]` (after the last norm) for token ids `[B, T]` (u32).
    ///
    /// `positions` `[B, T]` (u32) are the RoPE positions of the new tokens; `key_mask` `[B, S]`
    /// (u32, 1 = real token) covers the cached and the new positions, `S = cache.len() + T`;
    /// `None` means no padding. With a cache, the new keys and values are appended to it.
    /// Attached adapters are used (without dropout).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let adapters = self.adapters.as_ref();
        Ok(self
            .forward_pass(adapters, ids, positions, key_mask, cache, Pass::default())?
            .0)
    }

    /// The decoder stack with the adapter set `adapters`; also returns the MoE layers' router
    /// outputs when `pass` asks for them.
    fn forward_pass(
        &self,
        adapters: Option<&Adapters>,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        pass: Pass,
    ) -> Result<(Tensor, Vec<RouterOutput>)> {
        let c = &self.config;
        let (b, t) = batch_dims(ids)?;
        let (cos, sin) = rope_tables(positions, &self.inv_freq)?; // [B, T, D/2]
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mut routing = Vec::new();
        let moe_impl = adapters.map_or(MoeImpl::default(), |a| a.moe_impl);
        let ctx = LayerCtx {
            config: c.clone(),
            batch: (b, t),
            cos,
            sin,
            key_mask: key_mask.cloned(),
            past,
            dropout_seed: pass.dropout_seed,
            moe_impl,
            attention: self.attention,
        };
        let mut x = self.embed_tokens.embedding(ids)?; // [B, T, H]
        for (li, layer) in self.layers.iter().enumerate() {
            let ad = adapters.map(|a| &a.layers[li]);
            let route;
            if self.checkpoint_layers && cache.is_none() && engine::grad_enabled() {
                // Keep only the layer's input and outputs; recompute the rest in the backward.
                let (layer_c, ad_c, ctx_c) = (layer.clone(), ad.cloned(), ctx.clone());
                let block: Arc<engine::CheckpointFn> = Arc::new(move |ins: &[Tensor]| {
                    let (y, r) = decoder_layer(&ctx_c, li, &layer_c, ad_c.as_ref(), &ins[0], None)
                        .map_err(into_engine_error)?;
                    let mut outs = vec![y];
                    if let Some(r) = r {
                        outs.extend([r.probs, r.mask, r.weights, r.logits]);
                    }
                    Ok(outs)
                });
                let params = ad.map_or_else(Vec::new, LayerAdapters::params);
                let mut outs = engine::checkpoint(std::slice::from_ref(&x), &params, block)?;
                route = (outs.len() == 5).then(|| {
                    let logits = outs.pop().expect("5 outputs");
                    let weights = outs.pop().expect("5 outputs");
                    let mask = outs.pop().expect("5 outputs").detach();
                    let probs = outs.pop().expect("5 outputs");
                    // The top-k ids and weights serve only the layer's own MoE computation.
                    RouterOutput {
                        logits,
                        probs,
                        mask,
                        weights,
                        topk: None,
                    }
                });
                x = outs.swap_remove(0);
            } else {
                let slot = cache.as_deref_mut().map(|c| c.layer(li, self.layers.len()));
                (x, route) = decoder_layer(&ctx, li, layer, ad, &x, slot)?;
            }
            if let (Some(r), true) = (route, pass.collect_routing) {
                routing.push(r);
            }
        }
        Ok((x.rms_norm(&self.norm, c.rms_norm_eps)?, routing))
    }

    /// Logits `[.., V]` of final hidden states `[.., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, self.lm_head_weight())
    }

    /// Logits `[B, T, V]` of a batch without cache; `key_mask` `[B, T]` marks real tokens
    /// (right or left padding); positions count real tokens only.
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = batch_dims(ids)?;
        let positions = positions_from_mask(b, t, key_mask, 0, ids.device())?;
        let h = self.forward_hidden(ids, &positions, key_mask, None)?;
        self.logits(&h)
    }

    /// [`Llama::forward`] that also returns every MoE layer's router output (no dropout): the
    /// routing of an evaluation batch.
    pub fn forward_with_routing(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<RouterOutput>)> {
        let (b, t) = batch_dims(ids)?;
        let positions = positions_from_mask(b, t, key_mask, 0, ids.device())?;
        let pass = Pass {
            dropout_seed: None,
            collect_routing: true,
        };
        let adapters = self.adapters.as_ref();
        let (h, routing) = self.forward_pass(adapters, ids, &positions, key_mask, None, pass)?;
        Ok((self.logits(&h)?, routing))
    }

    /// The training forward: logits `[B, T, V]` of ids `[B, T]` (u32) with the attached adapters,
    /// their dropout when `dropout_seed` is given (a new seed per step), and for MixLoRA the
    /// load-balance loss over all MoE layers and the real tokens of `key_mask` `[B, T]` (u32,
    /// 1 = real; `None`: no padding) plus each layer's expert load. Positions count real tokens
    /// only, as in [`Llama::forward`]. The loss to minimise is `CE(logits) + aux_loss`.
    pub fn forward_train(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        dropout_seed: Option<u64>,
    ) -> Result<ForwardOutput> {
        let out = self.forward_train_hidden(ids, key_mask, dropout_seed)?;
        Ok(ForwardOutput {
            logits: self.logits(&out.hidden)?,
            aux_loss: out.aux_loss,
            z_loss: out.z_loss,
            expert_load: out.expert_load,
        })
    }

    /// [`Llama::forward_train`] without the LM head: the final hidden states `[B, T, H]` (after
    /// the last norm), so that a loss can apply [`Llama::lm_head_weight`] chunk by chunk
    /// (`Tensor::linear_cross_entropy_rows`) and never hold the `[B, T, V]` logits.
    pub fn forward_train_hidden(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        dropout_seed: Option<u64>,
    ) -> Result<HiddenOutput> {
        let (b, t) = batch_dims(ids)?;
        let positions = positions_from_mask(b, t, key_mask, 0, ids.device())?;
        self.forward_train_hidden_at(ids, key_mask, &positions, dropout_seed)
    }

    /// [`Llama::forward_train_hidden`] at the given RoPE positions `[B, T]` (u32; those of the
    /// key mask: [`mask_positions`]), which it then does not compute from the key mask: no
    /// read-back, so the pass can be recorded as a CUDA graph.
    pub fn forward_train_hidden_at(
        &self,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        positions: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<HiddenOutput> {
        self.train_hidden_at(
            self.adapters.as_ref(),
            ids,
            key_mask,
            positions,
            dropout_seed,
        )
    }

    /// [`Llama::forward_train_hidden_at`] with the adapter set `adapter` of the group
    /// ([`Llama::set_adapter_group`]) in place of the attached one: what that set computes alone
    /// (its values, and the gradients of its parameters), bit for bit. One member of a group at a
    /// time, so that each adapter of a run of several can record its own micro-steps as CUDA
    /// graphs.
    pub fn forward_train_member_hidden_at(
        &self,
        adapter: usize,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        positions: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<HiddenOutput> {
        let adapters = self.adapter_group.get(adapter).ok_or_else(|| {
            Error::Invalid(format!(
                "forward_train_member: adapter set {adapter} is not in the group (it has {})",
                self.adapter_group.len()
            ))
        })?;
        self.train_hidden_at(Some(adapters), ids, key_mask, positions, dropout_seed)
    }

    fn train_hidden_at(
        &self,
        adapters: Option<&Adapters>,
        ids: &Tensor,
        key_mask: Option<&Tensor>,
        positions: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<HiddenOutput> {
        self.check_trainable("forward_train")?;
        let (b, t) = batch_dims(ids)?;
        if positions.dims() != [b, t] || positions.dtype() != engine::DType::U32 {
            return Err(engine::Error::invalid(
                "forward_train",
                format!(
                    "positions of shape {} ({:?}) for ids of shape {}: want [{b}, {t}] u32",
                    positions.shape(),
                    positions.dtype(),
                    ids.shape()
                ),
            )
            .into());
        }
        let pass = Pass {
            dropout_seed,
            collect_routing: true,
        };
        let (hidden, routing) =
            self.forward_pass(adapters, ids, positions, key_mask, None, pass)?;
        train_output(adapters, hidden, routing, key_mask)
    }

    /// The LM head `[V, H]`: `lm_head`, or the token embedding when they are tied.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// A training forward's [`HiddenOutput`] from the final hidden states and the MoE layers' router
/// outputs of one adapter set (`None`: no adapters), over the real tokens of `key_mask`.
fn train_output(
    adapters: Option<&Adapters>,
    hidden: Tensor,
    routing: Vec<RouterOutput>,
    key_mask: Option<&Tensor>,
) -> Result<HiddenOutput> {
    let (Some(adapters), Some(first)) = (adapters, routing.first()) else {
        return Ok(HiddenOutput {
            hidden,
            aux_loss: None,
            z_loss: None,
            expert_load: Vec::new(),
        });
    };
    let tw = key_mask
        .map(|m| token_weights(m, first.probs.dtype()))
        .transpose()?; // [N, 1]
    let aux_loss = aux_loss(&routing, tw.as_ref(), adapters.config.router_aux_loss_coef)?;
    let z_loss = z_loss(&routing, tw.as_ref(), adapters.router_z_loss_coef)?;
    let expert_load = engine::no_grad(|| {
        routing
            .iter()
            .map(|r| expert_load(r, tw.as_ref()))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(HiddenOutput {
        hidden,
        aux_loss,
        z_loss,
        expert_load,
    })
}

/// `(B, T)` of a batch of token ids, which must be u32 of rank 2.
fn batch_dims(ids: &Tensor) -> Result<(usize, usize)> {
    if ids.rank() != 2 || ids.dtype() != DType::U32 {
        return Err(engine::Error::invalid(
            "llama",
            format!(
                "token ids must be u32 [batch, seq], got {} of shape {}",
                ids.dtype(),
                ids.shape()
            ),
        )
        .into());
    }
    Ok((ids.dims()[0], ids.dims()[1]))
}

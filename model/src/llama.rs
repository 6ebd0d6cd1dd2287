//! The LLaMA decoder: token embedding, `num_hidden_layers` × (RMSNorm → grouped-query attention
//! with RoPE → residual, RMSNorm → SwiGLU → residual), a final RMSNorm and the (possibly tied)
//! LM head. Weights stay frozen; the forward pass works in the dtype they were loaded in.

use engine::{cat, causal_attention, rope_tables, DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::weights::Weights;

/// One decoder layer's frozen weights. Projections are stored `[out, in]` as in the files.
pub struct DecoderLayer {
    pub input_layernorm: Tensor,          // [H]
    pub q_proj: Tensor,                   // [Hq·D, H]
    pub k_proj: Tensor,                   // [Hkv·D, H]
    pub v_proj: Tensor,                   // [Hkv·D, H]
    pub o_proj: Tensor,                   // [H, Hq·D]
    pub post_attention_layernorm: Tensor, // [H]
    pub gate_proj: Tensor,                // [I, H]
    pub up_proj: Tensor,                  // [I, H]
    pub down_proj: Tensor,                // [H, I]
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
}

/// Keys and values of the positions seen so far, per layer: `[B, Hkv, S, D]` each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `x @ wᵀ` for a weight stored `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// RoPE inverse frequencies `theta^(-2i/d)`, with Llama 3 frequency scaling when configured.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / d as f64))
        .collect();
    let Some(s) = cfg.rope_scaling else {
        return base;
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
                q_proj: w.get(&p("self_attn.q_proj.weight"), &[hq, h])?,
                k_proj: w.get(&p("self_attn.k_proj.weight"), &[hkv, h])?,
                v_proj: w.get(&p("self_attn.v_proj.weight"), &[hkv, h])?,
                o_proj: w.get(&p("self_attn.o_proj.weight"), &[h, hq])?,
                post_attention_layernorm: w.get(&p("post_attention_layernorm.weight"), &[h])?,
                gate_proj: w.get(&p("mlp.gate_proj.weight"), &[i, h])?,
                up_proj: w.get(&p("mlp.up_proj.weight"), &[i, h])?,
                down_proj: w.get(&p("mlp.down_proj.weight"), &[h, i])?,
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
        })
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
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (cos, sin) = rope_tables(positions, &self.inv_freq)?; // [B, T, D/2]
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize_with(self.layers.len(), || None);
        }
        let mut x = self.embed_tokens.embedding(ids)?; // [B, T, H]
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let hn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?;
            let heads = |w: &Tensor, n: usize| -> Result<Tensor> {
                // [B, T, n·D] -> [B, n, T, D] (a view)
                Ok(linear(&hn, w)?.reshape([b, t, n, d])?.transpose(1, 2)?)
            };
            let q = heads(&layer.q_proj, nh)?.rope(&cos, &sin)?;
            let mut k = heads(&layer.k_proj, nkv)?.rope(&cos, &sin)?;
            let mut v = heads(&layer.v_proj, nkv)?;
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.layers[li] {
                    k = cat(&[pk, &k], 2)?;
                    v = cat(&[pv, &v], 2)?;
                } else {
                    k = k.contiguous()?;
                    v = v.contiguous()?;
                }
                cache.layers[li] = Some((k.clone(), v.clone()));
            }
            let attn = causal_attention(&q, &k, &v, key_mask, past)?; // [B, Hq, T, D]
            let attn = attn.transpose(1, 2)?.reshape([b, t, nh * d])?;
            x = x.add(&linear(&attn, &layer.o_proj)?)?;
            // SwiGLU block.
            let hn = x.rms_norm(&layer.post_attention_layernorm, c.rms_norm_eps)?;
            let gate = linear(&hn, &layer.gate_proj)?.silu()?;
            let up = linear(&hn, &layer.up_proj)?;
            x = x.add(&linear(&gate.mul(&up)?, &layer.down_proj)?)?;
        }
        Ok(x.rms_norm(&self.norm, c.rms_norm_eps)?)
    }

    /// Logits `[.., V]` of final hidden states `[.., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// Logits `[B, T, V]` of a batch without cache; `key_mask` `[B, T]` marks real tokens
    /// (right or left padding); positions count real tokens only.
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let positions =
            positions_from_mask(ids.dims()[0], ids.dims()[1], key_mask, 0, ids.device())?;
        let h = self.forward_hidden(ids, &positions, key_mask, None)?;
        self.logits(&h)
    }
}

/// RoPE positions `[B, T]` of `t` new tokens after `past` cached ones: the number of real
/// tokens before each one (so left padding does not shift positions); `0..` when no mask.
pub fn positions_from_mask(
    b: usize,
    t: usize,
    key_mask: Option<&Tensor>,
    past: usize,
    device: Device,
) -> Result<Tensor> {
    let pos: Vec<u32> = match key_mask {
        None => (0..b)
            .flat_map(|_| (past..past + t).map(|p| p as u32))
            .collect(),
        Some(m) => {
            let s = m.dims()[1];
            let mv = m.to_vec_u32()?;
            let mut out = Vec::with_capacity(b * t);
            for row in mv.chunks(s) {
                let mut seen = 0u32;
                let mut row_pos = Vec::with_capacity(s);
                for &v in row {
                    row_pos.push(seen);
                    seen += (v != 0) as u32;
                }
                out.extend_from_slice(&row_pos[s - t..]);
            }
            out
        }
    };
    Ok(Tensor::from_vec(pos, [b, t], device)?)
}

//! Randomly initialised models, for tests and the embedded default job: seeded normal
//! projections and embeddings, norms of ones.

use engine::{rng, DType, Device, Tensor};

use super::{inv_freq, DecoderLayer, Llama};
use crate::config::LlamaConfig;
use crate::error::Result;

/// Scales of [`Llama::random_with`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomInit {
    /// Standard deviation of the projections; `None`: `1/√fan_in`, so activations keep their
    /// scale through frozen random layers.
    pub projection_std: Option<f64>,
    /// Standard deviation of the embeddings (and of an untied LM head).
    pub embedding_std: f64,
}

impl Default for RandomInit {
    /// `N(0, 0.02²)` everywhere, as LLaMA initialises before pre-training.
    fn default() -> Self {
        RandomInit {
            projection_std: Some(0.02),
            embedding_std: 0.02,
        }
    }
}

impl RandomInit {
    /// For a frozen random base that adapters must steer: fan-in-scaled projections and
    /// `N(0, 0.25²)` embeddings, so that with a tied head a unit-RMS hidden state aligned with one
    /// row reaches logits of about `0.25·H`, enough for confident predictions.
    pub fn frozen_base() -> Self {
        RandomInit {
            projection_std: None,
            embedding_std: 0.25,
        }
    }
}

impl Llama {
    /// A randomly initialised model of shape `config` (for tests): projections and embeddings
    /// `N(0, 0.02²)`, norms ones, seeded.
    pub fn random(config: LlamaConfig, seed: u64, dtype: DType, device: Device) -> Result<Llama> {
        Self::random_with(config, seed, dtype, device, RandomInit::default())
    }

    /// A randomly initialised model with the scales of `init`, seeded.
    pub fn random_with(
        config: LlamaConfig,
        seed: u64,
        dtype: DType,
        device: Device,
        init: RandomInit,
    ) -> Result<Llama> {
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (hq, hkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let mut r = rng::Rng::new(seed);
        let mut normal = |shape: [usize; 2], std: Option<f64>| {
            let std = std.unwrap_or(match init.projection_std {
                Some(s) => s,
                None => 1.0 / (shape[1] as f64).sqrt(),
            });
            Tensor::randn(shape, 0.0, std, r.next_u64(), dtype, device)
        };
        let ones = || Tensor::ones(h, dtype, device);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            layers.push(DecoderLayer {
                input_layernorm: ones()?,
                q_proj: normal([hq, h], None)?.into(),
                k_proj: normal([hkv, h], None)?.into(),
                v_proj: normal([hkv, h], None)?.into(),
                o_proj: normal([h, hq], None)?.into(),
                post_attention_layernorm: ones()?,
                gate_proj: normal([i, h], None)?.into(),
                up_proj: normal([i, h], None)?.into(),
                down_proj: normal([h, i], None)?.into(),
            });
        }
        let embed_tokens = normal([c.vocab_size, h], Some(init.embedding_std))?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(normal([c.vocab_size, h], Some(init.embedding_std))?)
        };
        let inv_freq = Tensor::from_f64(&inv_freq(c), d / 2, dtype, device)?;
        Ok(Llama {
            embed_tokens,
            layers,
            norm: ones()?,
            lm_head,
            inv_freq,
            config,
            adapters: None,
            adapter_group: Vec::new(),
            group_mode: None,
            attention: Default::default(),
            checkpoint_layers: false,
            inference_only: false,
        })
    }
}

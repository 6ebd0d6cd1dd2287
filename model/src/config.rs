//! The LLaMA configuration, from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::error::{file_name, Error, Result};
use crate::gguf::{Header, Value};

/// Llama 3 RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_scaling` of a Hugging Face `config.json` (`rope_type: "llama3"`).
    Llama3(Llama3RopeScaling),
    /// A GGUF file's `rope_freqs.weight` (llama.cpp's form of the same scaling): one factor per
    /// frequency, `head_dim / 2` of them; frequency `i` is divided by factor `i`.
    FreqFactors(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// hidden_size / num_attention_heads unless the file says otherwise.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id (Llama 3.1 lists several); the first is the canonical one.
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` is an integer or a list of them in config.json.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// The fields of config.json that matter here; unknown fields are ignored.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling parameters here.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl LlamaConfig {
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids.first().copied()
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&file_name(path), &text)
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    pub fn from_json_str(file: &str, text: &str) -> Result<LlamaConfig> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::format(file, format!("invalid config: {e}")))?;
        let params = c.rope_parameters.as_ref();
        let rope_theta = c
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let scaling = c.rope_scaling.as_ref().or(params);
        let rope_scaling = match scaling {
            None => None,
            Some(v) => parse_rope_scaling(file, v)?,
        };
        let cfg = LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c
                .head_dim
                .unwrap_or_else(|| c.hidden_size / c.num_attention_heads.max(1)),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids: match c.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(i)) => vec![i],
                Some(OneOrMany::Many(v)) => v,
            },
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads the `llama.*` and `tokenizer.ggml.*` metadata of a GGUF header. `output.weight` being
    /// absent means tied embeddings.
    pub fn from_gguf(file: &str, h: &Header) -> Result<LlamaConfig> {
        let arch = h
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        if arch != "llama" {
            return Err(Error::key(
                file,
                "general.architecture",
                format!("unsupported architecture `{arch}` (llama is read)"),
            ));
        }
        let uint = |key: &str| -> Result<usize> {
            let v = h.get(key).ok_or_else(|| Error::key(file, key, "missing"))?;
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    Error::key(
                        file,
                        key,
                        format!("expected an unsigned integer, found {v:?}"),
                    )
                })
        };
        let opt_uint = |key: &str| -> Result<Option<usize>> {
            match h.get(key) {
                None => Ok(None),
                Some(_) => uint(key).map(Some),
            }
        };
        let float = |key: &str, default: f64| -> Result<f64> {
            match h.get(key) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    Error::key(file, key, format!("expected a number, found {v:?}"))
                }),
            }
        };
        let tokens = "tokenizer.ggml.tokens";
        let vocab_size = match h.get(tokens).and_then(Value::as_array) {
            Some(a) => a.len(),
            None => uint("llama.vocab_size")?,
        };
        let hidden_size = uint("llama.embedding_length")?;
        let heads = uint("llama.attention.head_count")?;
        let head_dim = match opt_uint("llama.attention.key_length")? {
            Some(d) => d,
            None => hidden_size / heads.max(1),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            opt_uint(key)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| Error::key(file, key, "id does not fit in u32"))
                })
                .transpose()
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: uint("llama.feed_forward_length")?,
            num_hidden_layers: uint("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: opt_uint("llama.attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: float("llama.rope.freq_base", 10_000.0)?,
            // llama.cpp stores Llama 3 scaling as a `rope_freqs.weight` tensor, not as metadata:
            // the weights loader reads it (`with_gguf_freq_factors`).
            rope_scaling: None,
            max_position_embeddings: opt_uint("llama.context_length")?.unwrap_or(2048),
            tie_word_embeddings: h.tensor("output.weight").is_none(),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Sizes that the model code divides by or indexes with.
    /// Takes a GGUF file's `rope_freqs.weight` as the RoPE scaling: `head_dim / 2` finite,
    /// positive factors, or an error naming the file and the tensor.
    pub fn with_gguf_freq_factors(mut self, file: &str, factors: &[f32]) -> Result<Self> {
        const TENSOR: &str = "rope_freqs.weight";
        if factors.len() != self.head_dim / 2 {
            return Err(Error::tensor(
                file,
                TENSOR,
                format!(
                    "{} factors for head_dim {} (expected {})",
                    factors.len(),
                    self.head_dim,
                    self.head_dim / 2
                ),
            ));
        }
        if let Some((i, f)) = factors
            .iter()
            .enumerate()
            .find(|(_, f)| !(f.is_finite() && **f > 0.0))
        {
            return Err(Error::tensor(
                file,
                TENSOR,
                format!("factor {i} is {f} (must be finite and positive)"),
            ));
        }
        if let Some(RopeScaling::Llama3(_)) = self.rope_scaling {
            return Err(Error::tensor(
                file,
                TENSOR,
                "given together with llama3 rope_scaling metadata",
            ));
        }
        self.rope_scaling = Some(RopeScaling::FreqFactors(
            factors.iter().map(|&f| f64::from(f)).collect(),
        ));
        Ok(self)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::key(file, key, msg));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(k, "must be positive".into());
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if self.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!("{} is odd (RoPE needs pairs)", self.head_dim),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not positive", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", format!("{} is not positive", self.rope_theta));
        }
        Ok(())
    }

    /// The shape every LLaMA weight must have, by Hugging Face name; None for other names.
    pub fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match name {
            "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![v, h]),
            "model.norm.weight" => return Some(vec![h]),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, part) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= self.num_hidden_layers {
            return None;
        }
        Some(match part {
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
            "mlp.down_proj.weight" => vec![h, i],
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            _ => return None,
        })
    }
}

/// `rope_scaling` (or transformers 5's `rope_parameters`): null, `default`, or `llama3`.
fn parse_rope_scaling(file: &str, v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok(None),
        "llama3" => serde_json::from_value(v.clone())
            .map(|s| Some(RopeScaling::Llama3(s)))
            .map_err(|e| Error::key(file, "rope_scaling", format!("invalid llama3 scaling: {e}"))),
        other => Err(Error::key(
            file,
            "rope_scaling",
            format!("unsupported rope type `{other}` (llama3 is read)"),
        )),
    }
}

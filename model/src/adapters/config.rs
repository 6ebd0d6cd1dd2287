//! `adapter_config.json`: the settings of a LoRA or MixLoRA adapter, with the keys of docs/DESIGN.md
//! (those of the `mixlora` / MoE-PEFT packages; plain LoRA files are PEFT's).
//!
//! Written so that MoE-PEFT and the `mixlora` package load it unchanged: `r` and an integral
//! `lora_alpha` as JSON integers (they assert `int`), the rates and coefficients as JSON floats
//! even when integral (`0.0`: they assert `float`). Read tolerantly (`lora_alpha` int or float),
//! but a key that would change results and is not implemented is refused, never ignored
//! ([`super::config_keys`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{file_name, Error, Result};

/// The seven projections of a LLaMA layer, in file order.
pub const ATTN_MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
pub const MLP_MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The kind of adapter. In `adapter_config.json` `MIXLORA` and `LORA`; on the command line and
/// in the trainer's TOML ([`FromStr`](std::str::FromStr) and [`Display`](std::fmt::Display))
/// `mixlora` and `lora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// A sparse mixture of LoRA experts in every FFN plus plain LoRA on the attention projections.
    #[serde(rename = "MIXLORA")]
    MixLora,
    /// Plain LoRA on the target projections.
    #[serde(rename = "LORA")]
    Lora,
}

impl PeftType {
    /// The command-line name: `mixlora` or `lora`.
    pub fn name(self) -> &'static str {
        match self {
            PeftType::MixLora => "mixlora",
            PeftType::Lora => "lora",
        }
    }
}

impl std::fmt::Display for PeftType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PeftType {
    type Err = String;
    /// Parses `mixlora` or `lora`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [PeftType::MixLora, PeftType::Lora]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown adapter `{s}` (expected lora or mixlora)"))
    }
}

/// How the router picks experts. In `adapter_config.json` (MoE-PEFT's names) `mixlora` and
/// `mixlora-dynamic`; on the command line and in the trainer's TOML
/// ([`FromStr`](std::str::FromStr) and [`Display`](std::fmt::Display)) `topk` and `topp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutingStrategy {
    /// Top-k of `softmax(x W_rᵀ)`, weights renormalised over the k picks.
    #[serde(rename = "mixlora")]
    TopK,
    /// Top-p ("dynamic"): experts by decreasing probability until the cumulative sum passes
    /// `top_p` (the crossing one included); the weights are the raw probabilities.
    #[serde(rename = "mixlora-dynamic")]
    TopP,
}

impl RoutingStrategy {
    /// The command-line name: `topk` or `topp`.
    pub fn name(self) -> &'static str {
        match self {
            RoutingStrategy::TopK => "topk",
            RoutingStrategy::TopP => "topp",
        }
    }
}

impl std::fmt::Display for RoutingStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RoutingStrategy {
    type Err = String;
    /// Parses `topk` or `topp`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [RoutingStrategy::TopK, RoutingStrategy::TopP]
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown routing `{s}` (expected topk or topp)"))
    }
}

/// The contents of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: PeftType,
    /// LoRA rank.
    pub r: usize,
    /// LoRA scale numerator: `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout probability on the input of every LoRA `A` while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which of `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj` get LoRA. For MixLoRA,
    /// the attention ones get a plain LoRA and the FFN ones a LoRA per expert.
    pub target_modules: Vec<String>,
    #[serde(default = "default_routing")]
    pub routing_strategy: RoutingStrategy,
    #[serde(default = "default_experts")]
    pub num_experts: usize,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// The FFN activation; only `silu` (LLaMA's) is supported.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// `coef` of the load-balance loss.
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,
    /// Standard deviation of the router's normal init.
    #[serde(default = "default_init_range")]
    pub router_init_range: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// The base model as a Hugging Face user names it (a hub id or a folder), for
    /// `from_pretrained`; see [`super::base_model_name`].
    #[serde(default)]
    pub base_model_name_or_path: String,
    /// The exact base model the adapter was trained on (a GGUF file, a folder, or the built-in
    /// tiny base); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mixlora_base_model_path: String,
    #[serde(default = "default_task")]
    pub task_type: String,
}

fn default_routing() -> RoutingStrategy {
    RoutingStrategy::TopK
}
fn default_experts() -> usize {
    8
}
fn default_top_k() -> usize {
    2
}
fn default_top_p() -> f64 {
    0.8
}
fn default_act() -> String {
    "silu".into()
}
fn default_aux_coef() -> f64 {
    0.001
}
fn default_init_range() -> f64 {
    0.02
}
fn default_task() -> String {
    "CAUSAL_LM".into()
}

/// The keys that only a MixLoRA file carries.
const MOE_KEYS: [&str; 7] = [
    "routing_strategy",
    "num_experts",
    "top_k",
    "top_p",
    "act_fn",
    "router_aux_loss_coef",
    "router_init_range",
];

impl AdapterConfig {
    /// The method's defaults (docs/DESIGN.md): E = 8, top-2, r = 16, alpha = 32, dropout 0.05, aux coef 0.001,
    /// router init N(0, 0.02); plain LoRA on q, k, v, o and per-expert LoRA on gate, up, down.
    pub fn mixlora_default() -> Self {
        AdapterConfig {
            peft_type: PeftType::MixLora,
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: ATTN_MODULES
                .iter()
                .chain(&MLP_MODULES)
                .map(|s| s.to_string())
                .collect(),
            routing_strategy: default_routing(),
            num_experts: default_experts(),
            top_k: default_top_k(),
            top_p: default_top_p(),
            act_fn: default_act(),
            router_aux_loss_coef: default_aux_coef(),
            router_init_range: default_init_range(),
            use_rslora: false,
            base_model_name_or_path: String::new(),
            mixlora_base_model_path: String::new(),
            task_type: default_task(),
        }
    }

    /// Plain LoRA with the same rank, alpha and dropout on all seven projections.
    pub fn lora_default() -> Self {
        AdapterConfig {
            peft_type: PeftType::Lora,
            ..Self::mixlora_default()
        }
    }

    /// [`Self::mixlora_default`] or [`Self::lora_default`].
    pub fn default_for(peft_type: PeftType) -> Self {
        AdapterConfig {
            peft_type,
            ..Self::mixlora_default()
        }
    }

    /// The routing of the MixLoRA routers: the strategy with its parameter (`top_k` or `top_p`).
    pub fn routing(&self) -> super::Routing {
        match self.routing_strategy {
            RoutingStrategy::TopK => super::Routing::TopK(self.top_k),
            RoutingStrategy::TopP => super::Routing::TopP(self.top_p),
        }
    }

    /// `s = alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn is_mixlora(&self) -> bool {
        self.peft_type == PeftType::MixLora
    }

    /// Whether projection `module` (`q_proj`, ...) is a target.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }

    /// Checks the values; `file` names the source in the one-line error.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::key(file, key, msg));
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", format!("{} is not finite", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            );
        }
        for m in &self.target_modules {
            if !ATTN_MODULES.contains(&m.as_str()) && !MLP_MODULES.contains(&m.as_str()) {
                return bad(
                    "target_modules",
                    format!("unknown module `{m}` (expected q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"),
                );
            }
        }
        if !self.is_mixlora() {
            return Ok(());
        }
        if self.num_experts == 0 {
            return bad("num_experts", "must be at least 1".into());
        }
        if self.routing_strategy == RoutingStrategy::TopK
            && !(1..=self.num_experts).contains(&self.top_k)
        {
            return bad(
                "top_k",
                format!(
                    "{} is not in 1..={} (num_experts)",
                    self.top_k, self.num_experts
                ),
            );
        }
        if self.routing_strategy == RoutingStrategy::TopP
            && !(self.top_p > 0.0 && self.top_p <= 1.0)
        {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if self.act_fn != "silu" {
            return bad(
                "act_fn",
                format!("`{}` is not supported (only silu)", self.act_fn),
            );
        }
        if !(self.router_aux_loss_coef.is_finite() && self.router_aux_loss_coef >= 0.0) {
            return bad(
                "router_aux_loss_coef",
                format!(
                    "{} is not a finite non-negative number",
                    self.router_aux_loss_coef
                ),
            );
        }
        Ok(())
    }

    /// Parses the text of an `adapter_config.json` and validates it; `file` names it in errors.
    /// Keys of MoE-PEFT and PEFT that this crate does not hold are dropped when harmless and
    /// refused when they would change results ([`super::config_keys::normalize`]).
    pub fn from_json_str(file: &str, text: &str) -> Result<Self> {
        let invalid =
            |e: serde_json::Error| Error::format(file, format!("invalid adapter config: {e}"));
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(invalid)?;
        let obj = value
            .as_object_mut()
            .ok_or_else(|| Error::format(file, "invalid adapter config: not a JSON object"))?;
        super::config_keys::normalize(file, obj)?;
        let cfg: AdapterConfig = serde_json::from_value(value).map_err(invalid)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&file_name(path), &text)
    }

    /// Pretty JSON with the file's keys (docs/DESIGN.md); a plain LoRA file leaves out the router
    /// keys. An integral `lora_alpha` is written as a JSON integer (`32`, as MoE-PEFT requires),
    /// the float keys always with a decimal point (`0.0`).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_json_value()).unwrap_or_default() + "\n"
    }

    /// The JSON object [`Self::to_json_string`] prints.
    pub fn to_json_value(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            if let Some(alpha) = self.integral_alpha() {
                obj.insert("lora_alpha".into(), alpha.into());
            }
            if !self.is_mixlora() {
                for k in MOE_KEYS {
                    obj.remove(k);
                }
            }
        }
        v
    }

    /// `lora_alpha` as an integer, when it is one (and exactly representable).
    pub fn integral_alpha(&self) -> Option<i64> {
        let a = self.lora_alpha;
        (a.fract() == 0.0 && a.abs() < 9.0e15).then_some(a as i64)
    }
}

//! Every training setting, in one `TrainConfig`: defaults (MIXLORA.md), then a TOML file
//! (`--config`), then command-line flags, each overriding the one before. Unknown TOML keys are an
//! error naming the key, the file and the line; validation errors are one line.
//!
//! Relative paths in a TOML file are taken relative to the file's folder; on the command line,
//! relative to the current folder.

use std::path::{Path, PathBuf};

use clap::Args;
use engine::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::AdamWConfig;
use crate::schedule::{ScheduleKind, Warmup};

/// Which adapter to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Plain LoRA on q, k, v, o, gate, up, down.
    Lora,
    /// LoRA on attention, a sparse mixture of LoRA experts on the FFN.
    #[default]
    Mixlora,
}

/// How the MixLoRA router picks experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The `top_k` most probable experts, weights renormalised.
    #[default]
    Topk,
    /// Experts in order of probability until their sum passes `top_p` (no renormalisation).
    Topp,
}

/// How MixLoRA FFNs are computed (the same values and gradients up to rounding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MoeImplName {
    /// `fused` on a GPU, `naive` on the CPU (where the fused op's reference kernels are slower
    /// than the loop).
    #[default]
    Auto,
    /// A per-expert loop that reads each layer's routing mask to the host.
    Naive,
    /// The paper's † version: shared gate/up projections, per-expert down projections.
    Paper,
    /// Device-side grouping by expert and grouped LoRA matmuls, no host read (top-k routing).
    Grouped,
    /// The fused path: every base GEMM once per token, the experts' rank-r products as GEMMs over
    /// all experts at once (top-k routing; top-p runs naive). Its LoRA dropout masks differ from
    /// the naive path's.
    Fused,
}

impl MoeImplName {
    /// The implementation on `device`.
    pub fn imp(self, device: engine::Device) -> model::MoeImpl {
        match self {
            MoeImplName::Auto if device == engine::Device::Cpu => model::MoeImpl::Naive,
            MoeImplName::Auto => model::MoeImpl::Fused(Default::default()),
            MoeImplName::Naive => model::MoeImpl::Naive,
            MoeImplName::Paper => model::MoeImpl::Paper,
            MoeImplName::Grouped => model::MoeImpl::Grouped,
            MoeImplName::Fused => model::MoeImpl::Fused(Default::default()),
        }
    }
}

/// The dtype of the frozen base weights (adapters are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    #[default]
    F32,
    Bf16,
}

impl DTypeName {
    pub fn dtype(self) -> DType {
        match self {
            DTypeName::F32 => DType::F32,
            DTypeName::Bf16 => DType::BF16,
        }
    }
}

/// The learning rate of the embedded default job (built-in tiny random model, no config file).
pub const BUILTIN_MODEL_LR: f64 = 2e-3;

/// All settings of `mixlora train`. The TOML keys are the field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base model: a GGUF file or a Hugging Face folder; none means the built-in tiny random
    /// LLaMA with the byte-level tokenizer of `synthetic`.
    pub model: Option<PathBuf>,
    pub adapter: AdapterKind,
    /// Training files in the LLM-Adapters format, one task each; none means the synthetic tasks.
    pub data: Vec<PathBuf>,
    /// Evaluation files (one task each); none means the `val_set_size` split, if any.
    pub eval_data: Vec<PathBuf>,
    /// Examples held out of the training files for evaluation (0: none).
    pub val_set_size: usize,
    /// At most this many questions per task in evaluation (none: all).
    pub eval_limit: Option<usize>,
    pub out_dir: PathBuf,
    pub epochs: usize,
    /// Stop after this many optimizer steps, even within an epoch.
    pub max_steps: Option<usize>,
    /// Effective batch size: examples per optimizer step.
    pub batch_size: usize,
    /// Examples per forward pass; `batch_size / micro_batch_size` passes are accumulated.
    pub micro_batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clipping threshold (0: no clipping).
    pub max_grad_norm: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    /// Longest tokenised example (prompt + answer + EOS); longer ones are truncated.
    pub cutoff_len: usize,
    pub seed: u64,
    pub num_experts: usize,
    pub top_k: usize,
    pub rank: usize,
    pub alpha: f64,
    /// Scale LoRA by `alpha/√r` (rsLoRA) instead of `alpha/r`.
    pub rslora: bool,
    pub dropout: f64,
    pub routing: Routing,
    pub top_p: f64,
    pub aux_loss_coef: f64,
    /// Standard deviation of the router's normal initialisation.
    pub router_init_range: f64,
    /// Evaluate every this many optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    pub save_every: usize,
    /// Keep at most this many checkpoints (the newest).
    pub save_total_limit: usize,
    /// Log a metrics line every this many optimizer steps.
    pub log_every: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub dtype: DTypeName,
    /// Continue from the newest complete checkpoint in `out_dir`.
    pub resume: bool,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// How MixLoRA FFNs are computed: `auto` (fused on a GPU, naive on the CPU), `naive`,
    /// `paper`, `grouped` or `fused`.
    pub moe_impl: MoeImplName,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            adapter: AdapterKind::Mixlora,
            data: Vec::new(),
            eval_data: Vec::new(),
            val_set_size: 0,
            eval_limit: None,
            out_dir: PathBuf::from("out"),
            epochs: 2,
            max_steps: None,
            batch_size: 16,
            micro_batch_size: 8,
            lr: 2e-4,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::Linear,
            warmup_steps: None,
            warmup_ratio: None,
            cutoff_len: 512,
            seed: 42,
            num_experts: 8,
            top_k: 2,
            rank: 16,
            alpha: 32.0,
            rslora: false,
            dropout: 0.05,
            routing: Routing::Topk,
            top_p: 0.8,
            aux_loss_coef: 0.001,
            router_init_range: 0.02,
            eval_every: 0,
            save_every: 0,
            save_total_limit: 3,
            log_every: 1,
            device: "cpu".into(),
            dtype: DTypeName::F32,
            resume: false,
            gradient_checkpointing: false,
            moe_impl: MoeImplName::Auto,
        }
    }
}

/// The line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).unwrap_or(text).matches('\n').count() + 1
}

impl TrainConfig {
    /// Parses TOML text; `file` names it in errors. Relative paths stay as written.
    pub fn from_toml_str(file: &str, text: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.message().trim().to_string();
            // "unknown field `x`, expected one of `a`, `b`, ..." -> "unknown key `x`"
            if let Some(rest) = msg.strip_prefix("unknown field ") {
                msg = format!("unknown key {}", rest.split(',').next().unwrap_or(rest));
            }
            let msg = match e.span() {
                Some(s) => format!("line {}: {msg}", line_of(text, s.start)),
                None => msg,
            };
            Error::ConfigFile {
                file: file.to_string(),
                msg: msg.replace('\n', " "),
            }
        })
    }

    /// Reads a TOML file; its relative paths are resolved against the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut c = Self::from_toml_str(&path.display().to_string(), &text)?;
        let base = path.parent().unwrap_or(Path::new(""));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        c.model.as_mut().map(fix);
        c.data.iter_mut().for_each(fix);
        c.eval_data.iter_mut().for_each(fix);
        let table: toml::Table = toml::from_str(&text).unwrap_or_default();
        if table.contains_key("out_dir") {
            fix(&mut c.out_dir);
        }
        Ok(c)
    }

    /// The configuration as TOML (written beside the checkpoints).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("cannot serialise: {e}")))
    }

    /// Checks every setting and their combinations; the first problem is a one-line error.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.batch_size == 0 || self.micro_batch_size == 0 {
            return bad("batch_size and micro_batch_size must be at least 1".into());
        }
        if self.batch_size % self.micro_batch_size != 0 {
            return bad(format!(
                "micro_batch_size {} does not divide batch_size {}",
                self.micro_batch_size, self.batch_size
            ));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs is 0 and max_steps is not set: nothing to train".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be a positive number", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} must be >= 0", self.weight_decay));
        }
        for (k, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{k} {b} is not in [0, 1)"));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return bad(format!("adam_eps {} must be > 0", self.adam_eps));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "max_grad_norm {} must be >= 0 (0: no clipping)",
                self.max_grad_norm
            ));
        }
        if self.warmup_steps.is_some() && self.warmup_ratio.is_some() {
            return bad("set warmup_steps or warmup_ratio, not both".into());
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("warmup_ratio {r} is not in [0, 1]"));
            }
        }
        if self.cutoff_len < 2 {
            return bad(format!("cutoff_len {} must be at least 2", self.cutoff_len));
        }
        if self.rank == 0 {
            return bad("rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha {} must be > 0", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        if self.adapter == AdapterKind::Mixlora {
            if self.num_experts == 0 {
                return bad("num_experts must be at least 1".into());
            }
            if self.routing == Routing::Topk && !(1..=self.num_experts).contains(&self.top_k) {
                return bad(format!(
                    "top_k {} is not in 1..={} (num_experts)",
                    self.top_k, self.num_experts
                ));
            }
            if self.routing == Routing::Topp && !(self.top_p > 0.0 && self.top_p <= 1.0) {
                return bad(format!("top_p {} is not in (0, 1]", self.top_p));
            }
            if !(self.aux_loss_coef.is_finite() && self.aux_loss_coef >= 0.0) {
                return bad(format!("aux_loss_coef {} must be >= 0", self.aux_loss_coef));
            }
            if !(self.router_init_range.is_finite() && self.router_init_range >= 0.0) {
                return bad(format!(
                    "router_init_range {} must be >= 0",
                    self.router_init_range
                ));
            }
        }
        if self.log_every == 0 {
            return bad("log_every must be at least 1".into());
        }
        if self.save_total_limit == 0 {
            return bad("save_total_limit must be at least 1".into());
        }
        self.device()?;
        Ok(())
    }

    /// Micro-batches per optimizer step.
    pub fn grad_accum(&self) -> usize {
        self.batch_size / self.micro_batch_size.max(1)
    }

    /// Optimizer steps of the run: `epochs` epochs of `steps_per_epoch`, capped by `max_steps`
    /// (which alone decides when `epochs` is 0).
    pub fn total_steps(&self, steps_per_epoch: usize) -> usize {
        let by_epochs = self.epochs * steps_per_epoch;
        match self.max_steps {
            Some(m) if self.epochs == 0 => m,
            Some(m) => m.min(by_epochs),
            None => by_epochs,
        }
    }

    pub fn warmup(&self) -> Warmup {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(n), _) => Warmup::Steps(n),
            (None, Some(r)) => Warmup::Ratio(r),
            (None, None) => Warmup::Steps(0),
        }
    }

    pub fn device(&self) -> Result<Device> {
        self.device
            .parse()
            .map_err(|e: engine::ParseDeviceError| Error::Config(e.to_string()))
    }

    /// The LoRA scale `alpha/r`, or `alpha/√r` with rsLoRA.
    pub fn lora_scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// Flags of `mixlora train`: each one given overrides the TOML file and the defaults.
#[derive(Args, Debug, Default, Clone)]
pub struct TrainArgs {
    /// A TOML file with any of the settings below (keys: the flag names with `_`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model: GGUF file or Hugging Face folder [default: built-in tiny random LLaMA].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub adapter: Option<AdapterKind>,
    /// Training file (LLM-Adapters JSON); repeat for several tasks [default: synthetic tasks].
    #[arg(long = "data")]
    pub data: Vec<PathBuf>,
    /// Evaluation file; repeat for several tasks.
    #[arg(long = "eval-data")]
    pub eval_data: Vec<PathBuf>,
    #[arg(long)]
    pub val_set_size: Option<usize>,
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, visible_alias = "out")]
    pub out_dir: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, visible_alias = "batch")]
    pub batch_size: Option<usize>,
    #[arg(long, visible_alias = "micro-batch")]
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate [default: 2e-4; 2e-3 for the built-in model without --config].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub cutoff_len: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub num_experts: Option<usize>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub rslora: Option<bool>,
    #[arg(long)]
    pub dropout: Option<f64>,
    #[arg(long, value_enum)]
    pub routing: Option<Routing>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub aux_loss_coef: Option<f64>,
    /// Standard deviation of the router's normal initialisation [default: 0.02].
    #[arg(long)]
    pub router_init_range: Option<f64>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long)]
    pub log_every: Option<usize>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeName>,
    /// Continue from the newest complete checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Recompute each decoder layer in the backward pass (less memory, one more forward).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// How MixLoRA FFNs are computed [default: auto: fused on a GPU, naive on the CPU].
    #[arg(long, value_enum)]
    pub moe_impl: Option<MoeImplName>,
}

impl TrainArgs {
    /// Defaults, then the `--config` file, then the flags; validated.
    pub fn resolve(self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            adapter,
            val_set_size,
            out_dir,
            epochs,
            batch_size,
            micro_batch_size,
            lr,
            weight_decay,
            adam_beta1,
            adam_beta2,
            adam_eps,
            max_grad_norm,
            schedule,
            cutoff_len,
            seed,
            num_experts,
            top_k,
            rank,
            alpha,
            rslora,
            dropout,
            routing,
            top_p,
            aux_loss_coef,
            router_init_range,
            eval_every,
            save_every,
            save_total_limit,
            log_every,
            device,
            dtype,
            moe_impl
        );
        // The embedded default (no file, no model): a frozen random tiny model learns only through
        // its adapters and needs a larger step than the real-model default.
        if self.config.is_none() && self.model.is_none() && self.lr.is_none() {
            c.lr = BUILTIN_MODEL_LR;
        }
        if self.model.is_some() {
            c.model = self.model;
        }
        if !self.data.is_empty() {
            c.data = self.data;
        }
        if !self.eval_data.is_empty() {
            c.eval_data = self.eval_data;
        }
        if self.eval_limit.is_some() {
            c.eval_limit = self.eval_limit;
        }
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        // A warmup flag replaces the file's warmup of either kind.
        if self.warmup_steps.is_some() {
            c.warmup_steps = self.warmup_steps;
            c.warmup_ratio = None;
        }
        if self.warmup_ratio.is_some() {
            c.warmup_ratio = self.warmup_ratio;
            c.warmup_steps = None;
        }
        c.resume |= self.resume;
        c.gradient_checkpointing |= self.gradient_checkpointing;
        c.validate()?;
        Ok(c)
    }
}

/// Flags of `mixlora eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Base model: GGUF file or Hugging Face folder [default: built-in tiny random LLaMA].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An adapter folder (adapter_config.json + adapter_model.safetensors) or a checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Evaluation file (LLM-Adapters JSON); repeat for several tasks [default: synthetic tasks].
    #[arg(long = "data")]
    pub data: Vec<PathBuf>,
    /// At most this many questions per task.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub cutoff_len: usize,
    /// `cpu`, `cuda` (the first GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, value_enum, default_value_t = DTypeName::F32)]
    pub dtype: DTypeName,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also write, per task and per MoE layer, the share of (token, slot) pairs each expert
    /// received over the real tokens of the evaluated candidates (JSON).
    #[arg(long)]
    pub routing: Option<PathBuf>,
    /// How MixLoRA FFNs are computed (`auto`: fused on a GPU, naive on the CPU).
    #[arg(long, value_enum, default_value_t = MoeImplName::Auto)]
    pub moe_impl: MoeImplName,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn args(flags: &[&str]) -> TrainArgs {
        let mut v = vec!["mixlora"];
        v.extend_from_slice(flags);
        Cli::try_parse_from(v).unwrap().args
    }

    fn tmp_file(name: &str, text: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mixlora-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_match_the_design() {
        // The embedded default differs from the design defaults only by its learning rate.
        let builtin = args(&[]).resolve().unwrap();
        assert_eq!(builtin.lr, BUILTIN_MODEL_LR);
        assert_eq!(
            TrainConfig {
                lr: 2e-4,
                ..builtin
            },
            TrainConfig::default()
        );
        let c = args(&["--model", "base.gguf"]).resolve().unwrap();
        assert_eq!(
            c,
            TrainConfig {
                model: Some("base.gguf".into()),
                ..TrainConfig::default()
            }
        );
        assert_eq!(
            (c.batch_size, c.micro_batch_size, c.grad_accum()),
            (16, 8, 2)
        );
        assert_eq!((c.lr, c.weight_decay, c.max_grad_norm), (2e-4, 0.01, 1.0));
        assert_eq!((c.num_experts, c.top_k, c.rank, c.alpha), (8, 2, 16, 32.0));
        assert_eq!(
            (c.dropout, c.aux_loss_coef, c.cutoff_len, c.seed),
            (0.05, 0.001, 512, 42)
        );
        assert_eq!(c.lora_scale(), 2.0);
        assert_eq!(c.router_init_range, 0.02);
        assert_eq!(c.device().unwrap(), Device::Cpu);
        let c = args(&["--router-init-range", "0.5"]).resolve().unwrap();
        assert_eq!(c.router_init_range, 0.5);
        let e = args(&["--router-init-range=-1"]).resolve().unwrap_err();
        assert!(e.to_string().contains("router_init_range"), "{e}");
    }

    #[test]
    fn flags_override_toml_which_overrides_defaults() {
        let p = tmp_file(
            "prec.toml",
            "lr = 1e-3\nbatch_size = 32\nmicro_batch_size = 4\nwarmup_steps = 10\n\
             data = [\"d/train.json\"]\nschedule = \"cosine\"\n",
        );
        let ps = p.display().to_string();
        let c = args(&["--config", &ps]).resolve().unwrap();
        assert_eq!((c.lr, c.batch_size, c.micro_batch_size), (1e-3, 32, 4));
        assert_eq!(c.schedule, ScheduleKind::Cosine);
        assert_eq!(c.data, vec![p.parent().unwrap().join("d/train.json")]);
        assert_eq!(c.epochs, 2, "untouched keys keep the default");
        let c = args(&[
            "--config",
            &ps,
            "--lr",
            "5e-4",
            "--micro-batch-size",
            "8",
            "--warmup-ratio",
            "0.1",
            "--data",
            "x.json",
            "--resume",
        ])
        .resolve()
        .unwrap();
        assert_eq!((c.lr, c.batch_size, c.micro_batch_size), (5e-4, 32, 8));
        assert_eq!((c.warmup_steps, c.warmup_ratio), (None, Some(0.1)));
        assert_eq!(c.data, vec![PathBuf::from("x.json")]);
        assert!(c.resume);
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let p = tmp_file("unknown.toml", "lr = 1e-3\n\nlearning_rat = 2\n");
        let e = args(&["--config", &p.display().to_string()])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown.toml"), "{e}");
        assert!(e.contains("unknown key `learning_rat`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn wrong_type_is_one_line() {
        let e = TrainConfig::from_toml_str("c.toml", "epochs = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: line 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn validation_errors_are_one_line() {
        for (flags, needle) in [
            (
                &["--batch-size", "16", "--micro-batch-size", "3"][..],
                "does not divide",
            ),
            (&["--top-k", "9"][..], "top_k 9"),
            (&["--warmup-ratio", "1.5"][..], "warmup_ratio"),
            (&["--device", "tpu"][..], "unknown device"),
            (&["--epochs", "0"][..], "nothing to train"),
            (&["--dropout", "1"][..], "dropout"),
            (&["--adam-beta2", "1.0"][..], "adam_beta2"),
        ] {
            let e = args(flags).resolve().unwrap_err().to_string();
            assert!(
                e.starts_with("config: ") && e.contains(needle),
                "{flags:?}: {e}"
            );
            assert!(!e.contains('\n'));
        }
        let c = TrainConfig {
            warmup_steps: Some(1),
            warmup_ratio: Some(0.1),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn total_steps_from_epochs_and_max_steps() {
        let mut c = TrainConfig::default();
        assert_eq!(c.total_steps(30), 60);
        c.max_steps = Some(45);
        assert_eq!(c.total_steps(30), 45);
        c.max_steps = Some(500);
        assert_eq!(c.total_steps(30), 60);
        c.epochs = 0;
        assert_eq!(c.total_steps(30), 500);
    }

    #[test]
    fn toml_round_trip() {
        let c = TrainConfig {
            model: Some("m.gguf".into()),
            max_steps: Some(7),
            routing: Routing::Topp,
            ..Default::default()
        };
        let text = c.to_toml_string().unwrap();
        assert_eq!(TrainConfig::from_toml_str("x", &text).unwrap(), c);
    }

    #[test]
    fn moe_impl_defaults_to_fused_on_a_gpu_and_naive_on_the_cpu() {
        let c = TrainConfig::default();
        assert_eq!(c.moe_impl, MoeImplName::Auto);
        assert_eq!(c.moe_impl.imp(Device::Cpu), model::MoeImpl::Naive);
        assert_eq!(
            c.moe_impl.imp(Device::Cuda(0)),
            model::MoeImpl::Fused(Default::default())
        );
        for (name, imp) in [
            ("naive", model::MoeImpl::Naive),
            ("paper", model::MoeImpl::Paper),
            ("grouped", model::MoeImpl::Grouped),
            ("fused", model::MoeImpl::Fused(Default::default())),
        ] {
            let c =
                TrainConfig::from_toml_str("t.toml", &format!("moe_impl = \"{name}\"")).unwrap();
            assert_eq!(c.moe_impl.imp(Device::Cpu), imp);
            assert_eq!(c.moe_impl.imp(Device::Cuda(0)), imp);
        }
    }
}

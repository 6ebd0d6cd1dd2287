//! Every training setting, in one `TrainConfig`: defaults, then a TOML file (`--config`), then
//! command-line flags, each overriding the one before. Unknown TOML keys are an error naming the
//! key, the file and the line; validation errors are one line.
//!
//! Relative paths in a TOML file are taken relative to the file's folder; on the command line,
//! relative to the current folder.
//!
//! Each setting is declared twice, under one name that is also its TOML key: in [`TrainConfig`]
//! with its type and default, and in [`TrainArgs`] with its flag and help. A TOML file and the
//! flags both fill a `TrainArgs`; the settings each one gives are laid over each other and over
//! the defaults by name (through serde), so no third list of the fields exists. Settings spelled
//! as words (device, adapter, routing, MoE implementation and kernels) have one parser each,
//! shared by clap and serde ([`words`]).

mod args;
mod plan;
#[cfg(test)]
mod plan_tests;
mod tables;
#[cfg(test)]
mod tests;
pub mod words;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use engine::{DType, Device, MoeFfnOptions, MoeKernels};
use model::{AttentionImpl, MoeImpl, PeftType, RoutingStrategy};
use serde::{Deserialize, Serialize};

pub use args::{EvalArgs, FusedMoeArgs, MoeArgs, ProfileArgs, TrainArgs};
pub use plan::{PlannedAdapter, RunPlan, SharedSettings, SHARED_KEYS};
pub use words::{GroupModeChoice, MoeImplChoice};

use crate::error::{Error, Result};
use crate::optim::AdamWConfig;
use crate::schedule::{ScheduleKind, Warmup};

/// The dtype of the frozen base weights (adapters are always f32): the base dtypes the trainer
/// supports, a choice among the engine's [`DType`]s.
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

/// How the frozen projection weights (q, k, v, o, gate, up, down of every layer) are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BaseDTypeName {
    /// In the base dtype (`dtype`).
    #[default]
    Same,
    /// In FP8 (e4m3, one f32 scale per output channel), their products through FP8 GEMMs in the
    /// base dtype: half of bf16's memory for those weights. The embeddings, norms and LM head
    /// stay in the base dtype.
    Fp8,
}

impl BaseDTypeName {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseDTypeName::Same => "same",
            BaseDTypeName::Fp8 => "fp8",
        }
    }

    /// Stores `model`'s projections as this says (nothing for `Same`); logs what FP8 saved.
    pub fn apply(self, model: &mut model::Llama, log: &mut impl FnMut(&str)) -> Result<()> {
        if self == BaseDTypeName::Fp8 && !model.base_is_fp8() {
            let (before, after) = model.quantize_base_fp8()?;
            let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
            log(&format!(
                "base projections in FP8: {:.1} MiB -> {:.1} MiB",
                mib(before),
                mib(after)
            ));
        }
        Ok(())
    }
}

/// Whether a run records its training micro-steps as CUDA graphs (`crate::run::fixed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CudaGraphs {
    /// `On` where graphs can run (a GPU of a CUDA build, one process, the adapters' micro-batches
    /// each on its own), else `Off` ([`CudaGraphs::resolve`]).
    Auto,
    /// Each micro-batch at its own length, launched kernel by kernel.
    #[default]
    Off,
    /// Fixed-shape micro-steps (padded to length buckets, dropout keyed on the device), launched
    /// kernel by kernel: on any device, the reference `On` equals bit for bit.
    Eager,
    /// Fixed-shape micro-steps recorded once per shape and replayed (CUDA).
    On,
}

impl CudaGraphs {
    /// What a run does: `Auto` becomes `On` in one process (`!multi_process`) on a CUDA device
    /// of a build with the CUDA backend, unless several adapters run their micro-batches as one
    /// batch through the base (`batched`: `--group-mode shared`), else `Off`; any other setting
    /// is kept as given (and refused where it cannot run).
    pub fn resolve(self, device: engine::Device, batched: bool, multi_process: bool) -> CudaGraphs {
        match self {
            CudaGraphs::Auto => {
                let gpu = matches!(device, engine::Device::Cuda(_)) && cfg!(feature = "cuda");
                if gpu && !batched && !multi_process {
                    CudaGraphs::On
                } else {
                    CudaGraphs::Off
                }
            }
            other => other,
        }
    }
}

/// The seven projections of a LLaMA layer, in file order: the targets a run's adapters take
/// unless `target_modules` says otherwise.
pub const ALL_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The learning rate of the embedded default job (built-in tiny random model, no config file).
pub const BUILTIN_MODEL_LR: f64 = 2e-3;

/// The MoE implementation a run uses on `device`: `choice` (`None`: `auto`, which the device
/// decides), the fused path with the options `fused`.
pub fn moe_impl(choice: MoeImplChoice, fused: MoeFfnOptions, device: Device) -> MoeImpl {
    choice
        .unwrap_or_else(|| MoeImpl::for_device(device))
        .with_fused_options(fused)
}

/// The MoE implementation inference (`mixlora generate`, `mixlora eval`) uses on `device`:
/// `choice`, or for `auto` [`MoeImpl::for_inference`] (fused on every device).
pub fn inference_moe_impl(choice: MoeImplChoice, fused: MoeFfnOptions, device: Device) -> MoeImpl {
    choice
        .unwrap_or_else(|| MoeImpl::for_inference(device))
        .with_fused_options(fused)
}

/// A struct whose fields are written once, each with its default: the struct and its `Default`.
macro_rules! with_defaults {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }
    };
}

with_defaults! {
    /// All settings of `mixlora train`, resolved: what a run uses and what it records in
    /// `train_config.toml`. The TOML keys are the field names; each setting's meaning is the help
    /// of its flag ([`TrainArgs`]).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct TrainConfig {
        /// None: the built-in tiny random LLaMA with the byte-level tokenizer of `synthetic`.
        pub model: Option<PathBuf> = None,
        #[serde(with = "words")]
        pub adapter: PeftType = PeftType::MixLora,
        /// Empty: the synthetic tasks.
        pub data: Vec<PathBuf> = Vec::new(),
        pub eval_data: Vec<PathBuf> = Vec::new(),
        pub val_set_size: usize = 0,
        pub eval_limit: Option<usize> = None,
        pub out_dir: PathBuf = PathBuf::from("out"),
        pub epochs: usize = 2,
        pub max_steps: Option<usize> = None,
        pub batch_size: usize = 16,
        pub micro_batch_size: usize = 8,
        pub lr: f64 = 2e-4,
        pub weight_decay: f64 = 0.01,
        pub adam_beta1: f64 = 0.9,
        pub adam_beta2: f64 = 0.999,
        pub adam_eps: f64 = 1e-8,
        pub max_grad_norm: f64 = 1.0,
        pub schedule: ScheduleKind = ScheduleKind::Linear,
        pub warmup_steps: Option<usize> = None,
        pub warmup_ratio: Option<f64> = None,
        pub cutoff_len: usize = 512,
        /// Several examples per row of up to `cutoff_len` tokens ([`crate::data::pack_rows`]);
        /// `batch_size` and `micro_batch_size` then count rows.
        pub packing: bool = false,
        /// Each micro-batch's own examples packed into rows of up to `cutoff_len` tokens
        /// ([`crate::data::Dataset::packed_rows`]): the same examples per step and micro-batch
        /// as without it, without the padding between them.
        pub pack_micro_batches: bool = false,
        pub seed: u64 = 42,
        pub num_experts: usize = 8,
        pub top_k: usize = 2,
        pub rank: usize = 16,
        pub alpha: f64 = 32.0,
        pub rslora: bool = false,
        pub dropout: f64 = 0.05,
        /// The projections that get LoRA (MixLoRA: the FFN ones get one per expert).
        pub target_modules: Vec<String> = ALL_MODULES.iter().map(|m| m.to_string()).collect(),
        #[serde(with = "words")]
        pub routing: RoutingStrategy = RoutingStrategy::TopK,
        pub top_p: f64 = 0.8,
        pub aux_loss_coef: f64 = 0.001,
        pub router_init_range: f64 = 0.02,
        /// The router z-loss coefficient (0: none, the paper's loss; `model::adapters::z_loss`).
        pub router_z_loss: f64 = 0.0,
        /// The routers' AdamW learning rate as a multiple of `lr` (1: the paper's single lr).
        pub router_lr_scale: f64 = 1.0,
        /// The std of the experts' LoRA `B` at init (0: `B = 0`, the paper's;
        /// `model::adapters::AdapterInit`).
        pub expert_b_init_std: f64 = 0.0,
        pub eval_every: usize = 0,
        pub save_every: usize = 0,
        pub save_total_limit: usize = 3,
        pub log_every: usize = 1,
        #[serde(with = "words")]
        pub device: Device = Device::Cpu,
        pub dtype: DTypeName = DTypeName::F32,
        /// How the frozen projection weights are stored (`same`: in `dtype`; `fp8`).
        pub base_dtype: BaseDTypeName = BaseDTypeName::Same,
        pub resume: bool = false,
        /// Not recorded in `train_config.toml`: a run read back from it never removes another.
        #[serde(skip_serializing)]
        pub overwrite: bool = false,
        pub gradient_checkpointing: bool = false,
        /// `None`: `auto` ([`MoeImpl::for_device`]). The fused path's options are
        /// `moe_kernels` and `moe_chunk_tokens` ([`TrainConfig::moe`]).
        #[serde(with = "words")]
        pub moe_impl: MoeImplChoice = None,
        #[serde(with = "words")]
        pub moe_kernels: MoeKernels = MoeKernels::BlockGemms,
        pub moe_chunk_tokens: Option<NonZeroUsize> = None,
        /// How the adapters of a run of several share the base (`None`: `auto`, exact); a run
        /// of one adapter ignores it.
        #[serde(with = "words")]
        pub group_mode: GroupModeChoice = None,
        /// How attention is computed (the same values up to rounding).
        #[serde(with = "words")]
        pub attention: AttentionImpl = AttentionImpl::Composite,
        /// Whether the micro-steps are recorded as CUDA graphs (one process; each adapter its own).
        #[serde(with = "words")]
        pub cuda_graphs: CudaGraphs = CudaGraphs::Off,
    }
}

/// The line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).unwrap_or(text).matches('\n').count() + 1
}

/// The settings `s` gives, by TOML key (those it leaves out are absent).
fn given(s: &TrainArgs) -> Result<toml::Table> {
    match toml::Table::try_from(s) {
        Ok(t) => Ok(t),
        Err(e) => Err(Error::Config(format!("cannot lay the settings over: {e}"))),
    }
}

impl TrainArgs {
    /// Parses TOML text into the settings it gives; `file` names it in errors. Relative paths
    /// stay as written.
    pub fn from_toml_str(file: &str, text: &str) -> Result<TrainArgs> {
        toml::from_str(text).map_err(|e| toml_error(file, text, &e))
    }

    /// Makes the relative paths of these settings relative to `base` (a TOML file's folder).
    fn paths_relative_to(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.model.iter_mut().for_each(fix);
        self.data.iter_mut().for_each(fix);
        self.eval_data.iter_mut().for_each(fix);
        self.out_dir.iter_mut().for_each(fix);
    }

    /// Reads a TOML file without `[[adapter]]` tables; its relative paths are resolved against
    /// the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<TrainArgs> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut s = Self::from_toml_str(&path.display().to_string(), &text)?;
        s.paths_relative_to(path.parent().unwrap_or(Path::new("")));
        Ok(s)
    }

    /// Defaults, then the `--config` file, then the flags; validated. The settings of one
    /// adapter: a plan of several ([`TrainArgs::resolve_plan`]) is refused.
    pub fn resolve(self) -> Result<TrainConfig> {
        self.resolve_plan()?.single()
    }
}

/// A TOML error as one line naming `file` and the line of `text` where it is.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> Error {
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
}

impl TrainConfig {
    /// The defaults with `settings` (by TOML key) laid over them.
    fn over_defaults(settings: toml::Table) -> Result<TrainConfig> {
        settings
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.message().trim().replace('\n', " ")))
    }

    /// The defaults with the settings of a TOML text laid over them (not validated); `file`
    /// names it in errors.
    pub fn from_toml_str(file: &str, text: &str) -> Result<TrainConfig> {
        Self::over_defaults(given(&TrainArgs::from_toml_str(file, text)?)?)
    }

    /// The configuration as TOML (written beside the checkpoints).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("cannot serialise: {e}")))
    }

    /// The settings as a run records them (`train_config.toml`): the paths of the model, the
    /// data and the output folder made absolute, so that the record means the same files read
    /// from any folder.
    pub fn recorded(&self) -> TrainConfig {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        TrainConfig {
            model: self.model.as_ref().map(abs),
            data: self.data.iter().map(abs).collect(),
            eval_data: self.eval_data.iter().map(abs).collect(),
            out_dir: abs(&self.out_dir),
            ..self.clone()
        }
    }

    /// Checks the settings that their types do not and their combinations; the first problem
    /// is a one-line error.
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
        if self.packing && self.pack_micro_batches {
            return bad(
                "packing and pack_micro_batches together: packing already fills each row with \
                 examples (more of them a step); pack_micro_batches packs only each \
                 micro-batch's own"
                    .into(),
            );
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
        if self.target_modules.is_empty() {
            return bad("target_modules is empty: name at least one projection".into());
        }
        for (i, m) in self.target_modules.iter().enumerate() {
            if !ALL_MODULES.contains(&m.as_str()) {
                return bad(format!(
                    "target_modules: unknown module `{m}` (expected {})",
                    ALL_MODULES.join(", ")
                ));
            }
            if self.target_modules[..i].contains(m) {
                return bad(format!("target_modules names `{m}` twice"));
            }
        }
        if self.adapter == PeftType::MixLora {
            if self.num_experts == 0 {
                return bad("num_experts must be at least 1".into());
            }
            if self.routing == RoutingStrategy::TopK
                && !(1..=self.num_experts).contains(&self.top_k)
            {
                return bad(format!(
                    "top_k {} is not in 1..={} (num_experts)",
                    self.top_k, self.num_experts
                ));
            }
            if self.routing == RoutingStrategy::TopP && !(self.top_p > 0.0 && self.top_p <= 1.0) {
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
            if !(self.router_z_loss.is_finite() && self.router_z_loss >= 0.0) {
                return bad(format!("router_z_loss {} must be >= 0", self.router_z_loss));
            }
            if !(self.router_lr_scale.is_finite() && self.router_lr_scale > 0.0) {
                return bad(format!(
                    "router_lr_scale {} must be a positive number",
                    self.router_lr_scale
                ));
            }
            if !(self.expert_b_init_std.is_finite() && self.expert_b_init_std >= 0.0) {
                return bad(format!(
                    "expert_b_init_std {} must be >= 0",
                    self.expert_b_init_std
                ));
            }
        } else {
            // Settings of the MixLoRA router that a plain LoRA has none of: refused, not ignored.
            let defaults = TrainConfig::default();
            for (key, set) in [
                (
                    "router_z_loss",
                    self.router_z_loss != defaults.router_z_loss,
                ),
                (
                    "router_lr_scale",
                    self.router_lr_scale != defaults.router_lr_scale,
                ),
                (
                    "expert_b_init_std",
                    self.expert_b_init_std != defaults.expert_b_init_std,
                ),
            ] {
                if set {
                    return bad(format!(
                        "{key} applies to MixLoRA's routers or experts: a `lora` adapter has \
                         neither"
                    ));
                }
            }
        }
        if self.resume && self.overwrite {
            return bad(
                "resume continues the run in the output folder and overwrite removes it: \
                 give one of them"
                    .into(),
            );
        }
        if self.log_every == 0 {
            return bad("log_every must be at least 1".into());
        }
        if self.save_total_limit == 0 {
            return bad("save_total_limit must be at least 1".into());
        }
        Ok(())
    }

    /// Micro-batches per optimizer step.
    pub fn grad_accum(&self) -> usize {
        self.batch_size / self.micro_batch_size.max(1)
    }

    /// Optimizer steps of the run: the steps of its `epochs` epochs (`steps_in_epoch(e)` in
    /// epoch `e`: the same in every epoch, except with packing), capped by `max_steps` (which
    /// alone decides when `epochs` is 0).
    pub fn total_steps(&self, steps_in_epoch: impl Fn(usize) -> usize) -> usize {
        let by_epochs = (0..self.epochs).map(steps_in_epoch).sum();
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

    /// The MoE implementation of the run, on its device, with its fused-path options.
    pub fn moe(&self) -> MoeImpl {
        let fused = FusedMoeArgs {
            moe_kernels: self.moe_kernels,
            moe_chunk_tokens: self.moe_chunk_tokens,
        };
        moe_impl(self.moe_impl, fused.options(), self.device)
    }

    /// How the run's fresh adapters are initialised (a resumed run loads its own).
    pub fn adapter_init(&self) -> model::adapters::AdapterInit {
        model::adapters::AdapterInit {
            expert_b_std: self.expert_b_init_std,
        }
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

//! The flags of `mixlora train` (which a TOML file gives too), `eval`, `generate` and `bench`.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::Args;
use engine::profile::ProfileMode;
use engine::{Device, MoeFfnOptions, MoeKernels};
use model::{AttentionImpl, MoeImpl, PeftType, RoutingStrategy};
use serde::{Deserialize, Serialize};

use super::words::{self, GroupModeChoice, MoeImplChoice};
use super::{BaseDTypeName, CudaGraphs, DTypeName};
use crate::schedule::ScheduleKind;

/// `skip_serializing_if` of a flag that is off unless given.
fn is_false(b: &bool) -> bool {
    !*b
}

/// The settings of `mixlora train` that a TOML file (`--config`) or the flags give, each `None`
/// (or empty, or false) unless given: [`resolve`](TrainArgs::resolve) lays them over the
/// defaults of [`TrainConfig`](super::TrainConfig), whose field of the same name each one sets.
/// The TOML keys are the field names (the flags with `_`).
///
/// So clap knows no default here (it would hide the TOML file's value): each help ends in
/// `[default: …]` written out, which a test checks against `TrainConfig::default()`.
#[derive(Args, Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainArgs {
    /// A TOML file with any of the settings below (keys: the flag names with `_`); flags override
    /// it [default: none].
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Train one adapter per value (`KEY=V1,V2,...`, KEY a per-adapter setting, values as its
    /// flag takes them; a list's items joined with `+`); repeat for the product, each adapter
    /// named from its values (`lr2e-4_seed42`) in a folder of that name under --out-dir; not
    /// with `[[adapter]]` tables [default: none, one adapter].
    #[arg(long, value_name = "KEY=V1,V2,...")]
    #[serde(skip)]
    pub sweep: Vec<String>,
    /// Base model: GGUF file or Hugging Face folder [default: built-in tiny random LLaMA].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `lora` (LoRA on q, k, v, o, gate, up, down) or `mixlora` (LoRA on attention, a sparse
    /// mixture of LoRA experts on the FFN) [default: mixlora].
    // In TOML also `kind`, which a file with `[[adapter]]` tables must use at its top level.
    #[arg(long, value_name = "KIND")]
    #[serde(
        alias = "kind",
        with = "words::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub adapter: Option<PeftType>,
    /// Training file (LLM-Adapters JSON); repeat for several tasks [default: synthetic tasks].
    #[arg(long = "data")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<PathBuf>,
    /// Evaluation file (LLM-Adapters JSON), scored at the end and every `--eval-every` steps;
    /// repeat for several tasks [default: none; without --data, the synthetic tasks' own].
    #[arg(long = "eval-data")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_data: Vec<PathBuf>,
    /// Examples held out of the training files for evaluation, instead of --eval-data
    /// [default: 0, none].
    #[arg(long)]
    pub val_set_size: Option<usize>,
    /// At most this many questions per task in evaluation [default: all].
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Output folder: checkpoints, metrics.jsonl, train_config.toml and the final adapter
    /// [default: out].
    #[arg(long, visible_alias = "out")]
    pub out_dir: Option<PathBuf>,
    /// Passes over the training data [default: 2].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps, even within an epoch (with --epochs 0, the length
    /// of the run) [default: none, the epochs decide].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Effective batch size: examples per optimizer step [default: 16].
    #[arg(long, visible_alias = "batch")]
    pub batch_size: Option<usize>,
    /// Examples per forward pass; `batch_size / micro_batch_size` passes are accumulated
    /// [default: 8].
    #[arg(long, visible_alias = "micro-batch")]
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate [default: 2e-4; 2e-3 for the built-in model without --config].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW's decoupled weight decay [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW's β1, the decay of the first moment [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW's β2, the decay of the second moment [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW's ε, added to the root of the second moment [default: 1e-8].
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Global gradient-norm clipping threshold (0: no clipping) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// The learning rate's decay after warmup [default: linear].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Optimizer steps of linear warmup from 0 to --lr (or --warmup-ratio) [default: none, no
    /// warmup].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the total steps, rounded up (or --warmup-steps) [default: none, no
    /// warmup].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Longest tokenised example (prompt + answer + EOS); longer ones are truncated; evaluation
    /// cuts prompts from the left to fit [default: 512].
    #[arg(long)]
    pub cutoff_len: Option<usize>,
    /// Pack several examples into each row of up to --cutoff-len tokens (greedily, in the
    /// epoch's order), each with its own positions and attention (no example sees another);
    /// --batch-size and --micro-batch-size then count rows, not examples [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub packing: bool,
    /// Pack each micro-batch's own examples into rows of up to --cutoff-len tokens (each with
    /// its own positions and attention), so that the padding between them goes: the same
    /// examples per step and micro-batch as without it, the same losses and gradients up to
    /// rounding (the dropout masks differ) [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub pack_micro_batches: bool,
    /// Seed of the adapter initialisation, the data order, dropout, the validation split and the
    /// built-in model [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// MixLoRA: LoRA experts per FFN [default: 8].
    #[arg(long)]
    pub num_experts: Option<usize>,
    /// MixLoRA: experts per token with `--routing topk` [default: 2].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// LoRA rank r of every adapter (and expert) [default: 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha: the update is scaled by `alpha/r` (`alpha/√r` with --rslora)
    /// [default: 32.0].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Scale LoRA by `alpha/√r` (rsLoRA) instead of `alpha/r` [default: false].
    #[arg(long)]
    pub rslora: Option<bool>,
    /// Dropout on the LoRA inputs while training [default: 0.05].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// The projections that get LoRA, comma-separated (MixLoRA: gate, up and down get one per
    /// expert) [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj].
    #[arg(long, value_name = "MODULES", value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// How the MixLoRA router picks experts: `topk` (the `top_k` most probable, weights
    /// renormalised) or `topp` (in order of probability until their sum passes `top_p`, no
    /// renormalisation) [default: topk].
    #[arg(long, value_name = "ROUTING")]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingStrategy>,
    /// MixLoRA: the probability mass of the experts a token gets with `--routing topp`
    /// [default: 0.8].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// MixLoRA: the coefficient of the router's load-balance loss [default: 0.001].
    #[arg(long)]
    pub aux_loss_coef: Option<f64>,
    /// Standard deviation of the router's normal initialisation [default: 0.02].
    #[arg(long)]
    pub router_init_range: Option<f64>,
    /// MixLoRA: the coefficient of the router z-loss (ST-MoE): COEF times the mean over layers
    /// and real tokens of logsumexp(router logits)², added to the loss; 0 adds nothing (the
    /// paper) [default: 0.0].
    #[arg(long, value_name = "COEF")]
    pub router_z_loss: Option<f64>,
    /// MixLoRA: the routers' AdamW learning rate as F times the lr (same schedule); 1 is the
    /// paper's single lr [default: 1.0].
    #[arg(long, value_name = "F")]
    pub router_lr_scale: Option<f64>,
    /// MixLoRA: draw the experts' LoRA B from N(0, SIGMA) instead of zero, so the experts differ
    /// (and the router has a gradient) from the first step; 0 is the paper's B = 0
    /// [default: 0.0].
    #[arg(long, value_name = "SIGMA")]
    pub expert_b_init_std: Option<f64>,
    /// Evaluate every this many optimizer steps (0: only at the end) [default: 0].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save a checkpoint every this many optimizer steps (0: only at the end) [default: 0].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Keep at most this many checkpoints (the newest) [default: 3].
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Log a metrics line every this many optimizer steps [default: 1].
    #[arg(long)]
    pub log_every: Option<usize>,
    /// `cpu`, `cuda` (the first GPU) or `cuda:N` [default: cpu].
    #[arg(long)]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// The dtype of the frozen base weights; adapters are f32 [default: f32].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeName>,
    /// How the frozen projection weights (q, k, v, o, gate, up, down) are stored: `same` (in
    /// --dtype) or `fp8` (e4m3 with one scale per output channel, half of bf16's memory; their
    /// products run through FP8 GEMMs in --dtype: on a GPU of compute capability 8.9 or newer,
    /// or on the CPU) [default: same].
    #[arg(long, value_enum)]
    pub base_dtype: Option<BaseDTypeName>,
    /// Continue the run in the output folder from its newest complete checkpoint; the settings
    /// that shape the adapter, the data or the schedule must equal the run's (a difference is
    /// refused, naming it), and a folder without a checkpoint is an error [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub resume: bool,
    /// Start afresh in an output folder that holds another run: first remove that run's files
    /// (metrics.jsonl, train_config.toml, eval.json, adapter/, checkpoint-N/), keeping any
    /// other file [default: off, such a folder is refused].
    #[arg(long, conflicts_with = "resume")]
    #[serde(skip_serializing_if = "is_false")]
    pub overwrite: bool,
    /// Recompute each decoder layer in the backward pass (less memory, one more forward)
    /// [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
    #[arg(
        long,
        value_name = "IMPL",
        help = MOE_IMPL_HELP,
        value_parser = words::parse::<MoeImplChoice>
    )]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub moe_impl: Option<MoeImplChoice>,
    #[arg(
        long,
        value_name = "KERNELS",
        help = MOE_KERNELS_HELP,
        value_parser = words::parse::<MoeKernels>
    )]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub moe_kernels: Option<MoeKernels>,
    #[arg(
        long,
        value_name = "MODE",
        help = GROUP_MODE_HELP,
        value_parser = words::parse::<GroupModeChoice>
    )]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub group_mode: Option<GroupModeChoice>,
    #[arg(
        long,
        value_name = "IMPL",
        help = ATTENTION_HELP,
        value_parser = words::parse::<AttentionImpl>
    )]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionImpl>,
    #[arg(
        long,
        value_name = "MODE",
        help = CUDA_GRAPHS_HELP,
        value_parser = words::parse::<CudaGraphs>
    )]
    #[serde(with = "words::option", skip_serializing_if = "Option::is_none")]
    pub cuda_graphs: Option<CudaGraphs>,
    #[arg(
        long,
        value_name = "N",
        help = MOE_CHUNK_HELP,
        value_parser = words::parse::<NonZeroUsize>
    )]
    pub moe_chunk_tokens: Option<NonZeroUsize>,
}

/// The help of the MoE flags, which `train` shares with other commands (with the defaults in
/// words: `train`'s flags have none that clap knows, the settings' defaults being
/// [`TrainConfig`](super::TrainConfig)'s).
const MOE_IMPL_HELP: &str = "How MixLoRA FFNs are computed: `auto` (fused on a GPU, naive on \
    the CPU), `naive`, `paper`, `grouped` or `fused` [default: auto]";
const INFERENCE_MOE_IMPL_HELP: &str = "How MixLoRA FFNs are computed: `auto` (fused, on every \
    device), `naive`, `paper`, `grouped` or `fused` [default: auto]";
const GROUP_MODE_HELP: &str = "How several adapters of one run share the base: `exact` (each \
    adapter's rows through their own projections and attention: each adapter exactly as alone, \
    bit for bit on the CPU), `sequential` (exact, each adapter's micro-batch forward and backward \
    before the next adapter's: the activation memory of one adapter at a time), `shared` (the \
    adapters' micro-batches padded into one batch through the frozen base, their LoRAs grouped: \
    the same up to rounding, fewer kernel launches) or `auto` (exact) [default: auto]";
const CUDA_GRAPHS_HELP: &str = "Record each training micro-step as a CUDA graph and replay it \
    (`on`; --device cuda, one process; several adapters each record their own, replayed side by \
    side): micro-batches are padded to a multiple of 64 \
    tokens and to full rows, and each micro-batch's dropout is drawn under a key the GPU reads. \
    `eager` runs those same micro-steps without graphs, on any device, with the same numbers; \
    `off` launches each micro-batch at its own length, kernel by kernel; `auto` is `on` where it \
    can run and `off` elsewhere (the CPU, several processes, --group-mode shared) [default: off]";
const ATTENTION_HELP: &str = "How attention is computed: `composite` (two matmuls around the \
    masked softmax, keeping the probabilities for the backward) or `flash` (one fused op keeping \
    a log-sum-exp per query; its CUDA kernels, head dims 64 and 128, are not yet validated on a \
    GPU) [default: composite]";
const MOE_KERNELS_HELP: &str = "The fused MoE FFN's kernels: `gemms` (dense GEMMs over block \
    codes, any device and dtype) or `tiles` (the tensor-core tile kernels where they serve the \
    sizes: CUDA, bf16) [default: gemms]";
const MOE_CHUNK_HELP: &str = "Tokens per chunk of the fused MoE FFN, whose per-slot tensors \
    exist for one chunk at a time [default: none, the fewest even chunks under a size cap]";

/// The fused MoE FFN's options (`--moe-kernels`, `--moe-chunk-tokens`).
#[derive(Args, Debug, Clone, Copy, Default, PartialEq)]
pub struct FusedMoeArgs {
    #[arg(
        long,
        value_name = "KERNELS",
        help = MOE_KERNELS_HELP,
        default_value = "gemms",
        hide_default_value = true,
        value_parser = words::parse::<MoeKernels>
    )]
    pub moe_kernels: MoeKernels,
    #[arg(
        long,
        value_name = "N",
        help = MOE_CHUNK_HELP,
        value_parser = words::parse::<NonZeroUsize>
    )]
    pub moe_chunk_tokens: Option<NonZeroUsize>,
}

impl FusedMoeArgs {
    /// The options of the fused MoE FFN.
    pub fn options(&self) -> MoeFfnOptions {
        MoeFfnOptions {
            kernels: self.moe_kernels,
            chunk_tokens: self.moe_chunk_tokens.map(NonZeroUsize::get),
        }
    }
}

/// How MixLoRA FFNs are computed at inference, `eval` and `generate` (`--moe-impl` and the
/// fused path's options).
#[derive(Args, Debug, Clone, Copy, Default, PartialEq)]
pub struct MoeArgs {
    #[arg(
        long,
        value_name = "IMPL",
        help = INFERENCE_MOE_IMPL_HELP,
        default_value = "auto",
        hide_default_value = true,
        value_parser = words::parse::<MoeImplChoice>
    )]
    pub moe_impl: MoeImplChoice,
    #[command(flatten)]
    pub fused: FusedMoeArgs,
}

impl MoeArgs {
    /// The implementation on `device` (`auto`: fused on every device, as inference wants).
    pub fn inference_moe_impl(&self, device: Device) -> MoeImpl {
        super::inference_moe_impl(self.moe_impl, self.fused.options(), device)
    }
}

/// The engine's op profile (`--profile`, `--profile-rows`).
#[derive(Args, Debug, Clone, Copy, Default, PartialEq)]
pub struct ProfileArgs {
    /// Time every backend op and print where the time went: `off`, `wall` (each op; on a GPU
    /// each kernel between two synchronisations) or `gpu` (each GPU kernel between two CUDA
    /// events, without waits, and the GPU's span) [default: $MIXLORA_PROFILE, else off].
    #[arg(long, value_name = "MODE")]
    pub profile: Option<ProfileMode>,
    /// Rows of the profile printed (the longest ops) [default: $MIXLORA_PROFILE_ROWS, else 45].
    #[arg(long, value_name = "N")]
    pub profile_rows: Option<usize>,
}

impl ProfileArgs {
    /// The rows of a printed profile.
    pub fn rows(&self) -> usize {
        self.profile_rows.unwrap_or(45)
    }
}

/// Flags of `mixlora eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Base model: GGUF file or Hugging Face folder [default: built-in tiny random LLaMA].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An adapter folder (adapter_config.json + adapter_model.safetensors, or MoE-PEFT's
    /// adapter_model.bin) or a checkpoint; repeat to evaluate several adapters of one base in
    /// one pass (the report is then a JSON object keyed by each folder as given)
    /// [default: none, the base model alone].
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Evaluation file (LLM-Adapters JSON); repeat for several tasks. The candidate answers come
    /// from each item's `Answer format:` line, else its `Answer1:`... choices, else the file's
    /// answers; a file with an item that cannot be scored is refused before any work
    /// [default: synthetic tasks].
    #[arg(long = "data")]
    pub data: Vec<PathBuf>,
    /// At most this many questions per task [default: all].
    #[arg(long)]
    pub limit: Option<usize>,
    /// Candidate answers scored per forward pass; with N --adapter, per adapter (a pass then
    /// scores N times as many, with N times the activation memory).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest candidate sequence in tokens; longer prompts are cut from the left.
    #[arg(long, default_value_t = 512)]
    pub cutoff_len: usize,
    /// `cpu`, `cuda` (the first GPU) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// How the frozen projection weights are stored: `same` (in --dtype) or `fp8`; evaluate an
    /// adapter with the base it was trained on.
    #[arg(long, value_enum, default_value_t = BaseDTypeName::Same)]
    pub base_dtype: BaseDTypeName,
    /// The dtype of the base weights; adapters are f32.
    #[arg(long, value_enum, default_value_t = DTypeName::F32)]
    pub dtype: DTypeName,
    /// Also write the results as JSON to this file (with several --adapter, the same object as
    /// stdout) [default: none, stdout only].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also write, per task and per MoE layer, the share of (token, slot) pairs each expert
    /// received over the real tokens of the evaluated candidates (JSON); one MixLoRA --adapter
    /// only [default: none].
    #[arg(long)]
    pub routing: Option<PathBuf>,
    #[command(flatten)]
    pub moe: MoeArgs,
}

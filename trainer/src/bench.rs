//! `mixlora bench table6`: the MixLoRA paper's Table 6 (training cost per token) on this engine.
//!
//! A LLaMA-2-7B-shaped model (32 layers, H = 4096, I = 11008, 32 heads, vocabulary 32000) with
//! random bf16 weights (the cost does not depend on the values), a batch of random tokens
//! (8 × 512 by default, every position a target), and for each adapter variant: the forward
//! (model + loss) and the backward, each timed from a synchronised device to a synchronised
//! device; `warmup` steps first, then the median of `steps` steps. Reported per variant:
//! forward and backward µs per token, tokens/s of forward + backward, and the peak of the
//! engine's tensor memory over the timed steps (`engine::memory_stats`: the GPU allocator or
//! the CPU's live tensor buffers; weights, activations and gradients: GiB).
//!
//! Variants: LoRA r = 16 on all seven projections; MixLoRA (E = 8, top-2, r = 16: LoRA on q, k,
//! v, o and experts on the FFN) with each MoE implementation.
//!
//! With `--adapters N,...` it measures instead several adapter sets of each variant trained
//! together on the one base, against a single run ([`multi`]).

use std::path::PathBuf;
use std::time::Instant;

use engine::{DType, Device, MoeFfnOptions, Tensor};
use model::adapters::MoeImpl;
use model::{AdapterConfig, Llama, LlamaConfig};

use crate::config::{FusedMoeArgs, ProfileArgs};
use crate::error::{Error, Result};

pub mod multi;
pub mod recipe;

pub use multi::{table6_multi, table6_multi_json, table6_multi_markdown, MultiRow, StepFigures};

/// A model shape for the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchShape {
    /// LLaMA-2-7B: 32 layers, H 4096, I 11008, 32 heads, vocabulary 32000.
    Llama2_7b,
    /// A 2-layer model with the same proportions at H = 64 (to try the command on a CPU).
    Tiny,
    /// SmolLM2-135M: 30 layers, H 576, I 1536, 9 heads (3 KV heads), vocabulary 49152, tied
    /// embeddings.
    Smollm2,
}

impl BenchShape {
    /// The shape's name on the command line and in the JSON reports.
    pub fn key(self) -> &'static str {
        match self {
            BenchShape::Llama2_7b => "llama2-7b",
            BenchShape::Tiny => "tiny",
            BenchShape::Smollm2 => "smollm2",
        }
    }
}

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchVariant {
    /// LoRA r = 16 on all seven projections.
    Lora,
    /// MixLoRA with the per-expert loop.
    MixloraNaive,
    /// MixLoRA with the paper's † optimisation (shared gate/up projections).
    MixloraPaper,
    /// MixLoRA grouped by expert on the device (no host sync).
    MixloraGrouped,
    /// MixLoRA through the fused FFN op (the `fused` method of docs/DESIGN.md).
    MixloraFused,
}

impl BenchVariant {
    /// The key of the variant in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            BenchVariant::Lora => "lora",
            BenchVariant::MixloraNaive => "mixlora_naive",
            BenchVariant::MixloraPaper => "mixlora_paper",
            BenchVariant::MixloraGrouped => "mixlora_grouped",
            BenchVariant::MixloraFused => "mixlora_fused",
        }
    }
    /// The adapter and the MoE implementation of the variant (`fused`: the fused path's options).
    fn adapter(self, fused: MoeFfnOptions) -> (AdapterConfig, Option<MoeImpl>) {
        match self {
            BenchVariant::Lora => (AdapterConfig::lora_default(), None),
            BenchVariant::MixloraNaive => (AdapterConfig::mixlora_default(), Some(MoeImpl::Naive)),
            BenchVariant::MixloraPaper => (AdapterConfig::mixlora_default(), Some(MoeImpl::Paper)),
            BenchVariant::MixloraGrouped => {
                (AdapterConfig::mixlora_default(), Some(MoeImpl::Grouped))
            }
            BenchVariant::MixloraFused => (
                AdapterConfig::mixlora_default(),
                Some(MoeImpl::Fused(fused)),
            ),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Table6Args {
    /// `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// The model's shape.
    #[arg(long, value_enum, default_value = "llama2-7b")]
    pub shape: BenchShape,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Override the number of decoder layers of the shape [default: the shape's].
    #[arg(long)]
    pub layers: Option<usize>,
    /// Untimed steps per variant before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed training steps per variant (their median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Variants to run, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub variants: Vec<BenchVariant>,
    /// Recompute each decoder layer in the backward pass [default: off].
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// How the frozen projection weights are stored, `same` (bf16) or `fp8` (`mixlora train
    /// --base-dtype`); the JSON's variant keys then end in `_fp8`.
    #[arg(long, value_enum, default_value_t = crate::config::BaseDTypeName::Same)]
    pub base_dtype: crate::config::BaseDTypeName,
    /// With --adapters: how the adapters share the base, `exact`, `sequential` or `shared`
    /// (`mixlora train --group-mode`) [default: auto, exact].
    #[arg(long, value_name = "MODE", value_parser = crate::config::words::parse::<crate::config::GroupModeChoice>)]
    pub group_mode: Option<crate::config::GroupModeChoice>,
    /// How attention is computed, `composite` or `flash` (`mixlora train --attention`)
    /// [default: composite].
    #[arg(long, value_name = "IMPL", value_parser = crate::config::words::parse::<model::AttentionImpl>)]
    pub attention: Option<model::AttentionImpl>,
    /// Numbers of adapter sets to train together on the one base, comma-separated (e.g.
    /// `1,2,4`): each variant's grouped step per number, against a single run [default: none,
    /// one adapter per variant, the Table 6 report].
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    pub adapters: Vec<usize>,
    /// Also write the results as JSON here [default: none, the markdown table on stdout only].
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The options of the `mixlora-fused` variant.
    #[command(flatten)]
    pub fused: FusedMoeArgs,
    /// With the profile on, one more step per variant prints where its time goes.
    #[command(flatten)]
    pub profile: ProfileArgs,
}

/// One variant's measurements.
#[derive(Clone, Debug)]
pub struct VariantResult {
    pub variant: BenchVariant,
    pub fwd_us_per_token: f64,
    pub bwd_us_per_token: f64,
    /// Host time spent issuing the forward and backward (before waiting for the device), per
    /// token: close to fwd + bwd when the host, not the device, bounds the step.
    pub host_us_per_token: f64,
    pub tokens_per_s: f64,
    /// `None` on the CPU.
    pub peak_gib: Option<f64>,
    /// The loss of the last step (a sanity check: finite).
    pub loss: f64,
}

pub fn shape_config(shape: BenchShape, layers: Option<usize>) -> LlamaConfig {
    let mut c = match shape {
        BenchShape::Llama2_7b => LlamaConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
        BenchShape::Smollm2 => LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
        BenchShape::Tiny => LlamaConfig {
            vocab_size: 500,
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
    };
    if let Some(l) = layers {
        c.num_hidden_layers = l;
    }
    c
}

pub(crate) fn synchronize(device: Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    engine::backend::cuda::synchronize(device)?;
    let _ = device;
    Ok(())
}

/// Peak bytes of the engine's tensor memory on `device` since the last reset
/// ([`engine::memory_stats`]: the live CPU tensor buffers, or the GPU's caching allocator).
pub(crate) fn peak_bytes(device: Device) -> Option<usize> {
    Some(engine::memory_stats(device).1)
}

/// A peak for the log: MiB below 1 GiB (the CPU's small models), else GiB.
pub(crate) fn memory_text(gib: f64) -> String {
    if gib < 1.0 {
        format!("{:.1} MiB", gib * 1024.0)
    } else {
        format!("{gib:.2} GiB")
    }
}

pub(crate) fn reset_peak(device: Device) {
    engine::reset_peak_memory(device);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random token ids `[B, T]` and their next-token targets `[B·T]` (the last position of each
/// sequence predicts a random token too: every position is a target). Each `stream` is another
/// batch; stream 0 is the Table 6 batch.
fn random_batch(
    b: usize,
    t: usize,
    vocab: usize,
    device: Device,
    stream: u64,
) -> Result<(Tensor, Tensor)> {
    let n = b * t;
    let (ids_seed, last_seed) = (7 + 2 * stream, 8 + 2 * stream);
    let ids: Vec<u32> = (0..n as u64)
        .map(|i| (engine::rng::uniform(ids_seed, i) * vocab as f64) as u32 % vocab as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|i| {
            if (i + 1) % t == 0 {
                (engine::rng::uniform(last_seed, i as u64) * vocab as f64) as u32 % vocab as u32
            } else {
                ids[i + 1]
            }
        })
        .collect();
    Ok((
        Tensor::from_vec(ids, [b, t], device)?,
        Tensor::from_vec(targets, n, device)?,
    ))
}

/// The trainer's loss of one batch: the training forward to the final hidden states, the
/// cross-entropy over vocabulary chunks (no full logits) averaged over the targets, plus the
/// MixLoRA aux loss.
fn training_loss(
    model: &Llama,
    ids: &Tensor,
    mask: &Tensor,
    targets: &Tensor,
    seed: u64,
) -> Result<Tensor> {
    let out = model.forward_train_hidden(ids, Some(mask), Some(seed))?;
    hidden_loss(model, &out, targets)
}

/// [`training_loss`] from the training forward's output `out`.
fn hidden_loss(model: &Llama, out: &model::HiddenOutput, targets: &Tensor) -> Result<Tensor> {
    let n = targets.elem_count();
    let rows = crate::run::lm_loss_rows(model, &out.hidden, targets)?; // [B·T] f32
    let mut loss = rows.sum_all()?.mul_scalar(1.0 / n as f64)?;
    if let Some(aux) = &out.aux_loss {
        loss = loss.add(&aux.to_dtype(loss.dtype())?)?;
    }
    if let Some(z) = &out.z_loss {
        loss = loss.add(&z.to_dtype(loss.dtype())?)?;
    }
    Ok(loss)
}

/// The measured variants, and those that did not fit in the device's memory (with the error).
#[derive(Debug)]
pub struct Table6 {
    pub results: Vec<VariantResult>,
    pub failed: Vec<(BenchVariant, String)>,
}

/// Runs the benchmark; `log` receives progress lines. A variant that runs out of device memory
/// is reported in [`Table6::failed`] and the others still run.
pub fn table6(a: &Table6Args, mut log: impl FnMut(&str)) -> Result<Table6> {
    let device = a.device;
    check_args(a)?;
    let cfg = shape_config(a.shape, a.layers);
    let (b, t) = (a.batch, a.seq);
    let mut model = build_model(a, &mut log)?;
    let (ids, targets) = random_batch(b, t, cfg.vocab_size, device, 0)?;
    let mask = Tensor::ones([b, t], DType::U32, device)?;
    let variants = variants(a);
    let tokens = (b * t) as f64;
    let mut failed = Vec::new();
    let mut results = Vec::new();
    for v in variants {
        let mut measure = || -> Result<VariantResult> {
            let (acfg, imp) = v.adapter(a.fused.options());
            model.add_adapters(&acfg, 2)?;
            if let Some(imp) = imp {
                model.set_moe_impl(imp);
            }
            let params = model.trainable_params();
            let (mut fwd, mut bwd, mut host) = (Vec::new(), Vec::new(), Vec::new());
            let mut loss_v = f64::NAN;
            for step in 0..a.warmup + a.steps {
                if step == a.warmup {
                    synchronize(device)?;
                    reset_peak(device);
                }
                params.iter().for_each(|(_, p)| p.zero_grad());
                synchronize(device)?;
                let t0 = Instant::now();
                let loss = training_loss(&model, &ids, &mask, &targets, step as u64)?;
                let issued_fwd = t0.elapsed();
                synchronize(device)?;
                let t1 = Instant::now();
                loss.backward()?;
                let issued_bwd = t1.elapsed();
                synchronize(device)?;
                let t2 = Instant::now();
                if step >= a.warmup {
                    fwd.push((t1 - t0).as_secs_f64());
                    bwd.push((t2 - t1).as_secs_f64());
                    host.push((issued_fwd + issued_bwd).as_secs_f64());
                }
                loss_v = loss.to_scalar()?;
            }
            if engine::profile::enabled() {
                // One more step with every kernel timed: where the time goes.
                engine::profile::take();
                params.iter().for_each(|(_, p)| p.zero_grad());
                training_loss(&model, &ids, &mask, &targets, 0)?.backward()?;
                synchronize(device)?;
                let how = match engine::profile::mode() {
                    engine::profile::ProfileMode::GpuEvents => {
                        "every GPU launch timed by CUDA events"
                    }
                    _ => "every op synchronised",
                };
                println!("profile of one {} step ({how}):", v.key());
                print!("{}", engine::profile::report(a.profile.rows()));
            }
            let (f, bw) = (median(fwd), median(bwd));
            let r = VariantResult {
                variant: v,
                fwd_us_per_token: f * 1e6 / tokens,
                bwd_us_per_token: bw * 1e6 / tokens,
                host_us_per_token: median(host) * 1e6 / tokens,
                tokens_per_s: tokens / (f + bw),
                peak_gib: peak_bytes(device).map(|p| p as f64 / (1u64 << 30) as f64),
                loss: loss_v,
            };
            params.iter().for_each(|(_, p)| p.zero_grad());
            Ok(r)
        };
        let r = match measure() {
            Ok(r) => r,
            Err(e) if is_out_of_memory(&e) => {
                // The variant does not fit: say so and go on with the others.
                log(&format!("{:<14} does not fit: {e}", v.key()));
                failed.push((v, e.to_string()));
                continue;
            }
            Err(e) => return Err(e),
        };
        log(&format!(
            "{:<14} fwd {:>8.2} us/token  bwd {:>8.2} us/token  (host {:.2})  {:>9.0} tokens/s  peak {}  loss {:.3}",
            v.key(),
            r.fwd_us_per_token,
            r.bwd_us_per_token,
            r.host_us_per_token,
            r.tokens_per_s,
            r.peak_gib.map_or("-".into(), memory_text),
            r.loss
        ));
        if !r.loss.is_finite() {
            return Err(Error::Config(format!(
                "bench table6: {} gave a non-finite loss {}",
                v.key(),
                r.loss
            )));
        }
        results.push(r);
    }
    Ok(Table6 { results, failed })
}

/// Refuses arguments that leave nothing to measure.
fn check_args(a: &Table6Args) -> Result<()> {
    if a.steps == 0 || a.batch == 0 || a.seq == 0 {
        return Err(Error::Config(
            "bench table6: --steps, --batch and --seq must be positive".into(),
        ));
    }
    Ok(())
}

/// The random bf16 model of `a.shape` on `a.device`, with gradient checkpointing as asked and
/// `W_gate`, `W_up` stacked.
fn build_model(a: &Table6Args, log: &mut impl FnMut(&str)) -> Result<Llama> {
    let cfg = shape_config(a.shape, a.layers);
    log(&format!(
        "building a random {:?} model ({} layers, H {}, I {}) in bf16 on {}",
        a.shape, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, a.device
    ));
    let mut model = Llama::random(cfg, 1, DType::BF16, a.device)?;
    a.base_dtype.apply(&mut model, log)?;
    model.set_gradient_checkpointing(a.gradient_checkpointing);
    model.set_group_mode(a.group_mode.flatten());
    model.set_attention_impl(a.attention.unwrap_or_default());
    // W_gate and W_up as halves of one buffer (the fused path's one GEMM; a view for the others).
    model.stack_gate_up()?;
    Ok(model)
}

/// The variants to run: those of `--variants`, else all.
fn variants(a: &Table6Args) -> Vec<BenchVariant> {
    if a.variants.is_empty() {
        vec![
            BenchVariant::Lora,
            BenchVariant::MixloraNaive,
            BenchVariant::MixloraPaper,
            BenchVariant::MixloraGrouped,
            BenchVariant::MixloraFused,
        ]
    } else {
        a.variants.clone()
    }
}

/// Whether `e` is the device running out of memory.
fn is_out_of_memory(e: &Error) -> bool {
    matches!(
        e,
        Error::Engine(engine::Error::OutOfMemory { .. })
            | Error::Model(model::Error::Engine(engine::Error::OutOfMemory { .. }))
    )
}

/// The device's name for the report.
pub(crate) fn device_name(device: Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        if let Ok(d) = engine::backend::cuda::CudaDevice::get(n) {
            return format!("{} ({})", d.name(), d.arch());
        }
    }
    device.to_string()
}

/// The report as JSON: `{"device", "batch", "seq", ..., "<variant>": {"fwd_us_per_token",
/// "bwd_us_per_token", "tokens_per_s", "peak_gib"}}`.
pub fn table6_json(a: &Table6Args, t6: &Table6) -> Result<String> {
    let results = &t6.results;
    let device = a.device;
    let cfg = shape_config(a.shape, a.layers);
    let mut obj = serde_json::Map::new();
    obj.insert("device".into(), device_name(device).into());
    obj.insert("batch".into(), a.batch.into());
    obj.insert("seq".into(), a.seq.into());
    obj.insert("layers".into(), cfg.num_hidden_layers.into());
    obj.insert("hidden".into(), cfg.hidden_size.into());
    obj.insert("intermediate".into(), cfg.intermediate_size.into());
    obj.insert("dtype".into(), "bf16".into());
    obj.insert("base_dtype".into(), a.base_dtype.as_str().into());
    let suffix = match a.base_dtype {
        crate::config::BaseDTypeName::Same => "",
        crate::config::BaseDTypeName::Fp8 => "_fp8",
    };
    obj.insert(
        "gradient_checkpointing".into(),
        a.gradient_checkpointing.into(),
    );
    obj.insert("steps".into(), a.steps.into());
    if a.fused != FusedMoeArgs::default() {
        let f = &a.fused;
        let kernels = crate::config::words::Word::spell(&f.moe_kernels);
        obj.insert("moe_kernels".into(), kernels.into());
        obj.insert(
            "moe_chunk_tokens".into(),
            f.moe_chunk_tokens.map(|n| n.get()).into(),
        );
    }
    for r in results {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let v = serde_json::json!({
            "fwd_us_per_token": round(r.fwd_us_per_token),
            "bwd_us_per_token": round(r.bwd_us_per_token),
            "host_us_per_token": round(r.host_us_per_token),
            "tokens_per_s": r.tokens_per_s.round(),
            "peak_gib": r.peak_gib.map(round),
        });
        obj.insert(format!("{}{suffix}", r.variant.key()), v);
    }
    for (v, e) in &t6.failed {
        obj.insert(
            v.key().into(),
            serde_json::json!({ "error": format!("does not fit: {e}") }),
        );
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(obj))
        .map_err(|e| Error::Config(format!("bench table6: {e}")))
}

/// A markdown table of the results.
pub fn table6_markdown(t6: &Table6) -> String {
    let results = &t6.results;
    let mut s = String::from(
        "| | fwd µs/token | bwd µs/token | tokens/s | peak GiB |\n|---|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.0} | {} |\n",
            r.variant.key(),
            r.fwd_us_per_token,
            r.bwd_us_per_token,
            r.tokens_per_s,
            r.peak_gib.map_or("-".into(), |p| format!("{p:.1}"))
        ));
    }
    for (v, _) in &t6.failed {
        s.push_str(&format!("| {} | does not fit | | | |\n", v.key()));
    }
    s
}

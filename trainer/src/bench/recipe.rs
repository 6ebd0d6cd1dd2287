//! `mixlora bench recipe`: training on real data as a user runs it. The steps are those of
//! `mixlora train` itself (the same loop, data order, ragged lengths, padding, optimizer,
//! metrics), on the given task files with the recipe's batch settings (batch 16 in micro-batches
//! of 8, cutoff 512, seed 42 by default), on the model's weights or, with `--shape`, on a random
//! model of that shape (the model then gives only the tokenizer, so the lengths are the real
//! ones; the vocabulary is the tokenizer's).
//!
//! After `warmup` steps, `steps` steps are timed: tokens/s (real, non-padding tokens), the
//! step's wall time, and the host's busy time per step (wall time less the time the host waited
//! for the GPU in synchronisations: every upload, download and explicit wait). On a GPU, `steps`
//! more steps run with every kernel (or graph replay, `--cuda-graphs on`) timed by CUDA events;
//! the GPU busy fraction is their kernel time per token times the timed pass's tokens over its wall time (the events' own cost stays
//! out of the figure). The peak of the engine allocator is read over the timed pass.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use engine::dist::Communicator;
use engine::Device;
use model::{Llama, PeftType};

use super::{device_name, peak_bytes, reset_peak, shape_config, synchronize, BenchShape};
use crate::base_model::{load_base_model, scratch_dir};
use crate::config::{
    words, BaseDTypeName, CudaGraphs, DTypeName, GroupModeChoice, PlannedAdapter, RunPlan,
    SharedSettings, TrainConfig,
};
use crate::error::{Error, Result};
use crate::run::{train_plan_on, RunControl, StepDone};

#[derive(clap::Args, Debug, Clone)]
pub struct RecipeArgs {
    /// The model (GGUF file or Hugging Face folder): its weights, or with --shape only its
    /// tokenizer [default: the built-in tiny model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Task files (LLM-Adapters JSON) whose examples make the batches, in the recipe's order
    /// [default: the embedded synthetic tasks].
    #[arg(long = "data")]
    pub data: Vec<PathBuf>,
    /// A random model of this shape (vocabulary: the tokenizer's) in place of the model's
    /// weights [default: the model's own].
    #[arg(long, value_enum)]
    pub shape: Option<BenchShape>,
    /// `mixlora` or `lora`.
    #[arg(long, default_value = "mixlora", value_parser = words::parse::<PeftType>)]
    pub adapter: PeftType,
    /// LoRA rank (of every expert too).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha [default: twice the rank].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// The base weights' dtype: `bf16` or `f32`.
    #[arg(long, value_enum, default_value_t = DTypeName::Bf16)]
    pub dtype: DTypeName,
    /// How the frozen projection weights are stored, `same` or `fp8` (`mixlora train
    /// --base-dtype`).
    #[arg(long, value_enum, default_value_t = BaseDTypeName::Same)]
    pub base_dtype: BaseDTypeName,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequences per forward/backward.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Tokens per example at most.
    #[arg(long, default_value_t = 512)]
    pub cutoff_len: usize,
    /// Seeds the data order and the adapter.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Untimed steps first (at least 1: the first step compiles the GPU kernels).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed steps (and as many again with the kernels timed, on a GPU).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Also write the result as JSON here [default: none, the summary on stdout only].
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print where the time of `--steps` more steps went, op by op, its N longest rows (stderr):
    /// on a GPU the kernels of the event-timed pass (a replayed graph is one row), on the CPU each
    /// op's wall time in a pass of its own [default: none].
    #[arg(long, value_name = "N")]
    pub profile_rows: Option<usize>,
    /// Record the micro-steps as CUDA graphs (`on`), or run the same fixed-shape steps kernel by
    /// kernel (`eager`), or `auto`, as `mixlora train --cuda-graphs` [default: off].
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = words::parse::<CudaGraphs>)]
    pub cuda_graphs: CudaGraphs,
    /// Pack several examples per row up to the cutoff, as `mixlora train --packing` (`--batch`
    /// and `--micro-batch` then count rows) [default: off].
    #[arg(long)]
    pub packing: bool,
    /// Pack each micro-batch's own examples into rows, as `mixlora train --pack-micro-batches`
    /// (the same examples a step, without the padding between them) [default: off].
    #[arg(long)]
    pub pack_micro_batches: bool,
    /// N adapters of these settings trained together on the one base, seeds `--seed`,
    /// `--seed` + 1, ... (their data orders and initialisations), as `mixlora train --sweep
    /// seed=...` trains them; the figures count every adapter's tokens.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub adapters: usize,
    /// With --adapters: how they share the base, as `mixlora train --group-mode`: `exact`,
    /// `sequential` or `shared` [default: auto, exact].
    #[arg(long, value_name = "MODE", value_parser = words::parse::<GroupModeChoice>)]
    pub group_mode: Option<GroupModeChoice>,
}

/// What the timed steps measured.
#[derive(Clone, Debug, Default)]
pub struct RecipeResult {
    pub steps: usize,
    /// Real tokens of the timed steps.
    pub tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    /// Mean wall time of a step.
    pub step_ms: f64,
    /// The host's busy time per step (wall less its waits for the GPU); the wall time on the CPU.
    pub host_us_per_step: f64,
    /// Fraction of the timed pass's wall time the GPU spent running kernels (`None` on the CPU).
    pub gpu_busy: Option<f64>,
    /// Peak of the engine allocator over the timed pass (`None` where not counted).
    pub peak_gib: Option<f64>,
    /// Driver allocations a timed step (the caching allocator's misses; `None` on the CPU).
    pub driver_allocs_per_step: Option<f64>,
    /// Data-parallel ranks that ran the steps (1: one process); the figures are the whole
    /// run's (the tokens of every rank), the peak rank 0's.
    pub ranks: usize,
    /// How the micro-steps ran (`--cuda-graphs auto` resolved).
    pub cuda_graphs: CudaGraphs,
    /// With `--profile-rows`, the op profile of the profiled pass.
    pub profile: Option<String>,
}

/// Seconds the host has waited for the GPU so far (0 without CUDA).
fn host_wait_s() -> f64 {
    #[cfg(feature = "cuda")]
    return engine::backend::cuda::host_wait_seconds();
    #[cfg(not(feature = "cuda"))]
    0.0
}

/// Driver allocations so far (the CUDA caching allocator's misses; `None` on the CPU).
fn driver_allocs(device: Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if matches!(device, Device::Cuda(_)) {
        return Some(engine::backend::cuda::driver_allocations());
    }
    let _ = device;
    None
}

/// The clock the run's steps drive.
#[derive(Default)]
struct Clock {
    start: Option<(Instant, f64)>,
    tokens: usize,
    timed: Option<RecipeResult>,
    profiled_tokens: usize,
    busy_s: Option<f64>,
    profile: Option<String>,
    /// Driver allocations when the timed steps started.
    allocs0: Option<u64>,
    error: Option<Error>,
}

/// Runs the benchmark; `log` receives the run's lines.
pub fn recipe(a: &RecipeArgs, log: impl FnMut(&str)) -> Result<RecipeResult> {
    recipe_on(a, None, log)
}

/// [`recipe`] as one rank of a data-parallel run over `comm` (every rank calls it with the same
/// arguments, each on its own device; `None`: one process). The steps are `mixlora train`'s data
/// parallel ones: the global batch is `--batch` whatever the number of ranks.
pub fn recipe_on(
    a: &RecipeArgs,
    comm: Option<&dyn Communicator>,
    log: impl FnMut(&str),
) -> Result<RecipeResult> {
    if a.warmup == 0 || a.steps == 0 {
        return Err(Error::Config(
            "bench recipe: --warmup and --steps must be at least 1".into(),
        ));
    }
    if a.adapters == 0 {
        return Err(Error::Config(
            "bench recipe: --adapters must be at least 1".into(),
        ));
    }
    let device = a.device;
    let gpu = matches!(device, Device::Cuda(_));
    // The timed pass, then on a GPU (or for a profile) one whose ops are timed.
    let passes = if gpu || a.profile_rows.is_some() {
        2
    } else {
        1
    };
    let out = scratch_dir("bench-recipe");
    let cfg = TrainConfig {
        model: a.model.clone(),
        data: a.data.clone(),
        adapter: a.adapter,
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f64),
        device,
        dtype: a.dtype,
        base_dtype: a.base_dtype,
        batch_size: a.batch,
        micro_batch_size: a.micro_batch,
        cutoff_len: a.cutoff_len,
        seed: a.seed,
        epochs: 1000, // the steps, not the data, end the run
        max_steps: Some(a.warmup + passes * a.steps),
        save_every: 0,
        eval_every: 0,
        log_every: 1_000_000,
        // The end-of-run evaluation (the synthetic tasks have validation items) is not timed:
        // one item a task keeps it short.
        eval_limit: Some(1),
        out_dir: out.clone(),
        cuda_graphs: a.cuda_graphs,
        packing: a.packing,
        pack_micro_batches: a.pack_micro_batches,
        group_mode: a.group_mode.flatten(),
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let plan = match a.adapters {
        1 => RunPlan::of_one(cfg),
        n => {
            let adapters: Vec<PlannedAdapter> = (0..n as u64)
                .map(|k| {
                    let seed = a.seed + k;
                    PlannedAdapter {
                        name: format!("seed{seed}"),
                        config: TrainConfig {
                            seed,
                            out_dir: out.join(format!("seed{seed}")),
                            ..cfg.clone()
                        },
                    }
                })
                .collect();
            RunPlan {
                shared: SharedSettings::of(&adapters[0].config),
                adapters,
            }
        }
    };
    let (model, tok) = match (a.shape, a.model.as_deref()) {
        // A shape with a model file: the file gives only its tokenizer (its weights are never
        // read, so a file of metadata alone will do).
        (Some(shape), Some(path)) => {
            let (config, _) = model::load(path, a.dtype.dtype(), Device::Cpu)?;
            let tok = model::Tokenizer::load(path, &config)?;
            let mut c = shape_config(shape, None);
            c.vocab_size = tok.vocab_size();
            (Llama::random(c, 1, a.dtype.dtype(), device)?, tok)
        }
        (shape, path) => {
            let scratch = scratch_dir("bench-recipe-model");
            let loaded = load_base_model(path, a.seed, a.dtype.dtype(), device, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            let (mut model, tok) = loaded?;
            if let Some(shape) = shape {
                let mut c = shape_config(shape, None);
                c.vocab_size = tok.vocab_size();
                drop(model);
                model = Llama::random(c, 1, a.dtype.dtype(), device)?;
            }
            (model, tok)
        }
    };
    let clock = RefCell::new(Clock::default());
    let (w, n, rows) = (a.warmup, a.steps, a.profile_rows);
    let on_step = |s: &StepDone| {
        let mut c = clock.borrow_mut();
        if c.error.is_some() {
            return;
        }
        if let Err(e) = tick(&mut c, s, (w, n, rows), device) {
            c.error = Some(e);
        }
    };
    let ctl = RunControl {
        on_step: Some(&on_step),
        comm,
        ..RunControl::default()
    };
    let ran = train_plan_on(&plan, model, tok, ctl, log);
    engine::profile::set_mode(engine::profile::ProfileMode::Off);
    let _ = std::fs::remove_dir_all(&out);
    for o in ran? {
        o.result?;
    }
    let mut c = clock.into_inner();
    if let Some(e) = c.error {
        return Err(e);
    }
    let mut r = c.timed.take().ok_or_else(|| {
        Error::Config("bench recipe: the run ended before its timed steps".into())
    })?;
    if let Some(busy) = c.busy_s.filter(|_| gpu) {
        let per_token = busy / c.profiled_tokens.max(1) as f64;
        r.gpu_busy = Some(per_token * r.tokens as f64 / r.wall_s.max(1e-12));
    }
    r.profile = c.profile.take();
    r.ranks = comm.map_or(1, |c| c.world_size());
    let batched = a.adapters > 1 && a.group_mode.flatten() == Some(model::GroupMode::Shared);
    r.cuda_graphs = a.cuda_graphs.resolve(a.device, batched, comm.is_some());
    Ok(r)
}

/// The clock after step `s.iteration`: starts after the warmup, stops after `n` timed steps,
/// then (on a GPU, or with a profile of `rows` rows) times `n` more steps' ops: on a GPU their
/// kernels with CUDA events, on the CPU each op's wall time.
fn tick(
    c: &mut Clock,
    s: &StepDone,
    (w, n, rows): (usize, usize, Option<usize>),
    device: Device,
) -> Result<()> {
    let it = s.iteration;
    if it == w {
        synchronize(device)?;
        reset_peak(device);
        c.start = Some((Instant::now(), host_wait_s()));
        c.allocs0 = driver_allocs(device);
        return Ok(());
    }
    if it > w && it <= w + n {
        c.tokens += s.real_tokens;
    }
    if it == w + n {
        synchronize(device)?;
        let (t0, wait0) = c.start.expect("started after the warmup");
        let wall_s = t0.elapsed().as_secs_f64();
        let waited = host_wait_s() - wait0;
        c.timed = Some(RecipeResult {
            steps: n,
            tokens: c.tokens,
            wall_s,
            tokens_per_s: c.tokens as f64 / wall_s.max(1e-12),
            step_ms: wall_s * 1e3 / n as f64,
            host_us_per_step: (wall_s - waited) * 1e6 / n as f64,
            gpu_busy: None,
            peak_gib: peak_bytes(device).map(|p| p as f64 / (1u64 << 30) as f64),
            driver_allocs_per_step: driver_allocs(device)
                .zip(c.allocs0)
                .map(|(a, a0)| (a - a0) as f64 / n as f64),
            ranks: 1,
            cuda_graphs: CudaGraphs::Off,
            profile: None,
        });
        let mode = match device {
            Device::Cuda(_) => engine::profile::ProfileMode::GpuEvents,
            Device::Cpu => engine::profile::ProfileMode::Wall,
        };
        if matches!(device, Device::Cuda(_)) || rows.is_some() {
            engine::profile::set_mode(mode);
            let _ = engine::profile::take_busy();
        }
        return Ok(());
    }
    if it > w + n && it <= w + 2 * n {
        c.profiled_tokens += s.real_tokens;
        if it == w + 2 * n {
            synchronize(device)?;
            let (report, busy) = engine::profile::take_report(rows.unwrap_or(0));
            c.busy_s = Some(busy);
            c.profile = rows.map(|_| report);
            engine::profile::set_mode(engine::profile::ProfileMode::Off);
        }
    }
    Ok(())
}

/// The result as JSON (`{"device", "model", "shape", "adapter", "rank", "batch", "micro_batch",
/// "cutoff_len", "steps", "tokens", "tokens_per_s", "step_ms", "host_us_per_step", "gpu_busy",
/// "peak_gib", "driver_allocs_per_step", "gpus", "cuda_graphs", "packing",
/// "pack_micro_batches", "adapters", "group_mode"}`; `gpus`: the data-parallel ranks; `tokens`
/// and `tokens_per_s`: of all adapters).
pub fn recipe_json(a: &RecipeArgs, r: &RecipeResult) -> String {
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    let v = serde_json::json!({
        "device": device_name(a.device),
        "model": a.model.as_ref().and_then(|m| m.file_name()).map(|n| n.to_string_lossy().into_owned()),
        "shape": a.shape.map(BenchShape::key),
        "adapter": a.adapter.name(),
        "rank": a.rank,
        "dtype": format!("{:?}", a.dtype).to_lowercase(),
        "base_dtype": a.base_dtype.as_str(),
        "batch": a.batch,
        "micro_batch": a.micro_batch,
        "cutoff_len": a.cutoff_len,
        "steps": r.steps,
        "tokens": r.tokens,
        "tokens_per_s": round(r.tokens_per_s, 0),
        "step_ms": round(r.step_ms, 2),
        "host_us_per_step": round(r.host_us_per_step, 0),
        "gpu_busy": r.gpu_busy.map(|b| round(b, 3)),
        "peak_gib": r.peak_gib.map(|p| round(p, 3)),
        "driver_allocs_per_step": r.driver_allocs_per_step.map(|a| round(a, 1)),
        "gpus": r.ranks,
        "cuda_graphs": words::Word::spell(&r.cuda_graphs), // what ran (`auto` resolved)
        "packing": a.packing,
        "pack_micro_batches": a.pack_micro_batches,
        "adapters": a.adapters,
        "group_mode": words::Word::spell(&a.group_mode.flatten()),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// One line for a person.
pub fn recipe_summary(r: &RecipeResult) -> String {
    format!(
        "{} steps, {} real tokens: {:.0} tokens/s, {:.1} ms a step, host busy {:.0} us a step, \
         GPU busy {}, peak {}, driver allocations {} a step",
        r.steps,
        r.tokens,
        r.tokens_per_s,
        r.step_ms,
        r.host_us_per_step,
        r.gpu_busy
            .map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
        r.peak_gib.map_or("-".into(), super::memory_text),
        r.driver_allocs_per_step
            .map_or("-".into(), |a| format!("{a:.1}")),
    )
}

//! The training loop: the glue between the model, its adapters and the trainer's building
//! blocks. Evaluation with a model is [`crate::scoring`], the base model [`crate::base_model`].

mod adapter;
mod fixed;
mod micro;
mod parallel;
mod setup;
mod start;
mod step;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use engine::dist::Communicator;
use engine::{Tensor, IGNORE_INDEX};
use model::{Llama, MoeImpl, Tokenizer};

use self::adapter::{AdapterRun, DataCache, StepEnd, StepWork};
use self::fixed::FixedSteps;
use self::parallel::Ranks;
pub use self::parallel::BUCKET_ELEMS;
use self::setup::{all_finished, batched, finished_already, load_base, outcomes, refuse_graphs};
use self::start::start_of;
use self::step::{QueuedStep, Steps};
use crate::config::{CudaGraphs, PlannedAdapter, RunPlan, TrainConfig};
use crate::error::{Error, Result};
use crate::eval::EvalReport;
use crate::metrics::Progress;

/// Synthetic tasks of the embedded default: examples per task.
pub(crate) const SYNTHETIC_TRAIN: usize = 400;
pub(crate) const SYNTHETIC_VALID: usize = 50;
/// Vocabulary rows per chunk of the training loss (`Tensor::linear_cross_entropy_rows`): the
/// largest logits buffer a training step holds is `[tokens, LM_LOSS_CHUNK]`.
pub const LM_LOSS_CHUNK: usize = 8192;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    /// Mean LM loss of the first and the last logged steps.
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval: Option<EvalReport>,
    pub adapter_dir: PathBuf,
}

/// Per-position LM loss `[B·T]` (f32) of final hidden states `[B, T, H]` against `labels`
/// `[B·T]`: the LM head and the cross-entropy over vocabulary chunks, so the `[B·T, V]` logits
/// are never held, only one `[B·T, LM_LOSS_CHUNK]` slice of them at a time.
pub fn lm_loss_rows(model: &Llama, hidden: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let h = hidden.dim(-1)?;
    let rows = hidden.reshape([labels.elem_count(), h])?;
    Ok(rows.linear_cross_entropy_rows(
        model.lm_head_weight(),
        labels,
        IGNORE_INDEX,
        LM_LOSS_CHUNK,
    )?)
}

/// What the run reports to [`RunControl::on_step`] after each of its optimizer steps.
#[derive(Clone, Copy, Debug)]
pub struct StepDone {
    /// Steps of the run done so far (of its longest adapter, in a run of several).
    pub iteration: usize,
    /// Real (non-padding) tokens of the step, over all its adapters.
    pub real_tokens: usize,
}

/// How a run is driven, besides its settings.
#[derive(Clone, Copy, Default)]
pub struct RunControl<'a> {
    /// Return right after this optimizer step (and its checkpoint, if one is due) as if the
    /// process had been killed there: what a resumed run must continue from.
    pub stop_after: Option<usize>,
    /// Set (by a signal handler) to stop the run at the next micro-batch: the step under way is
    /// abandoned, a checkpoint of the last step done is saved, and the run returns
    /// [`Error::Interrupted`] ([`crate::interrupt`]).
    pub interrupt: Option<&'a AtomicBool>,
    /// Called after every optimizer step of the run (a benchmark's clock: `mixlora bench
    /// recipe`).
    pub on_step: Option<&'a dyn Fn(&StepDone)>,
    /// The ranks of a data-parallel run, as seen from this one (`None`: one process runs every
    /// micro-batch; a world of one gives the same bits through the data-parallel path). Every rank runs the same plan; rank 0 alone writes the
    /// files, logs and shows progress ([`parallel`] has the design).
    pub comm: Option<&'a dyn Communicator>,
}

impl std::fmt::Debug for RunControl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunControl")
            .field("stop_after", &self.stop_after)
            .field("interrupt", &self.interrupt)
            .field("on_step", &self.on_step.map(|_| "Fn"))
            .field(
                "comm",
                &self
                    .comm
                    .map(|c| format!("rank {} of {}", c.rank(), c.world_size())),
            )
            .finish()
    }
}

/// The RNG stream of the one dropout seed of fixed-shape steps (`hash(seed, this)`).
const FIXED_DROPOUT_STREAM: u64 = 0x6669_7865_6400; // "fixed"

/// `mixlora train`: fine-tunes an adapter, evaluating and checkpointing as configured.
pub fn train(cfg: &TrainConfig, log: impl FnMut(&str)) -> Result<TrainSummary> {
    train_with(cfg, RunControl::default(), log)
}

/// [`train`], but returning right after optimizer step `stop_after` (and its checkpoint, if one is
/// due) as if the process had been killed there: what a resumed run must continue from.
pub fn train_until(
    cfg: &TrainConfig,
    stop_after: Option<usize>,
    log: impl FnMut(&str),
) -> Result<TrainSummary> {
    let ctl = RunControl {
        stop_after,
        ..RunControl::default()
    };
    train_with(cfg, ctl, log)
}

/// How one adapter of a run ended: its summary, or the error that stopped it (a non-finite loss
/// or gradient) while the others went on.
#[derive(Debug)]
pub struct AdapterOutcome {
    pub name: String,
    pub out_dir: PathBuf,
    pub result: Result<TrainSummary>,
}

/// [`train`] with a [`RunControl`]. Every input is checked before the output folder is written
/// and the first step taken: the folder (another run in it, `--resume`'s checkpoint and
/// settings), the model, the adapter settings, the training data (parsed, non-empty), the
/// evaluation items (scorable), and the folder again (writable, room for a checkpoint).
pub fn train_with(
    cfg: &TrainConfig,
    ctl: RunControl<'_>,
    log: impl FnMut(&str),
) -> Result<TrainSummary> {
    cfg.validate()?;
    let mut outcomes = train_plan(&RunPlan::of_one(cfg.clone()), ctl, log)?;
    outcomes.remove(0).result
}

/// Wraps `e` with the adapter's name in a run of several adapters.
fn of_adapter(grouped: bool, name: &str, e: Error) -> Error {
    if grouped {
        Error::Adapter {
            name: name.to_string(),
            source: Box::new(e),
        }
    } else {
        e
    }
}

/// `mixlora train` of a plan: one base model loaded once, every adapter of the plan trained on
/// it together (each step, one micro-batch of every adapter still training goes through the
/// frozen base in one grouped forward and one backward); each adapter keeps its own run
/// ([`adapter::AdapterRun`]). An adapter whose loss or gradient turns non-finite stops with its
/// last good checkpoint while the others go on; adapters with fewer steps finish first and
/// leave the batch. With `--resume`, an adapter whose run is finished already is left out.
///
/// Returns each adapter's outcome in the plan's order; an error that concerns the whole run
/// (a bad input, an interrupt, a failed write) is the `Err`.
pub fn train_plan(
    plan: &RunPlan,
    ctl: RunControl<'_>,
    log: impl FnMut(&str),
) -> Result<Vec<AdapterOutcome>> {
    train_plan_with_base(plan, None, ctl, log)
}

/// [`train_plan`] on a base model already loaded (`mixlora bench recipe`'s random model of a
/// shape): the plan's `model` setting is not read.
pub fn train_plan_on(
    plan: &RunPlan,
    model: Llama,
    tok: Tokenizer,
    ctl: RunControl<'_>,
    log: impl FnMut(&str),
) -> Result<Vec<AdapterOutcome>> {
    train_plan_with_base(plan, Some((model, tok)), ctl, log)
}

fn train_plan_with_base(
    plan: &RunPlan,
    base: Option<(Llama, Tokenizer)>,
    ctl: RunControl<'_>,
    mut log_all: impl FnMut(&str),
) -> Result<Vec<AdapterOutcome>> {
    let grouped = plan.adapters.len() > 1;
    // Any communicator given, a world of one too, takes the data-parallel path (its exchange
    // of each micro-batch's gradients and their replay in order): a world of one equals no
    // communicator bit for bit, which the tests check on the CPU and, through NCCL, on a GPU.
    let ranks = ctl.comm.map(|comm| Ranks { comm });
    let writer = ranks.is_none_or(|r| r.rank() == 0);
    let mut log = |line: &str| {
        if writer {
            log_all(line)
        }
    };
    fn named(grouped: bool, a: &PlannedAdapter) -> impl Fn(Error) -> Error + '_ {
        move |e| of_adapter(grouped, &a.name, e)
    }
    refuse_graphs(plan, ranks.is_some())?;
    let graphs =
        plan.shared
            .cuda_graphs
            .resolve(plan.shared.device, batched(plan), ranks.is_some());
    // Every adapter's folder first: nothing is loaded for a run that cannot start.
    let starts = plan
        .adapters
        .iter()
        .map(|a| start_of(&a.config).map_err(named(grouped, a)))
        .collect::<Result<Vec<_>>>()?;
    let done: Vec<Option<TrainSummary>> = plan
        .adapters
        .iter()
        .zip(&starts)
        .map(|(a, s)| finished_already(&a.config, s).filter(|_| grouped))
        .collect();
    if grouped && done.iter().all(Option::is_some) {
        return Err(all_finished(plan));
    }
    let first = &plan.adapters[0].config;
    let (mut model, tok) = match base {
        Some(b) => b,
        None => load_base(first, &mut log)?,
    };
    plan.shared.base_dtype.apply(&mut model, &mut log)?;
    model.set_gradient_checkpointing(plan.shared.gradient_checkpointing);
    model.set_group_mode(plan.shared.group_mode); // `auto`: the model's default, exact
    model.set_attention_impl(plan.shared.attention);
    if matches!(first.moe(), MoeImpl::Fused(_)) {
        model.stack_gate_up()?; // G and U in one GEMM
    }
    let mut data = DataCache::default();
    let mut runs = Vec::new();
    for ((a, start), d) in plan.adapters.iter().zip(starts).zip(&done) {
        if let Some(s) = d {
            log(&format!(
                "[{}] finished already (step {}, adapter in {}): left out",
                a.name,
                s.steps,
                s.adapter_dir.display()
            ));
            continue;
        }
        let run = AdapterRun::prepare(
            &a.name, &a.config, start, grouped, &mut model, &tok, &mut data,
        )
        .map_err(named(grouped, a))?;
        let mut run = run;
        run.writer = writer;
        runs.push(run);
    }
    // The output folders last: they take writes and have room for a checkpoint; then the
    // previous runs' files go (--overwrite) and this run's first ones are written.
    for r in runs.iter().filter(|_| writer) {
        r.check_writable()
            .map_err(|e| of_adapter(grouped, &r.name, e))?;
    }
    // Every rank has read the output folders (their checkpoints) before rank 0 writes them.
    if let Some(r) = ranks {
        r.comm.barrier()?;
    }
    for r in &mut runs {
        r.begin(&mut log)?;
    }
    if grouped {
        model.set_adapter_group(runs.iter().map(|r| r.adapters.clone()).collect())?;
    } else {
        model.set_adapters(runs[0].adapters.clone())?;
    }

    if plan.shared.cuda_graphs == CudaGraphs::Auto && graphs == CudaGraphs::On {
        log(
            "recording the training micro-steps as CUDA graphs (--cuda-graphs auto; `off` runs \
             them kernel by kernel)",
        );
    }
    let pad = tok.eos_id().unwrap_or(0);
    let device = model.device();
    // Fixed-shape micro-steps (one process, checked above), one set per adapter: one constant
    // dropout seed each, the per-micro-batch draw of the adapter's RNG becomes its lane's key.
    let mut fixed = match graphs {
        CudaGraphs::Off | CudaGraphs::Auto => Vec::new(),
        _ => (runs.iter().enumerate())
            .map(|(i, r)| {
                let c = &r.cfg;
                let settings = (c.micro_batch_size, c.pack_micro_batches, c.cutoff_len, pad);
                let seed = engine::rng::hash(c.seed, FIXED_DROPOUT_STREAM);
                let member = grouped.then_some(i);
                FixedSteps::new(
                    graphs == CudaGraphs::On,
                    device,
                    r.params(),
                    settings,
                    seed,
                    member,
                )
            })
            .collect::<Result<Vec<_>>>()?,
    };
    if graphs == CudaGraphs::On && model.group_mode() == model::GroupMode::Sequential {
        fixed::share_memory(&mut fixed)?;
    }
    // The bar counts optimizer steps: of the adapter, or of the whole run (its longest adapter).
    let (bar_total, bar_start) = if grouped {
        let left = runs.iter().map(|r| r.total - r.state.step).max();
        (left.unwrap_or(0), 0)
    } else {
        (runs[0].total, runs[0].state.step)
    };
    let progress = if writer {
        Progress::new(bar_total, bar_start)
    } else {
        Progress::quiet(bar_total, bar_start)
    };
    let run_start = Instant::now();
    let interrupted = || {
        ctl.interrupt
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut iteration = 0;
    // The step queued on the device and not yet read back (ended in the next iteration, once
    // that one's work is queued behind it: the host never waits for the device in between).
    let mut queued: Option<QueuedStep> = None;
    let mut ender = StepEnd {
        model: &mut model,
        tok: &tok,
        attached: !grouped,
        progress: &progress,
        run_start,
    };
    loop {
        let active: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].is_training()).collect();
        if active.is_empty() {
            break;
        }
        let boundaries: Vec<_> = active.iter().map(|&i| runs[i].boundary()).collect();
        // An interrupt: the step under way is abandoned (its gradients go, no optimizer has
        // moved), the step queued before it ends, each adapter keeps a checkpoint of its last
        // step done; then the run ends.
        let stop = |runs: &mut Vec<AdapterRun>,
                    queued: Option<QueuedStep>,
                    ender: &mut StepEnd<'_>,
                    log: &mut dyn FnMut(&str)|
         -> Result<Vec<AdapterOutcome>> {
            if let Some(q) = queued {
                ender.end(q, runs, log)?;
            }
            progress.finish();
            let mut kept = Vec::new();
            for (&i, b) in active.iter().zip(&boundaries) {
                runs[i].zero_grad();
                // One that the queued step stopped keeps its last good checkpoint as it is.
                if runs[i].is_training() {
                    kept.extend(runs[i].stop(*b)?);
                }
            }
            let (step, total) = if grouped {
                (iteration, bar_total)
            } else {
                (runs[0].state.step, runs[0].total)
            };
            Err(Error::Interrupted {
                step,
                total,
                checkpoints: kept.iter().map(|d| d.display().to_string()).collect(),
            })
        };
        // Data parallel: the ranks stop together, at a step boundary (one collective a step).
        let stop_now = match ranks {
            Some(r) => r.any(interrupted(), device)?,
            None => interrupted(),
        };
        if stop_now {
            return stop(&mut runs, queued.take(), &mut ender, &mut log);
        }
        let mut work: Vec<StepWork> = active.iter().map(|&i| runs[i].next_step(pad)).collect();
        let steps = Steps {
            model: ender.model,
            grouped,
            ranks,
            interrupted: &interrupted,
        };
        let Some(outs) = steps.run(&mut fixed, &mut runs, &active, &mut work)? else {
            return stop(&mut runs, queued.take(), &mut ender, &mut log);
        };
        let real_tokens = work
            .iter()
            .flat_map(|w| &w.micro)
            .map(|b| b.real_tokens)
            .sum();
        // Each adapter's update, queued behind its micro-batches.
        let clips = (active.iter())
            .map(|&i| runs[i].queue_update())
            .collect::<Result<Vec<_>>>()?;
        iteration += 1;
        let stop_after = ctl.stop_after.is_some_and(|n| {
            (active.iter()).any(|&i| runs[i].state.step + runs[i].queued_steps() == n)
        });
        // Ends now (not in the next iteration) a step whose parameters an evaluation or a
        // checkpoint reads, the last one, and every step of the ranks (which read theirs).
        let end_now =
            stop_after || ranks.is_some() || active.iter().any(|&i| runs[i].ends_before_next());
        let step = QueuedStep {
            active,
            work,
            outs,
            clips,
        };
        if let Some(q) = queued.take() {
            ender.end(q, &mut runs, &mut log)?;
        }
        if end_now {
            ender.end(step, &mut runs, &mut log)?;
        } else {
            queued = Some(step);
        }
        // An adapter done training (finished, or stopped) gives its graphs' memory back to the
        // others, once no queued step has its work.
        let in_queue = queued.as_ref().map_or(&[][..], |q| &q.active[..]);
        for (i, f) in fixed.iter_mut().enumerate() {
            if !runs[i].is_training() && !in_queue.contains(&i) {
                f.release();
            }
        }
        if let Some(f) = ctl.on_step {
            f(&StepDone {
                iteration,
                real_tokens,
            });
        }
        if grouped {
            let n = runs.iter().filter(|r| r.is_training()).count();
            progress.update(iteration, format!("{n} adapters training"));
        }
        if stop_after {
            break;
        }
    }
    if let Some(q) = queued.take() {
        ender.end(q, &mut runs, &mut log)?;
    }
    progress.finish();
    // (Each adapter's dropout key goes back to 0 when its fixed steps are dropped.)
    for (r, f) in runs.iter().zip(&fixed) {
        log(&format!("{}{}", r.tag(), f.summary()));
    }
    if let Some(peak) = crate::bench::peak_bytes(model.device()) {
        log(&format!(
            "peak device memory: {:.2} GiB (the engine allocator, over the whole run)",
            peak as f64 / (1u64 << 30) as f64
        ));
    }
    Ok(outcomes(plan, done, runs))
}

/// Computes the model's MixLoRA FFNs (if any) with `imp`; the fused path also gets W_gate and
/// W_up in one buffer (one GEMM for both).
pub fn use_moe_impl(model: &mut Llama, imp: model::MoeImpl) -> Result<()> {
    model.set_moe_impl(imp);
    if matches!(imp, model::MoeImpl::Fused(_)) {
        model.stack_gate_up()?; // G and U in one GEMM
    }
    Ok(())
}

//! The parts of a plan's run around its steps: the settings refused before anything is read,
//! the base model loaded, the adapters that are finished already, and each adapter's outcome
//! once the steps are over.

use std::time::Instant;

use model::{GroupMode, Llama, Tokenizer};

use super::adapter::{AdapterRun, Status};
use super::start::{is_finished, Start};
use super::{AdapterOutcome, TrainSummary};
use crate::base_model::{load_base_model, scratch_dir};
use crate::config::{words, CudaGraphs, RunPlan, TrainConfig};
use crate::error::{Error, Result};
use crate::metrics::Progress;
use crate::{out_dir, progress};

/// Whether a run's adapters put their micro-batches into one batch through the base (several
/// adapters, `--group-mode shared`), which fixed-shape micro-steps do not do.
pub(super) fn batched(plan: &RunPlan) -> bool {
    plan.adapters.len() > 1 && plan.shared.group_mode == Some(GroupMode::Shared)
}

/// Refuses `--cuda-graphs` where it cannot run: `eager` or `on` with several processes
/// (`multi_process`), with several adapters batched together (`--group-mode shared`) or more of
/// them than a device has lanes, `on` off a CUDA device or in a build without the CUDA backend.
/// (`auto` runs anywhere: [`CudaGraphs::resolve`].)
pub(super) fn refuse_graphs(plan: &RunPlan, multi_process: bool) -> Result<()> {
    let graphs = plan.shared.cuda_graphs;
    if !matches!(graphs, CudaGraphs::Eager | CudaGraphs::On) {
        return Ok(());
    }
    let flag = format!("--cuda-graphs {}", words::Word::spell(&graphs));
    if multi_process {
        return Err(Error::Config(format!(
            "{flag} runs in one process; this run has several"
        )));
    }
    if batched(plan) {
        return Err(Error::Config(format!(
            "{flag} runs each adapter's micro-steps on its own, --group-mode shared puts the \
             adapters' micro-batches into one batch: choose one of the two"
        )));
    }
    if plan.adapters.len() > engine::LANES {
        return Err(Error::Config(format!(
            "{flag} runs at most {} adapters together; this run has {}",
            engine::LANES,
            plan.adapters.len()
        )));
    }
    if graphs == CudaGraphs::On && !matches!(plan.shared.device, engine::Device::Cuda(_)) {
        return Err(Error::Config(format!(
            "--cuda-graphs on records CUDA graphs, which needs --device cuda (the device is {}); \
             `eager` runs the same fixed-shape steps on any device",
            plan.shared.device
        )));
    }
    if graphs == CudaGraphs::On && !cfg!(feature = "cuda") {
        return Err(Error::Config(
            "--cuda-graphs on needs a build with the CUDA backend (--features cuda)".into(),
        ));
    }
    Ok(())
}

/// Whether the run of `start` is finished already: its last step done and its adapter written.
pub(super) fn finished_already(cfg: &TrainConfig, start: &Start) -> Option<TrainSummary> {
    match start {
        Start::Resume { state, .. } if is_finished(cfg, state, state.total_steps) => {
            Some(TrainSummary {
                steps: state.step,
                first_loss: f64::NAN,
                last_loss: state.last_loss.unwrap_or(f64::NAN),
                eval: state
                    .last_eval
                    .as_ref()
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
                adapter_dir: cfg.out_dir.join(out_dir::ADAPTER_DIR),
            })
        }
        _ => None,
    }
}

/// The error of a resumed run of several adapters that are all finished already.
pub(super) fn all_finished(plan: &RunPlan) -> Error {
    Error::Resume(format!(
        "every adapter of the run is finished ({}): nothing to continue",
        plan.adapters
            .iter()
            .map(|a| a
                .config
                .out_dir
                .join(out_dir::ADAPTER_DIR)
                .display()
                .to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The base model and tokenizer of `cfg` (its model file, or the embedded default), loaded on
/// its device in its dtype, with the time it took logged.
pub(super) fn load_base(
    cfg: &TrainConfig,
    log: &mut impl FnMut(&str),
) -> Result<(Llama, Tokenizer)> {
    if let Some(p) = &cfg.model {
        log(&format!("loading {}", p.display()));
    }
    let t_load = Instant::now();
    let scratch = scratch_dir("train");
    let loaded = load_base_model(
        cfg.model.as_deref(),
        cfg.seed,
        cfg.dtype.dtype(),
        cfg.device,
        &scratch,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let loaded = loaded?;
    if let Some(p) = &cfg.model {
        log(&format!(
            "loaded {} in {}",
            p.display(),
            progress::duration(t_load.elapsed())
        ));
    }
    Ok(loaded)
}

/// In a run of several adapters: says that `r` stopped or finished at the step just ended.
pub(super) fn announce_end(r: &AdapterRun, progress: &Progress) {
    match &r.status {
        Status::Failed(e) => progress.println(&format!(
            "[{}] stopped: {e}; the other adapters go on",
            r.name
        )),
        Status::Finished(s) => progress.println(&format!(
            "[{}] finished: {} steps, loss {:.4} -> {:.4}, adapter in {}",
            r.name,
            s.steps,
            s.first_loss,
            s.last_loss,
            s.adapter_dir.display()
        )),
        Status::Training => {}
    }
}

/// Each adapter's outcome in the plan's order: the summary of one finished already (`done`),
/// else of its run (`runs` holds the others, in order).
pub(super) fn outcomes(
    plan: &RunPlan,
    mut done: Vec<Option<TrainSummary>>,
    runs: Vec<AdapterRun>,
) -> Vec<AdapterOutcome> {
    let mut runs = runs.into_iter();
    plan.adapters
        .iter()
        .zip(done.iter_mut())
        .map(|(a, d)| {
            let result = match d.take() {
                Some(s) => Ok(s),
                None => {
                    let r = runs.next().expect("a run per adapter not finished already");
                    match r.status {
                        Status::Training => Ok(r.summary()),
                        Status::Finished(s) => Ok(s),
                        Status::Failed(e) => Err(e),
                    }
                }
            };
            AdapterOutcome {
                name: a.name.clone(),
                out_dir: a.config.out_dir.clone(),
                result,
            }
        })
        .collect()
}

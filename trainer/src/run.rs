//! The training loop: the glue between the model, its adapters and the trainer's building
//! blocks. Evaluation with a model is [`crate::scoring`], the base model [`crate::base_model`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use engine::rng::Rng;
use engine::{DType, Tensor, IGNORE_INDEX};
use model::adapters::AdapterConfig;
use model::{Llama, Tokenizer};

use crate::base_model::{adapter_config, load_base_model, scratch_dir, BaseModel};
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{self, Dataset, HostBatch, Loader, Task};
use crate::error::{Error, Result};
use crate::eval::{self, EvalReport};
use crate::metrics::{expert_load_host, EvalMetrics, MetricsWriter, Progress, Record, StepMetrics};
use crate::optim::{clip_grad_norm, AdamW};
use crate::progress::{self, Reporter};
use crate::schedule::Schedule;
use crate::scoring::evaluate;
use crate::{out_dir, resume, synthetic};

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

/// Training and evaluation tasks: the given files, or the synthetic tasks.
fn tasks(cfg: &TrainConfig) -> Result<(Vec<Task>, Vec<Task>)> {
    if cfg.data.is_empty() {
        return Ok(synthetic::generate(
            cfg.seed,
            SYNTHETIC_TRAIN,
            SYNTHETIC_VALID,
        ));
    }
    let train = data::load_tasks(&cfg.data)?;
    if cfg.val_set_size > 0 {
        return data::split_validation(train, cfg.val_set_size, cfg.seed);
    }
    let valid = if cfg.eval_data.is_empty() {
        Vec::new()
    } else {
        data::load_tasks(&cfg.eval_data)?
    };
    Ok((train, valid))
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

/// One micro-batch forward and backward; returns (summed LM loss over its targets, aux loss).
fn micro_step(
    model: &Llama,
    hb: &HostBatch,
    n_targets: f64,
    n_micro: f64,
    seed: u64,
) -> Result<(f64, Option<f64>, Vec<Tensor>)> {
    let (ids, mask, labels) = hb.to_tensors(model.device())?;
    let out = model.forward_train_hidden(&ids, Some(&mask), Some(seed))?;
    let lm_sum = lm_loss_rows(model, &out.hidden, &labels)?.sum_all()?;
    // The step's loss is the mean over all its target tokens, so accumulated micro-batches add
    // up to one large batch; the aux loss (already times its coefficient) is averaged.
    let mut loss = lm_sum.to_dtype(DType::F32)?.mul_scalar(1.0 / n_targets)?;
    let mut aux = None;
    if let Some(a) = &out.aux_loss {
        aux = Some(a.to_scalar()?);
        loss = loss.add(&a.to_dtype(DType::F32)?.mul_scalar(1.0 / n_micro)?)?;
    }
    let lm = lm_sum.to_scalar()?;
    loss.backward()?;
    Ok((lm, aux, out.expert_load))
}

/// How a run is driven, besides its settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunControl<'a> {
    /// Return right after this optimizer step (and its checkpoint, if one is due) as if the
    /// process had been killed there: what a resumed run must continue from.
    pub stop_after: Option<usize>,
    /// Set (by a signal handler) to stop the run at the next micro-batch: the step under way is
    /// abandoned, a checkpoint of the last step done is saved, and the run returns
    /// [`Error::Interrupted`] ([`crate::interrupt`]).
    pub interrupt: Option<&'a AtomicBool>,
}

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

/// How a run starts in its output folder.
enum Start {
    /// An empty or new folder.
    Fresh,
    /// `--overwrite`: these entries of the previous run go before the first write.
    Replace(Vec<String>),
    /// `--resume` from this checkpoint, of the run whose settings `settings` records.
    Resume {
        dir: PathBuf,
        state: TrainerState,
        settings: PathBuf,
    },
}

/// What the output folder holds decides how the run starts: a folder with another run is
/// refused unless `--resume` (whose checkpoint must exist and whose recorded settings must be
/// this run's) or `--overwrite`. Reads the folder, writes nothing.
fn start_of(cfg: &TrainConfig) -> Result<Start> {
    let out = &cfg.out_dir;
    let entries = out_dir::run_entries(out)?;
    if cfg.resume {
        let Some((dir, state)) = checkpoint::latest(out)? else {
            let what = if entries.is_empty() {
                "run without --resume to start a new run"
            } else {
                "its run stopped before its first checkpoint: start it afresh with --overwrite"
            };
            return Err(Error::Resume(format!(
                "{} has no checkpoint to continue from: {what}",
                out.display()
            )));
        };
        let (settings, recorded) = resume::recorded_settings(&dir, out)?;
        resume::check_settings(cfg, &recorded, &settings)?;
        return Ok(Start::Resume {
            dir,
            state,
            settings,
        });
    }
    match (entries.is_empty(), cfg.overwrite) {
        (true, _) => Ok(Start::Fresh),
        (false, true) => Ok(Start::Replace(entries)),
        (false, false) => Err(out_dir::in_use(out, &entries)),
    }
}

/// Checks that every evaluation item can be scored (candidates, the answer among them, the
/// texts tokenised), with the functions the evaluation itself uses: a bad evaluation file is
/// refused before the first step, not after the last.
fn check_eval_items(cfg: &TrainConfig, tasks: &[Task], tok: &Tokenizer) -> Result<()> {
    for task in tasks {
        let questions = eval::questions(task, cfg.eval_limit).map_err(|e| match e {
            Error::Unscorable { file, item, reason } if cfg.val_set_size > 0 => Error::Unscorable {
                file,
                item,
                reason: format!(
                    "{reason} (an example held out by val_set_size: items are counted \
                         among the held-out ones)"
                ),
            },
            other => other,
        })?;
        for q in &questions {
            eval::encode_question(tok, q, cfg.cutoff_len)?;
        }
    }
    Ok(())
}

/// Checks that checkpoint `dir` (state `s`) is one this run can continue: not finished, with
/// as many steps in all and the same tokenised training data.
fn check_resumable(
    cfg: &TrainConfig,
    dir: &Path,
    s: &TrainerState,
    total: usize,
    ds: &Dataset,
) -> Result<()> {
    let adapter = cfg.out_dir.join(out_dir::ADAPTER_DIR);
    if s.step >= total && adapter.is_dir() {
        return Err(Error::Resume(format!(
            "the run in {} is finished (step {} of {total}, adapter in {}): nothing to continue",
            cfg.out_dir.display(),
            s.step,
            adapter.display()
        )));
    }
    if s.total_steps != total {
        return Err(Error::Resume(format!(
            "{}: the run has {} steps in all but these settings and data give {total} (a data \
             file changed?)",
            dir.display(),
            s.total_steps
        )));
    }
    if let Some(was) = s.data_fingerprint.as_deref() {
        let now = ds.fingerprint();
        if was != now {
            return Err(Error::Resume(format!(
                "{}: the training data differs from the run's (tokenised examples hashed {now}, \
                 the run's {was}): a data file changed?",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Where the data stream, the epoch and the host RNG stand after a step: what a checkpoint of
/// that step records.
#[derive(Clone, Copy)]
struct StepBoundary {
    cursor: data::Cursor,
    epoch: f64,
    rng: (u64, u64),
}

/// [`train`] with a [`RunControl`]. Every input is checked before the output folder is written
/// and the first step taken: the folder (another run in it, `--resume`'s checkpoint and
/// settings), the model, the adapter settings, the training data (parsed, non-empty), the
/// evaluation items (scorable), and the folder again (writable, room for a checkpoint).
pub fn train_with(
    cfg: &TrainConfig,
    ctl: RunControl<'_>,
    mut log: impl FnMut(&str),
) -> Result<TrainSummary> {
    let device = cfg.device;
    let out = &cfg.out_dir;
    cfg.validate()?;
    let start = start_of(cfg)?;
    let scratch = scratch_dir("train");
    let t_load = Instant::now();
    if let Some(p) = &cfg.model {
        log(&format!("loading {}", p.display()));
    }
    let loaded = load_base_model(
        cfg.model.as_deref(),
        cfg.seed,
        cfg.dtype.dtype(),
        device,
        &scratch,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let (mut model, tok) = loaded?;
    if let Some(p) = &cfg.model {
        log(&format!(
            "loaded {} in {}",
            p.display(),
            progress::duration(t_load.elapsed())
        ));
    }
    let acfg = adapter_config(cfg, &BaseModel::new(cfg.model.as_deref(), cfg.seed));
    model.add_adapters(&acfg, cfg.seed)?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    use_moe_impl(&mut model, cfg.moe())?;
    let (train_tasks, eval_tasks) = tasks(cfg)?;
    let n_examples = train_tasks.iter().map(|t| t.examples.len()).sum();
    let ds = Dataset::encode_with_progress(
        &train_tasks,
        &tok,
        cfg.cutoff_len,
        &Reporter::stderr("tokenising", n_examples, "examples"),
    )?;
    if ds.is_empty() {
        return Err(Error::Config(
            "the training data has no usable example".into(),
        ));
    }
    check_eval_items(cfg, &eval_tasks, &tok)?;
    let mut loader = Loader::new(ds.len(), cfg.micro_batch_size, cfg.grad_accum(), cfg.seed)?;
    let total = cfg.total_steps(loader.steps_per_epoch());
    let sched = Schedule::new(cfg.schedule, cfg.lr, cfg.warmup(), total)?;
    let mut state = TrainerState {
        total_steps: total,
        rng: Rng::new(cfg.seed).state(),
        data_fingerprint: Some(ds.fingerprint()),
        ..Default::default()
    };
    let metrics_path = out.join(out_dir::METRICS_FILE);
    let resumed = match &start {
        Start::Resume {
            dir,
            state: s,
            settings,
        } => {
            check_resumable(cfg, dir, s, total, &ds)?;
            let file = dir.join(model::adapters::CONFIG_FILE);
            let found = AdapterConfig::from_json_file(&file)?;
            resume::check_adapter_config(&file, &found, &acfg, settings)?;
            // Load the adapter before the optimizer takes hold of the parameter tensors.
            model::adapters::load(dir, &mut model)?;
            loader.restore(s.cursor)?;
            state = TrainerState {
                data_fingerprint: state.data_fingerprint,
                ..s.clone()
            };
            Some(dir.clone())
        }
        _ => None,
    };
    let mut opt = AdamW::new(model.trainable_params(), cfg.adamw())?;
    if let Some(dir) = &resumed {
        opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
    }
    let n_params: usize = opt.params().iter().map(|p| p.elem_count()).sum();

    // The output folder last: it takes writes and has room for a checkpoint; then the previous
    // run's files go (--overwrite) and this run's first ones are written.
    out_dir::check_writable(out, out_dir::bytes_needed(n_params))?;
    if let Start::Replace(entries) = &start {
        out_dir::remove_run(out, entries)?;
        log(&format!(
            "--overwrite: removed the previous run's {} from {}",
            out_dir::name_list(entries),
            out.display()
        ));
    }
    if let Some(dir) = &resumed {
        log(&format!(
            "resumed from {} (step {})",
            dir.display(),
            state.step
        ));
    }
    let settings = cfg.recorded().to_toml_string()?;
    checkpoint::write_synced(&out.join(out_dir::SETTINGS_FILE), settings.as_bytes())?;
    let mut metrics = if resumed.is_some() {
        MetricsWriter::resume(&metrics_path, state.step)?
    } else {
        MetricsWriter::create(&metrics_path)?
    };
    log(&format!(
        "{} examples in {} tasks, {} steps of {} sequences, {} trainable parameters",
        ds.len(),
        train_tasks.len(),
        total,
        cfg.batch_size,
        n_params
    ));

    let mut rng = Rng::from_state(state.rng);
    let pad = tok.eos_id().unwrap_or(0);
    let progress = Progress::new(total, state.step);
    let run_start = Instant::now();
    let (mut first_loss, mut last_loss) = (None, state.last_loss.unwrap_or(f64::NAN));
    let mut last_eval = None;
    let mut saved_step = resumed.as_ref().map(|_| state.step);
    let save = |st: &TrainerState, opt: &AdamW, model: &Llama| {
        checkpoint::save(
            out,
            st,
            &settings,
            opt,
            |d| model::adapters::save(d, model),
            cfg.save_total_limit,
        )
    };
    let interrupted = || {
        ctl.interrupt
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    };
    // An interrupt: a checkpoint of the last step done (where the stream, epoch and RNG stood
    // after it), unless one exists; then the run ends.
    let stop = |state: &mut TrainerState,
                at: StepBoundary,
                saved_step: Option<usize>,
                opt: &AdamW,
                model: &Llama| {
        progress.finish();
        let mut kept = None;
        if state.step > 0 && saved_step != Some(state.step) {
            state.cursor = at.cursor;
            state.epoch = at.epoch;
            state.rng = at.rng;
            kept = Some(save(state, opt, model)?);
        } else if state.step > 0 {
            kept = checkpoint::latest(out)?.map(|(d, _)| d);
        }
        Err(Error::Interrupted {
            step: state.step,
            total,
            checkpoint: kept.map(|d| d.display().to_string()),
        })
    };
    while state.step < total {
        let t0 = Instant::now();
        let boundary = StepBoundary {
            cursor: loader.cursor(),
            epoch: loader.epoch_progress(),
            rng: rng.state(),
        };
        if interrupted() {
            return stop(&mut state, boundary, saved_step, &opt, &model);
        }
        let micro: Vec<HostBatch> = loader
            .next_step()
            .iter()
            .map(|ix| ds.collate(ix, pad))
            .collect();
        let n_targets = micro.iter().map(|b| b.target_tokens).sum::<usize>().max(1) as f64;
        let (mut lm, mut aux, mut load) = (0.0, None::<f64>, Vec::new());
        for hb in &micro {
            if interrupted() {
                // The step is abandoned: its gradients go, the optimizer has not moved.
                opt.zero_grad();
                return stop(&mut state, boundary, saved_step, &opt, &model);
            }
            let (l, a, el) = micro_step(&model, hb, n_targets, micro.len() as f64, rng.next_u64())?;
            lm += l;
            if let Some(a) = a {
                *aux.get_or_insert(0.0) += a / micro.len() as f64;
            }
            load = el;
        }
        let loss = lm / n_targets;
        if !loss.is_finite() || aux.is_some_and(|a| !a.is_finite()) {
            opt.zero_grad();
            let kept = checkpoint::latest(out)?
                .map_or("none yet".to_string(), |(d, _)| d.display().to_string());
            return Err(Error::Config(format!(
                "step {}: the loss is not finite ({loss}); stopped, last good checkpoint: {kept}",
                state.step + 1
            )));
        }
        let (norm, scale) = clip_grad_norm(opt.params(), cfg.max_grad_norm)?;
        let lr = sched.lr(state.step);
        opt.step(lr, scale)?;
        opt.zero_grad();
        state.step += 1;
        let real: usize = micro.iter().map(|b| b.real_tokens).sum();
        state.tokens_seen += real as u64;
        state.last_loss = Some(loss);
        first_loss.get_or_insert(loss);
        last_loss = loss;
        if state.step % cfg.log_every.max(1) == 0 || state.step == total {
            let m = StepMetrics {
                step: state.step,
                epoch: loader.epoch_progress(),
                loss,
                aux_loss: aux,
                lr,
                grad_norm: norm,
                tokens_per_s: real as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: run_start.elapsed().as_secs_f64(),
                expert_load: if load.is_empty() {
                    None
                } else {
                    Some(expert_load_host(&load)?)
                },
            };
            metrics.write(&Record::Train(m.clone()))?;
            progress.update(state.step, m.summary(total));
            if !progress.is_visible() {
                log(&m.summary(total));
            }
        }
        let last = state.step == total;
        if !eval_tasks.is_empty()
            && ((cfg.eval_every > 0 && state.step % cfg.eval_every == 0) || last)
        {
            // The evaluation's own progress replaces the training bar while it runs.
            let report = progress.suspend(|| {
                evaluate(
                    &model,
                    &tok,
                    &eval_tasks,
                    cfg.cutoff_len,
                    cfg.eval_limit,
                    cfg.micro_batch_size * 4,
                )
            })?;
            progress.println(&format!(
                "eval at step {}: {}",
                state.step,
                report.summary()
            ));
            if state.best_metric.is_none_or(|b| report.average > b) {
                state.best_metric = Some(report.average);
                state.best_step = Some(state.step);
            }
            metrics.write(&Record::Eval(EvalMetrics {
                step: state.step,
                epoch: loader.epoch_progress(),
                report: report.clone(),
            }))?;
            state.last_eval = serde_json::to_value(&report).ok();
            last_eval = Some(report);
        }
        if (cfg.save_every > 0 && state.step % cfg.save_every == 0) || last {
            state.cursor = loader.cursor();
            state.epoch = loader.epoch_progress();
            state.rng = rng.state();
            let dir = save(&state, &opt, &model)?;
            saved_step = Some(state.step);
            progress.println(&format!("saved {}", dir.display()));
        }
        if ctl.stop_after == Some(state.step) {
            progress.finish();
            return Ok(TrainSummary {
                steps: state.step,
                first_loss: first_loss.unwrap_or(f64::NAN),
                last_loss,
                eval: last_eval,
                adapter_dir: out.join(out_dir::ADAPTER_DIR),
            });
        }
    }
    progress.finish();
    let adapter_dir = out.join(out_dir::ADAPTER_DIR);
    model::adapters::save(&adapter_dir, &model)?;
    if let Some(r) = &last_eval {
        let path = out.join(out_dir::EVAL_FILE);
        std::fs::write(&path, r.to_json_pretty()).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    }
    Ok(TrainSummary {
        steps: state.step,
        first_loss: first_loss.unwrap_or(last_loss),
        last_loss,
        eval: last_eval,
        adapter_dir,
    })
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

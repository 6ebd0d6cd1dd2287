//! One adapter's own run inside `mixlora train`: its settings, data stream, optimizer, schedule,
//! RNG, metrics, evaluations, checkpoints and final files. A run of several adapters holds one
//! [`AdapterRun`] per adapter; the training loop ([`super::train_plan`]) feeds their micro-batches
//! through the shared base model together and lets each finish its own optimizer step.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use engine::rng::Rng;
use engine::Tensor;
use model::adapters::{AdapterConfig, Adapters};
use model::{Llama, Tokenizer};

use super::start::{check_eval_items, check_resumable, tasks, tasks_key, Start};
use super::TrainSummary;
use crate::base_model::{adapter_config, BaseModel};
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{self, Dataset, HostBatch, Loader, Task};
use crate::error::{Error, Result};
use crate::eval::EvalReport;
use crate::metrics::{expert_load_host, EvalMetrics, MetricsWriter, Progress, Record, StepMetrics};
use crate::optim::{clip_factor, AdamW};
use crate::progress::Reporter;
use crate::schedule::Schedule;
use crate::scoring::evaluate;
use crate::{out_dir, resume};

/// Training tasks and evaluation tasks.
type TrainEval = (Vec<Task>, Vec<Task>);

/// Tasks and tokenised datasets, shared by the adapters whose settings give the same ones (a
/// sweep over learning rates tokenises its data once).
#[derive(Default)]
pub(super) struct DataCache {
    tasks: HashMap<String, Arc<TrainEval>>,
    datasets: HashMap<(String, usize), Arc<Dataset>>,
}

impl DataCache {
    /// The training and evaluation tasks of `cfg`.
    fn tasks(&mut self, cfg: &TrainConfig) -> Result<Arc<TrainEval>> {
        let key = tasks_key(cfg);
        if let Some(t) = self.tasks.get(&key) {
            return Ok(t.clone());
        }
        let t = Arc::new(tasks(cfg)?);
        self.tasks.insert(key, t.clone());
        Ok(t)
    }

    /// The training examples of `cfg` (`train`: its tasks) tokenised and cut at its length.
    fn dataset(
        &mut self,
        cfg: &TrainConfig,
        train: &[Task],
        tok: &Tokenizer,
    ) -> Result<Arc<Dataset>> {
        let key = (tasks_key(cfg), cfg.cutoff_len);
        if let Some(d) = self.datasets.get(&key) {
            return Ok(d.clone());
        }
        let n_examples = train.iter().map(|t| t.examples.len()).sum();
        let ds = Dataset::encode_with_progress(
            train,
            tok,
            cfg.cutoff_len,
            &Reporter::stderr("tokenising", n_examples, "examples"),
        )?;
        if ds.is_empty() {
            return Err(Error::Config(
                "the training data has no usable example".into(),
            ));
        }
        let ds = Arc::new(ds);
        self.datasets.insert(key, ds.clone());
        Ok(ds)
    }
}

/// Where the data stream, the epoch and the host RNG stand after a step: what a checkpoint of
/// that step records.
#[derive(Clone, Copy)]
pub(super) struct StepBoundary {
    cursor: data::Cursor,
    epoch: f64,
    rng: (u64, u64),
}

/// One optimizer step of one adapter under way: its micro-batches and what they gave so far.
pub(super) struct StepWork {
    pub micro: Vec<HostBatch>,
    /// Target tokens of all its micro-batches (at least 1): the LM loss is their mean.
    pub n_targets: f64,
    /// Summed LM loss over the targets of the micro-batches done.
    pub lm: f64,
    /// Mean aux loss (already times its coefficient) over the micro-batches done.
    pub aux: Option<f64>,
    /// Mean router z-loss (already times its coefficient) over the micro-batches done; `None`
    /// without one.
    pub z: Option<f64>,
    /// Per MoE layer, the expert load of the last micro-batch.
    pub load: Vec<Tensor>,
    started: Instant,
    /// Where the epoch stands once the step's examples are drawn (its metrics say so).
    epoch: f64,
}

/// What ending a step needs besides the adapter's own run.
pub(super) struct StepEnd<'a> {
    /// Evaluates the adapter.
    pub model: &'a mut Llama,
    pub tok: &'a Tokenizer,
    /// Whether the adapter is attached to `model` (a run of one adapter) or must be attached
    /// for an evaluation (one of a group).
    pub attached: bool,
    pub progress: &'a Progress,
    pub run_start: Instant,
}

/// Where an adapter's run stands.
pub(super) enum Status {
    /// Steps remain.
    Training,
    /// All steps done: the final adapter is written.
    Finished(TrainSummary),
    /// Stopped by a non-finite loss or gradient; the error says where its last good
    /// checkpoint is.
    Failed(Error),
}

/// One adapter's run.
pub(super) struct AdapterRun {
    pub name: String,
    pub cfg: TrainConfig,
    /// `[name] ` in a run of several adapters (before each of its lines), else empty.
    tag: String,
    /// Its trainable tensors (shared with the optimizer: updates in place reach them).
    pub adapters: Adapters,
    start: Start,
    resumed: Option<PathBuf>,
    ds: Arc<Dataset>,
    tasks: Arc<TrainEval>,
    loader: Loader,
    sched: Schedule,
    pub state: TrainerState,
    pub total: usize,
    opt: AdamW,
    rng: Rng,
    /// The recorded settings (train_config.toml), written in every checkpoint.
    settings: String,
    metrics: Option<MetricsWriter>,
    saved_step: Option<usize>,
    /// The learning rates of the steps whose update is queued on the device but which are not
    /// ended yet ([`AdapterRun::queue_update`], [`AdapterRun::end_step`]), oldest first.
    queued_lrs: VecDeque<f64>,
    first_loss: Option<f64>,
    last_loss: f64,
    last_eval: Option<EvalReport>,
    pub status: Status,
    /// Whether this process writes the run's files (settings, metrics, checkpoints, the final
    /// adapter): always, except on the ranks other than 0 of a data-parallel run.
    pub writer: bool,
}

impl AdapterRun {
    /// Builds the run of adapter `name`: its adapter (fresh, or the checkpoint's with
    /// `--resume`), data, schedule and optimizer, every input checked; writes nothing. `model`
    /// holds no adapter before and after.
    pub fn prepare(
        name: &str,
        cfg: &TrainConfig,
        start: Start,
        tagged: bool,
        model: &mut Llama,
        tok: &Tokenizer,
        data: &mut DataCache,
    ) -> Result<AdapterRun> {
        let acfg = adapter_config(cfg, &BaseModel::new(cfg.model.as_deref(), cfg.seed));
        model.add_adapters_with(&acfg, cfg.seed, cfg.adapter_init())?;
        let tasks = data.tasks(cfg)?;
        let ds = data.dataset(cfg, &tasks.0, tok)?;
        check_eval_items(cfg, &tasks.1, tok)?;
        let (micro, accum) = (cfg.micro_batch_size, cfg.grad_accum());
        let mut loader = if cfg.packing {
            Loader::packed(ds.lengths(), cfg.cutoff_len, micro, accum, cfg.seed)?
        } else {
            Loader::new(ds.len(), micro, accum, cfg.seed)?
        };
        let total = cfg.total_steps(|e| loader.steps_in_epoch(e));
        let sched = Schedule::new(cfg.schedule, cfg.lr, cfg.warmup(), total)?;
        let mut state = TrainerState {
            total_steps: total,
            rng: Rng::new(cfg.seed).state(),
            data_fingerprint: Some(ds.fingerprint()),
            ..Default::default()
        };
        let mut resumed = None;
        if let Start::Resume {
            dir,
            state: s,
            settings,
        } = &start
        {
            check_resumable(cfg, dir, s, total, &ds)?;
            let file = dir.join(model::adapters::CONFIG_FILE);
            let found = AdapterConfig::from_json_file(&file)?;
            resume::check_adapter_config(&file, &found, &acfg, settings)?;
            // Load the adapter before the optimizer takes hold of the parameter tensors.
            model::adapters::load(dir, model)?;
            loader.restore(s.cursor)?;
            state = TrainerState {
                data_fingerprint: state.data_fingerprint,
                ..s.clone()
            };
            resumed = Some(dir.clone());
        }
        let mut adapters = model
            .remove_adapters()
            .expect("the adapter was attached above");
        // A resumed adapter too computes its MoE FFNs as the settings say.
        adapters.moe_impl = cfg.moe();
        adapters.router_z_loss_coef = cfg.router_z_loss;
        let mut opt = AdamW::new(adapters.named_params(), cfg.adamw())?;
        if cfg.router_lr_scale != 1.0
            && opt.scale_lr(cfg.router_lr_scale, model::adapters::is_router_param) == 0
        {
            return Err(Error::Config(format!(
                "router_lr_scale {}: the adapter has no router",
                cfg.router_lr_scale
            )));
        }
        if let Some(dir) = &resumed {
            opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
        }
        Ok(AdapterRun {
            name: name.to_string(),
            cfg: cfg.clone(),
            tag: if tagged {
                format!("[{name}] ")
            } else {
                String::new()
            },
            adapters,
            start,
            resumed,
            ds,
            tasks,
            loader,
            sched,
            rng: Rng::from_state(state.rng),
            last_loss: state.last_loss.unwrap_or(f64::NAN),
            saved_step: None,
            queued_lrs: VecDeque::new(),
            state,
            total,
            opt,
            settings: cfg.recorded().to_toml_string()?,
            metrics: None,
            first_loss: None,
            last_eval: None,
            status: Status::Training,
            writer: true,
        })
    }

    /// `[name] ` in a run of several adapters (before each of its lines), else empty.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The trainable tensors, in the optimizer's order.
    pub fn params(&self) -> &[Tensor] {
        self.opt.params()
    }

    /// Trainable parameters (elements).
    pub fn n_params(&self) -> usize {
        self.opt.params().iter().map(|p| p.elem_count()).sum()
    }

    /// Checks that the output folder takes writes and has room for a checkpoint.
    pub fn check_writable(&self) -> Result<()> {
        out_dir::check_writable(&self.cfg.out_dir, out_dir::bytes_needed(self.n_params()))
    }

    /// The first writes, once every adapter's inputs are checked: the previous run's files go
    /// (`--overwrite`), the settings and the metrics file are written.
    pub fn begin(&mut self, log: &mut dyn FnMut(&str)) -> Result<()> {
        if !self.writer {
            if self.resumed.is_some() {
                self.saved_step = Some(self.state.step);
            }
            return Ok(());
        }
        let out = &self.cfg.out_dir;
        if let Start::Replace(entries) = &self.start {
            out_dir::remove_run(out, entries)?;
            log(&format!(
                "{}--overwrite: removed the previous run's {} from {}",
                self.tag,
                out_dir::name_list(entries),
                out.display()
            ));
        }
        if let Some(dir) = &self.resumed {
            log(&format!(
                "{}resumed from {} (step {})",
                self.tag,
                dir.display(),
                self.state.step
            ));
            self.saved_step = Some(self.state.step);
        }
        checkpoint::write_synced(&out.join(out_dir::SETTINGS_FILE), self.settings.as_bytes())?;
        let metrics_path = out.join(out_dir::METRICS_FILE);
        self.metrics = Some(if self.resumed.is_some() {
            MetricsWriter::resume(&metrics_path, self.state.step)?
        } else {
            MetricsWriter::create(&metrics_path)?
        });
        let rows = if self.cfg.packing {
            format!("packed rows of up to {} tokens", self.cfg.cutoff_len)
        } else if self.cfg.pack_micro_batches {
            format!(
                "sequences (each micro-batch's packed into rows of up to {} tokens)",
                self.cfg.cutoff_len
            )
        } else {
            "sequences".to_string()
        };
        log(&format!(
            "{}{} examples in {} tasks, {} steps of {} {rows}, {} trainable parameters",
            self.tag,
            self.ds.len(),
            self.tasks.0.len(),
            self.total,
            self.cfg.batch_size,
            self.n_params()
        ));
        Ok(())
    }

    pub fn is_training(&self) -> bool {
        matches!(self.status, Status::Training)
    }

    /// Where the stream, epoch and RNG stand now (before the next step).
    pub fn boundary(&self) -> StepBoundary {
        StepBoundary {
            cursor: self.loader.cursor(),
            epoch: self.loader.epoch_progress(),
            rng: self.rng.state(),
        }
    }

    /// The micro-batches of the next step.
    pub fn next_step(&mut self, pad: u32) -> StepWork {
        let started = Instant::now();
        let (pack, row_len) = (self.cfg.pack_micro_batches, self.cfg.cutoff_len);
        let micro: Vec<HostBatch> = self
            .loader
            .next_step()
            .iter()
            .map(|rows| match pack {
                true => self
                    .ds
                    .collate_rows(&self.ds.packed_rows(rows, row_len), pad),
                false => self.ds.collate_rows(rows, pad),
            })
            .collect();
        let n_targets = micro.iter().map(|b| b.target_tokens).sum::<usize>().max(1) as f64;
        StepWork {
            micro,
            n_targets,
            lm: 0.0,
            aux: None,
            z: None,
            load: Vec::new(),
            started,
            epoch: self.loader.epoch_progress(),
        }
    }

    /// Seeds the dropout of the next micro-batch.
    pub fn next_seed(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Drops the gradients of a step that is abandoned.
    pub fn zero_grad(&self) {
        self.opt.zero_grad();
    }

    /// Saves a checkpoint of the step now done (`state` already records it).
    fn save(&mut self) -> Result<PathBuf> {
        let adapters = &self.adapters;
        let dir = checkpoint::save(
            &self.cfg.out_dir,
            &self.state,
            &self.settings,
            &self.opt,
            |d| model::adapters::save_adapters(d, adapters),
            self.cfg.save_total_limit,
        )?;
        self.saved_step = Some(self.state.step);
        Ok(dir)
    }

    /// An interrupt: a checkpoint of the last step done (where the stream, epoch and RNG stood
    /// after it, `at`), unless one exists. Returns the newest checkpoint.
    pub fn stop(&mut self, at: StepBoundary) -> Result<Option<PathBuf>> {
        if !self.writer {
            return Ok(None);
        }
        if self.state.step > 0 && self.saved_step != Some(self.state.step) {
            self.state.cursor = at.cursor;
            self.state.epoch = at.epoch;
            self.state.rng = at.rng;
            return self.save().map(Some);
        }
        if self.state.step > 0 {
            return Ok(checkpoint::latest(&self.cfg.out_dir)?.map(|(d, _)| d));
        }
        Ok(None)
    }

    /// Stops the run at the step under way: its gradients go, its last good checkpoint stays.
    fn fail(&mut self, what: String) -> Result<()> {
        self.opt.zero_grad();
        let kept = checkpoint::latest(&self.cfg.out_dir)?
            .map_or("none yet".to_string(), |(d, _)| d.display().to_string());
        self.status = Status::Failed(Error::Config(format!(
            "step {}: {what}; stopped, last good checkpoint: {kept}",
            self.state.step + 1
        )));
        Ok(())
    }

    /// Queues the update of the step whose micro-batches ran (their gradients are in the
    /// parameters): the gradient norm and clipping factor, and the optimizer step with that
    /// factor, all on the device (skipped there when the norm is not finite), then clears the
    /// gradients. Returns `[norm, factor]`, still on the device: [`AdapterRun::end_step`] gets
    /// the norm once it is read back.
    pub fn queue_update(&mut self) -> Result<Tensor> {
        let params = self.opt.params();
        let device = params.first().map_or(engine::Device::Cpu, Tensor::device);
        let clip = clip_factor(params, self.cfg.max_grad_norm, device)?;
        let lr = self.sched.lr(self.state.step + self.queued_lrs.len());
        self.opt.step_scaled(lr, &clip.narrow(0, 1, 1)?)?;
        self.opt.zero_grad();
        self.queued_lrs.push_back(lr);
        Ok(clip)
    }

    /// Steps whose update is queued but which are not ended yet.
    pub fn queued_steps(&self) -> usize {
        self.queued_lrs.len()
    }

    /// Whether the newest queued step must end before another step is queued: an evaluation, a
    /// checkpoint and the last step read the parameters as that step left them.
    pub fn ends_before_next(&self) -> bool {
        let step = self.state.step + self.queued_lrs.len();
        let cfg = &self.cfg;
        let every = |n: usize| n > 0 && step % n == 0;
        step >= self.total
            || every(cfg.save_every)
            || (!self.tasks.1.is_empty() && every(cfg.eval_every))
    }

    /// Ends the oldest queued step (its micro-batches `w`, read back, and its gradient norm
    /// `norm`): the loss and norm checks, metrics, an evaluation and a checkpoint when due, the
    /// final files after the last step. A run stopped already (an earlier step failed) only
    /// forgets the step.
    pub fn end_step(
        &mut self,
        w: StepWork,
        norm: f64,
        at: &mut StepEnd<'_>,
        log: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let lr = self.queued_lrs.pop_front().unwrap_or(0.0);
        let epoch = w.epoch;
        if !self.is_training() {
            return Ok(());
        }
        let StepEnd {
            model,
            tok,
            attached,
            progress,
            run_start,
        } = at;
        let (attached, run_start) = (*attached, *run_start);
        let cfg = &self.cfg;
        let loss = w.lm / w.n_targets;
        let finite = |x: Option<f64>| x.is_none_or(f64::is_finite);
        if !loss.is_finite() || !finite(w.aux) || !finite(w.z) {
            return self.fail(format!("the loss is not finite ({loss})"));
        }
        // The device skipped the update of a step whose norm is not finite.
        if !norm.is_finite() {
            return self.fail(format!("the gradient norm is not finite ({norm})"));
        }
        let state = &mut self.state;
        state.step += 1;
        let real: usize = w.micro.iter().map(|b| b.real_tokens).sum();
        state.tokens_seen += real as u64;
        state.last_loss = Some(loss);
        self.first_loss.get_or_insert(loss);
        self.last_loss = loss;
        let (step, total) = (state.step, self.total);
        let mut metrics = self.metrics.as_mut();
        if step % cfg.log_every.max(1) == 0 || step == total {
            let m = StepMetrics {
                step,
                epoch,
                loss,
                aux_loss: w.aux,
                z_loss: w.z,
                lr,
                grad_norm: norm,
                tokens_per_s: real as f64 / w.started.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: run_start.elapsed().as_secs_f64(),
                expert_load: if w.load.is_empty() {
                    None
                } else {
                    Some(expert_load_host(&w.load)?)
                },
            };
            if let Some(metrics) = metrics.as_mut() {
                metrics.write(&Record::Train(m.clone()))?;
            }
            let line = format!("{}{}", self.tag, m.summary(total));
            if self.tag.is_empty() {
                progress.update(step, line.clone());
            } else {
                progress.update(progress.position(), line.clone());
            }
            if !progress.is_visible() {
                log(&line);
            }
        }
        let last = step == total;
        let eval_tasks = &self.tasks.1;
        if !eval_tasks.is_empty() && ((cfg.eval_every > 0 && step % cfg.eval_every == 0) || last) {
            if !attached {
                model.set_adapters(self.adapters.clone())?;
            }
            // The evaluation's own progress replaces the training bar while it runs.
            let report = progress.suspend(|| {
                evaluate(
                    model,
                    tok,
                    eval_tasks,
                    cfg.cutoff_len,
                    cfg.eval_limit,
                    cfg.micro_batch_size * 4,
                )
            });
            if !attached {
                model.remove_adapters();
            }
            let report = report?;
            progress.println(&format!(
                "{}eval at step {step}: {}",
                self.tag,
                report.summary()
            ));
            let state = &mut self.state;
            if state.best_metric.is_none_or(|b| report.average > b) {
                state.best_metric = Some(report.average);
                state.best_step = Some(step);
            }
            if let Some(metrics) = metrics.as_mut() {
                metrics.write(&Record::Eval(EvalMetrics {
                    step,
                    epoch,
                    report: report.clone(),
                }))?;
            }
            state.last_eval = serde_json::to_value(&report).ok();
            self.last_eval = Some(report);
        }
        if (cfg.save_every > 0 && step % cfg.save_every == 0) || last {
            self.state.cursor = self.loader.cursor();
            self.state.epoch = self.loader.epoch_progress();
            self.state.rng = self.rng.state();
            if self.writer {
                let dir = self.save()?;
                progress.println(&format!("{}saved {}", self.tag, dir.display()));
            }
        }
        if last {
            self.finish()?;
        }
        Ok(())
    }

    /// After the last step: the final adapter and the last evaluation's report.
    fn finish(&mut self) -> Result<()> {
        if !self.writer {
            self.status = Status::Finished(self.summary());
            return Ok(());
        }
        let out = &self.cfg.out_dir;
        let adapter_dir = out.join(out_dir::ADAPTER_DIR);
        model::adapters::save_adapters(&adapter_dir, &self.adapters)?;
        if let Some(r) = &self.last_eval {
            let path = out.join(out_dir::EVAL_FILE);
            std::fs::write(&path, r.to_json_pretty()).map_err(|e| Error::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        }
        self.status = Status::Finished(self.summary());
        Ok(())
    }

    /// What the run reports now.
    pub fn summary(&self) -> TrainSummary {
        TrainSummary {
            steps: self.state.step,
            first_loss: self.first_loss.unwrap_or(self.last_loss),
            last_loss: self.last_loss,
            eval: self.last_eval.clone(),
            adapter_dir: self.cfg.out_dir.join(out_dir::ADAPTER_DIR),
        }
    }
}

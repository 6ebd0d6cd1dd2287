//! How one adapter's run starts, and the checks made before anything is written: its output
//! folder (fresh, replaced with `--overwrite`, continued with `--resume`), its tasks, its
//! evaluation items, the checkpoint it continues.

use std::path::{Path, PathBuf};

use model::Tokenizer;

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{self, Dataset, Task};
use crate::error::{Error, Result};
use crate::{eval, out_dir, resume, synthetic};

use super::{SYNTHETIC_TRAIN, SYNTHETIC_VALID};

/// How a run starts in its output folder.
pub(super) enum Start {
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
pub(super) fn start_of(cfg: &TrainConfig) -> Result<Start> {
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

/// Training and evaluation tasks: the given files, or the synthetic tasks.
pub(super) fn tasks(cfg: &TrainConfig) -> Result<(Vec<Task>, Vec<Task>)> {
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

/// The settings [`tasks`] depends on: runs with the same key share their tasks.
pub(super) fn tasks_key(cfg: &TrainConfig) -> String {
    let seeded = cfg.data.is_empty() || cfg.val_set_size > 0;
    format!(
        "{:?}|{:?}|{}|{}",
        cfg.data,
        cfg.eval_data,
        cfg.val_set_size,
        if seeded { cfg.seed } else { 0 }
    )
}

/// Checks that every evaluation item can be scored (candidates, the answer among them, the
/// texts tokenised), with the functions the evaluation itself uses: a bad evaluation file is
/// refused before the first step, not after the last.
pub(super) fn check_eval_items(cfg: &TrainConfig, tasks: &[Task], tok: &Tokenizer) -> Result<()> {
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

/// Whether the run of checkpoint state `s` is finished: all `total` steps done and its final
/// adapter written.
pub(super) fn is_finished(cfg: &TrainConfig, s: &TrainerState, total: usize) -> bool {
    s.step >= total && cfg.out_dir.join(out_dir::ADAPTER_DIR).is_dir()
}

/// Checks that checkpoint `dir` (state `s`) is one this run can continue: not finished, with
/// as many steps in all and the same tokenised training data.
pub(super) fn check_resumable(
    cfg: &TrainConfig,
    dir: &Path,
    s: &TrainerState,
    total: usize,
    ds: &Dataset,
) -> Result<()> {
    if is_finished(cfg, s, total) {
        return Err(Error::Resume(format!(
            "the run in {} is finished (step {} of {total}, adapter in {}): nothing to continue",
            cfg.out_dir.display(),
            s.step,
            cfg.out_dir.join(out_dir::ADAPTER_DIR).display()
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

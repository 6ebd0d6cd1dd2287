//! Evaluation with a model: batches of (prompt, candidate) pairs scored by the model, the
//! report per task (with `--routing`, the experts' shares too), and the `mixlora eval` command,
//! with one adapter or several in one pass ([`group`]). What a question is and how its
//! candidates are found is [`crate::eval`].

mod group;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Instant;

use engine::no_grad;
use model::adapters::AdapterConfig;
use model::{Llama, Tokenizer};

use crate::base_model::{adapter_config, builtin_seed, load_base_model, scratch_dir, BaseModel};
use crate::config::EvalArgs;
use crate::data::{self, Task};
use crate::error::{Error, Result};
use crate::eval::{self, EvalReport, ScorePair};
use crate::progress::{self, Reporter};
use crate::run::{SYNTHETIC_TRAIN, SYNTHETIC_VALID};
use crate::{resume, synthetic};

/// Sum of the log-likelihoods of each pair's target tokens, in batches, with the adapters and
/// without dropout.
fn score_pairs(model: &Llama, pad: u32, pairs: &[ScorePair]) -> Result<Vec<f64>> {
    let hb = eval::pairs_batch(pairs, pad);
    let (ids, mask, labels) = hb.to_tensors(model.device())?;
    no_grad(|| {
        let logits = model.forward(&ids, Some(&mask))?;
        Ok(eval::target_log_likelihood(&logits, &labels)?.to_vec_f64()?)
    })
}

/// The reporter of an evaluation of `questions` questions (on stderr).
fn eval_progress(questions: usize) -> Reporter {
    Reporter::stderr("eval", questions, "questions")
}

pub(crate) fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    tasks: &[Task],
    cfg_cutoff: usize,
    limit: Option<usize>,
    batch: usize,
) -> Result<EvalReport> {
    let pad = tok.eos_id().unwrap_or(0);
    let mut score = |pairs: &[ScorePair]| score_pairs(model, pad, pairs);
    eval::evaluate(
        tasks,
        tok,
        cfg_cutoff,
        limit,
        batch,
        &mut score,
        &eval_progress,
    )
}

/// [`score_pairs`] that also adds, per MoE layer, the (token, slot) pairs each expert received
/// over the real tokens of the batch into `counts` (`[layer][expert]`).
fn score_pairs_routed(
    model: &Llama,
    pad: u32,
    pairs: &[ScorePair],
    counts: &mut Vec<Vec<f64>>,
) -> Result<Vec<f64>> {
    let hb = eval::pairs_batch(pairs, pad);
    let (ids, mask, labels) = hb.to_tensors(model.device())?;
    no_grad(|| {
        let (logits, routing) = model.forward_with_routing(&ids, Some(&mask))?;
        for (l, r) in routing.iter().enumerate() {
            let real = model::adapters::router::token_weights(&mask, r.mask.dtype())?; // [N, 1]
            let c = r.mask.mul(&real)?.sum(0, false)?.to_vec_f64()?; // [E]
            if counts.len() <= l {
                counts.push(vec![0.0; c.len()]);
            }
            counts[l].iter_mut().zip(&c).for_each(|(a, b)| *a += b);
        }
        Ok(eval::target_log_likelihood(&logits, &labels)?.to_vec_f64()?)
    })
}

/// `mixlora eval --routing PATH`: the accuracy report, and per task and MoE layer the share of
/// (token, slot) pairs each expert received over the real tokens of every scored candidate,
/// written to `path` as `{"num_experts", "layers", "tasks": {task: [[share; E]; layers]},
/// "counts": {task: [[count; E]; layers]}}`.
fn evaluate_with_routing(
    model: &Llama,
    tok: &Tokenizer,
    tasks: &[Task],
    a: &EvalArgs,
    path: &Path,
) -> Result<EvalReport> {
    if !model.adapter_config().is_some_and(|c| c.is_mixlora()) {
        return Err(Error::Config(format!(
            "{}: --routing needs a MixLoRA adapter (--adapter)",
            path.display()
        )));
    }
    let pad = tok.eos_id().unwrap_or(0);
    let (mut results, mut shares, mut all_counts) =
        (vec![], serde_json::Map::new(), serde_json::Map::new());
    let mut n_experts = 0;
    let mut n_layers = 0;
    let all = eval::all_questions(tasks, a.limit)?;
    let progress = eval_progress(all.iter().map(Vec::len).sum());
    for (task, qs) in tasks.iter().zip(&all) {
        let mut counts: Vec<Vec<f64>> = Vec::new();
        let mut score = |pairs: &[ScorePair]| score_pairs_routed(model, pad, pairs, &mut counts);
        results.push(eval::score_task(
            &task.name,
            qs,
            tok,
            a.cutoff_len,
            a.batch_size,
            &mut score,
            &progress,
        )?);
        n_layers = counts.len();
        n_experts = counts.first().map_or(0, Vec::len);
        let share: Vec<Vec<f64>> = counts
            .iter()
            .map(|c| {
                let total: f64 = c.iter().sum();
                c.iter().map(|x| x / total.max(1.0)).collect()
            })
            .collect();
        shares.insert(task.name.clone(), serde_json::json!(share));
        all_counts.insert(task.name.clone(), serde_json::json!(counts));
    }
    progress.finish();
    let json = serde_json::json!({
        "num_experts": n_experts,
        "layers": n_layers,
        "tasks": shares,
        "counts": all_counts,
    });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    Ok(EvalReport::from_results(results))
}

/// An adapter in a run's output folder (`OUT/adapter`, `OUT/checkpoint-N`) must be the one the
/// run's recorded settings describe: an edited `adapter_config.json` is refused, naming the key.
fn check_adapter_of_run(dir: &Path) -> Result<()> {
    let Some((settings, run)) = resume::run_of_adapter(dir)? else {
        return Ok(());
    };
    let file = dir.join(model::adapters::CONFIG_FILE);
    let found = AdapterConfig::from_json_file(&file)?;
    let base = BaseModel {
        name: found.base_model_name_or_path.clone(),
        path: found.mixlora_base_model_path.clone(),
    };
    let expected = adapter_config(&run, &base);
    resume::check_adapter_config(&file, &found, &expected, &settings)
}

/// What `mixlora eval` reports: the report of the base model or its one adapter, or one report
/// per adapter of `--adapter A --adapter B ...`.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    One(EvalReport),
    /// Each adapter folder as given, with its report, in the order given.
    PerAdapter(Vec<(PathBuf, EvalReport)>),
}

impl Evaluation {
    /// The report's JSON ([`EvalReport::to_json_pretty`]); per adapter, an object keyed by each
    /// folder as given (in that order), each value that adapter's report.
    pub fn to_json_pretty(&self) -> String {
        match self {
            Evaluation::One(r) => r.to_json_pretty(),
            Evaluation::PerAdapter(v) => {
                serde_json::to_string_pretty(&PerAdapterJson(v)).unwrap_or_default()
            }
        }
    }
}

/// Serialises the reports as a JSON object in the order given (`serde_json::Map` would sort
/// the keys).
struct PerAdapterJson<'a>(&'a [(PathBuf, EvalReport)]);

impl serde::Serialize for PerAdapterJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(p, r)| (p.display().to_string(), r)))
    }
}

/// The model `mixlora eval` scores with, its tokenizer and the tasks: the base with its one
/// adapter prepared for inference (merged), or with the adapters of `--adapter A --adapter B ...`
/// attached as a group, unmerged.
pub(crate) struct EvalModel {
    pub model: Llama,
    pub tok: Tokenizer,
    pub tasks: Vec<Task>,
}

impl EvalModel {
    /// The adapters scored per batch: the group's size, else 1 (the model as it is).
    pub fn scorers(&self) -> usize {
        self.model.adapter_group().len().max(1)
    }

    /// The scores of `pairs`, one list per adapter ([`EvalModel::scorers`]).
    pub fn score(&self, pairs: &[ScorePair]) -> Result<Vec<Vec<f64>>> {
        let pad = self.tok.eos_id().unwrap_or(0);
        if self.model.adapter_group().is_empty() {
            Ok(vec![score_pairs(&self.model, pad, pairs)?])
        } else {
            group::score_pairs(&self.model, pad, pairs)
        }
    }
}

/// The tasks, the base model and its adapters of `mixlora eval`: every item of every data file
/// and, with several adapters, every adapter's folder is checked before the base loads.
pub(crate) fn load_eval_model(a: &EvalArgs) -> Result<EvalModel> {
    let device = a.device;
    if a.adapter.len() > 1 {
        group::check_adapters(&a.adapter, a.routing.as_deref())?;
    }
    let seed = builtin_seed(a.adapter.first().map(PathBuf::as_path));
    // Every item of every file is checked before the model is loaded.
    let tasks = if a.data.is_empty() {
        synthetic::generate(seed, SYNTHETIC_TRAIN, SYNTHETIC_VALID).1
    } else {
        data::load_tasks(&a.data)?
    };
    eval::all_questions(&tasks, a.limit)?;
    let t_load = Instant::now();
    let scratch = scratch_dir("eval");
    let loaded = load_base_model(a.model.as_deref(), seed, a.dtype.dtype(), device, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let (mut model, tok) = loaded?;
    a.base_dtype
        .apply(&mut model, &mut |m: &str| eprintln!("{m}"))?;
    let imp = a.moe.inference_moe_impl(device);
    match a.adapter.as_slice() {
        [] => {}
        [dir] => {
            check_adapter_of_run(dir)?;
            model::adapters::load(dir, &mut model)?;
            crate::inference::prepare(&mut model, imp)?;
        }
        dirs => group::attach(&mut model, dirs, imp)?,
    }
    if let Some(p) = &a.model {
        eprintln!(
            "loaded {} in {}",
            p.display(),
            progress::duration(t_load.elapsed())
        );
    }
    Ok(EvalModel { model, tok, tasks })
}

/// `mixlora eval`: accuracy per task of a base model alone, with an adapter, or with each of
/// several adapters (scored together, [`group`]).
pub fn eval(a: &EvalArgs) -> Result<Evaluation> {
    let m = load_eval_model(a)?;
    let mut reports = match &a.routing {
        None => {
            let mut score = |pairs: &[ScorePair]| m.score(pairs);
            let mut scorers = eval::Scorers {
                count: m.scorers(),
                score: &mut score,
            };
            eval::evaluate_each(
                &m.tasks,
                &m.tok,
                a.cutoff_len,
                a.limit,
                a.batch_size,
                &mut scorers,
                &eval_progress,
            )?
        }
        Some(path) => vec![evaluate_with_routing(&m.model, &m.tok, &m.tasks, a, path)?],
    };
    let evaluation = if a.adapter.len() > 1 {
        Evaluation::PerAdapter(a.adapter.iter().cloned().zip(reports).collect())
    } else {
        Evaluation::One(reports.remove(0))
    };
    if let Some(out) = &a.output {
        std::fs::write(out, evaluation.to_json_pretty()).map_err(|e| Error::Io {
            path: out.display().to_string(),
            source: e,
        })?;
    }
    Ok(evaluation)
}

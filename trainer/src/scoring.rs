//! Evaluation with a model: batches of (prompt, candidate) pairs scored by the model, the
//! report per task (with `--routing`, the experts' shares too), and the `mixlora eval` command.
//! What a question is and how its candidates are found is [`crate::eval`].

use std::path::Path;
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

/// `mixlora eval`: accuracy per task of a base model with an optional adapter.
pub fn eval(a: &EvalArgs) -> Result<EvalReport> {
    let device = a.device;
    let seed = builtin_seed(a.adapter.as_deref());
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
    if let Some(dir) = &a.adapter {
        check_adapter_of_run(dir)?;
        model::adapters::load(dir, &mut model)?;
        crate::inference::prepare(&mut model, a.moe.inference_moe_impl(device))?;
    }
    if let Some(p) = &a.model {
        eprintln!(
            "loaded {} in {}",
            p.display(),
            progress::duration(t_load.elapsed())
        );
    }
    let report = match &a.routing {
        None => evaluate(&model, &tok, &tasks, a.cutoff_len, a.limit, a.batch_size),
        Some(path) => evaluate_with_routing(&model, &tok, &tasks, a, path),
    };
    let report = report?;
    if let Some(out) = &a.output {
        std::fs::write(out, report.to_json_pretty()).map_err(|e| Error::Io {
            path: out.display().to_string(),
            source: e,
        })?;
    }
    Ok(report)
}

//! Multiple-choice evaluation (docs/DESIGN.md): every candidate answer of a question is scored and
//! the argmax counts. The candidates come from the task's format ([`candidates`]: the
//! instruction's `Answer format: a/b/c` line, else its `Answer1:` ... choices, else the file's
//! answers); candidate `c`'s target is the example's output with its answer replaced by `c` ("the
//! correct answer is answer2"), followed by EOS as in training. Its score is the sum of the
//! log-probabilities of its target tokens given the prompt, computed by a caller-provided
//! `score_batch` closure (the model), for which [`pairs_batch`] and [`target_log_likelihood`] do
//! the data and maths parts.
//!
//! Every item of every task becomes a question ([`all_questions`]) before the first is scored, so
//! a file that cannot be scored is refused before any work; `mixlora train` does the same before
//! its first step. [`check_file`] runs that check alone on a file.

mod candidates;

use engine::{Tensor, IGNORE_INDEX};
use serde::{Deserialize, Serialize};

pub use candidates::{
    answer_vocabulary, candidate_target, candidates, check_file, check_task, labelled_choices,
    parse_candidates, question, questions, Question, Scorable, CHOICE_LABELS,
    MAX_ANSWER_VOCABULARY,
};

use crate::data::{self, Encoded, HostBatch, PromptTokenizer, Task};
use crate::error::{Error, Result};
use crate::progress::Reporter;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

impl TaskResult {
    pub fn new(task: &str, correct: usize, total: usize) -> TaskResult {
        let accuracy = if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        };
        TaskResult {
            task: task.to_string(),
            correct,
            total,
            accuracy,
        }
    }
}

/// Accuracy per task and their plain average.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub tasks: Vec<TaskResult>,
    pub average: f64,
}

impl EvalReport {
    pub fn from_results(tasks: Vec<TaskResult>) -> EvalReport {
        let average = if tasks.is_empty() {
            0.0
        } else {
            tasks.iter().map(|t| t.accuracy).sum::<f64>() / tasks.len() as f64
        };
        EvalReport { tasks, average }
    }

    /// `boolq 0.6200 (310/500) | arc_e 0.5511 (124/225) | average 0.5856`.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .tasks
            .iter()
            .map(|t| format!("{} {:.4} ({}/{})", t.task, t.accuracy, t.correct, t.total))
            .collect();
        parts.push(format!("average {:.4}", self.average));
        parts.join(" | ")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// `(prompt ids, target ids)` of one candidate.
pub type ScorePair = (Vec<u32>, Vec<u32>);

/// The ids of a question's candidates; the prompt is cut from the left (after BOS) so that prompt
/// and target fit in `cutoff_len` when they can; the prompt keeps at least one token.
pub fn encode_question(
    tok: &dyn PromptTokenizer,
    q: &Question,
    cutoff_len: usize,
) -> Result<Vec<ScorePair>> {
    q.targets
        .iter()
        .map(|t| {
            let (mut p, t) = data::encode_pair(tok, &q.prompt, t)?;
            let keep = cutoff_len.saturating_sub(t.len()).max(1);
            if p.len() > keep {
                let bos = tok
                    .prompt_bos()
                    .filter(|&b| p.first() == Some(&b) && keep > 1);
                let tail = p.split_off(p.len() - (keep - bos.is_some() as usize));
                p = bos.into_iter().chain(tail).collect();
            }
            Ok((p, t))
        })
        .collect()
}

/// The micro-batch that scores `pairs`: right-padded ids and key mask, and next-token labels on
/// the target tokens only (for [`target_log_likelihood`]).
pub fn pairs_batch(pairs: &[ScorePair], pad_id: u32) -> HostBatch {
    let enc: Vec<Encoded> = pairs
        .iter()
        .map(|(p, t)| Encoded::from_pair(p, t, usize::MAX, 0))
        .collect();
    data::collate(&enc.iter().collect::<Vec<_>>(), pad_id)
}

/// `Σ_t log softmax(logits[b, t])[labels[b, t]]` over the positions whose label is not
/// `IGNORE_INDEX`: the log-likelihood of each row's target, `[B]` (f32 for f32/bf16 logits, f64 for
/// f64). `logits` `[B, T, V]`, `labels` u32 `[B·T]` or `[B, T]` as [`pairs_batch`] makes them.
///
/// Computed as `−Σ cross_entropy_rows`, which is `log_softmax` + `gather` fused in one kernel
/// (no `[B, T, V]` intermediate); differentiable.
pub fn target_log_likelihood(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let &[b, t, _] = logits.dims() else {
        return Err(Error::Eval(format!(
            "logits of shape {} are not [B, T, V]",
            logits.shape()
        )));
    };
    if labels.elem_count() != b * t {
        return Err(Error::Eval(format!(
            "{} labels for logits of shape {}",
            labels.elem_count(),
            logits.shape()
        )));
    }
    let nll = logits.cross_entropy_rows(&labels.reshape([b, t])?, IGNORE_INDEX)?; // [B, T]
    Ok(nll.sum(-1, false)?.neg()?)
}

/// Index of the largest score (the first on ties; NaN never wins).
pub fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() && !s.is_nan() {
            best = i;
        }
    }
    best
}

/// The questions of every task (the first `limit` of each), all built before any is scored: an
/// item that cannot be scored is an error before any work.
pub fn all_questions(tasks: &[Task], limit: Option<usize>) -> Result<Vec<Vec<Question>>> {
    tasks.iter().map(|t| questions(t, limit)).collect()
}

/// Scores every candidate of the questions `qs` of task `name`, at most `batch_pairs` candidates
/// per `score_batch` call, and counts the argmax hits; `progress` counts the questions scored.
pub fn score_task(
    name: &str,
    qs: &[Question],
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    batch_pairs: usize,
    score_batch: &mut dyn FnMut(&[ScorePair]) -> Result<Vec<f64>>,
    progress: &Reporter,
) -> Result<TaskResult> {
    let mut one = |pairs: &[ScorePair]| Ok(vec![score_batch(pairs)?]);
    let mut scorers = Scorers {
        count: 1,
        score: &mut one,
    };
    let mut r = score_task_each(
        name,
        qs,
        tok,
        cutoff_len,
        batch_pairs,
        &mut scorers,
        progress,
    )?;
    Ok(r.remove(0))
}

/// Scores batches of pairs for several models at once (the adapters of `mixlora eval --adapter A
/// --adapter B`): each call of `score` returns one list of scores per model, `count` lists.
pub struct Scorers<'a> {
    pub count: usize,
    pub score: &'a mut ScoreEach<'a>,
}

/// What [`Scorers::score`] is.
pub type ScoreEach<'a> = dyn FnMut(&[ScorePair]) -> Result<Vec<Vec<f64>>> + 'a;

/// [`score_task`] for several models at once: each model gets its own result, in their order.
pub fn score_task_each(
    name: &str,
    qs: &[Question],
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    batch_pairs: usize,
    scorers: &mut Scorers,
    progress: &Reporter,
) -> Result<Vec<TaskResult>> {
    progress.set_message(name);
    let mut pairs = Vec::new();
    // ends[i]: the pairs of questions 0..=i.
    let mut ends = Vec::with_capacity(qs.len());
    for q in qs {
        pairs.extend(encode_question(tok, q, cutoff_len)?);
        ends.push(pairs.len());
    }
    let count = scorers.count;
    let mut scores = vec![Vec::with_capacity(pairs.len()); count];
    let mut done = 0;
    for chunk in pairs.chunks(batch_pairs.max(1)) {
        let s = (scorers.score)(chunk)?;
        if s.len() != count || s.iter().any(|m| m.len() != chunk.len()) {
            return Err(Error::Eval(format!(
                "score_batch returned {:?} scores for {} candidates of each of {count} models",
                s.iter().map(Vec::len).collect::<Vec<_>>(),
                chunk.len()
            )));
        }
        scores.iter_mut().zip(s).for_each(|(all, m)| all.extend(m));
        let scored = scores.first().map_or(0, Vec::len);
        let now = ends.partition_point(|&e| e <= scored);
        progress.inc(now - done);
        done = now;
    }
    Ok(scores
        .iter()
        .map(|scores| {
            let mut correct = 0;
            let mut at = 0;
            for q in qs {
                let n = q.candidates.len();
                correct += (argmax(&scores[at..at + n]) == q.gold) as usize;
                at += n;
            }
            TaskResult::new(name, correct, qs.len())
        })
        .collect())
}

/// [`score_task`] for every task (at most `limit` questions each), and the average. Every item is
/// checked first; then `new_progress(questions)` makes the reporter of the scoring.
pub fn evaluate(
    tasks: &[Task],
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    limit: Option<usize>,
    batch_pairs: usize,
    score_batch: &mut dyn FnMut(&[ScorePair]) -> Result<Vec<f64>>,
    new_progress: &dyn Fn(usize) -> Reporter,
) -> Result<EvalReport> {
    let mut one = |pairs: &[ScorePair]| Ok(vec![score_batch(pairs)?]);
    let mut scorers = Scorers {
        count: 1,
        score: &mut one,
    };
    let mut r = evaluate_each(
        tasks,
        tok,
        cutoff_len,
        limit,
        batch_pairs,
        &mut scorers,
        new_progress,
    )?;
    Ok(r.remove(0))
}

/// [`evaluate`] for several models at once, as [`score_task_each`] scores them: one report per
/// model, in their order.
pub fn evaluate_each(
    tasks: &[Task],
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    limit: Option<usize>,
    batch_pairs: usize,
    scorers: &mut Scorers,
    new_progress: &dyn Fn(usize) -> Reporter,
) -> Result<Vec<EvalReport>> {
    let all = all_questions(tasks, limit)?;
    let progress = new_progress(all.iter().map(Vec::len).sum());
    let results = tasks
        .iter()
        .zip(&all)
        .map(|(t, qs)| {
            score_task_each(
                &t.name,
                qs,
                tok,
                cutoff_len,
                batch_pairs,
                scorers,
                &progress,
            )
        })
        .collect::<Result<Vec<_>>>();
    progress.finish();
    let mut per_model = vec![Vec::with_capacity(tasks.len()); scorers.count];
    for task in results? {
        per_model.iter_mut().zip(task).for_each(|(m, r)| m.push(r));
    }
    Ok(per_model
        .into_iter()
        .map(EvalReport::from_results)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::Bytes;
    use crate::data::Example;
    use crate::progress::testing::Shared;
    use engine::{DType, Device};
    use std::path::PathBuf;
    use std::time::Duration;

    /// log p(target | prompt) summed, by hand in f64 from the host logits.
    fn naive(logits: &[f64], labels: &[u32], b: usize, t: usize, v: usize) -> Vec<f64> {
        (0..b)
            .map(|r| {
                (0..t)
                    .filter(|&p| labels[r * t + p] != IGNORE_INDEX)
                    .map(|p| {
                        let row = &logits[(r * t + p) * v..(r * t + p + 1) * v];
                        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                        row[labels[r * t + p] as usize] - lse
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn log_likelihood_on_random_logits() {
        let (v, pad) = (11usize, 0);
        let pairs: Vec<ScorePair> = vec![
            (vec![1, 2, 3], vec![4, 5]),
            (vec![6], vec![7, 8, 9, 10]),
            (vec![2, 2], vec![3]),
        ];
        let hb = pairs_batch(&pairs, pad);
        let (b, t) = (hb.batch, hb.len);
        assert_eq!((b, t, hb.target_tokens), (3, 5, 7));
        for dtype in [DType::F64, DType::F32] {
            let logits = Tensor::randn([b, t, v], 0.0, 3.0, 9, dtype, Device::Cpu).unwrap();
            let (_, _, labels) = hb.to_tensors(Device::Cpu).unwrap();
            let got = target_log_likelihood(&logits, &labels)
                .unwrap()
                .to_vec_f64()
                .unwrap();
            let want = naive(&logits.to_vec_f64().unwrap(), &hb.labels, b, t, v);
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < tol * w.abs().max(1.0),
                    "{dtype}: {got:?} vs {want:?}"
                );
            }
            // The same through log_softmax + gather.
            let lp = logits.log_softmax_last_dim().unwrap();
            let safe: Vec<u32> = hb
                .labels
                .iter()
                .map(|&l| if l == IGNORE_INDEX { 0 } else { l })
                .collect();
            let ids = Tensor::from_vec(safe, [b, t, 1], Device::Cpu).unwrap();
            let picked = lp.gather(&ids, -1).unwrap().to_vec_f64().unwrap();
            for r in 0..b {
                let s: f64 = (0..t)
                    .filter(|&p| hb.labels[r * t + p] != IGNORE_INDEX)
                    .map(|p| picked[r * t + p])
                    .sum();
                assert!((s - got[r]).abs() < tol * s.abs().max(1.0));
            }
        }
        let logits = Tensor::zeros([2, 5, v], DType::F32, Device::Cpu).unwrap();
        let (_, _, labels) = hb.to_tensors(Device::Cpu).unwrap();
        assert!(target_log_likelihood(&logits, &labels).is_err());
    }

    #[test]
    fn argmax_prefers_first_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f64::NAN, -5.0]), 1);
        assert_eq!(argmax(&[-1.0, f64::NAN]), 0);
    }

    #[test]
    fn evaluation_counts_argmax_hits() {
        // An oracle scorer that prefers targets ending in "answer2" or "true" (EOS 257 last).
        let task = Task {
            name: "mix".into(),
            file: PathBuf::from("mix.json"),
            examples: ["true", "false", "answer2", "answer1"]
                .iter()
                .map(|a| Example {
                    instruction: if a.starts_with("answer") {
                        "Q\n\nAnswer format: answer1/answer2"
                    } else {
                        "Q\n\nAnswer format: true/false"
                    }
                    .into(),
                    output: format!("the correct answer is {a}"),
                    answer: a.to_string(),
                    ..Default::default()
                })
                .collect(),
        };
        let mut calls = 0;
        let mut score = |pairs: &[ScorePair]| -> Result<Vec<f64>> {
            calls += 1;
            assert!(pairs.len() <= 3);
            Ok(pairs
                .iter()
                .map(|(p, t)| {
                    assert_eq!(p[0], 256);
                    let text: String = t[..t.len() - 1].iter().map(|&c| c as u8 as char).collect();
                    (text.ends_with("answer2") || text.ends_with("true")) as u8 as f64
                })
                .collect())
        };
        let r = evaluate(&[task], &Bytes, 512, None, 3, &mut score, &|n| {
            assert_eq!(n, 4);
            Reporter::hidden()
        })
        .unwrap();
        assert_eq!(calls, 3); // 8 candidates by 3
        assert_eq!((r.tasks[0].correct, r.tasks[0].total), (2, 4));
        assert_eq!(r.average, 0.5);
        assert!(r.summary().ends_with("average 0.5000"));
    }

    #[test]
    fn evaluation_of_several_models_counts_each_ones_hits() {
        // Three scorers in each call: one prefers `true`, one `false`, one scores all alike.
        let task = tf_task("boolq/valid.json", &["true", "false", "true"]);
        let mut calls = 0;
        let mut score = |pairs: &[ScorePair]| -> Result<Vec<Vec<f64>>> {
            calls += 1;
            let is_true = |(_, t): &ScorePair| {
                t.starts_with(b"the correct answer is true".map(u32::from).as_slice())
            };
            let prefer_true: Vec<f64> = pairs.iter().map(|p| is_true(p) as u8 as f64).collect();
            let prefer_false = prefer_true.iter().map(|s| 1.0 - s).collect();
            Ok(vec![prefer_true, prefer_false, vec![0.0; pairs.len()]])
        };
        let mut three = Scorers {
            count: 3,
            score: &mut score,
        };
        let r = evaluate_each(&[task], &Bytes, 64, None, 4, &mut three, &|n| {
            assert_eq!(n, 3);
            Reporter::hidden()
        })
        .unwrap();
        assert_eq!(calls, 2); // 6 candidates by 4
        let correct: Vec<usize> = r.iter().map(|r| r.tasks[0].correct).collect();
        assert_eq!(correct, [2, 1, 2]); // ties go to `true`
                                        // A scorer that returns the wrong number of lists is an error.
        let mut short = |p: &[ScorePair]| -> Result<Vec<Vec<f64>>> { Ok(vec![vec![0.0; p.len()]]) };
        let task = tf_task("boolq/valid.json", &["true"]);
        let mut two = Scorers {
            count: 2,
            score: &mut short,
        };
        let e = evaluate_each(&[task], &Bytes, 64, None, 4, &mut two, &|_| {
            Reporter::hidden()
        })
        .unwrap_err();
        assert!(e.to_string().contains("of each of 2 models"), "{e}");
    }

    #[test]
    fn long_prompts_are_cut_from_the_left_after_bos() {
        let q = Question {
            prompt: "abcdefghij".into(),
            candidates: vec![],
            targets: vec!["xy".into()],
            gold: 0,
        };
        let pairs = encode_question(&Bytes, &q, 6).unwrap();
        // target "xy" + EOS = 3 tokens, the prompt keeps BOS + its last 2 bytes.
        assert_eq!(
            pairs[0],
            (
                vec![256, b'i' as u32, b'j' as u32],
                vec![b'x' as u32, b'y' as u32, 257]
            )
        );
    }

    fn tf_task(file: &str, answers: &[&str]) -> Task {
        Task {
            name: data::task_name(std::path::Path::new(file)),
            file: PathBuf::from(file),
            examples: answers
                .iter()
                .map(|a| Example {
                    instruction: "Q, true or false?".into(),
                    output: format!("the correct answer is {a}"),
                    answer: a.to_string(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_bad_item_of_any_task_is_refused_before_scoring() {
        let tasks = [
            tf_task("a/valid.json", &["true", "false"]),
            tf_task("b/valid.json", &["true", "false", "perhaps"]),
        ];
        let mut score = |_: &[ScorePair]| -> Result<Vec<f64>> { panic!("scored before the check") };
        let e = evaluate(&tasks, &Bytes, 64, None, 4, &mut score, &|_| {
            panic!("progress before the check")
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "eval: b/valid.json: item 2: answer `perhaps` is not one of true/false"
        );
        // Within the limit, the bad item is not evaluated.
        let mut score = |p: &[ScorePair]| -> Result<Vec<f64>> { Ok(vec![0.0; p.len()]) };
        let r = evaluate(&tasks, &Bytes, 64, Some(2), 4, &mut score, &|n| {
            assert_eq!(n, 4);
            Reporter::hidden()
        })
        .unwrap();
        assert_eq!(r.tasks[1].total, 2);
    }

    #[test]
    fn progress_counts_the_questions_scored() {
        let out = Shared::default();
        let task = tf_task("boolq/valid.json", &["true", "false", "true", "false"]);
        let mut score = |p: &[ScorePair]| -> Result<Vec<f64>> { Ok(vec![0.0; p.len()]) };
        // 8 candidates by 3: after 3, 6 and 8 of them, 1, 3 and 4 questions are done.
        let r = evaluate(&[task], &Bytes, 64, None, 3, &mut score, &|n| {
            Reporter::lines(
                "eval",
                n,
                "questions",
                Duration::ZERO,
                Box::new(out.clone()),
                Box::new(|| Duration::from_secs(2)),
            )
        })
        .unwrap();
        assert_eq!(r.tasks[0].correct, 2); // ties go to `true`
        let lines: Vec<String> = out.text().lines().map(str::to_string).collect();
        assert_eq!(
            lines,
            [
                "eval: 1/4 questions (25%), 0.50 questions/s, ETA 6s [boolq]",
                "eval: 3/4 questions (75%), 1.50 questions/s, ETA 1s [boolq]",
                "eval: 4/4 questions (100%), 2.00 questions/s, ETA 0s [boolq]",
                "eval: 4/4 questions in 2s (2.00 questions/s)",
            ]
        );
    }
}

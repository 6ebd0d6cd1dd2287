//! Multiple-choice evaluation (docs/DESIGN.md): every candidate answer of a question is scored and
//! the argmax counts. The candidates come from the instruction's `Answer format: a/b/c` line;
//! candidate `c`'s target is the example's output with its answer replaced by `c` ("the correct
//! answer is answer2"), followed by EOS as in training. Its score is the sum of the
//! log-probabilities of its target tokens given the prompt, computed by a caller-provided
//! `score_batch` closure (the model), for which [`pairs_batch`] and [`target_log_likelihood`] do
//! the data and maths parts.

use engine::{Tensor, IGNORE_INDEX};
use serde::{Deserialize, Serialize};

use crate::data::{self, Encoded, Example, HostBatch, PromptTokenizer, Task};
use crate::error::{Error, Result};

/// The candidate answers listed in the last `Answer format:` line of an instruction.
pub fn parse_candidates(instruction: &str) -> Option<Vec<String>> {
    let line = instruction
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Answer format:"))?;
    let c: Vec<String> = line
        .split('/')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    (c.len() >= 2).then_some(c)
}

/// `output` with its last occurrence of `answer` replaced by `candidate`.
pub fn candidate_target(output: &str, answer: &str, candidate: &str) -> Option<String> {
    let at = output.rfind(answer)?;
    Some(format!(
        "{}{candidate}{}",
        &output[..at],
        &output[at + answer.len()..]
    ))
}

/// One question, ready to score.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub prompt: String,
    pub candidates: Vec<String>,
    /// The target text of each candidate.
    pub targets: Vec<String>,
    /// Index of the right answer.
    pub gold: usize,
}

/// The question of an example, or why it cannot be one.
pub fn question(ex: &Example) -> std::result::Result<Question, String> {
    let candidates = parse_candidates(&ex.instruction)
        .ok_or("no `Answer format: a/b` line in the instruction")?;
    if ex.answer.is_empty() {
        return Err("field `answer` is empty".into());
    }
    let gold = candidates
        .iter()
        .position(|c| *c == ex.answer)
        .or_else(|| {
            candidates
                .iter()
                .position(|c| c.eq_ignore_ascii_case(&ex.answer))
        })
        .ok_or_else(|| {
            format!(
                "answer `{}` is not one of {}",
                ex.answer,
                candidates.join("/")
            )
        })?;
    let targets = candidates
        .iter()
        .map(|c| candidate_target(&ex.output, &ex.answer, c))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            format!(
                "output `{}` does not contain the answer `{}`",
                ex.output, ex.answer
            )
        })?;
    Ok(Question {
        prompt: data::prompt(&ex.instruction, &ex.input),
        candidates,
        targets,
        gold,
    })
}

/// The questions of a task (at most `limit`); an unusable item is an error naming file and item.
pub fn questions(task: &Task, limit: Option<usize>) -> Result<Vec<Question>> {
    let n = limit.unwrap_or(usize::MAX).min(task.examples.len());
    task.examples[..n]
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            question(ex).map_err(|m| Error::Eval(format!("{}: item {i}: {m}", task.file.display())))
        })
        .collect()
}

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

/// Scores every candidate of every question of `task` (at most `limit` questions), at most
/// `batch_pairs` candidates per `score_batch` call, and counts the argmax hits.
pub fn evaluate_task(
    task: &Task,
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    limit: Option<usize>,
    batch_pairs: usize,
    score_batch: &mut dyn FnMut(&[ScorePair]) -> Result<Vec<f64>>,
) -> Result<TaskResult> {
    let qs = questions(task, limit)?;
    let mut pairs = Vec::new();
    for q in &qs {
        pairs.extend(encode_question(tok, q, cutoff_len)?);
    }
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_pairs.max(1)) {
        let s = score_batch(chunk)?;
        if s.len() != chunk.len() {
            return Err(Error::Eval(format!(
                "score_batch returned {} scores for {} candidates",
                s.len(),
                chunk.len()
            )));
        }
        scores.extend(s);
    }
    let mut correct = 0;
    let mut at = 0;
    for q in &qs {
        let n = q.candidates.len();
        correct += (argmax(&scores[at..at + n]) == q.gold) as usize;
        at += n;
    }
    Ok(TaskResult::new(&task.name, correct, qs.len()))
}

/// [`evaluate_task`] for every task, and the average.
pub fn evaluate(
    tasks: &[Task],
    tok: &dyn PromptTokenizer,
    cutoff_len: usize,
    limit: Option<usize>,
    batch_pairs: usize,
    score_batch: &mut dyn FnMut(&[ScorePair]) -> Result<Vec<f64>>,
) -> Result<EvalReport> {
    let results = tasks
        .iter()
        .map(|t| evaluate_task(t, tok, cutoff_len, limit, batch_pairs, score_batch))
        .collect::<Result<Vec<_>>>()?;
    Ok(EvalReport::from_results(results))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::Bytes;
    use engine::{DType, Device};
    use std::path::PathBuf;

    #[test]
    fn candidates_from_answer_format_lines() {
        assert_eq!(
            parse_candidates("Q?\n\nAnswer format: true/false").unwrap(),
            vec!["true", "false"]
        );
        assert_eq!(
            parse_candidates(
                "Q\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3"
            )
            .unwrap(),
            vec!["answer1", "answer2", "answer3"]
        );
        assert_eq!(parse_candidates("no format here"), None);
        assert_eq!(parse_candidates("Answer format: only"), None);
        assert_eq!(
            candidate_target("the correct answer is answer2", "answer2", "answer4").unwrap(),
            "the correct answer is answer4"
        );
        assert_eq!(
            candidate_target("the correct answer is true", "true", "false").unwrap(),
            "the correct answer is false"
        );
        assert_eq!(candidate_target("x", "true", "false"), None);
    }

    #[test]
    fn bad_items_name_file_and_item() {
        let mk = |instruction: &str, answer: &str| Example {
            instruction: instruction.into(),
            output: format!("the correct answer is {answer}"),
            answer: answer.into(),
            ..Default::default()
        };
        let task = Task {
            name: "t".into(),
            file: PathBuf::from("t/valid.json"),
            examples: vec![
                mk("Q\n\nAnswer format: true/false", "true"),
                mk("Q\n\nAnswer format: true/false", "maybe"),
            ],
        };
        let e = questions(&task, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "eval: t/valid.json: item 1: answer `maybe` is not one of true/false"
        );
        assert_eq!(questions(&task, Some(1)).unwrap()[0].gold, 0);
    }

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
        let r = evaluate(&[task], &Bytes, 512, None, 3, &mut score).unwrap();
        assert_eq!(calls, 3); // 8 candidates by 3
        assert_eq!((r.tasks[0].correct, r.tasks[0].total), (2, 4));
        assert_eq!(r.average, 0.5);
        assert!(r.summary().ends_with("average 0.5000"));
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
}

//! Training data: LLM-Adapters JSON files (a list of `{instruction, input, output, answer}`), the
//! Alpaca prompt, tokenisation with the loss on the answer only; the batches of a seeded multi-task
//! stream with a resumable cursor are in `batch.rs`, packing several examples into one row in
//! `packing.rs`.
//!
//! An example becomes `[BOS] prompt output EOS`, the prompt and the output tokenised separately
//! (so the boundary is exact and evaluation scores the same target tokens), cut to `cutoff_len`.
//! Labels are the token ids on `output EOS` and `IGNORE_INDEX` on the prompt.

use std::path::{Path, PathBuf};

use engine::IGNORE_INDEX;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

mod batch;
mod packing;

pub use batch::{collate, Cursor, Dataset, HostBatch, Loader, Rows};
pub use packing::{collate_packed, pack_rows};

/// One item of an LLM-Adapters file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Example {
    pub instruction: String,
    /// Context for the instruction; often empty.
    pub input: String,
    /// The response: "the correct answer is answer2".
    pub output: String,
    /// The bare answer ("answer2", "true"); needed by evaluation only.
    pub answer: String,
}

/// The examples of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    pub file: PathBuf,
    pub examples: Vec<Example>,
}

/// The task name of a data file: its folder's name for `train.json`, `valid.json`, `test.json`
/// (`commonsense/boolq/train.json` is `boolq`), else the file's stem (`boolq.json` is `boolq`).
pub fn task_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let generic = ["train", "valid", "validation", "val", "dev", "test", "eval"];
    if generic.contains(&stem.to_lowercase().as_str()) {
        if let Some(dir) = path.parent().and_then(Path::file_name) {
            return dir.to_string_lossy().into_owned();
        }
    }
    stem
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parses the text of a data file; `file` names it in errors, which give the item index and field.
pub fn parse_examples(file: &Path, text: &str) -> Result<Vec<Example>> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| Error::data(file, format!("invalid JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(Error::data(
            file,
            format!("expected a JSON list of examples, found {}", kind(&v)),
        ));
    };
    if items.is_empty() {
        return Err(Error::data(file, "no examples (the list is empty)"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(obj) = item else {
                return Err(Error::data(
                    file,
                    format!("item {i}: expected an object, found {}", kind(item)),
                ));
            };
            let field = |name: &str, required: bool| -> Result<String> {
                match obj.get(name) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    None | Some(Value::Null) if !required => Ok(String::new()),
                    None => Err(Error::data(
                        file,
                        format!("item {i}: field `{name}` is missing"),
                    )),
                    Some(other) => Err(Error::data(
                        file,
                        format!(
                            "item {i}: field `{name}`: expected a string, found {}",
                            kind(other)
                        ),
                    )),
                }
            };
            Ok(Example {
                instruction: field("instruction", true)?,
                input: field("input", false)?,
                output: field("output", true)?,
                answer: field("answer", false)?,
            })
        })
        .collect()
}

/// Reads one data file as a task.
pub fn load_task(path: &Path) -> Result<Task> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(Task {
        name: task_name(path),
        file: path.to_path_buf(),
        examples: parse_examples(path, &text)?,
    })
}

/// Reads several data files; two files with the same task name are an error.
pub fn load_tasks(paths: &[PathBuf]) -> Result<Vec<Task>> {
    let mut tasks: Vec<Task> = Vec::new();
    for p in paths {
        let t = load_task(p)?;
        if let Some(o) = tasks.iter().find(|o| o.name == t.name) {
            return Err(Error::data(
                p,
                format!(
                    "task name `{}` is also the name of {}",
                    t.name,
                    o.file.display()
                ),
            ));
        }
        tasks.push(t);
    }
    Ok(tasks)
}

/// Holds out `n` examples, drawn at random (seeded) from all tasks together, as validation tasks
/// of the same names; returns `(train, valid)`. Tasks left without examples are dropped.
pub fn split_validation(tasks: Vec<Task>, n: usize, seed: u64) -> Result<(Vec<Task>, Vec<Task>)> {
    let total: usize = tasks.iter().map(|t| t.examples.len()).sum();
    if n >= total {
        return Err(Error::Config(format!(
            "val_set_size {n} leaves no training examples (there are {total})"
        )));
    }
    let mut refs: Vec<(usize, usize)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| (0..t.examples.len()).map(move |i| (ti, i)))
        .collect();
    engine::rng::Rng::new(seed).shuffle(&mut refs);
    let mut held = vec![vec![false; 0]; tasks.len()];
    for (ti, t) in tasks.iter().enumerate() {
        held[ti] = vec![false; t.examples.len()];
    }
    for &(ti, i) in &refs[..n] {
        held[ti][i] = true;
    }
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (ti, t) in tasks.into_iter().enumerate() {
        let (mut tr, mut va) = (Vec::new(), Vec::new());
        for (i, ex) in t.examples.into_iter().enumerate() {
            if held[ti][i] {
                va.push(ex)
            } else {
                tr.push(ex)
            }
        }
        for (dst, ex) in [(&mut train, tr), (&mut valid, va)] {
            if !ex.is_empty() {
                dst.push(Task {
                    name: t.name.clone(),
                    file: t.file.clone(),
                    examples: ex,
                });
            }
        }
    }
    Ok((train, valid))
}

/// The Alpaca prompt as LLM-Adapters and MoE-PEFT write it (the response follows it directly).
pub fn prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// What data preparation needs of a tokenizer.
pub trait PromptTokenizer {
    /// Token ids of `text`, without special tokens.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>>;
    /// The id that starts every prompt, when the model expects one.
    fn prompt_bos(&self) -> Option<u32>;
    /// The id that ends every target, when the tokenizer has one.
    fn target_eos(&self) -> Option<u32>;
}

impl PromptTokenizer for model::Tokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode(text, false)?)
    }
    fn prompt_bos(&self) -> Option<u32> {
        if self.adds_bos() {
            self.bos_id()
        } else {
            None
        }
    }
    fn target_eos(&self) -> Option<u32> {
        self.eos_id()
    }
}

/// `([BOS] prompt, target EOS)` as token ids.
pub fn encode_pair(
    tok: &dyn PromptTokenizer,
    prompt: &str,
    target: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut p: Vec<u32> = tok.prompt_bos().into_iter().collect();
    p.extend(tok.encode_text(prompt)?);
    let mut t = tok.encode_text(target)?;
    t.extend(tok.target_eos());
    Ok((p, t))
}

/// One tokenised example: `labels[i]` is `ids[i]` where the loss applies, `IGNORE_INDEX` elsewhere
/// (not yet shifted: collation shifts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub labels: Vec<u32>,
    /// Index of the task in the dataset's task list.
    pub task: usize,
}

impl Encoded {
    /// Prompt and target ids joined, the target labelled, cut to `cutoff_len` tokens.
    pub fn from_pair(prompt: &[u32], target: &[u32], cutoff_len: usize, task: usize) -> Encoded {
        let mut ids = [prompt, target].concat();
        let mut labels: Vec<u32> = std::iter::repeat_n(IGNORE_INDEX, prompt.len())
            .chain(target.iter().copied())
            .collect();
        ids.truncate(cutoff_len);
        labels.truncate(cutoff_len);
        Encoded { ids, labels, task }
    }

    /// Tokens that carry a loss.
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Tokenises one example for training.
pub fn encode_example(
    tok: &dyn PromptTokenizer,
    ex: &Example,
    cutoff_len: usize,
    task: usize,
) -> Result<Encoded> {
    let (p, t) = encode_pair(tok, &prompt(&ex.instruction, &ex.input), &ex.output)?;
    Ok(Encoded::from_pair(&p, &t, cutoff_len, task))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One id per byte, BOS 256, EOS 257.
    pub(crate) struct Bytes;

    impl PromptTokenizer for Bytes {
        fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn prompt_bos(&self) -> Option<u32> {
            Some(256)
        }
        fn target_eos(&self) -> Option<u32> {
            Some(257)
        }
    }

    const I: u32 = IGNORE_INDEX;

    fn err(text: &str) -> String {
        parse_examples(Path::new("d/train.json"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_items_with_optional_fields() {
        let ex = parse_examples(
            Path::new("x.json"),
            r#"[{"instruction":"a","input":"","output":"b","answer":"c"},
                {"instruction":"d","output":"e","input":null}]"#,
        )
        .unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(
            ex[1],
            Example {
                instruction: "d".into(),
                output: "e".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn malformed_files_name_file_item_and_field() {
        let e = err(r#"[{"instruction":"a","output":"b"},{"instruction":"a","output":3}]"#);
        assert_eq!(
            e,
            "d/train.json: item 1: field `output`: expected a string, found a number"
        );
        let e = err(
            r#"[{"instruction":"a","output":"b"},{"instruction":"a","output":"b"},{"output":"x"}]"#,
        );
        assert_eq!(e, "d/train.json: item 2: field `instruction` is missing");
        assert_eq!(
            err(r#"[{"instruction":"a","output":"b"}, 7]"#),
            "d/train.json: item 1: expected an object, found a number"
        );
        assert_eq!(
            err(r#"{"instruction":"a"}"#),
            "d/train.json: expected a JSON list of examples, found an object"
        );
        assert_eq!(err("[]"), "d/train.json: no examples (the list is empty)");
        let e = err("[{\"instruction\":\n");
        assert!(
            e.starts_with("d/train.json: invalid JSON: ") && e.contains("line 2"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn missing_file_names_it() {
        let e = load_task(Path::new("/nonexistent/boolq/train.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/boolq/train.json: "), "{e}");
    }

    #[test]
    fn task_names() {
        assert_eq!(
            task_name(Path::new("data/commonsense/boolq/train.json")),
            "boolq"
        );
        assert_eq!(task_name(Path::new("x/valid.json")), "x");
        assert_eq!(task_name(Path::new("x/parity.json")), "parity");
    }

    #[test]
    fn alpaca_prompts() {
        assert_eq!(
            prompt("Say hi.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
        );
        let p = prompt("Add.", "1 2");
        assert!(p.starts_with("Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n"));
        assert!(p.ends_with("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"));
    }

    #[test]
    fn labels_mask_the_prompt_and_end_with_eos() {
        let ex = Example {
            instruction: "q".into(),
            output: "ab".into(),
            ..Default::default()
        };
        let e = encode_example(&Bytes, &ex, 512, 3).unwrap();
        let p = prompt("q", "");
        assert_eq!(e.ids.len(), 1 + p.len() + 2 + 1);
        assert_eq!(e.ids[0], 256);
        assert_eq!(&e.ids[e.ids.len() - 3..], &[97, 98, 257]);
        assert!(e.labels[..1 + p.len()].iter().all(|&l| l == I));
        assert_eq!(&e.labels[1 + p.len()..], &[97, 98, 257]);
        assert_eq!((e.task, e.target_tokens()), (3, 3));
        // Truncation keeps the first cutoff_len tokens.
        let t = encode_example(&Bytes, &ex, p.len() + 2, 0).unwrap();
        assert_eq!(t.ids.len(), p.len() + 2);
        assert_eq!(t.labels.last(), Some(&97));
        assert_eq!(t.target_tokens(), 1);
    }

    #[test]
    fn multi_task_mixing_and_validation_split() {
        let task = |name: &str, n: usize| Task {
            name: name.into(),
            file: PathBuf::from(format!("{name}.json")),
            examples: (0..n)
                .map(|i| Example {
                    instruction: format!("{name}{i}"),
                    output: "o".into(),
                    ..Default::default()
                })
                .collect(),
        };
        let tasks = vec![task("a", 20), task("b", 30)];
        let (train, valid) = split_validation(tasks.clone(), 10, 1).unwrap();
        let count = |ts: &[Task]| ts.iter().map(|t| t.examples.len()).sum::<usize>();
        assert_eq!((count(&train), count(&valid)), (40, 10));
        assert!(valid.iter().all(|v| train
            .iter()
            .find(|t| t.name == v.name)
            .unwrap()
            .examples
            .iter()
            .all(|e| !v.examples.contains(e))));
        assert!(split_validation(tasks.clone(), 50, 1).is_err());
        let ds = Dataset::encode(&tasks, &Bytes, 512).unwrap();
        assert_eq!(ds.task_names, vec!["a", "b"]);
        let mut l = Loader::new(ds.len(), 5, 1, 3).unwrap();
        // The first batches already mix both tasks.
        let first: Vec<usize> = (0..4)
            .flat_map(|_| l.next_step().concat().concat())
            .map(|i| ds.items[i].task)
            .collect();
        assert!(first.contains(&0) && first.contains(&1), "{first:?}");
        let hb = ds.collate(&[0, 25], 0);
        assert_eq!(hb.batch, 2);
    }
}

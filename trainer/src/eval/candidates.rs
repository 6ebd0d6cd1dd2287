//! The candidate answers of a multiple-choice item, from the task's own format (docs/DESIGN.md,
//! "Evaluation"), first found of:
//!
//! 1. the instruction's last `Answer format: a/b/c` line;
//! 2. the choices the instruction labels `Answer1:` ... `AnswerN:` (or `Solution`, `Ending`,
//!    `Option`, `Choice`), numbered from 1 without gaps: `answer1` ... `answerN`;
//! 3. `true`/`false` when the instruction asks for "true or false";
//! 4. the file's answers, when they are a small set of labels (words such as `yes`, `B`,
//!    `option2`; not numbers, not phrases).
//!
//! These cover the LLM-Adapters commonsense tasks with or without their `Answer format:` lines:
//! boolq (true/false), piqa (solution1/2), siqa (answer1..3), hellaswag (ending1..4), winogrande
//! (option1/2), ARC and OpenBookQA (answer1..5 from the `Answer1:` ... labels). Free-form answers
//! (the math tasks' numbers) have no candidates: such a file is refused, naming the item.

use std::path::Path;

use crate::data::{self, Example, Task};
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

/// The words that label the choices of an LLM-Adapters instruction (`Answer1: ...`).
pub const CHOICE_LABELS: [&str; 5] = ["Answer", "Solution", "Ending", "Option", "Choice"];

/// The labels of the choices an instruction lists (`Answer1: x Answer2: y` gives `answer1`,
/// `answer2`): a word of [`CHOICE_LABELS`] (any case) right before a number and a colon, numbered
/// 1, 2, ... N ≥ 2 in order. When several words label such a list, the one whose list ends last.
pub fn labelled_choices(instruction: &str) -> Option<Vec<String>> {
    let bytes = instruction.as_bytes();
    // Per label word: the numbers in order of appearance and where the last one was.
    let mut seen: Vec<(Vec<u64>, usize)> = vec![(Vec::new(), 0); CHOICE_LABELS.len()];
    for at in 0..bytes.len() {
        if at > 0 && bytes[at - 1].is_ascii_alphanumeric() {
            continue;
        }
        for (w, word) in CHOICE_LABELS.iter().enumerate() {
            let end = at + word.len();
            if !bytes
                .get(at..end)
                .is_some_and(|b| b.eq_ignore_ascii_case(word.as_bytes()))
            {
                continue;
            }
            let digits = bytes[end..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if digits == 0 || bytes.get(end + digits) != Some(&b':') {
                continue;
            }
            if let Ok(n) = instruction[end..end + digits].parse() {
                seen[w].0.push(n);
                seen[w].1 = at;
            }
        }
    }
    let (w, (numbers, _)) = seen
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.len() >= 2 && n.iter().zip(1..).all(|(&a, b)| a == b))
        .max_by_key(|(_, (_, last))| *last)?;
    let word = CHOICE_LABELS[w].to_ascii_lowercase();
    Some(numbers.iter().map(|n| format!("{word}{n}")).collect())
}

/// At most this many distinct answers make a file's answers a set of choices (rule 4).
pub const MAX_ANSWER_VOCABULARY: usize = 10;

/// An answer that can be the label of a choice: a word of letters, maybe ending in digits
/// (`true`, `B`, `answer3`), at most 20 characters.
fn is_label(answer: &str) -> bool {
    let letters = answer
        .bytes()
        .take_while(|b| b.is_ascii_alphabetic())
        .count();
    letters > 0 && answer.len() <= 20 && answer.bytes().skip(letters).all(|b| b.is_ascii_digit())
}

/// The distinct answers of a file when they are a small set of labels (rule 4): in the order
/// `true`/`false` and `yes`/`no` for those pairs (either alone gives both), else sorted by
/// letters then number (`answer2` before `answer10`). `None` for free-form answers.
pub fn answer_vocabulary(examples: &[Example]) -> Option<Vec<String>> {
    let mut words: Vec<String> = Vec::new();
    for ex in examples {
        let a = ex.answer.trim();
        if !is_label(a) {
            return None;
        }
        if !words.iter().any(|w| w.eq_ignore_ascii_case(a)) {
            words.push(a.to_string());
            if words.len() > MAX_ANSWER_VOCABULARY {
                return None;
            }
        }
    }
    for pair in [["true", "false"], ["yes", "no"]] {
        if words
            .iter()
            .all(|w| pair.iter().any(|p| p.eq_ignore_ascii_case(w)))
        {
            return Some(pair.map(String::from).to_vec());
        }
    }
    if words.len() < 2 {
        return None;
    }
    let key = |w: &String| {
        let letters = w.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let n: u64 = w[letters..].parse().unwrap_or(0);
        (w[..letters].to_ascii_lowercase(), n)
    };
    words.sort_by_key(key);
    Some(words)
}

/// The candidates of one item by the rules of this module; `vocabulary` is the file's
/// [`answer_vocabulary`].
pub fn candidates(ex: &Example, vocabulary: Option<&[String]>) -> Option<Vec<String>> {
    parse_candidates(&ex.instruction)
        .or_else(|| labelled_choices(&ex.instruction))
        .or_else(|| {
            ex.instruction
                .to_ascii_lowercase()
                .contains("true or false")
                .then(|| vec!["true".to_string(), "false".to_string()])
        })
        .or_else(|| vocabulary.map(<[String]>::to_vec))
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

/// Why an item has no candidates.
const NO_CANDIDATES: &str = "no `Answer format: a/b` line, no `Answer1:`/`Solution1:`/\
    `Ending1:`/`Option1:` choices in the instruction, and the file's answers are not a small set \
    of labels";

/// The question of an example, or why it cannot be one; `vocabulary` is the file's
/// [`answer_vocabulary`].
pub fn question(
    ex: &Example,
    vocabulary: Option<&[String]>,
) -> std::result::Result<Question, String> {
    if ex.answer.is_empty() {
        return Err("field `answer` is empty".into());
    }
    let candidates = candidates(ex, vocabulary).ok_or_else(|| {
        format!(
            "free-form answer `{}`: {NO_CANDIDATES}",
            ex.answer.chars().take(40).collect::<String>()
        )
    })?;
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

/// The questions of a task (its first `limit`); an item that cannot be scored is an
/// [`Error::Unscorable`] naming the file and the item.
pub fn questions(task: &Task, limit: Option<usize>) -> Result<Vec<Question>> {
    let vocabulary = answer_vocabulary(&task.examples);
    let n = limit.unwrap_or(usize::MAX).min(task.examples.len());
    task.examples[..n]
        .iter()
        .enumerate()
        .map(|(item, ex)| {
            question(ex, vocabulary.as_deref()).map_err(|reason| Error::Unscorable {
                file: task.file.display().to_string(),
                item,
                reason,
            })
        })
        .collect()
}

/// What [`check_task`] found in a file that evaluation can score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scorable {
    pub task: String,
    pub items: usize,
    /// Candidates over all items (the sequences scoring them takes).
    pub candidates: usize,
}

/// Checks that evaluation can score every item of `task`, without a model: the first item that
/// it cannot is an [`Error::Unscorable`] naming the file, the item (0-based) and why.
pub fn check_task(task: &Task) -> Result<Scorable> {
    let qs = questions(task, None)?;
    Ok(Scorable {
        task: task.name.clone(),
        items: qs.len(),
        candidates: qs.iter().map(|q| q.candidates.len()).sum(),
    })
}

/// [`check_task`] on a data file: reads it (a malformed file is an [`Error::Data`]) and checks
/// every item. What `--eval-data` files should pass before training starts.
pub fn check_file(path: &Path) -> Result<Scorable> {
    check_task(&data::load_task(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn item(instruction: &str, answer: &str) -> Example {
        Example {
            instruction: instruction.into(),
            output: format!("the correct answer is {answer}"),
            answer: answer.into(),
            ..Default::default()
        }
    }

    fn task(file: &str, examples: Vec<Example>) -> Task {
        Task {
            name: data::task_name(Path::new(file)),
            file: PathBuf::from(file),
            examples,
        }
    }

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

    /// One item of each LLM-Adapters commonsense task as its files write it, without the
    /// `Answer format:` line: (task, instruction, answer, the candidates).
    const TASK_FORMATS: [(&str, &str, &str, &[&str]); 8] = [
        (
            "boolq",
            "Please answer the following question with true or false, question: is the sky \
             blue?",
            "true",
            &["true", "false"],
        ),
        (
            "piqa",
            "Please choose the correct solution to the question: To boil an egg\n\nSolution1: \
             put it in hot water\n\nSolution2: put it in the fridge",
            "solution1",
            &["solution1", "solution2"],
        ),
        (
            "social_i_qa",
            "Please choose the correct answer to the question: Why did Sam call?\n\nAnswer1: \
             to chat Answer2: to sleep Answer3: to leave",
            "answer1",
            &["answer1", "answer2", "answer3"],
        ),
        (
            "hellaswag",
            "Please choose the correct ending to complete the given sentence: A man sits. \
             \n\nEnding1: he stands. Ending2: he flies. Ending3: he melts. Ending4: he sings.",
            "ending4",
            &["ending1", "ending2", "ending3", "ending4"],
        ),
        (
            "winogrande",
            "Please choose the correct answer to fill in the blank to complete the given \
             sentence: The cup fell off the table because _ was tilted.\n\nOption1: cup \
             Option2: table",
            "option2",
            &["option1", "option2"],
        ),
        (
            "ARC-Easy",
            "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice \
             Answer2: steam Answer3: rock Answer4: wood Answer5: salt",
            "answer5",
            &["answer1", "answer2", "answer3", "answer4", "answer5"],
        ),
        (
            "ARC-Challenge",
            "Please choose the correct answer to the question: Which is heavier?\n\nAnswer1: \
             a kilo of iron Answer2: a gram of iron Answer3: a feather",
            "answer1",
            &["answer1", "answer2", "answer3"],
        ),
        (
            "openbookqa",
            "Please choose the correct answer to the question: The sun is\n\nAnswer1: a star \
             Answer2: a planet Answer3: a moon Answer4: a comet",
            "answer3",
            &["answer1", "answer2", "answer3", "answer4"],
        ),
    ];

    #[test]
    fn every_task_format_is_scored_without_an_answer_format_line() {
        for (name, instruction, answer, want) in TASK_FORMATS {
            let t = task(
                &format!("{name}/test.json"),
                vec![item(instruction, answer)],
            );
            let q = &questions(&t, None).unwrap_or_else(|e| panic!("{name}: {e}"))[0];
            assert_eq!(q.candidates, want, "{name}");
            assert_eq!(q.candidates[q.gold], answer, "{name}");
            assert_eq!(q.targets[q.gold], format!("the correct answer is {answer}"));
            // With the line, the same candidates.
            let with_line = format!("{instruction}\n\nAnswer format: {}", want.join("/"));
            let t = task(&format!("{name}/test.json"), vec![item(&with_line, answer)]);
            assert_eq!(questions(&t, None).unwrap()[0].candidates, want, "{name}");
            assert_eq!(check_task(&t).unwrap().candidates, want.len());
        }
    }

    #[test]
    fn labelled_choices_need_a_gapless_list() {
        assert_eq!(labelled_choices("Answer1: a Answer3: b"), None);
        assert_eq!(labelled_choices("Answer1: only one"), None);
        assert_eq!(labelled_choices("MyAnswer1: a MyAnswer2: b"), None);
        assert_eq!(labelled_choices("Answer1 a Answer2 b"), None);
        assert_eq!(
            labelled_choices("option1: x\noption2: y").unwrap(),
            vec!["option1", "option2"]
        );
        // The list that ends last wins.
        assert_eq!(
            labelled_choices("Option1: a Option2: b? Answer1: c Answer2: d Answer3: e").unwrap(),
            vec!["answer1", "answer2", "answer3"]
        );
    }

    #[test]
    fn the_files_answers_are_the_candidates_of_bare_items() {
        let t = task(
            "letters.json",
            ["B", "A", "C", "A"]
                .iter()
                .map(|a| item("Pick a letter.", a))
                .collect(),
        );
        let qs = questions(&t, None).unwrap();
        assert_eq!(qs[0].candidates, vec!["A", "B", "C"]);
        assert_eq!(qs[0].gold, 1);
        // One of a pair gives both.
        let t = task("yn.json", vec![item("Is it?", "no")]);
        assert_eq!(
            questions(&t, None).unwrap()[0].candidates,
            vec!["yes", "no"]
        );
        let t = task("tf.json", vec![item("Is it?", "True")]);
        assert_eq!(
            questions(&t, None).unwrap()[0].candidates,
            vec!["true", "false"]
        );
        let mut v =
            answer_vocabulary(&["answer10", "answer2", "answer1"].map(|a| item("", a))).unwrap();
        assert_eq!(v, vec!["answer1", "answer2", "answer10"]);
        v = answer_vocabulary(
            &(0..11)
                .map(|i| item("", &format!("w{i}")))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        assert!(v.is_empty(), "more than {MAX_ANSWER_VOCABULARY} answers");
    }

    #[test]
    fn unscorable_items_are_refused_naming_file_and_item() {
        let ok = "Q\n\nAnswer format: true/false";
        let cases: [(Vec<Example>, &str); 4] = [
            (
                vec![item(ok, "true"), item(ok, "maybe")],
                "item 1: answer `maybe` is not one of true/false",
            ),
            (
                // The math tasks: numbers are free-form.
                vec![
                    item("Tom has 3 apples and buys 15. How many?", "18"),
                    item("What is 2 + 2?", "4"),
                ],
                "item 0: free-form answer `18`: no `Answer format: a/b` line",
            ),
            (
                vec![
                    item("Q\n\nAnswer1: a Answer2: b", "answer2"),
                    item("Q\n\nAnswer1: a Answer2: b", "answer3"),
                ],
                "item 1: answer `answer3` is not one of answer1/answer2",
            ),
            (
                vec![
                    item(ok, "true"),
                    Example {
                        output: "yes".into(),
                        ..item(ok, "false")
                    },
                ],
                "item 1: output `yes` does not contain the answer `false`",
            ),
        ];
        for (examples, want) in cases {
            let t = task("data/t/valid.json", examples);
            let e = check_task(&t).unwrap_err();
            assert!(
                matches!(&e, Error::Unscorable { file, .. } if file == "data/t/valid.json"),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("eval: data/t/valid.json: {want}")),
                "{msg}"
            );
            assert!(!msg.contains('\n'));
        }
        // Free-form phrases too (no rule gives candidates).
        let t = task("qa.json", vec![item("Capital of France?", "Paris, France")]);
        let msg = check_task(&t).unwrap_err().to_string();
        assert!(
            msg.starts_with("eval: qa.json: item 0: free-form answer `Paris, France`"),
            "{msg}"
        );
    }

    #[test]
    fn check_file_reads_and_checks_a_file() {
        let dir = std::env::temp_dir().join(format!("mixlora-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("gsm8k")).unwrap();
        let math = dir.join("gsm8k/test.json");
        std::fs::write(
            &math,
            r#"[{"instruction": "2 + 2?", "input": "", "output": "4", "answer": "4"}]"#,
        )
        .unwrap();
        let e = check_file(&math).unwrap_err().to_string();
        assert_eq!(
            e.split(": free-form").next().unwrap(),
            format!("eval: {}: item 0", math.display())
        );
        let boolq = dir.join("boolq.json");
        std::fs::write(
            &boolq,
            r#"[{"instruction": "Please answer the following question with true or false, question: x?",
                 "input": "", "output": "the correct answer is false", "answer": "false"}]"#,
        )
        .unwrap();
        assert_eq!(
            check_file(&boolq).unwrap(),
            Scorable {
                task: "boolq".into(),
                items: 1,
                candidates: 2
            }
        );
        assert!(matches!(
            check_file(&dir.join("missing.json")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

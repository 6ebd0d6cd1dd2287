//! The embedded default job's data: synthetic multiple-choice tasks in the LLM-Adapters format,
//! seeded and deterministic, with train/valid splits; a byte-level tokenizer (256 byte tokens,
//! `<s>` = 256, `</s>` = 257, no merges); and the shape of a tiny LLaMA that learns the tasks in a
//! few minutes on two CPU cores.
//!
//! Tasks (each question's answer follows from its text, except `colour`, a fixed lookup table
//! to memorise):
//! - `parity`: is a number even? `true/false`
//! - `larger`: which of two numbers is larger? `answer1/answer2`
//! - `colour`: the colour of a key from a fixed random table: `red/green/blue/yellow`
//! - `first_letter`: the first letter of a word among four: `answer1/answer2/answer3/answer4`

use std::path::{Path, PathBuf};

use engine::rng::{hash, Rng};
use model::LlamaConfig;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::data::{Example, Task};
use crate::error::{Error, Result};

pub const TASKS: [&str; 4] = ["parity", "larger", "colour", "first_letter"];
pub const COLOURS: [&str; 4] = ["red", "green", "blue", "yellow"];
/// Keys of the colour table.
pub const COLOUR_KEYS: usize = 16;
/// The table is the same for every seed, so that every split of every run agrees on it.
const COLOUR_TABLE_SEED: u64 = 0xC010_4EED;
const WORDS: [&str; 40] = [
    "apple", "river", "stone", "house", "music", "tiger", "cloud", "bread", "glass", "night",
    "paper", "ocean", "light", "horse", "chair", "dream", "earth", "flame", "grape", "juice",
    "knife", "lemon", "money", "north", "plant", "queen", "radio", "sugar", "table", "uncle",
    "voice", "water", "youth", "zebra", "honey", "metal", "field", "snake", "train", "wheel",
];

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const VOCAB_SIZE: usize = 258;

/// The colour table: `(key, colour index)` for `COLOUR_KEYS` distinct three-letter keys.
pub fn colour_table() -> Vec<(String, usize)> {
    let mut rng = Rng::new(COLOUR_TABLE_SEED);
    let mut table: Vec<(String, usize)> = Vec::new();
    while table.len() < COLOUR_KEYS {
        let key: String = (0..3)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        if !table.iter().any(|(k, _)| *k == key) {
            table.push((key, rng.below(COLOURS.len())));
        }
    }
    table
}

fn example(instruction: String, answer: &str) -> Example {
    Example {
        instruction,
        input: String::new(),
        output: format!("the correct answer is {answer}"),
        answer: answer.to_string(),
    }
}

/// `Answer1: a Answer2: b ...` as the commonsense data writes options.
fn options(opts: &[String]) -> String {
    opts.iter()
        .enumerate()
        .map(|(i, o)| format!("Answer{}: {o}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

fn answer_format(n: usize) -> String {
    (1..=n)
        .map(|i| format!("answer{i}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// One example of task `task` (an index into [`TASKS`]).
fn make(task: usize, rng: &mut Rng, table: &[(String, usize)]) -> Example {
    match task {
        0 => {
            let n = rng.below(10_000);
            let a = if n % 2 == 0 { "true" } else { "false" };
            example(
                format!("Is {n} an even number?\n\nAnswer format: true/false"),
                a,
            )
        }
        1 => {
            let a = rng.below(100);
            let b = (a + 1 + rng.below(99)) % 100; // != a
            let ans = if a > b { "answer1" } else { "answer2" };
            example(
                format!(
                    "Which number is larger?\n\n{}\n\nAnswer format: {}",
                    options(&[a.to_string(), b.to_string()]),
                    answer_format(2)
                ),
                ans,
            )
        }
        2 => {
            let (key, c) = &table[rng.below(table.len())];
            example(
                format!(
                    "What colour is the key {key}?\n\nAnswer format: {}",
                    COLOURS.join("/")
                ),
                COLOURS[*c],
            )
        }
        _ => {
            let word = WORDS[rng.below(WORDS.len())];
            let first = word.as_bytes()[0];
            let mut letters = vec![first];
            while letters.len() < 4 {
                let l = b'a' + rng.below(26) as u8;
                if !letters.contains(&l) {
                    letters.push(l);
                }
            }
            rng.shuffle(&mut letters);
            let gold = letters.iter().position(|&l| l == first).unwrap_or(0);
            let opts: Vec<String> = letters.iter().map(|&l| (l as char).to_string()).collect();
            example(
                format!(
                    "Which letter does the word {word} start with?\n\n{}\n\nAnswer format: {}",
                    options(&opts),
                    answer_format(4)
                ),
                &format!("answer{}", gold + 1),
            )
        }
    }
}

/// `(train, valid)`: `n_train` and `n_valid` examples of each task, from independent streams
/// of `seed`. Task files are named `synthetic/NAME/{train,valid}.json` (not written).
pub fn generate(seed: u64, n_train: usize, n_valid: usize) -> (Vec<Task>, Vec<Task>) {
    let table = colour_table();
    let split = |which: u64, n: usize| -> Vec<Task> {
        TASKS
            .iter()
            .enumerate()
            .map(|(ti, name)| {
                let mut rng = Rng::new(hash(seed, 2 * ti as u64 + which));
                Task {
                    name: name.to_string(),
                    file: PathBuf::from(format!(
                        "synthetic/{name}/{}.json",
                        ["train", "valid"][which as usize]
                    )),
                    examples: (0..n).map(|_| make(ti, &mut rng, &table)).collect(),
                }
            })
            .collect()
    };
    (split(0, n_train), split(1, n_valid))
}

/// Writes `generate(..)` as `dir/NAME/train.json` and `dir/NAME/valid.json`; returns the train
/// and valid file paths.
pub fn write(
    dir: &Path,
    seed: u64,
    n_train: usize,
    n_valid: usize,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (train, valid) = generate(seed, n_train, n_valid);
    let mut paths = (Vec::new(), Vec::new());
    for (tasks, file, out) in [
        (&train, "train.json", &mut paths.0),
        (&valid, "valid.json", &mut paths.1),
    ] {
        for t in tasks {
            let d = dir.join(&t.name);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            let p = d.join(file);
            let json = serde_json::to_string_pretty(&t.examples)
                .map_err(|e| Error::data(&p, e.to_string()))?;
            std::fs::write(&p, json).map_err(|e| Error::io(&p, e))?;
            out.push(p);
        }
    }
    Ok(paths)
}

/// GPT-2's byte-to-character map (printable bytes stand for themselves), as the byte-level
/// pre-tokenizer and decoder use it.
fn byte_chars() -> Vec<char> {
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            if printable {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// The byte-level tokenizer: id `b` is byte `b`, then `<s>` and `</s>`; the post-processor puts
/// `<s>` first (so `model::Tokenizer` sees that prompts start with BOS).
pub fn byte_tokenizer() -> Result<tokenizers::Tokenizer> {
    let err = |e: String| Error::Config(format!("byte tokenizer: {e}"));
    let mut vocab = Vocab::default();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    tok.add_special_tokens(&[
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A <s> $B"))
        .map_err(err)?
        .special_tokens(vec![("<s>", BOS)])
        .build()
        .map_err(|e| err(e.to_string()))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// Writes the byte tokenizer to `dir/tokenizer.json` and loads it as a `model::Tokenizer`
/// (which is built from files only).
pub fn load_byte_tokenizer(dir: &Path) -> Result<model::Tokenizer> {
    let json = byte_tokenizer()?
        .to_string(true)
        .map_err(|e| Error::Config(format!("byte tokenizer: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, json).map_err(|e| Error::io(&p, e))?;
    Ok(model::Tokenizer::from_file(&p, Some(BOS), Some(EOS))?)
}

/// A tiny LLaMA for the byte tokenizer: hidden 64, 2 layers, 4 heads of 16, SwiGLU 176, tied
/// embeddings; about 110k parameters.
pub fn tiny_llama_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: VOCAB_SIZE,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        bos_token_id: Some(BOS),
        eos_token_ids: vec![EOS],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{encode_example, PromptTokenizer};
    use crate::eval::questions;

    /// The right answer, worked out from the question text alone.
    fn solve(task: &str, instruction: &str) -> String {
        let first_line = instruction.lines().next().unwrap();
        let nums = |s: &str| -> Vec<usize> {
            s.split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .map(|w| w.parse().unwrap())
                .collect()
        };
        let option_line = instruction
            .lines()
            .find(|l| l.starts_with("Answer1:"))
            .unwrap_or("");
        let opts: Vec<&str> = option_line
            .split("Answer")
            .skip(1)
            .map(|o| o.split_once(':').unwrap().1.trim())
            .collect();
        match task {
            "parity" => (nums(first_line)[0] % 2 == 0).to_string(),
            "larger" => {
                let v: Vec<usize> = opts.iter().map(|o| o.parse().unwrap()).collect();
                if v[0] > v[1] {
                    "answer1".into()
                } else {
                    "answer2".into()
                }
            }
            "colour" => {
                let key = first_line.trim_end_matches('?').rsplit(' ').next().unwrap();
                let (_, c) = colour_table().into_iter().find(|(k, _)| k == key).unwrap();
                COLOURS[c].to_string()
            }
            _ => {
                let word = first_line.split(' ').nth(5).unwrap();
                let i = opts
                    .iter()
                    .position(|o| o.as_bytes()[0] == word.as_bytes()[0])
                    .unwrap();
                format!("answer{}", i + 1)
            }
        }
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let (a, av) = generate(42, 50, 10);
        let (b, bv) = generate(42, 50, 10);
        assert_eq!((a.clone(), av), (b, bv));
        let (c, _) = generate(43, 50, 10);
        assert_ne!(a, c);
        assert_eq!(a.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), TASKS);
        assert_eq!(colour_table(), colour_table());
        // More examples extend the same stream.
        let (d, _) = generate(42, 60, 10);
        assert_eq!(&d[0].examples[..50], &a[0].examples[..]);
    }

    #[test]
    fn answers_are_correct_and_parse_as_questions() {
        let (train, valid) = generate(7, 300, 50);
        for t in train.iter().chain(&valid) {
            for ex in &t.examples {
                assert_eq!(
                    ex.answer,
                    solve(&t.name, &ex.instruction),
                    "{}: {}",
                    t.name,
                    ex.instruction
                );
                assert_eq!(ex.output, format!("the correct answer is {}", ex.answer));
            }
            let qs = questions(t, None).unwrap();
            let n = qs[0].candidates.len();
            assert_eq!(
                n,
                [2, 2, 4, 4][TASKS.iter().position(|x| *x == t.name).unwrap()]
            );
            // Answers are spread over the candidates (so chance accuracy is 1/n).
            let mut counts = vec![0; n];
            qs.iter().for_each(|q| counts[q.gold] += 1);
            assert!(counts.iter().all(|&c| c > 0), "{}: {counts:?}", t.name);
        }
    }

    #[test]
    fn written_files_load_back_as_tasks() {
        let dir = std::env::temp_dir().join(format!("mixlora-synth-{}", std::process::id()));
        let (tr, va) = write(&dir, 1, 20, 5).unwrap();
        let tasks = crate::data::load_tasks(&tr).unwrap();
        assert_eq!(
            tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            TASKS
        );
        assert_eq!(tasks[3].examples, generate(1, 20, 5).0[3].examples);
        assert_eq!(crate::data::load_tasks(&va).unwrap()[0].examples.len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn byte_tokenizer_round_trips_and_fits_the_tiny_model() {
        let dir = std::env::temp_dir().join(format!("mixlora-bytetok-{}", std::process::id()));
        let tok = load_byte_tokenizer(&dir).unwrap();
        assert_eq!(tok.vocab_size(), VOCAB_SIZE);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.adds_bos()),
            (Some(BOS), Some(EOS), true)
        );
        let text = "Is 12 even?\n\n### Response:\nthe correct answer is true é";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(tok.encode("a", true).unwrap(), vec![BOS, 97]);
        assert_eq!(tok.encode("x</s>", false).unwrap(), vec![120, EOS]);
        // A whole synthetic example stays short for the tiny model.
        let (train, _) = generate(3, 20, 1);
        let cfg = tiny_llama_config();
        for t in &train {
            for ex in &t.examples {
                let e = encode_example(&tok, ex, 512, 0).unwrap();
                assert!(e.ids.len() < 320, "{} tokens", e.ids.len());
                assert!(e.ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
                assert_eq!(e.ids[0], BOS);
                assert_eq!(*e.ids.last().unwrap(), EOS);
            }
        }
        assert_eq!(tok.prompt_bos(), Some(BOS));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

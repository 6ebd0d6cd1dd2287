//! The evaluation prompts of the real commonsense data (the shared data, when present): every
//! question parses, with its gold answer among its candidates.

use std::path::{Path, PathBuf};

use trainer::eval::{check_file, questions};

/// Where the shared data lives: `$MIXLORA_DATA`, else `<workspace>/../shared/data`. `None` when
/// neither exists.
fn shared_data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MIXLORA_DATA") {
        let d = PathBuf::from(d);
        return d.is_dir().then_some(d);
    }
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    d.is_dir().then_some(d)
}

#[test]
fn real_commonsense_lines_parse() {
    let Some(dir) = shared_data_dir() else {
        testutil::skip("no shared data (set MIXLORA_DATA or put it at <repo>/../shared/data)");
        return;
    };
    let mut seen = 0;
    for (name, n_min, n_max) in [
        ("boolq", 2, 2),
        ("arc_e", 3, 5),
        ("arc_c", 3, 5),
        ("obqa", 4, 4),
    ] {
        let p = dir.join("commonsense").join(name).join("valid.json");
        if !p.is_file() {
            testutil::skip(format_args!("{name}: {} is missing", p.display()));
            continue;
        }
        let task = trainer::data::load_task(&p).unwrap();
        assert_eq!(task.name, name);
        for (i, q) in questions(&task, None).unwrap().iter().enumerate() {
            let ex = &task.examples[i];
            assert!(
                (n_min..=n_max).contains(&q.candidates.len()),
                "{name} item {i}: {:?}",
                q.candidates
            );
            assert_eq!(q.candidates[q.gold], ex.answer);
            assert_eq!(
                q.targets[q.gold], ex.output,
                "the gold target is the output itself"
            );
            assert!(q
                .targets
                .iter()
                .all(|t| t.starts_with("the correct answer is ")));
        }
        seen += task.examples.len();
    }
    eprintln!("parsed {seen} questions of the shared commonsense data");
}

/// Every task file of the shared commonsense data (every folder, every JSON file) is scorable,
/// and with the `Answer format:` lines taken out of its instructions, every item gets the same
/// candidates and gold answer from the task's format alone.
#[test]
fn every_commonsense_file_is_scorable_with_or_without_answer_format_lines() {
    let Some(dir) = shared_data_dir() else {
        testutil::skip("no shared data (set MIXLORA_DATA or put it at <repo>/../shared/data)");
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("commonsense"))
        .into_iter()
        .flatten()
        .flat_map(|task| {
            std::fs::read_dir(task.unwrap().path())
                .into_iter()
                .flatten()
        })
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        testutil::skip(format_args!("no task files under {}", dir.display()));
        return;
    }
    for p in &files {
        let checked = check_file(p).unwrap_or_else(|e| panic!("{e}"));
        let task = trainer::data::load_task(p).unwrap();
        assert_eq!(checked.items, task.examples.len());
        let with = questions(&task, None).unwrap();
        let mut bare = task.clone();
        for ex in &mut bare.examples {
            ex.instruction = ex
                .instruction
                .lines()
                .filter(|l| !l.trim_start().starts_with("Answer format:"))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(!ex.instruction.contains("Answer format"));
        }
        let without = questions(&bare, None).unwrap_or_else(|e| panic!("{e}"));
        for (i, (a, b)) in with.iter().zip(&without).enumerate() {
            assert_eq!(
                (&a.candidates, a.gold),
                (&b.candidates, b.gold),
                "{} item {i}",
                p.display()
            );
        }
        eprintln!(
            "{}: {} items, {} candidates, scorable without `Answer format:` lines",
            p.display(),
            checked.items,
            checked.candidates
        );
    }
}

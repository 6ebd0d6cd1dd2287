//! The evaluation prompts of the real commonsense data (the shared data, when present): every
//! question parses, with its gold answer among its candidates.

use std::path::{Path, PathBuf};

use trainer::eval::questions;

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
